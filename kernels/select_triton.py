"""Block selection on the GPU: pooled Q/K block scores, top-k and top-p, straight to a BlockLayout.

Same semantics as :mod:`kernels.selection` (the torch reference), up to ties and fp32 summation order:

* :func:`pool_blocks_triton` = ``pool_blocks`` (mean per block, ragged last block averaged over its
  tokens, fp32);
* :func:`block_scores_triton` = ``block_scores`` (pooled logits scaled by ``1/sqrt(D)``);
* :func:`topk_layout_triton` / :func:`topp_layout_triton` = ``topk_layout`` / ``topp_layout``, with
  ``force`` a bool mask broadcastable to ``(B, H, Mq, Mk)`` (or ``"diagonal"``, computed in-kernel);
* :func:`select_topk_triton` / :func:`select_topp_triton`: the whole pipeline from ``q, k``.

Nothing of size N x N is built. One program selects for a few query-block rows held in registers:
top-k finds the k-th largest score by bisection on the order-preserving integer image of the fp32
scores (33 steps, exact), keeps ties by lowest index, and writes the indices ascending with a prefix
sum, so no sort is needed. Top-p bisects on the probabilities' bit patterns for the smallest value
``t`` with ``sum(p > t) < mass``: exactly the reference's "mass before this block < mass" rule.
Top-p counts vary per row, so its ``kv_idx`` is ``Mk`` wide (no host sync); unused slots hold 0.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kernels.errors import Unsupported
from kernels.layout import BlockLayout, cdiv

__all__ = [
    "pool_blocks_triton",
    "block_scores_triton",
    "topk_layout_triton",
    "topp_layout_triton",
    "select_topk_triton",
    "select_topp_triton",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pool_kernel(X, OUT, stride_b, stride_h, stride_n, H, N, M, mult,
                 D: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = m * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + offs[:, None] * stride_n
                + tl.arange(0, D)[None, :], mask=offs[:, None] < N, other=0.0)
    count = tl.minimum(N - m * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x.to(tl.float32), 0) * (mult / count)
    tl.store(OUT + (bh.to(tl.int64) * M + m) * D + tl.arange(0, D), mean)


@triton.jit
def _row_forced(rows, cols, FMASK, N, MQ, H, fs_b, fs_h, fs_m, fs_k, MK,
                BQ: tl.constexpr, BK: tl.constexpr, FORCE: tl.constexpr):
    """Bool [ROWS, COLS]: blocks forced in (0 none, 1 diagonal, 2 mask tensor)."""
    valid = cols[None, :] < MK
    if FORCE == 1:
        m = rows % MQ
        qs = m * BQ
        qe = tl.minimum(qs + BQ, N) - 1
        ks = cols * BK
        ke = tl.minimum(ks + BK, N) - 1
        return (ks[None, :] <= qe[:, None]) & (ke[None, :] >= qs[:, None]) & valid
    elif FORCE == 2:
        bh = rows // MQ
        m = rows % MQ
        off = (bh // H).to(tl.int64) * fs_b + (bh % H).to(tl.int64) * fs_h + m.to(tl.int64) * fs_m
        f = tl.load(FMASK + off[:, None] + cols[None, :].to(tl.int64) * fs_k, mask=valid, other=0)
        return (f != 0) & valid
    else:
        return cols[None, :] < 0


@triton.jit
def _topk_kernel(S, IDX, CNT, FMASK, R, keep, N, MQ, H, fs_b, fs_h, fs_m, fs_k, MK,
                 BQ: tl.constexpr, BK: tl.constexpr, FORCE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    rmask = rows < R
    valid = (cols[None, :] < MK) & rmask[:, None]
    s = tl.load(S + rows[:, None].to(tl.int64) * MK + cols[None, :], mask=valid, other=0.0)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # order-preserving image of fp32
    forced = _row_forced(rows, cols, FMASK, N, MQ, H, fs_b, fs_h, fs_m, fs_k, MK, BQ, BK, FORCE)
    key = tl.where(forced, 2147483648, key)
    key = tl.where(valid, key, -2147483649)
    # largest t with count(key >= t) >= keep
    lo = tl.full([ROWS], -2147483649, tl.int64)
    hi = tl.full([ROWS], 2147483648, tl.int64)
    for _ in range(33):
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum((key >= mid[:, None]).to(tl.int32), 1)
        ok = c >= keep
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    gt = key > lo[:, None]
    n_gt = tl.sum(gt.to(tl.int32), 1)
    eq = (key == lo[:, None]) & valid
    rank = tl.cumsum(eq.to(tl.int32), 1)
    sel = gt | (eq & (rank <= (keep - n_gt)[:, None]))
    pos = tl.cumsum(sel.to(tl.int32), 1) - 1
    tl.store(IDX + rows[:, None].to(tl.int64) * keep + pos, cols[None, :] + 0 * pos, mask=sel & rmask[:, None])
    tl.store(CNT + rows, tl.full([ROWS], 0, tl.int32) + keep, mask=rmask)


@triton.jit
def _topp_kernel(S, IDX, CNT, FMASK, R, mass, N, MQ, H, fs_b, fs_h, fs_m, fs_k, MK,
                 BQ: tl.constexpr, BK: tl.constexpr, FORCE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    rmask = rows < R
    valid = (cols[None, :] < MK) & rmask[:, None]
    s = tl.load(S + rows[:, None].to(tl.int64) * MK + cols[None, :], mask=valid, other=float("-inf"))
    mx = tl.max(s, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.where(valid, tl.exp(s - mx[:, None]), 0.0)
    p = e / tl.maximum(tl.sum(e, 1), 1e-30)[:, None]
    bits = p.to(tl.int32, bitcast=True)  # p >= 0: integer order = float order
    # smallest t with sum(p > t) < mass; keep p >= t
    lo = tl.full([ROWS], -1, tl.int32)
    hi = tl.full([ROWS], 0x3F800000, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        above = tl.sum(tl.where(bits > mid[:, None], p, 0.0), 1)
        ok = above < mass
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid)
    sel = (bits >= hi[:, None]) & valid
    forced = _row_forced(rows, cols, FMASK, N, MQ, H, fs_b, fs_h, fs_m, fs_k, MK, BQ, BK, FORCE)
    sel = sel | (forced & rmask[:, None])
    cnt = tl.sum(sel.to(tl.int32), 1)
    pos = tl.cumsum(sel.to(tl.int32), 1) - 1
    base = IDX + rows[:, None].to(tl.int64) * MK
    tl.store(base + cols[None, :], cols[None, :] * 0, mask=(cols[None, :] >= cnt[:, None]) & valid)
    tl.store(base + pos, cols[None, :] + 0 * pos, mask=sel)
    tl.store(CNT + rows, cnt, mask=rmask)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------
def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _INTERPRET:
        raise Unsupported(f"Triton block selection needs a CUDA device (or TRITON_INTERPRET=1); got {x.device}")


def pool_blocks_triton(x: torch.Tensor, block: int, mult: float = 1.0) -> torch.Tensor:
    """Mean of each block of ``block`` tokens: ``(B, H, N, D) -> (B, H, ceil(N/block), D)`` fp32 (times ``mult``)."""
    _check_device(x)
    b, h, n, d = x.shape
    if block & (block - 1) or d & (d - 1):
        raise Unsupported(f"pooling needs power-of-two block and head_dim; got block={block}, D={d}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = cdiv(n, block)
    out = torch.empty((b, h, m, d), dtype=torch.float32, device=x.device)
    _pool_kernel[(m, b * h)](x, out, x.stride(0), x.stride(1), x.stride(2), h, n, m, float(mult),
                             D=d, BLOCK=block, num_warps=4)
    return out


def block_scores_triton(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Pooled attention logits ``(B, H, Mq, Mk)`` fp32, scaled by ``1/sqrt(D)`` (one cuBLAS matmul)."""
    pq = pool_blocks_triton(q, block_q, 1.0 / math.sqrt(q.shape[-1]))
    pk = pool_blocks_triton(k, block_k)
    return torch.matmul(pq, pk.transpose(-1, -2))


