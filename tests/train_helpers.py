"""Helpers for the training tests: a tiny synthetic dataset in the shard format of
fluidlm/data/shards.py (webdataset tars of tokens.npy + starts.npy, and manifest.json with member
checksums), the
tiny test config, and a reader for metrics.jsonl."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import yaml

from fluidlm.data.shards import member_crc32

VOCAB = 256


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def make_dataset(out: Path, seq_len: int = 64, samples: int = 96, samples_per_shard: int = 32, seed: int = 0,
                 vocab: int = VOCAB, loss_mask: bool = False) -> Path:
    """Documents of learnable arithmetic progressions (start, stride random per document), packed
    into samples of seq_len + 1 tokens with their document starts; train/ and val/ splits.
    `loss_mask`: format-3 shards whose samples carry a loss mask (mask.npy): the first 6 tokens of
    every document and a random 40 % of the others are not scored."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    for split, n_samples in (("train", samples), ("val", max(4, samples // 8))):
        stream, starts = [], []
        while len(stream) < n_samples * (seq_len + 1):
            length = int(rng.integers(8, 3 * seq_len))
            start, stride = int(rng.integers(3, vocab)), int(rng.integers(1, 7))
            starts.append(len(stream))
            stream += [3 + (start + stride * i) % (vocab - 3) for i in range(length)] + [2]  # 2 = EOS
        stream = np.asarray(stream, dtype=np.uint16)
        starts = np.asarray(starts)
        scored = np.random.default_rng([seed, len(stream)]).random(len(stream)) > 0.4  # own stream: the tokens stay
        for s in starts:
            scored[s:s + 6] = False
        shard_dir = out / split
        shard_dir.mkdir(parents=True, exist_ok=True)
        shards = []
        for first in range(0, n_samples, samples_per_shard):
            name = f"shard-{len(shards):06d}.tar"
            count = min(samples_per_shard, n_samples - first)
            with tarfile.open(shard_dir / name, "w") as tar:
                for i in range(first, first + count):
                    lo = i * (seq_len + 1)
                    sample = stream[lo:lo + seq_len + 1]
                    inside = (starts[(starts >= lo) & (starts < lo + seq_len + 1)] - lo).astype(np.int32)
                    files = [("tokens.npy", _npy(sample)), ("starts.npy", _npy(inside))]
                    if loss_mask:
                        files.append(("mask.npy", _npy(scored[lo:lo + seq_len + 1].astype(np.uint8))))
                    for ext, payload in files:
                        info = tarfile.TarInfo(f"{i:010d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            shards.append({"file": name, "samples": count, "tokens": count * (seq_len + 1),
                           "member_crc32": member_crc32(shard_dir / name)})
            if loss_mask:
                shards[-1]["scored_targets"] = int(sum(scored[i * (seq_len + 1):(i + 1) * (seq_len + 1)].sum()
                                                       for i in range(first, first + count)))
        manifest = {"format_version": 3 if loss_mask else 1, **({"loss_mask": True} if loss_mask else {}),
                    "tokenizer": "synthetic", "tokenizer_sha256": "", "vocab_size": vocab,
                    "eos_id": 2, "seq_len": seq_len, "dtype": "uint16", "documents": len(starts),
                    "total_tokens": n_samples * (seq_len + 1), "total_samples": n_samples,
                    "dropped_tail_tokens": 0, "shards": shards}
        (shard_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def tiny_config(data_dir: Path, run_dir: Path, **sections) -> dict:
    """The tiny test model (d_model 32, 2 layers, vocab 256) as a config dict; `sections` update it."""
    config = {
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16,
                  "chunk_size": 16, "max_seq_len": 1024, "dropout": 0.1},
        "data": {"dir": str(data_dir), "seq_len": 64, "num_workers": 0},
        "train": {"run_dir": str(run_dir), "steps": 8, "micro_batch_size": 2, "grad_accum": 1, "seed": 1,
                  "peak_tflops": 0.1, "threads": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"every": 0, "keep": 3},
        "logging": {"progress": False, "mlflow": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}
