"""The attention layers of a FluidBlock: Differential Attention and the softmax baseline.

Both take (B, N, d_model) with optional `cu_seqlens` (documents packed along the flattened B·N
tokens, every row boundary a document boundary) and get their projections from the layer factory
(fluidlm/model/layers.py), so under tensor parallelism each rank holds whole heads.

One code path serves training, streaming evaluation, generation and context parallelism:
- `cache` (a `StreamCache`, updated in place) carries what a causal layer needs from earlier windows
  of the same rows: the DA state, the flow encoder's last inputs (and, with `model.qkv_conv`, the last
  projected q|k|v rows), or the softmax KV cache;
- `context_parallel` (None here; `fluidlm.parallel` hands a CP context to the DA layer and its flow
  encoder) makes the layer run on this rank's shard of the sequence: halos for the flow conv (and the
  q|k|v conv), the DA op with the shard's incoming state.

Both causal convs (the flow encoder's and the optional q|k|v conv) are one helper,
`causal_depthwise_conv`: documents, CP halo and stream prefix live there once.

The DA-layer variants of `ModelConfig` (issue 20; all off by default) sit outside the op, so they work
on every backend: `qkv_conv` (causal depthwise conv on the q|k|v projection), `output_norm` (RMSNorm
per head), `output_gate` (o ⊙ act(W_g x)) and the half-life range of λ's initialisation.
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

    DA: `flow_inputs` (B, FLOW_CONV_WIDTH-1, d_model), the last inputs the flow conv reads back,
    `qkv_rows` (B, qkv_conv-1, 3·H·head_dim), the last projected rows the q|k|v conv reads back (only
    with `model.qkv_conv`), and `da`, the recurrent state per row (O(d·dv) per head whatever the
    length). Softmax: `keys` (after RoPE) and `values`, (B, H, T, head_dim), the KV cache."""

    flow_inputs: torch.Tensor | None = None
    qkv_rows: torch.Tensor | None = None
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


def initial_rho(n_heads: int, max_half_life: float, min_half_life: float = 1.0) -> torch.Tensor:
    """ρ such that λ = softplus(ρ) gives half-lives ln2/λ log-spaced from `min_half_life` (default one
    token) to `max_half_life` (the model's default: max_seq_len)."""
    half_lives = torch.logspace(math.log10(min_half_life), math.log10(max(max_half_life, 1)), n_heads,
                                dtype=torch.float64)
    rate = math.log(2.0) / half_lives
    return torch.log(torch.expm1(rate)).float()


