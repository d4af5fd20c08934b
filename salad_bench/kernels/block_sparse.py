"""Block-sparse softmax attention in Triton: forward, backward and an autograd wrapper.

Executes a :class:`~kernels.layout.BlockLayout` exactly like :func:`kernels.reference.block_sparse_attention_ref`
(its torch reference): ``(B, H, N, D)`` in and out, any ``N`` (the last query/key block may be ragged),
``block_q``/``block_k`` in {16, 32, 64, 128} (tuned for 128 x 64), ``D`` in {64, 128}, fp16/bf16 (fp32 is
accepted and computed with IEEE fp32 dots; it exists for the CPU interpreter tests).

Design (flash-attention 2 / Triton tutorial 06 style):

* forward: one program per (query sub-block, batch*head); it walks the query block's key-block list,
  softmax in base 2 (scores scaled by ``scale * log2(e)`` inside one FMA, ``exp2``). By default with no
  running max (``OPTIONS["fwd_fixed_max"]``): each row's reference is its score against the first key of
  its list, every block adds ``2^(s - ref)`` and the accumulator is never rescaled; fp32 and bf16 carry
  probabilities far above 1 with the same relative precision, and a tile whose row sums pass
  ``_FIX_LIMIT`` (2^64; 2^14 for fp16) is redone with the online softmax. That removes the row max, the
  rescale of the 128 x D accumulator and their dependency chain from every step. The row sums stay split
  over the lanes that share a row until after the loop (``OPTIONS["fwd_lane_sums"]``). Only the
  ragged last key block (index ``Mk - 1`` when ``N % block_k != 0``) is masked: the program finds it in
  its list once, swaps it with the list's last entry on the fly (scalar ``where``, no branch in the
  loop) and processes it after the loop with the column mask. Empty query blocks give zeros and an
  log-sum-exp of ``-inf``.
* backward: ``delta = rowsum(dO * O)``; dK/dV per key block over the *transposed* layout (query blocks
  that attend to it, built from the tile map with torch ops: blocks, not tokens); dQ per query block
  over the layout. Neither needs a score mask: padded key rows load as zeros (they add nothing to dQ,
  and a ragged key block is processed masked like the forward for dQ), padded query rows get
  ``lse = +inf`` so their probabilities are exactly 0.
* scheduling: optionally heavy rows first inside each head (``order``), so programs with long lists
  start early and K/V of one head stay hot in L2.
* K/V loads come from plain pointers or, with ``use_tma``, from host-side TMA tensor descriptors over
  the 4-D ``(B, H, N, D)`` tensor (bounds handled by the hardware, zero padding).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.kernels.linear_attn import _load_feat, _load_state, _out_tile, _split_b
from salad_bench.kernels.tma import scratch_allocator as _scratch_allocator
from salad_bench.kernels.tma import tma_desc as _tma_desc
from salad_bench.kernels.tma import tma_ok as _tma_ok

__all__ = ["block_sparse_attention_triton", "transpose_layout", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCKS"]

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCKS = (16, 32, 64, 128)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------------
# tile loads
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, desc, b, h, start, N, stride_n, ROWS: tl.constexpr, D: tl.constexpr,
               USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """``ROWS x D`` tile of one (batch, head) starting at token ``start``; rows past N are zeros."""
    if USE_TMA:
        return desc.load([b, h, start, 0]).reshape(ROWS, D)
    else:
        offs = start + tl.arange(0, ROWS)
        ptrs = base + offs[:, None] * stride_n + tl.arange(0, D)[None, :]
        if MASKED:
            return tl.load(ptrs, mask=offs[:, None] < N, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _ragged_entry(idx_base, cnt, MK, EVEN_N: tl.constexpr, KMAX_P2: tl.constexpr):
    """Where the ragged last key block sits in a list: returns (has_it, the list's last entry)."""
    if EVEN_N:
        return 0, 0
    else:
        offs = tl.arange(0, KMAX_P2)
        ids = tl.load(idx_base + offs, mask=offs < cnt, other=0)
        has = tl.sum(((ids == MK - 1) & (offs < cnt)).to(tl.int32), axis=0)
        last = tl.load(idx_base + tl.maximum(cnt - 1, 0))
        return has, last


@triton.jit
def _kv_block(idx_base, j, MK, last, EVEN_N: tl.constexpr):
    """Entry ``j`` of a key-block list, with the ragged last block swapped for the list's last entry
    (the ragged block is done separately, masked, after the unmasked ones)."""
    kb = tl.load(idx_base + j)
    if not EVEN_N:
        kb = tl.where(kb == MK - 1, last, kb)
    return kb


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_scores(q, k_base, k_desc, b, h, start_n, N, stride_kn, BK: tl.constexpr, D: tl.constexpr,
                USE_TMA: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Scores of the key block at ``start_n`` (columns past N are -inf when ``MASKED``)."""
    k = _load_rows(k_base, k_desc, b, h, start_n, N, stride_kn, BK, D, USE_TMA, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASKED:
        cols = start_n + tl.arange(0, BK)
        qk = tl.where(cols[None, :] < N, qk, float("-inf"))
    return qk


# 2^f on [-1/2, 1/2] as a cubic in f (minimax in relative error, by Lawson's reweighted least squares):
# at most 7.5e-5 relative error, 26 times below a bf16 probability's own rounding (2^-9).
_P0, _P1, _P2, _P3 = (tl.constexpr(c) for c in (0.99992806, 0.69326097, 0.24261112, 0.05517162))
# 1.5 * 2^23: adding it rounds an fp32 of magnitude < 2^22 to an integer, held in the sum's low mantissa bits
_ROUND = tl.constexpr(12582912.0)


@triton.jit
def _exp2_fma(x):
    """``2^x`` for finite ``x <= 0`` on the FMA and integer pipes instead of the special-function unit:
    ``x = j + f`` with ``j`` an integer (round to nearest) and ``|f| <= 1/2``, ``2^f`` from the cubic, and
    ``j`` added to its exponent bits. ``x`` is clamped at -126: below 2^-125 the results are tiny
    non-negative fp32 values (at most 2^-125), not the exact ones (bf16/fp16 probabilities round them to
    zero)."""
    xc = tl.maximum(x, -126.0)
    t = xc + _ROUND
    f = xc - (t - _ROUND)
    p = (_P3 * f + _P2) * f + _P1
    p = p * f + _P0
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fwd_probs(x, EXP: tl.constexpr):
    """``2^x`` of a finite score tile (``x <= 0``). ``EXP`` 0: every value on the special-function unit
    (MUFU ``ex2``, 16 per clock per SM on Hopper, about half the time of the tile's two GEMMs at D=128);
    1: every second column on the FMA pipe (:func:`_exp2_fma`), halving the MUFU work at 8 FMA/ALU
    instructions per value; 2: a quarter of the columns. (Packed ``ex2.approx.f16x2`` saves nothing:
    ptxas for sm_90 issues it as two ``MUFU.EX2.F16``.)"""
    if EXP == 1:
        xa, xb = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        return tl.reshape(tl.join(tl.math.exp2(xa), _exp2_fma(xb)), (x.shape[0], x.shape[1]))
    elif EXP == 2:
        # a quarter: the tile's column halves (a register bit of the MMA layout), then the second half's
        # odd columns
        lo, hi = tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))
        ha, hb = tl.split(tl.reshape(hi, (x.shape[0], x.shape[1] // 4, 2)))
        hi = tl.reshape(tl.join(tl.math.exp2(ha), _exp2_fma(hb)), (x.shape[0], x.shape[1] // 2))
        return tl.reshape(tl.permute(tl.join(tl.math.exp2(lo), hi), (0, 2, 1)), (x.shape[0], x.shape[1]))
    else:
        return tl.math.exp2(x)


@triton.jit
def _fwd_update(acc, l_i, m_i, qk, v_base, v_desc, b, h, start_n, N, stride_vn, qk_scale, BK: tl.constexpr,
                D: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
                LAZY: tl.constexpr = False, EXP: tl.constexpr = 0):
    """Online-softmax update of (acc, l, m) with the scores ``qk`` of the key block at ``start_n``.

    ``LAZY``: a row's running max moves only when the block raises it by more than 8 (log2 units), and
    the accumulator is rescaled only when some row of the tile moved. Probabilities then reach at most
    2^8 before normalisation (fp32 sums, bf16/fp16 ``p`` hold that exactly enough); once the maxima
    settle, most blocks skip the rescale of the BLOCK_M x D accumulator."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if LAZY:
        m_ij = tl.where(m_new > m_i + 8.0, m_new, m_i)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        if tl.sum((m_ij != m_i).to(tl.int32), 0) > 0:
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
        l_i = l_i + tl.sum(p, 1)
    else:
        m_ij = m_new
        if MASKED:
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        else:
            p = _fwd_probs(qk * qk_scale - m_ij[:, None], EXP)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
    v = _load_rows(v_base, v_desc, b, h, start_n, N, stride_vn, BK, D, USE_TMA, MASKED)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_ij


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, start_n, N, stride_kn, stride_vn,
              qk_scale, BK: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr,
              PREC: tl.constexpr, LAZY: tl.constexpr = False, EXP: tl.constexpr = 0):
    qk = _fwd_scores(q, k_base, k_desc, b, h, start_n, N, stride_kn, BK, D, USE_TMA, MASKED, PREC)
    return _fwd_update(acc, l_i, m_i, qk, v_base, v_desc, b, h, start_n, N, stride_vn, qk_scale, BK, D, USE_TMA,
                       MASKED, PREC, LAZY, EXP)


@triton.jit
def _fwd_online(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, idx_base, lo, hi, has, last, MK, N,
                stride_kn, stride_vn, qk_scale, BK: tl.constexpr, D: tl.constexpr, EVEN_N: tl.constexpr,
                USE_TMA: tl.constexpr, PREC: tl.constexpr, LAZY: tl.constexpr = False, EXP: tl.constexpr = 0,
                STAGES: tl.constexpr = None):
    """The online softmax over list entries ``[lo, hi)``, then the ragged last block (masked) when ``has``;
    ``STAGES``: the loop's pipeline depth (None: the launch's)."""
    for j in tl.range(lo, hi, num_stages=STAGES):
        kb = _kv_block(idx_base, j, MK, last, EVEN_N)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, kb * BK, N,
                                  stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, False, PREC, LAZY, EXP)
    if not EVEN_N:
        if has > 0:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, (MK - 1) * BK, N,
                                      stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, True, PREC, LAZY)
    return acc, l_i, m_i


