"""``vsa``: Video Sparse Attention, a trainable coarse-to-fine block-sparse attention.

Paper: "VSA: Faster Video Diffusion with Trainable Sparse Attention" (arXiv 2505.13389); public code in
hao-ai-lab/FastVideo (``fastvideo/attention/backends/video_sparse_attn.py`` and
``fastvideo-kernel``'s ``video_sparse_attn``), read for the details below.

Layout at the boundary: ``q, k, v`` are ``(B, H, N, D)`` with tokens in raster (t-major) order over
``AttnContext.grid = (T, H, W)`` (``needs_grid``); the output is the same shape, in the same order.

    O = O_coarse * gate + O_fine

* Cubes: the latent grid is cut into ``cube`` = 4x4x4 tokens (FastVideo ``VSA_TILE_SIZE``). Cubes on
  a ragged edge of the grid are partial; they are pooled over the tokens they have (FastVideo's
  ``variable_block_sizes``), never over padding.
* Coarse stage: mean-pool Q, K, V per cube; cube-level softmax attention
  ``softmax(Qc Kc^T / sqrt(D)) Vc`` gives ``O_coarse`` per query cube, broadcast to its tokens.
* Selection (mask rule): per (batch, head, query cube) the top ``k = ceil((1 - sparsity) * M)``
  key cubes by cube score (``M`` cubes; at least one; no forced diagonal), exactly FastVideo's
  ``compute_topk``. So ``sparsity`` *is* VSA's own knob: the fraction of cube pairs skipped.
* Fine stage: exact softmax attention from each query to the tokens of its selected cubes, run by
  :func:`kernels.block_sparse_attention` on q, k, v permuted into cube-major ("tile-major") order so a
  cube's tokens are contiguous and a full cube is exactly one 64-token block.
* Gate: FastVideo adds a ``to_gate_compress`` C x C linear on the layer input (no activation, one
  value per token, head and channel) and initialises it to zero when loading a dense checkpoint.
  Here ``gate="linear"``: the same C x C linear (C = heads * head_dim), zero weight and bias, applied
  to ``AttnContext.hidden_states`` ``(B, N, C)`` when the caller has it (the DiT path), otherwise to
  the queries merged over heads ``(B, N, H*D)`` (bare Q/K/V workloads). Zero init makes the untrained
  method *exactly* pure fine attention. ``gate="none"`` adds ``O_coarse`` ungated (FastVideo's path
  when no gate tensor is passed). Not registered as a variant: at sparsity 0 it is not dense by design,
  which the shared contract test must list first (``NOT_DENSE_AT_ZERO``).

Token order (our choice, exact, padding-free): FastVideo pads every cube to 64 slots and tells its
kernel the valid length of each block; our kernels take uniform blocks with no per-block lengths, so
instead the permutation puts all *full* cubes first (cube-major order), then the partial cubes sorted
by size, largest first (ties in cube-major order). Full cubes then map one-to-one onto 64-token
blocks, whatever the grid. On a ragged grid the tail blocks may hold several partial cubes (or a cube
split over two blocks); such a tile (query block, key block) is kept iff some query cube in the query
block selected some key cube in the key block. The fine stage is therefore exactly VSA on every full
cube and a slight superset on the ragged tail; :func:`fine_token_mask` is the exact token mask it
computes. Density is measured from that layout (over ``ceil(N/64)^2`` tiles), not declared.
When every dim of the grid is a multiple of the cube, the layout is VSA's cube mask exactly.

Knobs (defaults, provenance): ``sparsity`` 0.0 (FastVideo ``VSA_sparsity`` default; the runner sets
it); ``cube`` (4, 4, 4) (paper, FastVideo); volume must be one of 16/32/64/128 (a kernel tile);
``gate`` "linear" (FastVideo ``to_gate_compress``); ``backend`` auto (our Triton kernel on CUDA, the
torch reference elsewhere).

What trains (:meth:`VSA.trainable_parameters`): the gate projection (weight and bias). The paper
fine-tunes the whole DiT with VSA in place; those weights belong to the model, not to this module.

FLOPs: fine attention ``4 * kept token pairs * D`` (base report); ``coarse`` = pooling
``3*B*H*N*D`` + cube attention ``4*B*H*M^2*D``; ``gate`` = projection ``2*B*N*C^2`` + multiply-add
``2*B*H*N*D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from salad_bench.kernels import keep_count, resolve_backend, window_means
from salad_bench.kernels.launch import needs_grad
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.methods.base import (
    METHODS,
    AttentionMethod,
    AttnContext,
    MethodConfig,
    check_choice,
    check_range,
    permuted_block_sparse,
)

__all__ = ["CubePartition", "VSA", "VSAConfig", "cube_partition", "fine_token_mask"]

KERNEL_BLOCKS = (16, 32, 64, 128)


@dataclass(frozen=True)
class VSAConfig(MethodConfig):
    cube: tuple[int, int, int] = (4, 4, 4)
    gate: Literal["linear", "none"] = "linear"
    backend: Literal["auto", "triton", "flex", "torch"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.cube) != 3:
            raise ValueError(f"cube={self.cube!r} must be three sizes (t, h, w)")
        for side in self.cube:
            check_range("cube", side, 1, 16)
        check_choice("cube volume", math.prod(self.cube), KERNEL_BLOCKS)
        check_choice("gate", self.gate, ("linear", "none"))
        check_choice("backend", self.backend, ("auto", "triton", "flex", "torch"))


@dataclass(frozen=True)
class CubePartition:
    """How raster tokens map onto cubes and onto the cube-major order the fine stage runs in.

    ``perm[p]``: raster index of the token at cube-major position ``p``; ``inv`` is its inverse.
    ``token_cube[i]``: cube id of raster token ``i`` (ids follow the cube-major order).
    ``cube_sizes``: tokens per cube ``(M,)``. ``overlap``: float ``(Mb, M)``, 1 where 64-token block
    ``b`` of the cube-major order holds tokens of cube ``c``. ``aligned``: every block is one cube.
    """

    perm: torch.Tensor
    inv: torch.Tensor
    token_cube: torch.Tensor
    cube_sizes: torch.Tensor
    overlap: torch.Tensor
    block: int
    aligned: bool
    grid: tuple[int, int, int]
    cube: tuple[int, int, int]
    pool_order: torch.Tensor  # (M,): for cube id c, its index in the grid's natural (t, h, w) cube order
    position_cube: torch.Tensor  # (N,): cube id of the token at cube-major position p (token_cube[perm])
    full_cubes: int  # cubes of ``block`` tokens: positions 0 .. full_cubes * block - 1 hold them in turn

    @property
    def num_cubes(self) -> int:
        return int(self.cube_sizes.numel())


def _edge_sizes(length: int, side: int, device) -> torch.Tensor:
    n = cdiv(length, side)
    return torch.clamp(length - torch.arange(n, device=device) * side, max=side)


_PARTITIONS: dict[tuple, CubePartition] = {}


def cube_partition(grid: tuple[int, int, int], cube: tuple[int, int, int], device) -> CubePartition:
    """Build (and cache) the cube partition of ``grid``; see the module docstring for the order."""
    key = (tuple(grid), tuple(cube), str(device))
    if key in _PARTITIONS:
        return _PARTITIONS[key]
    t, h, w = grid
    ct, ch, cw = cube
    nh, nw = cdiv(h, ch), cdiv(w, cw)
    n, block = t * h * w, math.prod(cube)
    ti = torch.arange(t, device=device)[:, None, None] // ct
    hi = torch.arange(h, device=device)[None, :, None] // ch
    wi = torch.arange(w, device=device)[None, None, :] // cw
    natural = ((ti * nh + hi) * nw + wi).reshape(-1)  # cube id in cube-major order, per raster token
    st, sh, sw = _edge_sizes(t, ct, device), _edge_sizes(h, ch, device), _edge_sizes(w, cw, device)
    nat_sizes = (st[:, None, None] * sh[None, :, None] * sw[None, None, :]).reshape(-1)
    # full cubes first, then partial cubes by size (largest first); stable keeps cube-major ties
    order = torch.sort(block - nat_sizes, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    token_cube = rank[natural]
    perm = torch.sort(token_cube, stable=True).indices  # stable: raster order inside a cube
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n, device=device)
    sizes = nat_sizes[order]
    m, mb = int(sizes.numel()), cdiv(n, block)
    overlap = torch.zeros(mb, m, device=device)
    overlap[torch.arange(n, device=device) // block, token_cube[perm]] = 1.0
    aligned = m == mb and bool((sizes == block).all())
    full = int((sizes == block).sum())
    part = CubePartition(perm, inv, token_cube, sizes, overlap, block, aligned, (t, h, w), (ct, ch, cw), order,
                         token_cube[perm], full)
    _PARTITIONS[key] = part
    return part


def _mean_by_cube(x: torch.Tensor, cube_ids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``(B, H, M, D)`` means of x's tokens by ``cube_ids`` (``sizes[c]`` tokens in cube c), by an fp32
    (fp64 for fp64 x) ``index_add``."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, h, _, d = x.shape
    sums = torch.zeros(b, h, sizes.numel(), d, device=x.device, dtype=work).index_add(2, cube_ids, x.to(work))
    return sums / sizes.to(work)[:, None]


def pool_cubes(x: torch.Tensor, part: CubePartition, backend: str | None = None) -> torch.Tensor:
    """Mean of each cube's tokens: ``(B, H, N, D) -> (B, H, M, D)`` in fp32 (or fp64); differentiable.

    On the Triton ``backend`` at inference one launch reads x once (:func:`kernels.window_means`: the cubes
    in cube-id order, fp32 sums of x's own values). Otherwise, and under autograd, a heads-major or
    token-major ``x`` (every layout the harness and the model pass) is pooled over the grid in two passes:
    one ``avg_pool3d`` that reads it in place as a contiguous ``(N, C, D, H, W)`` view (frames as channels,
    channels innermost) for each frame's ``h x w`` windows, then the windows' means over each cube's
    frames, in fp32. A ragged edge cube averages the tokens it has (every frame of a cube
    has the same window, so the mean of the frames' means is the cube's mean); accumulation is fp32,
    the frame means rounded once to x's dtype. Any other layout, and half types on the CPU (no such
    pooling there), go through an fp32 ``index_add``."""
    if backend == "triton" and x.dtype != torch.float64 and x.stride(-1) == 1 and not needs_grad(x):
        return window_means(x, part.grid, part.cube, part.pool_order)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, h, n, d = x.shape
    t, gh, gw = part.grid
    poolable = x.device.type == "cuda" or x.dtype in (torch.float32, torch.float64)  # no bf16/fp16 on the CPU
    if poolable and x.transpose(1, 2).is_contiguous():  # token-major: channels are the H * D of a token
        cells, lead, chans = x.transpose(1, 2).reshape(b, t, gh, gw, h * d), b, h * d
    elif poolable and x.is_contiguous():
        cells, lead, chans = x.reshape(b * h, t, gh, gw, d), b * h, d
    else:
        return _mean_by_cube(x, part.token_cube, part.cube_sizes)
    ct, ch, cw = part.cube
    # a grid side under a cube is one cell: the window is clipped to it
    frames = F.avg_pool3d(cells, (min(ch, gh), min(cw, gw), 1), stride=(ch, cw, 1), ceil_mode=True)
    # (lead, T, nh, nw, chans): each frame's window means; then each cube's frames, the full cubes as one
    # reduction over a view and a ragged last cube apart (both fp32)
    full = t // ct
    cubes = [frames[:, : full * ct].unflatten(1, (full, ct)).mean(2, dtype=work)] if full else []
    if t > full * ct:
        cubes.append(frames[:, full * ct :].mean(1, keepdim=True, dtype=work))
    pooled = (torch.cat(cubes, 1) if len(cubes) > 1 else cubes[0]).reshape(lead, -1, chans)  # natural (t, h, w) order
    if lead == b:
        pooled = pooled.view(b, -1, h, d).transpose(1, 2)
    else:
        pooled = pooled.view(b, h, -1, d)
    return pooled.index_select(2, part.pool_order)


def pool_cubes_in_order(x: torch.Tensor, part: CubePartition) -> torch.Tensor:
    """:func:`pool_cubes` of an ``x`` whose tokens are already in cube-major order (``x[:, :, perm]``): the
    full cubes are consecutive runs of ``block`` tokens (one fp32-accumulating mean over a view), the
    partial cubes of the tail go through an fp32 ``index_add``."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    head = part.full_cubes * part.block
    full = x[:, :, :head].unflatten(2, (part.full_cubes, part.block)).mean(3, dtype=work)
    if head == x.shape[2]:
        return full
    tail = _mean_by_cube(x[:, :, head:], part.position_cube[head:] - part.full_cubes, part.cube_sizes[part.full_cubes:])
    return torch.cat([full, tail], 2)


