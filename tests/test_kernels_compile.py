"""The Triton DA kernels compiled for sm_90 (H100/H200) and sm_80 (A100) on this CPU machine
(bench/kernels_compile.py): the launches of the shipped configs' shapes compile, fit in shared memory,
reach tensor cores, do not spill in bf16, and keep two programs per SM; the checker itself flags
each kind of failure. The full table (every GPU-test shape, d = 16…256) is bench/results/kernels_compile.md."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "kernels_compile.py")
HAS_TRITON = importlib.util.find_spec("triton") is not None
# the shapes the shipped GPU configs train with (head dim 64, bf16; packed documents; CP's state in/out),
# fp32 at d = 64, and v1 (kept for the GPU benchmark)
CI_SCENARIOS = "bf16-d64-causal,bf16-d64-bidir,bf16-d64-cp-shard,fp32-d64-causal,v1-bf16-d64-docs-wide-grid"


def _load():
    spec = importlib.util.spec_from_file_location("kernels_compile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_shipped_shapes_compile_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, SCRIPT, "--arch", "90,80", "--only", CI_SCENARIOS, "--out", str(tmp_path / "k")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "k.json").read_text())
    assert not report["failures"]
    rows = report["rows"]
    assert {r["arch"] for r in rows} == {80, 90}
    names = {r["kernel"] for r in rows}
    for k in ("_summary_kernel", "_combine_kernel", "_fwd_kernel", "_dq_kernel", "_dk_kernel", "_dv_kernel"):
        assert f"triton_v2.{k}" in names
    assert {"triton_da._fwd_kernel", "triton_da._bwd_dq_kernel", "triton_da._bwd_dkv_kernel"} <= names
    for r in rows:
        if r["arch"] == 90 and r["dots"]:
            assert r["wgmma"], r  # bf16 and fp32 (3xTF32) dots on Hopper's tensor cores
    # lengths are not specialised: the 125M row (N = 8192, H = 12) and N = 5000 share kernels with N = 4096
    v2 = [r for r in rows if r["arch"] == 90 and r["kernel"] == "triton_v2._fwd_kernel" and r["dtype"] == "bf16"]
    assert len(v2) == 3, v2  # causal, anti-causal partial, causal final-add: one each whatever N, H


def test_checker_flags_every_kind_of_failure():
    kc = _load()
    good = dict(regs=128, shared=60000, stack=0, spill_stores=0, spill_loads=0, wgmma=True, mma=True, dots=True)
    entry = dict(rec={}, dims=(64, 64, "bf16"), grids=[(64, 1, 12)], res=good,
                 resident=kc.resident_programs(good, 4, 90))
    assert entry["resident"] == 3 and kc.check(entry, 90) == []
    cases = [
        (dict(shared=240000), "shared"),
        (dict(spill_stores=8), "spill"),
        (dict(wgmma=False), "tensor cores"),
        (dict(regs=255, shared=120000), "resident"),
    ]
    for change, word in cases:
        res = dict(good, **change)
        e = dict(entry, res=res, resident=kc.resident_programs(res, 4, 90))
        assert any(word in p for p in kc.check(e, 90)), (change, kc.check(e, 90))
    assert any("grid" in p for p in kc.check(dict(entry, grids=[(1, 70000, 1)]), 90))
    assert kc.check(dict(entry, res=dict(error="PTXASError: boom")), 90) == ["compile error: PTXASError: boom"]
    # fp32 and d = 256 may spill (reported, not failed); sm_80 wants mma, not wgmma
    assert kc.check(dict(entry, dims=(256, 256, "bf16"), res=dict(good, spill_stores=64)), 90) == []
    assert kc.check(dict(entry, res=dict(good, wgmma=False)), 80) == []
