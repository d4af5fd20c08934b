"""``svg``: Sparse VideoGen (Xi et al., arXiv 2502.01776; code: svg-project/Sparse-VideoGen).

Each head is classified online, per call, as *spatial* (attends within its own and adjacent frames)
or *temporal* (attends to the same spatial position across frames), and runs the matching static
mask. Both masks are one pattern, a band plus an attention sink, applied in two token orders:

* spatial heads, raster (frame-major) order: query ``i`` keeps keys ``j`` with ``|i - j| <= w``, and
  keys in the first ``sink_frames`` frames (``j < sink_frames * S``, S = H*W tokens per frame);
* temporal heads, the transposed (spatial-major) order ``p = s * T + f`` for token ``(f, s)``: the
  same band and sink on ``p``. In raster order this pattern is strided; the paper's *token
  transpose* makes it block-dense. We do what SVG's Wan code does: permute q, k, v of temporal heads
  spatial-major, run the block-sparse kernel with the one shared layout, permute the output back.
  As in that code the sink of a temporal head is the first ``sink_frames * S`` transposed tokens
  (the first ``sink_frames * S / T`` spatial positions of every frame), not frame 0.

Head classification (the paper's "online profiling"): sample ``num_sampled_rows`` query rows (SVG:
64), compute their exact dense attention output and their output under each mask (the block map
actually executed, expanded to tokens for those rows), and pick the mask with the lower mean squared
error; ties go to spatial. Rows are drawn without replacement by a generator seeded with
``sample_seed`` (so calls are deterministic; SVG draws with ``torch.randint``).

Knobs (defaults, provenance):

* ``sparsity`` -> band half-width ``w`` (tokens): the integer ``w`` whose block density, sink
  included, is closest to ``1 - sparsity``. SVG's ``--sparsity`` is a kept budget turned into a band
  width by ``sparsity_to_width`` (``w = N (1 - sqrt(1 - budget))``, budget 0.25-0.3 in its Wan
  scripts), i.e. roughly our ``sparsity`` 0.7-0.75. ``band_frames`` (None) overrides it with
  ``w = round(band_frames * S)`` (SVG's ``multiplier``, in frames).
* ``sink_frames`` 1 (the first latent frame, SVG's ``kv_idx < token_per_frame``); ``num_sampled_rows``
  64 (SVG ``--num_sampled_rows``); ``sample_seed`` 0.
* ``dense_first_layers`` / ``dense_first_steps`` 0; SVG's Wan defaults are ``floor(0.025 * layers)``
  layers and ``floor(0.075 * steps)`` steps (``--first_layers_fp`` / ``--first_times_fp``; its 720p
  script uses 0.03 / 0.2). See ``methods/_warmup.py``.

Reachable sparsity: density runs from 1 (``w >= N``) down to the band of width 0 plus the sink:
about ``sink_frames / T`` plus a diagonal of 2-3 tiles per row (~0.06 at Wan 480p, T = 21); a
target past it gives that floor, with a warning. At sparsity 0 the layout is full and no head is profiled.

FLOPs: attention ``4 * kept token pairs * D`` (the layout is the same for both head kinds);
selection ``8 * B * H * R * N * D`` for R sampled rows (their Q K^T, and P V for dense, spatial and
temporal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from salad_bench.kernels import block_sparse_attention, resolve_backend
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.methods._warmup import WarmupConfig, WarmupMethod
from salad_bench.methods.base import METHODS, AttnContext, MethodReport, check_count, check_range, gather_tokens


@dataclass(frozen=True)
class SvgConfig(WarmupConfig):
    band_frames: float | None = None
    sink_frames: int = 1
    num_sampled_rows: int = 64
    sample_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.band_frames is not None:
            check_range("band_frames", self.band_frames, 0.0, float("inf"), hi_open=True)
        check_count("sink_frames", self.sink_frames)
        check_count("num_sampled_rows", self.num_sampled_rows, 1)
        check_count("sample_seed", self.sample_seed)


def band_tile_map(n: int, block_q: int, block_k: int, width: int, sink_tokens: int, device) -> torch.Tensor:
    """Bool ``(Mq, Mk)``: tiles holding a pair with ``|i - j| <= width``, or a key ``j < sink_tokens``."""
    qs = torch.arange(cdiv(n, block_q), device=device) * block_q
    qe = torch.clamp(qs + block_q, max=n) - 1
    ks = torch.arange(cdiv(n, block_k), device=device) * block_k
    ke = torch.clamp(ks + block_k, max=n) - 1
    band = (ks[None, :] <= qe[:, None] + width) & (ke[None, :] >= qs[:, None] - width)
    return band | (ks < sink_tokens)[None, :]


def spatial_major_order(grid: tuple[int, int, int], device) -> torch.Tensor:
    """Raster index of the token at each spatial-major position ``p = s * T + f``."""
    t = grid[0]
    s = math.prod(grid[1:])
    return torch.arange(t * s, device=device).view(t, s).t().reshape(-1)


def classify_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor, grid: list[int],
                   block_q: int, block_k: int, num_sampled_rows: int, sample_seed: int) -> torch.Tensor:
    """SVG's online profiling: on ``num_sampled_rows`` seeded query rows, the spatial and the temporal
    mask's output error against dense attention; True per ``(B, H)`` where temporal is lower."""
    b, h, n, d = q.shape
    gen = torch.Generator().manual_seed(sample_seed)
    rows = torch.randperm(n, generator=gen)[: min(num_sampled_rows, n)].sort().values.to(q.device)
    perm = spatial_major_order(tuple(grid), q.device)
    pos = torch.empty_like(perm).index_copy_(0, perm, torch.arange(n, device=q.device))  # raster -> transposed
    qb, kb = torch.arange(n, device=q.device) // block_q, torch.arange(n, device=q.device) // block_k
    m_spatial = tiles[qb[rows]][:, kb]  # (R, N) in raster key order
    m_temporal = tiles[qb[pos[rows]]][:, kb[pos]]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d)
    out = torch.zeros(b, h, dtype=torch.bool, device=q.device)
    step = max(1, (1 << 24) // (len(rows) * n))  # heads per chunk: bound the (R, N) score copies
    for b0 in range(b):
        for h0 in range(0, h, step):
            hs = slice(h0, h0 + step)
            s = torch.einsum("hrd,hnd->hrn", q[b0, hs][:, rows].to(work), k[b0, hs].to(work)) * scale
            vv = v[b0, hs].to(work)
            dense = torch.softmax(s, -1) @ vv
            errs = []
            for m in (m_spatial, m_temporal):
                o = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ vv
                errs.append(((o - dense) ** 2).mean(dim=(1, 2)))
            out[b0, hs] = errs[1] < errs[0]
    return out


@torch.library.custom_op("salad_bench::svg_classify_heads", mutates_args=())
def _classify_heads_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor, grid: list[int],
                       block_q: int, block_k: int, num_sampled_rows: int, sample_seed: int) -> torch.Tensor:
    return classify_heads(q, k, v, tiles, grid, block_q, block_k, num_sampled_rows, sample_seed)


