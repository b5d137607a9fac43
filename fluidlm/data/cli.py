"""`fluidlm data …`: build the default corpus, train the tokenizer, write shards, or all three; verify shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _report(title: str, data: dict) -> None:
    print(f"{title}:")
    for key, value in data.items():
        if key != "shards":
            print(f"  {key}: {value}")


def cmd_corpus(args) -> int:
    from fluidlm.data.corpus import write_default_corpus

    report = write_default_corpus(Path(args.out))
    _report(f"default corpus (this interpreter's standard library) → {args.out}/{{train,val}}.jsonl", report)
    return 0


def _documents(inputs):
    from fluidlm.data.corpus import ReadStats, describe, iter_documents

    stats = ReadStats()
    docs = list(iter_documents(inputs, stats))
    print(f"read {describe(stats)}")
    return docs


def cmd_tokenizer(args) -> int:
    from fluidlm.data.tokenizer import train_tokenizer

    _report("tokenizer", train_tokenizer(_documents(args.input), args.vocab_size, Path(args.out)))
    return 0


def cmd_shards(args) -> int:
    from fluidlm.data.shards import write_shards

    seed = None if args.shuffle_seed < 0 else args.shuffle_seed
    manifest = write_shards(_documents(args.input), Path(args.tokenizer), args.seq_len, Path(args.out),
                            args.samples_per_shard, args.workers, shuffle_seed=seed)
    _report(f"shards → {args.out}", manifest)
    print(f"  shards: {len(manifest['shards'])}; tokens/s: {manifest['tokens_per_s']:,.0f}")
    return 0


def prepare(out: Path, vocab_size: int = 4096, seq_len: int = 512, workers: int = 2, shuffle_seed: int | None = 0) -> dict:
    """corpus → tokenizer (train split only) → train and val shards, skipping what is up to date.
    The training samples are shuffled across the corpus (`shuffle_seed`; None = corpus order); the
    validation split keeps corpus order (evaluation reads its documents back whole, in order)."""
    from fluidlm.data.corpus import iter_documents, write_default_corpus
    from fluidlm.data.shards import MANIFEST_VERSION, load_manifest, write_shards
    from fluidlm.data.tokenizer import file_sha256, load_tokenizer, mask_id, train_tokenizer

    corpus, tok = out / "corpus", out / "tokenizer.model"
    if not (corpus / "train.jsonl").exists():
        _report("corpus", write_default_corpus(corpus))
    # (a tokenizer from before the mask token existed is retrained: masked-LM training needs it)
    if not tok.exists() or load_tokenizer(tok).get_piece_size() != vocab_size or mask_id(load_tokenizer(tok)) is None:
        _report("tokenizer", train_tokenizer(iter_documents([str(corpus / "train.jsonl")]), vocab_size, tok))
    result = {}
    for split in ("train", "val"):
        shard_dir = out / split
        manifest_path = shard_dir / "manifest.json"
        if manifest_path.exists():
            m = json.loads(manifest_path.read_text())
            want_seed = shuffle_seed if split == "train" else None
            if (m.get("seq_len") == seq_len and m.get("tokenizer_sha256") == file_sha256(tok)
                    and m.get("format_version") == MANIFEST_VERSION and m.get("shuffle_seed") == want_seed):
                result[split] = load_manifest(manifest_path)
                print(f"{split} shards up to date: {m['total_samples']} samples of {seq_len + 1} tokens")
                continue
        m = write_shards(iter_documents([str(corpus / f"{split}.jsonl")]), tok, seq_len, shard_dir, workers=workers,
                         shuffle_seed=shuffle_seed if split == "train" else None)
        print(f"{split} shards: {m['total_samples']} samples, {m['total_tokens']:,} tokens, {m['tokens_per_s']:,.0f} tokens/s")
        result[split] = m
    return result


def cmd_prepare(args) -> int:
    prepare(Path(args.out), args.vocab_size, args.seq_len, args.workers)
    print(f"data ready in {args.out}: train/manifest.json, val/manifest.json, tokenizer.model")
    return 0


def cmd_synthetic_mqar(args) -> int:
    from fluidlm.data.synthetic import parse_shapes, write_mqar

    (train_shape,) = parse_shapes(f"{args.seq_len}:{args.num_pairs}")
    manifests = write_mqar(Path(args.out), train_shape, parse_shapes(args.test), args.train_examples, args.val_examples,
                           args.test_examples, args.vocab_size, args.seed, args.power_a)
    for split, m in manifests.items():
        task = m["task"]
        print(f"{split}: {m['total_samples']} samples of {task['seq_len'] + 1} tokens, {task['num_pairs']} pairs"
              + (f" ({task['dropped_as_in_train']} dropped: equal to a training sample)" if task["dropped_as_in_train"] else ""))
    print(f"MQAR data in {args.out}: train with data.dir={args.out}, data.seq_len={args.seq_len}, "
          f"model.vocab_size>={args.vocab_size}; score with `fluidlm eval --task mqar --data {args.out}`")
    return 0


def cmd_synthetic_passkey(args) -> int:
    from fluidlm.data.synthetic import write_passkey

    manifests = write_passkey(Path(args.out), Path(args.tokenizer), args.seq_len, args.train_examples,
                              args.val_examples, args.seed)
    for split, m in manifests.items():
        print(f"{split}: {m['total_samples']} passkey documents of {args.seq_len + 1} tokens (the key's digits scored)")
    print(f"passkey data in {args.out}: continue training a checkpoint on it (data.dir={args.out}, "
          f"data.seq_len={args.seq_len}), then `fluidlm eval --task passkey`")
    return 0


def cmd_verify(args) -> int:
    """Every manifest under DIR (DIR/manifest.json, or DIR/*/manifest.json: a prepared data folder)."""
    from fluidlm.data import DataError
    from fluidlm.data.shards import verify_shards

    root = Path(args.dir)
    manifests = [root] if (root / "manifest.json").is_file() or root.name == "manifest.json" else \
        sorted(p.parent for p in root.glob("*/manifest.json"))
    if not manifests:
        raise DataError(f"{root}: no manifest.json in it or in its subfolders; pass a shard folder or a data folder")
    failed = 0
    for manifest in manifests:
        problems, s = verify_shards(manifest)
        failed += bool(problems)
        for problem in problems:
            print(f"FAILED: {problem}", file=sys.stderr)
        how = "sizes, counts and member crc32 checksums" if s["checksummed"] else \
            "sizes and counts only (no member checksums: shards written before they existed; rebuild to add them)"
        print(f"{'FAILED' if problems else 'ok'} {s['manifest']}: {s['shards']} shards, {s['samples']} samples, "
              f"{s['tokens']:,} tokens read in {s['seconds']:.2f} s ({s['tokens_per_s']:,.0f} tokens/s); checked {how}")
    return 2 if failed else 0


def _guard(fn):
    def run(args):
        from fluidlm.data import DataError

        try:
            return fn(args)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="corpus, tokenizer and shards",
                              description="Build the data FluidLM trains on. Inputs (--input) may be text files, "
                                          "folders (recursive), globs or .jsonl files with a 'text' field.")
    sub = p.add_subparsers(dest="data_command", metavar="STEP", required=True)

    c = sub.add_parser("corpus", help="the default corpus: this interpreter's standard library, no download")
    c.add_argument("--out", required=True, help="folder for train.jsonl and val.jsonl")
    c.set_defaults(func=_guard(cmd_corpus))

    t = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer (byte fallback: exact round trip)")
    t.add_argument("--input", nargs="+", required=True, help="text files, folders, globs or .jsonl files to learn from")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special and <mask> ids included "
                                                                "(default %(default)s; at most model.vocab_size)")
    t.add_argument("--out", required=True, help="path of the .model file to write")
    t.set_defaults(func=_guard(cmd_tokenizer))

    s = sub.add_parser("shards", help="tokenize and write webdataset shards of packed sequences + manifest.json")
    s.add_argument("--input", nargs="+", required=True, help="text files, folders, globs or .jsonl files to tokenize")
    s.add_argument("--tokenizer", required=True, help="the sentencepiece .model (from `fluidlm data tokenizer`)")
    s.add_argument("--seq-len", type=int, required=True, help="training context; samples hold seq-len + 1 tokens")
    s.add_argument("--out", required=True, help="folder for the shard tars and manifest.json")
    s.add_argument("--samples-per-shard", type=int, default=256, help="samples per tar (default %(default)s)")
    s.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    s.add_argument("--shuffle-seed", type=int, default=0,
                   help="shuffle the packed samples across the whole corpus with this seed before filling the "
                        "shards (-1: keep corpus order, e.g. for a validation split read back as whole documents)")
    s.set_defaults(func=_guard(cmd_shards))

    v = sub.add_parser("verify", help="read every shard back and check it against its manifest (checksums included)")
    v.add_argument("dir", help="a shard folder (with manifest.json) or a data folder (train/, val/, ...)")
    v.set_defaults(func=_guard(cmd_verify))

    r = sub.add_parser("prepare", help="corpus → tokenizer → train/val shards in one go (skips what is up to date)",
                       description="The default data, offline: this interpreter's standard library as the corpus "
                                   "(one document per package, train/val by a stable hash of its name), a "
                                   "sentencepiece BPE tokenizer trained on it, then webdataset shards of "
                                   "seq-len + 1 token samples for train/ (shuffled) and val/ (corpus order). "
                                   "A step whose output is up to date with its inputs and options is skipped. "
                                   "Point data.dir of a training config at --out.")
    r.add_argument("--out", default="data/default", help="folder for corpus/, tokenizer.model, train/, val/ "
                                                         "(default %(default)s)")
    r.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary; at most model.vocab_size "
                                                                "(default %(default)s)")
    r.add_argument("--seq-len", type=int, default=512, help="training context in tokens; must equal data.seq_len "
                                                            "(default %(default)s)")
    r.add_argument("--workers", type=int, default=2, help="tokenizer processes (default %(default)s)")
    r.set_defaults(func=_guard(cmd_prepare))

    y = sub.add_parser("synthetic", help="loss-masked synthetic task shards: MQAR recall, passkey retrieval")
    tasks = y.add_subparsers(dest="task", metavar="TASK", required=True)
    q = tasks.add_parser("mqar", help="Zoology's multi-query associative recall: train/, val/ and test-<L>x<P>/",
                         description="Key-value pairs, then each key queried once after power-law gaps, random filler "
                                     "between; only the values after the queries are scored (fluidlm/data/synthetic.py).")
    q.add_argument("--out", required=True, help="folder for train/, val/ and test-<seq_len>x<pairs>/")
    q.add_argument("--seq-len", type=int, default=256, help="training sequence length (default %(default)s)")
    q.add_argument("--num-pairs", type=int, default=16, help="key-value pairs per training sample (default %(default)s)")
    q.add_argument("--test", default="256:16,512:32,1024:64,4096:256",
                   help="test sets as SEQ_LEN:PAIRS,… (default %(default)s: the training shape and three that extrapolate)")
    q.add_argument("--train-examples", type=int, default=100_000, help="default %(default)s")
    q.add_argument("--val-examples", type=int, default=1000, help="default %(default)s")
    q.add_argument("--test-examples", type=int, default=1000, help="per test set (default %(default)s)")
    q.add_argument("--vocab-size", type=int, default=8192, help="keys from the lower half, values from the upper "
                                                                "(default %(default)s, as Zoology)")
    q.add_argument("--power-a", type=float, default=0.01, help="query gap distribution ∝ a·gap^(a-1) (default %(default)s)")
    q.add_argument("--seed", type=int, default=0, help="splits are seeded apart from it (default %(default)s)")
    q.set_defaults(func=_guard(cmd_synthetic_mqar))
    k = tasks.add_parser("passkey", help="passkey documents for fine-tuning: filler, the key at a random depth, the "
                                         "question, the key (only its digits scored)")
    k.add_argument("--out", required=True, help="folder for train/ and val/")
    k.add_argument("--tokenizer", required=True, help="the model's training tokenizer (.model)")
    k.add_argument("--seq-len", type=int, default=1024, help="default %(default)s")
    k.add_argument("--train-examples", type=int, default=2000, help="default %(default)s")
    k.add_argument("--val-examples", type=int, default=64, help="default %(default)s")
    k.add_argument("--seed", type=int, default=0, help="default %(default)s")
    k.set_defaults(func=_guard(cmd_synthetic_passkey))
