"""Block selection on the GPU: pooled Q/K block scores, top-k and top-p, straight to a BlockLayout.

Same semantics as :mod:`kernels.selection` (the torch reference), up to ties and fp32 summation order:

* :func:`pool_blocks_triton` = ``pool_blocks`` (mean per block, ragged last block averaged over its
  tokens, fp32);
* :func:`block_scores_triton` = ``block_scores`` (pooled logits scaled by ``1/sqrt(D)``);
* :func:`topk_layout_triton` / :func:`topp_layout_triton` = ``topk_layout`` / ``topp_layout``, with
  ``force`` a bool mask broadcastable to ``(B, H, Mq, Mk)`` (or ``"diagonal"``, computed in-kernel);
* :func:`select_topk_triton` / :func:`select_topp_triton`: the whole pipeline from ``q, k``.

Nothing of size N x N is built. Three launches: one pools Q and K, one matmul scores the pooled blocks
(``B*H*Mq*Mk`` floats, 6 MB at Wan 480p), and one program per query block selects from its row held in
registers: top-k finds the k-th largest score by bisection on the order-preserving integer image of the
fp32 scores (32 steps, exact), keeps ties by lowest index, and writes the indices ascending with a
prefix sum, so no sort is needed. Top-p bisects on the probabilities' bit patterns for the smallest
value ``t`` with ``sum(p > t) < mass``: exactly the reference's "mass before this block < mass" rule.
Top-p counts vary per row, so its ``kv_idx`` is ``Mk`` wide (no host sync); unused slots hold 0.

One row per program is deliberate. With several query-block rows per program (a ``[ROWS, Mk]`` tile and
row-wise reductions inside the bisection loop), Triton 3.6 on the H200 computed the right threshold only
for the first row (or two) of each program once ``Mk`` reached 512, while the interpreter was exact; the
earlier fused selector (scores by ``tl.dot`` on 16 rows) kept the wrong blocks because of it.
``scripts/diag_selector.py`` reproduces that on a GPU (kernels/NOTES.md, run 4).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.errors import Unsupported
from kernels.launch import launch
from kernels.layout import BlockLayout, cdiv
from kernels.selection import diagonal_width

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
def _pool_tile(X, OUT, b, h, bh, m, stride_b, stride_h, stride_n, N, M, mult, D: tl.constexpr, BLOCK: tl.constexpr,
               SUB: tl.constexpr):
    """Mean of block ``m`` (ragged last block over its own tokens), loaded in ``SUB``-token slices."""
    base = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    acc = tl.zeros([SUB, D], dtype=tl.float32)
    for s in tl.static_range(0, BLOCK, SUB):
        offs = m * BLOCK + s + tl.arange(0, SUB)
        x = tl.load(base + offs[:, None].to(tl.int64) * stride_n + tl.arange(0, D)[None, :], mask=offs[:, None] < N,
                    other=0.0)
        acc += x.to(tl.float32)
    count = tl.minimum(N - m * BLOCK, BLOCK).to(tl.float32)
    tl.store(OUT + (bh.to(tl.int64) * M + m) * D + tl.arange(0, D), tl.sum(acc, 0) * (mult / count))


@triton.jit
def _pool_kernel(Q, K, PQ, PK, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, H, N, MQ, MK, mult_q, mult_k,
                 D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, POOL_K: tl.constexpr, SUB: tl.constexpr):
    """One launch pools Q (programs ``< MQ``) and, with POOL_K, K (the next MK programs); SUB = 0 loads
    a whole block at once, else in SUB-token slices."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if pid < MQ:
        _pool_tile(Q, PQ, b, h, bh, pid, sq_b, sq_h, sq_n, N, MQ, mult_q, D, BQ, BQ if SUB == 0 else SUB)
    elif POOL_K:
        _pool_tile(K, PK, b, h, bh, pid - MQ, sk_b, sk_h, sk_n, N, MK, mult_k, D, BK, BK if SUB == 0 else SUB)


