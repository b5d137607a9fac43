"""The attention layers of a FluidBlock: Differential Attention and the softmax baseline.

Both take (B, N, d_model) and `cu_seqlens`, and get their projections from the layer factory
(fluidlm.parallel.layers), so under tensor parallelism each rank holds whole heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fluidlm.kernels import differential_attention
from fluidlm.kernels.chunked import chunked_differential_attention
from fluidlm.model.config import ModelConfig

FLOW_CONV_WIDTH = 4
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1  <=>  x = log(e - 1)


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

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[1]
        positions = torch.arange(n, device=x.device)
        if cu_seqlens is None:
            offset_in_doc = positions
        else:
            cu = cu_seqlens.to(device=x.device, dtype=torch.long)
            offset_in_doc = positions - cu[torch.searchsorted(cu, positions, right=True) - 1]
        mixed = x * self.conv_weight[:, 0]
        for tap in range(1, FLOW_CONV_WIDTH):
            shifted = F.pad(x, (0, 0, tap, 0))[:, :n]
            mixed = mixed + shifted * self.conv_weight[:, tap] * (offset_in_doc >= tap)[:, None].to(x.dtype)
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

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        rate = F.softplus(self.rho)  # λ_h
        g = -(self.flow(x, cu_seqlens) * rate).transpose(1, 2)  # (B, H, N), ≤ 0
        c = self.config
        o = differential_attention(
            q, k, v, g, causal=c.causal, feature_map=c.feature_map, eps=c.da_eps, backend=c.da_backend,
            cu_seqlens=cu_seqlens, chunk_size=c.chunk_size,
        )
        return self.out(o.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))

    def forward_stream(self, x: torch.Tensor, state=None):
        """Causal streaming over consecutive windows of one sequence: returns (out, state), where
        state = (the last FLOW_CONV_WIDTH-1 inputs, the DA state (B, H, d, dv+1))."""
        if not self.config.causal:
            raise ValueError("streaming needs the causal direction")
        prefix, da_state = (x[:, :0], None) if state is None else state
        b, n, _ = x.shape
        window = torch.cat([prefix, x], dim=1)
        q, k, v = self.qkv(x).view(b, n, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        g = -(self.flow(window, None)[:, -n:] * F.softplus(self.rho)).transpose(1, 2)
        c = self.config
        o, da_state = chunked_differential_attention(
            q, k, v, g, causal=True, feature_map=c.feature_map, eps=c.da_eps, cu_seqlens=None,
            chunk_size=c.chunk_size, initial_state=da_state, return_state=True,
        )
        out = self.out(o.to(x.dtype).transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))
        return out, (window[:, -(FLOW_CONV_WIDTH - 1):], da_state)


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half convention) on (B, H, N, d), positions 0..N-1."""
    n, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos().to(x.dtype), torch.cat([angles, angles], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SoftmaxAttentionLayer(nn.Module):
    """The baseline: same fused QKV and output projection, SDPA with RoPE."""

    def __init__(self, config: ModelConfig, layers, out_init_std: float):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads // layers.tp_size
        self.head_dim = config.head_dim
        inner = config.n_heads * config.head_dim
        self.qkv = layers.column_linear(config.d_model, 3 * inner, init_std=config.init_std)
        self.out = layers.row_linear(inner, config.d_model, init_std=out_init_std)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        bounds = [(0, n)] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
        # Each document on its own, positions restarting at 0: the same as running it alone.
        o = torch.cat([self._attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in bounds], dim=2)
        return self.out(o.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))

    def _attend(self, q, k, v):
        theta = self.config.rope_theta
        return F.scaled_dot_product_attention(rotary(q, theta), rotary(k, theta), v, is_causal=self.config.causal)
