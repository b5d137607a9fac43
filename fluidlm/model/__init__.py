"""The Fluid Transformer, its PDE layer, DA layer and softmax baseline (docs/design.md §2–3)."""

from fluidlm.model.config import ModelConfig, PDEConfig
from fluidlm.model.fluid import FluidBlock, FluidLM

__all__ = ["FluidBlock", "FluidLM", "ModelConfig", "PDEConfig"]
