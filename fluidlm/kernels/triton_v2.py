# Over 400 lines: six kernels (summary, combine, forward, dq, dk, dv) share one geometry and its launch code.
"""Differential Attention v2: segment-parallel Triton kernels (docs/design.md §1, item 4). `backend="triton"`.

Layout. Documents never cross rows: the rows of (B, H, N, ·) tensors are cut into documents
(`cu_seqlens` over the flattened B·N tokens, or one document per row) and every document into
segments of L = segment_chunks · BT tokens (the last one ragged); chunks of BT tokens start at each
segment's start, so a chunk never contains a document start and no kernel needs a document mask.
The segment table (row, start, end of every segment; first segment and count of every document) is
built on the device from `cu_seqlens` with torch ops: no host synchronisation. The grid is sized by
an upper bound of the segment count (cdiv(B·N, L) + documents); surplus programs see an empty segment.

Per direction (causal: state from the left; anti-causal: state from the right, the bidirectional
form's i > t sum) and per chunk with local inclusive log-decay cumsum b (so every factor is ≤ 1):

    causal:  D_ti = exp(b_t - b_i), i ≤ t;  query weight qw = exp(b);          key weight kw = exp(b_last - b)
    anti:    D_ti = exp(b_i - b_t), i > t;  query weight qw = exp(b_last - b); key weight kw = exp(b)
    num_t = Σ_i D_ti (fq_t·fk_i) v_i + qw_t fq_t S_in,   den_t = the same with v ≡ 1 (S_in → z_in)
    S_out = exp(b_last) S_in + Σ_i kw_i fk_i v_iᵀ         (z likewise),   o = num / (den + ε)

with fq = φ(q), fk = φ(k)·β, β = 1 - exp(g), all computed in the kernels from the raw inputs.

Kernels (forward):
  1. `_summary_kernel` — grid (segments, K·V tiles, H): each segment's own final state U (from zero)
     and total decay A = exp(Σ_seg g): the affine map S_out = A·S_in + U (fluidlm/parallel/context.py).
  2. `_combine_kernel` — grid (documents, K·V tiles, H): a scan over each document's segments gives
     every segment its entering state E (the document's initial state enters its first segment) and
     the document's final state.
  3. `_fwd_kernel` — grid (segments, V blocks, H): outputs of all segments in parallel from E, the
     normaliser and the division fused. Bidirectional: the anti-causal pass writes fp32 (num, den), the
     causal pass adds them and divides (no flipped copies).
Backward (mirrors it; dnum = do/(den+ε), dden = -(do·o)/(den+ε)):
  1./2. summaries and combine of the state gradient dS (from the other side), with the final-state
     gradient entering the last segment; the combine's result for a document is d(initial state);
  3. `_dq_kernel` (K blocks, state S), `_dk_kernel` (K blocks, dS), `_dv_kernel` (V blocks, dS).
  dg: every term carries exp(G_later - G_earlier), so ∂L/∂G_t = Σ_dir ±(fq_t·dfq_t - fk_t·dfk_t)
  (+ ⟨dF, F⟩ at a document's last token) — written per token by the kernels; dg is its reverse
  cumulative sum within each document (torch, fp64, one cumsum) minus exp(g)·φ(k)·dfk (β's part).

Memory: nothing per chunk is stored; the forward keeps o, 1/(den+ε) and the entering states of the
segments (P·d·dv per row and direction, fp32): O(N·(d+dv) + P·d·dv).

Precision: inputs read in their own dtype; dot operands in the input dtype (bf16/fp16 tensor cores,
fp32 "ieee" dots for fp32 inputs), accumulation, decay cumsums, states and normaliser in fp32. fp64
inputs go to `chunked`. All offsets are int64.

The kernels are decorated when this module is imported, so `TRITON_INTERPRET=1` must be set before
that to run them on CPU tensors (tests); `fluidlm.kernels.dispatch` imports it lazily.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fluidlm.kernels.common import FEATURE_MAPS, strict_kernels

INTERPRET = bool(triton.knobs.runtime.interpret)
H100_SMS = 132
TARGET_PROGRAMS = 8 * H100_SMS  # the segment length is chosen to give the pass-2 kernels this many programs
_MAX_BK = 64  # tile caps (tests lower them to exercise several K / V blocks at small head dims)
_MAX_BV = 64
_MAX_BT = 64
MAX_SEGMENT_CHUNKS = 32  # 2,048 tokens at BT = 64


# ------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _phi(x, FM: tl.constexpr):
    if FM == 0:
        return 1.0 / (1.0 + tl.exp(-x))
    else:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _dphi(x, FM: tl.constexpr):
    if FM == 0:
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 - s)
    else:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _beta(g):
    """β = 1 - exp(g) without cancellation: a degree-6 series for |g| < 0.1 (relative error < 3e-10)."""
    series = -g * (1.0 + g * (0.5 + g * (1.0 / 6 + g * (1.0 / 24 + g * (1.0 / 120 + g * (1.0 / 720))))))
    return tl.where(g > -0.1, series, 1.0 - tl.exp(g))


@triton.jit
def _op(x, DT: tl.constexpr, UPCAST: tl.constexpr):
    """A dot operand in the input dtype DT. Under the interpreter (UPCAST, half dtypes) it is rounded to DT
    and held in fp32: Triton 3.7's interpreter computes bf16 dots wrongly, and fp32 products of rounded
    operands are exactly the compiled kernel's (a bf16 × bf16 product is exact in fp32, accumulated in fp32)."""
    if UPCAST:
        return x.to(DT).to(tl.float32)
    else:
        return x.to(DT)


