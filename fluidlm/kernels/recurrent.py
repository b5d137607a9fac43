"""Token-by-token Differential Attention: the O(N) recurrence of docs/design.md §1.

    S_t = a_t S_{t-1} + β_t φ(k_t) v_tᵀ      z_t = a_t z_{t-1} + β_t φ(k_t)
    o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε)

`z` rides along as an extra column of `S` (v augmented with ones). The bidirectional form adds
the backward scan R_t = a_{t+1} (β_{t+1} φ(k_{t+1}) v_{t+1}ᵀ + R_{t+1}). Used by tests, and by
generation and streaming evaluation through `recurrent_step`.
"""

from __future__ import annotations

import torch

from fluidlm.kernels.common import DAState, accumulation_dtype, feature_map_fn, input_weight, segment_ids


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def recurrent_step(state, fq_t, fk_t, v_aug_t, g_t):
    """One token. state: (B, H, d, dv+1); fq_t, fk_t: (B, H, d); v_aug_t: (B, H, dv+1); g_t: (B, H).

    Returns (new_state, unnormalised numerator/denominator (B, H, dv+1))."""
    a = torch.exp(g_t)[..., None, None]
    beta = input_weight(g_t)[..., None, None]
    state = a * state + beta * fk_t[..., :, None] * v_aug_t[..., None, :]
    return state, torch.einsum("bhd,bhde->bhe", fq_t, state)


def recurrent_differential_attention(q, k, v, g, *, causal, feature_map, eps, cu_seqlens, chunk_size=None,
                                     initial_state=None, output_final_state=False):
    """State (DAState): one per row, or one per document with `cu_seqlens` (B = 1): a document's
    initial state is loaded at its first token, its final state read after its last token."""
    acc = accumulation_dtype(q.dtype)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    fq = feature_map_fn(q.to(acc), feature_map)
    fk = feature_map_fn(k.to(acc), feature_map)
    v_aug = _with_ones(v.to(acc))
    g = g.to(acc)
    seg = segment_ids(cu_seqlens, n, q.device)
    cu = [0, n] if seg is None else cu_seqlens.tolist()
    starts = {s: i for i, s in enumerate(cu[:-1])}
    ends = {e - 1: i for i, e in enumerate(cu[1:])}
    init = None if initial_state is None else DAState(*initial_state).augmented(acc)

    state = q.new_zeros(b, h, d, dv + 1, dtype=acc)
    finals = [None] * (len(cu) - 1)
    outs = []
    for t in range(n):
        if t in starts:
            state = torch.zeros_like(state) if init is None else (init if seg is None else init[starts[t]][None])
        state, out = recurrent_step(state, fq[:, :, t], fk[:, :, t], v_aug[:, :, t], g[:, :, t])
        outs.append(out)
        if t in ends:
            finals[ends[t]] = state
    num = torch.stack(outs, dim=2)

    if not causal:
        back = torch.zeros_like(state)  # R_t, built from t = N-1 down
        backs = [back]
        for t in range(n - 2, -1, -1):
            if t + 1 in starts:
                back = torch.zeros_like(back)
            else:
                a = torch.exp(g[:, :, t + 1])[..., None, None]
                beta = input_weight(g[:, :, t + 1])[..., None, None]
                back = a * (beta * fk[:, :, t + 1, :, None] * v_aug[:, :, t + 1, None, :] + back)
            backs.append(back)
        backs = torch.stack(backs[::-1], dim=2)  # (B, H, N, d, dv+1)
        num = num + torch.einsum("bhnd,bhnde->bhne", fq, backs)

    o = num[..., :dv] / (num[..., dv:] + eps)
    if not output_final_state:
        return o
    final = finals[0] if seg is None else torch.cat(finals, dim=0)
    return o, DAState.from_augmented(final)
