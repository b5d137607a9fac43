"""The Fluid Transformer (docs/design.md §3):

    embed → PDE diffusion → L × FluidBlock → RMSNorm → LM head (tied to embed)
    FluidBlock(x): x = x + DA(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))

`attention="softmax"` swaps DA for SDPA + RoPE and changes nothing else: that is the baseline.
Plain PyTorch: `fluidlm/parallel/parallelize.py` applies every kind of parallelism from outside
(the layer factory for TP, a CP context on the DA and PDE layers, the pipeline cut from these
modules). Inputs are (B, N) rows; `cu_seqlens` packs documents along the flattened B·N tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fluidlm.model.attention import DifferentialAttentionLayer, SoftmaxAttentionLayer, StreamCache
from fluidlm.model.config import ModelConfig
from fluidlm.model.layers import DenseLayers
from fluidlm.model.pde import PDEDiffusion


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, layers, init_std: float, out_init_std: float):
        super().__init__()
        self.gate = layers.column_linear(d_model, hidden, init_std=init_std)
        self.up = layers.column_linear(d_model, hidden, init_std=init_std)
        self.down = layers.row_linear(hidden, d_model, init_std=out_init_std)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FluidBlock(nn.Module):
    def __init__(self, config: ModelConfig, layers):
        super().__init__()
        out_init_std = config.init_std / math.sqrt(2 * config.n_layers)  # GPT-2: residual writers shrink
        attention = DifferentialAttentionLayer if config.attention == "da" else SoftmaxAttentionLayer
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = attention(config, layers, out_init_std)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_size, layers, config.init_std, out_init_std)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: StreamCache | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cu_seqlens, cache))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class FluidLM(nn.Module):
    def __init__(self, config: ModelConfig, layers=None):
        super().__init__()
        layers = layers or DenseLayers()
        config.check_tensor_parallel(layers.tp_size)
        self.config = config
        self.parallel = layers  # the LM head and its loss are vocabulary-parallel under TP
        self.embed = layers.embedding(config.vocab_size, config.d_model, init_std=config.init_std)
        p = config.pde
        self.pde = (
            PDEDiffusion(config.d_model, p.scales, p.steps, config.causal, p.theta_init, layers, config.init_std)
            if p.enabled else None
        )
        self.blocks = nn.ModuleList(FluidBlock(config, layers) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        # Recompute each block in backward instead of storing its activations (long contexts).
        self.activation_checkpointing = False

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None, device="cpu") -> "FluidLM":
        """The dense model (eval mode) of a folder written by `fluidlm export`: config.json (the model
        config at its top level) and model.safetensors (read without pickle; bf16 weights are upcast
        into the fp32 model unless `dtype` is given). Needs safetensors (pip install 'fluidlm[export]').
        The loading lives here, not in fluidlm.export, so the model package imports nothing above it;
        fluidlm.export.from_pretrained wraps it with the export's error messages."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        path = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: no {name} (not a folder written by `fluidlm export`)")
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "fluidlm":
            raise ValueError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, not 'fluidlm'")
        model = cls(ModelConfig.model_validate({k: v for k, v in config.items() if k in ModelConfig.model_fields}))
        model.load_state_dict(load_file(str(path / "model.safetensors")))  # strict: every name, every shape
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device).eval()

    def hidden_states(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, N, d_model), before the LM head."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be a 2-D integer tensor (B, N), got {tuple(tokens.shape)} {tokens.dtype}")
        x = self.embed(tokens)
        if self.pde is not None:
            x = self.pde(x, cu_seqlens)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cu_seqlens, use_reentrant=False)
            else:
                x = block(x, cu_seqlens)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, N, vocab) — the local vocabulary shard under tensor parallelism."""
        return self.parallel.lm_logits(self.hidden_states(tokens, cu_seqlens), self.embed.weight)

    def forward_stream(self, tokens: torch.Tensor, state: dict | None = None):
        """Logits of one window of longer rows, carrying what earlier windows left behind in `state`
        (updated in place and returned): per block a `StreamCache` (DA: its state and the flow conv's
        last inputs, O(1) in the length; softmax: the KV cache) and the PDE layer's past neighbours.
        The logits equal the full-context forward's. Causal models only.

            state = None
            for window in windows:
                logits, state = model.forward_stream(window, state)
        """
        if not self.config.causal:
            raise ValueError("streaming needs a causal model (direction='causal')")
        if state is None:
            state = {"pde": None, "blocks": [StreamCache() for _ in self.blocks]}
        x = self.embed(tokens)
        if self.pde is not None:
            x, state["pde"] = self.pde.forward_stream(x, state["pde"])
        for block, cache in zip(self.blocks, state["blocks"]):
            x = block(x, None, cache)
        return self.parallel.lm_logits(self.norm(x), self.embed.weight), state

    def loss(self, tokens, targets, cu_seqlens=None, *, chunk_tokens: int = 8192, reduction: str = "mean",
             scored_only: bool | None = None):
        """Cross-entropy of `targets` (B, N; -100 = ignore) without materialising all logits:
        the head and the loss run over chunks of tokens, each recomputed in backward. `scored_only`:
        see `chunked_cross_entropy`."""
        hidden = self.hidden_states(tokens, cu_seqlens).flatten(0, 1)
        return chunked_cross_entropy(hidden, self.embed.weight, targets.flatten(), chunk_tokens, reduction, self.parallel,
                                     scored_only)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def chunked_cross_entropy(hidden, weight, targets, chunk_tokens: int, reduction: str = "mean", layers=None,
                          scored_only: bool | None = None):
    """Σ or mean of CE over tokens; peak memory holds one chunk of logits, not N × vocab.
    `layers` (the model's layer factory) computes each chunk's loss: vocabulary-parallel under TP.
    `scored_only=True` sends only the scored rows (targets != -100) through the head (masked LM:
    15 % of them; selecting them costs one host sync); False runs every row and masks the loss (no
    sync); None picks by looking at the targets (a host sync; training passes it explicitly)."""
    loss_sum = (layers or DenseLayers()).lm_loss_sum
    scored = targets != -100
    if scored_only is None:
        scored_only = not bool(scored.all())
    if scored_only:
        hidden, targets = hidden[scored], targets[scored]
    # A zero that is still a function of the weights: a rank (or CP shard) with no scored token
    # must run the same backward (and gradient all-reduce) as the others.
    total = (hidden.sum() + weight.sum()).float() * 0.0 if hidden.requires_grad or weight.requires_grad \
        else hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(loss_sum, hidden[sl], weight, targets[sl], use_reentrant=False)
        else:
            total = total + loss_sum(hidden[sl], weight, targets[sl])
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (targets != -100).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
