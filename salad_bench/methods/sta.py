"""``sta``: Sliding Tile Attention (Zhang et al., arXiv 2502.04507; code: hao-ai-lab/FastVideo).

The latent grid ``(T, H, W)`` is cut into tiles of ``tile = (tt, th, tw)`` tokens; each query tile
attends to a 3D window of ``window = (wt, wh, ww)`` *tiles* around it. As in FastVideo's reference
mask (``generate_sta_mask``), the window is centred on the query tile but clamped to stay inside the
tile grid, so every query sees the same number of tiles: along an axis of ``n`` tiles a window of
``w`` tiles (``w`` clipped to ``n``) starts at ``clamp(a - w // 2, 0, n - w)`` for query tile ``a``
(for odd ``w`` this is the paper's centre clamp; even ``w`` is the same rule, one tile longer on the
right). Tiles at the ragged end of an axis (``T % tt != 0`` etc.) are partial tiles.

Token order (``token_order``). The paper reorders tokens tile-major so that a tile is a run of
contiguous tokens and every (query block, key block) tile is either fully inside the window or fully
outside. Our tokens arrive t-major raster, so two orders are offered:

* ``tile`` (default, the paper's layout): the block-sparse problem is posed tile-major and the output
  comes back in raster order (exact: attention is permutation-equivariant). In inference k and v are
  gathered tile-major and the kernel reads q and writes the output (plus a residual) through the
  permutation (``q_index``); under autograd q, k, v are gathered and the output gathered back. No
  FLOPs either way. With tiles whose token count is a multiple of the block
  size every kept tile is fully used; partial tiles at ragged edges make some blocks straddle tiles.
* ``raster``: tokens stay in raster order. A raster block touches several tiles (a 128-token block of
  a 52-wide frame spans every w-tile), so for the same window the block map is much denser, and on
  small grids even a 1 x 1 x 1 window can keep nearly every tile.

Either way the block map is exact for its order: a (query block, key block) tile is kept iff some
token pair of theirs falls inside the window in tile space. It is built from the tiles each block
touches (a block-by-tile incidence pushed through the separable per-axis windows); nothing of size
N x N is built, and the map is cached per (grid, N, blocks, tile, order, window).

Knobs (defaults, provenance):

* ``tile`` (6, 8, 8) tokens: FastVideo's ``STA_base_tile_size`` for HunyuanVideo and Wan (a 384-token
  tile is 3 x 128 query blocks).
* ``window`` None, in tiles: one window for every head. None derives it from ``sparsity``: among the
  near-cube windows ``(a, b, c)`` with ``a, b, c`` in ``{s, s + 1}`` (clipped to the tile grid) the
  one whose block density is closest to ``1 - sparsity`` (ties: the larger window). FastVideo's
  searched Wan windows (``3,1,10``, ``1,5,7``, ``3,3,3``, ... on a 3 x 6 x 10 tile grid) keep ~17%
  of tiles.
* ``head_windows`` None: one ``(wt, wh, ww)`` per head (the paper's per-head mask strategy); set it
  from :meth:`Sta.calibrate`, which mirrors the paper's mask search: for each head, among candidate
  windows meeting the target sparsity, the one with the lowest mean squared error against dense
  attention over a few sample inputs. A calibrated method uses its calibrated windows.
* ``token_order`` ``tile`` (see above); ``dense_first_layers`` / ``dense_first_steps`` 0 (FastVideo
  keeps the first 12 of 50 steps dense: ``skip_time_steps=12``; see ``methods/_warmup.py``).

Reachable sparsity: from 0 (the whole grid) down to the density of a 1 x 1 x 1 window; with the
default tile and 128 x 64 blocks that floor is 0.015 (tile order) / 0.096 (raster) at Wan 480p
(21 x 30 x 52), 0.006 / 0.056 at Wan 720p, and 0.26 / 0.93 on a small 4 x 16 x 18 grid. A target past
the floor yields the smallest window, with a warning; in between, the near-cube family is discrete, so
the density lands near, not on, the target (the report's ``extra`` names the windows used).

FLOPs: ``4 * kept token pairs * D``; selection costs no FLOPs (the mask is static and cached per grid
and window; the tile-order permutation is data movement only).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from salad_bench.kernels import resolve_backend
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.methods._warmup import WarmupConfig, WarmupMethod, check_count
from salad_bench.methods.base import METHODS, AttnContext, check_choice, check_range, permuted_block_sparse

Window = tuple[int, int, int]


def _as_triple(name: str, value: Any) -> Window:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{name}={value!r} is not valid; it must be three integers (t, h, w), each >= 1")
    for x in value:
        check_count(name, x, 1)
    return tuple(int(x) for x in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class StaConfig(WarmupConfig):
    window: Window | None = None
    head_windows: tuple[Window, ...] | None = None
    tile: Window = (6, 8, 8)
    token_order: Literal["raster", "tile"] = "tile"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "tile", _as_triple("tile", self.tile))
        if self.window is not None:
            object.__setattr__(self, "window", _as_triple("window", self.window))
        if self.head_windows is not None:
            if not isinstance(self.head_windows, (tuple, list)) or not self.head_windows:
                raise ValueError(f"head_windows={self.head_windows!r} is not valid; give one (wt, wh, ww) per head")
            object.__setattr__(self, "head_windows", tuple(_as_triple("head_windows", w) for w in self.head_windows))
            if self.window is not None:
                raise ValueError("window and head_windows are exclusive; set one of them")
        check_choice("token_order", self.token_order, ("raster", "tile"))


# -- tile geometry (all small: tokens, blocks and tiles, never N x N) ----------------------------


def tile_grid(grid: tuple[int, int, int], tile: Window) -> Window:
    """Tiles per axis (the last tile of an axis may be partial)."""
    return tuple(cdiv(g, t) for g, t in zip(grid, tile, strict=True))  # type: ignore[return-value]


def token_tile_ids(grid: tuple[int, int, int], tile: Window, device) -> torch.Tensor:
    """Tile id of every raster token, ``(N,)`` int64; ids are t-major over the tile grid."""
    t, h, w = grid
    nt, nh, nw = tile_grid(grid, tile)
    it = torch.arange(t, device=device) // tile[0]
    ih = torch.arange(h, device=device) // tile[1]
    iw = torch.arange(w, device=device) // tile[2]
    return ((it[:, None, None] * nh + ih[None, :, None]) * nw + iw[None, None, :]).reshape(-1)


def tile_major_order(grid: tuple[int, int, int], tile: Window, device) -> torch.Tensor:
    """Raster index of the token at each tile-major position (tiles in order, raster inside a tile)."""
    return torch.sort(token_tile_ids(grid, tile, device), stable=True).indices


def axis_window(n: int, w: int, device) -> torch.Tensor:
    """``(n, n)`` float: ``[a, b] = 1`` when tile ``b`` is inside query tile ``a``'s clamped window."""
    w = min(w, n)
    a = torch.arange(n, device=device)
    start = torch.clamp(a - w // 2, min=0, max=n - w)
    return ((a[None, :] >= start[:, None]) & (a[None, :] < start[:, None] + w)).float()


class _Geometry:
    """Block-by-tile incidences of one (grid, tile, order, N, blocks) on one device."""

    def __init__(self, grid, tile, order: str, n: int, block_q: int, block_k: int, device) -> None:
        self.tgrid = tile_grid(grid, tile)
        ntiles = math.prod(self.tgrid)
        tid = token_tile_ids(grid, tile, device)
        self.perm = tile_major_order(grid, tile, device) if order == "tile" else None
        self.inverse = torch.argsort(self.perm) if self.perm is not None else None
        if self.perm is not None:
            tid = tid[self.perm]
        pos = torch.arange(n, device=device)
        mq, mk = cdiv(n, block_q), cdiv(n, block_k)
        self.q_inc = torch.zeros(mq, ntiles, device=device)
        self.q_inc[pos // block_q, tid] = 1.0
        k_inc = torch.zeros(mk, ntiles, dtype=torch.bool, device=device)
        k_inc[pos // block_k, tid] = True
        # Each key block touches a handful of tiles: list them (padded with a dummy tile id).
        count = int(k_inc.sum(1).max().item())
        order_k = torch.sort((~k_inc).to(torch.int8), dim=1, stable=True).indices[:, :count]
        valid = torch.arange(count, device=device)[None, :] < k_inc.sum(1, keepdim=True)
        self.k_tiles = torch.where(valid, order_k, torch.full_like(order_k, ntiles))

    def tile_map(self, window: Window) -> torch.Tensor:
        """Bool ``(Mq, Mk)``: tiles with at least one (query, key) pair inside the window."""
        nt, nh, nw = self.tgrid
        dev = self.q_inc.device
        reach = self.q_inc.view(-1, nt, nh, nw)
        reach = torch.einsum("iabc,aA->iAbc", reach, axis_window(nt, window[0], dev))
        reach = torch.einsum("iAbc,bB->iABc", reach, axis_window(nh, window[1], dev))
        reach = torch.einsum("iABc,cC->iABC", reach, axis_window(nw, window[2], dev))
        reach = torch.cat(
            [reach.reshape(reach.shape[0], -1) > 0, torch.zeros(reach.shape[0], 1, dtype=torch.bool, device=dev)], 1
        )
        return reach[:, self.k_tiles].any(-1)


def near_cube_windows(tgrid: Window) -> list[Window]:
    """The one-parameter family used to map ``sparsity`` to a window (clipped to the tile grid)."""
    out: set[Window] = set()
    for s in range(1, max(tgrid) + 1):
        for d in itertools.product((0, 1), repeat=3):
            out.add(tuple(min(s + di, n) for di, n in zip(d, tgrid, strict=True)))  # type: ignore[arg-type]
    return sorted(out, key=lambda w: (math.prod(w), w))


def all_windows(tgrid: Window) -> list[Window]:
    return [tuple(w) for w in itertools.product(*(range(1, n + 1) for n in tgrid))]  # type: ignore[misc]


@METHODS.register("sta", family="training_free")
class Sta(WarmupMethod):
    """Sliding tile attention: a 3D window of tiles around each query tile (arXiv 2502.04507)."""

    Config = StaConfig
    family = "training_free"
    needs_grid = True
    config: StaConfig
    fuses_residual = True  # the block-sparse kernel adds a residual in its epilogue

    def __init__(self, config: StaConfig, **kw) -> None:
        super().__init__(config, **kw)
        if config.head_windows is not None and len(config.head_windows) != self.num_heads:
            raise ValueError(
                f"head_windows has {len(config.head_windows)} windows; the method has {self.num_heads} heads"
            )
        self.calibrated_windows: tuple[Window, ...] | None = None
        self.calibration: dict[str, Any] = {}
        self._geo: dict[tuple, _Geometry] = {}
        self._maps: dict[tuple, torch.Tensor] = {}
        self._layouts: dict[tuple, BlockLayout] = {}
        self._by_sparsity: dict[tuple, Window] = {}

    # -- masks -----------------------------------------------------------------------------------
    def _geometry(self, grid, n: int, device) -> _Geometry:
        c = self.config
        key = (tuple(grid), n, c.block_q, c.block_k, c.tile, c.token_order, str(device))
        if key not in self._geo:
            self._geo[key] = _Geometry(grid, c.tile, c.token_order, n, c.block_q, c.block_k, device)
        return self._geo[key]

    def tile_map(self, grid, n: int, window: Window, device) -> torch.Tensor:
        """Cached bool ``(Mq, Mk)`` block map of one window."""
        c = self.config
        key = (tuple(grid), n, c.block_q, c.block_k, c.tile, c.token_order, str(device), tuple(window))
        if key not in self._maps:
            self._maps[key] = self._geometry(grid, n, device).tile_map(window)
        return self._maps[key]

    def window_density(self, grid, n: int, window: Window, device="cpu") -> float:
        return float(self.tile_map(grid, n, window, device).float().mean().item())

    @torch._dynamo.assume_constant_result  # a host-side search on static maps: a constant under compile
    def window_for_sparsity(self, grid, n: int, sparsity: float, device="cpu") -> Window:
        """The near-cube window whose block density is closest to ``1 - sparsity`` (ties: larger).

        Cached per (grid, N, sparsity, device); the first call warns if the target is out of reach.
        """
        key = (tuple(grid), n, sparsity, str(device))
        if key not in self._by_sparsity:
            target = 1.0 - sparsity
            cands = near_cube_windows(tile_grid(grid, self.config.tile))
            dens = [self.window_density(grid, n, w, device) for w in cands]
            best = min(range(len(cands)), key=lambda i: (abs(dens[i] - target), -dens[i]))
            floor = self.window_density(grid, n, (1, 1, 1), device)
            self._check_reach(dens[best], floor, f"grid {tuple(grid)}, tile {self.config.tile}")
            self._by_sparsity[key] = cands[best]
        return self._by_sparsity[key]

    def head_window_list(self, grid, n: int, device) -> list[Window]:
        """Per-head windows: calibrated, else ``head_windows``, else ``window``, else from ``sparsity``."""
        c = self.config
        if self.calibrated_windows is not None:
            return list(self.calibrated_windows)
        if c.head_windows is not None:
            return list(c.head_windows)
        if c.window is not None:
            return [c.window] * self.num_heads
        return [self.window_for_sparsity(grid, n, c.sparsity, device)] * self.num_heads

    # -- the contract ----------------------------------------------------------------------------
    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout:
        if self.is_dense_call(ctx):
            return self.full_layout(q)
        b, h, n, _ = q.shape
        c = self.config
        windows = self.head_window_list(ctx.grid, n, q.device)
        self._report_extra = {"windows": windows, "token_order": c.token_order, "tile": c.tile}
        idx, cnt = self._static_layout(tuple(ctx.grid), b, n, str(q.device), tuple(tuple(w) for w in windows))
        return BlockLayout(idx, cnt, c.block_q, c.block_k, n)

    @torch._dynamo.assume_constant_result  # a static mask: under torch.compile, built once and baked in
    def _static_layout(self, grid, b: int, n: int, device: str, windows: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        key = (grid, b, n, device, windows, c.block_q, c.block_k, c.tile, c.token_order)
        if key not in self._layouts:
            maps = torch.stack([self.tile_map(grid, n, w, device) for w in windows])
            self._layouts[key] = BlockLayout.from_dense(maps[None].expand(b, -1, -1, -1), c.block_q, c.block_k, n)
        return self._layouts[key].kv_idx, self._layouts[key].kv_cnt

    def _execute(self, q, k, v, grid, layout: BlockLayout, backend: str, permute: bool = True,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        perm = inverse = None  # raster order, or tokens already in tile order
        if self.config.token_order != "raster" and permute:
            perm, inverse = self._permutation(tuple(grid), q.shape[2], str(q.device))
        return permuted_block_sparse(q, k, v, layout, perm, inverse, backend, residual)

    @torch._dynamo.assume_constant_result
    def _permutation(self, grid, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        geo = self._geometry(grid, n, torch.device(device))
        return geo.perm, geo.inverse

    def token_order(self, grid, n: int, device) -> torch.Tensor | None:
        """Tile order (``token_order="tile"``): the layout is posed in it; None for ``"raster"``."""
        if self.config.token_order == "raster":
            return None
        return self._permutation(tuple(grid), n, str(torch.device(device)))[0]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        dense = self.is_dense_call(ctx)
        layout = self.select(q, k, ctx)
        backend = resolve_backend(self.config.backend, q.device)
        # tokens already in tile order (ctx.token_order, set by a model integration): nothing to permute
        permute = not dense and ctx.token_order is None
        out = self._execute(q, k, v, ctx.grid, layout, backend, permute=permute, residual=residual)
        if dense:
            self._report_extra = {}
        self._record(layout, backend, ctx, dense, selection=0.0)
        return out

    # -- the paper's per-head window search ------------------------------------------------------
    def calibrate(
        self,
        q_samples: torch.Tensor | Sequence[torch.Tensor],
        k_samples: torch.Tensor | Sequence[torch.Tensor],
        v_samples: torch.Tensor | Sequence[torch.Tensor],
        grid: tuple[int, int, int],
        target_sparsity: float,
        candidates: Sequence[Window] | None = None,
    ) -> tuple[Window, ...]:
        """Pick each head's window for ``target_sparsity`` from a few ``(B, H, N, D)`` samples.

        Candidates meeting the target (block density ``<= 1 - target_sparsity``) are scored by the
        mean squared error of their output against dense attention, averaged over the samples; each
        head takes the lowest. Default candidates: every window that meets the target and cannot
        grow along any axis without missing it (the paper's list of equal-budget shapes). If no
        candidate meets the target, the sparsest one is used for every head and a warning says so.
        The result is stored (:attr:`calibrated_windows`, used by later calls) and returned; pass it
        as ``head_windows`` to rebuild the method elsewhere.
        """
        check_range("target_sparsity", target_sparsity, 0.0, 1.0, hi_open=True)
        qs, ks, vs = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (q_samples, k_samples, v_samples))
        if not (len(qs) == len(ks) == len(vs)) or not qs:
            raise ValueError("q_samples, k_samples and v_samples must hold the same number (>= 1) of tensors")
        n, device = qs[0].shape[2], qs[0].device
        if math.prod(grid) != n:
            raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but the samples have N={n}")
        tgrid = tile_grid(grid, self.config.tile)
        budget = 1.0 - target_sparsity + 1e-9
        pool = [_as_triple("candidates", w) for w in candidates] if candidates is not None else all_windows(tgrid)
        dens = {w: self.window_density(grid, n, w, device) for w in pool}
        feasible = [w for w in pool if dens[w] <= budget]
        if candidates is None:
            grow = lambda w, i: tuple(x + (j == i) for j, x in enumerate(w))  # noqa: E731
            feasible = [
                w for w in feasible if not any(grow(w, i) in dens and dens[grow(w, i)] <= budget for i in range(3))
            ]
        if not feasible:
            sparsest = min(pool, key=lambda w: dens[w])
            warnings.warn(
                f"sta.calibrate: no candidate window reaches sparsity {target_sparsity}; using the sparsest, "
                f"{sparsest} (density {dens[sparsest]:.3f})",
                stacklevel=2,
            )
            feasible = [sparsest]
        backend = resolve_backend(self.config.backend, device)
        errors = torch.zeros(len(feasible), self.num_heads, dtype=torch.float64)
        with torch.no_grad():
            for q, k, v in zip(qs, ks, vs, strict=True):
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                for i, w in enumerate(feasible):
                    m = self.tile_map(grid, n, w, device)
                    layout = BlockLayout.from_dense(
                        m[None, None].expand(q.shape[0], q.shape[1], -1, -1), *self._blocks(), n
                    )
                    out = self._execute(q, k, v, grid, layout, backend).float()
                    errors[i] += ((out - ref) ** 2).mean(dim=(0, 2, 3)).double().cpu() / len(qs)
        choice = errors.argmin(0).tolist()
        self.calibrated_windows = tuple(feasible[i] for i in choice)
        self.calibration = {
            "target_sparsity": target_sparsity,
            "candidates": feasible,
            "densities": [dens[w] for w in feasible],
            "errors": errors.tolist(),
            "windows": self.calibrated_windows,
        }
        return self.calibrated_windows

    def _blocks(self) -> tuple[int, int]:
        return self.config.block_q, self.config.block_k
