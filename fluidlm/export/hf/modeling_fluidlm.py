"""An exported FluidLM model for Hugging Face transformers (written by `fluidlm export`).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32, do_sample=False)

Self-contained: pure PyTorch + transformers, no fluidlm import. It is the *reference* form of the
model of fluidlm/model/ (same parameter names, same math), written for clarity, not speed:

    embed → PDE diffusion → L × [x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))] → RMSNorm → logits
    (the LM head is the embedding matrix: tied, stored once)

- PDE diffusion (K explicit steps): u += Σ_s D_s(u) ⊙ L_s(u), D_s = (C/|S|)·sigmoid(θ_s + (W u)_s);
  causal L_s(u)_t = u_{t-s} - u_t (C = 1), bidirectional u_{t-s} - 2u_t + u_{t+s} (C = 1/2); indices
  past the ends read the end token.
- Differential Attention (fluidlm/kernels/naive.py's weight formula):
      Δ = softplus(W · causal_depthwise_conv4(x) + b),  g = -Δ·softplus(ρ) ≤ 0,  x_t = Σ_{j≤t} -g_j
      w_{t,i} = φ(q_t)·φ(k_i) · (1 - e^{g_i}) · e^{-|x_t - x_i|}   (i ≤ t when causal)
      o_t = Σ_i w_{t,i} v_i / (Σ_i w_{t,i} + ε)
  Causal: in blocks of DA_BLOCK tokens, each block quadratic plus the recurrent state
  S = Σ_i e^{-(x_end - x_i)} β_i φ(k_i) [v_i, 1]ᵀ of everything before it (fluidlm/kernels/recurrent.py),
  so time and memory are linear in the length. Bidirectional: one quadratic pass.
  The layer variants: `qkv_conv` (causal depthwise conv on q|k|v), `output_norm` (RMSNorm per head),
  `output_gate` (o ⊙ act(W_g x)).
- The softmax baseline: SDPA with RoPE (rotate-half), causal or not.

Cache (causal models): `FluidLMCache`, a transformers `Cache` holding per layer the DA state, the
flow conv's (and q|k|v conv's) last inputs, or softmax's keys and values, plus the PDE layer's last
max(S) tokens of each step, so `.generate(use_cache=True)` (the default) feeds one token per step:
DA's time and memory per token do not grow with the context. `use_cache=False` reruns the sequence.

Padding (`attention_mask`, causal models): each row's leading zeros are left padding; padded
tokens leave every state untouched (DA: g = 0, so β = 0 and no decay; the convs read zeros, as
before a document's start; the PDE stencil stops at the first real token; softmax masks them and
starts RoPE at the first real token), so a left-padded row gives the logits of the unpadded one.
Zeros after a row's first real token are read as tokens (right padding only touches later
positions); bidirectional models take no padding.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fluidlm import FluidLMConfig

FLOW_CONV_WIDTH = 4
DA_BLOCK = 256  # causal DA: tokens per quadratic block
OUTPUT_GATES = {"sigmoid": torch.sigmoid, "silu": F.silu}
# transformers 5.2x passes and returns the cache as `cache`, earlier releases as `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def feature_map(x, name):
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    raise ValueError(f"unknown feature_map {name!r}")


class LayerState:
    """What one attention layer keeps between calls: DA's state (B, H, d, dv+1) in fp32 (z as the
    last column), the last inputs of the flow conv and of the q|k|v conv; softmax's keys and values."""

    def __init__(self):
        self.da = self.flow_inputs = self.qkv_rows = self.keys = self.values = None

    def tensors(self):
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


class FluidLMCache(Cache):
    """The state of a causal FluidLM after `seen` tokens (padding included): per layer a LayerState,
    the PDE layer's last max(S) tokens of each step, which cached tokens are real (not padding) and
    how many real tokens each row has seen (softmax's next RoPE position). Its size does not grow
    with the context for DA; softmax's keys and values do."""

    is_compileable = False
    is_croppable = False

    def __init__(self, n_layers):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers before the layered Cache
            super().__init__()
        self.seen = 0
        self.blocks = [LayerState() for _ in range(n_layers)]
        self.pde = None
        self.real = None  # (B, seen) bool

    def __len__(self):
        return len(self.blocks)

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def get_max_length(self):
        return None

    def _map(self, fn):
        for state in self.blocks:
            for name, t in state.tensors().items():
                setattr(state, name, fn(t))
        if self.pde is not None:
            self.pde = [fn(t) for t in self.pde]
        if self.real is not None:
            self.real = fn(self.real)

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))


