"""Data pipeline: exact tokenizer round trip, shards hold the corpus, exact loader resume, DP split."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fluidlm.data import DataError
from fluidlm.data.corpus import iter_documents
from fluidlm.data.loader import ShardLoader
from fluidlm.data.shards import load_manifest, write_shards
from fluidlm.data.tokenizer import EOS, load_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["textwrap.py", "tabnanny.py", "calendar.py", "locale.py", "ast.py", "shlex.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = [(STDLIB / f).read_text() for f in FILES] + ["\tunicode ☃ é  trailing  \n\n", "x = 1\r\n"]
    tok = root / "tok.model"
    train_tokenizer(docs, 400, tok)
    manifest = write_shards(docs, tok, seq_len=63, out=root / "shards", samples_per_shard=37, progress=False)
    # A smaller set for the loader tests, which replay whole epochs many times.
    small = write_shards(docs[:2], tok, seq_len=63, out=root / "small", samples_per_shard=23, progress=False)
    return {"root": root, "docs": docs, "tok": tok, "manifest": manifest, "shards": root / "shards",
            "small": small, "small_shards": root / "small"}


def test_round_trip_is_exact_on_standard_library_files(corpus):
    sp = load_tokenizer(corpus["tok"])
    for name in FILES + ["inspect.py", "typing.py"]:
        text = (STDLIB / name).read_text()
        assert sp.decode(sp.encode(text)) == text, name
    for text in corpus["docs"][-2:]:
        assert sp.decode(sp.encode(text)) == text


def test_shards_hold_exactly_the_corpus_tokens(corpus):
    sp = load_tokenizer(corpus["tok"])
    stream, doc_starts = [], []
    for text in corpus["docs"]:
        doc_starts.append(len(stream))
        stream += sp.encode(text) + [EOS]
    m = load_manifest(corpus["shards"])
    assert m["total_tokens"] + m["dropped_tail_tokens"] == len(stream)
    from fluidlm.data.shards import read_shard
    tokens, starts = [], []
    for entry in m["shards"]:
        t, s = read_shard(corpus["shards"], entry)
        assert sum(len(x) for x in t) == entry["tokens"]
        for x, y in zip(t, s):
            starts += [len(tokens) + int(j) for j in y]
            tokens += x.tolist()
    assert tokens == stream[: len(tokens)]
    assert starts == [s for s in doc_starts if s < len(tokens)]
    assert m["dtype"] == "uint16"


def loader(corpus, **kw):
    args = dict(dp_rank=0, dp_size=1, micro_batch_size=4, seed=0)
    args.update(kw)
    return ShardLoader(corpus["small_shards"], **args)


def take(ld, n):
    it = iter(ld)
    return [next(it) for _ in range(n)]


def same(a, b):
    return all((x["tokens"] == y["tokens"]).all() and (x["doc_starts"] == y["doc_starts"]).all() for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_every_position_yields_the_identical_stream(corpus, workers):
    ld = loader(corpus)
    total = ld.batches_per_epoch + 3  # into the second epoch
    straight = take(loader(corpus), total)
    positions = range(total) if workers == 0 else [0, 5, ld.batches_per_epoch - 1, ld.batches_per_epoch + 1]
    for k in positions:
        first = loader(corpus)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        resumed = loader(corpus, num_workers=workers)
        resumed.load_state_dict(state)
        assert same(take(resumed, total - k), straight[k:]), k


def test_dp_ranks_are_disjoint_equal_and_cover_the_epoch(corpus):
    total = corpus["small"]["total_samples"]
    for dp in (2, 3):
        seen = []
        counts = set()
        for rank in range(dp):
            ld = loader(corpus, dp_rank=rank, dp_size=dp)
            counts.add(ld.batches_per_epoch)
            for b in take(ld, ld.batches_per_epoch):
                seen += [tuple(row.tolist()) for row in b["tokens"]]
        assert len(counts) == 1
        assert len(seen) == len(set(seen)) == (total // (dp * 4)) * dp * 4


def test_order_depends_on_seed_and_epoch_only(corpus):
    assert same(take(loader(corpus, seed=1), 6), take(loader(corpus, seed=1), 6))
    assert not same(take(loader(corpus, seed=1), 6), take(loader(corpus, seed=2), 6))
    ld = loader(corpus)
    n = ld.batches_per_epoch
    both = take(ld, 2 * n)
    assert not same(both[:3], both[n : n + 3])


def test_bad_input_gives_clear_errors(corpus, tmp_path):
    with pytest.raises(DataError, match="empty"):
        write_shards([], corpus["tok"], 16, tmp_path / "e", progress=False)
    with pytest.raises(DataError, match="larger than the whole corpus"):
        write_shards(["tiny"], corpus["tok"], 10_000, tmp_path / "big", progress=False)
    other = tmp_path / "other.model"
    train_tokenizer(corpus["docs"][:3], 420, other)
    with pytest.raises(DataError, match="does not match"):
        ShardLoader(corpus["shards"], tokenizer_path=other)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(corpus["docs"], 262, tmp_path / "s.model")
    with pytest.raises(DataError, match="fewer samples than"):
        loader(corpus, dp_size=64, micro_batch_size=64)
    with pytest.raises(DataError, match="vocab-size"):
        train_tokenizer(["abc abc"], 5000, tmp_path / "v.model")
    with pytest.raises(DataError, match="not found"):
        ShardLoader(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    m = json.loads((corpus["shards"] / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(m))
    for entry in m["shards"]:
        (broken / entry["file"]).write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=r"shard-000\d+\.tar.*corrupt"):
        take(ShardLoader(broken, micro_batch_size=2), 1)


def test_user_corpus_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    from fluidlm.data.corpus import ReadStats
    stats = ReadStats()
    docs = list(iter_documents([str(tmp_path / "*.txt"), str(tmp_path / "d.jsonl")], stats))
    assert sorted(docs) == sorted(["alpha", "ok \ufffd\ufffd bytes", "one", "two"])
    assert stats.empty_skipped == 1 and len(stats.replaced_bytes_docs) == 1


def test_default_corpus_cli_reports_long_documents(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fluidlm", "data", "corpus", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "documents" in out.stdout and "longest" in out.stdout
    lengths = [len(json.loads(line)["text"]) for line in open(tmp_path / "train.jsonl")]
    assert sum(n > 256_000 for n in lengths) >= 3
    assert (tmp_path / "val.jsonl").stat().st_size > 0


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fluidlm", "data", "shards", "--input", str(tmp_path / "none.txt"),
                          "--tokenizer", "x.model", "--seq-len", "8", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "does not exist" in out.stderr