@triton.jit
def _row_forced(rows, cols, FMASK, R, N, MQ, H, fs_b, fs_h, fs_m, fs_k, MK,
                BQ: tl.constexpr, BK: tl.constexpr, FORCE: tl.constexpr):
    """Bool [ROWS, COLS]: blocks forced in (0 none, 1 diagonal, 2 mask tensor)."""
    valid = (cols[None, :] < MK) & (rows[:, None] < R)
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
def _select_kernel(
    S, IDX, CNT, FMASK, keep, mass, R, N, MQ, MK, H, fs_b, fs_h, fs_m, fs_k, idx_width,
    BQ: tl.constexpr, BK: tl.constexpr, FORCE: tl.constexpr, TOPP: tl.constexpr, ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """Per program: ROWS query blocks (flattened over B*H*Mq; keep ROWS = 1, see the module docstring)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    cols = tl.arange(0, COLS)
    s_rows = S + rows[:, None].to(tl.int64) * MK
    valid = (cols[None, :] < MK) & rmask[:, None]
    forced = _row_forced(rows, cols, FMASK, R, N, MQ, H, fs_b, fs_h, fs_m, fs_k, MK, BQ, BK, FORCE)
    if TOPP:
        s = tl.load(s_rows + cols[None, :], mask=valid, other=float("-inf"))
        mx = tl.max(s, 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.where(valid, tl.exp(s - mx[:, None]), 0.0)
        p = e / tl.maximum(tl.sum(e, 1), 1e-30)[:, None]
        bits = p.to(tl.int32, bitcast=True)  # p >= 0: integer order = float order
        # smallest t with sum(p > t) < mass; keep p >= t (the reference's "mass before < mass")
        lo = tl.full([ROWS], -1, tl.int32)
        hi = tl.full([ROWS], 0x3F800000, tl.int32)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            above = tl.sum(tl.where(bits > mid[:, None], p, 0.0), 1)
            ok = above < mass
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        sel = ((bits >= hi[:, None]) & valid) | (forced & rmask[:, None])
        cnt = tl.sum(sel.to(tl.int32), 1)
    else:
        s = tl.load(s_rows + cols[None, :], mask=valid, other=0.0)
        bits = s.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving image of fp32
        key = tl.where(forced, 2147483647, key)
        key = tl.where(valid, key, -2147483648)
        # largest t with count(key >= t) >= keep (overflow-free upper midpoint)
        lo = tl.full([ROWS], -2147483648, tl.int32)
        hi = tl.full([ROWS], 2147483647, tl.int32)
        for _ in range(32):
            mid = (lo | hi) - ((lo ^ hi) >> 1)
            n_ge = tl.sum((key >= mid[:, None]).to(tl.int32), 1)
            ok = n_ge >= keep
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        gt = key > lo[:, None]
        n_gt = tl.sum(gt.to(tl.int32), 1)
        eq = (key == lo[:, None]) & valid
        rank = tl.cumsum(eq.to(tl.int32), 1)
        sel = gt | (eq & (rank <= (keep - n_gt)[:, None]))
        cnt = tl.full([ROWS], 0, tl.int32) + keep
    pos = tl.cumsum(sel.to(tl.int32), 1) - 1
    base = IDX + rows[:, None].to(tl.int64) * idx_width
    if TOPP:
        tl.store(base + cols[None, :], cols[None, :] * 0, mask=(cols[None, :] >= cnt[:, None]) & valid)
    tl.store(base + pos, cols[None, :] + 0 * pos, mask=sel & rmask[:, None])
    tl.store(CNT + rows, cnt, mask=rmask)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------
def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _INTERPRET:
        raise Unsupported(f"Triton block selection needs a CUDA device (or TRITON_INTERPRET=1); got {x.device}")


def _check_qk(x: torch.Tensor, block: int) -> torch.Tensor:
    _check_device(x)
    d = x.shape[-1]
    if block & (block - 1) or d & (d - 1):
        raise Unsupported(f"pooling needs power-of-two block and head_dim; got block={block}, D={d}")
    return x if x.stride(-1) == 1 else x.contiguous()


POOL_WARPS = 2  # warps per pooling program
POOL_SUB = 16  # tokens per load slice in a pooling program (0: the whole block in one load)


def _pool(q: torch.Tensor, k: torch.Tensor | None, block_q: int, block_k: int, mult_q: float = 1.0):
    """Pooled q (times ``mult_q``) and k (None when ``k`` is None) in one launch."""
    q = _check_qk(q, block_q)
    b, h, n, d = q.shape
    mq, mk = cdiv(n, block_q), cdiv(n, block_k)
    pq = torch.empty((b, h, mq, d), dtype=torch.float32, device=q.device)
    if k is None:
        k, pk, grid0 = q, pq, mq
    else:
        k = _check_qk(k, block_k)
        pk = torch.empty((b, h, mk, d), dtype=torch.float32, device=q.device)
        grid0 = mq + mk
    # Fixed configuration, measured at Wan 480p on the H200 (kernels/NOTES.md, runs 4 and 5): 2 warps
    # loading 16-token slices pool Q and K in 0.060 ms, against 0.070 ms for one 4-warp load per block
    # and 0.103 ms with 8 warps. An autotuned variant measured slower (0.124 ms for pool + scores).
    # (through kernels.launch: the selector's eager time is host-bound on the device machine, kernels/NOTES.md run 13)
    launch(_pool_kernel, (grid0, b * h),
           (q, k, pq, pk, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), h, n, mq, mk,
            float(mult_q), 1.0),
           dict(D=d, BQ=block_q, BK=block_k, POOL_K=grid0 > mq, SUB=min(POOL_SUB, block_q, block_k)),
           {"num_warps": POOL_WARPS})
    return pq, (pk if grid0 > mq else None)


def pool_blocks_triton(x: torch.Tensor, block: int, mult: float = 1.0) -> torch.Tensor:
    """Mean of each block of ``block`` tokens: ``(B, H, N, D) -> (B, H, ceil(N/block), D)`` fp32 (times ``mult``)."""
    return _pool(x, None, block, block, mult)[0]


def block_scores_triton(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Pooled attention logits ``(B, H, Mq, Mk)`` fp32, scaled by ``1/sqrt(D)`` (pool launch + one matmul)."""
    pq, pk = _pool(q, k, block_q, block_k, 1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(pq, pk.transpose(-1, -2))


def _force_args(force, ref: torch.Tensor, shape: tuple[int, int, int, int]):
    """(FORCE code, mask tensor, its 4 strides)."""
    if force is None:
        return 0, ref, (0, 0, 0, 0)
    if isinstance(force, str):
        if force != "diagonal":
            raise ValueError(f"force must be None, 'diagonal' or a bool mask; got {force!r}")
        return 1, ref, (0, 0, 0, 0)
    if force.dtype != torch.bool:
        raise ValueError("force must be a bool mask broadcastable to (B, H, Mq, Mk)")
    f = force.to(torch.int8)
    while f.dim() < 4:
        f = f.unsqueeze(0)
    f = f.expand(shape)
    return 2, f, tuple(f.stride())


_SEL_ROWS = 1  # query-block rows per selection program; > 1 miscompiles on sm_90 (module docstring)
# Warps per selection program (0: Mk/128, at most 8). One warp keeps the 32 bisection reductions
# inside the warp (no shared-memory barrier). At Wan 480p on the H200 (kernels/NOTES.md, run 5), from a
# CUDA graph: 0.113 ms with 4-warp pooling and Mk/128 selection warps, 0.103 ms with one selection warp,
# 0.094 ms with this pooling too.
SEL_WARPS = 1


def _select(scores, n, block_q, block_k, force, keep: int = 0, mass: float = 0.0, topp: bool = False):
    _check_device(scores)
    scores = scores.float().contiguous()
    b, h, mq, mk = scores.shape
    code, fmask, fs = _force_args(force, scores, (b, h, mq, mk))
    if not topp:
        if code == 1:
            keep = max(keep, diagonal_width(n, block_q, block_k))
        elif code == 2:
            keep = max(keep, int(fmask.sum(-1).max().item()))
        keep = max(1, min(keep, mk))
    width = mk if topp else keep
    idx = torch.empty((b, h, mq, width), dtype=torch.int32, device=scores.device)
    cnt = torch.empty((b, h, mq), dtype=torch.int32, device=scores.device)
    rows = b * h * mq
    cols = triton.next_power_of_2(mk)
    launch(_select_kernel, (cdiv(rows, _SEL_ROWS),), (scores, idx, cnt, fmask, keep, float(mass), rows, n, mq, mk, h, *fs, width),
           dict(BQ=block_q, BK=block_k, FORCE=code, TOPP=topp, ROWS=_SEL_ROWS, COLS=cols),
           {"num_warps": SEL_WARPS or max(1, min(8, cols // 128))})
    return BlockLayout(idx, cnt, block_q, block_k, n)


def topk_layout_triton(
    scores: torch.Tensor, keep: int, n: int, block_q: int, block_k: int, force=None
) -> BlockLayout:
    """Drop-in for :func:`kernels.selection.topk_layout` (indices ascending, ties to the lower index)."""
    return _select(scores, n, block_q, block_k, force, keep=keep)


def topp_layout_triton(
    scores: torch.Tensor, mass: float, n: int, block_q: int, block_k: int, force=None
) -> BlockLayout:
    """Drop-in for :func:`kernels.selection.topp_layout`; ``kv_idx`` is ``Mk`` wide (no host sync)."""
    if not 0.0 < mass:
        raise ValueError(f"mass must be > 0; got {mass}")
    return _select(scores, n, block_q, block_k, force, mass=mass, topp=True)


def select_topk_triton(q: torch.Tensor, k: torch.Tensor, keep: int, block_q: int = 128, block_k: int = 64,
                       keep_diagonal: bool = True) -> BlockLayout:
    """Pool, score and keep the ``keep`` best key blocks per query block (plus the diagonal): three launches."""
    scores = block_scores_triton(q, k, block_q, block_k)
    return _select(scores, q.shape[2], block_q, block_k, "diagonal" if keep_diagonal else None, keep=keep)


def select_topp_triton(q: torch.Tensor, k: torch.Tensor, mass: float, block_q: int = 128, block_k: int = 64,
                       keep_diagonal: bool = True) -> BlockLayout:
    """Pool, score and keep the fewest key blocks reaching softmax ``mass`` (plus the diagonal): three launches."""
    if not 0.0 < mass:
        raise ValueError(f"mass must be > 0; got {mass}")
    scores = block_scores_triton(q, k, block_q, block_k)
    return _select(scores, q.shape[2], block_q, block_k, "diagonal" if keep_diagonal else None, mass=mass, topp=True)