@_classify_heads_op.register_fake
def _(q, k, v, tiles, grid, block_q, block_k, num_sampled_rows, sample_seed):
    return torch.empty(q.shape[0], q.shape[1], dtype=torch.bool, device=q.device)


@METHODS.register("svg", family="training_free")
class Svg(WarmupMethod):
    """Per-head spatial or temporal band mask chosen online from sampled rows (arXiv 2502.01776)."""

    Config = SvgConfig
    family = "training_free"
    needs_grid = True
    config: SvgConfig

    def __init__(self, config: SvgConfig, **kw) -> None:
        super().__init__(config, **kw)
        self._maps: dict[tuple, torch.Tensor] = {}
        self._widths: dict[tuple, int] = {}
        self._bands: dict[tuple, tuple[int, torch.Tensor, bool]] = {}
        self._layouts: dict[tuple, BlockLayout] = {}
        self._temporal: torch.Tensor | None = None

    # -- the static band ------------------------------------------------------------------------
    def _map(self, n: int, width: int, sink: int, device) -> torch.Tensor:
        c = self.config
        key = (n, c.block_q, c.block_k, width, sink, str(device))
        if key not in self._maps:
            self._maps[key] = band_tile_map(n, c.block_q, c.block_k, width, sink, device)
        return self._maps[key]

    def band_width(self, grid: tuple[int, int, int], n: int, device="cpu") -> int:
        """Band half-width in tokens: from ``band_frames``, else closest density to ``1 - sparsity``."""
        c = self.config
        frame = n // grid[0]
        if c.band_frames is not None:
            return int(round(c.band_frames * frame))
        key = (n, frame, c.block_q, c.block_k, c.sink_frames, c.sparsity)
        if key not in self._widths:
            target, sink = 1.0 - c.sparsity, c.sink_frames * frame
            dens = lambda w: float(self._map(n, w, sink, device).float().mean().item())  # noqa: E731
            lo, hi = 0, n  # density is non-decreasing in w; find the first w reaching the target
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if dens(mid) < target else (lo, mid)
            cands = [w for w in (lo - 1, lo) if w >= 0]
            self._widths[key] = min(cands, key=lambda w: (abs(dens(w) - target), -w))
        return self._widths[key]

    # -- online head classification -------------------------------------------------------------
    def classify_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, tiles: torch.Tensor
    ) -> torch.Tensor:
        """Bool ``(B, H)``: True where the temporal mask's sampled-row error is lower than the spatial one's.
        Under ``torch.compile`` it is the operator ``salad_bench::svg_classify_heads`` (host-side sampling
        and loops stay out of the traced graph)."""
        c = self.config
        args = (q, k, v, tiles, list(grid), c.block_q, c.block_k, c.num_sampled_rows, c.sample_seed)
        if torch.compiler.is_compiling():
            return torch.ops.salad_bench.svg_classify_heads(*args)
        return classify_heads(*args)

    # -- the contract ----------------------------------------------------------------------------
    @torch._dynamo.assume_constant_result  # host-side search on static maps: a constant under compile
    def _band(self, grid, n: int, device) -> tuple[int, torch.Tensor, bool]:
        """(width, tile map, whether it keeps every tile), cached; warns once if out of reach."""
        c = self.config
        key = (tuple(grid), n, c.block_q, c.block_k, c.sink_frames, c.band_frames, c.sparsity, str(device))
        if key not in self._bands:
            sink = c.sink_frames * (n // grid[0])
            width = self.band_width(grid, n, device)
            tiles = self._map(n, width, sink, device)
            if c.band_frames is None:
                floor = self._map(n, 0, sink, device).float().mean().item()
                self._check_reach(float(tiles.float().mean().item()), floor, f"grid {tuple(grid)}")
            self._bands[key] = (width, tiles, bool(tiles.all()))
        return self._bands[key]

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, v: torch.Tensor | None = None) -> BlockLayout:
        """The shared band layout; it also classifies the heads (stored for :meth:`attend`).

        ``v`` defaults to ``k`` when the caller only has q and k (the harness times selection so);
        attend passes the real v. Temporal heads index this layout in the transposed order.
        """
        b, h, n, _ = q.shape
        self._temporal = torch.zeros(b, h, dtype=torch.bool, device=q.device)
        if self.is_dense_call(ctx):
            self._report_extra = {}
            return self.full_layout(q)
        c = self.config
        width, tiles, full = self._band(tuple(ctx.grid), n, str(q.device))
        if not full:
            self._temporal = self.classify_heads(q, k, k if v is None else v, ctx.grid, tiles)
        self._report_extra = {"band_width": width, "band_frames": width / (n // ctx.grid[0]), "profiled": not full}
        idx, cnt = self._static_layout(tuple(ctx.grid), b, h, n, str(q.device))
        return BlockLayout(idx, cnt, c.block_q, c.block_k, n)

    @torch._dynamo.assume_constant_result  # the shared band layout: built once, baked in under compile
    def _static_layout(self, grid, b: int, h: int, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        width, tiles, _ = self._band(grid, n, device)
        key = (b, h, n, width, c.sink_frames, device)
        if key not in self._layouts:
            self._layouts[key] = BlockLayout.from_dense(tiles[None, None].expand(b, h, -1, -1), c.block_q, c.block_k, n)
        return self._layouts[key].kv_idx, self._layouts[key].kv_cnt

    def report(self) -> MethodReport:
        rep = super().report()
        if self._temporal is not None and rep.extra.get("profiled"):
            rep.extra["temporal_heads"] = self._temporal.sum(0).tolist()  # per head: samples choosing temporal
        return rep

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        dense = self.is_dense_call(ctx)
        layout = self.select(q, k, ctx, v)
        backend = resolve_backend(self.config.backend, q.device)
        temporal = self._temporal
        b, h, n, d = q.shape
        # (compiled: no data-dependent branch; the general path is exact for all-spatial heads too)
        if dense or (not torch.compiler.is_compiling() and not bool(temporal.any())):
            out = block_sparse_attention(q, k, v, layout, backend=backend)
        else:
            perm = spatial_major_order(ctx.grid, q.device)
            sel = temporal[:, :, None, None]
            q2, k2, v2 = (torch.where(sel, gather_tokens(x, perm), x) for x in (q, k, v))
            out2 = block_sparse_attention(q2, k2, v2, layout, backend=backend)
            out = torch.where(sel, torch.empty_like(out2).index_copy_(2, perm, out2), out2)
        profiled = self._report_extra.get("profiled", False)
        rows = min(self.config.num_sampled_rows, n) if profiled else 0
        self._record(layout, backend, ctx, dense, selection=8.0 * b * h * rows * n * d)
        return out
