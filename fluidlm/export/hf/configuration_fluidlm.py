"""Hugging Face configuration of an exported FluidLM model (written by `fluidlm export`).

Self-contained: needs only `transformers` (no fluidlm). The model fields are FluidLM's ModelConfig
(fluidlm/model/config.py) as they were at training time; `pde` is a dict {enabled, scales, steps,
theta_init}; `output_gate`, `qkv_conv`, `output_norm` are the DA-layer variants (off by default).
Fields that only matter for training (dropout, da_backend, chunk_size, half-life init) are kept as
plain attributes.
"""

from transformers import PretrainedConfig


class FluidLMConfig(PretrainedConfig):
    model_type = "fluidlm"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, vocab_size=4096, d_model=256, n_layers=4, n_heads=4, head_dim=64, ffn_hidden=None,
                 attention="da", direction="causal", feature_map="sigmoid", da_eps=1e-6, max_seq_len=65536,
                 pde=None, norm_eps=1e-5, rope_theta=10000.0, init_std=0.02, output_gate="none", qkv_conv=0,
                 output_norm="none", bos_token_id=1, eos_token_id=2, pad_token_id=None, use_cache=True,
                 tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.ffn_hidden = ffn_hidden
        self.attention = attention
        self.direction = direction
        self.feature_map = feature_map
        self.da_eps = da_eps
        self.max_seq_len = max_seq_len
        self.pde = dict(pde) if pde is not None else {"enabled": True, "scales": [1, 4, 16], "steps": 1,
                                                      "theta_init": -2.0}
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.init_std = init_std
        self.output_gate = output_gate
        self.qkv_conv = qkv_conv
        self.output_norm = output_norm
        self.use_cache = use_cache  # causal models: FluidLMCache (DA state, conv tails, PDE tails; softmax KV)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return ((8 * self.d_model // 3) + 63) // 64 * 64
