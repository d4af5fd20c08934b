"""The linear branch's two forward passes for Hopper, written in Gluon.

On sm_90 these are the forward passes of :func:`kernels.linear_attn.linear_attention_triton` (the Triton
passes run elsewhere, and the backward is Triton's everywhere): :class:`KVPass` (the pass over K and V) and :class:`OutPass` (the pass over Q), each built once per input
signature and launched through a :class:`kernels.launch.Site` (no-grad calls keep them in a plan,
``linear_attn._plan``; :func:`state_pass_gluon` and :func:`out_pass_gluon` build one for a single call).
Both keep a ring of TMA slots. The K/V pass stores the rotated features in natural channel order and reads
them transposed as the wgmma A operand against the V tile, making tile t+1's features while tile t's
wgmma runs, and permutes the state's rows into the half layout when it stores them.

The output pass has the same contract as :func:`kernels.linear_attn._fwd_out_kernel`: with the summed state in the half layout
(``S`` even feature rows, odd feature rows, then ``z``, in sum units), each query row gets
``(R f(q))^T S / (f(q) . z + eps)``. What differs is the order of work, written out instead of left to
Triton 3.6 (docs/lab/kernels-notes.md says why):

* Q tiles and the RoPE tables come through TMA into a ring of ``STAGES`` shared-memory slots, issued
  ``STAGES`` tiles ahead, so the loads of later tiles are in flight while a tile is computed;
* the state is cast once per program to fp16 and stays in shared memory as the wgmma B operand (the
  Triton pass re-reads it with ``ldmatrix`` for every 32-token tile);
* the features are computed in a blocked layout that holds each RoPE pair (channels 2i, 2i+1) in one
  thread, so splitting them into even and odd halves moves no data; the two rotated halves go to shared
  memory as the A operands of two wgmmas (K = D/2 each) against the state's two halves;
* each row is scaled by one reciprocal of its denominator, and the tile leaves through shared memory and
  a TMA store over the ``(B*H, N, D)`` output, which clips each head at N (``out_tma``; else by masked
  stores from registers).

One program per (token chunk, head), 4 or 8 warps, 64 tokens per tile. sm_90 only, bf16/fp16 inputs,
D 64 or 128, contiguous ``(B, H, N, D)`` tensors. Gluon does not run in the CPU interpreter: the CPU tests
build it for sm_90 (tests/kernels/test_gpu_compile.py) and the ``gpu`` tests check it on the card.
"""

from __future__ import annotations

import functools

import torch
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

from salad_bench.kernels.features import feature  # the Triton feature map: a Gluon kernel calls it on its own layouts
from salad_bench.kernels.launch import Site
from salad_bench.kernels.layout import token_major

__all__ = ["KVPass", "OutPass", "gluon_supported", "gluon_unsupported_on", "out_pass_gluon", "state_pass_gluon"]

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton >= 3.7 (3.6 has only _reinterpret)
    @gluon.jit
    def _as_block(smem, desc):
        """``smem`` viewed as one block of ``desc`` (same bytes, the descriptor's shape and layout)."""
        return smem.reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
else:
    @gluon.jit
    def _as_block(smem, desc):
        """``smem`` viewed as one block of ``desc`` (same bytes, the descriptor's shape and layout)."""
        return smem._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK = 64  # tokens per tile (one wgmma M)
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@gluon.jit
def _ring(x_desc, c_desc, s_desc, STAGES: gl.constexpr, ROPE: gl.constexpr):
    """A ring of ``STAGES`` slots for row tiles of ``x_desc`` and (with RoPE) of both tables, and one
    initialised barrier per slot; shared memory written before it is fenced for the async proxy."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, x_desc.block_type.shape[1]], x_desc.layout)
    if ROPE:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [STAGES, BM, c_desc.block_type.shape[1]], c_desc.layout)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES, BM, s_desc.block_type.shape[1]], s_desc.layout)
    else:
        c_smem = x_smem
        s_smem = x_smem
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    _cta_barrier()
    return x_smem, c_smem, s_smem, bars


@gluon.jit
def _issue(q_desc, c_desc, s_desc, q_smem, c_smem, s_smem, bars, t, start, base_row, col, ntiles,
           STAGES: gl.constexpr, ROPE: gl.constexpr):
    """TMA copies of tile ``t`` (its Q rows and, with RoPE, its rows of both tables) into ring slot
    ``t % STAGES``, completing on that slot's barrier; nothing past the program's last tile."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    slot = t % STAGES
    pred = t < ntiles
    bar = bars.index(slot)
    tok = start + t * BM
    if ROPE:
        mbarrier.expect(bar, q_desc.block_type.nbytes + 2 * c_desc.block_type.nbytes, pred=pred)
        _tma_load(c_desc, [tok, 0], bar, c_smem.index(slot), pred=pred)
        _tma_load(s_desc, [tok, 0], bar, s_smem.index(slot), pred=pred)
    else:
        mbarrier.expect(bar, q_desc.block_type.nbytes, pred=pred)
    _tma_load(q_desc, [base_row + tok, col], bar, q_smem.index(slot), pred=pred)


