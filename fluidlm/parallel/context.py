"""Context parallelism (docs/design.md §4): the sequence is split into CP contiguous, equal shards, one per
rank of a CP process group, and every layer that mixes tokens gets what it needs from the other shards
with traffic that does not grow with the sequence length.

Differential Attention. Over a shard [s, e) the causal state (S and z, z as the ones-column of v, shape
(B, H, d, dv+1)) is an affine map of the state that enters it:

    S(e) = A · S(s) + U,    A = exp(Σ_{j∈[s,e)} g_j) · [no document starts in [s, e)],
                            U = the shard's own final state started from zero.

One all-gather of the per-rank summaries (A, U) (and U' below), B·H·(1 + d·(dv+1)) numbers per rank
(B·H·(1 + 2·d·(dv+1)) bidirectional) whatever N,
and a prefix combine S(s_r) = Σ_{r'<r} (Π_{r'<r''<r} A_{r''}) U_{r'} give every rank its incoming state;
it reaches the tokens of the shard's first document when that document began on an earlier rank, decayed
by exp(Σ_{j=s..t} g_j). The bidirectional form adds the anti-causal sum, whose state entering a shard
from the right, R(e) = Σ_{i≥e, same document as e-1} exp(Σ_{j=e..i} g_j) β_i φ(k_i) v_iᵀ, obeys the
mirror recurrence R(s) = A · R(e) + U' with the same A and U' = [s does not start a document] ·
Σ_{i∈[s,e), document of s} exp(Σ_{j=s..i} g_j) β_i φ(k_i) v_iᵀ, combined as a suffix over later ranks.
It reaches the tokens of the shard's last document decayed by exp(Σ_{j=t+1..e-1} g_j).

The all-gather is autograd-aware (backward: all-reduce of the gathered gradient, each rank keeps its own
slice), so gradients flow to the summaries of earlier (and, bidirectional, later) ranks. Works on gloo
(CPU) and NCCL.

PDE diffusion and the flow encoder read a bounded neighbourhood: `exchange_halo` fetches the previous
rank's last tokens (and the next rank's first tokens) point-to-point; K steps of stencils of reach
max(S) need max(S)·K of them, the width-4 causal conv of the flow encoder 3. Document edges come from
the GLOBAL `cu_seqlens`, so Neumann edges sit where they would on one rank.

The causal form runs the DA op itself (`fluidlm.kernels.differential_attention`, any backend: Triton
on GPUs) on the shard, with the incoming state as the `initial_state` of the shard's first document;
the summary U is one matmul. The bidirectional form also needs the state entering from the right,
which the op does not take: it runs the torch scan below.

How the model uses it: `parallelize` hands a `ContextParallel` to the DA layers, their flow encoders
and the PDE layer (their `context_parallel` attribute); those layers then ask it for halos and for
the attention of their shard. Nothing in the model is replaced.

Interface convention: every function takes the rank's shard (B, ·, N_local, ·) plus the GLOBAL
`cu_seqlens` ([0, …, N], N = cp · N_local, FlashAttention's convention, B = 1) and the CP `group`; a
rank's shard is [rank · N_local, (rank + 1) · N_local) (see `shard_sequence`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fluidlm.kernels import DAState, differential_attention
from fluidlm.kernels.chunked import decayed_causal_scan
from fluidlm.kernels.common import accumulation_dtype, feature_map_fn, input_weight


# --------------------------------------------------------------------------------------------------
# Sharding and bookkeeping


def shard_range(n: int, rank: int, cp: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s contiguous, equal shard of a length-n sequence."""
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"need 0 <= rank < cp, got rank={rank}, cp={cp}")
    if n % cp:
        raise ValueError(f"sequence length {n} is not divisible by the context-parallel size {cp}: "
                         f"pad or choose a length that is a multiple of {cp}")
    size = n // cp
    return rank * size, (rank + 1) * size


