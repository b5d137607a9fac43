"""The attention layers of a FluidBlock: Differential Attention and the softmax baseline.

Both take (B, N, d_model) with optional `cu_seqlens` (documents packed along the flattened B·N
tokens, every row boundary a document boundary) and get their projections from the layer factory
(fluidlm/model/layers.py), so under tensor parallelism each rank holds whole heads.

One code path serves training, streaming evaluation, generation and context parallelism:
- `cache` (a `StreamCache`, updated in place) carries what a causal layer needs from earlier windows
  of the same rows: the DA state and the flow encoder's last inputs, or the softmax KV cache;
- `context_parallel` (None here; `fluidlm.parallel` hands a CP context to the DA layer and its flow
  encoder) makes the layer run on this rank's shard of the sequence: halos for the flow conv, the
  DA op with the shard's incoming state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fluidlm.kernels import DAState, differential_attention
from fluidlm.model.config import ModelConfig

FLOW_CONV_WIDTH = 4
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1  <=>  x = log(e - 1)


@dataclass
class StreamCache:
    """What one attention layer keeps between consecutive windows of the same rows (in place).

    DA: `flow_inputs` (B, FLOW_CONV_WIDTH-1, d_model), the last inputs the flow conv reads back, and
    `da`, the recurrent state per row (O(d·dv) per head whatever the length). Softmax: `keys` (after
    RoPE) and `values`, (B, H, T, head_dim), the KV cache."""

    flow_inputs: torch.Tensor | None = None
    da: DAState | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens seen so far (softmax: the next token's RoPE position)."""
        return 0 if self.keys is None else self.keys.shape[2]


