"""The Triton DA backend (fluidlm/kernels/triton_da.py) against `chunked` and `naive`.

CPU (CI): the kernels run through Triton's interpreter. Triton reads TRITON_INTERPRET when a kernel is
decorated and again while it runs, so the module-scoped `tda` fixture sets it, (re)imports triton_da
under it, and restores both afterwards. On a CUDA machine the same CPU tests run in a subprocess
(`test_interpreter_suite_in_subprocess`) and the `gpu` tests run the compiled kernels in-process.

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py -q       # CPU (the env var is optional)
    pytest tests/test_triton_kernels.py -q -m gpu                   # GPU only
"""

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fluidlm.kernels import DAState, dispatch
from fluidlm.kernels.dispatch import differential_attention

HAS_CUDA = torch.cuda.is_available()


def _import_triton():
    """Import triton, in interpreter mode when this process can (no CUDA, triton not yet imported):
    `import triton` decorates Triton's own library kernels (tl.sum's combine, tl.cumsum, ...), so
    TRITON_INTERPRET has to be set before the first import in the process, not only before triton_da.
    Returns (importable, interpreted)."""
    if "triton" not in sys.modules and not HAS_CUDA:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        old = os.environ.get("TRITON_INTERPRET", "")
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False, False
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return True, isinstance(triton.language.standard._sum_combine, InterpretedFunction) and not HAS_CUDA


HAS_TRITON, IN_PROCESS = _import_triton()


def _interpreted_module(name):
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    if not IN_PROCESS:
        pytest.skip("triton runs compiled in this process: test_interpreter_suite_in_subprocess runs these")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # also read while interpreted kernels run
    mod = importlib.import_module(name)
    if not mod.INTERPRET:
        mod = importlib.reload(mod)
    assert mod.INTERPRET
    return mod, old


def _restore(old):
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="module")
def tv2():
    """fluidlm.kernels.triton_v2 (backend "triton") with its kernels decorated in interpreter mode."""
    mod, old = _interpreted_module("fluidlm.kernels.triton_v2")
    yield mod
    _restore(old)


@pytest.fixture(scope="module")
def tda(tv2):
    """fluidlm.kernels.triton_da (v1, backend "triton_v1") in interpreter mode."""
    mod, old = _interpreted_module("fluidlm.kernels.triton_da")
    yield mod
    _restore(old)


def make_inputs(b=1, h=2, n=37, d=16, dv=24, dtype=torch.float32, device="cpu", seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, n, d, generator=gen)
    v = torch.randn(b, h, n, dv, generator=gen)
    g = -(0.05 + 1.5 * torch.rand(b, h, n, generator=gen))
    out = [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [g.to(device)]
    return [t.requires_grad_(requires_grad) for t in out]


def make_state(r, h, d, dv, device="cpu", seed=7, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(r, h, d, dv, generator=gen).to(device)
    z = torch.rand(r, h, d, generator=gen).to(device)
    return DAState(s.requires_grad_(requires_grad), z.requires_grad_(requires_grad))


def run_triton(tda, inputs, **kw):
    kw.setdefault("feature_map", "sigmoid")
    kw.setdefault("eps", 1e-6)
    kw.setdefault("cu_seqlens", None)
    return tda.triton_differential_attention(*inputs, **kw)


def assert_matches(out, ref, inputs, rtol, atol, grads=True):
    """Outputs, then every gradient, each relative to its own largest entry (a seeded cotangent).
    With one token, o = v·s/(s+ε): dq, dk and dg are O(ε) rounding, so they are measured against
    the largest gradient of the problem instead. `out`/`ref` may be tuples (o, S, z)."""
    outs = out if isinstance(out, (tuple, list)) else [out]
    refs = ref if isinstance(ref, (tuple, list)) else [ref]
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)
    if not grads:
        return
    gen = torch.Generator(device=refs[0].device).manual_seed(1234)
    cots = [torch.randn(r.shape, generator=gen, device=r.device) for r in refs]
    got = torch.autograd.grad([o.float() for o in outs], inputs, cots, retain_graph=True)
    want = torch.autograd.grad([r.float() for r in refs], inputs, cots)
    floor = max(w.abs().max().item() for w in want) if refs[0].shape[-2] == 1 else 1e-30
    names = ["q", "k", "v", "g", "S0", "z0"]
    for name, a, b in zip(names, got, want):
        scale = max(b.abs().max().item(), floor)
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=rtol, atol=atol, msg=f"d{name} differs")


