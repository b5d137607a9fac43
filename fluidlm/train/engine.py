"""This rank's model: the dense FluidLM, or its share of a TP / PP / CP layout, and the loss module
DeepSpeed wraps.

    dist_info = init_distributed(config)      # fluidlm/train/distributed.py
    model, num_params = build_model(config, dist_info)
    engine = build_engine(config, model, dist_info)   # fluidlm/train/deepspeed_setup.py
"""

from __future__ import annotations

import torch
from torch import nn

from fluidlm.parallel.layers import DenseLayers
from fluidlm.train.config import Config
from fluidlm.train.distributed import DistInfo, seed_everything


def build_model(config: Config, dist_info: DistInfo) -> tuple[nn.Module, int]:
    """This rank's model and the whole model's parameter count. Every layout cuts its share from
    the dense model built from the seed: one seed, one model, whatever the layout. PP > 1 gives a
    DeepSpeed PipelineModule (this stage's layers), TP > 1 megatron-core layers."""
    from fluidlm.model import FluidLM

    seed_everything(config.train.seed)
    model = FluidLM(config.model)
    num_params = model.num_parameters()
    layout = dist_info.layout
    if not dist_info.model_parallel:
        model.activation_checkpointing = config.train.activation_checkpointing
        return LossModule(model, config.train.loss_chunk_tokens), num_params
    from fluidlm.parallel.tensor import TensorParallelLayers, shard_state_dict

    layers = TensorParallelLayers() if layout.tp > 1 else DenseLayers()
    dense_state = model.state_dict()
    if layout.pp > 1:
        from fluidlm.parallel.pipeline import build_pipeline, load_dense

        pipe = build_pipeline(config.model, layers, dist_info.topology, chunk_tokens=config.train.loss_chunk_tokens,
                              activation_checkpointing=config.train.activation_checkpointing)
        load_dense(pipe, dense_state, layers.tp_rank, layers.tp_size)
        return pipe, num_params
    sharded = FluidLM(config.model, layers)
    sharded.load_state_dict(shard_state_dict(dense_state, sharded, layers.tp_rank, layers.tp_size),
                            strict=False)  # strict=False: megatron's `_extra_state` entries
    sharded.activation_checkpointing = config.train.activation_checkpointing
    cp_group = None
    if layout.cp > 1:
        from megatron.core import parallel_state as ps

        from fluidlm.parallel.context import apply_context_parallel

        cp_group = ps.get_context_parallel_group()
        apply_context_parallel(sharded, cp_group)
    return LossModule(sharded, config.train.loss_chunk_tokens, cp_group), num_params


class LossModule(nn.Module):
    """What DeepSpeed wraps: forward returns the mean loss over the scored targets (the next
    tokens, or the masked positions for masked_lm; -100 = unscored). The FluidLM is `.model`
    (checkpoint keys are therefore prefixed with `model.`).

    Under context parallelism each rank holds a shard of the tokens: it returns
    cp × (its loss sum) / (the CP group's token count), so that DeepSpeed's gradient average over
    its data-parallel group (DP × CP ranks) sums the CP shares and averages the DP replicas."""

    def __init__(self, model: nn.Module, chunk_tokens: int, cp_group=None):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.cp_group = cp_group

    def forward(self, tokens, targets, cu_seqlens=None):
        if self.cp_group is None:
            return self.model.loss(tokens, targets, cu_seqlens, chunk_tokens=self.chunk_tokens)
        import torch.distributed as dist

        loss_sum = self.model.loss(tokens, targets, cu_seqlens, chunk_tokens=self.chunk_tokens, reduction="sum")
        count = (targets != -100).sum().to(torch.float64)
        dist.all_reduce(count, group=self.cp_group)
        return loss_sum * dist.get_world_size(self.cp_group) / count.clamp(min=1).to(loss_sum.dtype)
