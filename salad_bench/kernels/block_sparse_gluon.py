"""Block-sparse attention forward for Hopper, written in Gluon (Triton's explicit-layout dialect).

The Triton forward (:mod:`kernels.block_sparse`) leaves the order of work inside a program to Triton 3.6,
which waits for each block's scores before the softmax and for the softmax before the next GEMM: a
program's tensor-core and softmax work never overlap, only the two programs on an SM overlap each other
(docs/lab/kernels-notes.md, runs 6 and 8). This kernel writes the order out, as flash-attention 3 does within a
warpgroup: while the softmax of key block j runs, the tensor cores compute ``P_{j-1} V_{j-1}``:

    S_j = Q K_j^T          (issued async)
    O  += P_{j-1} V_{j-1}  (issued async)
    wait S_j; softmax(S_j) -> P_j, alpha      (overlaps the PV GEMM)
    wait O; O *= alpha

K and V come through TMA into two shared-memory slots each, refilled at the end of each step (K two
blocks ahead, V one); P goes to the PV GEMM through a double-buffered shared-memory tile, stored before
the wait for that GEMM (otherwise ptxas moves the exponentials below the wait). A program runs 128 query
rows as two warpgroups of 64 (8 warps, one program per SM) or 64 rows as one warpgroup (4 warps, two per
SM); one 128-row warpgroup spills at 255 registers. Only the forward: the backward needs ``(out, lse)``
and is the Triton one.

Measured on the H200 it is slower than the Triton forward: 1.587 (128 rows) and 1.608 ms (64 rows)
against 1.331 ms at density 0.10 in the same rounds (docs/lab/kernels-notes.md, run 9). The overlap is in the
SASS. A second kernel (``rows="ws"``, below) adds flash-attention 3's split into a producer warp and two
consumer warpgroups: 1.46 ms against 1.33 ms (run 10), also with the consumers' ping-pong (1.58 ms) or two
key blocks per step (1.67 ms). Kept as ``OPTIONS["fwd_gluon"]``, off.

Same contract as the Triton forward (the layout's lists in any order, the ragged last key block masked,
empty lists give zeros and a log-sum-exp of ``-inf``), for sm_90 only (wgmma), bf16/fp16, D 64/128,
block_q 128, block_k 64. Gluon does not run in the CPU interpreter: the CPU tests compile it for sm_90
(tests/kernels/test_gpu_compile.py) and the ``gpu`` tests run it against the reference.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout, cdiv

__all__ = ["block_sparse_forward_gluon", "gluon_supported"]

# Names that changed after Triton 3.6 (the device image): the TMA load (async_load from 3.9) and the
# block-wide barrier (barrier from 3.9)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK_M = 128  # the layout's query block
BLOCK_K = 64
# rows per program -> warps: 128 rows as two warpgroups of 64 (one program per SM), or 64 rows as one
# warpgroup (two programs per SM; one 128-row warpgroup spills at 255 registers)
WARPS_FOR_ROWS = {128: 8, 64: 4}
LOG2E = 1.4426950408889634
# the warp-specialised kernel: K/V ring depth (4 x 32 KB + Q 32 KB + P 32 KB of shared memory) and registers
# per consumer thread (setmaxnreg; the producer warp's warpgroup gets 24, so at most 240)
WS_SLOTS = 4
WS_CONSUMER_REGS = 232


@gluon.jit
def _list_head(KV_IDX, KV_CNT, row, KMAX, MK, KMAX_P2: gl.constexpr, EVEN_N: gl.constexpr, num_warps: gl.constexpr):
    """Query-block row ``row``'s list: (count, base pointer, last entry, whether it holds the ragged block
    ``MK - 1``; 0 for an even N), for :func:`_entry`."""
    cnt = gl.load(KV_CNT + row)
    idx_base = KV_IDX + row.to(gl.int64) * KMAX
    last = gl.load(idx_base + gl.maximum(cnt - 1, 0))
    kl: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    offs = gl.arange(0, KMAX_P2, layout=kl)
    has = gl.sum(((gl.load(idx_base + offs, mask=offs < cnt, other=0) == MK - 1) & (offs < cnt)).to(gl.int32), 0)
    if EVEN_N:
        has = has * 0
    return cnt, idx_base, last, has


@gluon.jit
def _entry(idx_base, j, cnt, has, last, MK, EVEN_N: gl.constexpr):
    """Key block ``j`` of the list in processing order: the ragged last block (``MK - 1``), if listed
    (``has``), swaps places with the list's last entry ``last``, so only the last step masks. Positions
    past the list read a valid entry (their loads are predicated off)."""
    jj = gl.maximum(gl.minimum(j, cnt - 1), 0)
    kb = gl.load(idx_base + jj)
    if not EVEN_N:
        kb = gl.where(kb == MK - 1, last, kb)
        kb = gl.where((jj == cnt - 1) & (has > 0), MK - 1, kb)
    return kb


@gluon.jit
def _issue(desc, row, bar, dst, pred):
    """TMA copy of one ``rows x D`` tile into ``dst``, completing on ``bar`` (nothing when not ``pred``)."""
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    _tma_load(desc, [row, 0], bar, dst, pred=pred)


@gluon.jit
def _softmax(s, m_i, l_i, kb, N, qk_scale, BK: gl.constexpr, MASK: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax update with block scores ``s``: (p, alpha, l, m), base 2; ``MASK`` hides the columns
    past N of the ragged last block."""
    if MASK:
        cols = gl.arange(0, BK, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(cols[None, :] < N - kb * BK, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, l_i, m_new


@gluon.jit
def _first_scores(q_rows, k_smem, q_bar, k_bar, s_layout: gl.constexpr):
    """The scores of the first step: once Q and ring slot 0 have landed, ``Q K^T`` on the tensor cores."""
    BM: gl.constexpr = q_rows.type.shape[0]
    W: gl.constexpr = k_smem.type.shape[1]
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s0 = warpgroup_mma(q_rows, k_smem.index(0).permute((1, 0)), gl.zeros([BM, W], gl.float32, s_layout),
                       use_acc=False, is_async=True)
    return warpgroup_mma_wait(0, deps=(s0, ))


@gluon.jit
def _step(j, acc, m_i, l_i, q_smem, k_smem, v_smem, p_smem, k_bar, v_bar, k_desc, v_desc, idx_base, cnt, has, last,
          base_row, MK, N, qk_scale, BM: gl.constexpr, BK: gl.constexpr, EVEN_N: gl.constexpr, MASK: gl.constexpr,
          s_layout: gl.constexpr):
    """Key block j: its scores and the previous block's PV on the tensor cores, its softmax meanwhile."""
    ks = j % 2
    mbarrier.wait(k_bar.index(ks), (j // 2) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(ks).permute((1, 0)), gl.zeros([BM, BK], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    vs = (j - 1) % 2
    mbarrier.wait(v_bar.index(vs), ((j - 1) // 2) & 1)
    acc = warpgroup_mma(p_smem.index(vs), v_smem.index(vs), acc, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s, ))
    kb = _entry(idx_base, j, cnt, has, last, MK, EVEN_N)
    p, alpha, l_i, m_i = _softmax(s, m_i, l_i, kb, N, qk_scale, BK, MASK, s_layout)
    # P_j into its own buffer (the PV GEMM in flight reads the other one) before the wait: its consumer
    # ahead of the wait keeps ptxas from moving the exponentials below the wait (run 9)
    _store_p(p, p_smem, ks)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    _refill(ks, j, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, cnt, has, last, base_row, MK,
            BK, EVEN_N)
    return acc, m_i, l_i


@gluon.jit
def _store_p(p, p_smem, buf):
    """P of a block into shared-memory buffer ``buf``, where the PV GEMM reads its A operand."""
    p_smem.index(buf).store(p.to(p_smem.dtype))
    fence_async_shared()


@gluon.jit
def _refill(ks, j, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, cnt, has, last, base_row, MK,
            BK: gl.constexpr, EVEN_N: gl.constexpr):
    """After block j's GEMMs have finished: K slot ``ks = j % 2`` takes block j + 2, V slot ``1 - ks`` block
    j + 1. Only now, because ptxas waits for every wgmma in flight before it issues a TMA copy (and hoisted
    copies placed earlier above the softmax)."""
    _cta_barrier()  # every warp has stored its P rows and is past the GEMMs that read both slots
    kb_next2 = _entry(idx_base, j + 2, cnt, has, last, MK, EVEN_N)
    _issue(k_desc, base_row + kb_next2 * BK, k_bar.index(ks), k_smem.index(ks), j + 2 < cnt)
    kb_next = _entry(idx_base, j + 1, cnt, has, last, MK, EVEN_N)
    _issue(v_desc, base_row + kb_next * BK, v_bar.index(1 - ks), v_smem.index(1 - ks), (j + 1 < cnt) & (j > 0))


@gluon.jit
def _fwd_gluon_kernel(q_desc, k_desc, v_desc, Out, LSE, KV_IDX, KV_CNT, qk_scale,
                      stride_ob, stride_oh, stride_on, H, N, MQ, MK, KMAX,
                      D: gl.constexpr, BQ: gl.constexpr, BK: gl.constexpr, EVEN_N: gl.constexpr, KMAX_P2: gl.constexpr,
                      p_layout: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]  # query rows of this program: BQ, or BQ / 2
    SUB: gl.constexpr = BQ // BM
    qblk = gl.program_id(0) // SUB
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    cnt, idx_base, last, has = _list_head(KV_IDX, KV_CNT, bh * MQ + qblk, KMAX, MK, KMAX_P2, EVEN_N, num_warps)
    base_row = bh * N  # q, k, v are read as (B*H*N, D) matrices; rows past N are never stored
    start_m = qblk * BQ + (gl.program_id(0) % SUB) * BM

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, BK, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2, BK, D], v_desc.layout)
    p_smem = gl.allocate_shared_memory(v_desc.dtype, [2, BM, BK], p_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(2):
        mbarrier.init(k_bar.index(s), count=1)
        mbarrier.init(v_bar.index(s), count=1)

    _issue(q_desc, base_row + start_m, q_bar, q_smem, cnt > 0)
    for s in gl.static_range(2):
        kb = _entry(idx_base, s, cnt, has, last, MK, EVEN_N)
        _issue(k_desc, base_row + kb * BK, k_bar.index(s), k_smem.index(s), s < cnt)
        _issue(v_desc, base_row + kb * BK, v_bar.index(s), v_smem.index(s), s < cnt)

    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
    if cnt > 0:
        s0 = _first_scores(q_smem, k_smem, q_bar, k_bar, s_layout)
        kb0 = _entry(idx_base, 0, cnt, has, last, MK, EVEN_N)
        p, alpha, l_i, m_i = _softmax(s0, m_i, l_i, kb0, N, qk_scale, BK, not EVEN_N, s_layout)
        _store_p(p, p_smem, 0)
        _refill(0, 0, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, cnt, has, last, base_row, MK, BK,
                EVEN_N)
        for j in range(1, cnt - 1):
            acc, m_i, l_i = _step(j, acc, m_i, l_i, q_smem, k_smem, v_smem, p_smem, k_bar, v_bar, k_desc, v_desc,
                                  idx_base, cnt, has, last, base_row, MK, N, qk_scale, BM, BK, EVEN_N, False, s_layout)
        if cnt > 1:  # the last block: the only one that can be the ragged one
            acc, m_i, l_i = _step(cnt - 1, acc, m_i, l_i, q_smem, k_smem, v_smem, p_smem, k_bar, v_bar, k_desc,
                                  v_desc, idx_base, cnt, has, last, base_row, MK, N, qk_scale, BM, BK, EVEN_N,
                                  not EVEN_N, s_layout)
        vs = (cnt - 1) % 2
        mbarrier.wait(v_bar.index(vs), ((cnt - 1) // 2) & 1)
        acc = warpgroup_mma(p_smem.index(vs), v_smem.index(vs), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.invalidate(q_bar)
    for s in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(s))
        mbarrier.invalidate(v_bar.index(s))

    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, o_row)[:, None]
    offs_m = start_m + gl.arange(0, BM, layout=o_row)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_ptr = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    gl.store(o_ptr + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < N)
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    offs_l = start_m + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + bh.to(gl.int64) * N + offs_l, lse, mask=offs_l < N)


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def gluon_supported(q: torch.Tensor, layout: BlockLayout) -> str | None:
    """Why the Gluon forward cannot run these inputs (None when it can)."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"the Gluon forward uses Hopper's wgmma: it needs an sm_90 GPU, not {q.device}"
    if q.dtype not in _GL_DTYPES:
        return f"the Gluon forward supports bfloat16 and float16, not {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"the Gluon forward supports head_dim 64 and 128, not {q.shape[-1]}"
    if (layout.block_q, layout.block_k) != (BLOCK_M, BLOCK_K):
        return f"the Gluon forward is built for {BLOCK_M} x {BLOCK_K} tiles, not {layout.block_q} x {layout.block_k}"
    return None


def block_sparse_forward_gluon(q, k, v, layout: BlockLayout, scale: float, rows: int | str = 128,
                               ws_slots: int = WS_SLOTS, ws_regs: int = WS_CONSUMER_REGS, ws_pingpong: bool = False,
                               ws_group: int = 1):
    """``(out, lse)`` of block-sparse attention, as :func:`kernels.block_sparse._forward`; ``rows``: query
    rows per program (128 or 64), or ``"ws"`` for the warp-specialised kernel (a producer warp and two
    consumer warpgroups of 64 rows; ``ws_slots`` K/V blocks in its ring, ``ws_regs`` registers per consumer
    thread; ``ws_pingpong``: the two warpgroups take turns issuing their GEMMs; ``ws_group``: key blocks per
    step, 1 or 2, each ring slot holding that many). Raises :class:`Unsupported` where
    :func:`gluon_supported` says why."""
    if (why := gluon_supported(q, layout)) is not None:
        raise Unsupported(why + "; turn fwd_gluon off to use the Triton forward")
    if rows == "ws" and ws_group not in (1, 2):
        raise ValueError(f"the warp-specialised Gluon forward takes 1 or 2 key blocks per step, not {ws_group}")
    if rows not in WARPS_FOR_ROWS and rows != "ws":
        raise ValueError(f"the Gluon forward runs {sorted(WARPS_FOR_ROWS)} query rows per program or 'ws', not {rows!r}")
    b, h, n, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mq, mk = cdiv(n, BLOCK_M), cdiv(n, BLOCK_K)
    kv_idx = layout.kv_idx.to(torch.int32).contiguous()
    kv_cnt = layout.kv_cnt.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    gdt = _GL_DTYPES[q.dtype]

    def desc(x, box_rows):
        lay = gl.NVMMASharedLayout.get_default_for([box_rows, d], gdt)
        return TensorDescriptor(x.view(b * h * n, d), [b * h * n, d], [d, 1], [box_rows, d], lay)

    common = (out, lse, kv_idx, kv_cnt, scale * LOG2E, out.stride(0), out.stride(1), out.stride(2), h, n, mq, mk,
              kv_idx.shape[-1])
    consts = dict(D=d, BQ=BLOCK_M, BK=BLOCK_K, EVEN_N=(n % BLOCK_K == 0),
                  KMAX_P2=triton.next_power_of_2(max(kv_idx.shape[-1], 2)))
    if rows == "ws":
        _fwd_gluon_ws_kernel[(mq, b * h)](
            desc(q, BLOCK_M), desc(k, BLOCK_K), desc(v, BLOCK_K), *common, **consts,
            p_layout=gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, ws_group * BLOCK_K], gdt), SLOTS=ws_slots,
            CONSUMER_REGS=ws_regs, PINGPONG=bool(ws_pingpong), G=ws_group, num_warps=4,
        )
        return out, lse
    _fwd_gluon_kernel[(mq * (BLOCK_M // rows), b * h)](
        desc(q, rows), desc(k, BLOCK_K), desc(v, BLOCK_K), *common, **consts,
        p_layout=gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], gdt), num_warps=WARPS_FOR_ROWS[rows],
    )
    return out, lse


# ----------------------------------------------------------------------------------------------------
# warp-specialised: a producer warp and two consumer warpgroups
# ----------------------------------------------------------------------------------------------------


@gluon.jit
def _ws_entry(idx_base, j, cnt, has, last, MK):
    """:func:`_entry` for the warp-specialised kernel, whose partitions take no constexpr arguments (Triton
    3.6 passes them as plain Python values): ``has`` is 0 for an even N, so block ``MK - 1`` stays put."""
    jj = gl.maximum(gl.minimum(j, cnt - 1), 0)
    kb = gl.load(idx_base + jj)
    kb = gl.where((kb == MK - 1) & (has > 0), last, kb)
    return gl.where((jj == cnt - 1) & (has > 0), MK - 1, kb)


@gluon.jit
def _ws_producer(ctx):
    """One warp: Q once, then the key blocks of step t (``G`` list entries: ring slots hold ``G`` blocks)
    into slot ``t % SLOTS`` once the consumers have released it. Past the list's end a slot half gets the
    last entry again (valid data; its scores are masked)."""
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty, Out, LSE, idx_base, cnt, has, last,
     base_row, start_m, MK, N, qk_scale, stride_ob, stride_oh, stride_on, b, h, bh, p_smem0, p_smem1, turn) = ctx
    SLOTS: gl.constexpr = k_smem.type.shape[0]
    BK: gl.constexpr = k_desc.block_type.shape[0]
    G: gl.constexpr = k_smem.type.shape[1] // BK
    mbarrier.expect(q_bar, q_desc.block_type.nbytes, pred=cnt > 0)
    _tma_load(q_desc, [base_row + start_m, 0], q_bar, q_smem, pred=cnt > 0)
    for t in range(gl.cdiv(cnt, G)):
        slot = t % SLOTS
        mbarrier.wait(empty.index(slot), ((t // SLOTS) & 1) ^ 1)
        mbarrier.expect(k_bar.index(slot), G * k_desc.block_type.nbytes)
        mbarrier.expect(v_bar.index(slot), G * v_desc.block_type.nbytes)
        for g in gl.static_range(G):
            kb = _ws_entry(idx_base, G * t + g, cnt, has, last, MK)
            _tma_load(k_desc, [base_row + kb * BK, 0], k_bar.index(slot), k_smem.index(slot).slice(g * BK, BK))
            _tma_load(v_desc, [base_row + kb * BK, 0], v_bar.index(slot), v_smem.index(slot).slice(g * BK, BK))


@gluon.jit
def _ws_softmax_store(s, m_i, l_i, p_smem, buf, t, idx_base, cnt, has, last, MK, N, qk_scale, BK: gl.constexpr,
                      MASK: gl.constexpr, s_layout: gl.constexpr):
    """Online softmax of step t's scores (``G = width / BK`` key blocks side by side); ``MASK`` hides the
    columns past N and those of entries past the list's end. P goes to ``p_smem`` buffer ``buf`` for the
    PV GEMM."""
    W: gl.constexpr = s.type.shape[1]
    if MASK:
        cols = gl.arange(0, W, layout=gl.SliceLayout(0, s_layout))
        g = cols // BK
        kb0 = _ws_entry(idx_base, (W // BK) * t, cnt, has, last, MK)
        kb1 = _ws_entry(idx_base, (W // BK) * t + 1, cnt, has, last, MK)
        key = gl.where(g == 0, kb0, kb1) * BK + cols % BK
        ok = (key < N) & ((W // BK) * t + g < cnt)
        s = gl.where(ok[None, :], s, float("-inf"))
    p, alpha, l_i, m_i = _softmax(s, m_i, l_i, 0, N, qk_scale, W, False, s_layout)
    _store_p(p, p_smem, buf)
    _cta_barrier()  # the warpgroup's four warps have stored their rows of P before its GEMM reads them
    return alpha, l_i, m_i


@gluon.jit
def _ws_step(t, acc, m_i, l_i, q_rows, k_smem, v_smem, p_smem, k_bar, v_bar, empty, idx_base, cnt, has, last, MK,
             N, qk_scale, turn, BK: gl.constexpr, half: gl.constexpr, PINGPONG: gl.constexpr, MASK: gl.constexpr,
             s_layout: gl.constexpr):
    """Step t in one consumer warpgroup: S_t and P_{t-1} V_{t-1} on the tensor cores, the softmax of S_t
    meanwhile; step t-1's ring slot is released once its PV GEMM is done. With ``PINGPONG`` the two
    warpgroups take turns to issue their GEMMs (``turn``: one mbarrier each), so that one's softmax runs
    while the other's GEMMs do (flash-attention 3's ping-pong)."""
    SLOTS: gl.constexpr = k_smem.type.shape[0]
    W: gl.constexpr = k_smem.type.shape[1]
    BM: gl.constexpr = p_smem.type.shape[1]
    slot = t % SLOTS
    prev = (t - 1) % SLOTS
    mbarrier.wait(k_bar.index(slot), (t // SLOTS) & 1)
    mbarrier.wait(v_bar.index(prev), ((t - 1) // SLOTS) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(half), ((t - 1) & 1) ^ (1 - half))
    s = warpgroup_mma(q_rows, k_smem.index(slot).permute((1, 0)), gl.zeros([BM, W], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    acc = warpgroup_mma(p_smem.index((t - 1) % 2), v_smem.index(prev), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - half), count=1)
    s = warpgroup_mma_wait(1, deps=(s, ))
    alpha, l_i, m_i = _ws_softmax_store(s, m_i, l_i, p_smem, t % 2, t, idx_base, cnt, has, last, MK, N,
                                        qk_scale, BK, MASK, s_layout)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    return acc, m_i, l_i


@gluon.jit
def _ws_consumer(ctx, half: gl.constexpr, PINGPONG: gl.constexpr):
    """One warpgroup's 64 query rows (``half`` 0 or 1 of the program's 128) through the whole list, ``G``
    key blocks per step. Only the last step can hold the ragged block or entries past the list's end; the
    first and last steps apply the column mask (a no-op on whole blocks)."""
    (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty, Out, LSE, idx_base, cnt, has, last,
     base_row, start_m, MK, N, qk_scale, stride_ob, stride_oh, stride_on, b, h, bh, p_smem0, p_smem1, turn) = ctx
    p_smem = p_smem1 if half else p_smem0
    SLOTS: gl.constexpr = k_smem.type.shape[0]
    W: gl.constexpr = k_smem.type.shape[1]
    BK: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_smem.type.shape[2]
    BM: gl.constexpr = p_smem.type.shape[1]
    nw: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, W, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1], instr_shape=[16, D, 16])
    q_rows = q_smem.slice(half * BM, BM)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
    steps = gl.cdiv(cnt, W // BK)
    if cnt > 0:
        s0 = _first_scores(q_rows, k_smem, q_bar, k_bar, s_layout)
        alpha, l_i, m_i = _ws_softmax_store(s0, m_i, l_i, p_smem, 0, 0, idx_base, cnt, has, last, MK, N,
                                            qk_scale, BK, True, s_layout)
        for t in range(1, steps - 1):
            acc, m_i, l_i = _ws_step(t, acc, m_i, l_i, q_rows, k_smem, v_smem, p_smem, k_bar, v_bar, empty, idx_base,
                                     cnt, has, last, MK, N, qk_scale, turn, BK, half, PINGPONG, False, s_layout)
        if steps > 1:
            acc, m_i, l_i = _ws_step(steps - 1, acc, m_i, l_i, q_rows, k_smem, v_smem, p_smem, k_bar, v_bar, empty,
                                     idx_base, cnt, has, last, MK, N, qk_scale, turn, BK, half, PINGPONG, True,
                                     s_layout)
        vs = (steps - 1) % SLOTS
        mbarrier.wait(v_bar.index(vs), ((steps - 1) // SLOTS) & 1)
        acc = warpgroup_mma(p_smem.index((steps - 1) % 2), v_smem.index(vs), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, o_row)[:, None]
    offs_m = start_m + half * BM + gl.arange(0, BM, layout=o_row)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_ptr = Out + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    gl.store(o_ptr + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < N)
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    offs_l = start_m + half * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + bh.to(gl.int64) * N + offs_l, lse, mask=offs_l < N)


def _consumer_partition(half: int, pingpong: bool):
    """A consumer warpgroup's partition function: the partitions take no constexpr arguments (Triton 3.6
    passes them as plain Python values), so ``half`` and ``pingpong`` are baked in as closure constants
    (part of the function's cache key)."""
    HALF, PINGPONG = gl.constexpr(half), gl.constexpr(pingpong)

    @gluon.jit
    def partition(ctx):
        _ws_consumer(ctx, HALF, PINGPONG)

    return partition


_ws_first_half, _ws_second_half = _consumer_partition(0, False), _consumer_partition(1, False)
_ws_first_half_pp, _ws_second_half_pp = _consumer_partition(0, True), _consumer_partition(1, True)


# N and MK equal to 1 would be specialised into constants, which the partitions cannot take (Triton 3.6);
# the strides keep their specialisation (divisible by 16: vectorised stores)
@gluon.jit(do_not_specialize=["N", "MK"])
def _fwd_gluon_ws_kernel(q_desc, k_desc, v_desc, Out, LSE, KV_IDX, KV_CNT, qk_scale,
                         stride_ob, stride_oh, stride_on, H, N, MQ, MK, KMAX,
                         D: gl.constexpr, BQ: gl.constexpr, BK: gl.constexpr, EVEN_N: gl.constexpr,
                         KMAX_P2: gl.constexpr, p_layout: gl.constexpr, SLOTS: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr, G: gl.constexpr,
                         num_warps: gl.constexpr):
    """128 query rows per program: two consumer warpgroups of 64 rows (the default partition and a worker)
    and a producer warp that keeps a ring of ``SLOTS`` K/V blocks full (flash-attention 3's split)."""
    BM: gl.constexpr = BQ // 2
    qblk = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    cnt, idx_base, last, has = _list_head(KV_IDX, KV_CNT, bh * MQ + qblk, KMAX, MK, KMAX_P2, EVEN_N, num_warps)
    base_row = bh * N
    start_m = qblk * BQ

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BQ, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [SLOTS, G * BK, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [SLOTS, G * BK, D], v_desc.layout)
    p_smem0 = gl.allocate_shared_memory(v_desc.dtype, [2, BM, G * BK], p_layout)
    p_smem1 = gl.allocate_shared_memory(v_desc.dtype, [2, BM, G * BK], p_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(SLOTS):
        mbarrier.init(k_bar.index(s), count=1)
        mbarrier.init(v_bar.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumer warpgroups release a slot

    args = ((q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty, Out, LSE, idx_base, cnt,
             has, last, base_row, start_m, MK, N, qk_scale, stride_ob, stride_oh, stride_on, b, h, bh, p_smem0,
             p_smem1, turn), )
    if PINGPONG:
        gl.warp_specialize([(_ws_first_half_pp, args), (_ws_second_half_pp, args), (_ws_producer, args)], [4, 1],
                           [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_ws_first_half, args), (_ws_second_half, args), (_ws_producer, args)], [4, 1],
                           [CONSUMER_REGS, 24])