def naive64(inputs, state=None, **kw):
    """The float64 O(N²) reference on the same (rounded) inputs; differentiable w.r.t. them."""
    st = None if state is None else DAState(*(t.double() for t in state))
    out = differential_attention(*(t.double() for t in inputs), backend="naive", initial_state=st,
                                 output_final_state=state is not None or kw.pop("final", False), **kw)
    return out


# ----------------------------------------------------------------------------------------------
# v2 (backend "triton") under the interpreter, against the float64 naive reference


V2_CASES = [
    # (b, n, d, dv, chunk, cu_seqlens over B·N, segment_chunks, max_bk, max_bv)
    (1, 1, 16, 16, 16, None, None, 64, 64),
    (1, 37, 16, 24, 16, None, 1, 64, 64),  # ragged last chunk, dv != d, P = 3 segments
    (2, 45, 32, 16, 16, None, 2, 16, 64),  # batched rows, 2 K blocks, ragged segments
    (1, 60, 16, 24, 16, [0, 1, 17, 18, 40, 60], 2, 64, 16),  # length-1 docs, 2 V blocks
    (2, 40, 16, 16, 16, [0, 7, 40, 41, 80], None, 64, 64),  # batched rows, each with its documents
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("b,n,d,dv,chunk,cu,sc,max_bk,max_bv", V2_CASES)
def test_v2_matches_naive(tv2, monkeypatch, causal, b, n, d, dv, chunk, cu, sc, max_bk, max_bv):
    monkeypatch.setattr(tv2, "_MAX_BK", max_bk)
    monkeypatch.setattr(tv2, "_MAX_BV", max_bv)
    inputs = make_inputs(b=b, n=n, d=d, dv=dv, seed=n + d)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    kw = dict(causal=causal, cu_seqlens=cu_seqlens, chunk_size=chunk)
    out, state = run_triton(tv2, inputs, segment_chunks=sc, **kw)
    assert state is None and out.dtype == torch.float32
    assert_matches(out, naive64(inputs, **kw), inputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("b,n,cu,sc", [(2, 33, None, 1), (1, 50, [0, 20, 21, 50], 1), (2, 30, [0, 30, 41, 60], None)])
def test_v2_state_in_and_out_match_naive(tv2, causal, b, n, cu, sc):
    cu_seqlens = None if cu is None else torch.tensor(cu)
    r = b if cu is None else len(cu) - 1
    inputs = make_inputs(b=b, n=n, d=16, dv=16, seed=n)
    state = make_state(r, 2, 16, 16)
    kw = dict(causal=causal, cu_seqlens=cu_seqlens, chunk_size=16)
    o, fin = run_triton(tv2, inputs, segment_chunks=sc, initial_state=state, output_final_state=True, **kw)
    assert fin.S.shape == (r, 2, 16, 16) and fin.S.dtype == torch.float32
    ref_o, ref_fin = naive64(inputs, state, **kw)
    assert_matches((o, fin.S, fin.z), (ref_o, ref_fin.S, ref_fin.z), inputs + list(state), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "chunked", "recurrent"])
def test_state_hand_off_equals_one_run(tv2, backend):
    """Two halves with the state passed equal one run, for triton, chunked and recurrent alike."""
    q, k, v, g = make_inputs(b=2, n=50, d=16, dv=16, requires_grad=False)
    kw = dict(backend=backend, chunk_size=16, output_final_state=True)
    full, full_state = differential_attention(q, k, v, g, **kw)
    m = 23
    first, mid = differential_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], g[:, :, :m], **kw)
    second, end = differential_attention(q[:, :, m:], k[:, :, m:], v[:, :, m:], g[:, :, m:], initial_state=mid, **kw)
    torch.testing.assert_close(torch.cat([first, second], dim=2), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end.S, full_state.S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end.z, full_state.z, rtol=1e-5, atol=1e-5)
    ref, ref_state = naive64([q, k, v, g], final=True)
    torch.testing.assert_close(full.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_state.S.double(), ref_state.S, rtol=1e-5, atol=1e-5)