def shard_sequence(x: torch.Tensor, rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s contiguous shard of a (B, N, ...) batch (sequence along `dim`); N % cp == 0."""
    start, end = shard_range(x.shape[dim], rank, cp)
    return x.narrow(dim, start, end - start)


def _group_info(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _group_peer(group, group_rank: int) -> int:
    """Global rank of the group's member `group_rank` (what p2p calls take)."""
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def window_cu_seqlens(cu_seqlens: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    """The global document boundaries seen from the window [start, start + length): [0, …, length],
    with the window's ends as edges (only halo tokens, whose values are discarded, may be wrong)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(torch.long).cpu()
    inner = cu[(cu > start) & (cu < start + length)] - start
    return torch.cat([cu.new_zeros(1), inner, cu.new_full((1,), length)])


def _check_global_cu(cu_seqlens: torch.Tensor | None, n_global: int, batch: int) -> None:
    if cu_seqlens is None:
        return
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be the GLOBAL 1-D integer tensor [0, n_1, n_1+n_2, ..., N]")
    if batch != 1:
        raise ValueError(f"cu_seqlens packs documents along N and needs batch size 1, got B={batch}")
    if cu_seqlens.is_cuda:  # checking the values would synchronise with the device
        return
    cu = cu_seqlens.tolist()
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != n_global or any(x >= y for x, y in itertools.pairwise(cu)):
        raise ValueError(
            f"cu_seqlens must be global: start at 0, end at N = cp·N_local = {n_global} and strictly "
            f"increase; got {cu[:8]}{'...' if len(cu) > 8 else ''}"
        )


@dataclass
class CommStats:
    """Bytes this process received through the CP collectives (forward and backward), for tests and
    benchmarks. `calls` counts `cp_differential_attention` summary gathers."""

    gathered_bytes: int = 0
    reduced_bytes: int = 0
    halo_bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.gathered_bytes = self.reduced_bytes = self.halo_bytes = self.calls = 0


comm_stats = CommStats()


# --------------------------------------------------------------------------------------------------
# Autograd-aware collectives


class _GatherSummaries(torch.autograd.Function):
    """(numel,) per rank -> (P, numel) on every rank; backward all-reduces the (P, numel) gradient
    (every rank's loss reads every summary) and keeps this rank's row."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        rank, world = _group_info(group)
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        comm_stats.gathered_bytes += x.numel() * x.element_size() * world
        comm_stats.calls += 1
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        comm_stats.reduced_bytes += grad.numel() * grad.element_size()
        return grad[ctx.rank], None


def gather_summaries(x: torch.Tensor, group=None) -> torch.Tensor:
    return _GatherSummaries.apply(x, group)


class _ExchangeHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, left, right, dim, group):
        rank, world = _group_info(group)
        ctx.meta = (left, right, dim, group, rank, world, x.shape[dim])
        n = x.shape[dim]
        has_prev, has_next = rank > 0, rank < world - 1
        recv_left = _empty_along(x, dim, left if has_prev else 0)
        recv_right = _empty_along(x, dim, right if has_next else 0)
        _p2p(
            sends=[(x.narrow(dim, n - left, left), rank + 1) if has_next and left else None,
                   (x.narrow(dim, 0, right), rank - 1) if has_prev and right else None],
            recvs=[(recv_left, rank - 1) if has_prev and left else None,
                   (recv_right, rank + 1) if has_next and right else None],
            group=group,
        )
        comm_stats.halo_bytes += (recv_left.numel() + recv_right.numel()) * x.element_size()
        return torch.cat([recv_left, x, recv_right], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        left, right, dim, group, rank, world, n = ctx.meta
        has_prev, has_next = rank > 0, rank < world - 1
        lh = left if has_prev else 0
        rh = right if has_next else 0
        grad = grad.contiguous()
        gx = grad.narrow(dim, lh, n).clone()
        from_next = _empty_along(gx, dim, left if has_next else 0)  # grads of my last `left` tokens
        from_prev = _empty_along(gx, dim, right if has_prev else 0)  # grads of my first `right` tokens
        _p2p(
            sends=[(grad.narrow(dim, 0, lh), rank - 1) if lh else None,
                   (grad.narrow(dim, lh + n, rh), rank + 1) if rh else None],
            recvs=[(from_next, rank + 1) if has_next and left else None,
                   (from_prev, rank - 1) if has_prev and right else None],
            group=group,
        )
        if from_next.numel():
            gx.narrow(dim, n - left, left).add_(from_next)
        if from_prev.numel():
            gx.narrow(dim, 0, right).add_(from_prev)
        return gx, None, None, None, None


def _empty_along(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = size
    return x.new_empty(shape)


def _p2p(sends, recvs, group) -> None:
    """All of this rank's halo sends and receives as ONE batch_isend_irecv (as Megatron does): NCCL
    then runs them as one group, so neighbours that send to each other cannot deadlock on the order
    of separate isend/irecv calls. Every rank of the group calls it (an end rank has one peer)."""
    keep = [(t.contiguous(), peer) for t, peer in filter(None, sends)]  # alive until the waits return
    ops = [dist.P2POp(dist.isend, t, _group_peer(group, peer), group=group) for t, peer in keep]
    ops += [dist.P2POp(dist.irecv, t, _group_peer(group, peer), group=group) for t, peer in filter(None, recvs)]
    if not ops:  # no halo (left = right = 0): every rank of the group has none
        return
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def exchange_halo(x: torch.Tensor, left: int, right: int, group=None, dim: int = 1) -> torch.Tensor:
    """cat([previous rank's last `left` tokens, x, next rank's first `right` tokens]) along `dim`
    (no halo at the global ends). Autograd-aware: the halo's gradients go back to their owners.
    Point-to-point (gloo and NCCL); needs left, right <= the shard length."""
    n = x.shape[dim]
    if left > n or right > n:
        raise ValueError(f"halo ({left}, {right}) is longer than the shard ({n} tokens): use fewer CP ranks "
                         f"or a longer sequence")
    return _ExchangeHalo.apply(x, left, right, dim, group)


# --------------------------------------------------------------------------------------------------
# Differential Attention


def cp_differential_attention(
    q, k, v, g, *, causal=True, feature_map="sigmoid", eps=1e-6, cu_seqlens=None, chunk_size=64, group=None,
    backend="chunked",
):
    """Differential Attention (docs/design.md §1) over a sequence split across the CP `group`.

    q, k: (B, H, N_local, d); v: (B, H, N_local, dv); g: (B, H, N_local) ≤ 0 — this rank's contiguous
    shard [rank·N_local, (rank+1)·N_local). `cu_seqlens`: the GLOBAL document boundaries (B = 1).
    Returns this rank's (B, H, N_local, dv) output in q's dtype, equal to slicing the single-process
    result. Collective: every rank of the group must call it (same shapes). Causal: the DA op on
    `backend` with the incoming state; bidirectional: the torch scan (the op takes no state from the right).
    """
    rank, world = _group_info(group)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    start = rank * n
    _check_global_cu(cu_seqlens, n * world, b)
    acc = accumulation_dtype(q.dtype)
    g = g.to(acc)
    kb = feature_map_fn(k.to(acc), feature_map) * input_weight(g)[..., None]  # β_i φ(k_i)
    v_aug = torch.cat([v.to(acc), torch.ones_like(v[..., :1], dtype=acc)], dim=-1)
    seg, starts_here, first_continues = _shard_documents(cu_seqlens, start, n, q.device)
    g64 = g.to(torch.float64)  # shard-long decay sums in fp64: long shards lose no precision
    a = (torch.exp(g64.sum(-1)) * (1.0 - starts_here)).to(acc)  # (B, H): how the incoming state carries through
    if not causal:
        return _bidirectional(q, kb, v_aug, g, g64, a, seg, first_continues, feature_map, eps, chunk_size, group)

    # U: the shard's final state from zero, Σ_{i in the last document} exp(Σ_{j=i+1..e-1} g_j) β_i φ(k_i) v_iᵀ.
    last_doc = torch.ones(1, n, dtype=acc, device=q.device) if seg is None else (seg == seg[:, -1:]).to(acc)
    to_end = (torch.exp(g64.sum(-1, keepdim=True) - torch.cumsum(g64, -1)).to(acc) * last_doc)[..., None]
    u = (kb * to_end).transpose(-1, -2) @ v_aug  # (B, H, d, dv+1)
    gathered = gather_summaries(torch.cat([a.reshape(-1), u.reshape(-1)]), group)  # the only communication
    a_all = gathered[:, :b * h].reshape(world, b, h, 1, 1)
    u_all = gathered[:, b * h:].reshape(world, b, h, d, dv + 1)
    # Prefix combine: the state after token start-1. Started from a zero that is part of the graph, so
    # every rank's backward reaches the all-reduce (rank 0 included).
    state_in = u_all[0] * 0.0
    for j in range(rank):
        state_in = a_all[j] * state_in + u_all[j]
    state_in = state_in * first_continues  # it reaches the first document only if that began earlier
    local_cu = window_cu_seqlens(cu_seqlens, start, n)
    if local_cu is not None:  # one initial state per local document: the incoming one, then zeros
        local_cu = local_cu.to(q.device)
        state_in = torch.cat([state_in, state_in.new_zeros(local_cu.numel() - 2, h, d, dv + 1)])
    initial = DAState.from_augmented(state_in)
    return differential_attention(q, k, v, g.to(q.dtype), causal=True, feature_map=feature_map, eps=eps,
                                  cu_seqlens=local_cu, chunk_size=chunk_size, backend=backend,
                                  initial_state=DAState(initial.S.contiguous(), initial.z.contiguous()))


def _shard_documents(cu_seqlens, start: int, n: int, device):
    """(document index of each local token (1, n) or None, 1.0 if a document starts in [start, start+n)
    else 0.0, 1.0 if the shard's first document began on an earlier rank else 0.0), without a host sync."""
    if cu_seqlens is None:
        return None, float(start == 0), float(start > 0)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seg = (torch.searchsorted(cu, torch.arange(start, start + n, device=device), right=True) - 1)[None]
    inside = (cu >= start) & (cu < start + n)
    return seg, inside.any().to(torch.float64), 1.0 - (cu == start).any().to(torch.float64)


def _bidirectional(q, kb, v_aug, g, g64, a, seg, first_continues, feature_map, eps, chunk_size, group):
    """The bidirectional form on the torch scan: the causal and the anti-causal sums of the shard,
    plus the states entering from the left (prefix combine) and from the right (suffix combine)."""
    rank, world = _group_info(group)
    b, h, n, d = q.shape
    dv = v_aug.shape[-1] - 1
    acc = kb.dtype
    fq = feature_map_fn(q.to(acc), feature_map)
    num, u_fwd = _scan(fq, kb, v_aug, g, seg, chunk_size, strict=False)
    g_next = torch.cat([g[..., 1:], torch.zeros_like(g[..., :1])], dim=-1)
    anti, u_rev = _scan(_flip(fq), _flip(kb), _flip(v_aug), _flip(g_next),
                        None if seg is None else _flip(seg, 1), chunk_size, strict=True)
    num = num + _flip(anti)
    # u_rev = Σ_i exp(Σ_{j=s+1..i} g_j) k_i v_iᵀ over the first document; U' adds g_s.
    u_bwd = u_rev * torch.exp(g[..., 0])[..., None, None] * first_continues

    gathered = gather_summaries(torch.cat([a.reshape(-1), u_fwd.reshape(-1), u_bwd.reshape(-1)]), group)
    sz, ssz = b * h, b * h * d * (dv + 1)
    a_all = gathered[:, :sz].reshape(world, b, h, 1, 1)
    u_all = gathered[:, sz:sz + ssz].reshape(world, b, h, d, dv + 1)
    ub_all = gathered[:, sz + ssz:].reshape(world, b, h, d, dv + 1)

    state_in = u_all[0] * 0.0
    for j in range(rank):
        state_in = a_all[j] * state_in + u_all[j]
    first_doc = torch.ones(1, n, dtype=acc, device=q.device) if seg is None else (seg == seg[:, :1]).to(acc)
    decay_in = torch.exp(torch.cumsum(g64, -1)).to(acc) * first_doc * first_continues  # exp(Σ_{s..t} g)
    num = num + (fq * decay_in[..., None]) @ state_in

    state_right = ub_all[world - 1] * 0.0
    for j in range(world - 1, rank, -1):
        state_right = a_all[j] * state_right + ub_all[j]
    last_doc = torch.ones(1, n, dtype=acc, device=q.device) if seg is None else (seg == seg[:, -1:]).to(acc)
    to_end = (g64.sum(-1, keepdim=True) - torch.cumsum(g64, -1)).clamp(max=0.0)  # Σ_{j=t+1..e-1} g_j
    num = num + (fq * (torch.exp(to_end).to(acc) * last_doc)[..., None]) @ state_right
    o = num[..., :dv] / (num[..., dv:] + eps)
    return o.to(q.dtype)


def _flip(x, dim=2):
    return torch.flip(x, dims=(dim,))


def _scan(q, k, v, g, seg, chunk_size, *, strict):
    """decayed_causal_scan from a zero state, padded here so that its final state is right with
    segments too (the kernel pads segments with -1, which would drop the last document's state)."""
    n = q.shape[2]
    pad = (-n) % chunk_size
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(-1, pad)], dim=1)
    out, state = decayed_causal_scan(q, k, v, g, seg, chunk_size, strict=strict)
    return out[:, :, :n], state


# --------------------------------------------------------------------------------------------------
# How the model's layers use it


class ContextParallel:
    """The CP context `parallelize` hands to the DA layers, their flow encoders and the PDE layer
    (their `context_parallel` attribute): what a layer asks for to run on this rank's shard."""

    def __init__(self, group):
        self.group = group

    def halo(self, x: torch.Tensor, left: int, right: int, cu_seqlens: torch.Tensor | None):
        """(window, the window's document boundaries, offset of the shard in the window): the shard x
        (B, N_local, ·) with `left` tokens of the previous rank and `right` of the next; the boundaries
        come from the GLOBAL `cu_seqlens`, so document edges sit where they would on one rank."""
        rank, world = _group_info(self.group)
        n = x.shape[1]
        _check_global_cu(cu_seqlens, n * world, x.shape[0])
        window = exchange_halo(x, left, right, self.group)
        offset = left if rank > 0 else 0
        return window, window_cu_seqlens(cu_seqlens, rank * n - offset, window.shape[1]), offset

    def differential_attention(self, q, k, v, g, *, cu_seqlens, **op):
        return cp_differential_attention(q, k, v, g, cu_seqlens=cu_seqlens, group=self.group, **op)


def apply_context_parallel(model, group) -> None:
    """Make a FluidLM (or one of its layers) run on this rank's shard of every sequence: every
    module with a `context_parallel` attribute (DA layers, flow encoders, the PDE layer) gets the CP
    context. Callers then pass the rank's shard of tokens with the GLOBAL cu_seqlens."""
    if getattr(getattr(model, "config", None), "attention", "da") != "da":
        raise ValueError("context parallelism needs attention='da' (the softmax baseline has no CP path)")
    context = None if group is False else ContextParallel(group)
    for module in model.modules():
        if hasattr(module, "context_parallel"):
            module.context_parallel = context


def _on_shard(module, x, cu_seqlens, group):
    apply_context_parallel(module, group)
    try:
        return module(x, cu_seqlens)
    finally:
        apply_context_parallel(module, False)


def cp_pde_diffusion(pde, u: torch.Tensor, cu_seqlens: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """`PDEDiffusion` on this rank's shard u (B, N_local, C) under CP (tests and benchmarks)."""
    return _on_shard(pde, u, cu_seqlens, group)


def cp_attention_layer(layer, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """`DifferentialAttentionLayer` on this rank's shard x (B, N_local, d_model) under CP (tests)."""
    return _on_shard(layer, x, cu_seqlens, group)


__all__ = [
    "apply_context_parallel", "CommStats", "comm_stats", "ContextParallel", "cp_attention_layer",
    "cp_differential_attention", "cp_pde_diffusion", "exchange_halo", "gather_summaries", "shard_range",
    "shard_sequence", "window_cu_seqlens",
]
