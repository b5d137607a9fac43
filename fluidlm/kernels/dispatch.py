"""The public entry point: `differential_attention`, input validation and backend choice."""

from __future__ import annotations

import importlib.util
import warnings

import torch

from fluidlm.kernels.chunked import chunked_differential_attention
from fluidlm.kernels.common import FEATURE_MAPS, DAState, strict_kernels
from fluidlm.kernels.naive import naive_differential_attention
from fluidlm.kernels.recurrent import recurrent_differential_attention

BACKENDS = {
    "naive": naive_differential_attention,
    "recurrent": recurrent_differential_attention,
    "chunked": chunked_differential_attention,
}

# The Triton backends are registered only when triton is installed, and triton itself is imported
# lazily, on first use of the backend: Triton reads TRITON_INTERPRET when `import triton` decorates its
# own library kernels and when a kernel is decorated, so importing it here would fix the mode for
# every later user of fluidlm.kernels. A broken install (the import raises) falls back on first use.
_TRITON_IMPORT_ERROR: BaseException | None = (
    None if importlib.util.find_spec("triton") is not None else ImportError("No module named 'triton'")
)
_TRITON_BROKEN: str | None = None  # set after a compile/launch failure on a CUDA device
_FALLBACK_WARNED = False


def _triton_backend(q, k, v, g, **kwargs):
    """backend="triton": the v2 kernels (fluidlm/kernels/triton_v2.py), or `chunked` (one warning per
    process) when Triton is missing, cannot run on these tensors, or fails to compile/launch; a failure
    on CUDA (forward or backward) is remembered, so a broken build is not launched again."""
    global _TRITON_BROKEN
    if q.dtype == torch.float64:  # the exact path: fp64 is the gradcheck reference
        return run_reference("chunked", q, k, v, g, **kwargs)
    reason = None
    if _TRITON_IMPORT_ERROR is not None:
        reason = f"triton is not importable ({type(_TRITON_IMPORT_ERROR).__name__}: {_TRITON_IMPORT_ERROR})"
    elif _TRITON_BROKEN is not None:
        reason = _TRITON_BROKEN
    else:
        try:
            from fluidlm.kernels import triton_v2

            return triton_v2.triton_differential_attention(q, k, v, g, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001  (any failure: fall back, never crash)
            if strict_kernels():
                raise
            reason = f"triton DA kernels failed ({type(err).__name__}: {err})"
            if q.is_cuda or isinstance(err, ImportError):
                _TRITON_BROKEN = reason
    if strict_kernels():
        raise RuntimeError(f"{reason}; FLUIDLM_STRICT_KERNELS is set, so there is no fallback to chunked")
    _warn_fallback(reason)
    return run_reference("chunked", q, k, v, g, **kwargs)



def _triton_v1_backend(q, k, v, g, *, initial_state=None, output_final_state=False, **kwargs):
    """backend="triton_v1": the v1 kernels (one program per batch·head and value block, no state), kept
    for the GPU benchmark until v2 is measured faster. Same fallback as "triton"."""
    if initial_state is not None or output_final_state:
        raise ValueError("backend 'triton_v1' has no state in or out; use backend='triton'")
    if _TRITON_IMPORT_ERROR is not None or _TRITON_BROKEN is not None:
        reason = _TRITON_BROKEN or f"triton is not importable ({_TRITON_IMPORT_ERROR})"
        if strict_kernels():
            raise RuntimeError(f"{reason}; FLUIDLM_STRICT_KERNELS is set, so there is no fallback to chunked")
        _warn_fallback(reason)
        return chunked_differential_attention(q, k, v, g, **kwargs)
    from fluidlm.kernels import triton_da

    return triton_da.triton_differential_attention(q, k, v, g, **kwargs)


def _warn_fallback(reason: str) -> None:
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn(f"{reason}; falling back to the chunked torch backend", RuntimeWarning, stacklevel=5)


if _TRITON_IMPORT_ERROR is None:
    BACKENDS["triton"] = _triton_backend
    BACKENDS["triton_v1"] = _triton_v1_backend


def available_backends() -> list[str]:
    return list(BACKENDS)


def _pick_auto(q: torch.Tensor) -> str:
    if q.is_cuda and "triton" in BACKENDS and _TRITON_BROKEN is None:
        return "triton"
    return "chunked"


def run_reference(name, q, k, v, g, *, causal, feature_map, eps, cu_seqlens, chunk_size, initial_state=None,
                  output_final_state=False):
    """A torch backend (or triton_v1) under the full op contract: batched rows with documents
    (`cu_seqlens` over the flattened B·N tokens) run as one packed row, since documents never cross
    rows. Returns (o, DAState | None)."""
    fn = BACKENDS[name] if name != "triton_v1" else _triton_v1_backend
    b, h, n, _ = q.shape
    flat = cu_seqlens is not None and b > 1
    if flat:  # (B, H, N, ·) -> (1, H, B·N, ·)
        q, k, v = (x.transpose(0, 1).reshape(1, h, b * n, x.shape[-1]) for x in (q, k, v))
        g = g.transpose(0, 1).reshape(1, h, b * n)
    kw = dict(causal=causal, feature_map=feature_map, eps=eps, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    if initial_state is not None or output_final_state:
        kw.update(initial_state=initial_state, output_final_state=output_final_state)
    out = fn(q, k, v, g, **kw)
    o, state = out if output_final_state else (out, None)
    if flat:
        o = o.reshape(h, b, n, o.shape[-1]).transpose(0, 1)
    return o, state


_OPAQUE = None


def _opaque():
    """`differential_attention` behind torch.compiler.disable, made on first use under torch.compile:
    decorating at import would import torch._dynamo (and with it triton, compiled) in every process."""
    global _OPAQUE
    if _OPAQUE is None:
        _OPAQUE = torch.compiler.disable(_differential_attention)
    return _OPAQUE


def differential_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    causal: bool = True,
    feature_map: str = "sigmoid",
    eps: float = 1e-6,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: DAState | tuple | None = None,
    output_final_state: bool = False,
    cu_seqlens_cpu: torch.Tensor | None = None,
):
    """Differential Attention (docs/design.md §1).

    q, k: (B, H, N, d) raw (φ is applied inside); v: (B, H, N, dv); g: (B, H, N) log-decay ≤ 0
    (g = -λ_h Δ_{t,h}). Returns o: (B, H, N, dv) in q's dtype, accumulated in fp32 (fp64 for fp64
    inputs), or (o, DAState) with `output_final_state=True`. `causal=False` is the bidirectional form.

    `cu_seqlens` (int, FlashAttention's convention [0, n_1, n_1+n_2, ..., B·N]) packs documents along
    the flattened B·N tokens; every row boundary r·N must be a document boundary (documents never cross
    rows), so B = 1 is the classic packed row and B > 1 gives every row its own documents. The state
    resets at each document start: the result equals running each document on its own.

    State (`fluidlm.kernels.DAState`: S (R, H, d, dv), z (R, H, d), fp32): R = B without `cu_seqlens`
    (one per row), else the number of documents (one per document). `initial_state` is the state before
    each row's (document's) first token; `output_final_state=True` also returns the state after its last
    token. Running a sequence in two halves with the state passed equals one run. The bidirectional form
    takes the initial state into its left (causal) part and returns the causal final state.

    `cu_seqlens_cpu`: an optional host copy of `cu_seqlens`, used only to validate its values when
    `cu_seqlens` lives on a GPU (the op never synchronises with the device; without a host copy the
    values of a GPU `cu_seqlens`, and the sign of a GPU g, are not checked).

    `backend="auto"` uses `triton` (fluidlm/kernels/triton_v2.py) on CUDA tensors and `chunked`
    elsewhere; a missing or failing Triton falls back to `chunked` with one warning and is not retried.
    The op is opaque to torch.compile (a graph break around it).
    """
    kw = dict(causal=causal, feature_map=feature_map, eps=eps, backend=backend, cu_seqlens=cu_seqlens,
              chunk_size=chunk_size, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens_cpu=cu_seqlens_cpu)
    if torch.compiler.is_compiling():
        return _opaque()(q, k, v, g, **kw)
    return _differential_attention(q, k, v, g, **kw)


def _differential_attention(q, k, v, g, *, causal, feature_map, eps, backend, cu_seqlens, chunk_size,
                            initial_state, output_final_state, cu_seqlens_cpu):
    _validate(q, k, v, g, feature_map, eps, backend, cu_seqlens, cu_seqlens_cpu, chunk_size, initial_state)
    if initial_state is not None:
        initial_state = DAState(*initial_state)
    name = _pick_auto(q) if backend == "auto" else backend
    kw = dict(causal=causal, feature_map=feature_map, eps=eps, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
              initial_state=initial_state, output_final_state=output_final_state)
    if name == "triton":
        o, state = _triton_backend(q, k, v, g, **kw)
    else:
        o, state = run_reference(name, q, k, v, g, **kw)
    o = o.to(q.dtype)
    return (o, state) if output_final_state else o


def _validate(q, k, v, g, feature_map, eps, backend, cu_seqlens, cu_seqlens_cpu, chunk_size, initial_state) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, N, d); got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    if g.dim() != 3:
        raise ValueError(f"g must be 3-D (B, H, N); got g{tuple(g.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got q{tuple(q.shape)} and k{tuple(k.shape)}")
    b, h, n, d = q.shape
    dv = v.shape[-1]
    if v.shape[:3] != (b, h, n):
        what = "heads" if v.shape[1] != h else "batch or sequence"
        raise ValueError(f"v{tuple(v.shape)} does not match q{tuple(q.shape)} in its {what} dimension")
    if g.shape != (b, h, n):
        what = "heads" if g.shape[1] != h else "batch or sequence"
        raise ValueError(f"g{tuple(g.shape)} must be (B, H, N) = {(b, h, n)}: mismatched {what}")
    if n == 0:
        raise ValueError("sequence length N must be at least 1")
    if len({t.device for t in (q, k, v, g)}) != 1:
        raise ValueError("q, k, v and g must be on the same device")
    if not g.is_cuda and bool((g > 0).any()):  # on a GPU this check would synchronise: skipped there
        raise ValueError("g is a log-decay and must be <= 0 everywhere (g = -λ·Δ); got positive values")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; choose one of {FEATURE_MAPS}")
    # "triton" is always accepted: without a working Triton it falls back to chunked with a warning
    if backend not in ("auto", "triton", "triton_v1") and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    n_states = b
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor [0, n_1, n_1+n_2, ..., B·N]")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least [0, B·N]")
        n_states = cu_seqlens.numel() - 1
        host = cu_seqlens if not cu_seqlens.is_cuda else cu_seqlens_cpu
        if host is not None:
            cu = host.tolist()
            if len(cu) != cu_seqlens.numel() or cu[0] != 0 or cu[-1] != b * n or any(x >= y for x, y in zip(cu, cu[1:])):
                raise ValueError(
                    f"cu_seqlens must start at 0, end at B·N={b * n} and strictly increase; got "
                    f"{cu[:8]}{'...' if len(cu) > 8 else ''}"
                )
            missing = sorted(set(range(n, b * n, n)) - set(cu))
            if missing:
                raise ValueError(
                    f"cu_seqlens packs documents along the flattened B·N tokens and documents may not cross "
                    f"rows: the row boundaries {missing[:4]} (multiples of N={n}) must be document boundaries"
                )
    if initial_state is not None:
        if not (isinstance(initial_state, tuple) and len(initial_state) == 2
                and all(isinstance(t, torch.Tensor) for t in initial_state)):
            raise ValueError("initial_state must be a DAState(S, z) (or a tuple of the two tensors)")
        s, z = initial_state
        what = "documents (len(cu_seqlens) - 1)" if cu_seqlens is not None else "rows B"
        if tuple(s.shape) != (n_states, h, d, dv) or tuple(z.shape) != (n_states, h, d):
            raise ValueError(
                f"initial_state must be S {(n_states, h, d, dv)} and z {(n_states, h, d)} (one per {what}); "
                f"got S{tuple(s.shape)} and z{tuple(z.shape)}"
            )
        if not (s.is_floating_point() and z.is_floating_point()) or s.device != q.device or z.device != q.device:
            raise ValueError("initial_state tensors must be floating point and on q's device")