@gluon.jit
def _out_kernel(q_desc, c_desc, s_desc, o_desc, Out, S, stride_ob, stride_oh, stride_on, H, N, CHUNK, eps_n, inv_n,
                RB, RH, CH, ODIV, OCH, D: gl.constexpr, KIND: gl.constexpr, ROPE: gl.constexpr, STAGES: gl.constexpr, OUT_TMA: gl.constexpr,
                st_layout: gl.constexpr, r_layout: gl.constexpr, num_warps: gl.constexpr):
    """Output rows ``[pid * CHUNK, (pid + 1) * CHUNK)`` of head ``program_id(1)``. Q is read as a matrix
    whose rows are tokens (see :func:`_geometry`): head ``bh``'s start at row ``(bh // H) * RB + (bh % H) * RH``,
    column ``(bh % H) * CH``; a tile's rows past N belong to the next head or batch (or are zeros past the
    end) and are never stored. With ``OUT_TMA`` the output leaves through shared memory and a TMA store over
    the output's heads (``o_desc``, which clips each head at N; head ``bh``'s block at
    ``[bh // ODIV, row, (bh % H) * OCH]``); else by masked stores from registers."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D2: gl.constexpr = D // 2
    WN: gl.constexpr = num_warps // 4  # warpgroups side by side along the output columns
    pid = gl.program_id(0)
    bh = gl.program_id(1)
    start = pid * CHUNK
    ntiles = gl.cdiv(gl.minimum(start + CHUNK, N) - start, BM)
    base_row = (bh // H) * RB + (bh % H) * RH
    col = (bh % H) * CH

    # each thread holds 8 consecutive channels (4 RoPE pairs) of a row: the even/odd split is in registers
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    blk3: gl.constexpr = gl.BlockedLayout([1, 4, 2], [4, 8, 1], [num_warps, 1, 1], [2, 1, 0])
    hl: gl.constexpr = gl.SliceLayout(2, blk3)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WN], instr_shape=[16, D // WN, 16])
    sl: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])

    # the state, in mean units, cast once to fp16 into shared memory (the wgmma B operands)
    sbase = S + bh.to(gl.int64) * (D * D + D)
    srows = gl.arange(0, D2, layout=gl.SliceLayout(1, sl))[:, None] * D + gl.arange(0, D, layout=gl.SliceLayout(0, sl))[None, :]
    s0_smem = gl.allocate_shared_memory(gl.float16, [D2, D], st_layout, (gl.load(sbase + srows) * inv_n).to(gl.float16))
    s1_smem = gl.allocate_shared_memory(gl.float16, [D2, D], st_layout,
                                        (gl.load(sbase + D2 * D + srows) * inv_n).to(gl.float16))
    zcols = gl.arange(0, D2, layout=gl.SliceLayout(0, hl))
    z0 = gl.load(sbase + D * D + zcols) * inv_n
    z1 = gl.load(sbase + D * D + D2 + zcols) * inv_n
    r0_smem = gl.allocate_shared_memory(gl.float16, [BM, D2], r_layout)
    r1_smem = gl.allocate_shared_memory(gl.float16, [BM, D2], r_layout)
    if OUT_TMA:
        # staged as a (BM, D) tile in Q's layout (the same bytes as o_desc's (1, BM, D) block)
        o_smem = gl.allocate_shared_memory(o_desc.dtype, [BM, D], q_desc.layout)
    else:
        o_smem = r0_smem

    q_smem, c_smem, s_smem, bars = _ring(q_desc, c_desc, s_desc, STAGES, ROPE)
    for i in gl.static_range(STAGES):
        _issue(q_desc, c_desc, s_desc, q_smem, c_smem, s_smem, bars, i, start, base_row, col, ntiles, STAGES, ROPE)

    zero = gl.zeros([BM, D], gl.float32, acc_l)
    o_base = Out + (bh // H).to(gl.int64) * stride_ob + (bh % H).to(gl.int64) * stride_oh
    ring = (q_desc, c_desc, s_desc, q_smem, c_smem, s_smem, bars, start, base_row, col, ntiles)
    for t in range(ntiles):
        den = _q_tile(t, ring, r0_smem, r1_smem, z0, z1, eps_n, KIND, ROPE, STAGES, blk, hl)
        fence_async_shared()
        _cta_barrier()  # tile t's rotated features are in shared memory, from every warp
        acc = warpgroup_mma(r0_smem, s0_smem, zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(r1_smem, s1_smem, acc, is_async=True)
        # (keeping tile t's GEMMs in flight while tile t - 1 is stored gets them serialised by ptxas: C7514)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        # one reciprocal per row, then a multiply per element (a division per element was a quarter of the
        # pass's instructions under ncu)
        out = acc * gl.convert_layout(1.0 / den, gl.SliceLayout(1, acc_l))[:, None]
        if OUT_TMA:
            tma.store_wait(0)  # (the issuing thread) tile t - 1's rows have left o_smem ...
            _cta_barrier()  # ... before any warp overwrites them
            o_smem.store(out.to(o_desc.dtype))
            fence_async_shared()
            _cta_barrier()
            _tma_store(o_desc, [bh // ODIV, start + t * BM, (bh % H) * OCH], _as_block(o_smem, o_desc))
        else:
            _q_store(out, o_base, start + t * BM, N, stride_on, blk)
    if OUT_TMA:
        tma.store_wait(0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _q_tile(t, ring, r0_smem, r1_smem, z0, z1, eps_n, KIND: gl.constexpr, ROPE: gl.constexpr, STAGES: gl.constexpr,
            blk: gl.constexpr, hl: gl.constexpr):
    """Tile t up to its GEMMs: wait for its ring slot, read it, refill it with tile t + STAGES, and write
    the rotated feature halves into ``r0_smem, r1_smem``. Returns each row's denominator ``f . z + eps``."""
    q_desc, c_desc, s_desc, q_smem, c_smem, s_smem, bars, start, base_row, col, ntiles = ring
    slot = t % STAGES
    mbarrier.wait(bars.index(slot), (t // STAGES) & 1)
    x = q_smem.index(slot).load(blk).to(gl.float32)
    if ROPE:
        cs = c_smem.index(slot).load(hl).to(gl.float32)
        sn = s_smem.index(slot).load(hl).to(gl.float32)
    else:
        cs = z0
        sn = z0
    # every warp has read the slot (and waited for the GEMMs that last read the buffers written below): refill it
    _cta_barrier()
    _issue(q_desc, c_desc, s_desc, q_smem, c_smem, s_smem, bars, t + STAGES, start, base_row, col, ntiles, STAGES, ROPE)
    r0, r1, den = _q_features(x, cs, sn, z0, z1, eps_n, KIND, ROPE, hl)
    r0_smem.store(r0.to(gl.float16))
    r1_smem.store(r1.to(gl.float16))
    return den


@gluon.jit
def _q_features(x, cs, sn, z0, z1, eps_n, KIND: gl.constexpr, ROPE: gl.constexpr, hl: gl.constexpr):
    """Rotated feature halves of a Q tile and each row's denominator ``f . z + eps``."""
    BM: gl.constexpr = x.type.shape[0]
    D2: gl.constexpr = x.type.shape[1] // 2
    f0, f1 = gl.split(gl.reshape(feature(x, KIND), [BM, D2, 2]))
    f0 = gl.convert_layout(f0, hl, assert_trivial=True)
    f1 = gl.convert_layout(f1, hl, assert_trivial=True)
    den = gl.sum(f0 * z0[None, :] + f1 * z1[None, :], 1) + eps_n
    if ROPE:
        return f0 * cs - f1 * sn, f0 * sn + f1 * cs, den
    else:
        return f0, f1, den


@gluon.jit
def _q_store(out, o_base, row0, N, stride_on, blk: gl.constexpr):
    """Rows ``row0 ..`` of the output from registers, in a blocked layout, rows past N dropped."""
    BM: gl.constexpr = out.type.shape[0]
    D: gl.constexpr = out.type.shape[1]
    out = gl.convert_layout(out.to(o_base.dtype.element_ty), blk)
    offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, blk))
    gl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out, mask=offs_m[:, None] < N)