@functools.lru_cache(maxsize=64)
def _diag_max(n: int, block_q: int, block_k: int) -> int:
    """Most diagonal (self-overlapping) key blocks any query block has."""
    best = 0
    for m in range(cdiv(n, block_q)):
        qs, qe = m * block_q, min(n, (m + 1) * block_q) - 1
        best = max(best, qe // block_k - qs // block_k + 1)
    return best


def _force_args(force, scores: torch.Tensor):
    """(FORCE code, mask tensor, its 4 strides, most forced per row or None when it needs a sync)."""
    if force is None:
        return 0, scores, (0, 0, 0, 0)
    if isinstance(force, str):
        if force != "diagonal":
            raise ValueError(f"force must be None, 'diagonal' or a bool mask; got {force!r}")
        return 1, scores, (0, 0, 0, 0)
    if force.dtype != torch.bool:
        raise ValueError("force must be a bool mask broadcastable to (B, H, Mq, Mk)")
    f = force.to(torch.int8)
    while f.dim() < 4:
        f = f.unsqueeze(0)
    f = f.expand(scores.shape)
    return 2, f, tuple(f.stride())


_SEL_ROWS = 4


def _select_grid(r: int) -> tuple[int]:
    return (cdiv(r, _SEL_ROWS),)


def topk_layout_triton(
    scores: torch.Tensor, keep: int, n: int, block_q: int, block_k: int, force=None
) -> BlockLayout:
    """Drop-in for :func:`kernels.selection.topk_layout` (indices ascending, ties to the lower index)."""
    _check_device(scores)
    b, h, mq, mk = scores.shape
    code, fmask, fs = _force_args(force, scores)
    if code == 1:
        keep = max(keep, _diag_max(n, block_q, block_k))
    elif code == 2:
        keep = max(keep, int(fmask.sum(-1).max().item()))
    keep = max(1, min(keep, mk))
    scores = scores.float().contiguous()
    idx = torch.empty((b, h, mq, keep), dtype=torch.int32, device=scores.device)
    cnt = torch.empty((b, h, mq), dtype=torch.int32, device=scores.device)
    r = b * h * mq
    _topk_kernel[_select_grid(r)](scores, idx, cnt, fmask, r, keep, n, mq, h, *fs, mk,
                                  BQ=block_q, BK=block_k, FORCE=code, ROWS=_SEL_ROWS,
                                  COLS=triton.next_power_of_2(mk), num_warps=4)
    return BlockLayout(idx, cnt, block_q, block_k, n)


def topp_layout_triton(
    scores: torch.Tensor, mass: float, n: int, block_q: int, block_k: int, force=None
) -> BlockLayout:
    """Drop-in for :func:`kernels.selection.topp_layout`; ``kv_idx`` is ``Mk`` wide (no host sync)."""
    _check_device(scores)
    if not 0.0 < mass:
        raise ValueError(f"mass must be > 0; got {mass}")
    b, h, mq, mk = scores.shape
    code, fmask, fs = _force_args(force, scores)
    scores = scores.float().contiguous()
    idx = torch.empty((b, h, mq, mk), dtype=torch.int32, device=scores.device)
    cnt = torch.empty((b, h, mq), dtype=torch.int32, device=scores.device)
    r = b * h * mq
    _topp_kernel[_select_grid(r)](scores, idx, cnt, fmask, r, float(mass), n, mq, h, *fs, mk,
                                  BQ=block_q, BK=block_k, FORCE=code, ROWS=_SEL_ROWS,
                                  COLS=triton.next_power_of_2(mk), num_warps=4)
    return BlockLayout(idx, cnt, block_q, block_k, n)


def select_topk_triton(q: torch.Tensor, k: torch.Tensor, keep: int, block_q: int = 128, block_k: int = 64,
                       keep_diagonal: bool = True) -> BlockLayout:
    """Pool, score and keep the ``keep`` best key blocks per query block (plus the diagonal)."""
    scores = block_scores_triton(q, k, block_q, block_k)
    return topk_layout_triton(scores, keep, q.shape[2], block_q, block_k, "diagonal" if keep_diagonal else None)


def select_topp_triton(q: torch.Tensor, k: torch.Tensor, mass: float, block_q: int = 128, block_k: int = 64,
                       keep_diagonal: bool = True) -> BlockLayout:
    """Pool, score and keep the fewest key blocks reaching softmax ``mass`` (plus the diagonal)."""
    scores = block_scores_triton(q, k, block_q, block_k)
    return topp_layout_triton(scores, mass, q.shape[2], block_q, block_k, "diagonal" if keep_diagonal else None)
