"""Differential Attention with fused chunked Triton kernels: the GPU path (docs/design.md §1, item 4).

Decomposition (φ, β and the normalisation stay in PyTorch autograd; Triton does the O(N) part):

    fq = φ(q),  fk = φ(k)·β,  β = -expm1(g)                                   (torch, fp32)
    num_t = Σ_{i≤t (i<t if strict), same document} exp(G_t - G_i) (fq_t·fk_i) v_i   (Triton)
    den_t = Σ_{same set}                             exp(G_t - G_i) (fq_t·fk_i)       (Triton)
    o_t   = num_t / (den_t + ε)                                                   (torch)

with G the cumulative log-decay. The bidirectional form adds the strictly anti-causal sum as the same
kernel run on the flipped sequence with the decay shifted by one token (exactly as chunked.py does).

Kernels (one program per (batch·head, block of BV value columns), sequential over chunks of BT
tokens, the d×BV state S and the d-vector z in fp32 registers; nothing per token is stored):

* `_fwd_kernel`: per chunk, the log-decay is cumulated locally (`b = cumsum(g)` within the chunk),
  so every applied factor exp(b_t - b_i), exp(b_t), exp(b_last - b_i), exp(b_last) is ≤ 1.
  Intra-chunk: masked (causal / strict, same document) decayed score matrix A = (fq fkᵀ)⊙D;
  inter-chunk: (fq ⊙ exp(b)) S.  Then S ← exp(b_last) S + (fk ⊙ exp(b_last - b))ᵀ v.
* `_bwd_dq_kernel` (forward sweep, recomputes S chunk by chunk):
  dfq = (dA ⊙ D) fk + exp(b) ⊙ (dnum Sᵀ + dden zᵀ),   dA = dnum vᵀ + dden 1ᵀ.
* `_bwd_dkv_kernel` (reverse sweep over chunks, carries dS, dz — the gradient of the state entering
  the next chunk): dfk = (dA ⊙ D)ᵀ fq + exp(b_last - b) ⊙ (v dSᵀ + dz),
  dv = Aᵀ dnum + exp(b_last - b) ⊙ (fk dS);  then dS ← exp(b_last) dS + (fq ⊙ exp(b))ᵀ dnum.
* dg (scalar decay identity): every term carries exp(G_t - G_i), so ∂L/∂G_t = fq_t·dfq_t - fk_t·dfk_t,
  and g_j enters every G_t with t ≥ j: dg = reverse-cumsum(fq·dfq - fk·dfk) (torch, fp32).

With V split over programs, each program writes its partial dfq / dfk (summed in torch); the
normaliser terms (den, z) are owned by value block 0. Documents: per-token segment ids; a token only
reads its own segment, the carried state is dropped when a chunk's last token starts a new document
relative to the previous chunk's last token, exactly like chunked.py. All offsets are int64.

Dot precision: "ieee" for fp32 inputs (matches the fp32 reference to ~1e-6), "tf32" for bf16/fp16
inputs (operands are the fp32 features; accumulation always fp32). fp64 inputs are delegated to the
`chunked` backend (the fp64 path is the gradcheck reference).

The kernels are decorated when this module is imported, so `TRITON_INTERPRET=1` must be set before
that (then they run on CPU tensors through Triton's interpreter). `fluidlm.kernels.dispatch` imports
this module lazily, on first use of the triton backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fluidlm.kernels.common import feature_map_fn, input_weight, segment_ids, strict_kernels

INTERPRET = bool(triton.knobs.runtime.interpret)
_MAX_BV = 64  # value-column block per program (tests lower it to exercise several value blocks)
_MAX_BT = 64


@triton.jit
def _chunk_setup(g_ptr, seg_ptr, i_c, N, o_t, BT: tl.constexpr, STRICT: tl.constexpr, HAS_SEG: tl.constexpr):
    """Local cumulative log-decay and the masks of chunk i_c (see the module docstring)."""
    t = (i_c * BT + o_t).to(tl.int64)
    m_t = t < N
    gg = tl.load(g_ptr + t, mask=m_t, other=0.0).to(tl.float32)
    b = tl.cumsum(gg, axis=0)
    b_last = tl.sum(gg, axis=0)  # padding has g = 0: the cumulative decay at the last real token
    if STRICT:
        mask = o_t[:, None] > o_t[None, :]
    else:
        mask = o_t[:, None] >= o_t[None, :]
    start_w = tl.exp(b)
    end_w = tl.exp(b_last - b)
    carry = tl.exp(b_last)
    if HAS_SEG:
        s = tl.load(seg_ptr + t, mask=m_t, other=-1)
        end = tl.minimum(i_c * BT + BT, N) - 1
        s_last = tl.load(seg_ptr + end)
        prev_idx = tl.maximum(i_c * BT - 1, 0)
        s_prev = tl.load(seg_ptr + prev_idx)
        s_prev = tl.where(i_c > 0, s_prev, -2)
        mask = mask & (s[:, None] == s[None, :])
        start_w = tl.where(s == s_prev, start_w, 0.0)
        end_w = tl.where(s == s_last, end_w, 0.0)
        carry = tl.where(s_last == s_prev, carry, 0.0)
    decay = tl.exp(tl.where(mask, b[:, None] - b[None, :], float("-inf")))
    return t, m_t, decay, start_w, end_w, carry


@triton.jit
def _fwd_kernel(
    fq_ptr, fk_ptr, v_ptr, g_ptr, seg_ptr, num_ptr, den_ptr,
    N, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STRICT: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)  # B·H on grid dim 0 (dims 1 and 2 stop at 65,535)
    i_v = tl.program_id(1)
    fq_ptr += i_bh * N * K
    fk_ptr += i_bh * N * K
    v_ptr += i_bh * N * V
    num_ptr += i_bh * N * V
    g_ptr += i_bh * N
    den_ptr += i_bh * N
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    first = i_v == 0
    h = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    for i_c in range(0, tl.cdiv(N, BT)):
        t, m_t, decay, start_w, end_w, carry = _chunk_setup(g_ptr, seg_ptr, i_c, N, o_t, BT, STRICT, HAS_SEG)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        fq = tl.load(fq_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        fk = tl.load(fk_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        a = tl.dot(fq, tl.trans(fk), input_precision=PREC) * decay
        qs = fq * start_w[:, None]
        num = tl.dot(a, vv, input_precision=PREC) + tl.dot(qs, h, input_precision=PREC)
        tl.store(num_ptr + t[:, None] * V + o_v[None, :], num, mask=m_tv)
        den = tl.sum(a, axis=1) + tl.sum(qs * z[None, :], axis=1)
        tl.store(den_ptr + t, den, mask=m_t & first)
        ke = fk * end_w[:, None]
        h = h * carry + tl.dot(tl.trans(ke), vv, input_precision=PREC)
        z = z * carry + tl.sum(ke, axis=0)


@triton.jit
def _bwd_dq_kernel(
    fq_ptr, fk_ptr, v_ptr, g_ptr, seg_ptr, dnum_ptr, dden_ptr, dq_ptr,
    N, K, V, BH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STRICT: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)  # B·H on grid dim 0 (dims 1 and 2 stop at 65,535)
    i_v = tl.program_id(1)
    fq_ptr += i_bh * N * K
    fk_ptr += i_bh * N * K
    v_ptr += i_bh * N * V
    dnum_ptr += i_bh * N * V
    g_ptr += i_bh * N
    dden_ptr += i_bh * N
    dq_ptr += (i_v.to(tl.int64) * BH + i_bh) * N * K  # partial dfq of this value block
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    first = (i_v == 0).to(tl.float32)
    h = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    for i_c in range(0, tl.cdiv(N, BT)):
        t, m_t, decay, start_w, end_w, carry = _chunk_setup(g_ptr, seg_ptr, i_c, N, o_t, BT, STRICT, HAS_SEG)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        fk = tl.load(fk_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        do = tl.load(dnum_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        dd = tl.load(dden_ptr + t, mask=m_t, other=0.0).to(tl.float32) * first
        da = (tl.dot(do, tl.trans(vv), input_precision=PREC) + dd[:, None]) * decay
        dq = tl.dot(da, fk, input_precision=PREC)
        dq += start_w[:, None] * (tl.dot(do, tl.trans(h), input_precision=PREC) + dd[:, None] * z[None, :])
        tl.store(dq_ptr + t[:, None] * K + o_k[None, :], dq, mask=m_tk)
        ke = fk * end_w[:, None]
        h = h * carry + tl.dot(tl.trans(ke), vv, input_precision=PREC)
        z = z * carry + tl.sum(ke, axis=0)


@triton.jit
def _bwd_dkv_kernel(
    fq_ptr, fk_ptr, v_ptr, g_ptr, seg_ptr, dnum_ptr, dden_ptr, dk_ptr, dv_ptr,
    N, K, V, BH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STRICT: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)  # B·H on grid dim 0 (dims 1 and 2 stop at 65,535)
    i_v = tl.program_id(1)
    fq_ptr += i_bh * N * K
    fk_ptr += i_bh * N * K
    v_ptr += i_bh * N * V
    dnum_ptr += i_bh * N * V
    dv_ptr += i_bh * N * V
    g_ptr += i_bh * N
    dden_ptr += i_bh * N
    dk_ptr += (i_v.to(tl.int64) * BH + i_bh) * N * K  # partial dfk of this value block
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    first = (i_v == 0).to(tl.float32)
    dh = tl.zeros([BK, BV], dtype=tl.float32)  # ∂L/∂S of the state entering the next chunk
    dz = tl.zeros([BK], dtype=tl.float32)
    n_chunks = tl.cdiv(N, BT)
    for j in range(0, n_chunks):
        i_c = n_chunks - 1 - j
        t, m_t, decay, start_w, end_w, carry = _chunk_setup(g_ptr, seg_ptr, i_c, N, o_t, BT, STRICT, HAS_SEG)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        fq = tl.load(fq_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        fk = tl.load(fk_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        do = tl.load(dnum_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        dd = tl.load(dden_ptr + t, mask=m_t, other=0.0).to(tl.float32) * first
        a = tl.dot(fq, tl.trans(fk), input_precision=PREC) * decay
        da = (tl.dot(do, tl.trans(vv), input_precision=PREC) + dd[:, None]) * decay
        dk = tl.dot(tl.trans(da), fq, input_precision=PREC)
        dk += end_w[:, None] * (tl.dot(vv, tl.trans(dh), input_precision=PREC) + first * dz[None, :])
        dvv = tl.dot(tl.trans(a), do, input_precision=PREC)
        dvv += end_w[:, None] * tl.dot(fk, dh, input_precision=PREC)
        tl.store(dk_ptr + t[:, None] * K + o_k[None, :], dk, mask=m_tk)
        tl.store(dv_ptr + t[:, None] * V + o_v[None, :], dvv, mask=m_tv)
        qs = fq * start_w[:, None]
        dh = dh * carry + tl.dot(tl.trans(qs), do, input_precision=PREC)
        dz = dz * carry + tl.sum(qs * dd[:, None], axis=0)


def _blocks(k: int, v: int, chunk_size: int):
    bk = max(16, triton.next_power_of_2(k))
    bv = min(max(16, triton.next_power_of_2(v)), _MAX_BV)
    bt = min(max(16, triton.next_power_of_2(chunk_size)), _MAX_BT)
    num_warps = 4 if bk * bv <= 4096 else 8
    return bt, bk, bv, num_warps


def _check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(
            "the triton DA kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "fluidlm.kernels.triton_da is imported (CPU tensors through the interpreter)"
        )


def _launch_forward(fq, fk, v, g, seg, strict, chunk_size, prec):
    b, h, n, k = fq.shape
    dv = v.shape[-1]
    bt, bk, bv, warps = _blocks(k, dv, chunk_size)
    num = torch.empty(b, h, n, dv, dtype=torch.float32, device=fq.device)
    den = torch.empty(b, h, n, dtype=torch.float32, device=fq.device)
    grid = (b * h, triton.cdiv(dv, bv))
    _fwd_kernel[grid](
        fq, fk, v, g, seg if seg is not None else g, num, den, n, k, dv,
        BT=bt, BK=bk, BV=bv, STRICT=strict, HAS_SEG=seg is not None, PREC=prec, num_warps=warps,
    )
    return num, den


def _launch_backward(fq, fk, v, g, seg, dnum, dden, strict, chunk_size, prec):
    b, h, n, k = fq.shape
    dv = v.shape[-1]
    bt, bk, bv, warps = _blocks(k, dv, chunk_size)
    nv = triton.cdiv(dv, bv)
    dq = torch.empty(nv, b, h, n, k, dtype=torch.float32, device=fq.device)
    dk = torch.empty(nv, b, h, n, k, dtype=torch.float32, device=fq.device)
    dvv = torch.empty(b, h, n, dv, dtype=torch.float32, device=fq.device)
    seg_arg = seg if seg is not None else g
    meta = dict(BT=bt, BK=bk, BV=bv, STRICT=strict, HAS_SEG=seg is not None, PREC=prec, num_warps=warps)
    _bwd_dq_kernel[(b * h, nv)](fq, fk, v, g, seg_arg, dnum, dden, dq, n, k, dv, b * h, **meta)
    # one pipeline stage at d = 128: with the default three dkv over-filled shared memory (sm_90 and sm_80)
    _bwd_dkv_kernel[(b * h, nv)](fq, fk, v, g, seg_arg, dnum, dden, dk, dvv, n, k, dv, b * h, **meta,
                                 num_stages=1 if bk * bv > 4096 else 3)
    dq = dq.sum(0) if nv > 1 else dq[0]
    dk = dk.sum(0) if nv > 1 else dk[0]
    return dq, dk, dvv


_BACKWARD_FALLBACK_WARNED = False


class DecayedScan(torch.autograd.Function):
    """(num, den) of the module docstring; fq, fk, g fp32, v any float dtype; seg (N,) int32 or None."""

    @staticmethod
    def forward(ctx, fq, fk, v, g, seg, strict, chunk_size, prec):
        fq, fk, v, g = (x.contiguous() for x in (fq, fk, v, g))
        num, den = _launch_forward(fq, fk, v, g, seg, strict, chunk_size, prec)
        ctx.save_for_backward(fq, fk, v, g, seg)
        ctx.meta = (strict, chunk_size, prec)
        return num, den

    @staticmethod
    def backward(ctx, dnum, dden):
        fq, fk, v, g, seg = ctx.saved_tensors
        strict, chunk_size, prec = ctx.meta
        dnum = dnum.contiguous().float()
        dden = dden.contiguous().float()
        try:
            dfq, dfk, dv = _launch_backward(fq, fk, v, g, seg, dnum, dden, strict, chunk_size, prec)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # a broken Triton build: never crash a training step
            if strict_kernels():
                raise
            dfq, dfk, dv, dg = _torch_backward(fq, fk, v, g, seg, dnum, dden, strict, chunk_size, err)
            return dfq, dfk, dv.to(v.dtype), dg, None, None, None, None
        return dfq, dfk, dv.to(v.dtype), _decay_grad(fq, fk, dfq, dfk, seg), None, None, None, None


def _decay_grad(fq, fk, dfq, dfk, seg):
    """Scalar-decay identity: every term carries exp(G_t - G_i), so ∂L/∂G_t = fq_t·dfq_t - fk_t·dfk_t,
    and g_j enters G_t for t ≥ j: dg_j = Σ_{t≥j} ∂L/∂G_t, summed within j's document only (the sum
    over a whole document is zero). A document's first g enters no factor: its gradient is exactly 0."""
    dcum = (fq * dfq).sum(-1) - (fk * dfk).sum(-1)
    rc = dcum.flip(-1).cumsum(-1).flip(-1)
    n = rc.shape[-1]
    if seg is None:
        rc[..., 0] = 0.0
        return rc
    starts = torch.ones(n, dtype=torch.bool, device=seg.device)
    starts[1:] = seg[1:] != seg[:-1]
    run = torch.cumsum(starts.long(), 0) - 1
    start_idx = torch.nonzero(starts).flatten()
    run_end = torch.cat([start_idx[1:], start_idx.new_tensor([n])])
    rc_pad = torch.nn.functional.pad(rc, (0, 1))
    dg = rc - rc_pad[..., run_end[run]]
    dg[..., starts] = 0.0
    return dg


