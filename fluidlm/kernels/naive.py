"""O(N²) Differential Attention, written straight from the weight formula of docs/design.md §1.

    w_{t,i} = φ(q_t)·φ(k_i) · β_i · exp(-|x_t - x_i|),   x_t = Σ_{j≤t} -g_j

It shares no algebra with the recurrent or chunked forms, which is why it is the reference
they are tested against. Tests only: it materialises N×N matrices.

State (DAState, per row, or per document with `cu_seqlens`, B = 1 here): an initial state S₀ is
the state just before a document's first token s, so token t of that document adds
exp(-(x_t - x_{s-1})) φ(q_t)·S₀ to its numerator (z₀ to its denominator); the final state is
Σ_{i in doc} exp(-(x_e - x_i)) β_i φ(k_i) v_iᵀ + exp(-(x_e - x_{s-1})) S₀, e the last token.
The bidirectional form takes the initial state into its left (causal) part and returns the
causal final state.
"""

from __future__ import annotations

import torch

from fluidlm.kernels.common import DAState, accumulation_dtype, feature_map_fn, input_weight, segment_ids


def naive_differential_attention(q, k, v, g, *, causal, feature_map, eps, cu_seqlens, chunk_size=None,
                                 initial_state=None, output_final_state=False):
    acc = accumulation_dtype(q.dtype)
    b, h, n, _ = q.shape
    fq = feature_map_fn(q.to(acc), feature_map)
    fk = feature_map_fn(k.to(acc), feature_map)
    g = g.to(acc)
    v = v.to(acc)
    x = torch.cumsum(-g, dim=-1)  # (B, H, N): each token's coordinate in the fluid sequence
    distance = (x[..., :, None] - x[..., None, :]).abs()
    beta = input_weight(g)
    w = (fq @ fk.transpose(-1, -2)) * beta[..., None, :] * torch.exp(-distance)

    visible = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible)
    seg = segment_ids(cu_seqlens, n, q.device)
    if seg is not None:
        visible = visible & (seg[0][:, None] == seg[0][None, :])
    w = torch.where(visible, w, torch.zeros((), dtype=acc, device=q.device))
    num = w @ v
    den = w.sum(dim=-1)
    if initial_state is None and not output_final_state:
        return num / (den[..., None] + eps)

    # document of every token, its first and last token
    if seg is None:
        doc = torch.zeros(n, dtype=torch.long, device=q.device)
        first = torch.zeros(1, dtype=torch.long, device=q.device)
        last = torch.full((1,), n - 1, dtype=torch.long, device=q.device)
    else:
        doc = seg[0]
        cu = cu_seqlens.to(device=q.device, dtype=torch.long)
        first, last = cu[:-1], cu[1:] - 1
    x_before = x[..., first] + g[..., first]  # x_{s-1} of each document: (B, H, docs)
    w0 = torch.exp(-(x - x_before[..., doc]))  # (B, H, N): decay from the document start
    if initial_state is not None:
        s0, z0 = (t.to(acc) for t in initial_state)
        if seg is None:  # one state per row
            num = num + torch.einsum("bhnd,bhde->bhne", fq * w0[..., None], s0)
            den = den + torch.einsum("bhnd,bhd->bhn", fq * w0[..., None], z0)
        else:  # one state per document (B = 1)
            num = num + torch.einsum("bhnd,nhde->bhne", fq * w0[..., None], s0[doc])
            den = den + torch.einsum("bhnd,nhd->bhn", fq * w0[..., None], z0[doc])
    o = num / (den[..., None] + eps)
    if not output_final_state:
        return o
    kw = fk * (beta * torch.exp(-(x[..., last][..., doc] - x)))[..., None]  # decayed to the doc's end
    if seg is None:
        fs = torch.einsum("bhnd,bhne->bhde", kw, v)
        fz = kw.sum(2)
        if initial_state is not None:
            w_end = w0[..., n - 1][..., None]
            fs, fz = fs + w_end[..., None] * s0, fz + w_end * z0
    else:
        onehot = (doc[None, :] == torch.arange(first.numel(), device=q.device)[:, None]).to(acc)  # (docs, N)
        fs = torch.einsum("sn,hnd,hne->shde", onehot, kw[0], v[0])
        fz = torch.einsum("sn,hnd->shd", onehot, kw[0])
        if initial_state is not None:
            w_end = w0[0][:, last].t()  # (docs, H)
            fs, fz = fs + w_end[..., None, None] * s0, fz + w_end[..., None] * z0
    return o, DAState(fs, fz)
