"""``radial``: Radial Attention (Li et al., arXiv 2506.19852; code: mit-han-lab/radial-attention).

A static spatio-temporal mask whose density decays with temporal distance, O(n log n) overall. For a
query in frame ``i`` and a key in frame ``j`` (``d = |i - j|``), with ``s_q, s_k`` their raster
indices inside the frame (``S = H * W`` tokens per frame, ``P = 2 ** S.bit_length()``), following the
reference ``gen_log_mask_shrinked`` for Wan:

* attention sink: keys in the first ``sink_frames`` frames are always kept (Wan: frame 0);
* ``d <= dense_band`` (1): the whole frame pair is kept;
* otherwise, band ``g = d.bit_length()`` (d = 2-3 -> 2, 4-7 -> 3, 8-15 -> 4, ...) has decay length
  ``L = P / 2**g`` and keeps the spatial diagonal ``|s_q - s_k| <= W`` with
  ``W = max(L * decay_factor, min_window)``: each band doubling in distance halves the window;
* once ``L < min_window`` the window cannot shrink below the block size, so density keeps halving by
  skipping frames instead: only frame pairs with ``d % (min_window // L) == 0`` are kept.

The token mask is never built at full size: each raster block is cut at frame boundaries into
segments, the rule is evaluated on (query segment, key segment) interval pairs, and a tile is kept
iff it holds at least one kept token pair (the reference instead keeps a 128 x 128 block when most of
its columns are over a third full, ``shrinkMaskStrict``; ours is the conservative superset). The
block map depends only on grid, N, blocks and knobs, and is cached.

Knobs (defaults, provenance):

* ``decay_factor`` None: None maps ``sparsity`` to it, the value (searched on a log scale) whose
  block density is closest to ``1 - sparsity``; the reference uses 1 by default and 0.2 in its Wan
  1x-length script. ``sparsity == 0`` with no ``decay_factor`` is served by the full layout.
* ``sink_frames`` 1, ``dense_band`` 1 (the reference's Wan rule: frame 0 and ``|Δt| <= 1`` dense);
  ``min_window`` 128 (the reference's block size, which is also its hard-coded split threshold).
* ``dense_first_layers`` / ``dense_first_steps`` 0; the reference Wan script keeps 1 layer and 12
  of 50 steps dense (``dense_layers=1``, ``dense_timesteps=12``). See ``methods/_warmup.py``.

Reachable sparsity: the sink and the dense band are fixed, so density cannot drop below roughly
``(sink_frames + 2 * dense_band + 1) / T`` plus the narrowest far bands. With the default 128 x 64
tiles this floor is 1.0 at T = 4 (16 x 18 frames), 0.72 at T = 16, 0.40 for Wan 480p (21 x 30 x 52),
0.28 for Wan 720p (21 x 45 x 80) and 0.22 for HunyuanVideo 720p (33 x 45 x 80): Radial pays off on
long videos. Targets past the floor give the floor, with a warning (``extra["min_density"]``). At
very large ``decay_factor`` far bands become whole frame pairs except frames skipped by the split
rule, so 1.0 may be out of reach for long videos; ``sparsity == 0`` therefore uses the full layout.

FLOPs: attention ``4 * kept token pairs * D``; selection none (static, cached mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from salad_bench.kernels import block_sparse_attention, resolve_backend
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.methods._warmup import WarmupConfig, WarmupMethod
from salad_bench.methods.base import METHODS, AttnContext, check_count, check_range

_FLOOR = 2.0**-30  # a decay factor small enough that every far window is min_window


@dataclass(frozen=True)
class RadialConfig(WarmupConfig):
    decay_factor: float | None = None
    sink_frames: int = 1
    dense_band: int = 1
    min_window: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay_factor is not None:
            check_range("decay_factor", self.decay_factor, 0.0, float("inf"), lo_open=True, hi_open=True)
        check_count("sink_frames", self.sink_frames)
        check_count("dense_band", self.dense_band)
        check_count("min_window", self.min_window, 1)


def band_rule(
    dist: torch.Tensor, frame_tokens: int, decay_factor: float, min_window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For frame distances ``dist >= 1`` (int tensor): (frame pair kept?, diagonal half-width W)."""
    p = float(2 ** int(frame_tokens).bit_length())
    g = torch.floor(torch.log2(dist.clamp(min=1).double())) + 1  # bit_length; exact for small ints
    decay = p / torch.pow(2.0, g)
    width = torch.clamp(decay * decay_factor, min=float(min_window))
    split = torch.clamp(torch.floor(min_window / decay), min=1).long()
    keep = (decay >= min_window) | (dist % split == 0)
    return keep, width