def depthwise_causal_conv(x, weight, prefix=None):
    """y_t = Σ_j weight[:, j] ⊙ x_{t-j} per channel; x (B, N, C), weight (C, W). `prefix` (B, P, C):
    the inputs before x (none: taps before the row start read zero). Returns (y, the last W-1 inputs)."""
    reach = weight.shape[1] - 1
    window = x if prefix is None else torch.cat([prefix, x], dim=1)
    n, m = x.shape[1], window.shape[1]
    positions = torch.arange(m, device=x.device)
    mixed = window * weight[:, 0]
    for tap in range(1, weight.shape[1]):
        shifted = F.pad(window, (0, 0, tap, 0))[:, :m]
        mixed = mixed + shifted * weight[:, tap] * (positions >= tap)[:, None].to(x.dtype)
    return mixed[:, m - n:], window[:, max(0, m - reach):]


class PDEDiffusion(nn.Module):
    def __init__(self, config):
        super().__init__()
        p = config.pde
        self.scales = list(p["scales"])
        self.steps = int(p["steps"])
        self.causal = config.direction == "causal"
        self.bound = 1.0 if self.causal else 0.5
        self.theta = nn.Parameter(torch.full((len(self.scales), config.d_model), float(p["theta_init"])))
        self.rate = nn.Linear(config.d_model, len(self.scales), bias=False)

    def forward(self, u, first=None, prefixes=None):
        """u (B, N, C). Causal: `first` (B,) the first real token of each row in the window made of
        prefix + u, `prefixes` the last max(S) tokens of every level from earlier calls (or None).
        Returns (u after K steps, the new prefixes)."""
        n = u.shape[1]
        new_prefixes = []
        for step in range(self.steps):
            full = u if not prefixes else torch.cat([prefixes[step], u], dim=1)
            m = full.shape[1]
            positions = torch.arange(m, device=u.device)
            strength = (self.bound / len(self.scales)) * torch.sigmoid(self.theta + self.rate(full)[..., None])
            total = torch.zeros_like(full)
            for i, s in enumerate(self.scales):
                if self.causal:
                    lo = (first if first is not None else torch.zeros(u.shape[0], dtype=torch.long, device=u.device))
                    behind_index = torch.minimum(torch.maximum(positions - s, lo[:, None]), positions)  # (B, m)
                    behind = torch.gather(full, 1, behind_index[..., None].expand(-1, -1, full.shape[2]))
                    laplacian = behind - full
                else:
                    laplacian = full[:, (positions - s).clamp(min=0)] - 2 * full + full[:, (positions + s).clamp(max=m - 1)]
                total = total + strength[:, :, i] * laplacian
            new_prefixes.append(full[:, -max(self.scales):])
            u = (full + total)[:, m - n:]
        return u, new_prefixes


class FlowEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.conv_weight = nn.Parameter(torch.zeros(config.d_model, FLOW_CONV_WIDTH))
        self.proj = nn.Linear(config.d_model, config.n_heads, bias=True)

    def forward(self, x, prefix=None):
        mixed, tail = depthwise_causal_conv(x, self.conv_weight, prefix)
        return F.softplus(self.proj(mixed)), tail  # (B, N, H)


def causal_da(fq, fk, v, g, state, eps):
    """Causal DA over blocks of DA_BLOCK tokens from `state` (B, H, d, dv+1) or None (zeros).
    fq, fk (B, H, N, d), v (B, H, N, dv), g (B, H, N), all in the accumulation dtype.
    Returns (o (B, H, N, dv), the state after the last token)."""
    b, h, n, d = fq.shape
    dv = v.shape[-1]
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    if state is None:
        state = fq.new_zeros(b, h, d, dv + 1)
    outs = []
    for start in range(0, n, DA_BLOCK):
        sl = slice(start, start + DA_BLOCK)
        q, k, va, gb = fq[:, :, sl], fk[:, :, sl], v_aug[:, :, sl], g[:, :, sl]
        coord = torch.cumsum(-gb, dim=-1)  # x_t - x_{block start - 1}
        beta = -torch.expm1(gb)  # 1 - e^g
        w = (q @ k.transpose(-1, -2)) * beta[..., None, :] * torch.exp(-(coord[..., :, None] - coord[..., None, :]).abs())
        num = torch.tril(w) @ va + (q * torch.exp(-coord)[..., None]) @ state
        outs.append(num[..., :dv] / (num[..., dv:] + eps))
        to_end = beta * torch.exp(-(coord[..., -1:] - coord))  # β_i e^{-(x_end - x_i)}
        state = torch.exp(-coord[..., -1])[..., None, None] * state + (k * to_end[..., None]).transpose(-1, -2) @ va
    return torch.cat(outs, dim=2), state


