"""Pieces every DA backend shares: feature maps, accumulation dtype, document segments."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("sigmoid", "elu1")


def feature_map_fn(x: torch.Tensor, name: str) -> torch.Tensor:
    """The positive feature map φ of DESIGN.md §1."""
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    raise ValueError(f"unknown feature_map {name!r}; choose one of {FEATURE_MAPS}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 stays fp64 (the gradcheck reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_ids(cu_seqlens: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
    """(1, N) document index of every token, or None when there are no documents."""
    if cu_seqlens is None:
        return None
    positions = torch.arange(n, device=device)
    return (torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.long), positions, right=True) - 1)[None]


def input_weight(g: torch.Tensor) -> torch.Tensor:
    """β = 1 - exp(g), computed as -expm1(g) so small steps keep their precision."""
    return -torch.expm1(g)
