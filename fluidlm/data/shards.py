"""Webdataset tar shards of packed sequences, and their manifest.

Every document is its ids followed by EOS; documents are concatenated in order and cut into
non-overlapping samples of seq_len + 1 tokens (inputs and shifted targets come from one sample).
The packed samples are then shuffled across the whole corpus (seeded; `shuffle_seed=None` keeps
corpus order) before they fill the shards, so every shard is a random mix of the corpus. Each
sample stores `tokens.npy` (uint16 when the vocabulary fits, else uint32), `starts.npy` (int32
positions where a document begins inside it) and `docs.npy` (int32 corpus-order ids of the
documents it holds pieces of, one per piece); its key is its index in corpus order, so the
documents stay reconstructible. The ragged tail (< seq_len + 1 tokens) is dropped and reported in
the manifest as `dropped_tail_tokens`.

Shards are read through webdataset's I/O (`webdataset.gopen` + its tar iterator): a manifest entry
(or the manifest's `base_url`) may name a local path, `file://`, `http(s)://`, `s3://`, `gs://` or a
`pipe:` command. Remote reads are retried with exponential backoff; a shard that stays unreadable,
truncated or inconsistent with the manifest is named in a `DataError`, never skipped.

Loss masks (format 3, `write_sample_shards`): a sample may also store `mask.npy` (uint8, seq_len + 1;
1 = this token is a scored target, i.e. the loss counts its prediction from the tokens before it;
entry 0 is never a target). The manifest then says `"loss_mask": true` and every sample has one.
Synthetic tasks (MQAR, passkey) use it to score only the answers; samples without a mask score
every target, as before. Text shards (`write_shards`) stay format 2.

truncated or inconsistent with the manifest is named in a `DataError`, never skipped. Manifests
record each member's crc32 (`member_crc32`, in tar order; since this version, format 2 unchanged
otherwise); every read checks them, naming the shard and the sample on a mismatch. `verify_shards`
(`fluidlm data verify`) reads every shard of a manifest that way, offline.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shlex
import time
import zlib
from pathlib import Path

import numpy as np

from fluidlm.data import DataError
from fluidlm.data.tokenizer import EOS, file_sha256, load_tokenizer

# 1: tokens + starts. 2: + docs.npy per sample, keys in corpus order, samples shuffled across the
# corpus, per-shard bytes and max_token_id, shuffle_seed. Version 1 manifests still load.
# 3: + optional mask.npy per sample (uint8 loss mask), "loss_mask": true and an optional "task" record.
MANIFEST_VERSION = 2
MASKED_MANIFEST_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
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
                 workers: int = 2, progress: bool = True, shuffle_seed: int | None = None) -> dict:
    """Tokenize, pack, shuffle (with shuffle_seed; None keeps corpus order) and write shards + manifest.json.

    The packed samples go to a temporary file next to the shards first (2 or 4 bytes a token on
    disk, not in memory), then are written out in the shuffled order."""
    import webdataset as wds

    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_piece_size()
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    sample_len = seq_len + 1
    spill_path = out / ".packed-samples.tmp"
    sample_starts, sample_docs = [], []  # per sample (small)
    entries, total_tokens, n_docs = [], 0, 0  # (start in pending, document id) of documents overlapping `pending`
    t0 = time.perf_counter()
    pending = np.zeros(0, dtype=np.int64)
    try:
        with open(spill_path, "wb") as spill:
            for ids in encode_documents(documents, tokenizer_path, workers, progress):
                entries.append((len(pending), n_docs))
                n_docs += 1
                total_tokens += len(ids)
                pending = np.concatenate([pending, ids])
                while len(pending) >= sample_len:
                    spill.write(pending[:sample_len].astype(dtype).tobytes())
                    inside = [(s, d) for s, d in entries if s < sample_len]
                    rest = [(s, d) for s, d in entries if s >= sample_len]
                    sample_starts.append(np.asarray([s for s, _ in inside if s >= 0], dtype=np.int32))
                    sample_docs.append(np.asarray([d for _, d in inside], dtype=np.int32))
                    # the last document begun here runs on into the next sample unless the next one starts right there
                    runs_on = rest[0][0] > sample_len if rest else len(pending) > sample_len
                    entries = ([(inside[-1][0] - sample_len, inside[-1][1])] if runs_on else []) + \
                              [(s - sample_len, d) for s, d in rest]
                    pending = pending[sample_len:]
        elapsed_pack = time.perf_counter() - t0
        if n_docs == 0:
            raise DataError("the corpus is empty: no document to shard; check --input")
        n = len(sample_starts)
        if n == 0:
            raise DataError(
                f"--seq-len {seq_len} is larger than the whole corpus ({total_tokens} tokens): no sample of "
                f"{sample_len} tokens fits; use a smaller --seq-len or more text"
            )
        packed = np.memmap(spill_path, dtype=dtype, mode="r", shape=(n, sample_len))
        order = np.arange(n) if shuffle_seed is None else np.random.default_rng([shuffle_seed, 0x5A3D]).permutation(n)
        shards = []
        for first in range(0, n, samples_per_shard):
            name = f"shard-{len(shards):06d}.tar"
            chunk = order[first:first + samples_per_shard]
            with wds.TarWriter(str(out / name)) as writer:
                for i in chunk:
                    writer.write({"__key__": f"{int(i):010d}", "tokens.npy": np.array(packed[i]),
                                  "starts.npy": sample_starts[i], "docs.npy": sample_docs[i]})
            rows = packed[np.sort(chunk)]
            shards.append({"file": name, "samples": len(chunk), "tokens": len(chunk) * sample_len,
                           "bytes": (out / name).stat().st_size, "max_token_id": int(rows.max()),
                           "documents": int(len(np.unique(np.concatenate([sample_docs[i] for i in chunk])))),
                           "member_crc32": member_crc32(out / name)})
        del packed
    finally:
        spill_path.unlink(missing_ok=True)
    elapsed = time.perf_counter() - t0
    manifest = {
        "format_version": MANIFEST_VERSION, "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_sha256": file_sha256(tokenizer_path), "vocab_size": vocab, "eos_id": EOS,
        "seq_len": seq_len, "dtype": np.dtype(dtype).name, "documents": n_docs,
        "total_tokens": sum(s["tokens"] for s in shards), "total_samples": sum(s["samples"] for s in shards),
        "dropped_tail_tokens": int(len(pending)), "max_token_id": max(s["max_token_id"] for s in shards),
        "shuffle_seed": shuffle_seed, "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    manifest["tokens_per_s"] = total_tokens / max(elapsed, 1e-9)
    manifest["pack_seconds"] = elapsed_pack
    return manifest


def write_sample_shards(tokens: np.ndarray, loss_mask: np.ndarray, out: Path, vocab_size: int, task: dict,
                        samples_per_shard: int = 256, tokenizer: str = "synthetic",
                        tokenizer_sha256: str | None = None) -> dict:
    """Write ready-made samples (one document each, no packing, kept in order) with their loss masks
    as format-3 shards + manifest.json. tokens, loss_mask: (n, seq_len + 1); `task` describes how
    they were made (recorded in the manifest as "task")."""
    import webdataset as wds

    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask, dtype=bool)
    if tokens.ndim != 2 or loss_mask.shape != tokens.shape:
        raise DataError(f"samples {tokens.shape} and loss masks {loss_mask.shape} must be (n, seq_len + 1) alike")
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    starts = np.zeros(1, dtype=np.int32)
    shards = []
    for first in range(0, len(tokens), samples_per_shard):
        name = f"shard-{len(shards):06d}.tar"
        rows = tokens[first:first + samples_per_shard]
        with wds.TarWriter(str(out / name)) as writer:
            for i, row in enumerate(rows):
                writer.write({"__key__": f"{first + i:010d}", "tokens.npy": row.astype(dtype), "starts.npy": starts,
                              "docs.npy": np.asarray([first + i], dtype=np.int32),
                              "mask.npy": loss_mask[first + i].astype(np.uint8)})
        shards.append({"file": name, "samples": len(rows), "tokens": int(rows.size), "bytes": (out / name).stat().st_size,
                       "max_token_id": int(rows.max()), "documents": len(rows),
                       "scored_targets": int(loss_mask[first:first + len(rows)].sum()),
                       "member_crc32": member_crc32(out / name)})
    manifest = {
        "format_version": MASKED_MANIFEST_VERSION, "tokenizer": tokenizer,
        "tokenizer_sha256": tokenizer if tokenizer_sha256 is None else tokenizer_sha256,
        "vocab_size": int(vocab_size), "eos_id": EOS, "seq_len": tokens.shape[1] - 1, "dtype": np.dtype(dtype).name,
        "documents": len(tokens), "total_tokens": int(tokens.size), "total_samples": len(tokens),
        "dropped_tail_tokens": 0, "max_token_id": max(s["max_token_id"] for s in shards), "shuffle_seed": None,
        "loss_mask": True, "task": task, "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def member_crc32(path: Path) -> list[int]:
    """The crc32 of every member of a tar shard, in tar order (the manifest's `member_crc32`)."""
    import webdataset as wds

    with open(path, "rb") as f:
        return [zlib.crc32(item["data"]) for item in wds.tariterators.tar_file_iterator(f)]


def load_manifest(path: Path, tokenizer_path: Path | None = None) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise DataError(f"manifest {str(path)!r} not found; build shards with `fluidlm data shards` or `fluidlm data prepare`")
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"], manifest["seq_len"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"manifest {str(path)!r} is not a FluidLM shard manifest ({exc}); rebuild the shards") from None
    version = manifest.get("format_version", 1)
    if version not in READABLE_VERSIONS:
        raise DataError(f"manifest {str(path)!r} has format_version {version}, this FluidLM reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade FluidLM or rebuild the shards with this one "
                        f"(`fluidlm data prepare` / `fluidlm data shards`)")
    manifest["root"] = str(path.parent)
    manifest["path"] = str(path)
    if tokenizer_path is not None and file_sha256(tokenizer_path) != manifest["tokenizer_sha256"]:
        raise DataError(
            f"tokenizer {str(tokenizer_path)!r} does not match the one the shards in {str(path.parent)!r} were "
            f"made with (sha256 differs); use the tokenizer the manifest names ({manifest['tokenizer']}) or rebuild the shards"
        )
    return manifest


def max_token_id(manifest: dict) -> tuple[int | None, str | None]:
    """(largest token id, the shard that holds it) as the manifest records them; (None, None) for
    manifests written before ids were recorded (format 1)."""
    best, where = None, None
    for entry in manifest["shards"]:
        m = entry.get("max_token_id")
        if m is not None and (best is None or m > best):
            best, where = int(m), entry["file"]
    return best, where


# --- reading ---------------------------------------------------------------------------------------

def _has_scheme(name: str) -> bool:
    return name.startswith("pipe:") or "://" in name


def shard_url(manifest: dict, entry: dict) -> str:
    """Where a manifest entry's shard is: its own URL, the manifest's base_url + file, or a path
    next to the manifest."""
    name = entry["file"]
    if _has_scheme(name) or os.path.isabs(name):
        return name
    base = manifest.get("base_url")
    if base:
        return base.rstrip("/") + "/" + name
    return str(Path(manifest["root"]) / name)


def is_remote(url: str) -> bool:
    return _has_scheme(url) and not url.startswith("file:")


def open_url(url: str, timeout: float = 30.0):
    """A binary stream through webdataset.gopen. http(s) goes through curl with a connect timeout
    and a stall timeout (no hang, no curl-level retries: ours are below); s3:// and gs:// through
    the usual CLIs, as webdataset's `pipe:` convention has it."""
    import webdataset as wds

    if url.startswith(("http://", "https://")):
        t = int(max(timeout, 1))
        url = (f"pipe:curl -f -s -L --connect-timeout {t} --speed-limit 1 --speed-time {t} "
               f"{shlex.quote(url)}")
    elif url.startswith("s3://"):
        url = f"pipe:aws s3 cp --quiet {shlex.quote(url)} -"
    elif url.startswith("gs://"):
        url = f"pipe:gsutil -q cat {shlex.quote(url)}"
    return wds.gopen(url, "rb")


CURL_EXIT = {6: "cannot resolve the host", 7: "cannot connect to the server", 18: "transfer cut short (partial file)",
             22: "HTTP error (4xx/5xx)", 28: "timed out", 52: "server sent nothing", 55: "send failure",
             56: "connection broken while receiving"}


def _describe(exc: BaseException) -> str:
    import re

    m = re.match(r"(curl|pipe) exit (\d+)", str(exc))
    if m:
        code = int(m.group(2))
        return f"{m.group(1)} exit {code}: {CURL_EXIT.get(code, 'transfer failed') if m.group(1) == 'curl' else 'command failed'}"
    return f"{type(exc).__name__}: {exc}"[:300]


class _Counting:
    """Wraps a stream to count the bytes read from it."""

    def __init__(self, stream):
        self.stream, self.bytes = stream, 0

    def read(self, *args):
        data = self.stream.read(*args)
        self.bytes += len(data)
        return data

    def close(self):
        self.stream.close()


def _read_once(url: str, entry: dict, seq_len: int | None, timeout: float) -> dict:
    import webdataset as wds

    stream = _Counting(open_url(url, timeout))
    samples, error, members = {}, None, []
    check = "member_crc32" in entry
    try:
        for item in wds.tariterators.tar_file_iterator(stream):
            if check:
                members.append((item["fname"], zlib.crc32(item["data"])))
            key, _, ext = item["fname"].partition(".")
            try:
                samples.setdefault(key, {})[ext] = np.load(io.BytesIO(item["data"]))
            except (ValueError, OSError, EOFError) as exc:
                raise ValueError(f"{item['fname']}: {exc}") from None
        while stream.read(1 << 16):  # the tar's end padding: count every byte, let a pipe report its exit
            pass
    except Exception as exc:  # noqa: BLE001 - reported below, after the pipe's exit status (the root cause)
        error = exc
    status = _close(stream.stream)
    if status not in (None, 0, 141):  # 141: SIGPIPE, we stopped reading
        tool = "curl" if "curl" in str(getattr(stream.stream, "args", "")) else "pipe"
        raise OSError(f"{tool} exit {status}") from error
    if error is not None:
        raise error
    return {"samples": samples, "bytes": stream.bytes, "members": members}


def _close(stream) -> int | None:
    """Close a gopen stream; a pipe's exit status (None for files)."""
    proc = getattr(stream, "proc", None)
    try:
        if proc is None:
            stream.close()
            return None
        stream.stream.close()
        return proc.wait(timeout=60)
    except Exception:  # noqa: BLE001 - a close error does not hide the reading error
        return None if proc is None else proc.poll()


def read_shard_samples(url: str, entry: dict, seq_len: int | None = None, vocab_limit: int | None = None,
                       retries: int | None = None, backoff: float | None = None, timeout: float = 30.0) -> dict:
    """One shard, whole: {"tokens": [arrays], "starts": [...], "docs": [...] or None, "loss_mask": [bool
    arrays] or None (format 3 shards with masks), "keys": [...], "bytes": bytes read}, samples in key (corpus) order, checked against the manifest entry.

    Remote URLs are retried `retries` times (env FLUIDLM_SHARD_RETRIES, default 3) with exponential
    backoff from `backoff` seconds (FLUIDLM_SHARD_BACKOFF, default 1); local files are read once."""
    remote = is_remote(url)
    retries = int(os.environ.get("FLUIDLM_SHARD_RETRIES", 3)) if retries is None else retries
    backoff = float(os.environ.get("FLUIDLM_SHARD_BACKOFF", 1.0)) if backoff is None else backoff
    attempts = 1 + (retries if remote else 0)
    first = last = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            got = _read_once(url, entry, seq_len, timeout)
            problem = _check(got, entry, seq_len)
            if problem is None:
                break
            last = problem
        except Exception as exc:  # noqa: BLE001 - any I/O or format error: retried, then named
            last = _describe(exc)
        first = first or last
    else:
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        if first != last:
            last = f"first attempt: {first}; last: {last}"
        raise DataError(f"shard {url!r} is unreadable, truncated or corrupt{tried} ({last}); "
                        + ("check the server/URL and the network, or copy the shards locally and point the manifest at them"
                           if remote else "rebuild the shards"))
    keys = sorted(got["samples"])
    s = got["samples"]
    tokens = [s[k]["tokens.npy"] for k in keys]
    if vocab_limit is not None and tokens:
        top = max(int(t.max()) for t in tokens)
        if top >= vocab_limit:
            raise DataError(f"shard {url!r} holds token id {top}, outside the vocabulary of {vocab_limit} ids "
                            f"(the shards were made with another tokenizer, or model.vocab_size is too small); "
                            f"set model.vocab_size above {top} or rebuild the shards with the model's tokenizer")
    docs = [s[k]["docs.npy"] for k in keys] if keys and all("docs.npy" in s[k] for k in keys) else None
    masks = [s[k]["mask.npy"].astype(bool) for k in keys] if keys and "mask.npy" in s[keys[0]] else None
    return {"tokens": tokens, "starts": [s[k]["starts.npy"] for k in keys], "docs": docs, "loss_mask": masks,
            "keys": keys, "bytes": got["bytes"]}


def _check(got: dict, entry: dict, seq_len: int | None) -> str | None:
    samples = got["samples"]
    if len(samples) != entry["samples"]:
        return f"holds {len(samples)} samples, the manifest says {entry['samples']}"
    for key, sample in samples.items():
        if "tokens.npy" not in sample or "starts.npy" not in sample:
            return f"sample {key} lacks tokens.npy or starts.npy"
        if seq_len is not None and sample["tokens.npy"].shape != (seq_len + 1,):
            return f"sample {key} has shape {sample['tokens.npy'].shape}, expected ({seq_len + 1},)"
        if ("mask.npy" in sample) != (entry.get("scored_targets") is not None):
            return f"sample {key}: mask.npy {'present' if 'mask.npy' in sample else 'missing'}, unlike the manifest entry"
        if "mask.npy" in sample and sample["mask.npy"].shape != sample["tokens.npy"].shape:
            return f"sample {key}: mask.npy has shape {sample['mask.npy'].shape}, tokens.npy {sample['tokens.npy'].shape}"
    if entry.get("bytes") is not None and got["bytes"] != entry["bytes"]:
        return f"{got['bytes']} bytes read, the manifest says {entry['bytes']}"
    expected = entry.get("member_crc32")
    if expected is not None:
        if len(expected) != len(got["members"]):
            return f"holds {len(got['members'])} members, the manifest lists {len(expected)} checksums"
        for (name, crc), want in zip(got["members"], expected):
            if crc != want:
                key, _, member = name.partition(".")
                return f"sample {key}: its {member} fails its crc32 checksum (the manifest's member_crc32)"
    return None


def read_shard(root: Path, entry: dict) -> tuple[list, list]:
    """All samples of one shard next to a manifest: (tokens arrays, starts arrays), in key order.
    Names the file on any corruption."""
    manifest = {"root": str(root)}
    got = read_shard_samples(shard_url(manifest, entry), entry)
    return got["tokens"], got["starts"]


def verify_shards(path: Path) -> tuple[list[str], dict]:
    """Read every shard of the manifest at `path` (a manifest.json or its folder) as training does,
    checking sample counts, sizes, shapes, token ids and member checksums: (problems, summary with
    shards, samples, tokens, seconds, tokens_per_s, checksummed)."""
    manifest = load_manifest(path)
    problems, tokens, samples = [], 0, 0
    start = time.perf_counter()
    vocab = manifest.get("vocab_size")
    for entry in manifest["shards"]:
        try:
            got = read_shard_samples(shard_url(manifest, entry), entry, manifest["seq_len"],
                                     int(vocab) if vocab else None)
        except DataError as exc:
            problems.append(str(exc))
            continue
        samples += len(got["tokens"])
        tokens += sum(len(t) for t in got["tokens"])
    seconds = time.perf_counter() - start
    return problems, {"manifest": manifest["path"], "shards": len(manifest["shards"]), "samples": samples,
                      "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                      "checksummed": all("member_crc32" in e for e in manifest["shards"])}
