"""Adaptive multi-scale PDE diffusion along the sequence, right after the embedding (docs/design.md §2).

    u^{k+1} = u^k + Σ_{s∈S} D_s(u^k) ⊙ L_s(u^k)
    causal (one-sided):  L_s(u)_t = u_{t-s} - u_t
    bidirectional:       L_s(u)_t = u_{t-s} - 2 u_t + u_{t+s}
    D_s(u)_{t,c} = (C/|S|) · sigmoid(θ_{s,c} + (W u_t)_s),   C = 1 causal, 1/2 bidirectional

Since Σ_s D_s ≤ C, every step writes each channel of u_t as a convex combination of values of u:
the layer is non-expansive in the max-norm whatever θ and W are. Indices past a document's
ends read the end token itself (Neumann), so no document reads another.
"""

from __future__ import annotations

import torch
from torch import nn

STENCILS = ("one_sided", "symmetric")


def document_bounds(n: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index of each token's document, each (N,)."""
    positions = torch.arange(n, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(positions), torch.full_like(positions, n - 1)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cu, positions, right=True) - 1
    return cu[doc], cu[doc + 1] - 1


class PDEDiffusion(nn.Module):
    def __init__(self, d_model: int, scales: list[int], steps: int, causal: bool, theta_init: float, layers, init_std: float):
        super().__init__()
        self.scales = list(scales)
        self.steps = steps
        # The stencil is its own attribute (not re-derived from `causal`) so a test can plant the
        # symmetric stencil in a causal model and check that the causality test catches the leak.
        self.stencil = "one_sided" if causal else "symmetric"
        self.bound = 1.0 if causal else 0.5  # C: keeps Σ_s D_s inside the CFL bound
        self.theta = nn.Parameter(torch.full((len(self.scales), d_model), float(theta_init)))
        self.rate = layers.replicated_linear(d_model, len(self.scales), bias=False, init_std=init_std)
        self.context_parallel = None  # a CP context (fluidlm.parallel.context) runs it on a shard

    def forward(self, u: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if self.context_parallel is not None:
            # This rank's shard, with max(S)·K tokens of each neighbour (the symmetric stencil reads
            # both sides): an error at the window's ends moves max(S) tokens per step, so after K
            # steps it has not reached the shard.
            halo = max(self.scales) * self.steps
            window, window_cu, offset = self.context_parallel.halo(
                u, halo, halo if self.stencil == "symmetric" else 0, cu_seqlens)
            return self._diffuse(window, window_cu)[:, offset:offset + u.shape[1]]
        return self._diffuse(u, cu_seqlens)

    def _diffuse(self, u: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        b, n, c = u.shape
        if cu_seqlens is not None and b > 1:  # documents packed along the flattened B·N tokens
            return self._diffuse(u.reshape(1, b * n, c), cu_seqlens).view(b, n, c)
        first, last = document_bounds(n, cu_seqlens, u.device)
        positions = torch.arange(n, device=u.device)
        for _ in range(self.steps):
            u = u + self.increment(u, positions, first, last)
        return u

    def forward_stream(self, u: torch.Tensor, prefixes=None):
        """Causal streaming over consecutive windows: returns (u after K steps, state), where the
        state keeps the last max(S) tokens of every level u^0 … u^{K-1}, so each step sees the
        same neighbours as in one full-length pass."""
        if self.stencil != "one_sided":
            raise ValueError("streaming needs the causal (one-sided) stencil")
        n, keep = u.shape[1], max(self.scales)
        prefixes = prefixes or [u[:, :0]] * self.steps
        new_prefixes = []
        for prefix in prefixes:
            full = torch.cat([prefix, u], dim=1)
            positions = torch.arange(full.shape[1], device=u.device)
            u = (full + self.increment(full, positions, torch.zeros_like(positions), positions[-1:]))[:, -n:]
            new_prefixes.append(full[:, -keep:])
        return u, new_prefixes

    def increment(self, u, positions, first, last):
        # (B, N, |S|, C): per scale, channel and token, strictly inside (0, bound/|S|).
        strength = (self.bound / len(self.scales)) * torch.sigmoid(self.theta + self.rate(u)[..., None])
        total = torch.zeros_like(u)
        for i, s in enumerate(self.scales):
            behind = u[:, torch.maximum(positions - s, first)]
            if self.stencil == "one_sided":
                laplacian = behind - u
            elif self.stencil == "symmetric":
                ahead = u[:, torch.minimum(positions + s, last)]
                laplacian = behind - 2 * u + ahead
            else:
                raise ValueError(f"unknown stencil {self.stencil!r}; choose one of {STENCILS}")
            total = total + strength[:, :, i] * laplacian
        return total