class HeadRMSNorm(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.n_heads, config.head_dim))
        self.eps = config.norm_eps

    def forward(self, o):  # (B, N, H, dv)
        of = o.float()
        return (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)).to(o.dtype) * self.weight


class DifferentialAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.flow = FlowEncoder(config)
        self.rho = nn.Parameter(torch.zeros(config.n_heads))
        self.out = nn.Linear(inner, config.d_model, bias=False)
        width = getattr(config, "qkv_conv", 0)
        self.qkv_conv_weight = nn.Parameter(torch.zeros(3 * inner, width)) if width else None
        self.out_norm = HeadRMSNorm(config) if getattr(config, "output_norm", "none") == "rmsnorm" else None
        gate = getattr(config, "output_gate", "none")
        self.gate = nn.Linear(config.d_model, inner, bias=False) if gate != "none" else None

    def forward(self, x, real=None, state=None):
        """x (B, N, d_model); causal: `real` (B, N) bool (False = padding), `state` a LayerState."""
        c = self.config
        b, n, _ = x.shape
        causal = c.direction == "causal"
        if real is not None:
            x_in = x * real[..., None].to(x.dtype)  # padding reads as the zeros before a row's start
        else:
            x_in = x
        qkv = self.qkv(x)
        if self.qkv_conv_weight is not None:
            if real is not None:
                qkv = qkv * real[..., None].to(qkv.dtype)
            qkv, tail = depthwise_causal_conv(qkv, self.qkv_conv_weight, state.qkv_rows if state else None)
            if state is not None:
                state.qkv_rows = tail
        q, k, v = qkv.view(b, n, c.n_heads, 3, c.head_dim).permute(3, 0, 2, 1, 4)  # (B, H, N, d)
        delta, tail = self.flow(x_in, state.flow_inputs if state else None)
        if state is not None:
            state.flow_inputs = tail
        g = -(delta * F.softplus(self.rho)).transpose(1, 2)  # (B, H, N), ≤ 0
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        fq, fk, g = feature_map(q.to(acc), c.feature_map), feature_map(k.to(acc), c.feature_map), g.to(acc)
        if real is not None:
            g = g * real[:, None, :].to(acc)  # g = 0: β = 0 and no decay, the state is untouched
        if causal:
            o, new_state = causal_da(fq, fk, v.to(acc), g, state.da if state else None, c.da_eps)
            if state is not None:
                state.da = new_state
        else:
            coord = torch.cumsum(-g, dim=-1)  # each token's position in the fluid sequence
            beta = -torch.expm1(g)  # 1 - e^g
            w = (fq @ fk.transpose(-1, -2)) * beta[..., None, :] * torch.exp(-(coord[..., :, None] - coord[..., None, :]).abs())
            o = (w @ v.to(acc)) / (w.sum(-1, keepdim=True) + c.da_eps)
        o = o.to(x.dtype).transpose(1, 2)  # (B, N, H, dv)
        if self.out_norm is not None:
            o = self.out_norm(o)
        o = o.reshape(b, n, c.n_heads * c.head_dim)
        if self.gate is not None:
            o = o * OUTPUT_GATES[c.output_gate](self.gate(x))
        return self.out(o)


