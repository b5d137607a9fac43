"""Differential Attention (docs/design.md §1) behind one function, with interchangeable backends."""

from fluidlm.kernels.common import DAState
from fluidlm.kernels.dispatch import BACKENDS, available_backends, differential_attention

__all__ = ["BACKENDS", "DAState", "available_backends", "differential_attention"]