def test_v2_elu1_head_dim_and_half_inputs(tv2):
    inputs = make_inputs(n=40, d=24, dv=16)
    out, _ = run_triton(tv2, inputs, causal=False, feature_map="elu1", chunk_size=16, segment_chunks=1)
    assert_matches(out, naive64(inputs, causal=False, feature_map="elu1"), inputs, rtol=1e-5, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, g = make_inputs(n=50, d=16, dv=16, dtype=dtype)
        out = differential_attention(q, k, v, g, backend="triton", chunk_size=16)
        assert out.dtype == dtype
        ref = differential_attention(q.float(), k.float(), v.float(), g, backend="chunked")
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        out.float().square().sum().backward()
        assert q.grad.dtype == dtype and g.grad.dtype == torch.float32
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v, g))


def _bf16_errors(tv2, n, causal, d=64, seed=0):
    """Compiled-bf16 numerics under the interpreter (every dot operand rounded to bf16, products in fp32):
    max error / max |ref| of o and every gradient against fp64 on the same rounded inputs, plus dg's
    rms error / rms |ref|."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n, d, generator=gen) for _ in range(3))
    g = -(0.05 + 1.5 * torch.rand(1, 1, n, generator=gen))
    ins = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [g.requires_grad_()]
    o, _ = run_triton(tv2, ins, causal=causal)
    cot = torch.randn(o.shape, generator=gen)
    got = torch.autograd.grad(o.float(), ins, cot)
    ref_in = [x.detach().double().requires_grad_() for x in ins]
    ref = differential_attention(*ref_in, causal=causal, backend="chunked")
    want = torch.autograd.grad(ref, ref_in, cot.double())
    errs = {"o": ((o.double() - ref).abs().max() / ref.abs().max()).item()}
    for name, a, w in zip("qkvg", got, want):
        errs["d" + name] = ((a.double() - w).abs().max() / w.abs().max()).item()
    errs["dg_rms"] = ((got[3].double() - want[3]).pow(2).mean().sqrt() / want[3].pow(2).mean().sqrt()).item()
    return errs


@pytest.mark.slow
def test_v2_bf16_numerics_hold_from_1k_to_16k_tokens(tv2):
    """bf16 as compiled: o, dq, dk, dv, dg within the GPU tests' 2e-2 at 1k and 16k tokens, and dg's error
    flat in the length (it grew as √N with a whole-document reverse cumsum: 3.1e-3 at 1k, 1.1e-2 at 16k)."""
    short, long = _bf16_errors(tv2, 1024, True), _bf16_errors(tv2, 16384, True)
    for errs in (short, long, _bf16_errors(tv2, 1024, False)):
        assert max(errs.values()) < 2e-2, errs
    assert long["dg_rms"] < 1.5 * short["dg_rms"], (short, long)
    assert long["dg"] < 8e-3, long  # the max over 16× more tokens: 6.0e-3 measured (2.8–3.9e-3 at 1k)


def test_strict_kernels_refuse_the_fallback(tv2, monkeypatch):
    """FLUIDLM_STRICT_KERNELS=1 (GPU tests, gpu_check.sh): a failing kernel raises, forward or backward."""
    monkeypatch.setenv("FLUIDLM_STRICT_KERNELS", "1")
    monkeypatch.setattr(dispatch, "_TRITON_BROKEN", None)
    inputs = make_inputs(n=30, d=16, dv=16)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(tv2, "_backward", broken)
    out = differential_attention(*inputs, backend="triton", chunk_size=16)
    with pytest.raises(RuntimeError, match="simulated kernel failure"):
        out.sum().backward()
    assert tv2.BROKEN is None  # nothing remembered: the next test sees the kernels again
    monkeypatch.setattr(tv2, "triton_differential_attention", broken)
    with pytest.raises(RuntimeError, match="simulated kernel failure"):
        differential_attention(*inputs, backend="triton")
    monkeypatch.setattr(dispatch, "_TRITON_BROKEN", "triton DA kernels failed earlier")
    with pytest.raises(RuntimeError, match="no fallback"):
        differential_attention(*inputs, backend="triton")
    assert dispatch._TRITON_BROKEN == "triton DA kernels failed earlier"


def test_v2_final_state_only_when_asked(tv2, monkeypatch):
    """Without output_final_state the combine writes no per-document final state (HAS_FINAL off)."""
    calls = []
    real = tv2._combine
    monkeypatch.setattr(tv2, "_combine", lambda *a, **kw: calls.append(kw.get("final", False)) or real(*a, **kw))
    inputs = make_inputs(n=40, d=16, dv=16)
    out, state = run_triton(tv2, inputs, causal=True, chunk_size=16)
    assert state is None and calls[0] is False
    out.sum().backward()
    calls.clear()
    run_triton(tv2, inputs, causal=True, chunk_size=16, output_final_state=True)
    assert calls[0] is True


def test_v2_plan_fills_an_h100_at_the_125m_shape(tv2):
    """da-125m: 12 heads, head dim 64, rows flattened to B = 1: ≥ 4 programs per SM from N = 8k."""
    for n in (8192, 65536):
        p = tv2.plan(1, 12, n, 64, 64)
        for name, (grid0, grid1, heads, _) in p["launches"].items():
            if "combine" not in name:
                assert grid0 * grid1 * heads >= 4 * tv2.H100_SMS, (n, name, p)
    p = tv2.plan(2, 16, 65536, 128, 128)
    assert p["segments"] * p["n_v"] * 16 >= 4 * tv2.H100_SMS
    # summaries: P·d·dv per row, far below one state per chunk
    assert p["segments"] < 2 * 65536 // 64 // 8


def test_dispatch_explicit_triton_on_cpu_under_interpreter(tv2):
    inputs = make_inputs(n=40, d=16, dv=16)
    cu = torch.tensor([0, 9, 40])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback may happen
        out = differential_attention(*inputs, backend="triton", cu_seqlens=cu, chunk_size=16)
    ref = differential_attention(*inputs, backend="chunked", cu_seqlens=cu, chunk_size=16)
    assert_matches(out, ref, inputs, rtol=1e-5, atol=1e-5)
    assert {"triton", "triton_v1"} <= set(dispatch.available_backends())
    assert dispatch._pick_auto(inputs[0]) == "chunked"  # auto picks triton only on CUDA tensors


def test_fp64_inputs_use_the_exact_chunked_path(tv2):
    inputs = make_inputs(n=20, d=16, dv=8, dtype=torch.float64, requires_grad=False)
    out = differential_attention(*[t.double() for t in inputs], backend="triton")
    ref = differential_attention(*[t.double() for t in inputs], backend="naive")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_backward_kernel_failure_falls_back_once_and_is_remembered(tv2, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated backward launch failure")

    monkeypatch.setattr(tv2, "_backward", broken)
    monkeypatch.setattr(tv2, "BROKEN", None)
    monkeypatch.setattr(tv2, "_BACKWARD_FALLBACK_WARNED", False)
    monkeypatch.setattr(dispatch, "_FALLBACK_WARNED", False)
    monkeypatch.setattr(dispatch, "_TRITON_BROKEN", None)
    inputs = make_inputs(n=30, d=16, dv=16)
    state = make_state(1, 2, 16, 16)
    kw = dict(causal=False, chunk_size=16, initial_state=state, output_final_state=True)
    ref_o, ref_fin = differential_attention(*inputs, backend="chunked", **kw)
    with pytest.warns(RuntimeWarning, match="chunked torch path") as record:
        o, fin = differential_attention(*inputs, backend="triton", **kw)
        assert_matches((o, fin.S, fin.z), (ref_o, ref_fin.S, ref_fin.z), inputs + list(state), rtol=1e-5, atol=1e-5)
    assert len([w for w in record if "chunked torch path" in str(w.message)]) == 1
    assert tv2.BROKEN is not None and len(calls) == 1
    # the next step does not launch the broken kernels again: chunked, one fallback warning
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        o2 = differential_attention(*inputs, backend="triton", causal=False, chunk_size=16)
        o2.sum().backward()
    assert len(calls) == 1
    assert len([w for w in record if "falling back to the chunked" in str(w.message)]) == 1


def _fallback_calls(monkeypatch, **patch):
    monkeypatch.setattr(dispatch, "_FALLBACK_WARNED", False)
    monkeypatch.setattr(dispatch, "_TRITON_BROKEN", None)
    for name, value in patch.items():
        monkeypatch.setattr(dispatch, name, value)
    inputs = make_inputs(n=33, d=8, dv=5, requires_grad=False)
    ref = differential_attention(*inputs, backend="chunked")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [differential_attention(*inputs, backend="triton") for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ours = [w for w in record if "falling back to the chunked" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in record]
    return str(ours[0].message)


def test_missing_triton_falls_back_to_chunked_with_one_warning(monkeypatch):
    msg = _fallback_calls(monkeypatch, _TRITON_IMPORT_ERROR=ImportError("No module named 'triton'"))
    assert "not importable" in msg


def test_broken_triton_falls_back_to_chunked_with_one_warning(tv2, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(tv2, "triton_differential_attention", broken)
    msg = _fallback_calls(monkeypatch)
    assert "simulated compile failure" in msg


def test_compiled_mode_on_cpu_tensors_falls_back(tv2, monkeypatch):
    """Without the interpreter, CPU tensors cannot reach a Triton kernel: warn once, use chunked."""
    monkeypatch.setattr(tv2, "INTERPRET", False)
    msg = _fallback_calls(monkeypatch)
    assert "TRITON_INTERPRET" in msg


def test_unknown_backend_still_rejected():
    inputs = make_inputs(n=8, requires_grad=False)
    with pytest.raises(ValueError, match="unknown backend"):
        differential_attention(*inputs, backend="flash")


def test_bench_plan_runs_without_a_gpu(tv2, capsys):
    """bench/da_gpu.py --plan prints the launch plan on a CPU machine, labelled computed, not measured."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("da_gpu_bench", os.path.join(root, "bench", "da_gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--plan", "--sweep", "all", "--lengths", "65536"]) == 0
    out = capsys.readouterr().out
    assert "computed, not measured" in out
    assert "fwd.output" in out and "bwd.dq" in out and "programs/SM" in out
    assert "B=1 H=12 N=8192 d=dv=64" in out  # the 125M model's shape


