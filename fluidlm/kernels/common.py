"""Pieces every DA backend shares: feature maps, accumulation dtype, document segments."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("sigmoid", "elu1")


def strict_kernels() -> bool:
    """FLUIDLM_STRICT_KERNELS=1 (set by the GPU tests and scripts/gpu_check.sh): a failing Triton kernel
    raises instead of falling back to `chunked`, so a kernel check cannot pass on the fallback."""
    return os.environ.get("FLUIDLM_STRICT_KERNELS", "") not in ("", "0")


def feature_map_fn(x: torch.Tensor, name: str) -> torch.Tensor:
    """The positive feature map φ of docs/design.md §1."""
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    raise ValueError(f"unknown feature_map {name!r}; choose one of {FEATURE_MAPS}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 stays fp64 (the gradcheck reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def doc_bounds(cu_seqlens: torch.Tensor | None, b: int, n: int, device):
    """(starts, ends) of the documents, ends exclusive, as int64 tensors: one per row without
    `cu_seqlens` (row r spans [r·N, (r+1)·N) of the flattened B·N tokens)."""
    if cu_seqlens is None:
        cu = torch.arange(b + 1, device=device, dtype=torch.long) * n
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
    return cu[:-1], cu[1:]


def segment_ids(cu_seqlens: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
    """(1, N) document index of every token, or None when there are no documents."""
    if cu_seqlens is None:
        return None
    positions = torch.arange(n, device=device)
    return (torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.long), positions, right=True) - 1)[None]


def input_weight(g: torch.Tensor) -> torch.Tensor:
    """β = 1 - exp(g), computed as -expm1(g) so small steps keep their precision."""
    return -torch.expm1(g)


class DAState(NamedTuple):
    """The recurrent state of Differential Attention, the one type every backend takes as
    `initial_state` and returns with `output_final_state=True`.

    S: (R, H, d, dv) fp32 (fp64 for fp64 inputs), Σ_i (decay to the position) β_i φ(k_i) v_iᵀ;  z: (R, H, d) fp32, the same
    sum without v (the normaliser). R = B (one state per row) or, with `cu_seqlens`, the number of
    documents (one state per document, flash-linear-attention's convention). An initial state is the
    state just before a row's (document's) first token; a final state the state after its last token.
    """

    S: torch.Tensor
    z: torch.Tensor

    @staticmethod
    def zeros(r: int, h: int, d: int, dv: int, device=None) -> "DAState":
        return DAState(torch.zeros(r, h, d, dv, device=device), torch.zeros(r, h, d, device=device))

    def augmented(self, dtype=None) -> torch.Tensor:
        """(R, H, d, dv+1): z as the last column of S (the layout of the torch scans)."""
        dtype = dtype or self.S.dtype
        return torch.cat([self.S.to(dtype), self.z.to(dtype)[..., None]], dim=-1)

    @staticmethod
    def from_augmented(state: torch.Tensor) -> "DAState":
        return DAState(state[..., :-1], state[..., -1])