def _torch_backward(fq, fk, v, g, seg, dnum, dden, strict, chunk_size, err):
    """Gradients through chunked.py's torch scan when a Triton backward kernel fails to launch."""
    global _BACKWARD_FALLBACK_WARNED
    import warnings

    from fluidlm.kernels.chunked import decayed_causal_scan

    if not _BACKWARD_FALLBACK_WARNED:
        _BACKWARD_FALLBACK_WARNED = True
        warnings.warn(
            f"triton DA backward kernel failed ({type(err).__name__}: {err}); computing gradients "
            "with the chunked torch path instead",
            RuntimeWarning,
            stacklevel=3,
        )
    with torch.enable_grad():
        inputs = [x.detach().float().requires_grad_() for x in (fq, fk, v, g)]
        v_aug = torch.cat([inputs[2], torch.ones_like(inputs[2][..., :1])], dim=-1)
        out, _ = decayed_causal_scan(
            inputs[0], inputs[1], v_aug, inputs[3], None if seg is None else seg[None].long(),
            chunk_size, strict=strict,
        )
        cot = torch.cat([dnum, dden[..., None]], dim=-1)
        return torch.autograd.grad(out, inputs, cot)


def _scan(fq, fk, v, g, seg, strict, chunk_size, prec):
    return DecayedScan.apply(fq, fk, v, g, seg, strict, chunk_size, prec)


