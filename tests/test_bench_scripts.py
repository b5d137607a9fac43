"""The GPU-only benchmark scripts cannot be measured in CI, but they must not rot: each runs
end to end on a tiny model with --device cpu, and refuses (exit 2) to run its real
measurement without CUDA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = '{"d_model":64,"n_layers":2,"n_heads":2,"head_dim":32,"vocab_size":512}'


def test_long_context_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/long_context_gpu.py", "--device", "cpu", "--model", TINY,
                           "--context", "512", "--seq-lens", "256,512", "--tokens", "1024", "--steps", "2",
                           "--out", str(tmp_path / "lc")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "lc.json").read_text())
    assert [r["seq_len"] for r in result["sweep"]] == [256, 512]
    assert all(r["tokens_per_step"] == 1024 and r["tokens_per_s"] > 0 for r in result["sweep"])
    assert result["meta"]["command"].startswith("python bench/long_context_gpu.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the real benchmark would run")
def test_long_context_gpu_benchmark_refuses_without_cuda():
    proc = subprocess.run([sys.executable, "bench/long_context_gpu.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
