"""Whole documents for evaluation: rebuilt from a shard split (the inverse of fluidlm/data/shards.py's
packing) or read from raw text and tokenised, checked against the model's training tokenizer.

    docs, data_info = load_documents(["data/default/val/manifest.json"], vocab_size=8192,
                                     train_tokenizer=(sha256, tokenizer_path, where_found))

A document is its token ids followed by EOS (how `fluidlm data` packs them). Shards hold packed
samples cut from one stream of documents; documents spanning samples (or shards) are joined back,
and those cut by the edges of the split are dropped and counted (`DataInfo.incomplete_dropped`).
Errors are DataError, with the message naming the fix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluidlm.data import DataError


@dataclass
class DataInfo:
    source: str
    kind: str                            # "shards" or "text"
    tokenizer_sha256: str | None
    documents_available: int = 0         # whole documents found in the input
    incomplete_dropped: int = 0          # documents cut by a shard boundary of the split (not whole): not scored
    split_documents: int = 0             # documents longer than --max-doc-tokens, split into pieces of that many
    skipped_short: int = 0               # documents (pieces) under --min-doc-tokens
    documents: int = 0                   # documents (pieces) scored
    tokens: int = 0                      # their tokens (EOS included)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def _is_manifest(inputs: list[str]) -> Path | None:
    if len(inputs) != 1:
        return None
    p = Path(inputs[0])
    if p.name == "manifest.json" and p.is_file():
        return p
    if p.is_dir() and (p / "manifest.json").is_file():
        return p / "manifest.json"
    return None


def iter_shard_documents(manifest: dict, stats: DataInfo):
    """Whole documents of a shard split, in order, rebuilt from the packed samples: samples are
    consecutive slices of one stream of documents (each ids + EOS), `starts` mark where documents
    begin. A document spanning samples (or shards) is joined back. Documents cut by the edges of
    the split (before the first start, after the dropped tail) are not whole: dropped and counted."""
    from fluidlm.data.shards import read_shard

    eos = int(manifest.get("eos_id", 2))
    pending: list[np.ndarray] = []
    started = False
    for entry in manifest["shards"]:
        tokens, starts = read_shard(Path(manifest["root"]), entry)
        for sample, sample_starts in zip(tokens, starts):
            sample = sample.astype(np.int64)
            cuts = [int(s) for s in sorted(sample_starts.tolist())]
            prev = 0
            for s in cuts:
                if s > prev:
                    pending.append(sample[prev:s])
                if started and pending:
                    yield np.concatenate(pending)
                elif not started and pending:
                    stats.incomplete_dropped += 1  # the split began mid-document
                pending, started, prev = [], True, s
            if prev < len(sample):
                pending.append(sample[prev:])
    if pending:
        doc = np.concatenate(pending)
        if started and doc[-1] == eos:
            yield doc
        else:
            stats.incomplete_dropped += 1  # the rest was in the dropped tail


def iter_text_documents(inputs: list[str], tokenizer_path: Path):
    from fluidlm.data.corpus import ReadStats, iter_documents
    from fluidlm.data.tokenizer import EOS, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    for text in iter_documents(inputs, ReadStats()):
        yield np.asarray(tok.encode(text) + [EOS], dtype=np.int64)


def load_documents(inputs: list[str], *, vocab_size: int, train_tokenizer: tuple[str | None, Path | None, str],
                   tokenizer: str | None = None, max_docs: int | None = None, max_tokens: int | None = None,
                   min_doc_tokens: int = 0, max_doc_tokens: int | None = None, quiet: bool = False):
    """The documents to score (int64 arrays, EOS last) and a DataInfo, from a shard manifest (or its
    folder) or raw text inputs. `train_tokenizer` = (sha256, tokenizer file, where found) of the
    tokenizer the model was trained with (None, None, why: unknown); the data must have been made
    with it (sha256), else DataError. Token ids must be below `vocab_size`."""
    from fluidlm.data.shards import load_manifest
    from fluidlm.data.tokenizer import file_sha256

    train_sha, train_tok, where = train_tokenizer
    vocab = int(vocab_size)

    def warn(msg):
        if not quiet:
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    manifest_path = _is_manifest(inputs)
    if manifest_path is not None:
        manifest = load_manifest(manifest_path)
        if manifest.get("loss_mask"):  # perplexity over every token would count the unscored filler
            task = (manifest.get("task") or {}).get("name")
            raise DataError(f"{manifest_path} holds samples with loss masks (task {task!r}): perplexity scores every "
                            f"token of whole documents; score these with `fluidlm eval --task {task or 'mqar'}`")
        sha = manifest.get("tokenizer_sha256")
        data = DataInfo(source=str(manifest_path), kind="shards", tokenizer_sha256=sha)
        if tokenizer is not None and file_sha256(tokenizer) != sha:
            raise DataError(f"--tokenizer {tokenizer} is not the tokenizer the shards in {manifest_path.parent} were made "
                            "with (sha256 differs)")
        if train_sha is None:
            msg = f"cannot check the data's tokenizer against the model's ({where}); trusting {manifest_path}"
            warn(msg)
            data.notes.append(msg)
        elif sha != train_sha:
            raise DataError(f"tokenizer mismatch: the shards in {manifest_path.parent} were made with tokenizer sha256 "
                            f"{str(sha)[:12] or '(none)'}…, the model was trained with {str(train_sha)[:12] or '(none)'}… "
                            f"({where}); build the evaluation data with the training tokenizer (`fluidlm data shards "
                            f"--tokenizer {train_tok or '<training tokenizer.model>'}`) or pass raw text files")
        if int(manifest.get("vocab_size", 0)) > vocab:
            raise DataError(f"the shards' vocabulary ({manifest['vocab_size']}) is larger than the model's ({vocab})")
        source = iter_shard_documents(manifest, data)
    else:
        tok = Path(tokenizer) if tokenizer else train_tok
        if tok is None:
            raise DataError(f"raw text input needs the training tokenizer, and it was not found ({where}); "
                            "pass --tokenizer PATH/tokenizer.model")
        sha = file_sha256(tok)
        if train_sha is None:
            msg = f"cannot check --tokenizer {tok} against the model's training tokenizer ({where})"
            warn(msg)
            data_notes = [msg]
        elif sha != train_sha:
            raise DataError(f"tokenizer mismatch: {tok} (sha256 {sha[:12]}…) is not the tokenizer the model was trained "
                            f"with ({train_sha[:12] or '(none)'}…, {where}); pass the training tokenizer with --tokenizer")
        else:
            data_notes = []
        data = DataInfo(source=" ".join(inputs), kind="text", tokenizer_sha256=sha, notes=data_notes)
        source = iter_text_documents(inputs, tok)
    docs, full = [], False
    for whole in source:
        data.documents_available += 1
        pieces = [whole]
        if max_doc_tokens is not None and len(whole) > max_doc_tokens:
            pieces = [whole[s:s + max_doc_tokens] for s in range(0, len(whole), max_doc_tokens)]
            data.split_documents += 1
        for doc in pieces:
            if len(doc) < max(2, min_doc_tokens):
                data.skipped_short += 1
                continue
            if max_tokens is not None and data.tokens + len(doc) > max_tokens:
                full = True
                break
            if int(doc.max()) >= vocab:
                raise DataError(f"token id {int(doc.max())} in {data.source} is outside the model's vocabulary ({vocab})")
            docs.append(doc)
            data.documents += 1
            data.tokens += len(doc)
            if max_docs is not None and data.documents >= max_docs:
                full = True
                break
        if full:
            break
    if not docs:
        hint = " (--max-tokens is smaller than the first document: add --max-doc-tokens)" if max_tokens else ""
        hint += " (every document is under --min-doc-tokens)" if data.skipped_short else ""
        raise DataError(f"no whole document to evaluate in {data.source}{hint}; for shards, a split smaller than one "
                        "document holds none: use raw text files or larger shards")
    return docs, data