def cube_scores(q: torch.Tensor, k: torch.Tensor, part: CubePartition, backend: str | None = None) -> torch.Tensor:
    """Cube-level logits ``(B, H, M, M)``, scaled by ``1/sqrt(D)`` (FastVideo's compression branch)."""
    return pool_cubes(q, part, backend) @ pool_cubes(k, part, backend).transpose(-1, -2) / math.sqrt(q.shape[-1])


def selected_cubes(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Indices ``(B, H, M, k)`` of the top-k key cubes per query cube, sorted ascending."""
    keep = keep_count(sparsity, scores.shape[-1])
    idx = torch.topk(scores, keep, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values


def cube_layout(idx: torch.Tensor, part: CubePartition, n: int) -> BlockLayout:
    """The fine-stage layout over the cube-major sequence (see the module docstring for the rule)."""
    b, h, m, keep = idx.shape
    if part.aligned:  # block i is cube i: the cube selection is the layout
        cnt = torch.full((b, h, m), keep, dtype=torch.int32, device=idx.device)
        return BlockLayout(idx.to(torch.int32).contiguous(), cnt, part.block, part.block, n)
    sel = torch.zeros(b, h, m, m, device=idx.device).scatter_(-1, idx, 1.0)
    tiles = torch.einsum("qc,bhcd,kd->bhqk", part.overlap, sel, part.overlap) > 0
    return BlockLayout.from_dense(tiles, part.block, part.block, n)


def fine_token_mask(layout: BlockLayout, part: CubePartition) -> torch.Tensor:
    """Bool ``(B, H, N, N)`` token mask, in raster order, that the fine stage computes (for tests)."""
    from salad_bench.kernels.reference import token_mask_from_layout

    mask = token_mask_from_layout(layout)  # cube-major order
    return mask[:, :, part.inv][:, :, :, part.inv]


@METHODS.register("vsa", family="trained", traits=("trainable", "headline"))
class VSA(AttentionMethod):
    """Video Sparse Attention: cube-level coarse attention + top-k cube fine attention (arXiv 2505.13389)."""

    Config = VSAConfig
    family = "trained"
    needs_grid = True
    config: VSAConfig

    def __init__(self, config: VSAConfig, **kw) -> None:
        super().__init__(config, **kw)
        width = self.num_heads * self.head_dim
        if config.gate == "linear":
            self.gate_proj = nn.Linear(width, width)
            nn.init.zeros_(self.gate_proj.weight)  # FastVideo zero-fills the new to_gate_compress
            nn.init.zeros_(self.gate_proj.bias)
        self._num_cubes = 0

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What VSA itself adds and trains: the gate projection (none with ``gate="none"``)."""
        return list(self.gate_proj.parameters()) if self.config.gate == "linear" else []

    def partition(self, ctx: AttnContext, device) -> CubePartition:
        if ctx.grid is None:
            raise ValueError(f"{self.name} needs the video grid (T, H, W) in AttnContext.grid")
        return cube_partition(ctx.grid, self.config.cube, device)

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout:
        """Fine-stage layout over the cube-major token order (``partition(ctx).perm``)."""
        part = self.partition(ctx, q.device)
        backend = resolve_backend(self.config.backend, q.device)
        idx = selected_cubes(cube_scores(q, k, part, backend).detach(), self.config.sparsity)
        return cube_layout(idx, part, q.shape[2])

    def gate_value(self, q: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Per-token, per-head, per-channel gate ``(B, H, N, D)``."""
        b, h, n, d = q.shape
        x = ctx.hidden_states
        if x is None:
            x = q.transpose(1, 2).reshape(b, n, h * d)
        elif x.shape != (b, n, h * d):
            raise ValueError(
                f"hidden_states must be (B, N, C) = {(b, n, h * d)} for the VSA gate; got {tuple(x.shape)}"
            )
        g = self.gate_proj(x.to(self.gate_proj.weight.dtype))
        return g.view(b, n, h, d).transpose(1, 2)

    def token_order(self, grid, n: int, device) -> torch.Tensor | None:
        """Cube-major order (``partition.perm``): the fine stage is posed in it, the coarse stage pools
        consecutive runs in it."""
        return cube_partition(tuple(grid), self.config.cube, torch.device(device)).perm

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, h, n, d = q.shape
        part = self.partition(ctx, q.device)
        backend = resolve_backend(self.config.backend, q.device)
        ordered = ctx.token_order is not None  # tokens already cube-major (a model integration did it)
        # coarse stage (differentiable through the pooling)
        pool = (lambda x: pool_cubes_in_order(x, part)) if ordered else (lambda x: pool_cubes(x, part, backend))
        qc, kc, vc = pool(q), pool(k), pool(v)
        scores = qc @ kc.transpose(-1, -2) / math.sqrt(d)
        # per cube in fp32, then broadcast to the tokens in q's dtype: (B, H, N, D), in the tokens' order
        cube_of = part.position_cube if ordered else part.token_cube
        out_c = (torch.softmax(scores, dim=-1) @ vc).to(q.dtype).index_select(2, cube_of)
        # fine stage on the cube-major permutation
        layout = cube_layout(selected_cubes(scores.detach(), self.config.sparsity), part, n)
        coarse_out = self.gate_value(q, ctx).to(q.dtype) * out_c if self.config.gate == "linear" else out_c
        perm = None if ordered else part.perm
        out = permuted_block_sparse(q, k, v, layout, perm, part.inv, backend, residual=coarse_out)
        m, c = part.num_cubes, h * d
        coarse = 3.0 * b * h * n * d + 4.0 * b * h * m * m * d
        gate = (2.0 * b * n * c * c if self.config.gate == "linear" else 0.0) + 2.0 * b * h * n * d
        self._remember(layout, backend, coarse=coarse, gate=gate)
        return out
