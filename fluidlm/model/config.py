"""The model's typed, validated configuration. Every field is documented where it is defined."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """A config section that rejects unknown keys, naming the closest valid one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data):
        if isinstance(data, dict):
            valid = list(cls.model_fields)
            for key in data:
                if key not in valid:
                    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
                    raise ValueError(f"unknown key {key!r} in {cls.__name__}{hint}")
        return data


class PDEConfig(StrictModel):
    """Multi-scale diffusion right after the embedding (docs/design.md §2)."""

    enabled: bool = Field(True, description="apply the PDE diffusion layer after the embedding")
    scales: list[int] = Field([1, 4, 16], description="stencil offsets s (tokens); each a positive int")
    steps: int = Field(1, ge=1, le=16, description="explicit diffusion steps K")
    theta_init: float = Field(
        -2.0, description="initial per-scale, per-channel rate θ; total initial mixing ≈ C·sigmoid(θ)"
    )

    @model_validator(mode="after")
    def _check_scales(self):
        if not self.scales or any(s < 1 for s in self.scales) or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"pde.scales must be distinct positive ints, got {self.scales}")
        return self


class ModelConfig(StrictModel):
    """The Fluid Transformer (docs/design.md §3) or its softmax baseline."""

    vocab_size: int = Field(4096, ge=2, description="tokenizer vocabulary size")
    d_model: int = Field(256, ge=8, description="residual stream width")
    n_layers: int = Field(4, ge=1, description="number of FluidBlocks")
    n_heads: int = Field(4, ge=1, description="attention heads (sharded across TP ranks)")
    head_dim: int = Field(64, ge=4, description="per-head width of q, k and v")
    ffn_hidden: int | None = Field(
        None, ge=1, description="SwiGLU hidden size; default: 8/3·d_model rounded up to a multiple of 64"
    )
    attention: Literal["da", "softmax"] = Field(
        "da", description="'da' = Differential Attention; 'softmax' = SDPA + RoPE baseline"
    )
    direction: Literal["causal", "bidirectional"] = Field(
        "causal", description="causal LM, or bidirectional (encoder) attention and PDE stencil"
    )
    feature_map: Literal["sigmoid", "elu1"] = Field("sigmoid", description="DA's positive feature map φ")
    da_backend: Literal["auto", "naive", "recurrent", "chunked", "triton"] = Field(
        "auto", description="DA implementation; auto = triton on CUDA, chunked elsewhere"
    )
    da_eps: float = Field(1e-6, gt=0, description="ε in DA's normaliser")
    chunk_size: int = Field(64, ge=1, description="DA chunk length for the chunked/triton paths")
    max_seq_len: int = Field(
        65536, ge=1, description="longest training context; sets the longest initial DA half-life"
    )
    pde: PDEConfig = Field(default_factory=PDEConfig, description="PDE diffusion layer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="residual dropout after attention and FFN")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (softmax baseline only)")
    init_std: float = Field(0.02, gt=0, description="std of the normal init of weights and embedding")
    # --- DA-layer variants (issue 20); all off by default, off = the layer of docs/design.md §3 -------
    output_gate: Literal["none", "sigmoid", "silu"] = Field(
        "none", description="DA only: o ← o ⊙ act(W_g x) before the output projection (x = the layer input, "
                            "W_g a column-parallel d_model → n_heads·head_dim linear); 'none' = off")
    qkv_conv: int = Field(
        0, ge=0, le=64, description="DA only: width of a causal depthwise conv on the fused q|k|v projection "
                                    "(per channel, never across a document start, identity at init); 0 = off, "
                                    "else ≥ 2")
    output_norm: Literal["none", "rmsnorm"] = Field(
        "none", description="DA only: RMSNorm of each head's output over head_dim (learned weight per head "
                            "channel, ε = norm_eps), before the output gate; 'none' = off")
    half_life_min: float = Field(
        1.0, gt=0, description="DA only: shortest initial half-life ln2/λ (tokens); the heads' half-lives start "
                               "log-spaced from half_life_min to half_life_max")
    half_life_max: float | None = Field(
        None, gt=0, description="DA only: longest initial half-life (tokens); default max_seq_len")

    @model_validator(mode="after")
    def _check_variants(self):
        if self.qkv_conv == 1:
            raise ValueError("model.qkv_conv=1 is a per-channel scale, not a conv: use 0 (off) or a width ≥ 2")
        if self.half_life_min > self.longest_half_life:
            raise ValueError(f"model.half_life_min={self.half_life_min} exceeds the longest half-life "
                             f"{self.longest_half_life} (model.half_life_max, default max_seq_len)")
        if self.attention == "softmax":
            on = [f"{k}={getattr(self, k)!r}" for k, off in (("output_gate", "none"), ("qkv_conv", 0),
                                                              ("output_norm", "none")) if getattr(self, k) != off]
            if on:
                raise ValueError(f"{', '.join('model.' + x for x in on)}: DA-layer options; the softmax baseline "
                                 "has none (set model.attention=da or switch them off)")
        return self

    @property
    def longest_half_life(self) -> float:
        """The longest initial DA half-life: half_life_max, or max_seq_len when it is unset."""
        return self.max_seq_len if self.half_life_max is None else self.half_life_max

    @property
    def causal(self) -> bool:
        return self.direction == "causal"

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return ((8 * self.d_model // 3) + 63) // 64 * 64

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise ValueError naming the field when the model cannot be split over `tp` ranks."""
        for field, value in (("n_heads", self.n_heads), ("ffn_hidden", self.ffn_size), ("vocab_size", self.vocab_size)):
            if value % tp:
                raise ValueError(f"model.{field}={value} is not divisible by the tensor-parallel size {tp}; "
                                 f"choose model.{field} as a multiple of {tp} or a smaller tp")
