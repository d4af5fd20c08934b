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
``scripts/diag_selector.py`` reproduces that on a GPU (docs/lab/kernels-notes.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.launch import INTERPRET, Site
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.kernels.selection import diagonal_width, pooled_logits

__all__ = [
    "pool_blocks_triton",
    "block_scores_triton",
    "topk_layout_triton",
    "topp_layout_triton",
    "select_topk_triton",
    "select_topp_triton",
]


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
    """One launch pools Q (programs ``< MQ``) and, with POOL_K, K (the next MK programs), each block in
    SUB-token slices."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if pid < MQ:
        _pool_tile(Q, PQ, b, h, bh, pid, sq_b, sq_h, sq_n, N, MQ, mult_q, D, BQ, SUB)
    elif POOL_K:
        _pool_tile(K, PK, b, h, bh, pid - MQ, sk_b, sk_h, sk_n, N, MK, mult_k, D, BK, SUB)


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
    if x.device.type != "cuda" and not INTERPRET:
        raise Unsupported(f"Triton block selection needs a CUDA device (or TRITON_INTERPRET=1); got {x.device}")


def _check_qk(x: torch.Tensor, block: int) -> torch.Tensor:
    _check_device(x)
    d = x.shape[-1]
    if block & (block - 1) or d & (d - 1):
        raise Unsupported(f"pooling needs power-of-two block and head_dim; got block={block}, D={d}")
    return x if x.stride(-1) == 1 else x.contiguous()


# Pooling: 2 warps per program, each block loaded in slices of 16 tokens (measured against whole-block
# loads, other warp counts and an autotuned variant: docs/lab/kernels-notes.md).
_POOL_WARPS = 2
_POOL_SUB = 16


class _Pool:
    """The pooling launch for one input signature: pooled q (times ``mult_q``) and k (None when built
    without k) in one launch, through a :class:`kernels.launch.Site`."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor | None, block_q: int, block_k: int, mult_q: float = 1.0):
        b, h, n, d = q.shape
        mq, mk = cdiv(n, block_q), cdiv(n, block_k)
        self.with_k = k is not None
        self.shapes = ((b, h, mq, d), (b, h, mk, d))
        self.ints = (h, n, mq, mk, float(mult_q), 1.0)
        self.site = Site(_pool_kernel, (mq + mk if self.with_k else mq, b * h),
                         dict(D=d, BQ=block_q, BK=block_k, POOL_K=self.with_k, SUB=min(_POOL_SUB, block_q, block_k),
                              num_warps=_POOL_WARPS))

    def __call__(self, q: torch.Tensor, k: torch.Tensor | None):
        pq = torch.empty(self.shapes[0], dtype=torch.float32, device=q.device)
        pk = torch.empty(self.shapes[1], dtype=torch.float32, device=q.device) if self.with_k else pq
        k = k if self.with_k else q
        self.site(q, k, pq, pk, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *self.ints)
        return pq, (pk if self.with_k else None)


def _pool(q: torch.Tensor, k: torch.Tensor | None, block_q: int, block_k: int, mult_q: float = 1.0):
    """Pooled q (times ``mult_q``) and k (None when ``k`` is None) in one launch."""
    q = _check_qk(q, block_q)
    k = None if k is None else _check_qk(k, block_k)
    return _Pool(q, k, block_q, block_k, mult_q)(q, k)


def pool_blocks_triton(x: torch.Tensor, block: int, mult: float = 1.0) -> torch.Tensor:
    """Mean of each block of ``block`` tokens: ``(B, H, N, D) -> (B, H, ceil(N/block), D)`` fp32 (times ``mult``)."""
    return _pool(x, None, block, block, mult)[0]


def block_scores_triton(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Pooled attention logits ``(B, H, Mq, Mk)`` fp32, scaled by ``1/sqrt(D)`` (pool launch + one matmul)."""
    pq, pk = _pool(q, k, block_q, block_k, 1.0 / math.sqrt(q.shape[-1]))
    return pooled_logits(pq, pk)


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
# One warp per selection program keeps the 32 bisection reductions inside the warp (no shared-memory
# barrier); measured against Mk/128 warps in docs/lab/kernels-notes.md.
_SEL_WARPS = 1


def _keep(keep: int, code: int, fmask: torch.Tensor, n: int, block_q: int, block_k: int, mk: int) -> int:
    """Key blocks kept per query block by top-k: at least the forced ones, at most ``mk``."""
    if code == 1:
        keep = max(keep, diagonal_width(n, block_q, block_k))
    elif code == 2:
        keep = max(keep, int(fmask.sum(-1).max().item()))
    return max(1, min(keep, mk))


class _Select:
    """The selection launch for one scores shape and rule (top-k ``keep`` or top-p ``mass``, ``FORCE``
    code and mask strides ``fs``), through a :class:`kernels.launch.Site`: scores to a BlockLayout."""

    def __init__(self, shape: tuple, n: int, block_q: int, block_k: int, code: int, fs: tuple, keep: int = 0,
                 mass: float = 0.0, topp: bool = False):
        b, h, mq, mk = shape
        width = mk if topp else keep
        rows, cols = b * h * mq, triton.next_power_of_2(mk)
        self.shapes = ((b, h, mq, width), (b, h, mq))
        self.ints = (keep, float(mass), rows, n, mq, mk, h, *fs, width)
        self.blocks = (block_q, block_k, n)
        self.site = Site(_select_kernel, (cdiv(rows, _SEL_ROWS),),
                         dict(BQ=block_q, BK=block_k, FORCE=code, TOPP=topp, ROWS=_SEL_ROWS, COLS=cols,
                              num_warps=_SEL_WARPS))

    def __call__(self, scores: torch.Tensor, fmask: torch.Tensor) -> BlockLayout:
        idx = torch.empty(self.shapes[0], dtype=torch.int32, device=scores.device)
        cnt = torch.empty(self.shapes[1], dtype=torch.int32, device=scores.device)
        self.site(scores, idx, cnt, fmask, *self.ints)
        return BlockLayout(idx, cnt, *self.blocks)


def _select(scores, n, block_q, block_k, force, keep: int = 0, mass: float = 0.0, topp: bool = False):
    _check_device(scores)
    scores = scores.float().contiguous()
    b, h, mq, mk = scores.shape
    code, fmask, fs = _force_args(force, scores, (b, h, mq, mk))
    if not topp:
        keep = _keep(keep, code, fmask, n, block_q, block_k, mk)
    return _Select((b, h, mq, mk), n, block_q, block_k, code, fs, keep, mass, topp)(scores, fmask)


# select_topk/topp_triton per input signature (the selector's eager time was host-bound on the device
# machine, docs/lab/kernels-notes.md): both launches' Sites, the shapes and the rule built once. The key
# holds everything the launches depend on. False: no plan.
_PLANS: dict = {}


def _plan(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, keep_diagonal: bool, keep: int = 0,
          mass: float = 0.0, topp: bool = False):
    """A callable ``(q, k) -> BlockLayout`` for this signature, or None (the general path then runs)."""
    if q.device.type != "cuda" or INTERPRET:
        return None
    key = (q.shape, k.shape, q.stride(), k.stride(), q.dtype, k.dtype, q.device, k.device, (q.data_ptr() | k.data_ptr()) & 15,
           block_q, block_k, keep_diagonal, keep, mass, topp, torch.cuda.current_device())
    plan = _PLANS.get(key)
    if plan is None:
        if _check_qk(q, block_q) is not q or _check_qk(k, block_k) is not k:  # raises on bad input
            plan = False  # a copy first: the general path
        else:
            b, h, n, d = q.shape
            mq, mk = cdiv(n, block_q), cdiv(n, block_k)
            code = 1 if keep_diagonal else 0
            if not topp:
                keep = _keep(keep, code, q, n, block_q, block_k, mk)
            pool = _Pool(q, k, block_q, block_k, 1.0 / math.sqrt(d))
            sel = _Select((b, h, mq, mk), n, block_q, block_k, code, (0, 0, 0, 0), keep, mass, topp)

            def plan(q, k):
                pq, pk = pool(q, k)
                scores = pooled_logits(pq, pk)
                return sel(scores, scores)

        if len(_PLANS) >= 32:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan or None


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
    """Pool, score and keep the ``keep`` best key blocks per query block (plus the diagonal): three launches.
    Under ``torch.compile``: the operator ``salad_bench::select_topk``."""
    if torch.compiler.is_compiling():
        idx, cnt = torch.ops.salad_bench.select_topk(q, k, keep, block_q, block_k, keep_diagonal)
        return BlockLayout(idx, cnt, block_q, block_k, q.shape[2])
    return _select_topk_impl(q, k, keep, block_q, block_k, keep_diagonal)


def kept_width(keep: int, keep_diagonal: bool, n: int, block_q: int, block_k: int, mk: int) -> int:
    """Width of the index list :func:`select_topk_triton` returns (what its fake implementation needs)."""
    return _keep(keep, 1 if keep_diagonal else 0, None, n, block_q, block_k, mk)


def _select_topk_impl(q: torch.Tensor, k: torch.Tensor, keep: int, block_q: int, block_k: int,
                      keep_diagonal: bool) -> BlockLayout:
    if (plan := _plan(q, k, block_q, block_k, keep_diagonal, keep=keep)) is not None:
        return plan(q, k)
    scores = block_scores_triton(q, k, block_q, block_k)
    return _select(scores, q.shape[2], block_q, block_k, "diagonal" if keep_diagonal else None, keep=keep)


def select_topp_triton(q: torch.Tensor, k: torch.Tensor, mass: float, block_q: int = 128, block_k: int = 64,
                       keep_diagonal: bool = True) -> BlockLayout:
    """Pool, score and keep the fewest key blocks reaching softmax ``mass`` (plus the diagonal): three launches."""
    if not 0.0 < mass:
        raise ValueError(f"mass must be > 0; got {mass}")
    if (plan := _plan(q, k, block_q, block_k, keep_diagonal, mass=mass, topp=True)) is not None:
        return plan(q, k)
    scores = block_scores_triton(q, k, block_q, block_k)
    return _select(scores, q.shape[2], block_q, block_k, "diagonal" if keep_diagonal else None, mass=mass, topp=True)