def per_token_documents(b: int, n: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(document index, position in its document) of every token, each (B, N). Without `cu_seqlens`
    each row is one document; with it, documents are packed along the flattened B·N tokens."""
    flat = torch.arange(b * n, device=device)
    if cu_seqlens is None:
        cu = torch.arange(b + 1, device=device) * n
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cu, flat, right=True) - 1
    return doc.view(b, n), (flat - cu[doc]).view(b, n)


def initial_rho(n_heads: int, max_seq_len: int) -> torch.Tensor:
    """ρ such that λ = softplus(ρ) gives half-lives ln2/λ log-spaced from 1 token to max_seq_len."""
    half_lives = torch.logspace(0.0, math.log10(max(max_seq_len, 1)), n_heads, dtype=torch.float64)
    rate = math.log(2.0) / half_lives
    return torch.log(torch.expm1(rate)).float()


class FlowEncoder(nn.Module):
    """Δ_{t,h} = softplus(W · causal_depthwise_conv4(x)_t + b)_h, with b set so that Δ ≈ 1 at init.

    The conv never reads across a document start (taps before it are dropped)."""

    def __init__(self, d_model: int, n_heads: int, layers, init_std: float):
        super().__init__()
        self.conv_weight = nn.Parameter(torch.zeros(d_model, FLOW_CONV_WIDTH))
        with torch.no_grad():
            self.conv_weight[:, 0] = 1.0  # start as the identity tap; learned from there
        self.proj = layers.column_linear(d_model, n_heads, bias=True, init_std=init_std)
        with torch.no_grad():
            self.proj.bias.fill_(SOFTPLUS_INV_ONE)
        self.context_parallel = None

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: StreamCache | None = None) -> torch.Tensor:
        n = x.shape[1]
        if self.context_parallel is not None:  # this rank's shard, with the previous rank's last tokens
            window, window_cu, offset = self.context_parallel.halo(x, FLOW_CONV_WIDTH - 1, 0, cu_seqlens)
            return self._delta(window, window_cu)[:, offset:offset + n]
        if cache is not None:  # the inputs of earlier windows of the same rows
            prefix = x[:, :0] if cache.flow_inputs is None else cache.flow_inputs
            window = torch.cat([prefix, x], dim=1)
            cache.flow_inputs = window[:, -(FLOW_CONV_WIDTH - 1):]
            return self._delta(window, None)[:, -n:]
        return self._delta(x, cu_seqlens)

    def _delta(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        _, offset_in_doc = per_token_documents(b, n, cu_seqlens, x.device)
        mixed = x * self.conv_weight[:, 0]
        for tap in range(1, FLOW_CONV_WIDTH):
            shifted = F.pad(x, (0, 0, tap, 0))[:, :n]
            mixed = mixed + shifted * self.conv_weight[:, tap] * (offset_in_doc >= tap)[..., None].to(x.dtype)
        return F.softplus(self.proj(mixed))  # (B, N, H_local)


class DifferentialAttentionLayer(nn.Module):
    def __init__(self, config: ModelConfig, layers, out_init_std: float):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads // layers.tp_size  # heads on this TP rank
        self.head_dim = config.head_dim
        inner = config.n_heads * config.head_dim
        # Fused QKV laid out (head, q|k|v, head_dim) so a column split keeps whole heads per rank.
        self.qkv = layers.column_linear(config.d_model, 3 * inner, init_std=config.init_std)
        self.flow = FlowEncoder(config.d_model, config.n_heads, layers, config.init_std)
        self.rho = layers.sliced_parameter(initial_rho(config.n_heads, config.max_seq_len), dim=0)  # this rank's heads
        self.out = layers.row_linear(inner, config.d_model, init_std=out_init_std)
        self.context_parallel = None

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: StreamCache | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        c = self.config
        if cache is not None and (not c.causal or cu_seqlens is not None):
            raise ValueError("streaming (a cache) needs the causal direction and whole rows (no cu_seqlens)")
        q, k, v = self.qkv(x).view(b, n, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        g = -(self.flow(x, cu_seqlens, cache) * F.softplus(self.rho)).transpose(1, 2)  # (B, H, N), ≤ 0
        op = dict(causal=c.causal, feature_map=c.feature_map, eps=c.da_eps, backend=c.da_backend,
                  chunk_size=c.chunk_size)
        if self.context_parallel is not None:
            o = self.context_parallel.differential_attention(q, k, v, g, cu_seqlens=cu_seqlens, **op)
        elif cache is not None:
            o, cache.da = differential_attention(q, k, v, g, initial_state=cache.da, output_final_state=True, **op)
        else:
            o = differential_attention(q, k, v, g, cu_seqlens=cu_seqlens, **op)
        return self.out(o.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


def rotary(x: torch.Tensor, theta: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE (rotate-half convention) on (B, H, N, d) at `positions` ((N,) or (B, N); default 0..N-1)."""
    n, d = x.shape[-2], x.shape[-1]
    if positions is None:
        positions = torch.arange(n, device=x.device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (N, d/2) or (B, N, d/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # broadcast over heads
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SoftmaxAttentionLayer(nn.Module):
    """The baseline: same fused QKV and output projection, SDPA with RoPE. Packed documents are a
    block-diagonal mask with positions restarting at 0 in each document (the same as running each
    document alone); `cache` is a KV cache for causal streaming and generation."""

    def __init__(self, config: ModelConfig, layers, out_init_std: float):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads // layers.tp_size
        self.head_dim = config.head_dim
        inner = config.n_heads * config.head_dim
        self.qkv = layers.column_linear(config.d_model, 3 * inner, init_std=config.init_std)
        self.out = layers.row_linear(inner, config.d_model, init_std=out_init_std)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: StreamCache | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        theta, causal = self.config.rope_theta, self.config.causal
        q, k, v = self.qkv(x).view(b, n, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        if cache is not None:
            if not causal or cu_seqlens is not None:
                raise ValueError("a KV cache needs the causal direction and whole rows (no cu_seqlens)")
            start = cache.length
            positions = torch.arange(start, start + n, device=x.device)
            q, k = rotary(q, theta, positions), rotary(k, theta, positions)
            if cache.keys is not None:
                k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k, v
            visible = torch.arange(start + n, device=x.device)[None, :] <= positions[:, None]  # (n, start + n)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        elif cu_seqlens is None:
            o = F.scaled_dot_product_attention(rotary(q, theta), rotary(k, theta), v, is_causal=causal)
        else:
            doc, positions = per_token_documents(b, n, cu_seqlens, x.device)
            visible = doc[:, None, :, None] == doc[:, None, None, :]  # (B, 1, N, N): same document
            if causal:
                visible = visible & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            o = F.scaled_dot_product_attention(rotary(q, theta, positions), rotary(k, theta, positions), v,
                                               attn_mask=visible)
        return self.out(o.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))
