"""FluidLM: distributed training of long-context Fluid Transformers."""

__version__ = "0.1.0"
