"""The GPU-only benchmark scripts cannot be measured in CI, but they must not rot: each runs
end to end on a tiny model with --device cpu, and refuses (exit 2) to run its real
measurement without CUDA."""

import json
import statistics
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


def test_ablation_quick_mode_runs_end_to_end(tmp_path):
    """bench/ablate.py --quick: a tiny DA variant (gate + conv + norm) and the softmax baseline, 3 steps
    each, with the project's training and evaluation commands, on a synthetic dataset."""
    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import make_dataset

    data = make_dataset(tmp_path / "data", seq_len=32, samples=160)
    out = tmp_path / "ablate"
    proc = subprocess.run([sys.executable, "bench/ablate.py", "--quick", "--data", str(data), "--runs-dir",
                           str(tmp_path / "runs"), "--out", str(out), "--multipliers", "1,2", "data.seq_len=32",
                           "model.vocab_size=256"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["variants"]) == ["gate-conv-norm", "softmax"]
    for v in result["variants"].values():
        assert set(v["perplexity"]) == {"32", "64"} and v["parameters"] > 0 and v["tokens_per_s"]["mean"] > 0
        assert all(p["n"] == 1 and p["mean"] > 1 for p in v["perplexity"].values())
    assert result["meta"]["command"].startswith("python bench/ablate.py --quick")
    assert "| `softmax` |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    runs = {r["variant"]: r for r in result["runs"]}
    assert "model.qkv_conv=4" in runs["gate-conv-norm"]["overrides"]


def test_ablation_rejects_unknown_variants_and_lists_them():
    proc = subprocess.run([sys.executable, "bench/ablate.py", "--variants", "baseline,gatee"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown variant(s) ['gatee']" in proc.stderr
    listed = subprocess.run([sys.executable, "bench/ablate.py", "--list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and "gate-conv-norm" in listed.stdout and "softmax" in listed.stdout


def test_ablation_verdict_is_paired_by_seed_and_needs_every_seed():
    """A variant is 'better' only when it beats baseline of the same seed in every seed by more than the
    seed-to-seed spread of that change; a baseline that is noisy across seeds cannot hide a consistent gain."""
    sys.path.insert(0, str(ROOT / "bench"))
    import ablate

    ppl = {("baseline", 0): 300.0, ("baseline", 1): 400.0, ("baseline", 2): 350.0,
           ("steady", 0): 291.0, ("steady", 1): 386.0, ("steady", 2): 340.0,      # −3 %, −3.5 %, −2.9 %
           ("mixed", 0): 250.0, ("mixed", 1): 410.0, ("mixed", 2): 330.0,
           ("bad", 0): 330.0, ("bad", 1): 440.0, ("bad", 2): 390.0}
    per_run = {k: {"perplexity": {"256": v}} for k, v in ppl.items()}
    steady = ablate.paired(per_run, "steady", [0, 1, 2], [256])["256"]
    assert steady["verdict"] == "better" and steady["better_in"] == 3
    assert abs(steady["mean"] - statistics.fmean([291 / 300 - 1, 386 / 400 - 1, 340 / 350 - 1])) < 1e-12
    assert ablate.paired(per_run, "mixed", [0, 1, 2], [256])["256"]["verdict"] == "within spread"
    assert ablate.paired(per_run, "bad", [0, 1, 2], [256])["256"]["verdict"] == "worse"
    assert ablate.verdict([-0.5]) == "within spread"              # one seed decides nothing
    assert ablate.verdict([-0.10, -0.01, -0.01]) == "within spread"  # every seed better, but mean −4 % < std 5.2 %


def test_recall_grid_smoke_runs_end_to_end(tmp_path):
    """bench/recall.py on one tiny cell: MQAR data, one training run with train.eval_tasks, the report."""
    proc = subprocess.run([sys.executable, "bench/recall.py", "--models", "softmax", "--d-models", "64", "--cells",
                           "64:4", "--lrs", "3e-3", "--steps", "3", "--batch", "4", "--train-examples", "64",
                           "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "recall")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "recall.json").read_text())
    assert [(b["model"], b["d_model"], b["seq_len"], b["best_lr"]) for b in result["best"]] == [("softmax", 64, 64, 3e-3)]
    assert result["runs"][0]["tokens"] == 3 * 4 * 64 and 0 <= result["runs"][0]["accuracy"] <= 1
    assert (tmp_path / "recall.png").stat().st_size > 1000 and "| softmax | 64 | 64 | 4 |" in (tmp_path / "recall.md").read_text()
