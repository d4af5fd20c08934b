"""Block-sparse softmax attention in Triton: forward, backward and an autograd wrapper.

Executes a :class:`~kernels.layout.BlockLayout` exactly like :func:`kernels.reference.block_sparse_attention_ref`
(its torch reference): ``(B, H, N, D)`` in and out, any ``N`` (the last query/key block may be ragged),
``block_q``/``block_k`` in {16, 32, 64, 128} (tuned for 128 x 64), ``D`` in {64, 128}, fp16/bf16 (fp32 is
accepted and computed with IEEE fp32 dots; it exists for the CPU interpreter tests).

Design (flash-attention 2 / Triton tutorial 06 style):

* forward: one program per (query sub-block, batch*head); it walks the query block's key-block list
  with the online softmax, in base 2 (scores scaled by ``scale * log2(e)`` inside one FMA, ``exp2``):
  a running row max, the accumulator rescaled when it moves. Only the ragged last key block (index
  ``Mk - 1`` when ``N % block_k != 0``) is masked: the program finds it in its list once, swaps it with
  the list's last entry on the fly (scalar ``where``, no branch in the loop) and processes it after the
  loop with the column mask. Empty query blocks give zeros and a log-sum-exp of ``-inf``.
* backward: ``delta = rowsum(dO * O)``; dK/dV per key block over the *transposed* layout (query blocks
  that attend to it, built from the tile map with torch ops: blocks, not tokens); dQ per query block
  over the layout. Neither needs a score mask: padded key rows load as zeros (they add nothing to dQ,
  and a ragged key block is processed masked like the forward for dQ), padded query rows get
  ``lse = +inf`` so their probabilities are exactly 0. Both take heavy rows first inside each head
  (longest lists start early, and K/V or Q of one head stay hot in L2).
* the forward's K/V loads come from host-side TMA tensor descriptors over the 4-D ``(B, H, N, D)``
  tensor (bounds handled by the hardware, zero padding) where the card and the tensors allow them
  (sm90+ or the interpreter, 16-byte aligned: :func:`kernels.tma.tma_ok`), from plain pointers elsewhere.

Variants that were measured and lost (and their figures) are in docs/lab/kernels-notes.md.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.launch import autotuned, check_inference, check_qkv
from salad_bench.kernels.layout import BlockLayout, cdiv, token_major
from salad_bench.kernels.tma import tma_desc as _tma_desc
from salad_bench.kernels.tma import tma_ok as _tma_ok

__all__ = ["block_sparse_attention_triton", "transpose_layout", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCKS"]

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCKS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------------
# tile loads
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_ptr_rows(base, start, N, stride_n, ROWS: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """``ROWS x D`` tile of one (batch, head) at ``base`` starting at token ``start``; rows past N are zeros."""
    offs = start + tl.arange(0, ROWS)
    ptrs = base + offs[:, None] * stride_n + tl.arange(0, D)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=offs[:, None] < N, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_rows(base, desc, b, h, start, N, stride_n, ROWS: tl.constexpr, D: tl.constexpr,
               USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """``ROWS x D`` tile of one (batch, head) starting at token ``start``, through the TMA descriptor
    ``desc`` or from ``base``; rows past N are zeros."""
    if USE_TMA:
        return desc.load([b, h, start, 0]).reshape(ROWS, D)
    else:
        return _load_ptr_rows(base, start, N, stride_n, ROWS, D, MASKED)


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


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, start_n, N, stride_kn, stride_vn, qk_scale,
              BK: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update of (acc, l, m) with the key block at ``start_n`` (``m`` in log2 units)."""
    qk = _fwd_scores(q, k_base, k_desc, b, h, start_n, N, stride_kn, BK, D, USE_TMA, MASKED, PREC)
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_rows(v_base, v_desc, b, h, start_n, N, stride_vn, BK, D, USE_TMA, MASKED)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_ij