def depthwise_causal_conv(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """y_t = Σ_j weight[:, j] ⊙ x_{t-j} per channel, x (B, N, C), weight (C, W); taps before the
    token's document start (or its row start) are dropped, so no document reads another."""
    b, n, _ = x.shape
    _, offset_in_doc = per_token_documents(b, n, cu_seqlens, x.device)
    mixed = x * weight[:, 0]
    for tap in range(1, weight.shape[1]):
        shifted = F.pad(x, (0, 0, tap, 0))[:, :n]
        mixed = mixed + shifted * weight[:, tap] * (offset_in_doc >= tap)[..., None].to(x.dtype)
    return mixed


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *,
                          context_parallel=None, cache: StreamCache | None = None,
                          slot: str = "flow_inputs", then=None) -> torch.Tensor:
    """`then(depthwise_causal_conv(x))` on the one code path: under CP (`context_parallel`) over this
    rank's shard with the previous rank's last W-1 tokens as a halo (document edges from the GLOBAL
    `cu_seqlens`); streaming (`cache`) over this window with the last W-1 inputs of the earlier
    windows, kept in `cache.<slot>` (updated in place); otherwise over x itself. `then` (optional) is
    a per-token map applied before the halo/prefix rows are cut off (the flow encoder's projection,
    where it has always been applied)."""
    n, reach = x.shape[1], weight.shape[1] - 1
    then = then or (lambda y: y)
    if context_parallel is not None:
        window, window_cu, offset = context_parallel.halo(x, reach, 0, cu_seqlens)
        return then(depthwise_causal_conv(window, weight, window_cu))[:, offset:offset + n]
    if cache is not None:
        prefix = getattr(cache, slot)
        window = torch.cat([x[:, :0] if prefix is None else prefix, x], dim=1)
        setattr(cache, slot, window[:, max(0, window.shape[1] - reach):])
        return then(depthwise_causal_conv(window, weight, None))[:, -n:]
    return then(depthwise_causal_conv(x, weight, cu_seqlens))


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head's output over its last dim, a learned weight per head channel:
    (B, N, H_local, dv) → same. `weight` (H_local, dv) is this TP rank's heads' slice."""

    def __init__(self, n_heads: int, head_dim: int, layers, eps: float):
        super().__init__()
        self.weight = layers.sliced_parameter(torch.ones(n_heads, head_dim), dim=0)
        self.eps = eps

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        of = o.float()
        return (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)).to(o.dtype) * self.weight


OUTPUT_GATES = {"sigmoid": torch.sigmoid, "silu": F.silu}


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
        # CP: this rank's shard with the previous rank's last tokens; streaming: earlier windows' inputs.
        return causal_depthwise_conv(x, self.conv_weight, cu_seqlens, context_parallel=self.context_parallel,
                                     cache=cache, slot="flow_inputs",
                                     then=lambda mixed: F.softplus(self.proj(mixed)))  # (B, N, H_local)


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
        self.rho = layers.sliced_parameter(  # this rank's heads
            initial_rho(config.n_heads, config.longest_half_life, config.half_life_min), dim=0)
        self.out = layers.row_linear(inner, config.d_model, init_std=out_init_std)
        self.context_parallel = None
        # Variants (ModelConfig, issue 20), None when off.
        self.qkv_conv_weight = None
        if config.qkv_conv:  # (3·inner, W) in the qkv layout (head, q|k|v, head_dim): split with the heads
            full = torch.zeros(3 * inner, config.qkv_conv)
            full[:, 0] = 1.0  # the identity tap: the variant starts as the baseline and learns from there
            self.qkv_conv_weight = layers.sliced_parameter(full, dim=0)
        self.out_norm = (HeadRMSNorm(config.n_heads, config.head_dim, layers, config.norm_eps)
                         if config.output_norm == "rmsnorm" else None)
        self.gate = (layers.column_linear(config.d_model, inner, init_std=config.init_std)
                     if config.output_gate != "none" else None)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: StreamCache | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        c = self.config
        if cache is not None and (not c.causal or cu_seqlens is not None):
            raise ValueError("streaming (a cache) needs the causal direction and whole rows (no cu_seqlens)")
        qkv = self.qkv(x)
        if self.qkv_conv_weight is not None:
            qkv = causal_depthwise_conv(qkv, self.qkv_conv_weight, cu_seqlens, context_parallel=self.context_parallel,
                                        cache=cache, slot="qkv_rows")
        q, k, v = qkv.view(b, n, self.n_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        g = -(self.flow(x, cu_seqlens, cache) * F.softplus(self.rho)).transpose(1, 2)  # (B, H, N), ≤ 0
        op = dict(causal=c.causal, feature_map=c.feature_map, eps=c.da_eps, backend=c.da_backend,
                  chunk_size=c.chunk_size)
        if self.context_parallel is not None:
            o = self.context_parallel.differential_attention(q, k, v, g, cu_seqlens=cu_seqlens, **op)
        elif cache is not None:
            o, cache.da = differential_attention(q, k, v, g, initial_state=cache.da, output_final_state=True, **op)
        else:
            o = differential_attention(q, k, v, g, cu_seqlens=cu_seqlens, **op)
        o = o.transpose(1, 2)  # (B, N, H_local, dv)
        if self.out_norm is not None:
            o = self.out_norm(o)
        o = o.reshape(b, n, self.n_heads * self.head_dim)
        if self.gate is not None:
            o = o * OUTPUT_GATES[c.output_gate](self.gate(x))
        return self.out(o)


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