def _segments(n: int, block: int, frame: int, device) -> tuple[torch.Tensor, ...]:
    """Cut raster blocks at frame boundaries: (block id, frame, first, last in-frame index)."""
    starts = torch.unique(
        torch.cat([torch.arange(0, n, block, device=device), torch.arange(0, n, frame, device=device)])
    )
    ends = torch.cat([starts[1:], torch.tensor([n], device=device)]) - 1
    f = starts // frame
    return starts // block, f, starts - f * frame, ends - f * frame


class _Segments:
    """Raster blocks of both sides cut at frame boundaries, and their frame distances (cached)."""

    def __init__(self, grid: tuple[int, int, int], block_q: int, block_k: int, device) -> None:
        self.n, self.frame, self.frames = math.prod(grid), grid[1] * grid[2], grid[0]
        self.shape = (cdiv(self.n, block_q), cdiv(self.n, block_k))
        self.qb, qf, self.q0, self.q1 = _segments(self.n, block_q, self.frame, device)
        self.kb, self.kf, self.k0, self.k1 = _segments(self.n, block_k, self.frame, device)
        self.dist = (qf[:, None] - self.kf[None, :]).abs()

    def tile_map(self, decay_factor: float, sink_frames: int, dense_band: int, min_window: int) -> torch.Tensor:
        d = torch.arange(self.frames, device=self.dist.device)
        keep_tab, width_tab = band_rule(d, self.frame, decay_factor, min_window)  # per frame distance
        keep_tab = keep_tab | (d <= dense_band)
        width_tab = torch.where(d <= dense_band, float(self.frame), width_tab)
        width = width_tab[self.dist]
        band = (self.k0[None, :] <= self.q1[:, None] + width) & (self.k1[None, :] >= self.q0[:, None] - width)
        kept = (self.kf[None, :] < sink_frames) | (keep_tab[self.dist] & band)
        tiles = torch.zeros(self.shape, dtype=torch.int32, device=kept.device)
        tiles.index_put_(
            (self.qb[:, None].expand_as(kept), self.kb[None, :].expand_as(kept)), kept.int(), accumulate=True
        )
        return tiles > 0


def radial_tile_map(
    grid: tuple[int, int, int],
    block_q: int,
    block_k: int,
    decay_factor: float,
    sink_frames: int = 1,
    dense_band: int = 1,
    min_window: int = 128,
    device="cpu",
) -> torch.Tensor:
    """Bool ``(Mq, Mk)``: tiles holding at least one pair kept by the radial rule (module docstring)."""
    return _Segments(grid, block_q, block_k, device).tile_map(decay_factor, sink_frames, dense_band, min_window)


def radial_token_mask(
    grid: tuple[int, int, int], decay_factor: float, sink_frames: int = 1, dense_band: int = 1, min_window: int = 128
) -> torch.Tensor:
    """The token-level ``(N, N)`` mask, for tests and plots on tiny grids only."""
    n, frame = math.prod(grid), grid[1] * grid[2]
    idx = torch.arange(n)
    f, s = idx // frame, idx % frame
    dist = (f[:, None] - f[None, :]).abs()
    keep_pair, width = band_rule(dist, frame, decay_factor, min_window)
    near = (s[:, None] - s[None, :]).abs() <= width
    return (f[None, :] < sink_frames) | (dist <= dense_band) | (keep_pair & near)


