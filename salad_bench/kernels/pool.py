"""Means of a ``(B, H, N, D)`` tensor's tokens over the cells of their ``(T, H, W)`` grid, in one Triton launch.

The tokens are the grid in raster order (``n = (t * GH + h) * GW + w``); a window ``(wt, wh, ww)`` cuts
the grid into cells, ragged at its far edges. ``window_means(x, grid, window)`` is each cell's mean in
fp32, ``(B, H, M, D)`` with the cells in raster order of the cell grid (or in the order ``order`` names).
One program sums one cell of one (batch, head): ``wt`` loads of ``wh * ww`` rows, fp32 accumulation, one
division by the cell's token count. It reads x once and writes nothing else (a coarse stage that pools
q, k and v this way moves 3 x N x D elements per head, about 0.1 ms at Wan 480p). No autograd: callers
that train pool with differentiable torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from salad_bench.kernels.layout import cdiv

__all__ = ["cell_count", "window_means"]


@triton.jit
def _window_means_kernel(X, OUT, ORDER, H, T, GH, GW, NH, NW,
                         sx_b, sx_h, sx_n, so_b, so_h, so_m, D,
                         WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, ROWS: tl.constexpr,
                         DP: tl.constexpr, HAS_ORDER: tl.constexpr):
    pos, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cell = tl.load(ORDER + pos) if HAS_ORDER else pos
    ct, rest = cell // (NH * NW), cell % (NH * NW)
    ch, cw = rest // NW, rest % NW
    r = tl.arange(0, ROWS)
    hh, ww = ch * WH + r // WW, cw * WW + r % WW
    rows_ok = (r < WH * WW) & (hh < GH) & (ww < GW)
    d = tl.arange(0, DP)
    d_ok = d < D
    base = X + b * sx_b + h * sx_h
    acc = tl.zeros([DP], dtype=tl.float32)
    for f in tl.static_range(WT):
        tt = ct * WT + f
        tok = ((tt * GH + hh) * GW + ww).to(tl.int64)
        ok = rows_ok & (tok < T * GH * GW)  # a frame past T: every token of it is past N
        x = tl.load(base + tok[:, None] * sx_n + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    count = tl.minimum(WT, T - ct * WT) * tl.minimum(WH, GH - ch * WH) * tl.minimum(WW, GW - cw * WW)
    tl.store(OUT + b * so_b + h * so_h + pos.to(tl.int64) * so_m + d, acc / count.to(tl.float32), mask=d_ok)


def cell_count(grid, window) -> int:
    """Cells of a ``(T, H, W)`` grid cut into ``window``-sized cells, ragged at the far edges."""
    return cdiv(grid[0], window[0]) * cdiv(grid[1], window[1]) * cdiv(grid[2], window[2])


def window_means(x: torch.Tensor, grid: tuple[int, int, int], window: tuple[int, int, int],
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """Each grid cell's mean of ``x``'s tokens: ``(B, H, N, D)`` with ``N = T * GH * GW`` in raster order
    (any strides, last dim contiguous; CUDA, or the CPU under ``TRITON_INTERPRET=1``) to a contiguous fp32
    ``(B, H, M, D)``, ``M = ceil(T/wt) * ceil(GH/wh) * ceil(GW/ww)``. Cells come in raster order of the cell
    grid, or position ``j`` holds cell ``order[j]`` when ``order`` (a 1-D int32/int64 permutation of
    ``0..M-1`` on x's device) is given. A ragged edge cell averages the tokens it has. No autograd."""
    t, gh, gw = (int(s) for s in grid)
    wt, wh, ww = (int(s) for s in window)
    if x.dim() != 4 or x.shape[2] != t * gh * gw:
        raise ValueError(f"window_means takes (B, H, N, D) with N = T*H*W = {t * gh * gw} tokens of grid {grid}; "
                         f"got {tuple(x.shape)}")
    if min(t, gh, gw) < 1 or min(wt, wh, ww) < 1:
        raise ValueError(f"window_means needs a non-empty grid and window; got grid {grid}, window {window}")
    if x.stride(-1) != 1:
        raise ValueError(f"window_means needs the last dim contiguous (strides {x.stride()})")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("window_means has no backward; pool tensors that need gradients with torch ops")
    b, h, _, d = x.shape
    m = cell_count((t, gh, gw), (wt, wh, ww))
    if order is not None and (order.dim() != 1 or order.numel() != m or order.device != x.device
                              or order.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"window_means' order must be a 1-D int32/int64 tensor of the {m} cells on {x.device}; got "
                         f"{order.dtype} of shape {tuple(order.shape)} on {order.device}")
    out = torch.empty(b, h, m, d, device=x.device, dtype=torch.float32)
    if b * h and m:
        _window_means_kernel[(m, b * h)](
            x, out, order.contiguous() if order is not None else out, h, t, gh, gw, cdiv(gh, wh), cdiv(gw, ww),
            *x.stride()[:3], *out.stride()[:3], d,
            WT=wt, WH=wh, WW=ww, ROWS=triton.next_power_of_2(wh * ww), DP=triton.next_power_of_2(d),
            HAS_ORDER=order is not None, num_warps=4,
        )
    return out
