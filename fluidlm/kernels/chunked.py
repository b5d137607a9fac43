"""Chunked Differential Attention in pure PyTorch: the CPU path and the fallback anywhere Triton
is missing. O(N·C) time and memory for chunk size C; never builds an N×N tensor.

Within a chunk the log-decay is cumulated locally (`b_t = Σ_{j≤t in chunk} g_j`), so every
applied factor exp(b_t - b_i), exp(b_t), exp(b_last - b_i) is ≤ 1; across chunks the state
(S and z, z as an extra column of v) is passed in fp32. The bidirectional form adds the
anti-causal sum as a strictly-causal scan over the reversed sequence whose decay is shifted by
one token (the factor for i > t is Π_{j=t+1..i} a_j: it includes the source's decay, not the
target's). Documents (`cu_seqlens`) are segment masks: a token never reads another segment, and
the passed state is dropped at a segment start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fluidlm.kernels.common import DAState, accumulation_dtype, feature_map_fn, input_weight, segment_ids


def chunked_differential_attention(
    q, k, v, g, *, causal, feature_map, eps, cu_seqlens, chunk_size=64, initial_state=None, return_state=False,
    output_final_state=False,
):
    """State, the op contract: `initial_state` a DAState (per row, or per document with `cu_seqlens`,
    B = 1 here) and `output_final_state=True` returns (o, DAState). The bidirectional form takes the
    initial state into its left (causal) part and returns the causal final state. With documents and a
    state the documents run one after another (a host loop: this is the CPU path and the fallback).

    Streaming (kept for `model.forward_stream`): `initial_state` a (B, H, d, dv+1) tensor (S and z side by
    side) and `return_state=True` returns (o, that tensor); causal, no documents."""
    legacy = return_state or isinstance(initial_state, torch.Tensor)
    if legacy and (not causal or cu_seqlens is not None):
        raise ValueError("state passing needs the causal form without cu_seqlens")
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        o, final = _per_document(q, k, v, g, causal=causal, feature_map=feature_map, eps=eps, cu_seqlens=cu_seqlens,
                                 chunk_size=chunk_size, initial_state=initial_state)
        return (o, final) if output_final_state else o
    acc = accumulation_dtype(q.dtype)
    n = q.shape[-2]
    dv = v.shape[-1]
    fq = feature_map_fn(q.to(acc), feature_map)
    g = g.to(acc)
    kb = feature_map_fn(k.to(acc), feature_map) * input_weight(g)[..., None]  # β_i φ(k_i)
    v_aug = torch.cat([v.to(acc), torch.ones_like(v[..., :1], dtype=acc)], dim=-1)
    seg = segment_ids(cu_seqlens, n, q.device)
    if initial_state is not None and not isinstance(initial_state, torch.Tensor):
        initial_state = DAState(*initial_state).augmented(acc)

    num, state = decayed_causal_scan(fq, kb, v_aug, g, seg, chunk_size, strict=False, initial_state=initial_state)
    if not causal:
        # Reversed position m reads decay g[N - m]; m = 0 (the last token) has no successor.
        g_next = torch.cat([g[..., 1:], torch.zeros_like(g[..., :1])], dim=-1)
        flip = lambda x, dim=2: torch.flip(x, dims=(dim,))  # noqa: E731
        anti, _ = decayed_causal_scan(
            flip(fq), flip(kb), flip(v_aug), flip(g_next), None if seg is None else flip(seg, 1),
            chunk_size, strict=True,
        )
        num = num + flip(anti)
    o = num[..., :dv] / (num[..., dv:] + eps)
    if return_state:
        return o, state
    return (o, DAState.from_augmented(state)) if output_final_state else o


def _per_document(q, k, v, g, *, cu_seqlens, initial_state, **kw):
    """Documents with states: each document on its own, with its own initial state (B = 1)."""
    cu = cu_seqlens.tolist()
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        st = None if initial_state is None else DAState(initial_state[0][i:i + 1], initial_state[1][i:i + 1])
        o, f = chunked_differential_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], g[:, :, s:e], cu_seqlens=None, initial_state=st,
            output_final_state=True, **kw,
        )
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, dim=2), DAState(torch.cat([f.S for f in finals]), torch.cat([f.z for f in finals]))


def decayed_causal_scan(q, k, v, g, seg, chunk_size, *, strict, initial_state=None):
    """o_t = Σ_{i≤t (i<t if strict), same segment} exp(Σ_{j=i+1..t} g_j) (q_t·k_i) v_i
    (+ exp(Σ_{j≤t} g_j) q_t·S_0 with an initial state S_0). Returns (o, state after the last token).

    q, k: (B, H, N, d); v: (B, H, N, e); g: (B, H, N) ≤ 0; seg: (1 or B, N) or None.
    """
    b, h, n, d = q.shape
    e = v.shape[-1]
    c = chunk_size
    pad = (-n) % c
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, pad))
        if seg is not None:
            seg = F.pad(seg, (0, pad), value=-1)
    nc = (n + pad) // c
    q, k, v = (x.reshape(b, h, nc, c, x.shape[-1]) for x in (q, k, v))
    bcum = g.reshape(b, h, nc, c).cumsum(-1)  # local cumulative log-decay, ≤ 0, non-increasing

    # Intra-chunk: masked matmul with decay matrix exp(b_t - b_i).
    visible = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1 if strict else 0)
    if seg is not None:
        seg = seg.reshape(seg.shape[0], 1, nc, c)
        visible = visible & (seg[..., :, None] == seg[..., None, :])
    log_decay = (bcum[..., :, None] - bcum[..., None, :]).masked_fill(~visible, float("-inf"))
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_decay)
    out = scores @ v

    # Inter-chunk: each chunk's contribution to the state, then a sequential scan over chunks.
    to_end = torch.exp(bcum[..., -1:] - bcum)  # (B, H, nc, C)
    carry = torch.exp(bcum[..., -1])  # (B, H, nc)
    from_start = torch.exp(bcum)
    if seg is not None:
        last = seg[..., -1]  # (·, 1, nc): segment of each chunk's last token
        prev_last = torch.cat([torch.full_like(last[..., :1], -2), last[..., :-1]], dim=-1)
        to_end = to_end * (seg == last[..., None])
        carry = carry * (last == prev_last)
        from_start = from_start * (seg == prev_last[..., None])
    contrib = (k * to_end[..., None]).transpose(-1, -2) @ v  # (B, H, nc, d, e)

    state = q.new_zeros(b, h, d, e) if initial_state is None else initial_state.to(q.dtype)
    states = []
    for i in range(nc):
        states.append(state)
        state = carry[:, :, i, None, None] * state + contrib[:, :, i]
    states = torch.stack(states, dim=2)
    out = out + (q * from_start[..., None]) @ states
    # Padding has g = 0 and k = 0, so the final state is the state after the last real token.
    return out.reshape(b, h, nc * c, e)[:, :, :n], state
