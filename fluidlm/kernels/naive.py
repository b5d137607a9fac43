"""O(N²) Differential Attention, written straight from the weight formula of DESIGN.md §1.

    w_{t,i} = φ(q_t)·φ(k_i) · β_i · exp(-|x_t - x_i|),   x_t = Σ_{j≤t} -g_j

It shares no algebra with the recurrent or chunked forms, which is why it is the reference
they are tested against. Tests only: it materialises N×N matrices.
"""

from __future__ import annotations

import torch

from fluidlm.kernels.common import accumulation_dtype, feature_map_fn, input_weight, segment_ids


def naive_differential_attention(q, k, v, g, *, causal, feature_map, eps, cu_seqlens, chunk_size=None):
    acc = accumulation_dtype(q.dtype)
    n = q.shape[-2]
    fq = feature_map_fn(q.to(acc), feature_map)
    fk = feature_map_fn(k.to(acc), feature_map)
    g = g.to(acc)
    x = torch.cumsum(-g, dim=-1)  # (B, H, N): each token's coordinate in the fluid sequence
    distance = (x[..., :, None] - x[..., None, :]).abs()
    w = (fq @ fk.transpose(-1, -2)) * input_weight(g)[..., None, :] * torch.exp(-distance)

    visible = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible)
    seg = segment_ids(cu_seqlens, n, q.device)
    if seg is not None:
        visible = visible & (seg[0][:, None] == seg[0][None, :])
    w = torch.where(visible, w, torch.zeros((), dtype=acc, device=q.device))
    o = (w @ v.to(acc)) / (w.sum(dim=-1, keepdim=True) + eps)
    return o