# ----------------------------------------------------------------------------------------------
# v1 (backend "triton_v1", kept for the GPU benchmark until v2 is measured faster)


V1_CASES = [
    # (n, d, dv, chunk, cu_seqlens, max_bv)   max_bv < dv: several value blocks per head
    (60, 16, 40, 16, [0, 1, 17, 18, 40, 60], 16),  # ragged chunk, length-1 docs, docs crossing chunks, 3 value blocks
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n,d,dv,chunk,cu,max_bv", V1_CASES)
def test_interpreter_matches_chunked_and_naive(tda, monkeypatch, causal, n, d, dv, chunk, cu, max_bv):
    monkeypatch.setattr(tda, "_MAX_BV", max_bv)
    inputs = make_inputs(n=n, d=d, dv=dv, seed=n + d)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    kw = dict(causal=causal, cu_seqlens=cu_seqlens, chunk_size=chunk)
    out = run_triton(tda, inputs, **kw)
    assert_matches(out, naive64(inputs, **kw), inputs, rtol=1e-5, atol=1e-5)
    via_dispatch = differential_attention(*inputs, backend="triton_v1", **kw)
    torch.testing.assert_close(via_dispatch, out, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# CUDA: the compiled kernels (skipped without a GPU)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _strict_gpu_tests(request, monkeypatch):
    """GPU tests run strict (a kernel failure raises: no test can pass on the chunked fallback), and every
    test starts with the broken-kernel flags cleared, so one failure does not turn the rest into
    chunked-versus-chunked comparisons. An asynchronous CUDA error (illegal address) is different: it
    loses the CUDA context, no fallback is possible, and every later CUDA call in the process fails."""
    if request.node.get_closest_marker("gpu") is None:
        return
    monkeypatch.setenv("FLUIDLM_STRICT_KERNELS", "1")
    monkeypatch.setattr(dispatch, "_TRITON_BROKEN", None)
    if "fluidlm.kernels.triton_v2" in sys.modules:
        monkeypatch.setattr(sys.modules["fluidlm.kernels.triton_v2"], "BROKEN", None)


@pytest.mark.skipif(not HAS_TRITON or IN_PROCESS, reason="the interpreter tests ran in this process")
def test_interpreter_suite_in_subprocess():
    """Where this process runs Triton compiled (CUDA, or triton imported earlier without the
    interpreter), rerun this file's CPU tests in a fresh interpreted process."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not gpu", "-p", "no:cacheprovider", __file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def _gpu_check(n, dtype, causal, cu=None, b=1, h=2, d=64, dv=64, grads=True, tol=None):
    inputs = make_inputs(b=b, h=h, n=n, d=d, dv=dv, dtype=dtype, device="cuda", requires_grad=grads, seed=n)
    cu_seqlens = None if cu is None else torch.tensor(cu, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = differential_attention(*inputs, backend="triton", causal=causal, cu_seqlens=cu_seqlens)
    assert out.dtype == dtype
    # fp32 reference on the same (possibly rounded) inputs
    ref_inputs = [t.detach().float().requires_grad_(grads) for t in inputs]
    ref = differential_attention(*ref_inputs, backend="chunked", causal=causal, cu_seqlens=cu_seqlens)
    rtol, atol = tol or ((1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2))
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)
    if grads:
        cot = torch.randn_like(ref)
        got = torch.autograd.grad(out.float(), inputs, cot, retain_graph=True)
        want = torch.autograd.grad(ref, ref_inputs, cot)
        for name, a, w in zip("qkvg", got, want):
            scale = w.abs().max().item() + 1e-30
            torch.testing.assert_close(a.float() / scale, w / scale, rtol=rtol, atol=atol, msg=f"d{name} differs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n", [1000, 4096, 65536])
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_matches_fp32_reference(n, causal, dtype):
    _gpu_check(n, dtype, causal, grads=n <= 4096)


@pytest.mark.parametrize("d,dv", [(16, 16), (32, 48), (128, 128), (256, 256)])
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_head_dims_and_documents(d, dv):
    _gpu_check(3000, torch.float32, causal=True, cu=[0, 1, 700, 701, 2999, 3000], d=d, dv=dv, b=1, h=3)
    _gpu_check(3000, torch.bfloat16, causal=False, cu=[0, 1000, 3000], d=d, dv=dv, b=1, h=3)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_131072_tokens_forward_backward():
    _gpu_check(131072, torch.bfloat16, causal=True, h=2, d=64, dv=64, grads=True)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_offsets_beyond_int32():
    """B·H·N·d ≥ 2³¹: the last head's elements sit past int32 offsets. Forward only, ~60 GB."""
    n, h, d = 131072, 129, 128
    if torch.cuda.get_device_properties(0).total_memory < 75 * 2**30:
        pytest.skip("needs a GPU with ≥ 75 GiB")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    g = -torch.rand(1, h, n, device="cuda", generator=gen)
    with torch.no_grad():
        out = differential_attention(q, k, v, g, backend="triton")[:, -1:].float()
        ref = differential_attention(q[:, -1:].float(), k[:, -1:].float(), v[:, -1:].float(), g[:, -1:], backend="chunked")
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_memory_is_linear_in_n():
    def peak(n):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        q, k, v = (torch.randn(1, 4, n, 64, device="cuda", requires_grad=True) for _ in range(3))
        g = (-torch.rand(1, 4, n, device="cuda")).requires_grad_()
        differential_attention(q, k, v, g, backend="triton").square().mean().backward()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(8192), peak(65536)
    assert large < 8 * small * 1.25, (small, large)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_auto_picks_triton():
    q, k, v, g = make_inputs(n=64, device="cuda", requires_grad=False)
    assert dispatch._pick_auto(q) == "triton"
    torch.testing.assert_close(
        differential_attention(q, k, v, g), differential_attention(q, k, v, g, backend="chunked"), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_state_in_out_and_batched_documents(dtype):
    """Compiled v2 with a state in and out, batched rows with their own documents, vs chunked in fp32."""
    b, h, n, d = 2, 3, 5000, 64
    cu = torch.tensor([0, 1, 2000, 5000, 5001, 9000, 10000], device="cuda")
    inputs = make_inputs(b=b, h=h, n=n, d=d, dv=d, dtype=dtype, device="cuda", seed=3)
    state = make_state(6, h, d, d, device="cuda")
    kw = dict(cu_seqlens=cu, initial_state=state, output_final_state=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, fin = differential_attention(*inputs, backend="triton", **kw)
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref_st = DAState(*(t.detach().requires_grad_() for t in state))
    ref_o, ref_fin = differential_attention(*ref_in, backend="chunked", cu_seqlens=cu, initial_state=ref_st,
                                            output_final_state=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_matches((o, fin.S, fin.z), (ref_o, ref_fin.S, ref_fin.z), inputs + list(state), rtol=tol, atol=tol,
                   grads=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cots = [torch.randn(t.shape, device="cuda", generator=gen) for t in (ref_o, ref_fin.S, ref_fin.z)]
    got = torch.autograd.grad([o.float(), fin.S, fin.z], inputs + list(state), cots)
    want = torch.autograd.grad([ref_o, ref_fin.S, ref_fin.z], ref_in + list(ref_st), cots)
    for name, a, w in zip(["q", "k", "v", "g", "S0", "z0"], got, want):
        scale = w.abs().max().item() + 1e-30
        torch.testing.assert_close(a.float() / scale, w / scale, rtol=tol, atol=tol, msg=f"d{name} differs")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_state_hand_off_and_no_host_sync():
    q, k, v, g = make_inputs(b=2, h=4, n=8192, d=64, dv=64, device="cuda", requires_grad=False)
    cu = torch.tensor([0, 3000, 8192, 16384], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host synchronisation inside the op raises
    try:
        full, full_state = differential_attention(q, k, v, g, backend="triton", output_final_state=True)
        first, mid = differential_attention(q[:, :, :5000], k[:, :, :5000], v[:, :, :5000], g[:, :, :5000],
                                            backend="triton", output_final_state=True)
        second, end = differential_attention(q[:, :, 5000:], k[:, :, 5000:], v[:, :, 5000:], g[:, :, 5000:],
                                             backend="triton", initial_state=mid, output_final_state=True)
        differential_attention(q, k, v, g, backend="triton", causal=False, cu_seqlens=cu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(torch.cat([first, second], 2), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(end.S, full_state.S, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_v1_and_v2_agree(causal):
    inputs = make_inputs(b=1, h=4, n=4096, d=128, dv=128, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    v2 = differential_attention(*inputs, backend="triton", causal=causal)
    v1 = differential_attention(*inputs, backend="triton_v1", causal=causal)
    torch.testing.assert_close(v2.float(), v1.float(), rtol=2e-2, atol=2e-2)