@triton.jit
def _chunk(g_ptr, lo, hi, c, o_t, BT: tl.constexpr, REV: tl.constexpr):
    """Tokens, decay matrix and weights of chunk c of the segment [lo, hi) (module docstring)."""
    t = lo + c * BT + o_t
    m = t < hi
    gg = tl.load(g_ptr + t, mask=m, other=0.0).to(tl.float32)
    b = tl.cumsum(gg, axis=0)
    b_last = tl.sum(gg, axis=0)  # the ragged chunk's padding has g = 0
    if REV:
        qw = tl.exp(b_last - b)
        kw = tl.exp(b)
        mask = o_t[:, None] < o_t[None, :]
        diff = b[None, :] - b[:, None]
    else:
        qw = tl.exp(b)
        kw = tl.exp(b_last - b)
        mask = o_t[:, None] >= o_t[None, :]
        diff = b[:, None] - b[None, :]
    dec = tl.exp(tl.where(mask, diff, float("-inf")))
    return t, m, gg, dec, qw, kw, tl.exp(b_last), b_last


@triton.jit
def _segment(lo_ptr, hi_ptr, row_ptr, j, H, h):
    lo = tl.load(lo_ptr + j).to(tl.int64)
    hi = tl.load(hi_ptr + j).to(tl.int64)
    row = tl.load(row_ptr + j).to(tl.int64)
    return lo, hi, row * H + h


# ------------------------------------------------------------------------------------------------
# Kernels