@gluon.jit
def _state_kernel(k_desc, v_desc, c_desc, s_desc, PART, H, N, CHUNK, RB, RH, CH,
                  D: gl.constexpr, KIND: gl.constexpr, ROPE: gl.constexpr, STAGES: gl.constexpr,
                  r_layout: gl.constexpr, num_warps: gl.constexpr):
    """Partial state of tokens ``[pid * CHUNK, (pid + 1) * CHUNK)`` of head ``program_id(1)``: ``R f(K)^T V``
    (D x D) and ``sum f(K)``, stored in the half layout (even feature rows, then odd) into ``PART``.
    K and V are read as matrices whose rows are tokens, placed as Q's in :func:`_out_kernel` (``RB, RH,
    CH``); rows past N (the next head's or batch's, or zeros) get zero features, so they add nothing. The rotated features keep their natural channel order in shared memory
    (a ``BM x D`` tile, read transposed as the wgmma A operand); the accumulator's rows are permuted into
    the half layout when stored. Tile t's wgmma runs while tile t + 1's features are computed."""
    BM: gl.constexpr = k_desc.block_type.shape[0]
    D2: gl.constexpr = D // 2
    pid = gl.program_id(0)
    bh = gl.program_id(1)
    nsplit = gl.num_programs(0)
    start = pid * CHUNK
    stop = gl.minimum(start + CHUNK, N)
    ntiles = gl.cdiv(stop - start, BM)
    base_row = (bh // H) * RB + (bh % H) * RH
    col = (bh % H) * CH

    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    blk3: gl.constexpr = gl.BlockedLayout([1, 4, 2], [4, 8, 1], [num_warps, 1, 1], [2, 1, 0])
    hl: gl.constexpr = gl.SliceLayout(2, blk3)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])

    r_smem = gl.allocate_shared_memory(v_desc.dtype, [2, BM, D], r_layout)  # rotated features, double-buffered
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BM, D], v_desc.layout)
    k_smem, c_smem, s_smem, bars = _ring(k_desc, c_desc, s_desc, STAGES, ROPE)
    for i in gl.static_range(STAGES):
        _issue_kv(k_desc, v_desc, c_desc, s_desc, k_smem, v_smem, c_smem, s_smem, bars, i, start, base_row, col,
                  i < ntiles, STAGES, ROPE)
    acc = gl.zeros([D, D], gl.float32, acc_l)
    za0 = gl.zeros([BM, D2], gl.float32, hl)
    za1 = gl.zeros([BM, D2], gl.float32, hl)
    ring = (k_smem, v_smem, c_smem, s_smem, r_smem, bars, start, stop)
    # every program has at least one tile; tile t + 1's features are computed while tile t's wgmma runs
    za0, za1 = _kv_tile(0, ring, za0, za1, KIND, ROPE, STAGES, blk, hl)
    for t in range(ntiles):
        fence_async_shared()
        _cta_barrier()  # tile t's features are in r_smem[t % 2], from every warp
        acc = warpgroup_mma(r_smem.index(t % 2).permute((1, 0)), v_smem.index(t % STAGES), acc, is_async=True)
        if t + 1 < ntiles:  # into r_smem[(t + 1) % 2], last read by tile t - 1's wgmma (waited for)
            za0, za1 = _kv_tile(t + 1, ring, za0, za1, KIND, ROPE, STAGES, blk, hl)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        _cta_barrier()  # every warpgroup is done with tile t's slot: it takes tile t + STAGES
        _issue_kv(k_desc, v_desc, c_desc, s_desc, k_smem, v_smem, c_smem, s_smem, bars, t + STAGES, start, base_row, col,
                  t + STAGES < ntiles, STAGES, ROPE)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    base = PART + (bh.to(gl.int64) * nsplit + pid) * (D * D + D)
    r_ = gl.arange(0, D, layout=gl.SliceLayout(1, acc_l))
    c_ = gl.arange(0, D, layout=gl.SliceLayout(0, acc_l))
    # natural feature row 2i -> half-layout row i, row 2i + 1 -> row D/2 + i
    gl.store(base + ((r_ % 2) * D2 + r_ // 2)[:, None] * D + c_[None, :], acc)
    zc = gl.arange(0, D2, layout=gl.SliceLayout(0, hl))
    gl.store(base + D * D + zc, gl.sum(za0, 0))
    gl.store(base + D * D + D2 + zc, gl.sum(za1, 0))


@gluon.jit
def _kv_tile(t, ring, za0, za1, KIND: gl.constexpr, ROPE: gl.constexpr, STAGES: gl.constexpr, blk: gl.constexpr,
             hl: gl.constexpr):
    """Tile t of the K/V pass up to its wgmma: its rotated features (zero on rows past the chunk) into
    ``r_smem[t % 2]`` in natural channel order, and the feature sums ``za0, za1`` (even, odd channels)
    updated."""
    k_smem, v_smem, c_smem, s_smem, r_smem, bars, start, stop = ring
    BM: gl.constexpr = k_smem.type.shape[1]
    D: gl.constexpr = k_smem.type.shape[2]
    D2: gl.constexpr = D // 2
    slot = t % STAGES
    row0 = start + t * BM
    mbarrier.wait(bars.index(slot), (t // STAGES) & 1)
    x = k_smem.index(slot).load(blk).to(gl.float32)
    rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
    f = gl.where((rows < stop)[:, None], feature(x, KIND), 0.0)
    f0, f1 = gl.split(gl.reshape(f, [BM, D2, 2]))
    f0 = gl.convert_layout(f0, hl, assert_trivial=True)
    f1 = gl.convert_layout(f1, hl, assert_trivial=True)
    if ROPE:
        cs = c_smem.index(slot).load(hl).to(gl.float32)
        sn = s_smem.index(slot).load(hl).to(gl.float32)
        r = gl.convert_layout(gl.reshape(gl.join(f0 * cs - f1 * sn, f0 * sn + f1 * cs), [BM, D]), blk,
                              assert_trivial=True)
    else:
        r = f
    r_smem.index(t % 2).store(r.to(r_smem.dtype))
    return za0 + f0, za1 + f1


@gluon.jit
def _issue_kv(k_desc, v_desc, c_desc, s_desc, k_smem, v_smem, c_smem, s_smem, bars, t, start, base_row, col, pred,
              STAGES: gl.constexpr, ROPE: gl.constexpr):
    """TMA copies of K/V tile ``t`` (and its rows of the RoPE tables) into ring slot ``t % STAGES`` when
    ``pred``."""
    BM: gl.constexpr = k_desc.block_type.shape[0]
    slot = t % STAGES
    bar = bars.index(slot)
    tok = start + t * BM
    if ROPE:
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes + 2 * c_desc.block_type.nbytes, pred=pred)
        _tma_load(c_desc, [tok, 0], bar, c_smem.index(slot), pred=pred)
        _tma_load(s_desc, [tok, 0], bar, s_smem.index(slot), pred=pred)
    else:
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes, pred=pred)
    _tma_load(k_desc, [base_row + tok, col], bar, k_smem.index(slot), pred=pred)
    _tma_load(v_desc, [base_row + tok, col], bar, v_smem.index(slot), pred=pred)


@functools.cache
def _major(index: int) -> int:
    """The compute capability's major number of CUDA device ``index`` (asked once: a per-call cost)."""
    return torch.cuda.get_device_capability(index)[0]


def gluon_unsupported_on(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the Gluon passes cannot run on this device, dtype and head dim (None when they can)."""
    if device.type != "cuda" or _major(device.index if device.index is not None else torch.cuda.current_device()) != 9:
        return f"the Gluon linear passes use Hopper's wgmma and TMA: they need an sm_90 GPU, not {device}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the Gluon linear passes support bfloat16 and float16, not {dtype}"
    if head_dim not in (64, 128):
        return f"the Gluon linear passes support head_dim 64 and 128, not {head_dim}"
    return None


def gluon_supported(cos: torch.Tensor | None, *xs: torch.Tensor) -> str | None:
    """Why the Gluon passes cannot run on these inputs ``xs`` and RoPE table ``cos`` (None when they can)."""
    x = xs[0]
    if (why := gluon_unsupported_on(x.device, x.dtype, x.shape[-1])) is not None:
        return why
    geometry = {_geometry(y) for y in xs}
    if None in geometry or any(y.data_ptr() % 16 for y in xs):
        return ("the Gluon linear passes read q, k, v through TMA as matrices of token rows: each must be contiguous "
                "(B, H, N, D) or a (B, H, N, D) view of token-major (B, N, >=H*D) rows, 16-byte aligned")
    if len(geometry) > 1:
        return "the Gluon K/V pass reads k and v with one geometry: give both the same layout"
    if cos is not None:
        if cos.dtype not in _GL_DTYPES:
            return f"the Gluon linear passes take RoPE tables in float32, float16 or bfloat16, not {cos.dtype}"
        if cos.data_ptr() % 16:
            return "the Gluon linear passes read the RoPE tables through TMA: they must be 16-byte aligned"
    return None


# Host-side launch work, cached: this module's launches are host-bound on a slow host (docs/lab/kernels-notes.md),
# so shared-memory layouts and the RoPE tables' descriptors (static across calls) are built once.
_LAYOUTS: dict = {}
_TABLE_DESCS: dict = {}


def _layout(shape: tuple, dtype) -> gl.NVMMASharedLayout:
    key = (shape, dtype)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for(list(shape), dtype)
    return _LAYOUTS[key]


def _geometry(x: torch.Tensor) -> tuple[int, int, int] | None:
    """Where head ``bh``'s token rows start in the matrix :func:`_rows_desc` describes: row ``(bh // H) * RB +
    (bh % H) * RH``, column ``(bh % H) * CH``, as ``(RB, RH, CH)``. A contiguous ``(B, H, N, D)`` tensor is
    a ``(B*H*N, D)`` matrix; a view of token-major rows (a Wan layer's q, k, v: the projection's ``(B, N, C)``
    output, or a slice of a fused one, unflattened and transposed) is a ``(B*N, H*D)`` matrix whose rows are
    ``stride(2)`` apart. None for any other layout (or strides TMA cannot take)."""
    b, h, n, d = x.shape
    if x.is_contiguous():
        return (h * n, n, 0)
    row = x.stride(2)
    if (x.stride(3) == 1 and x.stride(1) == d and (b == 1 or x.stride(0) == n * row) and row >= h * d
            and (row * x.element_size()) % 16 == 0):
        return (n, 0, d)
    return None


def _rows_desc(x: torch.Tensor) -> TensorDescriptor:
    """A descriptor over ``x``'s token rows (see :func:`_geometry`), blocks of 64 rows of one head's D columns."""
    b, h, n, d = x.shape
    lay = _layout((BLOCK, d), _GL_DTYPES[x.dtype])
    # the descriptor reads only the base's address and dtype: x itself serves (a .view costs host time)
    if x.is_contiguous():
        return TensorDescriptor(x, [b * h * n, d], [d, 1], [BLOCK, d], lay)
    return TensorDescriptor(x, [b * n, h * d], [x.stride(2), 1], [BLOCK, d], lay)


def _heads_desc(x: torch.Tensor) -> tuple[TensorDescriptor, int, int]:
    """A descriptor over a dense ``(B, H, N, D)`` output, blocks of one head's 64 rows: a TMA store through it
    clips each head at N. Head ``bh``'s block is ``[bh // ODIV, row, (bh % H) * OCH]``; returns the descriptor,
    ``ODIV`` and ``OCH``. Contiguous: ``(B*H, N, D)``; token-major (:func:`~salad_bench.kernels.layout.token_major`):
    ``(B, N, H*D)``."""
    b, h, n, d = x.shape
    lay = _layout((1, BLOCK, d), _GL_DTYPES[x.dtype])
    if x.is_contiguous():
        return TensorDescriptor(x, [b * h, n, d], [n * d, d, 1], [1, BLOCK, d], lay), 1, 0
    return TensorDescriptor(x, [b, n, h * d], [n * h * d, h * d, 1], [1, BLOCK, d], lay), h, d


def _table_descs(cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """Descriptors over the ``(N, D/2)`` tables, keyed by what a descriptor encodes (address, shape,
    dtype): the same for any tensor at that address, so a hit is always right. A few entries at most."""
    key = (cos.data_ptr(), sin.data_ptr(), tuple(cos.shape), cos.dtype, cos.device)
    descs = _TABLE_DESCS.get(key)
    if descs is None:
        n, d2 = cos.shape
        lay = _layout((BLOCK, d2), _GL_DTYPES[cos.dtype])
        descs = tuple(TensorDescriptor(t, [n, d2], [d2, 1], [BLOCK, d2], lay) for t in (cos, sin))
        if len(_TABLE_DESCS) >= 8:
            _TABLE_DESCS.clear()
        _TABLE_DESCS[key] = descs
    return descs


class KVPass:
    """The forward's K/V pass for one input signature: the launch's constexprs, grid, table descriptors and
    (after the first call) compiled kernel kept, so a call only allocates, describes k and v, and launches.
    Returns the summed state ``(B*H, D*D + D)`` (half layout, sum units) from ``nsplit`` chunks of
    ``chunk`` tokens per head (a multiple of :data:`BLOCK`)."""

    def __init__(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: bool, kind: int, nsplit: int,
                 chunk: int, num_warps: int = 8, stages: int = 3):
        b, h, n, d = k.shape
        assert chunk % BLOCK == 0 and num_warps in (4, 8)
        self.ints = (h, n, chunk, *_geometry(k))
        self.part_shape = (b * h, nsplit, d * d + d)
        self.tables = _table_descs(cos, sin) if rope else None
        self.site = Site(_state_kernel, (nsplit, b * h),
                         dict(D=d, KIND=kind, ROPE=rope, STAGES=stages, r_layout=_layout((BLOCK, d), _GL_DTYPES[k.dtype]),
                              num_warps=num_warps))

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        part = torch.empty(self.part_shape, dtype=torch.float32, device=k.device)
        k_desc, v_desc = _rows_desc(k), _rows_desc(v)
        c_desc, s_desc = self.tables or (k_desc, k_desc)
        self.site(k_desc, v_desc, c_desc, s_desc, part, *self.ints)
        return part.sum(1)


class OutPass:
    """The forward's output pass for one input signature (see :class:`KVPass`): the output ``(B, H, N, D)``
    (a view of a token-major buffer)
    from the summed state ``(B*H, D*D + D)`` (half layout, sum units) over ``nsplit`` chunks of ``chunk``
    tokens per head (a multiple of :data:`BLOCK`). ``cos, sin`` are the ``(N, D/2)`` tables when ``rope``."""

    def __init__(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: bool, kind: int, eps: float,
                 nsplit: int, chunk: int, num_warps: int = 4, stages: int = 3, out_tma: bool = False):
        b, h, n, d = q.shape
        assert chunk % BLOCK == 0 and num_warps in (4, 8)
        self.ints = (h, n, chunk, eps / n, 1.0 / n, *_geometry(q))
        self.out_tma = out_tma
        self.tables = _table_descs(cos, sin) if rope else None
        self.site = Site(_out_kernel, (nsplit, b * h),
                         dict(D=d, KIND=kind, ROPE=rope, STAGES=stages, OUT_TMA=out_tma,
                              st_layout=_layout((d // 2, d), gl.float16), r_layout=_layout((BLOCK, d // 2), gl.float16),
                              num_warps=num_warps))

    def __call__(self, q: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        out = token_major(*q.shape, q.dtype, q.device)
        q_desc = _rows_desc(q)
        c_desc, s_desc = self.tables or (q_desc, q_desc)
        o_desc, odiv, och = _heads_desc(out) if self.out_tma else (q_desc, 1, 0)
        self.site(q_desc, c_desc, s_desc, o_desc, out, state, out.stride(0), out.stride(1), out.stride(2), *self.ints,
                  odiv, och)
        return out


def state_pass_gluon(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: bool, kind: int,
                     nsplit: int, chunk: int, num_warps: int = 8, stages: int = 3) -> torch.Tensor:
    """One call of :class:`KVPass`: the summed state ``(B*H, D*D + D)``."""
    return KVPass(k, cos, sin, rope, kind, nsplit, chunk, num_warps, stages)(k, v)


def out_pass_gluon(q: torch.Tensor, state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: bool, kind: int,
                   eps: float, nsplit: int, chunk: int, num_warps: int = 4, stages: int = 3,
                   out_tma: bool = False) -> torch.Tensor:
    """One call of :class:`OutPass`: the output ``(B, H, N, D)``."""
    return OutPass(q, cos, sin, rope, kind, eps, nsplit, chunk, num_warps, stages, out_tma)(q, state)