@METHODS.register("radial", family="training_free")
class Radial(WarmupMethod):
    """Static mask: first frame sink, dense neighbours, windows halving per temporal band (arXiv 2506.19852)."""

    Config = RadialConfig
    family = "training_free"
    needs_grid = True
    config: RadialConfig

    def __init__(self, config: RadialConfig, **kw) -> None:
        super().__init__(config, **kw)
        self._segs: dict[tuple, _Segments] = {}
        self._maps: dict[tuple, torch.Tensor] = {}
        self._decay: dict[tuple, float] = {}
        self._layouts: dict[tuple, tuple[BlockLayout, dict]] = {}

    def tile_map(self, grid, decay_factor: float, device="cpu") -> torch.Tensor:
        c = self.config
        geo = (tuple(grid), c.block_q, c.block_k, str(device))
        key = (*geo, decay_factor)
        if key not in self._maps:
            if geo not in self._segs:
                self._segs[geo] = _Segments(grid, c.block_q, c.block_k, device)
            self._maps[key] = self._segs[geo].tile_map(decay_factor, c.sink_frames, c.dense_band, c.min_window)
        return self._maps[key]

    def density(self, grid, decay_factor: float, device="cpu") -> float:
        return float(self.tile_map(grid, decay_factor, device).float().mean().item())

    def decay_for_sparsity(self, grid, sparsity: float, device="cpu") -> float:
        """Bisection on ``log2(decay_factor)``: the value whose density is closest to ``1 - sparsity``."""
        c = self.config
        key = (tuple(grid), c.block_q, c.block_k, sparsity, str(device))
        if key not in self._decay:
            target, frame = 1.0 - sparsity, grid[1] * grid[2]
            p, gmax = 2.0 ** frame.bit_length(), max(grid[0] - 1, 1).bit_length()
            # Below lo every window is min_window (largest decay length is P/4); above hi every window
            # covers the whole frame: the density only changes in between.
            lo, hi = math.log2(c.min_window / (p / 4)) - 1, math.log2(frame * 2**gmax / p) + 1
            for _ in range(14):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.density(grid, 2.0**mid, device) < target else (lo, mid)
            best = min((2.0**lo, 2.0**hi), key=lambda x: (abs(self.density(grid, x, device) - target), -x))
            self._maps = {k: m for k, m in self._maps.items() if k[-1] in (best, _FLOOR)}  # drop search maps
            self._decay[key] = best
        return self._decay[key]

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout:
        b, h, n, _ = q.shape
        c = self.config
        if self.is_dense_call(ctx) or (c.decay_factor is None and c.sparsity == 0.0):
            self._report_extra = {}
            return self.full_layout(q)
        idx, cnt, decay, floor = self._static_layout(tuple(ctx.grid), b, h, n, str(q.device))
        self._report_extra = {"decay_factor": decay, "min_density": floor}
        return BlockLayout(idx, cnt, c.block_q, c.block_k, n)

    @torch._dynamo.assume_constant_result  # a static mask: under torch.compile, built once and baked in
    def _static_layout(self, grid, b: int, h: int, n: int, device: str):
        c = self.config
        key = (grid, b, h, device)
        if key not in self._layouts:
            decay = c.decay_factor if c.decay_factor is not None else self.decay_for_sparsity(grid, c.sparsity, device)
            floor = self.density(grid, _FLOOR, device)
            if c.decay_factor is None:
                self._check_reach(self.density(grid, decay, device), floor, f"grid {tuple(grid)}")
            tiles = self.tile_map(grid, decay, device)
            layout = BlockLayout.from_dense(tiles[None, None].expand(b, h, -1, -1), c.block_q, c.block_k, n)
            self._layouts[key] = (layout, {"decay_factor": decay, "min_density": floor})
        layout, info = self._layouts[key]
        return layout.kv_idx, layout.kv_cnt, info["decay_factor"], info["min_density"]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        layout = self.select(q, k, ctx)
        backend = resolve_backend(self.config.backend, q.device)
        out = block_sparse_attention(q, k, v, layout, backend=backend)
        self._record(layout, backend, ctx, self.is_dense_call(ctx), selection=0.0)
        return out
