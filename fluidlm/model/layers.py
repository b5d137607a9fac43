"""The one place the model gets its linear layers and embedding from.

`DenseLayers` builds plain single-process PyTorch modules. Tensor parallelism swaps in a twin
with the same methods that returns megatron-core layers (column-parallel splits the output
features, row-parallel the input features and all-reduces the result, the embedding splits the
vocabulary). The model asks for the *kind* of layer it needs and never sees the difference,
except through `tp_size`/`tp_rank`, which tell it how many heads are local and which ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseLayers:
    tp_size = 1
    tp_rank = 0

    def column_linear(self, in_features: int, out_features: int, *, bias: bool = False, init_std: float) -> nn.Module:
        """y = x Wᵀ; under TP each rank holds out_features / tp of the outputs."""
        return _normal_linear(in_features, out_features, bias, init_std)

    def row_linear(self, in_features: int, out_features: int, *, bias: bool = False, init_std: float) -> nn.Module:
        """y = x Wᵀ; under TP each rank holds in_features / tp of the inputs and outputs are summed."""
        return _normal_linear(in_features, out_features, bias, init_std)

    def replicated_linear(self, in_features: int, out_features: int, *, bias: bool = False, init_std: float) -> nn.Module:
        """A small layer every TP rank holds whole (kept identical across ranks)."""
        return _normal_linear(in_features, out_features, bias, init_std)

    def embedding(self, num_embeddings: int, dim: int, *, init_std: float) -> nn.Module:
        """Token embedding; its `.weight` (vocab rows) is also the tied LM head."""
        emb = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(emb.weight, std=init_std)
        return emb

    def sliced_parameter(self, full: torch.Tensor, dim: int = 0) -> nn.Parameter:
        """A per-head parameter (e.g. DA's ρ) given whole: this TP rank's slice along `dim`."""
        return nn.Parameter(full.chunk(self.tp_size, dim=dim)[self.tp_rank].clone())

    def lm_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits of the LM head tied to the embedding (this rank's vocabulary shard under TP)."""
        return F.linear(hidden, weight)

    def token_nll(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (fp32) of logits (M, vocab; this rank's shard under TP) and targets (M,)."""
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def lm_loss_sum(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ cross-entropy over tokens (targets -100 ignored)."""
        valid = targets != -100
        return (self.token_nll(self.lm_logits(hidden, weight), targets.clamp(min=0)) * valid).sum()


def _normal_linear(in_features: int, out_features: int, bias: bool, init_std: float) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=init_std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


__all__ = ["DenseLayers"]
