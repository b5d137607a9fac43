"""An exported FluidLM model for Hugging Face transformers (written by `fluidlm export`).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    out = model.generate(input_ids, max_new_tokens=32, do_sample=False)

Self-contained: pure PyTorch + transformers, no fluidlm import. It is the *reference* form of the
model of fluidlm/model/ (same parameter names, same math), written for clarity, not speed:

    embed → PDE diffusion → L × [x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))] → RMSNorm → logits
    (the LM head is the embedding matrix: tied, stored once)

- PDE diffusion (K explicit steps): u += Σ_s D_s(u) ⊙ L_s(u), D_s = (C/|S|)·sigmoid(θ_s + (W u)_s);
  causal L_s(u)_t = u_{t-s} - u_t (C = 1), bidirectional u_{t-s} - 2u_t + u_{t+s} (C = 1/2); indices
  past the ends read the end token.
- Differential Attention, in its quadratic form (fluidlm/kernels/naive.py):
      Δ = softplus(W · causal_depthwise_conv4(x) + b),  g = -Δ·softplus(ρ) ≤ 0,  x_t = Σ_{j≤t} -g_j
      w_{t,i} = φ(q_t)·φ(k_i) · (1 - e^{g_i}) · e^{-|x_t - x_i|}   (i ≤ t when causal)
      o_t = Σ_i w_{t,i} v_i / (Σ_i w_{t,i} + ε)
  It builds (heads × N × N) matrices: fine for short and moderate contexts. For long prompts and
  constant-memory decoding use FluidLM itself (`fluidlm generate`, which streams the DA state).
- The softmax baseline: SDPA with RoPE (rotate-half), causal or not.

No key/value cache: `use_cache` is off and every generation step reruns the whole sequence
(O(N) per token for softmax, O(N²) memory per step for DA). One sequence (or equal-length
sequences without padding) at a time: an attention_mask with zeros is refused.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fluidlm import FluidLMConfig

FLOW_CONV_WIDTH = 4


def feature_map(x, name):
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    raise ValueError(f"unknown feature_map {name!r}")


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

    def forward(self, u):
        n = u.shape[1]
        positions = torch.arange(n, device=u.device)
        for _ in range(self.steps):
            strength = (self.bound / len(self.scales)) * torch.sigmoid(self.theta + self.rate(u)[..., None])
            total = torch.zeros_like(u)
            for i, s in enumerate(self.scales):
                behind = u[:, (positions - s).clamp(min=0)]
                if self.causal:
                    laplacian = behind - u
                else:
                    laplacian = behind - 2 * u + u[:, (positions + s).clamp(max=n - 1)]
                total = total + strength[:, :, i] * laplacian
            u = u + total
        return u


class FlowEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.conv_weight = nn.Parameter(torch.zeros(config.d_model, FLOW_CONV_WIDTH))
        self.proj = nn.Linear(config.d_model, config.n_heads, bias=True)

    def forward(self, x):
        n = x.shape[1]
        positions = torch.arange(n, device=x.device)
        mixed = x * self.conv_weight[:, 0]
        for tap in range(1, FLOW_CONV_WIDTH):
            shifted = F.pad(x, (0, 0, tap, 0))[:, :n]
            mixed = mixed + shifted * self.conv_weight[:, tap] * (positions >= tap)[:, None].to(x.dtype)
        return F.softplus(self.proj(mixed))  # (B, N, H)


class DifferentialAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.flow = FlowEncoder(config)
        self.rho = nn.Parameter(torch.zeros(config.n_heads))
        self.out = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, x):
        c = self.config
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, c.n_heads, 3, c.head_dim).permute(3, 0, 2, 1, 4)  # (B, H, N, d)
        g = -(self.flow(x) * F.softplus(self.rho)).transpose(1, 2)  # (B, H, N), ≤ 0
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        fq, fk = feature_map(q.to(acc), c.feature_map), feature_map(k.to(acc), c.feature_map)
        g = g.to(acc)
        coord = torch.cumsum(-g, dim=-1)  # each token's position in the fluid sequence
        beta = -torch.expm1(g)  # 1 - e^g
        w = (fq @ fk.transpose(-1, -2)) * beta[..., None, :] * torch.exp(-(coord[..., :, None] - coord[..., None, :]).abs())
        if c.direction == "causal":
            w = torch.tril(w)
        o = (w @ v.to(acc)) / (w.sum(-1, keepdim=True) + c.da_eps)
        return self.out(o.to(x.dtype).transpose(1, 2).reshape(b, n, c.n_heads * c.head_dim))


def rotary(x, theta):
    n, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos().to(x.dtype), torch.cat([angles, angles], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SoftmaxAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, x):
        c = self.config
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, c.n_heads, 3, c.head_dim).permute(3, 0, 2, 1, 4)
        o = F.scaled_dot_product_attention(rotary(q, c.rope_theta), rotary(k, c.rope_theta), v,
                                           is_causal=c.direction == "causal")
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

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
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


class FluidLMForCausalLM(FluidLMPreTrainedModel, GenerationMixin):
    """FluidLM with its tied LM head. Parameter names are FluidLM's own (embed.*, pde.*, blocks.N.*, norm.*)."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pde = PDEDiffusion(config) if config.pde.get("enabled", True) else None
        self.blocks = nn.ModuleList(FluidBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, return_dict=None,
                **kwargs):
        if input_ids is None:
            raise ValueError("FluidLM needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("FluidLM has no padding: pass one sequence, or sequences of equal length without padding")
        x = self.embed(input_ids)
        if self.pde is not None:
            x = self.pde(x)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.norm(x), self.embed.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: every step sees the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