@triton.jit(do_not_specialize=["H", "N"])
def _summary_kernel(
    x_ptr, y_ptr, g_ptr, rden_ptr, dden_ptr, lo_ptr, hi_ptr, row_ptr, u_ptr, uz_ptr, a_ptr,
    H, N, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    TO_START: tl.constexpr, GRAD: tl.constexpr, FM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """U = Σ_t w_t x_tᵀ [y_t, y0_t] over the segment, w_t = exp(G_end - G_t) (TO_END) or exp(G_t - G_start-1)
    (TO_START). Forward: x = φ(k)β, y = v, y0 = 1. Backward (GRAD): x = φ(q), y = do·rden, y0 = dden."""
    j = tl.program_id(0).to(tl.int64)
    i_kv = tl.program_id(1)
    h = tl.program_id(2)
    nv = tl.cdiv(V, BV)
    i_k = i_kv // nv
    i_v = i_kv % nv
    lo, hi, bh = _segment(lo_ptr, hi_ptr, row_ptr, j, H, h)
    x_ptr += bh * N * K
    y_ptr += bh * N * V
    g_ptr += bh * N
    rden_ptr += bh * N
    dden_ptr += bh * N
    DT = x_ptr.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    accz = tl.zeros([BK], dtype=tl.float32)
    total = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    nc = tl.cdiv(hi - lo, BT)
    for cc in range(0, nc):
        if TO_START:
            c = nc - 1 - cc
        else:
            c = cc
        t, m, gg, dec, qw, kw, carry, b_last = _chunk(g_ptr, lo, hi, c, o_t, BT, TO_START)
        m_tk = m[:, None] & m_k[None, :]
        m_tv = m[:, None] & m_v[None, :]
        x = _phi(tl.load(x_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32), FM)
        if GRAD:
            r = tl.load(rden_ptr + t, mask=m, other=0.0)
            y = tl.load(y_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32) * r[:, None]
            y0 = tl.load(dden_ptr + t, mask=m, other=0.0)
        else:
            x = x * _beta(gg)[:, None]
            y = tl.load(y_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            y0 = tl.where(m, 1.0, 0.0)
        xw = tl.where(m_tk, x * kw[:, None], 0.0)
        acc = acc * carry + tl.dot(tl.trans(_op(xw, DT, UPCAST)), _op(y, DT, UPCAST), input_precision=PREC)
        accz = accz * carry + tl.sum(xw * y0[:, None], axis=0)
        total += b_last
    base = j * H + h
    tl.store(u_ptr + base * K * V + o_k[:, None] * V + o_v[None, :], acc, mask=m_k[:, None] & m_v[None, :])
    tl.store(uz_ptr + base * K + o_k, accz, mask=m_k & (i_v == 0))
    tl.store(a_ptr + base, tl.exp(total), mask=i_kv == 0)


@triton.jit(do_not_specialize=["H"])
def _combine_kernel(
    u_ptr, uz_ptr, a_ptr, first_ptr, count_ptr, init_ptr, initz_ptr, e_ptr, ez_ptr, fin_ptr, finz_ptr,
    H, K, V,
    BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr, HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr,
):
    """Scan over a document's segments: E_j = state entering segment j, S ← A_j S + U_j."""
    doc = tl.program_id(0).to(tl.int64)
    i_kv = tl.program_id(1)
    h = tl.program_id(2)
    nv = tl.cdiv(V, BV)
    i_k = i_kv // nv
    i_v = i_kv % nv
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v < V)[None, :]
    off = o_k[:, None] * V + o_v[None, :]
    first = tl.load(first_ptr + doc).to(tl.int64)
    cnt = tl.load(count_ptr + doc)
    dbase = doc * H + h
    if HAS_INIT:
        s = tl.load(init_ptr + dbase * K * V + off, mask=m_kv, other=0.0)
        sz = tl.load(initz_ptr + dbase * K + o_k, mask=m_k, other=0.0)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
        sz = tl.zeros([BK], dtype=tl.float32)
    for i in range(0, cnt):
        if REV:
            jj = first + cnt - 1 - i
        else:
            jj = first + i
        base = jj * H + h
        tl.store(e_ptr + base * K * V + off, s, mask=m_kv)
        tl.store(ez_ptr + base * K + o_k, sz, mask=m_k & (i_v == 0))
        a = tl.load(a_ptr + base)
        s = a * s + tl.load(u_ptr + base * K * V + off, mask=m_kv, other=0.0)
        sz = a * sz + tl.load(uz_ptr + base * K + o_k, mask=m_k, other=0.0)
    if HAS_FINAL:
        tl.store(fin_ptr + dbase * K * V + off, s, mask=m_kv)
        tl.store(finz_ptr + dbase * K + o_k, sz, mask=m_k & (i_v == 0))


@triton.jit(do_not_specialize=["H", "N"])
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, lo_ptr, hi_ptr, row_ptr, e_ptr, ez_ptr, num_ptr, den_ptr, o_ptr, rden_ptr,
    H, N, K, V, eps,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr, FM: tl.constexpr,
    PREC: tl.constexpr, FINAL: tl.constexpr, ADD: tl.constexpr, UPCAST: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    h = tl.program_id(2)
    lo, hi, bh = _segment(lo_ptr, hi_ptr, row_ptr, j, H, h)
    q_ptr += bh * N * K
    k_ptr += bh * N * K
    v_ptr += bh * N * V
    g_ptr += bh * N
    num_ptr += bh * N * V
    o_ptr += bh * N * V
    den_ptr += bh * N
    rden_ptr += bh * N
    DT = q_ptr.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    base = j * H + h
    s = tl.load(e_ptr + base * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
    z = tl.load(ez_ptr + base * K + o_k, mask=m_k, other=0.0)
    nc = tl.cdiv(hi - lo, BT)
    for cc in range(0, nc):
        if REV:
            c = nc - 1 - cc
        else:
            c = cc
        t, m, gg, dec, qw, kw, carry, b_last = _chunk(g_ptr, lo, hi, c, o_t, BT, REV)
        m_tk = m[:, None] & m_k[None, :]
        m_tv = m[:, None] & m_v[None, :]
        fq = tl.where(m_tk, _phi(tl.load(q_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32), FM), 0.0)
        fk = _phi(tl.load(k_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32), FM)
        fk = tl.where(m_tk, fk * _beta(gg)[:, None], 0.0)
        vv = _op(tl.load(v_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0), DT, UPCAST)
        a = tl.dot(_op(fq, DT, UPCAST), tl.trans(_op(fk, DT, UPCAST)), input_precision=PREC) * dec
        qs = fq * qw[:, None]
        num = tl.dot(_op(a, DT, UPCAST), vv, input_precision=PREC) + tl.dot(_op(qs, DT, UPCAST), _op(s, DT, UPCAST), input_precision=PREC)
        den = tl.sum(a, axis=1) + tl.sum(qs * z[None, :], axis=1)
        if ADD:
            num += tl.load(num_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            den += tl.load(den_ptr + t, mask=m, other=0.0)
        if FINAL:
            r = 1.0 / (den + eps)
            tl.store(o_ptr + t[:, None] * V + o_v[None, :], (num * r[:, None]).to(o_ptr.dtype.element_ty), mask=m_tv)
            tl.store(rden_ptr + t, r, mask=m & (i_v == 0))
        else:
            tl.store(num_ptr + t[:, None] * V + o_v[None, :], num, mask=m_tv)
            tl.store(den_ptr + t, den, mask=m & (i_v == 0))
        ke = fk * kw[:, None]
        s = s * carry + tl.dot(tl.trans(_op(ke, DT, UPCAST)), vv, input_precision=PREC)
        z = z * carry + tl.sum(ke, axis=0)


@triton.jit(do_not_specialize=["H", "N", "BHN"])
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, rden_ptr, dden_ptr, lo_ptr, hi_ptr, row_ptr, e_ptr, ez_ptr,
    buf_ptr, dq_ptr, dc_ptr,
    H, N, K, V, BHN,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr, FM: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, FINAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """dφq of one direction for K block i_k (all of V), walking like the forward (state S from E)."""
    j = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    h = tl.program_id(2)
    lo, hi, bh = _segment(lo_ptr, hi_ptr, row_ptr, j, H, h)
    q_ptr += bh * N * K
    k_ptr += bh * N * K
    buf_ptr += bh * N * K
    dq_ptr += bh * N * K
    v_ptr += bh * N * V
    do_ptr += bh * N * V
    g_ptr += bh * N
    rden_ptr += bh * N
    dden_ptr += bh * N
    dc_ptr += i_k.to(tl.int64) * BHN + bh * N
    DT = q_ptr.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    base = j * H + h
    s = tl.load(e_ptr + base * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
    z = tl.load(ez_ptr + base * K + o_k, mask=m_k, other=0.0)
    nc = tl.cdiv(hi - lo, BT)
    for cc in range(0, nc):
        if REV:
            c = nc - 1 - cc
        else:
            c = cc
        t, m, gg, dec, qw, kw, carry, b_last = _chunk(g_ptr, lo, hi, c, o_t, BT, REV)
        m_tk = m[:, None] & m_k[None, :]
        m_tv = m[:, None] & m_v[None, :]
        fk = _phi(tl.load(k_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32), FM)
        fk = tl.where(m_tk, fk * _beta(gg)[:, None], 0.0)
        vv = _op(tl.load(v_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0), DT, UPCAST)
        r = tl.load(rden_ptr + t, mask=m, other=0.0)
        dd = tl.load(dden_ptr + t, mask=m, other=0.0)
        dn = _op(tl.load(do_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32) * r[:, None], DT, UPCAST)
        da = (tl.dot(dn, tl.trans(vv), input_precision=PREC) + dd[:, None]) * dec
        dfq = tl.dot(_op(da, DT, UPCAST), _op(fk, DT, UPCAST), input_precision=PREC)
        dfq += qw[:, None] * (tl.dot(dn, tl.trans(_op(s, DT, UPCAST)), input_precision=PREC) + dd[:, None] * z[None, :])
        qr = tl.load(q_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        fq = tl.where(m_tk, _phi(qr, FM), 0.0)
        if REV:
            tl.store(dc_ptr + t, -tl.sum(fq * dfq, axis=1), mask=m)
        else:
            tl.store(dc_ptr + t, tl.sum(fq * dfq, axis=1), mask=m)
        if ACC:
            dfq += tl.load(buf_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        if FINAL:
            tl.store(dq_ptr + t[:, None] * K + o_k[None, :], (dfq * _dphi(qr, FM)).to(dq_ptr.dtype.element_ty), mask=m_tk)
        else:
            tl.store(buf_ptr + t[:, None] * K + o_k[None, :], dfq, mask=m_tk)
        ke = fk * kw[:, None]
        s = s * carry + tl.dot(tl.trans(_op(ke, DT, UPCAST)), vv, input_precision=PREC)
        z = z * carry + tl.sum(ke, axis=0)


@triton.jit(do_not_specialize=["H", "N", "BHN"])
def _dk_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, rden_ptr, dden_ptr, lo_ptr, hi_ptr, row_ptr, x_ptr, xz_ptr,
    buf_ptr, dk_ptr, dc_ptr, db_ptr,
    H, N, K, V, BHN,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr, FM: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, FINAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """dφk·… of one direction for K block i_k (all of V), walking against the forward (state gradient dS)."""
    j = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    h = tl.program_id(2)
    lo, hi, bh = _segment(lo_ptr, hi_ptr, row_ptr, j, H, h)
    q_ptr += bh * N * K
    k_ptr += bh * N * K
    buf_ptr += bh * N * K
    dk_ptr += bh * N * K
    v_ptr += bh * N * V
    do_ptr += bh * N * V
    g_ptr += bh * N
    rden_ptr += bh * N
    dden_ptr += bh * N
    dc_ptr += i_k.to(tl.int64) * BHN + bh * N
    db_ptr += i_k.to(tl.int64) * BHN + bh * N
    DT = q_ptr.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    base = j * H + h
    ds = tl.load(x_ptr + base * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
    dz = tl.load(xz_ptr + base * K + o_k, mask=m_k, other=0.0)
    nc = tl.cdiv(hi - lo, BT)
    for cc in range(0, nc):
        if REV:
            c = cc
        else:
            c = nc - 1 - cc
        t, m, gg, dec, qw, kw, carry, b_last = _chunk(g_ptr, lo, hi, c, o_t, BT, REV)
        m_tk = m[:, None] & m_k[None, :]
        m_tv = m[:, None] & m_v[None, :]
        fq = tl.where(m_tk, _phi(tl.load(q_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32), FM), 0.0)
        kr = tl.load(k_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        f0 = tl.where(m_tk, _phi(kr, FM), 0.0)
        bt = _beta(gg)
        fk = f0 * bt[:, None]
        vv = _op(tl.load(v_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0), DT, UPCAST)
        r = tl.load(rden_ptr + t, mask=m, other=0.0)
        dd = tl.load(dden_ptr + t, mask=m, other=0.0)
        dn = _op(tl.load(do_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32) * r[:, None], DT, UPCAST)
        da = (tl.dot(dn, tl.trans(vv), input_precision=PREC) + dd[:, None]) * dec
        dfk = tl.dot(tl.trans(_op(da, DT, UPCAST)), _op(fq, DT, UPCAST), input_precision=PREC)
        dfk += kw[:, None] * (tl.dot(vv, tl.trans(_op(ds, DT, UPCAST)), input_precision=PREC) + dz[None, :])
        dfk = tl.where(m_tk, dfk, 0.0)
        # the state gradient moves on before the stores: fq, dn and vv die here (fewer live registers)
        qs = fq * qw[:, None]
        ds = ds * carry + tl.dot(tl.trans(_op(qs, DT, UPCAST)), dn, input_precision=PREC)
        dz = dz * carry + tl.sum(qs * dd[:, None], axis=0)
        if REV:
            tl.store(dc_ptr + t, tl.sum(fk * dfk, axis=1), mask=m)
        else:
            tl.store(dc_ptr + t, -tl.sum(fk * dfk, axis=1), mask=m)
        if ACC:
            dfk += tl.load(buf_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        if FINAL:
            tl.store(dk_ptr + t[:, None] * K + o_k[None, :],
                     (dfk * bt[:, None] * _dphi(kr, FM)).to(dk_ptr.dtype.element_ty), mask=m_tk)
            tl.store(db_ptr + t, tl.sum(f0 * dfk, axis=1), mask=m)
        else:
            tl.store(buf_ptr + t[:, None] * K + o_k[None, :], dfk, mask=m_tk)


@triton.jit(do_not_specialize=["H", "N"])
def _dv_kernel(
    q_ptr, k_ptr, g_ptr, do_ptr, rden_ptr, lo_ptr, hi_ptr, row_ptr, x_ptr, buf_ptr, dv_ptr,
    H, N, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr, FM: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, FINAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """dv of one direction for V block i_v (all of K), walking against the forward (state gradient dS)."""
    j = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    h = tl.program_id(2)
    lo, hi, bh = _segment(lo_ptr, hi_ptr, row_ptr, j, H, h)
    q_ptr += bh * N * K
    k_ptr += bh * N * K
    do_ptr += bh * N * V
    buf_ptr += bh * N * V
    dv_ptr += bh * N * V
    g_ptr += bh * N
    rden_ptr += bh * N
    DT = q_ptr.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    base = j * H + h
    ds = tl.load(x_ptr + base * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
    nc = tl.cdiv(hi - lo, BT)
    for cc in range(0, nc):
        if REV:
            c = cc
        else:
            c = nc - 1 - cc
        t, m, gg, dec, qw, kw, carry, b_last = _chunk(g_ptr, lo, hi, c, o_t, BT, REV)
        m_tk = m[:, None] & m_k[None, :]
        m_tv = m[:, None] & m_v[None, :]
        fq = tl.where(m_tk, _phi(tl.load(q_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32), FM), 0.0)
        fk = _phi(tl.load(k_ptr + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32), FM)
        fk = tl.where(m_tk, fk * _beta(gg)[:, None], 0.0)
        r = tl.load(rden_ptr + t, mask=m, other=0.0)
        dn = _op(tl.load(do_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32) * r[:, None], DT, UPCAST)
        a = tl.dot(_op(fq, DT, UPCAST), tl.trans(_op(fk, DT, UPCAST)), input_precision=PREC) * dec
        dvv = tl.dot(tl.trans(_op(a, DT, UPCAST)), dn, input_precision=PREC)
        dvv += kw[:, None] * tl.dot(_op(fk, DT, UPCAST), _op(ds, DT, UPCAST), input_precision=PREC)
        if ACC:
            dvv += tl.load(buf_ptr + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        if FINAL:
            tl.store(dv_ptr + t[:, None] * V + o_v[None, :], dvv.to(dv_ptr.dtype.element_ty), mask=m_tv)
        else:
            tl.store(buf_ptr + t[:, None] * V + o_v[None, :], dvv, mask=m_tv)
        qs = fq * qw[:, None]
        ds = ds * carry + tl.dot(tl.trans(_op(qs, DT, UPCAST)), dn, input_precision=PREC)


# ------------------------------------------------------------------------------------------------
# Launch geometry (shared with bench/da_gpu.py --plan)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


def blocks(d: int, dv: int, chunk_size: int, fp32: bool = False) -> dict:
    """Tile sizes: BT tokens per chunk; (BKS, BVS) summary/combine tiles; BV of the V-split kernels
    (full K in registers: fwd, dv); BK of the K-split kernels (full V: dq, dk). BTF: the chunk of fwd and
    dv, 32 tokens for fp32 at head dims > 128 (3xTF32 stages hi and lo halves of their full-K tiles: 256 KiB
    at 64 tokens); a kernel's chunks need not match the others', only the segments do."""
    bkf, bvf = _pow2(d), _pow2(dv)
    bt = min(_pow2(chunk_size), _MAX_BT)
    return dict(
        BT=bt, BTF=min(bt, 32) if fp32 and max(bkf, bvf) > 128 else bt, BKF=bkf, BVF=bvf,
        BKS=min(bkf, _MAX_BK), BVS=min(bvf, _MAX_BV),
        BV=min(bvf, _MAX_BV, 64 if bkf <= 128 else 32),
        BK=min(bkf, _MAX_BK, 64 if bvf <= 128 else 32),
    )


def choose_segment_chunks(tokens: int, heads: int, n_v: int, bt: int, target: int = TARGET_PROGRAMS) -> int:
    """Chunks per segment so that the pass-2 kernels launch about `target` programs
    (segments · V blocks · heads); at least one chunk per segment, at most MAX_SEGMENT_CHUNKS (dg sums
    per-token terms within a segment: its rounding error grows with the segment, not the document)."""
    want = max(1, triton.cdiv(target, n_v * heads))
    return min(MAX_SEGMENT_CHUNKS, max(1, triton.cdiv(tokens, bt) // want))


def plan(b: int, h: int, n: int, d: int, dv: int, *, chunk_size: int = 64, causal: bool = True,
         n_docs: int | None = None, segment_chunks: int | None = None, fp32: bool = False) -> dict:
    """The launches of one forward and one backward (grids and segment geometry), computed, not measured.
    n_docs=None: one document per row (no cu_seqlens)."""
    blk = blocks(d, dv, chunk_size, fp32)
    packed = n_docs is not None
    n_docs = b if n_docs is None else n_docs
    nv = triton.cdiv(dv, blk["BV"])
    nk = triton.cdiv(d, blk["BK"])
    cps = segment_chunks or choose_segment_chunks(b * n, h, nv, blk["BT"])
    seg_len = cps * blk["BT"]
    # each document adds at most one ragged segment; one document per row: exactly B·cdiv(N, L)
    j_max = b * triton.cdiv(n, seg_len) if packed is False else triton.cdiv(b * n, seg_len) + n_docs
    tiles = triton.cdiv(d, blk["BKS"]) * triton.cdiv(dv, blk["BVS"])
    dirs = 1 if causal else 2
    launches = {
        "fwd.summary": (j_max, tiles, h, dirs), "fwd.combine": (n_docs, tiles, h, dirs),
        "fwd.output": (j_max, nv, h, dirs),
        "bwd.summary": (j_max, tiles, h, dirs), "bwd.combine": (n_docs, tiles, h, dirs),
        "bwd.dq": (j_max, nk, h, dirs), "bwd.dk": (j_max, nk, h, dirs), "bwd.dv": (j_max, nv, h, dirs),
    }
    return dict(blocks=blk, segment_chunks=cps, segment_len=seg_len, segments=j_max, n_docs=n_docs,
                n_k=nk, n_v=nv, tiles=tiles, launches=launches)


def launch_config(kernel: str, d: int, dv: int, dtype: torch.dtype) -> dict:
    """num_warps and num_stages of a pass-2 kernel ("fwd", "dq", "dk", "dv"), chosen from the sm_90 / sm_80
    compiles of bench/kernels_compile.py (bench/results/kernels_compile.md): two pipeline stages fit every
    tile in shared memory (the default three put fp32 d=128 and bf16 d=256 over the H100's 227 KiB), and
    eight warps halve the registers per thread where a full 128- or 256-wide tile is held (four warps spill
    there). The dk kernel and fp32 keep one stage: dk has the most live tiles (fq, φ(k), v, do, dA, dφk and
    the state), and fp32 at d = 128 over-filled the A100's 163 KiB with two."""
    fp32 = dtype == torch.float32  # 3xTF32 splits every operand in two: twice the staged tiles
    wide = max(d, dv) > 64 or fp32
    return dict(num_warps=8 if wide else 4, num_stages=1 if kernel == "dk" or fp32 else 2)


class _Geometry:
    """Plan plus the device-side segment table (built with torch ops, no host synchronisation)."""

    def __init__(self, q, v, cu_seqlens, chunk_size, segment_chunks, causal):
        b, h, n, d = q.shape
        dv = v.shape[-1]
        dev = q.device
        if cu_seqlens is None:
            cu = torch.arange(b + 1, device=dev, dtype=torch.int64) * n
        else:
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
        n_docs = cu.shape[0] - 1
        p = plan(b, h, n, d, dv, chunk_size=chunk_size, causal=causal,
                 n_docs=None if cu_seqlens is None else n_docs, segment_chunks=segment_chunks,
                 fp32=q.dtype == torch.float32)
        self.user_cu = cu_seqlens
        self.upcast = _upcast(q)
        self.dtype = q.dtype
        self.__dict__.update(p)
        self.b, self.h, self.n, self.d, self.dv, self.cu = b, h, n, d, dv, cu
        seg_len, j_max = p["segment_len"], p["segments"]
        lens = cu[1:] - cu[:-1]
        nseg = (lens + seg_len - 1) // seg_len
        ends = torch.cumsum(nseg, 0)
        first = ends - nseg
        jj = torch.arange(j_max, device=dev, dtype=torch.int64)
        doc = torch.searchsorted(ends, jj, right=True)
        valid = doc < n_docs
        docc = doc.clamp(max=n_docs - 1)
        start = cu[docc] + (jj - first[docc]) * seg_len
        end = torch.minimum(start + seg_len, cu[docc + 1])
        # dg's boundary terms (_decay_grad): each segment's document, whether it is the document's last
        # segment (surplus entries count as last), and the flat start of every segment (surplus: B·N)
        self.seg_doc = docc
        self.seg_last = ~valid | (jj - first[docc] == nseg[docc] - 1)
        self.seg_start = torch.where(valid, start, b * n)
        start = torch.where(valid, start, 0)
        end = torch.where(valid, end, 0)
        row = torch.div(start, n, rounding_mode="floor")
        self.lo = (start - row * n).to(torch.int32)
        self.hi = (end - row * n).to(torch.int32)
        self.row = row.to(torch.int32)
        self.first = first.to(torch.int32)
        self.count = nseg.to(torch.int32)


# ------------------------------------------------------------------------------------------------
# Launchers


def _summaries(geo, x, y, g, rden, dden, *, to_start, grad, fm, prec):
    j, h, d, dv, blk = geo.segments, geo.h, geo.d, geo.dv, geo.blocks
    u = torch.empty(j, h, d, dv, device=x.device, dtype=torch.float32)
    uz = torch.empty(j, h, d, device=x.device, dtype=torch.float32)
    a = torch.empty(j, h, device=x.device, dtype=torch.float32)
    _summary_kernel[(j, geo.tiles, h)](
        x, y, g, rden, dden, geo.lo, geo.hi, geo.row, u, uz, a, h, geo.n, d, dv,
        BT=blk["BT"], BK=blk["BKS"], BV=blk["BVS"], TO_START=to_start, GRAD=grad, FM=fm, PREC=prec,
        UPCAST=_upcast(x), num_warps=4, num_stages=2,
    )
    return u, uz, a


def _combine(geo, u, uz, a, *, rev, init=None, final=False):
    h, d, dv, blk = geo.h, geo.d, geo.dv, geo.blocks
    e, ez = torch.empty_like(u), torch.empty_like(uz)
    fin = torch.empty(geo.n_docs, h, d, dv, device=u.device, dtype=torch.float32) if final else u
    finz = torch.empty(geo.n_docs, h, d, device=u.device, dtype=torch.float32) if final else uz
    s0, z0 = (u, uz) if init is None else init
    _combine_kernel[(geo.n_docs, geo.tiles, h)](
        u, uz, a, geo.first, geo.count, s0, z0, e, ez, fin, finz, h, d, dv,
        BK=blk["BKS"], BV=blk["BVS"], REV=rev, HAS_INIT=init is not None, HAS_FINAL=final, num_warps=4,
    )
    return e, ez, ((fin, finz) if final else None)


def _upcast(x) -> bool:
    """Triton 3.7's interpreter computes tl.dot on bf16 operands wrongly (garbage, not rounding): there the
    dot operands are rounded to bf16 and multiplied in fp32 (`_op`), which is what the compiled kernels do.
    Compiled kernels always use the input dtype."""
    return INTERPRET and x.dtype == torch.bfloat16


def _meta(geo, kernel, fm, prec, **kw):
    return dict(BT=geo.blocks["BTF" if kernel in ("fwd", "dv") else "BT"], FM=fm, PREC=prec, UPCAST=geo.upcast,
                **launch_config(kernel, geo.d, geo.dv, geo.dtype), **kw)


def _forward(geo, q, k, v, g, init, causal, fm, eps, prec, want_final):
    j, h, n, d, dv, blk = geo.segments, geo.h, geo.n, geo.d, geo.dv, geo.blocks
    u, uz, a = _summaries(geo, k, v, g, g, g, to_start=False, grad=False, fm=fm, prec=prec)
    e, ez, final = _combine(geo, u, uz, a, rev=False, init=init, final=want_final)
    del u, uz
    o = torch.empty(geo.b, h, n, dv, device=q.device, dtype=q.dtype)
    rden = torch.empty(geo.b, h, n, device=q.device, dtype=torch.float32)
    grid = (j, triton.cdiv(dv, blk["BV"]), h)
    common = (h, n, d, dv, eps)
    e2 = ez2 = None
    if causal:
        _fwd_kernel[grid](q, k, v, g, geo.lo, geo.hi, geo.row, e, ez, o, rden, o, rden, *common,
                          BK=blk["BKF"], BV=blk["BV"], **_meta(geo, "fwd", fm, prec, REV=False, FINAL=True, ADD=False))
    else:
        u2, uz2, _ = _summaries(geo, k, v, g, g, g, to_start=True, grad=False, fm=fm, prec=prec)
        e2, ez2, _ = _combine(geo, u2, uz2, a, rev=True)
        del u2, uz2
        num = torch.empty(geo.b, h, n, dv, device=q.device, dtype=torch.float32)
        den = torch.empty(geo.b, h, n, device=q.device, dtype=torch.float32)
        _fwd_kernel[grid](q, k, v, g, geo.lo, geo.hi, geo.row, e2, ez2, num, den, o, rden, *common,
                          BK=blk["BKF"], BV=blk["BV"], **_meta(geo, "fwd", fm, prec, REV=True, FINAL=False, ADD=False))
        _fwd_kernel[grid](q, k, v, g, geo.lo, geo.hi, geo.row, e, ez, num, den, o, rden, *common,
                          BK=blk["BKF"], BV=blk["BV"], **_meta(geo, "fwd", fm, prec, REV=False, FINAL=True, ADD=True))
    return o, rden, a, (e, ez), (e2, ez2), final


def _backward(geo, q, k, v, g, o, rden, a, fwd_states, anti_states, final, dfinal, causal, fm, prec):
    j, h, n, d, dv, b, blk = geo.segments, geo.h, geo.n, geo.d, geo.dv, geo.b, geo.blocks
    do = geo.do
    dden = -(do.float() * o.float()).sum(-1) * rden  # one cheap op: (B, H, N)
    ub, ubz, _ = _summaries(geo, q, do, g, rden, dden, to_start=True, grad=True, fm=fm, prec=prec)
    x, xz, dinit = _combine(geo, ub, ubz, a, rev=True, init=dfinal, final=True)
    del ub, ubz
    dirs = [(False, fwd_states, (x, xz))]
    if not causal:
        ub2, ubz2, _ = _summaries(geo, q, do, g, rden, dden, to_start=False, grad=True, fm=fm, prec=prec)
        x2, xz2, _ = _combine(geo, ub2, ubz2, a, rev=False)
        del ub2, ubz2
        dirs.insert(0, (True, anti_states, (x2, xz2)))  # the anti-causal pass first writes fp32 partials
    nk = triton.cdiv(d, blk["BK"])
    nv = triton.cdiv(dv, blk["BV"])
    bhn = b * h * n
    dc = torch.empty(2 * len(dirs) * nk, b, h, n, device=q.device, dtype=torch.float32)
    db = torch.empty(nk, b, h, n, device=q.device, dtype=torch.float32)
    dq, dk, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    two = len(dirs) == 2
    bufq = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32) if two else dq
    bufk = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32) if two else dk
    bufv = torch.empty(b, h, n, dv, device=q.device, dtype=torch.float32) if two else dv_
    seg = (geo.lo, geo.hi, geo.row)
    for i, (rev, (e, ez), (gx, gxz)) in enumerate(dirs):
        flags = dict(REV=rev, ACC=two and i == 1, FINAL=i == len(dirs) - 1)
        _dq_kernel[(j, nk, h)](q, k, v, g, do, rden, dden, *seg, e, ez, bufq, dq, dc[2 * i * nk:],
                               h, n, d, dv, bhn, BK=blk["BK"], BV=blk["BVF"], **_meta(geo, "dq", fm, prec, **flags))
        _dk_kernel[(j, nk, h)](q, k, v, g, do, rden, dden, *seg, gx, gxz, bufk, dk, dc[(2 * i + 1) * nk:], db,
                               h, n, d, dv, bhn, BK=blk["BK"], BV=blk["BVF"], **_meta(geo, "dk", fm, prec, **flags))
        _dv_kernel[(j, nv, h)](q, k, g, do, rden, *seg, gx, bufv, dv_, h, n, d, dv,
                               BK=blk["BKF"], BV=blk["BV"], **_meta(geo, "dv", fm, prec, **flags))
    end_terms = None
    if dfinal is not None:
        end_terms = (dfinal[0] * final[0]).sum((-1, -2)) + (dfinal[1] * final[1]).sum(-1)  # (docs, H)
    causal_b = (fwd_states, (x, xz))
    anti_b = None if causal else (anti_states, (x2, xz2))
    dg = _decay_grad(geo, dc.sum(0), causal_b, anti_b, end_terms) - torch.exp(g.float()) * db.sum(0)
    return dq, dk, dv_, dg.to(g.dtype), dinit


def _decay_grad(geo, dcum, causal_b, anti_b, end_terms):
    """∂L/∂g from the per-token ∂L/∂G_t (`dcum`, written by the kernels): g_t enters every G_s with s ≥ t
    of its document, so dg_t = Σ_{s ≥ t} dcum_s. The sum runs inside t's segment only; the rest of the
    document is one boundary term per segment: shifting G_s for every s ≥ start of segment j+1 scales
    exactly what crosses that boundary, so Σ_{s ≥ start_{j+1}} dcum_s = ⟨S_j→, dS_j→⟩ (the state leaving
    segment j and its gradient, both already computed; + ⟨z, dz⟩) — plus, bidirectional, the state the
    anti-causal pass carries leftwards over the boundary. At a document's last segment the term is
    ⟨final state, its gradient⟩. A reverse cumsum over the whole document instead adds up N per-token
    rounding errors (bf16 dots): its error grew as √N; this one is bounded by the segment length.
    fp64 sums; no host synchronisation."""
    b, h, n = dcum.shape
    j_max = geo.segments
    nxt = torch.arange(1, j_max + 1, device=dcum.device).clamp(max=j_max - 1)
    (e, ez), (x, xz) = causal_b  # e[j]: state entering segment j; x[j]: gradient of the state leaving j
    bound = (e[nxt].double() * x).sum((-1, -2)) + (ez[nxt].double() * xz).sum(-1)  # (J, H)
    if anti_b is not None:  # e2[j]: anti-causal state entering j from the right; x2[j+1]: its gradient
        (e2, ez2), (x2, xz2) = anti_b
        bound = bound + (e2.double() * x2[nxt]).sum((-1, -2)) + (ez2.double() * xz2[nxt]).sum(-1)
    last = end_terms[geo.seg_doc].double() if end_terms is not None else torch.zeros_like(bound)
    bound = torch.where(geo.seg_last[:, None], last, bound)
    xf = dcum.transpose(0, 1).reshape(h, b * n).double()
    c = torch.cumsum(xf, 1)
    pos = torch.arange(b * n, device=dcum.device)
    seg = torch.searchsorted(geo.seg_start, pos, right=True) - 1  # every token's segment
    seg_end = torch.cat([geo.seg_start[1:], geo.seg_start.new_tensor([b * n])])
    last_tok = torch.minimum(seg_end[seg], geo.cu[geo.seg_doc[seg] + 1]) - 1
    out = c[:, last_tok] - c + xf + bound[seg].t()
    return out.reshape(h, b, n).transpose(0, 1).float()


# ------------------------------------------------------------------------------------------------
# Autograd and the backend entry point


BROKEN: str | None = None  # set when a backward kernel failed: later calls go to `chunked` (dispatch reads it)
_BACKWARD_FALLBACK_WARNED = False


def _on_device(t):
    """Launch on t's GPU whatever the current device is (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _DifferentialAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, z0, geo, causal, fm, eps, prec, want_final):
        init = None if s0 is None else (s0, z0)
        with _on_device(q):
            o, rden, a, fst, ast, final = _forward(geo, q, k, v, g, init, causal, fm, eps, prec, want_final)
        ctx.save_for_backward(q, k, v, g, o, rden, a, *fst, *(ast if not causal else ()), *(final or ()),
                              *(init if init is not None else ()))
        ctx.meta = (geo, causal, fm, eps, prec, init is not None, want_final)
        ctx.set_materialize_grads(False)
        if final is None:
            return o, None, None
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, dfs, dfz):
        geo, causal, fm, eps, prec, has_init, want_final = ctx.meta
        saved = list(ctx.saved_tensors)
        q, k, v, g, o, rden, a, e, ez = saved[:9]
        rest = saved[9:]
        ast = (None, None)
        if not causal:
            ast, rest = (rest[0], rest[1]), rest[2:]
        final = None
        if want_final:
            final, rest = (rest[0], rest[1]), rest[2:]
        init = (rest[0], rest[1]) if has_init else None
        if do is None:
            do = torch.zeros_like(o)
        dfinal = None
        if final is not None and (dfs is not None or dfz is not None):
            dfinal = (torch.zeros_like(final[0]) if dfs is None else dfs.float().contiguous(),
                      torch.zeros_like(final[1]) if dfz is None else dfz.float().contiguous())
        geo.do = do.contiguous()
        try:
            if BROKEN is not None:
                raise RuntimeError(BROKEN)
            with _on_device(q):
                dq, dk, dv, dg, dinit = _backward(geo, q, k, v, g, o, rden, a, (e, ez), ast, final, dfinal, causal,
                                                  fm, prec)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # a broken Triton build: never crash a training step, never retry it
            if strict_kernels():
                raise
            dq, dk, dv, dg, dinit = _torch_backward(q, k, v, g, init, geo, causal, fm, eps, geo.do, dfinal, err)
        finally:
            geo.do = None
        ds0, dz0 = (None, None) if not has_init else dinit
        return dq, dk, dv, dg, ds0, dz0, None, None, None, None, None, None


def _torch_backward(q, k, v, g, init, geo, causal, fm, eps, do, dfinal, err):
    """Gradients through the `chunked` torch backend (recomputed) after a backward-kernel failure;
    remembers the failure so no later call launches the kernels again."""
    global BROKEN, _BACKWARD_FALLBACK_WARNED
    import warnings

    from fluidlm.kernels.common import DAState
    from fluidlm.kernels.dispatch import run_reference

    if BROKEN is None:
        BROKEN = f"triton DA backward kernels failed ({type(err).__name__}: {err})"
    if not _BACKWARD_FALLBACK_WARNED:
        _BACKWARD_FALLBACK_WARNED = True
        warnings.warn(f"{BROKEN}; computing gradients with the chunked torch path instead, and using it from now on",
                      RuntimeWarning, stacklevel=3)
    with torch.enable_grad():
        ins = [x.detach().requires_grad_() for x in (q, k, v, g)]
        st = None if init is None else [x.detach().requires_grad_() for x in init]
        o, fin = run_reference(
            "chunked", *ins, causal=causal, feature_map=FEATURE_MAPS[fm], eps=eps,
            cu_seqlens=geo.user_cu,
            chunk_size=geo.blocks["BT"], initial_state=None if st is None else DAState(*st), output_final_state=True,
        )
        outs, cots = [o], [do]
        if dfinal is not None:
            outs += [fin.S, fin.z]
            cots += list(dfinal)
        leaves = ins + (st or [])
        grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, leaves)]
    return grads[0], grads[1], grads[2], grads[3], (tuple(grads[4:]) if st is not None else None)


def _check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(
            "the triton DA kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "fluidlm.kernels.triton_v2 is imported (CPU tensors through the interpreter)"
        )


@torch.compiler.disable
def triton_differential_attention(q, k, v, g, *, causal, feature_map, eps, cu_seqlens=None, chunk_size=64,
                                  initial_state=None, output_final_state=False, segment_chunks=None):
    """The op contract of `fluidlm.kernels.differential_attention` (already validated there): returns
    (o, DAState | None). `cu_seqlens` indexes the flattened B·N tokens (documents never cross rows).
    `segment_chunks` fixes the segment length (in chunks) instead of the occupancy-driven choice."""
    from fluidlm.kernels.common import DAState

    if BROKEN is not None:
        raise RuntimeError(BROKEN)
    _check_device(q)
    q, k, v = (x.contiguous() for x in (q, k, v))
    g = g.contiguous()
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"  # fp32: 3xTF32 on tensor cores (~fp32 accuracy)
    geo = _Geometry(q, v, cu_seqlens, chunk_size, segment_chunks, causal)
    s0 = z0 = None
    if initial_state is not None:
        s0 = initial_state.S.float().contiguous()
        z0 = initial_state.z.float().contiguous()
    o, fs, fz = _DifferentialAttention.apply(q, k, v, g, s0, z0, geo, causal, FEATURE_MAPS.index(feature_map),
                                             float(eps), prec, bool(output_final_state))
    return o, (DAState(fs, fz) if output_final_state else None)