@triton.jit
def _store_tile(acc, m_i, l_i, o_base, lse_base, offs_m, tok, N, stride_on, r_base, stride_rn, D: tl.constexpr,
                HAS_RES: tl.constexpr):
    """Normalise and store the output of query positions ``offs_m`` at tokens ``tok`` (plus the residual's
    rows of those tokens where ``HAS_RES``, added in fp32) and the positions' natural-log log-sum-exp
    (``m_i`` in log2 units); rows with no key (``l_i == 0``) get zeros (the residual alone) and ``-inf``."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    offs_d = tl.arange(0, D)
    o = acc / l_safe[:, None]
    if HAS_RES:
        r = tl.load(r_base + tok[:, None] * stride_rn + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
        o += r.to(tl.float32)
    tl.store(o_base + tok[:, None] * stride_on + offs_d[None, :], o.to(o_base.dtype.element_ty),
             mask=offs_m[:, None] < N)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(lse_base + offs_m, lse, mask=offs_m < N)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, KV_IDX, KV_CNT, k_desc, v_desc, Res, QIdx,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_rb, stride_rh, stride_rn,
    H, N, MQ, MK, KMAX,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_N: tl.constexpr, KMAX_P2: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_QIDX: tl.constexpr,
):
    SUB: tl.constexpr = BQ // BLOCK_M
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qblk = pid // SUB
    row = bh * MQ + qblk
    cnt = tl.load(KV_CNT + row)
    idx_base = KV_IDX + row.to(tl.int64) * KMAX

    start_m = qblk * BQ + (pid % SUB) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if HAS_QIDX:  # query position i is token QIdx[i]: its row is read, and its output written, there
        tok = tl.load(QIdx + offs_m, mask=offs_m < N, other=0)
    else:
        tok = offs_m
    q = tl.load(q_base + tok[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    has, last = _ragged_entry(idx_base, cnt, MK, EVEN_N, KMAX_P2)
    n_full = cnt - has  # list entries of unmasked key blocks (the ragged last block is done after)
    for j in tl.range(0, n_full):
        kb = _kv_block(idx_base, j, MK, last, EVEN_N)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, kb * BK, N,
                                  stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, False, PREC)
    if not EVEN_N:
        if has > 0:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, h, (MK - 1) * BK, N,
                                      stride_kn, stride_vn, qk_scale, BK, D, USE_TMA, True, PREC)

    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    lse_base = LSE + bh.to(tl.int64) * N
    r_base = Res + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
    _store_tile(acc, m_i, l_i, o_base, lse_base, offs_m, tok, N, stride_on, r_base, stride_rn, D, HAS_RES)


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
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
):
    SUB: tl.constexpr = BQ // BLOCK_M
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kblk = tl.load(ORDER + bh * MK + pid)  # heavy key blocks first
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
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, start_n, N, stride_kn, stride_vn, qk_scale, BK: tl.constexpr,
             D: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    k = _load_ptr_rows(k_base, start_n, N, stride_kn, BK, D, MASKED)
    v = _load_ptr_rows(v_base, start_n, N, stride_vn, BK, D, MASKED)
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
    Q, K, V, DO, DQ, LSE, DELTA, KV_IDX, KV_CNT, ORDER,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, MQ, MK, KMAX,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_N: tl.constexpr, KMAX_P2: tl.constexpr, PREC: tl.constexpr,
):
    SUB: tl.constexpr = BQ // BLOCK_M
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    slot = pid // SUB
    qblk = tl.load(ORDER + bh * MQ + slot)  # heavy query blocks first
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
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kb * BK, N, stride_kn, stride_vn, qk_scale, BK, D,
                      False, PREC)
    if not EVEN_N:
        if has > 0:
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, (MK - 1) * BK, N, stride_kn, stride_vn, qk_scale,
                          BK, D, True, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqn
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mmask[:, None])


# ----------------------------------------------------------------------------------------------------
# configs: autotuned on CUDA (keyed by head dim, tile shape and dtype), fixed in the interpreter
# ----------------------------------------------------------------------------------------------------
def _prune_block_m(configs, named_args, **kwargs):
    bq = kwargs.get("BQ", named_args.get("BQ"))
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= bq and bq % c.kwargs["BLOCK_M"] == 0]
    if not keep:
        keep = [triton.Config({"BLOCK_M": bq}, num_warps=4, num_stages=2)]
    return keep


_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm in (128, 64)
    for w in (4, 8)
    for s in (2, 3, 4)
]
# Not offered to the autotuner: 8 warps capped at 128 registers. Its timing sometimes wins the autotuner's
# short benchmark and then loses in interleaved rounds (docs/lab/kernels-notes.md).
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
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["D", "BQ", "BK", "EVEN_N", "USE_TMA", "HAS_RES", "HAS_QIDX"],
                             prune_configs_by={"early_config_prune": _prune_block_m})(_fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=["D", "BQ", "BK"], prune_configs_by={"early_config_prune": _prune_block_m})(
    _bwd_dkdv_kernel
)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=["D", "BQ", "BK", "EVEN_N"], prune_configs_by={"early_config_prune": _prune_block_m})(
    _bwd_dq_kernel
)


def _interpreter_config(bq: int) -> dict:
    """The one config the interpreter runs (it cannot autotune)."""
    return {"BLOCK_M": min(64, bq), "num_warps": 4, "num_stages": 2}


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    check_qkv(q, k, v, "block-sparse", SUPPORTED_HEAD_DIMS)
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


def _forward(q, k, v, layout: BlockLayout, scale: float, *, use_tma: bool = True, residual=None, q_index=None):
    """``(out, lse)``. K/V come through TMA descriptors where ``use_tma`` and the card and tensors allow
    them (:func:`kernels.tma.tma_ok`), from plain pointers otherwise (``use_tma=False`` forces those).
    ``out`` is token-major (:func:`kernels.layout.token_major`) whatever q's layout; with ``residual``
    (checked by the caller) it is attention + residual, in the residual's memory layout. With ``q_index``
    (int32, checked by the caller) query position i reads q's token ``q_index[i]`` and writes the output
    (and adds the residual) at that token; ``lse`` stays in position order."""
    b, h, n, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    mq, mk = cdiv(n, bq), cdiv(n, bk)
    kv_idx = layout.kv_idx.to(torch.int32).contiguous()
    kv_cnt = layout.kv_cnt.to(torch.int32).contiguous()
    kmax = kv_idx.shape[-1]
    if residual is None:
        out = token_major(b, h, n, d, q.dtype, q.device)  # what the model's output projection reads as a view
        res, res_strides = out, (0, 0, 0)  # never read (HAS_RES is off)
    else:
        out = torch.empty_like(residual, dtype=q.dtype)  # keeps the residual's strides (e.g. token-major)
        res, res_strides = residual, residual.stride()[:3]
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    use_tma = bool(use_tma) and _tma_ok(k, v)
    k_desc = _tma_desc(k, bk) if use_tma else k
    v_desc = _tma_desc(v, bk) if use_tma else v
    args = (
        q, k, v, out, lse, kv_idx, kv_cnt, k_desc, v_desc, res, kv_cnt if q_index is None else q_index,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *res_strides,
        h, n, mq, mk, kmax,
    )
    consts = dict(D=d, BQ=bq, BK=bk, EVEN_N=(n % bk == 0), KMAX_P2=triton.next_power_of_2(max(kmax, 2)),
                  USE_TMA=use_tma, PREC=_prec(q.dtype), HAS_RES=residual is not None, HAS_QIDX=q_index is not None)
    autotuned(_fwd_tuned, lambda meta: (mq * (bq // meta["BLOCK_M"]), b * h), args, consts, _interpreter_config(bq))
    return out, lse


def _backward(do, q, k, v, out, lse, layout: BlockLayout, scale: float):
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
    k_order = _row_order(qt_cnt)
    args = (
        q, k, v, do, dk, dv, lse, delta, qt_idx, qt_cnt, k_order, qk_scale, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        h, n, mk, qt_idx.stride(2),
    )
    autotuned(_dkdv_tuned, lambda meta: (mk, b * h), args, dict(D=d, BQ=bq, BK=bk, PREC=prec), _interpreter_config(bq))

    kv_idx = layout.kv_idx.to(torch.int32).contiguous()
    kv_cnt = layout.kv_cnt.to(torch.int32).contiguous()
    kmax = kv_idx.shape[-1]
    q_order = _row_order(kv_cnt)
    args = (
        q, k, v, do, dq, lse, delta, kv_idx, kv_cnt, q_order, qk_scale, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        h, n, mq, mk, kmax,
    )
    consts = dict(D=d, BQ=bq, BK=bk, EVEN_N=(n % bk == 0), KMAX_P2=triton.next_power_of_2(max(kmax, 2)), PREC=prec)
    autotuned(_dq_tuned, lambda meta: (mq * (bq // meta["BLOCK_M"]), b * h), args, consts, _interpreter_config(bq))
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_idx, kv_cnt, block_q, block_k, scale):
        layout = BlockLayout(kv_idx, kv_cnt, block_q, block_k, q.shape[2])
        out, lse = _forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse, kv_idx, kv_cnt)
        ctx.blocks = (block_q, block_k)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, kv_idx, kv_cnt = ctx.saved_tensors
        layout = BlockLayout(kv_idx, kv_cnt, ctx.blocks[0], ctx.blocks[1], q.shape[2])
        dq, dk, dv = _backward(dout, q, k, v, out, lse, layout, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    return_lse: bool = False,
    residual: torch.Tensor | None = None,
    q_index: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the layout's kept tiles (differentiable in q, k, v).

    ``q, k, v``: ``(B, H, N, D)`` fp16/bf16 on CUDA (fp32 also accepted), last dim contiguous (copied
    otherwise). Returns ``out`` ``(B, H, N, D)`` in q's dtype, token-major (a view of a ``(B, N, H, D)``
    buffer, so ``out.transpose(1, 2).flatten(2)`` is a view) and, with ``return_lse``, the natural-log
    log-sum-exp ``(B, H, N)`` float32 (``-inf`` on query blocks that keep no key block, whose output
    is 0). Raises :class:`Unsupported` for a device, dtype, head_dim or block size it cannot run.

    ``residual`` (inference only, :func:`check_residual`): a ``(B, H, N, D)`` tensor of any strides added
    to the output in the kernel's epilogue (one rounding); ``out`` then has the residual's memory layout,
    e.g. a token-major ``(B, N, H, D)`` buffer seen as ``(B, H, N, D)``.

    ``q_index`` (inference only, :func:`check_q_index`): a permutation of the N tokens; the layout's query
    position i is q's token ``q_index[i]``, and its output (plus that token's residual) is written at that
    token, while k and v are given in position order. A caller that reorders tokens (tile order) gathers
    k and v only: q's gather and the output's inverse gather happen in the kernel's loads and stores.
    ``lse`` is in position order.
    """
    _check(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    if residual is not None or q_index is not None:
        check_inference(q, k, v, residual, q_index)
        q_index = None if q_index is None else q_index.to(torch.int32).contiguous()
        out, lse = _forward(q, k, v, layout, scale, residual=residual, q_index=q_index)
        return (out, lse) if return_lse else out
    out, lse = _BlockSparseAttention.apply(
        q, k, v, layout.kv_idx, layout.kv_cnt, layout.block_q, layout.block_k, scale
    )
    return (out, lse) if return_lse else out
