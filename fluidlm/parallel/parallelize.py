"""The one place parallelism is applied (torchtitan's pattern: the model is plain PyTorch).

    module = parallelize(model, layout, train)   # what DeepSpeed wraps

`model` is the dense FluidLM built from the seed on every rank (one seed, one model, whatever the
layout). In order, for `layout` (world = PP × DP × CP × TP, megatron-core's groups initialised):

1. Tensor parallelism: the same FluidLM rebuilt with megatron-core's column/row/vocab-parallel layers
   (the layer factory `TensorParallelLayers`), its weights cut from the dense model's.
2. Context parallelism: a CP context on the DA layers, their flow encoders and the PDE layer; they
   then run on this rank's shard of every sequence (halos, the DA op with the shard's incoming state).
3. Activation checkpointing: each block recomputed in backward (inside pipeline stages: DeepSpeed's
   interval, with torch's non-reentrant checkpoint).
4. Pipeline parallelism: this rank's stage of the model as a DeepSpeed PipelineModule, cut from the
   model's own modules; otherwise the model wrapped with its loss (`LossModule`).

Data parallelism (DP and ZeRO) is DeepSpeed's, configured in fluidlm/train.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fluidlm.model import FluidLM
from fluidlm.parallel.context import apply_context_parallel
from fluidlm.parallel.topology import Layout


def parallelize(model: FluidLM, layout: Layout, train, topology=None) -> nn.Module:
    """What DeepSpeed wraps for `layout`: a PipelineModule (PP > 1) or a `LossModule`. `train` is the
    training config (`activation_checkpointing`, `loss_chunk_tokens`); `topology` DeepSpeed's
    PipeModelDataParallelTopology, needed for PP > 1."""
    cp_group = None
    if layout.tp > 1:
        model = tensor_parallel(model)
    if layout.cp > 1:
        from megatron.core import parallel_state as ps

        cp_group = ps.get_context_parallel_group()
        context_parallel(model, cp_group)
    model.activation_checkpointing = train.activation_checkpointing
    if layout.pp > 1:
        from fluidlm.parallel.pipeline import pipeline_module

        return pipeline_module(model, topology, chunk_tokens=train.loss_chunk_tokens,
                               activation_checkpointing=train.activation_checkpointing,
                               scored_only=train.objective == "masked_lm")
    return LossModule(model, train.loss_chunk_tokens, cp_group, scored_only=train.objective == "masked_lm")


def context_parallel(model: FluidLM, group) -> FluidLM:
    """CP on `model` in place (what `parallelize` does for layout.cp > 1; eval's --cp): it then runs
    on this rank's shard of every sequence, given the GLOBAL cu_seqlens."""
    apply_context_parallel(model, group)
    return model


def tensor_parallel(model: FluidLM) -> FluidLM:
    """The TP version of a dense FluidLM (megatron-core's TP group must exist): this rank's heads,
    FFN units and vocabulary rows, cut from the dense weights, on the dense model's device."""
    from fluidlm.parallel.tensor import TensorParallelLayers, shard_state_dict

    layers = TensorParallelLayers()
    sharded = FluidLM(model.config, layers).to(next(model.parameters()).device)
    sharded.load_state_dict(shard_state_dict(model.state_dict(), sharded, layers.tp_rank, layers.tp_size),
                            strict=False)  # strict=False: megatron's `_extra_state` entries
    return sharded.train(model.training)


class LossModule(nn.Module):
    """What DeepSpeed wraps without a pipeline: forward returns the mean loss over the scored targets
    (the next tokens, or the masked positions for masked_lm; -100 = unscored). The FluidLM is
    `.model` (checkpoint keys are therefore prefixed with `model.`).

    Under context parallelism each rank holds a shard of the tokens: it returns
    cp × (its loss sum) / (the CP group's token count), so that DeepSpeed's gradient average over
    its data-parallel group (DP × CP ranks) sums the CP shares and averages the DP replicas."""

    def __init__(self, model: nn.Module, chunk_tokens: int, cp_group=None, scored_only: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.cp_group = cp_group
        self.scored_only = scored_only  # masked LM: only the scored rows through the LM head

    def forward(self, tokens, targets, cu_seqlens=None):
        kw = dict(chunk_tokens=self.chunk_tokens, scored_only=self.scored_only)
        if self.cp_group is None:
            return self.model.loss(tokens, targets, cu_seqlens, **kw)
        loss_sum = self.model.loss(tokens, targets, cu_seqlens, reduction="sum", **kw)
        count = (targets != -100).sum().to(torch.float64)
        dist.all_reduce(count, group=self.cp_group)
        return loss_sum * dist.get_world_size(self.cp_group) / count.clamp(min=1).to(loss_sum.dtype)
