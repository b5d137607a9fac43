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

from fluidlm.kernels import dispatch
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


@pytest.fixture(scope="module")
def tda():
    """fluidlm.kernels.triton_da with its kernels decorated in interpreter mode (CPU tensors)."""
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    if not IN_PROCESS:
        pytest.skip("triton runs compiled in this process: test_interpreter_suite_in_subprocess runs these")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # also read while interpreted kernels run
    mod = importlib.import_module("fluidlm.kernels.triton_da")
    if not mod.INTERPRET:
        mod = importlib.reload(mod)
    assert mod.INTERPRET
    yield mod
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


def make_inputs(b=1, h=2, n=37, d=16, dv=24, dtype=torch.float32, device="cpu", seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, n, d, generator=gen)
    v = torch.randn(b, h, n, dv, generator=gen)
    g = -(0.05 + 1.5 * torch.rand(b, h, n, generator=gen))
    out = [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [g.to(device)]
    return [t.requires_grad_(requires_grad) for t in out]


def run_triton(tda, inputs, **kw):
    kw.setdefault("feature_map", "sigmoid")
    kw.setdefault("eps", 1e-6)
    kw.setdefault("cu_seqlens", None)
    return tda.triton_differential_attention(*inputs, **kw)


def assert_matches(out, ref, inputs, rtol, atol, grads=True):
    """Outputs, then every gradient, each relative to its own largest entry (a seeded cotangent).
    With one token, o = v·s/(s+ε): dq, dk and dg are O(ε) rounding, so they are measured against
    the largest gradient of the problem instead."""
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
    if not grads:
        return
    gen = torch.Generator(device=ref.device).manual_seed(1234)
    cot = torch.randn(ref.shape, generator=gen, device=ref.device)
    got = torch.autograd.grad(out.float(), inputs, cot, retain_graph=True)
    want = torch.autograd.grad(ref.float(), inputs, cot)
    floor = max(w.abs().max().item() for w in want) if ref.shape[-2] == 1 else 1e-30
    for name, a, b in zip("qkvg", got, want):
        scale = max(b.abs().max().item(), floor)
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=rtol, atol=atol, msg=f"d{name} differs")


CPU_CASES = [
    # (n, d, dv, chunk, cu_seqlens, max_bv)   max_bv < dv: several value blocks per head
    (1, 16, 16, 16, None, 64),
    (37, 16, 24, 16, None, 64),  # ragged last chunk, dv != d
    (100, 32, 32, 32, None, 64),
    (100, 16, 40, 16, [0, 1, 17, 18, 60, 100], 16),  # length-1 docs, docs crossing chunks, 3 value blocks
    (100, 32, 16, 32, [0, 31, 32, 100], 64),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n,d,dv,chunk,cu,max_bv", CPU_CASES)
def test_interpreter_matches_chunked_and_naive(tda, monkeypatch, causal, n, d, dv, chunk, cu, max_bv):
    monkeypatch.setattr(tda, "_MAX_BV", max_bv)
    inputs = make_inputs(n=n, d=d, dv=dv, seed=n + d)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    kw = dict(causal=causal, cu_seqlens=cu_seqlens, chunk_size=chunk)
    out = run_triton(tda, inputs, **kw)
    for backend in ("chunked", "naive"):
        ref = differential_attention(*inputs, backend=backend, **kw)
        assert_matches(out, ref, inputs, rtol=1e-5, atol=1e-5)


def test_interpreter_elu1_and_half_inputs(tda):
    inputs = make_inputs(n=50, d=16, dv=16, requires_grad=False)
    out = run_triton(tda, inputs, causal=False, feature_map="elu1", chunk_size=16)
    ref = differential_attention(*inputs, causal=False, feature_map="elu1", backend="naive")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, g = make_inputs(n=50, d=16, dv=16, dtype=dtype)
        out = differential_attention(q, k, v, g, backend="triton", chunk_size=16)
        assert out.dtype == dtype
        ref = differential_attention(q.float(), k.float(), v.float(), g, backend="chunked")
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
        out.float().square().sum().backward()
        assert q.grad.dtype == dtype and g.grad.dtype == torch.float32
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v, g))


def test_dispatch_explicit_triton_on_cpu_under_interpreter(tda):
    inputs = make_inputs(n=40, d=16, dv=16)
    cu = torch.tensor([0, 9, 40])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback may happen
        out = differential_attention(*inputs, backend="triton", cu_seqlens=cu, chunk_size=16)
    ref = differential_attention(*inputs, backend="chunked", cu_seqlens=cu, chunk_size=16)
    assert_matches(out, ref, inputs, rtol=1e-5, atol=1e-5)
    assert "triton" in dispatch.available_backends()
    assert dispatch._pick_auto(inputs[0]) == "chunked"  # auto picks triton only on CUDA tensors


def test_fp64_inputs_use_the_exact_chunked_path(tda):
    inputs = make_inputs(n=20, d=16, dv=8, dtype=torch.float64, requires_grad=False)
    out = differential_attention(*[t.double() for t in inputs], backend="triton")
    ref = differential_attention(*[t.double() for t in inputs], backend="naive")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_backward_kernel_failure_falls_back_to_torch_gradients(tda, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated backward launch failure")

    monkeypatch.setattr(tda, "_launch_backward", broken)
    monkeypatch.setattr(tda, "_BACKWARD_FALLBACK_WARNED", False)
    inputs = make_inputs(n=30, d=16, dv=16)
    ref = differential_attention(*inputs, backend="chunked", causal=False, chunk_size=16)
    with pytest.warns(RuntimeWarning, match="chunked torch path") as record:
        out = run_triton(tda, inputs, causal=False, chunk_size=16)
        assert_matches(out, ref, inputs, rtol=1e-5, atol=1e-5)
    assert len(record) == 1


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


def test_broken_triton_falls_back_to_chunked_with_one_warning(tda, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(tda, "triton_differential_attention", broken)
    msg = _fallback_calls(monkeypatch)
    assert "simulated compile failure" in msg


def test_compiled_mode_on_cpu_tensors_falls_back(tda, monkeypatch):
    """Without the interpreter, CPU tensors cannot reach a Triton kernel: warn once, use chunked."""
    monkeypatch.setattr(tda, "INTERPRET", False)
    msg = _fallback_calls(monkeypatch)
    assert "TRITON_INTERPRET" in msg


def test_unknown_backend_still_rejected():
    inputs = make_inputs(n=8, requires_grad=False)
    with pytest.raises(ValueError, match="unknown backend"):
        differential_attention(*inputs, backend="flash")


# ----------------------------------------------------------------------------------------------
# CUDA: the compiled kernels (skipped without a GPU)
# ----------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("d,dv", [(16, 16), (32, 48), (128, 128)])
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
