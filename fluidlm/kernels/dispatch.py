"""The public entry point: `differential_attention`, input validation and backend choice."""

from __future__ import annotations

import importlib.util
import warnings

import torch

from fluidlm.kernels.chunked import chunked_differential_attention
from fluidlm.kernels.common import FEATURE_MAPS
from fluidlm.kernels.naive import naive_differential_attention
from fluidlm.kernels.recurrent import recurrent_differential_attention

BACKENDS = {
    "naive": naive_differential_attention,
    "recurrent": recurrent_differential_attention,
    "chunked": chunked_differential_attention,
}

# The Triton backend is registered only when triton is installed, and triton itself is imported
# lazily, on first use of the backend: Triton reads TRITON_INTERPRET when `import triton` decorates its
# own library kernels and when a kernel is decorated, so importing it here would fix the mode for
# every later user of fluidlm.kernels. A broken install (the import raises) falls back on first use.
_TRITON_IMPORT_ERROR: BaseException | None = (
    None if importlib.util.find_spec("triton") is not None else ImportError("No module named 'triton'")
)
_TRITON_BROKEN: str | None = None  # set after a compile/launch failure on a CUDA device
_FALLBACK_WARNED = False


def _triton_backend(q, k, v, g, **kwargs):
    """backend="triton": the fused kernels, or `chunked` (one warning per process) when Triton is
    missing, cannot run on these tensors, or fails to compile/launch."""
    global _TRITON_BROKEN
    reason = None
    if _TRITON_IMPORT_ERROR is not None:
        reason = f"triton is not importable ({type(_TRITON_IMPORT_ERROR).__name__}: {_TRITON_IMPORT_ERROR})"
    elif _TRITON_BROKEN is not None:
        reason = _TRITON_BROKEN
    else:
        try:
            from fluidlm.kernels import triton_da

            return triton_da.triton_differential_attention(q, k, v, g, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001  (any failure: fall back, never crash)
            reason = f"triton DA kernels failed ({type(err).__name__}: {err})"
            if q.is_cuda or isinstance(err, ImportError):
                _TRITON_BROKEN = reason
    _warn_fallback(reason)
    return chunked_differential_attention(q, k, v, g, **kwargs)


def _warn_fallback(reason: str) -> None:
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn(f"{reason}; falling back to the chunked torch backend", RuntimeWarning, stacklevel=4)


if _TRITON_IMPORT_ERROR is None:
    BACKENDS["triton"] = _triton_backend


def available_backends() -> list[str]:
    return list(BACKENDS)


def _pick_auto(q: torch.Tensor) -> str:
    if q.is_cuda and "triton" in BACKENDS and _TRITON_BROKEN is None:
        return "triton"
    return "chunked"


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
) -> torch.Tensor:
    """Differential Attention (DESIGN.md §1).

    q, k: (B, H, N, d) raw (φ is applied inside); v: (B, H, N, dv); g: (B, H, N) log-decay ≤ 0
    (g = -λ_h Δ_{t,h}). Returns o: (B, H, N, dv) in q's dtype, accumulated in fp32 (fp64 for
    fp64 inputs). `causal=False` is the bidirectional form. `cu_seqlens` (int, B = 1, documents
    packed along N, FlashAttention's convention: [0, n_1, n_1+n_2, ..., N]) resets the state at
    each document start, so the result equals running each document on its own.

    `backend="auto"` uses `triton` (fused kernels, fluidlm/kernels/triton_da.py) on CUDA tensors and
    `chunked` elsewhere; a missing or failing Triton falls back to `chunked` with one warning.
    """
    _validate(q, k, v, g, feature_map, eps, backend, cu_seqlens, chunk_size)
    name = _pick_auto(q) if backend == "auto" else backend
    o = BACKENDS.get(name, _triton_backend)(
        q, k, v, g, causal=causal, feature_map=feature_map, eps=eps, cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )
    return o.to(q.dtype)


def _validate(q, k, v, g, feature_map, eps, backend, cu_seqlens, chunk_size) -> None:
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
    b, h, n, _ = q.shape
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
    if bool((g > 0).any()):
        raise ValueError("g is a log-decay and must be <= 0 everywhere (g = -λ·Δ); got positive values")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; choose one of {FEATURE_MAPS}")
    # "triton" is always accepted: without a working Triton it falls back to chunked with a warning
    if backend not in ("auto", "triton") and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor [0, n_1, n_1+n_2, ..., N]")
        if b != 1:
            raise ValueError(f"cu_seqlens packs documents along N and needs batch size 1, got B={b}")
        cu = cu_seqlens.tolist()
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != n or any(x >= y for x, y in zip(cu, cu[1:])):
            raise ValueError(
                f"cu_seqlens must start at 0, end at N={n} and strictly increase; got {cu[:8]}{'...' if len(cu) > 8 else ''}"
            )
