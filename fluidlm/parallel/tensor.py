"""Tensor parallelism with megatron-core layers (docs/design.md §4).

`TensorParallelLayers` is the twin of `DenseLayers`: the same methods, returning megatron-core's
ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding (which work on CPU with gloo
given `use_cpu_initialization=True`). A column split keeps whole heads per rank because the fused
QKV is laid out (head, q|k|v, head_dim); λ's ρ and the flow encoder's Δ rows are split with the
heads, and so are the optional per-head parameters of the DA variants (the q|k|v conv's taps, the
per-head output RMSNorm's weights; the output gate is a column-parallel linear); the FFN hidden size
and the vocabulary are split too. Everything else (the block norms, the PDE layer, the flow conv) is
replicated: its gradients come out of all-reduced activations, so it stays bit-identical on every TP
rank without extra communication.

Every TP-sliced parameter carries megatron's attributes (`tensor_model_parallel`,
`partition_dim`): they tell DeepSpeed's gradient-norm code not to double count replicated
parameters, and they are the model's declaration of how to cut or glue its checkpoints
(`sliced_parameters`, `shard_state_dict`, `gather_state_dict`).

Initialisation: a TP model takes the weights of the dense model built from the same seed
(`shard_state_dict`), so one seed gives one model whatever the layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fluidlm.model.layers import DenseLayers


def _column_class():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        """megatron-core's column-parallel linear returning just the output (bias added)."""

        def forward(self, x):
            return super().forward(x)[0]

    return ColumnLinear


def _row_class():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowLinear(RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return RowLinear


class TensorParallelLayers(DenseLayers):
    """Layers for this rank of the tensor-parallel group (megatron-core's parallel_state must be initialised)."""

    def __init__(self):
        from megatron.core import ModelParallelConfig
        from megatron.core import parallel_state as ps

        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.group = ps.get_tensor_model_parallel_group()
        self.mp_config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                             perform_initialization=False)

    def column_linear(self, in_features, out_features, *, bias=False, init_std):
        layer = _column_class()(in_features, out_features, config=self.mp_config, init_method=_no_init, bias=bias,
                                gather_output=False, skip_bias_add=False)
        _mark_sliced(layer.weight, 0)
        if bias:
            _mark_sliced(layer.bias, 0)
        return layer

    def row_linear(self, in_features, out_features, *, bias=False, init_std):
        layer = _row_class()(in_features, out_features, config=self.mp_config, init_method=_no_init, bias=bias,
                             input_is_parallel=True, skip_bias_add=False)
        _mark_sliced(layer.weight, 1)  # a row-parallel bias is added after the all-reduce: replicated
        return layer

    def embedding(self, num_embeddings, dim, *, init_std):
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        layer = VocabParallelEmbedding(num_embeddings, dim, init_method=_no_init, config=self.mp_config)
        _mark_sliced(layer.weight, 0)
        return layer

    def sliced_parameter(self, full: torch.Tensor, dim: int = 0) -> nn.Parameter:
        return _mark_sliced(super().sliced_parameter(full, dim), dim)

    def lm_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(_copy_to_tp(hidden, self.group), weight)

    def token_nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits.float()[None], targets[None])[0]


def _mark_sliced(param: nn.Parameter, dim: int) -> nn.Parameter:
    # megatron's attributes (its layers set them only when they initialise the weights themselves)
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            delattr(param, attr)
    set_tensor_model_parallel_attributes(param, True, dim, 1)
    return param


def _no_init(weight):  # weights come from the dense model (shard_state_dict)
    return weight


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (megatron's f operator)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _copy_to_tp(x, group):
    return _CopyToTensorParallel.apply(x, group)


# --- how the model is cut -------------------------------------------------------------------

def sliced_parameters(model: nn.Module) -> dict[str, int]:
    """{parameter name: the dimension it is split along across TP ranks} for a TP model."""
    return {name: int(p.partition_dim) for name, p in model.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module, tp_rank: int, tp_size: int) -> dict:
    """A dense state dict cut for `model` (this TP rank's shapes)."""
    sliced = sliced_parameters(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("._extra_state"):
            continue
        source = full[name]
        if name in sliced:
            source = source.chunk(tp_size, dim=sliced[name])[tp_rank]
        if source.shape != tensor.shape:
            raise ValueError(f"{name}: dense shape {tuple(full[name].shape)} does not cut into {tuple(tensor.shape)} "
                             f"at TP={tp_size}")
        out[name] = source.clone()
    return out


def gather_state_dict(model: nn.Module, group) -> dict[str, torch.Tensor]:
    """The dense state dict of a TP model (all TP ranks call it; every rank gets the result)."""
    sliced = sliced_parameters(model)
    size = dist.get_world_size(group)
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("._extra_state"):
            continue
        if name in sliced and size > 1:
            parts = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=sliced[name])
        out[name] = tensor.detach().clone()
    return out
