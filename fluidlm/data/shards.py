"""Webdataset tar shards of packed sequences, and their manifest.

Every document is its ids followed by EOS; documents are concatenated in order and cut into
non-overlapping samples of seq_len + 1 tokens (inputs and shifted targets come from one sample).
Each sample stores `tokens.npy` (uint16 when the vocabulary fits, else uint32) and `starts.npy`
(int32 positions where a document begins inside it). The ragged tail (< seq_len + 1 tokens) is
dropped and reported in the manifest as `dropped_tail_tokens`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from fluidlm.data import DataError
from fluidlm.data.tokenizer import EOS, file_sha256, load_tokenizer

MANIFEST_VERSION = 1
_worker_tokenizer = None


def _init_worker(path):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(path)


def _encode(text):
    return np.asarray(_worker_tokenizer.encode(text) + [EOS], dtype=np.int64)


def encode_documents(documents, tokenizer_path: Path, workers: int = 2, progress: bool = True):
    """Yield each document's ids (+EOS) in order, tokenised in `workers` processes."""
    from tqdm import tqdm

    with mp.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_path),)) as pool:
        for ids in tqdm(pool.imap(_encode, documents, chunksize=1), desc="tokenizing", unit="doc", disable=not progress):
            yield ids


def write_shards(documents, tokenizer_path: Path, seq_len: int, out: Path, samples_per_shard: int = 256,
                 workers: int = 2, progress: bool = True) -> dict:
    import webdataset as wds

    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_piece_size()
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    sample_len = seq_len + 1
    shards, starts, total_tokens, n_docs = [], [], 0, 0
    state = {"writer": None, "count": 0, "index": 0}
    t0 = time.perf_counter()

    def emit(tokens, doc_starts):
        if state["writer"] is None or state["count"] == samples_per_shard:
            close()
            name = f"shard-{len(shards):06d}.tar"
            shards.append({"file": name, "samples": 0, "tokens": 0})
            state["writer"], state["count"] = wds.TarWriter(str(out / name)), 0
        state["writer"].write({"__key__": f"{state['index']:010d}", "tokens.npy": tokens.astype(dtype),
                               "starts.npy": np.asarray(doc_starts, dtype=np.int32)})
        state["count"] += 1
        state["index"] += 1
        shards[-1]["samples"] += 1
        shards[-1]["tokens"] += len(tokens)

    def close():
        if state["writer"] is not None:
            state["writer"].close()
            state["writer"] = None

    pending = np.zeros(0, dtype=np.int64)
    for ids in encode_documents(documents, tokenizer_path, workers, progress):
        n_docs += 1
        total_tokens += len(ids)
        starts.append(len(pending))
        pending = np.concatenate([pending, ids])
        while len(pending) >= sample_len:
            emit(pending[:sample_len], [s for s in starts if s < sample_len])
            starts = [s - sample_len for s in starts if s >= sample_len]
            pending = pending[sample_len:]
    close()
    elapsed = time.perf_counter() - t0
    if n_docs == 0:
        raise DataError("the corpus is empty: no document to shard; check --input")
    if not shards:
        raise DataError(
            f"--seq-len {seq_len} is larger than the whole corpus ({total_tokens} tokens): no sample of "
            f"{sample_len} tokens fits; use a smaller --seq-len or more text"
        )
    manifest = {
        "format_version": MANIFEST_VERSION, "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_sha256": file_sha256(tokenizer_path), "vocab_size": vocab, "eos_id": EOS,
        "seq_len": seq_len, "dtype": np.dtype(dtype).name, "documents": n_docs,
        "total_tokens": sum(s["tokens"] for s in shards), "total_samples": sum(s["samples"] for s in shards),
        "dropped_tail_tokens": int(len(pending)), "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    manifest["tokens_per_s"] = total_tokens / max(elapsed, 1e-9)
    return manifest


def load_manifest(path: Path, tokenizer_path: Path | None = None) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise DataError(f"manifest {str(path)!r} not found; build shards with `fluidlm data shards` or `fluidlm data prepare`")
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"], manifest["seq_len"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise DataError(f"manifest {str(path)!r} is not a FluidLM shard manifest ({exc}); rebuild the shards") from None
    manifest["root"] = str(path.parent)
    if tokenizer_path is not None and file_sha256(tokenizer_path) != manifest["tokenizer_sha256"]:
        raise DataError(
            f"tokenizer {str(tokenizer_path)!r} does not match the one the shards in {str(path.parent)!r} were "
            f"made with (sha256 differs); use the tokenizer the manifest names ({manifest['tokenizer']}) or rebuild the shards"
        )
    return manifest


def read_shard(root: Path, entry: dict) -> tuple[list, list]:
    """All samples of one shard: (tokens arrays, starts arrays). Names the file on any corruption."""
    import io
    import tarfile

    path = Path(root) / entry["file"]
    tokens, starts = {}, {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = np.load(io.BytesIO(tar.extractfile(member).read()))
                (tokens if ext == "tokens.npy" else starts)[key] = data
    except (OSError, tarfile.TarError, ValueError, EOFError) as exc:
        raise DataError(f"shard {str(path)!r} is unreadable or corrupt ({exc}); rebuild the shards") from None
    keys = sorted(tokens)
    if len(keys) != entry["samples"] or set(keys) != set(starts):
        raise DataError(f"shard {str(path)!r} holds {len(keys)} samples, the manifest says {entry['samples']}; rebuild the shards")
    return [tokens[k] for k in keys], [starts[k] for k in keys]
