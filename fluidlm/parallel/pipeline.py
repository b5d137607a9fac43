"""Pipeline parallelism with DeepSpeed's `PipelineModule` (1F1B), docs/design.md §3–4.

The model as a flat list of layer specs, every layer taking and returning the tuple
`(activations, document starts)`:

    TokenEmbedding (tied) → PDEStage → n_layers × BlockStage → FinalNorm → TokenEmbedding as LM head (tied)

- The document starts travel as a (B, N) bool tensor rather than `cu_seqlens`: DeepSpeed fixes
  the shapes of inter-stage tensors after the first micro-batch, and the number of documents
  changes from batch to batch. Each layer derives `cu_seqlens` from it.
- The embedding and the LM head are one `TiedLayerSpec`: the first and the last stage each hold
  a copy and DeepSpeed all-reduces their gradients. The last stage returns (hidden, tied weight);
  the loss function runs the LM head in chunks (`chunked_cross_entropy`), vocabulary-parallel
  under TP, so no stage materialises N × vocabulary logits.
- The PDE layer is on the first stage; blocks are balanced across stages (`type:BlockStage`).
- Activation checkpointing inside stages uses torch's non-reentrant checkpoint, which saves and
  restores the RNG state itself: one RNG mechanism for recompute everywhere (no second tracker to
  fall out of step with megatron-core's).
- Weights are cut from the dense model of the same seed (`load_dense`), so every layout starts
  from the same model; each pipeline layer knows its dense prefix.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fluidlm.model.config import ModelConfig
from fluidlm.model.fluid import FluidBlock, chunked_cross_entropy
from fluidlm.model.pde import PDEDiffusion
from fluidlm.parallel.tensor import shard_state_dict


def cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(1, N) bool document starts (position 0 included) → cu_seqlens [0, …, N]."""
    positions = starts.reshape(-1).nonzero().flatten()
    return torch.cat([positions, positions.new_tensor([starts.numel()])]).to(torch.int64)


class TokenEmbedding(nn.Module):
    dense_prefix = ""  # holds `embed.weight`, as the dense model does

    def __init__(self, config: ModelConfig, layers):
        super().__init__()
        self.embed = layers.embedding(config.vocab_size, config.d_model, init_std=config.init_std)

    def forward(self, inputs):
        tokens, starts = inputs
        return self.embed(tokens), starts


def lm_head(module: TokenEmbedding, inputs):
    """The tied embedding's second use, on the last stage: hand the loss its weight."""
    hidden, _starts = inputs
    return hidden, module.embed.weight


class PDEStage(nn.Module):
    dense_prefix = ""  # holds `pde.*`

    def __init__(self, config: ModelConfig, layers):
        super().__init__()
        p = config.pde
        self.pde = PDEDiffusion(config.d_model, p.scales, p.steps, config.causal, p.theta_init, layers, config.init_std)

    def forward(self, inputs):
        x, starts = inputs
        return self.pde(x, cu_seqlens_from_starts(starts)), starts


class BlockStage(FluidBlock):
    def __init__(self, config: ModelConfig, layers, index: int):
        super().__init__(config, layers)
        self.dense_prefix = f"blocks.{index}."

    def forward(self, inputs):
        x, starts = inputs
        return super().forward(x, cu_seqlens_from_starts(starts)), starts


class FinalNorm(nn.Module):
    dense_prefix = ""  # holds `norm.weight`

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)

    def forward(self, inputs):
        x, starts = inputs
        return self.norm(x), starts


class PipelineLoss:
    def __init__(self, layers, chunk_tokens: int):
        self.layers, self.chunk_tokens = layers, chunk_tokens

    def __call__(self, outputs, targets):
        hidden, weight = outputs
        return chunked_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), self.chunk_tokens, "mean",
                                     self.layers)


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def build_pipeline(config: ModelConfig, layers, topology, *, chunk_tokens: int, activation_checkpointing: bool):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    specs = [TiedLayerSpec("embed", TokenEmbedding, config, layers, tied_weight_attr="embed.weight")]
    if config.pde.enabled:
        specs.append(LayerSpec(PDEStage, config, layers))
    specs += [LayerSpec(BlockStage, config, layers, i) for i in range(config.n_layers)]
    specs += [LayerSpec(FinalNorm, config),
              TiedLayerSpec("embed", TokenEmbedding, config, layers, forward_fn=lm_head, tied_weight_attr="embed.weight")]
    return PipelineModule(
        layers=specs, topology=topology, loss_fn=PipelineLoss(layers, chunk_tokens),
        partition_method="type:BlockStage",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=_checkpoint, checkpointable_layers=["BlockStage"],
    )


def load_dense(pipe: nn.Module, dense_state: dict, tp_rank: int, tp_size: int) -> None:
    """Give every layer of this stage its weights from the dense model's state dict."""
    for module in pipe.modules():
        prefix = getattr(module, "dense_prefix", None)
        if prefix is None:
            continue
        sub = {k[len(prefix):]: v for k, v in dense_state.items() if k.startswith(prefix)}
        module.load_state_dict(shard_state_dict(sub, module, tp_rank, tp_size), strict=False)