@torch.compiler.disable
def triton_differential_attention(q, k, v, g, *, causal, feature_map, eps, cu_seqlens, chunk_size=64):
    """Same contract as the other backends (see dispatch.differential_attention); returns fp32."""
    if q.dtype == torch.float64:
        from fluidlm.kernels.chunked import chunked_differential_attention

        return chunked_differential_attention(
            q, k, v, g, causal=causal, feature_map=feature_map, eps=eps, cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )
    _check_device(q)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    n = q.shape[-2]
    g = g.float()
    fq = feature_map_fn(q.float(), feature_map)
    fk = feature_map_fn(k.float(), feature_map) * input_weight(g)[..., None]
    seg = segment_ids(cu_seqlens, n, q.device)
    seg = None if seg is None else seg[0].to(torch.int32).contiguous()
    num, den = _scan(fq, fk, v, g, seg, False, chunk_size, prec)
    if not causal:
        # anti-causal part: strict scan over the reversed sequence, decay shifted by one token
        g_next = torch.cat([g[..., 1:], torch.zeros_like(g[..., :1])], dim=-1)
        flip = lambda x: torch.flip(x, dims=(2,))
        rseg = None if seg is None else torch.flip(seg, dims=(0,)).contiguous()
        anum, aden = _scan(flip(fq), flip(fk), flip(v), torch.flip(g_next, dims=(2,)), rseg, True, chunk_size, prec)
        num = num + flip(anum)
        den = den + torch.flip(aden, dims=(2,))
    return num / (den[..., None] + eps)
