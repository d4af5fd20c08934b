"""Two ``(B, H, N, D)`` tensors gathered along the token dim through one index, in one Triton launch.

``gather_pair(k, v, index)`` is ``(k[:, :, index], v[:, :, index])`` for inference: what a caller that poses
its block layout in another token order (tile order, cube order) does to k and v before the block-sparse
forward. One launch reads both tensors' rows (each row ``D`` contiguous elements) and writes them in order;
a token-major input stays token-major (the block-sparse forward reads either through its TMA descriptors),
any other layout comes out contiguous. No autograd: callers that train gather with ``index_select``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from salad_bench.kernels.layout import is_token_major, token_major

__all__ = ["gather_pair"]

_ROWS = 64


@triton.jit
def _gather_pair_kernel(A, B, AO, BO, IDX, H, N,
                        sa_b, sa_h, sa_n, sb_b, sb_h, sb_n, so_b, so_h, so_n,
                        D, DP: tl.constexpr, ROWS: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs = pid * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, DP)[None, :]
    mask = (offs < N)[:, None] & (d < D)
    src = tl.load(IDX + offs, mask=offs < N, other=0).to(tl.int64)[:, None]
    a = tl.load(A + b * sa_b + h * sa_h + src * sa_n + d, mask=mask)
    v = tl.load(B + b * sb_b + h * sb_h + src * sb_n + d, mask=mask)
    dst = b * so_b + h * so_h + offs.to(tl.int64)[:, None] * so_n + d
    tl.store(AO + dst, a, mask=mask)
    tl.store(BO + dst, v, mask=mask)


def _out_like(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, _, d = x.shape
    if is_token_major(x):
        return token_major(b, h, n, d, x.dtype, x.device)
    return torch.empty((b, h, n, d), dtype=x.dtype, device=x.device)


def gather_pair(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a[:, :, index], b[:, :, index])`` for two ``(B, H, N, D)`` tensors of one shape, dtype and device
    (CUDA, or the CPU under ``TRITON_INTERPRET=1``), last dim contiguous; ``index`` int32/int64 of any
    length M with entries in ``0..N-1`` (not checked on the device: an entry outside reads out of bounds).
    Outputs are ``(B, H, M, D)``: token-major where the input is, contiguous otherwise. No autograd."""
    if a.dim() != 4 or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"gather_pair takes two (B, H, N, D) tensors of one shape, dtype and device; got "
                         f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}")
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError(f"gather_pair needs the last dim contiguous (strides {a.stride()}, {b.stride()})")
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64) or index.device != a.device:
        raise ValueError(f"gather_pair's index must be a 1-D int32/int64 tensor on {a.device}; got "
                         f"{index.dtype} of shape {tuple(index.shape)} on {index.device}")
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        raise ValueError("gather_pair has no backward; gather tensors that need gradients with index_select")
    bsz, h, n, d = a.shape
    m = index.numel()
    ao, bo = _out_like(a, m), _out_like(b, m)
    if bo.stride() != ao.stride():
        bo = torch.empty_like(ao)
    if m and bsz * h:
        _gather_pair_kernel[(triton.cdiv(m, _ROWS), bsz * h)](
            a, b, ao, bo, index.contiguous(), h, m, *a.stride()[:3], *b.stride()[:3], *ao.stride()[:3],
            d, DP=triton.next_power_of_2(d), ROWS=_ROWS, num_warps=4,
        )
    return ao, bo