def rotary(x, theta, positions=None):
    """RoPE (rotate-half) on (B, H, N, d) at `positions` ((B, N); default 0..N-1)."""
    n, d = x.shape[-2], x.shape[-1]
    if positions is None:
        positions = torch.arange(n, device=x.device)[None]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, N, d/2)
    angles = torch.cat([angles, angles], -1)[:, None]  # broadcast over heads
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SoftmaxAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, x, real=None, state=None, positions=None, key_real=None):
        """Causal: `positions` (B, N) RoPE positions (real tokens before each), `key_real` (B, T) which
        of the cached + new keys are real, `state` a LayerState (keys after RoPE and values)."""
        c = self.config
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, c.n_heads, 3, c.head_dim).permute(3, 0, 2, 1, 4)
        if c.direction != "causal":
            o = F.scaled_dot_product_attention(rotary(q, c.rope_theta), rotary(k, c.rope_theta), v)
        else:
            q, k = rotary(q, c.rope_theta, positions), rotary(k, c.rope_theta, positions)
            if state is not None and state.keys is not None:
                k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
            if state is not None:
                state.keys, state.values = k, v
            t = k.shape[2]
            query_at = torch.arange(t - n, t, device=x.device)[:, None]
            key_at = torch.arange(t, device=x.device)[None, :]
            # causal and real; a padded query sees itself (no empty row, no NaN)
            visible = ((key_at <= query_at) & key_real[:, None, :]) | (key_at == query_at)  # (B, n, t)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
        return self.out(o.transpose(1, 2).reshape(b, n, c.n_heads * c.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.ffn_size, bias=False)
        self.up = nn.Linear(config.d_model, config.ffn_size, bias=False)
        self.down = nn.Linear(config.ffn_size, config.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FluidBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = DifferentialAttention(config) if config.attention == "da" else SoftmaxAttention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config)

    def forward(self, x, **attn_inputs):
        x = x + self.attn(self.attn_norm(x), **attn_inputs)
        return x + self.ffn(self.ffn_norm(x))


class FluidLMPreTrainedModel(PreTrainedModel):
    config_class = FluidLMConfig
    base_model_prefix = "fluidlm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FluidBlock"]

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)


def real_tokens(attention_mask, total, batch, device):
    """(B, total) bool: True from each row's first 1 on. Leading zeros are left padding; a zero after
    a row's first real token is read as a token (for a causal model trailing zeros, right padding,
    only touch later positions; generate() infers zeros wherever a prompt holds the pad id)."""
    if attention_mask is None:
        return torch.ones(batch, total, dtype=torch.bool, device=device)
    if attention_mask.shape != (batch, total):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(batch, total)} "
                         "(cached + new tokens)")
    return attention_mask.to(device=device, dtype=torch.long).cummax(-1).values.bool()


class FluidLMForCausalLM(FluidLMPreTrainedModel, GenerationMixin):
    """FluidLM with its tied LM head. Parameter names are FluidLM's own (embed.*, pde.*, blocks.N.*, norm.*)."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pde = PDEDiffusion(config) if config.pde.get("enabled", True) else None
        self.blocks = nn.ModuleList(FluidBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model makes its own FluidLMCache

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, use_cache=None,
                return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("FluidLM needs input_ids (inputs_embeds are not supported)")
        causal = self.config.direction == "causal"
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, FluidLMCache):
            cache = None  # (an empty cache of another class: older generate() makes a DynamicCache)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not causal:
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("a bidirectional FluidLM takes no padding: pass sequences of equal length")
            x = self.embed(input_ids)
            if self.pde is not None:
                x, _ = self.pde(x)
            for block in self.blocks:
                x = block(x)
            cache = None
        else:
            x = self._causal(input_ids, attention_mask, cache if cache is not None else FluidLMCache(len(self.blocks)))
            cache = x[1] if use_cache else None
            x = x[0]
        logits = F.linear(self.norm(x), self.embed.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def _causal(self, input_ids, attention_mask, cache):
        """The causal model on the new tokens `input_ids` after the `cache.seen` ones; updates `cache`."""
        b, n = input_ids.shape
        device = input_ids.device
        real_all = real_tokens(attention_mask, cache.seen + n, b, device)
        real = real_all[:, -n:]
        x = self.embed(input_ids)
        if self.pde is not None:
            kept = 0 if cache.pde is None else cache.pde[0].shape[1]
            leading = (~real_all).sum(-1)  # padding tokens before each row's first real one
            first = (leading - (cache.seen - kept)).clamp(min=0)
            x, cache.pde = self.pde(x, first, cache.pde)
        key_real = real_all if self.config.attention == "softmax" else None
        positions = (real_all.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]  # real tokens before each one
        for block, state in zip(self.blocks, cache.blocks):
            if self.config.attention == "da":
                x = block(x, real=real, state=state)
            else:
                x = block(x, state=state, positions=positions, key_real=key_real)
        cache.seen += n
        return x, cache

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, FluidLMCache) and cache.seen:
            input_ids = input_ids[:, cache.seen:]  # only the tokens the cache has not seen
        else:
            cache = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, CACHE_FIELD: cache}
