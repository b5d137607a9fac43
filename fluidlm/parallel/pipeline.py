"""Pipeline parallelism with DeepSpeed's `PipelineModule` (1F1B), docs/design.md §4.

The stages are cut from the FluidLM itself: every pipeline layer holds the model's own modules (the
same parameter objects, under the same names as in the flat model minus the block index), so no
second implementation of a block, a norm or the loss exists:

    embed (tied) → pde → blocks[0] … blocks[L-1] → norm → embed as LM head (tied)

- Every pipeline layer takes and returns `(activations, document starts)`. The starts travel as a
  (B, N) bool tensor rather than `cu_seqlens`: DeepSpeed fixes the shapes of inter-stage tensors
  after the first micro-batch, and the number of documents changes from batch to batch.
- The embedding and the LM head are one `TiedLayerSpec`: the first and the last stage each hold it
  and DeepSpeed all-reduces their gradients. The last stage returns (hidden, tied weight); the loss
  runs the LM head in chunks (`chunked_cross_entropy`), vocabulary-parallel under TP, so no stage
  materialises N × vocabulary logits.
- The PDE layer is on the first stage; blocks are balanced across stages (`type:BlockStage`).
- Activation checkpointing inside stages uses torch's non-reentrant checkpoint, which saves and
  restores the RNG state itself: one RNG mechanism for recompute everywhere.
- Every process builds the whole FluidLM (from the seed, as every layout does) and its stage keeps
  the modules it runs; the others are never moved to the device.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fluidlm.model.fluid import FluidLM, chunked_cross_entropy


_LAST_STARTS: tuple = (None, None)  # (weakref of the starts tensor, its cu_seqlens)


def cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(B, N) bool document starts (every row's position 0 included) → cu_seqlens [0, …, B·N] over the
    flattened tokens. `nonzero` synchronises with a device, so the result for the last starts tensor is
    kept: the layers of one pipeline stage pass the same tensor along and pay one sync per micro-batch."""
    global _LAST_STARTS
    ref, cu = _LAST_STARTS
    if ref is not None and ref() is starts:
        return cu
    positions = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat([positions, positions.new_tensor([starts.numel()])]).to(torch.int64)
    _LAST_STARTS = (weakref.ref(starts), cu)
    return cu


class _Stage(nn.Module):
    """A pipeline layer holding some of the model's modules under their own names."""

    def __init__(self, **modules: nn.Module):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


class EmbeddingStage(_Stage):
    def __init__(self, model: FluidLM):
        super().__init__(embed=model.embed)

    def forward(self, inputs):
        tokens, starts = inputs
        return self.embed(tokens), starts


def lm_head(stage: EmbeddingStage, inputs):
    """The tied embedding's second use, on the last stage: hand the loss its weight."""
    hidden, _starts = inputs
    return hidden, stage.embed.weight


class PDEStage(_Stage):
    def __init__(self, model: FluidLM):
        super().__init__(pde=model.pde)

    def forward(self, inputs):
        x, starts = inputs
        return self.pde(x, cu_seqlens_from_starts(starts)), starts


class BlockStage(_Stage):
    """`model.blocks[index]`: its children are this layer's (names `attn.*`, `ffn.*`, …)."""

    def __init__(self, model: FluidLM, index: int):
        super().__init__(**dict(model.blocks[index].named_children()))
        object.__setattr__(self, "block", model.blocks[index])  # its forward, not a second registration

    def forward(self, inputs):
        x, starts = inputs
        return self.block(x, cu_seqlens_from_starts(starts)), starts


class NormStage(_Stage):
    def __init__(self, model: FluidLM):
        super().__init__(norm=model.norm)

    def forward(self, inputs):
        x, starts = inputs
        return self.norm(x), starts


class PipelineLoss:
    def __init__(self, layers, chunk_tokens: int, scored_only: bool = False):
        self.layers, self.chunk_tokens, self.scored_only = layers, chunk_tokens, scored_only

    def __call__(self, outputs, targets):
        hidden, weight = outputs
        return chunked_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), self.chunk_tokens, "mean",
                                     self.layers, self.scored_only)


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def stage_specs(model: FluidLM) -> list:
    """DeepSpeed layer specs of the model, in order (each builds a layer holding the model's modules)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = [TiedLayerSpec("embed", EmbeddingStage, model, tied_weight_attr="embed.weight")]
    if model.pde is not None:
        specs.append(LayerSpec(PDEStage, model))
    specs += [LayerSpec(BlockStage, model, i) for i in range(len(model.blocks))]
    specs += [LayerSpec(NormStage, model),
              TiedLayerSpec("embed", EmbeddingStage, model, forward_fn=lm_head, tied_weight_attr="embed.weight")]
    return specs


def pipeline_module(model: FluidLM, topology, *, chunk_tokens: int, activation_checkpointing: bool,
                    scored_only: bool = False):
    """This process's stage of `model` as a DeepSpeed PipelineModule."""
    from deepspeed.pipe import PipelineModule

    return PipelineModule(
        layers=stage_specs(model), topology=topology, loss_fn=PipelineLoss(model.parallel, chunk_tokens, scored_only),
        partition_method="type:BlockStage",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=_checkpoint, checkpointable_layers=["BlockStage"],
    )
