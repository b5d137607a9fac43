"""Differential Attention (DESIGN.md §1) behind one function, with interchangeable backends."""

from fluidlm.kernels.dispatch import BACKENDS, available_backends, differential_attention

__all__ = ["BACKENDS", "available_backends", "differential_attention"]