@triton.jit
def _lane_sums(p):
    """Row sums of ``p`` (rows x BK) left as 4 partial sums per row, one per lane that holds part of the row
    in Hopper's MMA accumulator layout (column ``8i + 2q + e`` sits in lane ``q`` of the row's quad, register
    ``(i, e)``), so that the sums need no shuffles: ``tl.sum(_lane_sums(p), 1) == tl.sum(p, 1)`` up to
    rounding. The grouping is only arithmetic: any layout gives the same sums."""
    x = tl.reshape(p, (p.shape[0], p.shape[1] // 8, 4, 2))
    return tl.sum(tl.sum(x, 3), 1)


@triton.jit
def _fwd_fixed_tile(acc, l_i, ref, q, k_base, v_base, k_desc, v_desc, b, h, start_n, N, stride_kn, stride_vn,
                    qk_scale, BK: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr,
                    PREC: tl.constexpr, LANES: tl.constexpr = False):
    """Update with a fixed reference max ``ref`` per row (log2 units): no running max, no rescale of
    ``acc``. Probabilities above 1 are fine (fp32 and bf16 reach 2^127 with the same relative precision);
    the caller checks the sums for overflow. ``LANES``: ``l_i`` is rows x 4 (see :func:`_lane_sums`)."""
    qk = _fwd_scores(q, k_base, k_desc, b, h, start_n, N, stride_kn, BK, D, USE_TMA, MASKED, PREC)
    p = tl.math.exp2(qk * qk_scale - ref[:, None])
    if LANES:
        l_i = l_i + _lane_sums(p)
    else:
        l_i = l_i + tl.sum(p, 1)
    v = _load_rows(v_base, v_desc, b, h, start_n, N, stride_vn, BK, D, USE_TMA, MASKED)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i


@triton.jit
def _fwd_tile2(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, start0, start1, N, stride_kn, stride_vn,
               qk_scale, BK: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr):
    """Two unmasked key blocks per step: one online-softmax update (max, rescale of ``acc``) for both."""
    k0 = _load_rows(k_base, k_desc, b, h, start0, N, stride_kn, BK, D, USE_TMA, False)
    k1 = _load_rows(k_base, k_desc, b, h, start1, N, stride_kn, BK, D, USE_TMA, False)
    qk0 = tl.dot(q, tl.trans(k0), input_precision=PREC)
    qk1 = tl.dot(q, tl.trans(k1), input_precision=PREC)
    m_ij = tl.maximum(m_i, tl.maximum(tl.max(qk0, 1), tl.max(qk1, 1)) * qk_scale)
    p0 = tl.math.exp2(qk0 * qk_scale - m_ij[:, None])
    p1 = tl.math.exp2(qk1 * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
    acc = acc * alpha[:, None]
    v0 = _load_rows(v_base, v_desc, b, h, start0, N, stride_vn, BK, D, USE_TMA, False)
    acc = tl.dot(p0.to(v0.dtype), v0, acc, input_precision=PREC)
    v1 = _load_rows(v_base, v_desc, b, h, start1, N, stride_vn, BK, D, USE_TMA, False)
    acc = tl.dot(p1.to(v1.dtype), v1, acc, input_precision=PREC)
    return acc, l_i, m_ij


@triton.jit
def _store_tile(acc, m_i, l_i, o_base, lse_base, offs_m, N, stride_on, D: tl.constexpr):
    """Normalise and store output rows ``offs_m`` and their natural-log log-sum-exp (``m_i`` in log2 units);
    rows with no key (``l_i == 0``) get zeros and ``-inf``."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    offs_d = tl.arange(0, D)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], (acc / l_safe[:, None]).to(o_base.dtype.element_ty),
             mask=offs_m[:, None] < N)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(lse_base + offs_m, lse, mask=offs_m < N)


@triton.jit
def _split_fixup(acc, m_i, l_i, PART, ML, LOCKS, t, part, o_base, lse_base, start_m, N, stride_on,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    """One part of a split tile: park (acc, m, l) in the fp32 scratch; the part that arrives last merges
    all ``SPLIT`` parts (stream-K's fix-up) and writes the tile's output and log-sum-exp."""
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    slot = (t * SPLIT + part).to(tl.int64)
    tl.store(PART + slot * (BLOCK_M * D) + rows[:, None] * D + offs_d[None, :], acc)
    tl.store(ML + slot * (2 * BLOCK_M) + rows, m_i)
    tl.store(ML + slot * (2 * BLOCK_M) + BLOCK_M + rows, l_i)
    tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
    arrived = tl.atomic_add(LOCKS + t, 1, sem="acq_rel")
    if arrived == SPLIT - 1:
        # merged in 32-row chunks, read back past L1: a second 128 x D fp32 tile next to acc would spill
        CH: tl.constexpr = 32 if BLOCK_M > 32 else BLOCK_M
        for c in tl.static_range(BLOCK_M // CH):
            r = c * CH + tl.arange(0, CH)
            m = tl.full([CH], float("-inf"), dtype=tl.float32)
            lsum = tl.zeros([CH], dtype=tl.float32)
            o = tl.zeros([CH, D], dtype=tl.float32)
            for p in tl.static_range(SPLIT):
                s = (t * SPLIT + p).to(tl.int64)
                m_p = tl.load(ML + s * (2 * BLOCK_M) + r, cache_modifier=".cg")
                l_p = tl.load(ML + s * (2 * BLOCK_M) + BLOCK_M + r, cache_modifier=".cg")
                o_p = tl.load(PART + s * (BLOCK_M * D) + r[:, None] * D + offs_d[None, :], cache_modifier=".cg")
                m_new = tl.maximum(m, m_p)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all parts empty so far: no -inf - -inf
                a = tl.math.exp2(m - m_ref)
                a_p = tl.math.exp2(m_p - m_ref)
                o = o * a[:, None] + o_p * a_p[:, None]
                lsum = lsum * a + l_p * a_p
                m = m_new
            _store_tile(o, m, lsum, o_base, lse_base, start_m + r, N, stride_on, D)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, KV_IDX, KV_CNT, ORDER, k_desc, v_desc,
    OutL, COS, SIN, S, PART, ML, LOCKS, n_main,
    qk_scale, eps_n, inv_n,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_ln,
    H, N, MQ, MK, KMAX,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_N: tl.constexpr, KMAX_P2: tl.constexpr, USE_ORDER: tl.constexpr, USE_TMA: tl.constexpr,
    PREC: tl.constexpr, PAIR: tl.constexpr, PIPE: tl.constexpr, LAZY: tl.constexpr, WS: tl.constexpr,
    LIN: tl.constexpr, KIND: tl.constexpr, ROPE: tl.constexpr, F32_MODE: tl.constexpr, F32_SPLIT: tl.constexpr,
    LIN_ROWS: tl.constexpr, SPLIT: tl.constexpr, EXP: tl.constexpr = 0, FIXED: tl.constexpr = 0,
    FIX_LIMIT: tl.constexpr = 0.0,
):
    SUB: tl.constexpr = BQ // BLOCK_M
    if SPLIT > 1:
        # one flat grid in the 2-D grid's order: tiles [0, n_main) whole, then each later tile as SPLIT
        # programs, each taking a contiguous share of the key list (the last wave's tiles, spread over
        # more programs so that the card's program slots stay busy to the end; see _split_plan)
        pid0 = tl.program_id(0)
        in_tail = pid0 >= n_main
        rel = tl.maximum(pid0 - n_main, 0)
        tile = tl.where(in_tail, n_main + rel // SPLIT, pid0)
        part = tl.where(in_tail, rel % SPLIT, 0)
        nparts = tl.where(in_tail, SPLIT, 1)
        pid = tile % (MQ * SUB)
        bh = tile // (MQ * SUB)
    else:
        pid = tl.program_id(0)
        bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    slot = pid // SUB
    if USE_ORDER:
        qblk = tl.load(ORDER + bh * MQ + slot)
    else:
        qblk = slot
    row = bh * MQ + qblk
    cnt = tl.load(KV_CNT + row)
    idx_base = KV_IDX + row.to(tl.int64) * KMAX

    start_m = qblk * BQ + (pid % SUB) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_base = Q + q_off
    if WS:
        # Triton's Hopper warp specialisation hands only TMA copies to its producer, so Q comes through a
        # descriptor too: built in-kernel over Q as one (B*H*N, D) matrix, which the pass re-blocks for its
        # two consumers (a host-side one keeps its box; a 4-D one's rows are split wrongly). Rows past N
        # read the next head's queries; they are computed and never stored.
        q_d = tl.make_tensor_descriptor(Q, shape=[tl.num_programs(1) * N, D], strides=[D, 1],
                                        block_shape=[BLOCK_M, D])
        q = q_d.load([bh * N + start_m, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    if not WS:
        has, last = _ragged_entry(idx_base, cnt, MK, EVEN_N, KMAX_P2)
        n_full = cnt - has  # list entries of unmasked key blocks (the ragged last block is done after)
        lo = 0
        hi = n_full
        if SPLIT > 1:
            lo = part * n_full // nparts
            hi = (part + 1) * n_full // nparts
            has = has * (part == nparts - 1)  # the ragged block goes to the last part
    if WS:
        # One TMA producer warpgroup and two consumer warpgroups of BLOCK_M / 2 rows each. The pass declines
        # a function with any if/else (and fails on a peeled first tile), so the list is walked in one loop
        # and, for a ragged N, every tile gets the column mask (one select per score).
        for j in tl.range(0, cnt, warp_specialize=True):
            kb = tl.load(idx_base + j)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, kb * BK, N,
                                      stride_kn, stride_vn, qk_scale, BK, D, True, not EVEN_N, PREC)
    elif PAIR:
        for j in range(0, n_full // 2):
            kb0 = _kv_block(idx_base, 2 * j, MK, last, EVEN_N)
            kb1 = _kv_block(idx_base, 2 * j + 1, MK, last, EVEN_N)
            acc, l_i, m_i = _fwd_tile2(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, kb0 * BK, kb1 * BK,
                                       N, stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, PREC)
        if n_full % 2 == 1:
            kb = _kv_block(idx_base, n_full - 1, MK, last, EVEN_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, kb * BK, N,
                                      stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, False, PREC)
    elif PIPE:
        # the next block's scores are issued before this block's softmax, so the tensor cores work on
        # them while the softmax runs (flash-attention 3's intra-warpgroup overlap, written out)
        if n_full > 0:
            kb = _kv_block(idx_base, 0, MK, last, EVEN_N)
            qk = _fwd_scores(q, k_base, k_desc, b, h, kb * BK, N, stride_kn, BK, D, USE_TMA, False, PREC)
            for j in range(1, n_full):
                kb_next = _kv_block(idx_base, j, MK, last, EVEN_N)
                qk_next = _fwd_scores(q, k_base, k_desc, b, h, kb_next * BK, N, stride_kn, BK, D, USE_TMA, False, PREC)
                acc, l_i, m_i = _fwd_update(acc, l_i, m_i, qk, v_base, v_desc, b, h, kb * BK, N, stride_vn, qk_scale,
                                            BK, D, USE_TMA, False, PREC, LAZY)
                qk = qk_next
                kb = kb_next
            acc, l_i, m_i = _fwd_update(acc, l_i, m_i, qk, v_base, v_desc, b, h, kb * BK, N, stride_vn, qk_scale,
                                        BK, D, USE_TMA, False, PREC, LAZY)
    elif FIXED:
        # No running max: each row's reference is its score against the first key of its list's first block
        # (one key row loaded, a row-wise dot), and every block adds 2^(s - ref) with no rescale of acc.
        # Relative precision does not depend on the scale and that key's term is 1, so this matches the
        # online softmax unless some score exceeds the reference by enough to overflow (2^127 in fp32 and
        # bf16, 2^16 in fp16): a sum past FIX_LIMIT redoes the tile with the online softmax.
        kb0 = tl.load(idx_base, mask=cnt > 0, other=0)
        k_row = tl.load(k_base + (kb0 * BK).to(tl.int64) * stride_kn + offs_d).to(tl.float32)
        ref = tl.sum(q.to(tl.float32) * k_row[None, :], 1) * qk_scale
        m_i = tl.where(cnt > 0, ref, float("-inf"))
        # FIXED == 2: the row sums stay split over the lanes of each row's quad until after the loop (no
        # shuffles per block; see _lane_sums)
        LANES: tl.constexpr = FIXED == 2
        if LANES:
            l_f = tl.zeros([BLOCK_M, 4], dtype=tl.float32)
        else:
            l_f = l_i
        for j in range(0, n_full):
            kb = _kv_block(idx_base, j, MK, last, EVEN_N)
            acc, l_f = _fwd_fixed_tile(acc, l_f, ref, q, k_base, v_base, k_desc, v_desc, b, h, kb * BK, N, stride_kn,
                                       stride_vn, qk_scale, BK, D, USE_TMA, False, PREC, LANES)
        if not EVEN_N:
            if has > 0:
                acc, l_f = _fwd_fixed_tile(acc, l_f, ref, q, k_base, v_base, k_desc, v_desc, b, h, (MK - 1) * BK, N,
                                           stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, True, PREC, LANES)
        if LANES:
            l_i = tl.sum(l_f, 1)
        else:
            l_i = l_f
        if tl.sum(((l_i > FIX_LIMIT) | (l_i != l_i)).to(tl.int32), 0) > 0:
            # unpipelined (STAGES=1): no shared-memory buffers of its own next to the main loop's
            acc, l_i, m_i = _fwd_online(tl.zeros([BLOCK_M, D], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
                                        tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), q, k_base, v_base, k_desc,
                                        v_desc, b, h, idx_base, 0, n_full, has, last, MK, N, stride_kn, stride_vn,
                                        qk_scale, BK, D, EVEN_N, USE_TMA, PREC, STAGES=1)
    else:
        acc, l_i, m_i = _fwd_online(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, idx_base, lo, hi, has,
                                    last, MK, N, stride_kn, stride_vn, qk_scale, BK, D, EVEN_N, USE_TMA, PREC, LAZY,
                                    EXP)
    if not EVEN_N and (PAIR or PIPE):  # the loops above that leave the ragged block to here
        if has > 0:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, (MK - 1) * BK, N,
                                      stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, True, PREC, LAZY)

    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    lse_base = LSE + bh.to(tl.int64) * N
    if SPLIT > 1:
        # two branches, so that acc is dead by the time a split tile's merge runs
        if in_tail:
            _split_fixup(acc, m_i, l_i, PART, ML, LOCKS, tile - n_main, part, o_base, lse_base, start_m, N,
                         stride_on, D, BLOCK_M, SPLIT)
        else:
            _store_tile(acc, m_i, l_i, o_base, lse_base, offs_m, N, stride_on, D)
    else:
        _store_tile(acc, m_i, l_i, o_base, lse_base, offs_m, N, stride_on, D)

    if LIN:
        # SALAD's linear branch, its Q pass for these rows fused here (kernels.fused). The state (S, z)
        # comes from the K/V pass (kernels.linear_attn), in its half layout and sum units.
        D2: tl.constexpr = D // 2
        s0, s1, z0, z1 = _load_state(S, bh, inv_n, D2, D)
        s0h, s0l = _split_b(s0, F32_MODE, F32_SPLIT)
        s1h, s1l = _split_b(s1, F32_MODE, F32_SPLIT)
        # in sub-tiles of LIN_ROWS queries, re-read from global memory: the whole tile's features and rotated
        # features would not fit in the registers next to the state (ptxas spilled ~1 KB per thread)
        l_base = OutL + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
        LR: tl.constexpr = BLOCK_M if BLOCK_M < LIN_ROWS else LIN_ROWS
        for sub in tl.range(0, BLOCK_M // LR, loop_unroll_factor=1):
            offs = start_m + sub * LR + tl.arange(0, LR)
            _x, _f, f0, f1, r0, r1, _c, _s = _load_feat(Q, COS, SIN, q_off, offs, N, stride_qn, KIND, ROPE, LR, D)
            out_l = _out_tile(f0, f1, r0, r1, s0h, s0l, s1h, s1l, z0, z1, eps_n, F32_MODE, F32_SPLIT, LR, D)
            tl.store(l_base + offs[:, None] * stride_ln + offs_d[None, :], out_l.to(OutL.dtype.element_ty),
                     mask=offs[:, None] < N)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(Out, DO, DELTA, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn, H, N,
                    D: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    mask = offs[:, None] < N
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs[:, None] * stride_on
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs[:, None] * stride_dn
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs, delta, mask=offs < N)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QT_IDX, QT_CNT, ORDER,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_dkb, stride_dkh, stride_dkn,
    H, N, MK, QT_STRIDE,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    USE_ORDER: tl.constexpr, PREC: tl.constexpr,
):
    SUB: tl.constexpr = BQ // BLOCK_M
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if USE_ORDER:
        kblk = tl.load(ORDER + bh * MK + pid)
    else:
        kblk = pid
    row = bh * MK + kblk
    cnt = tl.load(QT_CNT + row)
    idx_base = QT_IDX + row.to(tl.int64) * QT_STRIDE

    offs_n = kblk * BK + tl.arange(0, BK)
    offs_d = tl.arange(0, D)
    nmask = offs_n[:, None] < N
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :], mask=nmask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :], mask=nmask, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    lse_base = LSE + bh.to(tl.int64) * N
    delta_base = DELTA + bh.to(tl.int64) * N

    dk = tl.zeros([BK, D], dtype=tl.float32)
    dv = tl.zeros([BK, D], dtype=tl.float32)
    for t in range(0, cnt * SUB):
        qb = tl.load(idx_base + t // SUB)
        offs_m = qb * BQ + (t % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < N
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mmask[:, None], other=0.0)
        # padded query rows get lse=+inf: their probabilities are exactly 0
        lse2 = tl.load(lse_base + offs_m, mask=mmask, other=float("inf")) * 1.4426950408889634
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], mask=mmask[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        delta = tl.load(delta_base + offs_m, mask=mmask, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    dk = dk * sm_scale
    out_off = b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=nmask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=nmask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, b, h, start_n, N, stride_kn, stride_vn,
             qk_scale, BK: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr,
             PREC: tl.constexpr):
    k = _load_rows(k_base, k_desc, b, h, start_n, N, stride_kn, BK, D, USE_TMA, MASKED)
    v = _load_rows(v_base, v_desc, b, h, start_n, N, stride_vn, BK, D, USE_TMA, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        cols = start_n + tl.arange(0, BK)
        p = tl.where(cols[None, :] < N, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KV_IDX, KV_CNT, ORDER, k_desc, v_desc,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, MQ, MK, KMAX,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_N: tl.constexpr, KMAX_P2: tl.constexpr, USE_ORDER: tl.constexpr, USE_TMA: tl.constexpr,
    PREC: tl.constexpr,
):
    SUB: tl.constexpr = BQ // BLOCK_M
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    slot = pid // SUB
    if USE_ORDER:
        qblk = tl.load(ORDER + bh * MQ + slot)
    else:
        qblk = slot
    row = bh * MQ + qblk
    cnt = tl.load(KV_CNT + row)
    idx_base = KV_IDX + row.to(tl.int64) * KMAX

    offs_m = qblk * BQ + (pid % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mmask = offs_m < N
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :], mask=mmask[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dn
                 + offs_d[None, :], mask=mmask[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=mmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=mmask, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    has, last = _ragged_entry(idx_base, cnt, MK, EVEN_N, KMAX_P2)
    for j in range(0, cnt - has):
        kb = _kv_block(idx_base, j, MK, last, EVEN_N)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, b, h, kb * BK, N, stride_kn,
                      stride_vn, qk_scale, BK, D, USE_TMA, False, PREC)
    if not EVEN_N:
        if has > 0:
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, k_desc, v_desc, b, h, (MK - 1) * BK, N,
                          stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, True, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mmask[:, None])


# ----------------------------------------------------------------------------------------------------
# configs: autotuned on CUDA (keyed by head dim, tile shape and dtype), fixed in the interpreter
# ----------------------------------------------------------------------------------------------------
def _prune_block_m(configs, named_args, **kwargs):
    bq = kwargs.get("BQ", named_args.get("BQ"))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= bq and bq % c.kwargs["BLOCK_M"] == 0]
    if kwargs.get("WS"):
        # Triton's Hopper warp specialisation takes 4-warp programs only and splits BLOCK_M over two
        # consumer warpgroups of at least 64 rows each
        keep = [c for c in keep if c.num_warps == 4 and c.kwargs["BLOCK_M"] == 128]
    if not keep:
        keep = [triton.Config({"BLOCK_M": bq}, num_warps=4, num_stages=2)]
    return keep


_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm in (128, 64)
    for w in (4, 8)
    for s in (2, 3, 4)
]
# Not offered to the autotuner: 8 warps capped at 128 registers (ptxas fits the 128 x 64 tile without
# spills; two programs, four warpgroups per SM). Its timing sometimes wins the autotuner's short
# benchmark, but in interleaved rounds on the H200 it ran 1.37-1.39 ms against 1.32 for 128 x 4 warps x
# 2 stages (docs/lab/kernels-notes.md, run 6). ``OPTIONS["fwd_config"]`` can still select it.
_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm in (128, 64, 32)
    for w in (4, 8)
    for s in (2, 3)
]
_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm in (128, 64)
    for w in (4, 8)
    for s in (2, 3)
]
_KEY = ["D", "BQ", "BK", "EVEN_N", "USE_TMA", "PAIR", "PIPE", "LAZY", "WS", "LIN", "KIND", "ROPE", "F32_MODE", "EXP", "FIXED"]
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_block_m})(
    _fwd_kernel
)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=["D", "BQ", "BK"], prune_configs_by={"early_config_prune": _prune_block_m})(
    _bwd_dkdv_kernel
)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=["D", "BQ", "BK", "EVEN_N", "USE_TMA"], prune_configs_by={"early_config_prune": _prune_block_m})(
    _bwd_dq_kernel
)


def _launch(tuned, raw, grid_fn, args, kwargs, config: dict | None):
    """Run the autotuned kernel, or a fixed config (interpreter, or an explicit ``config``)."""
    if config is None and not _INTERPRET:
        tuned[grid_fn](*args, **kwargs)
        return
    cfg = dict(config or {})
    launch = {"num_warps": cfg.pop("num_warps", 4), "num_stages": cfg.pop("num_stages", 2)}
    if maxnreg := cfg.pop("maxnreg", None):
        launch["maxnreg"] = maxnreg
    bm = cfg.get("BLOCK_M", min(64, kwargs["BQ"]))
    cfg["BLOCK_M"] = bm
    meta = {**kwargs, **cfg}
    raw[grid_fn(meta)](*args, **meta, **launch)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes disagree: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise Unsupported(f"the Triton block-sparse kernel needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); got {q.device}")
    ok_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in ok_dtypes:
        raise Unsupported(f"the Triton block-sparse kernel supports float16, bfloat16 and float32, not {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise Unsupported(f"the Triton block-sparse kernel supports head_dim {SUPPORTED_HEAD_DIMS}, not {q.shape[-1]}")
    if layout.block_q not in SUPPORTED_BLOCKS or layout.block_k not in SUPPORTED_BLOCKS:
        raise Unsupported(
            f"the Triton block-sparse kernel supports block sizes {SUPPORTED_BLOCKS}; got {layout.block_q}x{layout.block_k}"
        )
    b, h, n, _ = q.shape
    if layout.seq_len != n or tuple(layout.kv_cnt.shape[:2]) != (b, h):
        raise ValueError(f"layout is for N={layout.seq_len}, B,H={tuple(layout.kv_cnt.shape[:2])}; q is {tuple(q.shape)}")
    if layout.kv_idx.device != q.device:
        raise ValueError(f"layout is on {layout.kv_idx.device}, q on {q.device}")


def _lastdim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_order(cnt: torch.Tensor) -> torch.Tensor:
    """Per (batch, head): row indices sorted by descending work (longest lists start first)."""
    return torch.argsort(cnt, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()


def transpose_layout(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key block, the query blocks attending to it (ascending): ``(B, H, Mk, >=Mq)`` and counts.

    Built with torch ops from the tile map (blocks, not tokens) without a host sync; the index tensor
    is a view whose row stride is ``Mq + 1``.
    """
    tiles = layout.to_dense().transpose(-1, -2)  # (B, H, Mk, Mq)
    b, h, mk, mq = tiles.shape
    cnt = tiles.sum(-1, dtype=torch.int32)
    pos = tiles.cumsum(-1) - 1
    target = torch.where(tiles, pos, torch.full_like(pos, mq))
    src = torch.arange(mq, dtype=torch.int32, device=tiles.device).expand(b, h, mk, mq)
    idx = torch.zeros(b, h, mk, mq + 1, dtype=torch.int32, device=tiles.device).scatter_(-1, target, src)
    return idx, cnt.contiguous()


def _split_plan(n_tiles: int, slots: int, max_parts: int = 4) -> tuple[int, int]:
    """``(parts, n_main)``: how to spread the last, partial wave of ``n_tiles`` equal programs over
    ``slots`` resident program slots. Tiles ``[0, n_main)`` run whole; each later tile runs as ``parts``
    programs with a share of its key list each. ``parts`` minimises the tail's length in waves,
    ``ceil(tail * parts / slots) / parts`` (the smallest such count; 1 when splitting gains nothing).

    At Wan 480p (3,072 tiles of 128 queries) on an H200 (132 SMs x 2 programs) the tail is 168 tiles and
    three parts make it two thirds of a wave. That pays only if a partial wave takes a whole wave's time;
    on the H200 it does not (a program alone on an SM runs 1.5x faster than two together, so the tail
    costs 0.5% more than its share; scripts/wave_tail.py), and the split measured the same as none
    (docs/lab/kernels-notes.md, run 9)."""
    tail = n_tiles % slots if slots > 0 else 0
    if tail == 0:
        return 1, n_tiles
    best, best_len = 1, 1.0
    for parts in range(2, max_parts + 1):
        length = cdiv(tail * parts, slots) / parts
        if length < best_len - 1e-9:
            best, best_len = parts, length
    return best, (n_tiles - tail if best > 1 else n_tiles)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter (tests give slots directly)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# Largest row sum the fixed-reference forward accepts before redoing a tile online: probabilities up to
# it, times |v| up to 2^52 over 2^12 keys, stay below fp32's 2^128; fp16 probabilities must stay below
# 2^16. (On the H200 the limit is one immediate in the check after the loop: 2^100, as measured in run 10,
# and 2^64 build the same main loop.)
_FIX_LIMIT = {torch.float16: 2.0**14, torch.bfloat16: 2.0**64, torch.float32: 2.0**64}
_SPLIT_CONFIG = {"BLOCK_M": 128, "num_warps": 4, "num_stages": 2}  # the H200 autotuner's pick at 128 x 64


def _forward(q, k, v, layout: BlockLayout, scale: float, *, order: bool = False, use_tma: bool = False,
             pair: bool = False, pipe: bool = False, lazy: bool = False, ws: bool = False,
             config: dict | None = None, lin: dict | None = None, split_slots: int = 0, exp: str = "mufu",
             fixed_max: bool = False, lane_sums: bool = False):
    """``(out, lse)``. ``lin``: SALAD's linear-branch Q pass fused into the epilogue: a dict with ``out`` (the
    branch's output, written here), ``state`` (the K/V pass's summed state, half layout), ``cos``, ``sin``,
    ``rope``, ``kind`` (0 relu, 1 elu, 2 softmax), ``eps`` and ``modes`` (see kernels.linear_attn).
    ``split_slots``: resident program slots on the card (SMs x programs per SM); when > 0 the last wave's
    tiles are split over several programs (:func:`_split_plan`), and when that happens the launch uses a
    fixed config (``config`` or ``_SPLIT_CONFIG``), since the grid depends on BLOCK_M. ``exp``: how the
    unmasked blocks' probabilities are exponentiated, one of :data:`EXP_MODES` (see :func:`_fwd_probs`).
    ``fixed_max``: no running max; each row's reference is its score against its list's first key (no
    rescaling; a tile whose sums pass ``_FIX_LIMIT`` is redone with the online softmax). Only in the default
    loop with ``exp="mufu"``; elsewhere the online softmax runs. ``lane_sums`` (with ``fixed_max``): the row
    sums stay split over the lanes of each row until after the loop (see :func:`_lane_sums`)."""
    if exp not in EXP_MODES:
        raise ValueError(f"unknown fwd_exp {exp!r}: use one of {sorted(EXP_MODES)}")
    b, h, n, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    mq, mk = cdiv(n, bq), cdiv(n, bk)
    kv_idx = layout.kv_idx.to(torch.int32).contiguous()
    kv_cnt = layout.kv_cnt.to(torch.int32).contiguous()
    kmax = kv_idx.shape[-1]
    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    ordr = _row_order(kv_cnt) if order else kv_cnt
    use_tma = bool(use_tma or ws) and _tma_ok(*((q, k, v) if ws else (k, v)))
    if ws and not use_tma:
        raise Unsupported("the warp-specialised forward (fwd_ws) needs TMA loads: sm90+ and 16-byte aligned "
                          "q/k/v; turn fwd_ws off")
    k_desc = _tma_desc(k, bk) if use_tma else k
    v_desc = _tma_desc(v, bk) if use_tma else v
    if ws:
        q = q.contiguous()  # read in-kernel as one (B*H*N, D) matrix
        _scratch_allocator()  # the in-kernel TMA descriptor's 128 bytes per program
    out_l, cos, sin, state = (lin["out"], lin["cos"], lin["sin"], lin["state"]) if lin else (out, lse, lse, lse)
    parts, n_main, part_buf, ml_buf, locks = 1, 0, lse, lse, kv_cnt
    # the fixed reference is built into the default loop only (the split, the other loops, the FMA
    # exponential, whose bit trick needs x < 127, and the fused linear epilogue keep the online softmax)
    fixed_max = bool(fixed_max) and exp == "mufu" and not (pair or pipe or ws or lazy or split_slots > 0
                                                          or lin is not None)
    if split_slots > 0:
        if pair or pipe or ws or lin is not None:
            raise ValueError("the split last wave (fwd_split) is built for the default forward loop only; turn "
                             "fwd_pair, fwd_pipe and fwd_ws off (and do not fuse the linear branch)")
        split_cfg = dict(config or _SPLIT_CONFIG)
        split_cfg["BLOCK_M"] = bm = min(split_cfg.get("BLOCK_M", 128), bq)
        n_tiles = mq * (bq // bm) * b * h
        parts, n_main = _split_plan(n_tiles, split_slots)
        if parts > 1:  # the grid depends on BLOCK_M: a fixed config, not the autotuner's pick
            config = split_cfg
            tail = n_tiles - n_main
            part_buf = torch.empty((tail * parts, bm, d), dtype=torch.float32, device=q.device)
            ml_buf = torch.empty((tail * parts, 2, bm), dtype=torch.float32, device=q.device)
            locks = torch.zeros(tail, dtype=torch.int32, device=q.device)
    args = (
        q, k, v, out, lse, kv_idx, kv_cnt, ordr, k_desc, v_desc, out_l, cos, sin, state,
        part_buf, ml_buf, locks, n_main,
        scale * LOG2E, (lin["eps"] / n) if lin else 0.0, 1.0 / n,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        out_l.stride(0), out_l.stride(1), out_l.stride(2),
        h, n, mq, mk, kmax,
    )
    modes = lin["modes"] if lin else {"F32_MODE": 1, "F32_SPLIT": False}
    kwargs = dict(D=d, BQ=bq, BK=bk, EVEN_N=(n % bk == 0), KMAX_P2=triton.next_power_of_2(max(kmax, 2)),
                  USE_ORDER=order, USE_TMA=use_tma, PREC=_prec(q.dtype), PAIR=bool(pair) and not ws,
                  PIPE=bool(pipe) and not (pair or ws), LAZY=bool(lazy) and not ws, WS=bool(ws),
                  LIN=lin is not None, KIND=lin["kind"] if lin else 0, ROPE=bool(lin and lin["rope"]),
                  F32_MODE=modes["F32_MODE"], F32_SPLIT=modes["F32_SPLIT"], LIN_ROWS=OPTIONS["lin_rows"], SPLIT=parts,
                  EXP=EXP_MODES[exp], FIXED=(2 if lane_sums else 1) if fixed_max else 0,
                  FIX_LIMIT=_FIX_LIMIT[q.dtype])

    def grid(meta):
        if parts > 1:
            return (n_main + (mq * (bq // meta["BLOCK_M"]) * b * h - n_main) * parts,)
        return (mq * (bq // meta["BLOCK_M"]), b * h)

    _launch(_fwd_tuned, _fwd_kernel, grid, args, kwargs, config)
    return out, lse


def _backward(do, q, k, v, out, lse, layout: BlockLayout, scale: float, *, order: bool = True,
              use_tma: bool = False, dkdv_config: dict | None = None, dq_config: dict | None = None):
    b, h, n, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    mq, mk = cdiv(n, bq), cdiv(n, bk)
    do = _lastdim_contig(do)
    delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    pre_block = 64
    _bwd_preprocess[(cdiv(n, pre_block), b * h)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        h, n, D=d, BLOCK=pre_block,
    )
    dq = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    qk_scale = scale * LOG2E
    prec = _prec(q.dtype)

    qt_idx, qt_cnt = transpose_layout(layout)
    k_order = _row_order(qt_cnt) if order else qt_cnt
    args = (
        q, k, v, do, dk, dv, lse, delta, qt_idx, qt_cnt, k_order, qk_scale, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        h, n, mk, qt_idx.stride(2),
    )
    kwargs = dict(D=d, BQ=bq, BK=bk, USE_ORDER=order, PREC=prec)
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, lambda meta: (mk, b * h), args, kwargs, dkdv_config)

    kv_idx = layout.kv_idx.to(torch.int32).contiguous()
    kv_cnt = layout.kv_cnt.to(torch.int32).contiguous()
    kmax = kv_idx.shape[-1]
    q_order = _row_order(kv_cnt) if order else kv_cnt
    use_tma = bool(use_tma) and _tma_ok(k, v)
    k_desc = _tma_desc(k, bk) if use_tma else k
    v_desc = _tma_desc(v, bk) if use_tma else v
    args = (
        q, k, v, do, dq, lse, delta, kv_idx, kv_cnt, q_order, k_desc, v_desc, qk_scale, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        h, n, mq, mk, kmax,
    )
    kwargs = dict(D=d, BQ=bq, BK=bk, EVEN_N=(n % bk == 0), KMAX_P2=triton.next_power_of_2(max(kmax, 2)),
                  USE_ORDER=order, USE_TMA=use_tma, PREC=prec)
    _launch(_dq_tuned, _bwd_dq_kernel, lambda meta: (mq * (bq // meta["BLOCK_M"]), b * h), args, kwargs, dq_config)
    return dq, dk, dv


# Execution options used by the public function; the benchmark flips them to time variants.
# TMA loads are used where the hardware has them (sm90+; see _tma_ok), pointer loads elsewhere.
# ``fwd_pair``: the forward takes two key blocks per online-softmax step (one rescale of the accumulator
# per 2 x block_k keys).
# ``fwd_pipe``: the next key block's scores are computed before this block's softmax (Triton 3.6 waits for
# them at once, so no overlap results; kept for the benchmark). ``fwd_config``: a fixed launch config
# (BLOCK_M, num_warps, num_stages, maxnreg) instead of the autotuner's pick.
# ``fwd_lazy``: rescale the accumulator only when a row's running max grows by more than 2^8 (see _fwd_update).
# ``fwd_ws``: Triton's automatic warp specialisation on Hopper (a TMA producer warpgroup and two consumer
# warpgroups; Q also through TMA; the column mask on every tile for a ragged N). Correct, and slower on the
# H200 (1.41 against 1.33 ms at d=0.10; docs/lab/kernels-notes.md, run 8). ``lin_rows``: query rows per step of the
# fused linear-branch epilogue (kernels.fused).
# ``fwd_gluon``: the forward written in Gluon for sm_90 (flash-attention 3's overlap of one block's softmax
# with the previous block's PV GEMM; kernels/block_sparse_gluon.py); True for 128 query rows per program,
# 64 for 64, "ws" for the warp-specialised kernel (a producer warp, two 64-row consumer warpgroups), tuned
# by ``gluon_ws_slots`` (K/V ring depth), ``gluon_ws_regs`` (registers per consumer thread),
# ``gluon_ws_pingpong`` (the consumers take turns issuing their GEMMs) and ``gluon_ws_group`` (key blocks
# per step). Measured on the H200 (run 10): 1.46 ms against 1.33 ms for the default; 1.58 with the
# ping-pong, 1.67 with two blocks per step.
# ``fwd_split``: programs resident per SM (0: off). With it, the tiles of the last, partial wave are each
# split over up to 4 programs and merged by the last to finish (see _split_plan; fixed launch config).
# Measured on the H200: 1.328-1.340 ms against 1.331-1.349 for the default in the same rounds (run 9).
# ``fwd_exp``: how the forward exponentiates its scores (see _fwd_probs): "mufu" (the special-function
# unit), "fma" / "fma4" (every second / fourth column by a cubic on the FMA pipe). Measured on the H200
# (run 10): 1.463 / 1.413 ms against 1.335 ms for "mufu" in the same rounds.
EXP_MODES = {"mufu": 0, "fma": 1, "fma4": 2}
# ``fwd_fixed_max`` (off: where scores are peaked nearly every tile is redone, so it is not faster on every
# input; docs/lab/2026-12-06-h100.md): no running max; each row's reference is its score against one key of its list
# (see the FIXED branch of _fwd_kernel), with an online-softmax redo of any tile whose sums pass
# _FIX_LIMIT. Measured on the H200 (run 10): 1.275 / 1.278 ms against 1.322 / 1.330 ms for the online
# softmax at d=0.10 (7 rounds on each of two cards), 11.52 against 12.45 ms at d=1.0.
# ``fwd_lane_sums`` (on, with ``fwd_fixed_max``): the row sums stay split over the 4 lanes of each row's quad
# until after the loop (see _lane_sums): 8 shuffles and 8 adds fewer per block. Measured on the H200 (run 11,
# r24, 9 rounds on each of two cards): 1.236 / 1.243 ms against 1.319 / 1.326 ms with a row sum per block;
# 1.42x / 1.42x Flex with the same mask.
OPTIONS: dict = {"fwd_exp": "mufu", "fwd_fixed_max": False, "fwd_lane_sums": True, "fwd_order": False, "fwd_tma": True,
                 "fwd_pair": False, "fwd_pipe": False, "fwd_lazy": False, "fwd_ws": False, "fwd_config": None, "fwd_split": 0, "fwd_gluon": False,
                 "gluon_ws_slots": 4, "gluon_ws_regs": 232, "gluon_ws_pingpong": False, "gluon_ws_group": 1,
                 "bwd_order": True, "bwd_tma": False, "lin_rows": 32}


def _forward_with_options(q, k, v, layout: BlockLayout, scale: float, lin: dict | None = None):
    """:func:`_forward` with the execution options in ``OPTIONS`` (no warp specialisation with ``lin``);
    ``fwd_gluon`` runs the Gluon forward for Hopper instead (:mod:`kernels.block_sparse_gluon`)."""
    if OPTIONS["fwd_gluon"] and lin is None:
        from salad_bench.kernels.block_sparse_gluon import block_sparse_forward_gluon

        g = OPTIONS["fwd_gluon"]
        return block_sparse_forward_gluon(q, k, v, layout, scale, rows=128 if g is True else g if g == "ws" else int(g),
                                          ws_slots=OPTIONS["gluon_ws_slots"], ws_regs=OPTIONS["gluon_ws_regs"],
                                          ws_pingpong=OPTIONS["gluon_ws_pingpong"], ws_group=OPTIONS["gluon_ws_group"])
    return _forward(q, k, v, layout, scale, order=OPTIONS["fwd_order"], use_tma=OPTIONS["fwd_tma"],
                    pair=OPTIONS["fwd_pair"], pipe=OPTIONS["fwd_pipe"], lazy=OPTIONS["fwd_lazy"],
                    ws=OPTIONS["fwd_ws"] and lin is None, config=OPTIONS["fwd_config"], lin=lin,
                    split_slots=OPTIONS["fwd_split"] * _sm_count(q.device) if lin is None else 0,
                    exp=OPTIONS["fwd_exp"], fixed_max=OPTIONS["fwd_fixed_max"],
                    lane_sums=OPTIONS["fwd_lane_sums"])


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_idx, kv_cnt, block_q, block_k, scale):
        layout = BlockLayout(kv_idx, kv_cnt, block_q, block_k, q.shape[2])
        out, lse = _forward_with_options(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse, kv_idx, kv_cnt)
        ctx.blocks = (block_q, block_k)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, kv_idx, kv_cnt = ctx.saved_tensors
        layout = BlockLayout(kv_idx, kv_cnt, ctx.blocks[0], ctx.blocks[1], q.shape[2])
        dq, dk, dv = _backward(dout, q, k, v, out, lse, layout, ctx.scale, order=OPTIONS["bwd_order"],
                               use_tma=OPTIONS["bwd_tma"])
        return dq, dk, dv, None, None, None, None, None


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the layout's kept tiles (differentiable in q, k, v).

    ``q, k, v``: ``(B, H, N, D)`` fp16/bf16 on CUDA (fp32 also accepted), last dim contiguous (copied
    otherwise). Returns ``out`` ``(B, H, N, D)`` in q's dtype and, with ``return_lse``, the natural-log
    log-sum-exp ``(B, H, N)`` float32 (``-inf`` on query blocks that keep no key block, whose output
    is 0). Raises :class:`Unsupported` for a device, dtype, head_dim or block size it cannot run.
    """
    _check(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    out, lse = _BlockSparseAttention.apply(
        q, k, v, layout.kv_idx, layout.kv_cnt, layout.block_q, layout.block_k, scale
    )
    return (out, lse) if return_lse else out
