"""What the integrity checks of issue 27 cost, on this machine:

1. checkpoints: the files of a 125M-parameter run (fp32, AdamW, ZeRO-1, one rank: the module
   weights in mp_rank_00_model_states.pt, the fp32 master copy and both moments in the optimizer
   file; 2.0 GB) written with torch.save, then hashed as a save does (sha256, checksums.digests)
   and verified as a resume does (checksums.verify), next to zlib's crc32 on the same bytes;
2. shards: webdataset tars of packed uint16 samples, read as training reads them
   (shards.read_shard_samples) with and without the members' crc32 checks, in tokens/s.

    python bench/integrity.py --json bench/results/integrity.json
    python bench/integrity.py --params 1e6 --shards 2        # a quick smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def checkpoint_cost(folder: Path, params: int) -> dict:
    from fluidlm.train.checksums import digests, payload_files, verify, write_manifest

    ckpt = folder / "step_00000001"
    (ckpt / "client").mkdir(parents=True)
    start = time.perf_counter()
    torch.save({"module": {"weight": torch.randn(params)}}, ckpt / "mp_rank_00_model_states.pt")
    torch.save({"fp32": torch.randn(params), "exp_avg": torch.randn(params), "exp_avg_sq": torch.rand(params)},
               ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"step": 1}, ckpt / "client" / "rank_00000.pt")
    os.sync()
    save_s = time.perf_counter() - start
    (ckpt / "client_state.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    start = time.perf_counter()
    write_manifest(ckpt, digests(ckpt, payload_files(ckpt)))
    hash_s = time.perf_counter() - start
    start = time.perf_counter()
    issues, _ = verify(ckpt)
    verify_s = time.perf_counter() - start
    assert not issues, issues
    start = time.perf_counter()
    for name in payload_files(ckpt):
        crc = 0
        with open(ckpt / name, "rb") as f:
            while chunk := f.read(8 << 20):
                crc = zlib.crc32(chunk, crc)
    crc_s = time.perf_counter() - start
    gb = size / 1e9
    return {"parameters": params, "bytes": size, "torch_save_s": save_s, "sha256_s": hash_s, "verify_s": verify_s,
            "crc32_s": crc_s, "sha256_gb_per_s": gb / hash_s, "crc32_gb_per_s": gb / crc_s,
            "sha256_share_of_save": hash_s / save_s}


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def shard_cost(folder: Path, shards: int, samples: int, seq_len: int, repeats: int = 3) -> dict:
    from fluidlm.data.shards import member_crc32, read_shard_samples

    rng = np.random.default_rng(0)
    entries = []
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(samples):
                key = f"{s * samples + i:010d}"
                for ext, payload in (("tokens.npy", _npy(rng.integers(0, 32000, seq_len + 1, dtype=np.uint16))),
                                     ("starts.npy", _npy(np.array([0], dtype=np.int32)))):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        entries.append({"file": str(path), "samples": samples, "member_crc32": member_crc32(path)})
    tokens = shards * samples * (seq_len + 1)
    best = {}
    for label, strip in (("with_crc32", False), ("without", True)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for e in entries:
                read_shard_samples(e["file"], {k: v for k, v in e.items() if not (strip and k == "member_crc32")},
                                   seq_len)
            times.append(time.perf_counter() - start)
        best[label] = tokens / min(times)
    return {"shards": shards, "samples_per_shard": samples, "seq_len": seq_len, "tokens": tokens,
            "tokens_per_s_with_crc32": best["with_crc32"], "tokens_per_s_without": best["without"],
            "slowdown": best["without"] / best["with_crc32"] - 1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=125e6, help="parameters of the checkpoint (default 125M)")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--samples", type=int, default=256, help="samples per shard")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one; needs ~2.2 GB)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        (Path(tmp) / "ck").mkdir()
        (Path(tmp) / "shards").mkdir()
        ckpt = checkpoint_cost(Path(tmp) / "ck", int(args.params))
        shards = shard_cost(Path(tmp) / "shards", args.shards, args.samples, args.seq_len)
    result = {"checkpoint": ckpt, "shards": shards,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
