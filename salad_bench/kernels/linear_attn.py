"""Non-causal linear attention in Triton (forward and backward), the SALAD linear branch.

Same semantics as :func:`kernels.reference.linear_attention_ref` (its torch reference):
``O[i] = (R_i f(q_i))^T S / (f(q_i)^T z + eps)`` with ``S = sum_j (R_j f(k_j)) v_j^T`` and
``z = sum_j f(k_j)``; RoPE (``cos, sin`` of shape ``(N, D/2)``, pairs ``(2i, 2i+1)``) rotates the
numerator features only. ``f`` is ``relu``, ``elu`` (elu + 1) or ``softmax`` over the head dim.

Two passes each way, memory-bound at the video shapes:

* forward: (1) one pass over K, V: per-head partial states ``S`` (D x D) and ``z`` over token chunks
  in one flat buffer, summed by one torch op (a few MB); (2) one pass over Q producing O.
* backward: (1) one pass over Q, dO: dQ plus partial ``dS``/``dz``; (2) one pass over K, V: dK, dV.

On sm_90 both forward passes are :mod:`kernels.linear_gluon`'s (bf16/fp16, D 64/128, contiguous aligned
inputs; the same results to ~1e-5); elsewhere, and in the interpreter, the Triton passes below run.

Numerics: states are kept in "mean" units (``S/N``, ``z/N``; the ratio is unchanged), so every
operand is O(1) and can go through fp16 tensor cores safely. Products with a native operand (V, dO)
use the input dtype; the backward splits the fp32 operand into hi + lo parts (exact to ~16 bits), the
forward's K/V pass rounds the features once; the backward recomputes the state for half-precision inputs
with the features' lo parts in the dots (``STATE_SPLIT``), since dq subtracts two nearly equal terms
built from it. Products of two fp32 tiles round both to fp16 (``F32_SPLIT`` adds the lo parts; off: the
error stays within ~10% of torch's own output rounding); fp32 inputs use IEEE fp32 dots throughout (the
CPU interpreter tests use fp32/fp16).
The even/odd RoPE pairs are kept as two half-width tiles (``x[..., 0::2]``, ``x[..., 1::2]``), so the
state is stored split as ``(2, D/2, D)`` and no interleaving shuffle is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from salad_bench.kernels.features import feature as _feature
from salad_bench.kernels.features import feature_bwd as _feature_bwd
from salad_bench.kernels.launch import INTERPRET, check_qkv, fitted, sm_count
from salad_bench.kernels.layout import cdiv, token_major

__all__ = ["linear_attention_triton", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_KINDS = {"relu": 0, "elu": 1, "softmax": 2}


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _cast(x, MODE: tl.constexpr):
    if MODE == 1:
        return x.to(tl.float16)
    elif MODE == 2:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _mm(a, b, acc, MODE: tl.constexpr, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr):
    """``acc + a @ b``: MODE 0 = IEEE fp32; 1/2 = fp16/bf16 operands, ``*_SPLIT`` adds the lo parts."""
    if MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        ah = _cast(a, MODE)
        bh = _cast(b, MODE)
        acc = tl.dot(ah, bh, acc)
        if A_SPLIT:
            al = _cast(a.to(tl.float32) - ah.to(tl.float32), MODE)
            acc = tl.dot(al, bh, acc)
        if B_SPLIT:
            bl = _cast(b.to(tl.float32) - bh.to(tl.float32), MODE)
            acc = tl.dot(ah, bl, acc)
        return acc


@triton.jit
def _split_b(b, MODE: tl.constexpr, SPLIT: tl.constexpr):
    """Loop-invariant operand cast once: (hi, lo) in the dot dtype (lo is hi when not split)."""
    bh = _cast(b, MODE)
    if SPLIT:
        return bh, _cast(b.to(tl.float32) - bh.to(tl.float32), MODE)
    else:
        return bh, bh


@triton.jit
def _mm_pre(a, bh, bl, acc, MODE: tl.constexpr, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr):
    """``acc + a @ b`` with ``b`` already split by :func:`_split_b`."""
    if MODE == 0:
        return tl.dot(a.to(tl.float32), bh, acc, input_precision="ieee")
    else:
        ah = _cast(a, MODE)
        acc = tl.dot(ah, bh, acc)
        if A_SPLIT:
            acc = tl.dot(_cast(a.to(tl.float32) - ah.to(tl.float32), MODE), bh, acc)
        if B_SPLIT:
            acc = tl.dot(ah, bl, acc)
        return acc


@triton.jit
def _head_base(bh, H, stride_b, stride_h):
    """Offset (int64) of head ``bh % H`` of batch ``bh // H`` in a (B, H, N, D) tensor."""
    return (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _load_state(S, bh, inv_n, D2: tl.constexpr, D: tl.constexpr):
    """Halves of the summed state (scaled to mean units) and of the normaliser, from one flat buffer."""
    rows = tl.arange(0, D2)[:, None] * D + tl.arange(0, D)[None, :]
    base = S + bh.to(tl.int64) * (2 * D2 * D + D)
    s0 = tl.load(base + rows) * inv_n
    s1 = tl.load(base + D2 * D + rows) * inv_n
    z0 = tl.load(base + 2 * D2 * D + tl.arange(0, D2)) * inv_n
    z1 = tl.load(base + 2 * D2 * D + D2 + tl.arange(0, D2)) * inv_n
    return s0, s1, z0, z1


@triton.jit
def _store_half(P, part, half, s, z, D2: tl.constexpr, D: tl.constexpr):
    """Half ``half`` of a partial state (its D/2 x D block of S and D/2 entries of z) into one flat buffer."""
    base = P + part * (2 * D2 * D + D)
    tl.store(base + half * D2 * D + tl.arange(0, D2)[:, None] * D + tl.arange(0, D)[None, :], s)
    tl.store(base + 2 * D2 * D + half * D2 + tl.arange(0, D2), z)


@triton.jit
def _store_state(P, part, s0, s1, z0, z1, D2: tl.constexpr, D: tl.constexpr):
    _store_half(P, part, 0, s0, z0, D2, D)
    _store_half(P, part, 1, s1, z1, D2, D)


@triton.jit
def _halves(x, ROWS: tl.constexpr, D2: tl.constexpr):
    """Even and odd channels of a ``ROWS x 2*D2`` tile."""
    return tl.split(tl.reshape(x, (ROWS, D2, 2)))


@triton.jit
def _interleave(x0, x1, ROWS: tl.constexpr, D2: tl.constexpr):
    return tl.reshape(tl.join(x0, x1), (ROWS, 2 * D2))


@triton.jit
def _feat_halves(x, c, s, mask, KIND: tl.constexpr, ROPE: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """Features of a raw tile (zero on rows outside ``mask``), their halves and the rotated halves."""
    D2: tl.constexpr = D // 2
    x = x.to(tl.float32)
    f = tl.where(mask[:, None], _feature(x, KIND), 0.0)
    f0, f1 = _halves(f, ROWS, D2)
    if ROPE:
        c = c.to(tl.float32)
        s = s.to(tl.float32)
        r0 = f0 * c - f1 * s
        r1 = f0 * s + f1 * c
    else:
        c = f0
        s = f0
        r0 = f0
        r1 = f1
    return x, f, f0, f1, r0, r1, c, s


@triton.jit
def _load_feat(X, COS, SIN, base, offs, N, stride_n, KIND: tl.constexpr, ROPE: tl.constexpr,
               ROWS: tl.constexpr, D: tl.constexpr):
    """Raw tile, features (zero on rows past N), their halves and the rotated halves (and cos/sin)."""
    D2: tl.constexpr = D // 2
    mask = offs < N
    x = tl.load(X + base + offs[:, None] * stride_n + tl.arange(0, D)[None, :], mask=mask[:, None], other=0.0)
    c = x
    s = x
    if ROPE:
        cs_off = offs[:, None] * D2 + tl.arange(0, D2)[None, :]
        c = tl.load(COS + cs_off, mask=mask[:, None], other=0.0)
        s = tl.load(SIN + cs_off, mask=mask[:, None], other=0.0)
    return _feat_halves(x, c, s, mask, KIND, ROPE, ROWS, D)


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _kv_tile(K, V, COS, SIN, k_base, v_base, offs, N, stride_kn, stride_vn, KIND: tl.constexpr, ROPE: tl.constexpr,
             BLOCK: tl.constexpr, D: tl.constexpr):
    """The K/V pass's tile: feature halves, rotated halves and V (rows past N are zeros)."""
    _x, _f, f0, f1, r0, r1, _c, _s = _load_feat(K, COS, SIN, k_base, offs, N, stride_kn, KIND, ROPE, BLOCK, D)
    v = tl.load(V + v_base + offs[:, None] * stride_vn + tl.arange(0, D)[None, :], mask=offs[:, None] < N, other=0.0)
    return f0, f1, r0, r1, v


@triton.jit
def _fwd_state_kernel(
    K, V, COS, SIN, PART,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, N, CHUNK,
    D: tl.constexpr, KIND: tl.constexpr, ROPE: tl.constexpr, NATIVE_MODE: tl.constexpr, STATE_SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Partial state of one token chunk (half layout); ``STATE_SPLIT``: the features' lo parts in the dots."""
    D2: tl.constexpr = D // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    nsplit = tl.num_programs(0)
    k_base = _head_base(bh, H, stride_kb, stride_kh)
    v_base = _head_base(bh, H, stride_vb, stride_vh)
    acc0 = tl.zeros([D2, D], dtype=tl.float32)
    acc1 = tl.zeros([D2, D], dtype=tl.float32)
    # normaliser partials are kept per row and reduced once after the loop (no cross-warp sync per tile)
    za0 = tl.zeros([BLOCK, D2], dtype=tl.float32)
    za1 = tl.zeros([BLOCK, D2], dtype=tl.float32)
    start = pid * CHUNK
    for s in range(start, tl.minimum(start + CHUNK, N), BLOCK):
        offs = s + tl.arange(0, BLOCK)
        f0, f1, r0, r1, v = _kv_tile(K, V, COS, SIN, k_base, v_base, offs, N, stride_kn, stride_vn, KIND, ROPE,
                                     BLOCK, D)
        za0 += f0
        za1 += f1
        acc0 = _mm(tl.trans(r0), v, acc0, NATIVE_MODE, STATE_SPLIT, False)
        acc1 = _mm(tl.trans(r1), v, acc1, NATIVE_MODE, STATE_SPLIT, False)
    _store_state(PART, bh.to(tl.int64) * nsplit + pid, acc0, acc1, tl.sum(za0, 0), tl.sum(za1, 0), D2, D)


@triton.jit
def _out_tile(f0, f1, r0, r1, s0h, s0l, s1h, s1l, z0, z1, eps_n, F32_MODE: tl.constexpr, F32_SPLIT: tl.constexpr,
              ROWS: tl.constexpr, D: tl.constexpr):
    """Output rows ``phi(q) S / (phi(q) . z + eps)`` from the feature halves and the split state halves."""
    den = tl.sum(f0 * z0[None, :], 1) + tl.sum(f1 * z1[None, :], 1) + eps_n
    num = tl.zeros([ROWS, D], dtype=tl.float32)
    num = _mm_pre(r0, s0h, s0l, num, F32_MODE, F32_SPLIT, F32_SPLIT)
    num = _mm_pre(r1, s1h, s1l, num, F32_MODE, F32_SPLIT, F32_SPLIT)
    return num * (1.0 / den)[:, None]  # a reciprocal per row, not a division per element


@triton.jit
def _fwd_out_kernel(
    Q, Out, COS, SIN, S,
    stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
    H, N, CHUNK, eps_n, inv_n,
    D: tl.constexpr, KIND: tl.constexpr, ROPE: tl.constexpr, F32_MODE: tl.constexpr, F32_SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Output rows of one token chunk."""
    D2: tl.constexpr = D // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    s0, s1, z0, z1 = _load_state(S, bh, inv_n, D2, D)
    s0h, s0l = _split_b(s0, F32_MODE, F32_SPLIT)
    s1h, s1l = _split_b(s1, F32_MODE, F32_SPLIT)
    q_base = _head_base(bh, H, stride_qb, stride_qh)
    o_base = _head_base(bh, H, stride_ob, stride_oh)
    start = pid * CHUNK
    for s in range(start, tl.minimum(start + CHUNK, N), BLOCK):
        offs = s + tl.arange(0, BLOCK)
        _x, _f, f0, f1, r0, r1, _c, _s = _load_feat(Q, COS, SIN, q_base, offs, N, stride_qn, KIND, ROPE, BLOCK, D)
        out = _out_tile(f0, f1, r0, r1, s0h, s0l, s1h, s1l, z0, z1, eps_n, F32_MODE, F32_SPLIT, BLOCK, D)
        tl.store(Out + o_base + offs[:, None] * stride_on + tl.arange(0, D)[None, :], out.to(Out.dtype.element_ty),
                 mask=offs[:, None] < N)


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_q_kernel(
    Q, DO, DQ, COS, SIN, S, DPART,
    stride_qb, stride_qh, stride_qn, stride_db, stride_dh, stride_dn, stride_gb, stride_gh, stride_gn,
    H, N, CHUNK, eps_n, inv_n,
    D: tl.constexpr, KIND: tl.constexpr, ROPE: tl.constexpr, NATIVE_MODE: tl.constexpr, F32_MODE: tl.constexpr,
    F32_SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    D2: tl.constexpr = D // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    nsplit = tl.num_programs(0)
    s0, s1, z0, z1 = _load_state(S, bh, inv_n, D2, D)
    q_base = _head_base(bh, H, stride_qb, stride_qh)
    do_base = _head_base(bh, H, stride_db, stride_dh)
    dq_base = _head_base(bh, H, stride_gb, stride_gh)
    ds0 = tl.zeros([D2, D], dtype=tl.float32)
    ds1 = tl.zeros([D2, D], dtype=tl.float32)
    dza0 = tl.zeros([BLOCK, D2], dtype=tl.float32)
    dza1 = tl.zeros([BLOCK, D2], dtype=tl.float32)
    start = pid * CHUNK
    for s in range(start, tl.minimum(start + CHUNK, N), BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs[:, None] < N
        x, f, f0, f1, r0, r1, c, sn = _load_feat(Q, COS, SIN, q_base, offs, N, stride_qn, KIND, ROPE, BLOCK, D)
        g = tl.load(DO + do_base + offs[:, None] * stride_dn + tl.arange(0, D)[None, :], mask=mask, other=0.0)
        den = tl.sum(f0 * z0[None, :], 1) + tl.sum(f1 * z1[None, :], 1) + eps_n
        num = tl.zeros([BLOCK, D], dtype=tl.float32)
        num = _mm(r0, s0, num, F32_MODE, F32_SPLIT, F32_SPLIT)
        num = _mm(r1, s1, num, F32_MODE, F32_SPLIT, F32_SPLIT)
        inv = 1.0 / den
        dden = -tl.sum(g.to(tl.float32) * num, 1) * inv * inv
        # d(rotated features) = (g @ S^T) / den, kept per half
        dr0 = _mm(g, tl.trans(s0), tl.zeros([BLOCK, D2], dtype=tl.float32), NATIVE_MODE, False, True) * inv[:, None]
        dr1 = _mm(g, tl.trans(s1), tl.zeros([BLOCK, D2], dtype=tl.float32), NATIVE_MODE, False, True) * inv[:, None]
        if ROPE:
            da0 = dr0 * c + dr1 * sn
            da1 = dr1 * c - dr0 * sn
        else:
            da0 = dr0
            da1 = dr1
        da0 += dden[:, None] * z0[None, :]
        da1 += dden[:, None] * z1[None, :]
        da = _interleave(da0, da1, BLOCK, D2)
        dq = _feature_bwd(x, f, da, KIND)
        tl.store(DQ + dq_base + offs[:, None] * stride_gn + tl.arange(0, D)[None, :], dq.to(DQ.dtype.element_ty),
                 mask=mask)
        # dS += (r / den)^T @ g ; dz += sum_i dden_i f_i
        ds0 = _mm(tl.trans(r0 * inv[:, None]), g, ds0, NATIVE_MODE, True, False)
        ds1 = _mm(tl.trans(r1 * inv[:, None]), g, ds1, NATIVE_MODE, True, False)
        dza0 += f0 * dden[:, None]
        dza1 += f1 * dden[:, None]
    _store_state(DPART, bh.to(tl.int64) * nsplit + pid, ds0, ds1, tl.sum(dza0, 0), tl.sum(dza1, 0), D2, D)


@triton.jit
def _bwd_kv_kernel(
    K, V, DK, DV, COS, SIN, DS,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gn,
    H, N, CHUNK, inv_n,
    D: tl.constexpr, KIND: tl.constexpr, ROPE: tl.constexpr, NATIVE_MODE: tl.constexpr, F32_MODE: tl.constexpr,
    F32_SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    D2: tl.constexpr = D // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    # true dS = dS_mean / N and dz = dz_mean / N (see the module docstring)
    ds0, ds1, dz0, dz1 = _load_state(DS, bh, inv_n, D2, D)
    k_base = _head_base(bh, H, stride_kb, stride_kh)
    v_base = _head_base(bh, H, stride_vb, stride_vh)
    g_base = _head_base(bh, H, stride_gb, stride_gh)
    start = pid * CHUNK
    for s in range(start, tl.minimum(start + CHUNK, N), BLOCK):
        offs = s + tl.arange(0, BLOCK)
        mask = offs[:, None] < N
        x, f, f0, f1, r0, r1, c, sn = _load_feat(K, COS, SIN, k_base, offs, N, stride_kn, KIND, ROPE, BLOCK, D)
        v = tl.load(V + v_base + offs[:, None] * stride_vn + tl.arange(0, D)[None, :], mask=mask, other=0.0)
        dr0 = _mm(v, tl.trans(ds0), tl.zeros([BLOCK, D2], dtype=tl.float32), NATIVE_MODE, False, True)
        dr1 = _mm(v, tl.trans(ds1), tl.zeros([BLOCK, D2], dtype=tl.float32), NATIVE_MODE, False, True)
        if ROPE:
            db0 = dr0 * c + dr1 * sn
            db1 = dr1 * c - dr0 * sn
        else:
            db0 = dr0
            db1 = dr1
        db0 += dz0[None, :]
        db1 += dz1[None, :]
        dk = _feature_bwd(x, f, _interleave(db0, db1, BLOCK, D2), KIND)
        dv = tl.zeros([BLOCK, D], dtype=tl.float32)
        dv = _mm(r0, ds0, dv, F32_MODE, F32_SPLIT, F32_SPLIT)
        dv = _mm(r1, ds1, dv, F32_MODE, F32_SPLIT, F32_SPLIT)
        out_off = g_base + offs[:, None] * stride_gn + tl.arange(0, D)[None, :]
        tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------
# Tiles per Triton pass (docs/lab/kernels-notes.md has the measurements behind them). Forward: 32-token tiles,
# 4 warps, 3 stages. Backward: 64 x 8 warps x 2 stages (3 stages overflow shared memory); a config that does
# not fit a card is retried smaller (launch.fitted). Every Triton pass runs _PROGRAMS_PER_SM programs per SM
# (programs per head = that times SMs / heads).
_FWD_CFG = {"BLOCK": 32, "num_warps": 4, "num_stages": 3}
_BWD_CFG = {"BLOCK": 64, "num_warps": 8, "num_stages": 2}
_PROGRAMS_PER_SM = 2
# The Gluon passes (sm_90): 8 warps, a ring of 3 TMA slots, one program per SM; the output pass stores its
# tiles through TMA.
_GLUON_STATE = {"num_warps": 8, "stages": 3, "programs_per_sm": 1}
_GLUON_OUT = {"num_warps": 8, "stages": 3, "programs_per_sm": 1, "out_tma": True}


def _modes(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"NATIVE_MODE": 0, "F32_MODE": 0, "F32_SPLIT": False}
    if dtype == torch.float16:
        # measured in the interpreter: splitting the fp32 operands changes the error by <10%; kept off
        return {"NATIVE_MODE": 1, "F32_MODE": 1, "F32_SPLIT": False}
    return {"NATIVE_MODE": 2, "F32_MODE": 1, "F32_SPLIT": False}


def _chunks(n: int, bh: int, device: torch.device, block: int = 128, per_sm: float = _PROGRAMS_PER_SM) -> tuple[int, int]:
    """(programs per head, tokens per program) for the chunked passes."""
    if device.type == "cuda":
        target = max(1, int(per_sm * sm_count(device)) // max(bh, 1))
    else:
        target = 2
    chunk = cdiv(cdiv(n, target), block) * block
    return cdiv(n, chunk), chunk


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _rope_args(cos, sin, n, d, device):
    if cos is None:
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        return dummy, dummy, False
    if cos.shape != (n, d // 2) or sin.shape != (n, d // 2):
        raise ValueError(f"cos/sin must be (N, D/2) = ({n}, {d // 2}); got {tuple(cos.shape)}, {tuple(sin.shape)}")
    # tables stay in the half dtype they come in (half the traffic: a caller's choice; fp32 by default)
    dt = cos.dtype if cos.dtype in (torch.float16, torch.bfloat16) and sin.dtype == cos.dtype else torch.float32
    return cos.to(device=device, dtype=dt).contiguous(), sin.to(device=device, dtype=dt).contiguous(), True


def _state_pass(k, v, kind: int, cos, sin, rope: bool, split: bool = False):
    """The K/V pass: the summed state ``(B*H, D*D + D)`` (sum units) in the half layout (even rows, odd
    rows, then z), and the pass's chunking. The Gluon pass where it can run; ``split``: the Triton pass with
    the features' lo parts in the dots (the backward's recompute)."""
    b, h, n, d = k.shape
    if not split and (lg := _gluon(cos if rope else None, k, v)):
        cfg = _GLUON_STATE
        nsplit, chunk = _chunks(n, b * h, k.device, block=lg.BLOCK, per_sm=cfg["programs_per_sm"])
        part = lg.state_pass_gluon(k, v, cos, sin, rope, kind, nsplit, chunk, cfg["num_warps"], cfg["stages"])
        return part, nsplit, chunk
    modes = _modes(k.dtype)
    nsplit, chunk = _chunks(n, b * h, k.device)
    part = torch.empty((b * h, nsplit, d * d + d), dtype=torch.float32, device=k.device)
    consts = dict(D=d, KIND=kind, ROPE=rope, NATIVE_MODE=modes["NATIVE_MODE"],
                  STATE_SPLIT=bool(split) and modes["NATIVE_MODE"] != 0)
    fitted(_fwd_state_kernel, (nsplit, b * h), (k, v, cos, sin, part, *_strides(k), *_strides(v), h, n, chunk), consts,
           _FWD_CFG)
    return part.sum(1), nsplit, chunk


def _gluon(cos, *xs: torch.Tensor):
    """:mod:`kernels.linear_gluon` where it can run these inputs (an sm_90 card, bf16/fp16, D 64/128,
    contiguous aligned tensors), else None: the Triton pass computes the same."""
    if INTERPRET or xs[0].device.type != "cuda":
        return None
    try:
        from salad_bench.kernels import linear_gluon
    except ImportError:  # a Triton without Gluon
        return None
    return linear_gluon if linear_gluon.gluon_supported(cos, *xs) is None else None


def _forward(q, k, v, kind: int, cos, sin, rope: bool, eps: float):
    """Output and the summed state (see :func:`_state_pass`)."""
    b, h, n, d = q.shape
    modes = _modes(q.dtype)
    state, nsplit, chunk = _state_pass(k, v, kind, cos, sin, rope)
    if lg := _gluon(cos if rope else None, q):
        cfg = _GLUON_OUT
        nsplit, chunk = _chunks(n, b * h, q.device, block=lg.BLOCK, per_sm=cfg["programs_per_sm"])
        out = lg.out_pass_gluon(q, state, cos, sin, rope, kind, eps, nsplit, chunk, cfg["num_warps"], cfg["stages"],
                                cfg["out_tma"])
        return out, state
    out = token_major(b, h, n, d, q.dtype, q.device)
    consts = dict(D=d, KIND=kind, ROPE=rope, F32_MODE=modes["F32_MODE"], F32_SPLIT=modes["F32_SPLIT"])
    fitted(_fwd_out_kernel, (nsplit, b * h),
           (q, out, cos, sin, state, *_strides(q), *_strides(out), h, n, chunk, eps / n, 1.0 / n), consts, _FWD_CFG)
    return out, state


def _backward(do, q, k, v, kind: int, cos, sin, rope: bool, eps: float, state):
    b, h, n, d = q.shape
    modes = _modes(q.dtype)
    do = do if do.stride(-1) == 1 else do.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    nsplit, chunk = _chunks(n, b * h, q.device)
    dpart = torch.empty((b * h, nsplit, d * d + d), dtype=torch.float32, device=q.device)
    dq = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    fitted(
        _bwd_q_kernel, (nsplit, b * h),
        (q, do, dq, cos, sin, state, dpart, *_strides(q), *_strides(do), *_strides(dq), h, n, chunk, eps / n, 1.0 / n),
        dict(D=d, KIND=kind, ROPE=rope, **modes), _BWD_CFG,
    )
    ds = dpart.sum(1)
    dk = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    fitted(
        _bwd_kv_kernel, (nsplit, b * h),
        (k, v, dk, dv, cos, sin, ds, *_strides(k), *_strides(v), *_strides(dk), h, n, chunk, 1.0 / n),
        dict(D=d, KIND=kind, ROPE=rope, **modes), _BWD_CFG,
    )
    return dq, dk, dv


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, kind, rope, eps):
        out, state = _forward(q, k, v, kind, cos, sin, rope, eps)
        ctx.save_for_backward(q, k, v, cos, sin, state)
        ctx.meta = (kind, rope, eps)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cos, sin, state = ctx.saved_tensors
        kind, rope, eps = ctx.meta
        if q.dtype != torch.float32:
            # the forward's state rounds the features to fp16/bf16 in its dots, and dq subtracts two nearly
            # equal terms built from it: recomputed with the features' lo parts (docs/lab/kernels-notes.md)
            state = _state_pass(k, v, kind, cos, sin, rope, split=True)[0]
        dq, dk, dv = _backward(dout, q, k, v, kind, cos, sin, rope, eps, state)
        return dq, dk, dv, None, None, None, None, None


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "relu",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention ``(B, H, N, D)`` in and out (q's dtype); differentiable in q, k, v (not cos/sin).
    The output is a view of a token-major ``(B, N, H, D)`` buffer, whatever the inputs' layout.

    ``kind``: ``relu`` | ``elu`` (elu + 1) | ``softmax``; ``cos, sin``: ``(N, D/2)`` RoPE tables or None.
    Raises :class:`Unsupported` for a device, dtype or head_dim it cannot run.
    """
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # no graph to record: skip autograd's cost, and on a signature seen before, most of the host's
        if (plan := _plan(q, k, v, kind, cos, sin, eps)) is not None:
            return plan(q, k, v)
        q, k, v, cos_t, sin_t, rope, kind_id = _prepare(q, k, v, kind, cos, sin)
        return _forward(q, k, v, kind_id, cos_t, sin_t, rope, float(eps))[0]
    q, k, v, cos_t, sin_t, rope, kind_id = _prepare(q, k, v, kind, cos, sin)
    return _LinearAttention.apply(q, k, v, cos_t, sin_t, kind_id, rope, float(eps))


# No-grad forwards through both Gluon passes, per input signature (the host's time per call through the
# general path was longer than the card's; docs/lab/kernels-notes.md). The key holds everything the passes'
# launches depend on, the tables' addresses among them (their descriptors are built once). False: no plan
# for that signature.
_PLANS: dict = {}


def _plan(q, k, v, kind: str, cos, sin, eps: float):
    """A callable ``(q, k, v) -> out`` for this signature, or None (the general path then runs)."""
    if q.device.type != "cuda" or INTERPRET:
        return None
    tables = None if cos is None or sin is None else (
        cos.data_ptr(), sin.data_ptr(), cos.shape, sin.shape, cos.stride(), sin.stride(), cos.dtype, sin.dtype,
        cos.device, sin.device)
    key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device,
           v.device, (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15, kind, eps, tables, torch.cuda.current_device())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(q, k, v, kind, cos, sin, eps)
        if len(_PLANS) >= 32:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan or None


def _make_plan(q, k, v, kind: str, cos, sin, eps: float):
    """Both Gluon passes built for these inputs, or False where the general path must run: inputs it
    would copy or convert, a card or layout the Gluon passes do not take."""
    qp, kp, vp, cos_t, sin_t, rope, kind_id = _prepare(q, k, v, kind, cos, sin)  # raises on bad input
    if qp is not q or kp is not k or vp is not v or (rope and (cos_t is not cos or sin_t is not sin)):
        return False
    if not (_gluon(cos_t if rope else None, k, v) and (lg := _gluon(cos_t if rope else None, q))):
        return False
    b, h, n, _ = q.shape
    kv_cfg, out_cfg = _GLUON_STATE, _GLUON_OUT
    kv = lg.KVPass(k, cos_t, sin_t, rope, kind_id, *_chunks(n, b * h, k.device, block=lg.BLOCK,
                                                            per_sm=kv_cfg["programs_per_sm"]),
                   kv_cfg["num_warps"], kv_cfg["stages"])
    out = lg.OutPass(q, cos_t, sin_t, rope, kind_id, float(eps), *_chunks(n, b * h, q.device, block=lg.BLOCK,
                                                                       per_sm=out_cfg["programs_per_sm"]),
                     out_cfg["num_warps"], out_cfg["stages"], out_cfg["out_tma"])
    return lambda q, k, v: out(q, kv(k, v))


def _prepare(q, k, v, kind: str, cos, sin):
    """Checked inputs (last dim contiguous), the RoPE tables as the kernels take them, and the kind's id."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of relu, elu, softmax; got {kind!r}")
    check_qkv(q, k, v, "linear-attention", SUPPORTED_HEAD_DIMS)
    d = q.shape[-1]
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin, or neither")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos_t, sin_t, rope = _rope_args(cos, sin, q.shape[2], d, q.device)
    return q, k, v, cos_t, sin_t, rope, _KINDS[kind]
