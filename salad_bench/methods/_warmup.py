"""Dense warm-up shared by the training-free peers: keep the first layers / denoising steps dense.

Many training-free methods run full attention early on, where the paper found sparsity hurts most:
STA keeps the first 12 of 50 steps dense (FastVideo ``skip_time_steps``), SVG the first
``floor(0.075 * steps)`` steps and ``floor(0.025 * layers)`` layers (``first_times_fp`` /
``first_layers_fp``), Radial 12 steps and 1 layer for Wan (``dense_timesteps`` / ``dense_layers``).
Here the knobs are plain counts, ``dense_first_layers`` and ``dense_first_steps``, compared with
``AttnContext.layer`` and ``AttnContext.step`` (0-based); a call is dense when *either* holds. Both
default to 0 so a kernel-level benchmark (one call at layer 0, step 0) measures the sparse path; set them
to the paper's values for end-to-end runs.

A dense call executes the full :class:`BlockLayout` (density 1.0 in its report). Because one call
cannot show what a whole run computes, every method built on :class:`WarmupMethod` also reports
``extra["effective_density"]``: the tile density averaged over all ``num_layers * num_steps`` calls of
a run (:func:`effective_density`), using the density of the method's last *sparse* call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from salad_bench.kernels.layout import BlockLayout
from salad_bench.methods.base import AttentionMethod, AttnContext, BlockSparseConfig, MethodReport, check_count

__all__ = ["WarmupConfig", "WarmupMethod", "effective_density"]



def effective_density(
    per_call_density: float, num_layers: int, num_steps: int, dense_first_layers: int, dense_first_steps: int
) -> float:
    """Tile density averaged over a whole run of ``num_layers x num_steps`` attention calls.

    Calls with ``layer < dense_first_layers`` or ``step < dense_first_steps`` are dense (density 1); the
    rest compute ``per_call_density``. Every call has the same shape, so a plain average of tile
    fractions is also the FLOP-weighted one.
    """
    if not 0.0 <= per_call_density <= 1.0:
        raise ValueError(f"per_call_density={per_call_density!r} is out of range; valid range is [0, 1]")
    check_count("num_layers", num_layers, 1)
    check_count("num_steps", num_steps, 1)
    check_count("dense_first_layers", dense_first_layers)
    check_count("dense_first_steps", dense_first_steps)
    sparse_calls = (num_layers - min(dense_first_layers, num_layers)) * (num_steps - min(dense_first_steps, num_steps))
    total = num_layers * num_steps
    return ((total - sparse_calls) + sparse_calls * per_call_density) / total


@dataclass(frozen=True)
class WarmupConfig(BlockSparseConfig):
    """Block-sparse knobs plus the dense warm-up counts (see the module docstring)."""

    dense_first_layers: int = 0
    dense_first_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("dense_first_layers", self.dense_first_layers)
        check_count("dense_first_steps", self.dense_first_steps)


class WarmupMethod(AttentionMethod):
    """Base of the training-free peers: the warm-up rule, and effective density in the report.

    Subclasses call :meth:`is_dense_call` first in ``select`` (returning :meth:`full_layout`), and
    :meth:`_record` instead of ``_remember`` at the end of ``attend``. ``_report_extra`` holds
    method-specific facts of the last call (merged into ``report().extra``).
    """

    runs_block_sparse = True  # every peer here runs the block-sparse kernel on its select()'s layout

    def __init__(self, config: BlockSparseConfig, **kw) -> None:
        super().__init__(config, **kw)
        self._ctx: AttnContext | None = None
        self._dense_call = False
        self._sparse_layout: BlockLayout | None = None
        self._report_extra: dict[str, Any] = {}

    # -- the warm-up rule ------------------------------------------------------------------------
    def dense_at(self, layer: int, step: int) -> bool:
        c = self.config
        return layer < getattr(c, "dense_first_layers", 0) or step < getattr(c, "dense_first_steps", 0)

    def is_dense_call(self, ctx: AttnContext) -> bool:
        """This call's warm-up phase: the caller's ``ctx.dense`` when it decided it, else :meth:`dense_at`."""
        if ctx.dense is not None:
            return ctx.dense
        if ctx.layer is None or ctx.step is None:
            raise ValueError(f"{self.name}: the context gives neither dense nor layer and step; the warm-up "
                             "rule needs one (AttnContext(dense=method.dense_at(layer, step)) or layer= and step=)")
        return self.dense_at(ctx.layer, ctx.step)

    def full_layout(self, q) -> BlockLayout:
        b, h, n, _ = q.shape
        c = self.config
        return BlockLayout.full(b, h, n, c.block_q, c.block_k, q.device)  # type: ignore[attr-defined]

    def _record(self, layout: BlockLayout, backend: str, ctx: AttnContext, dense: bool, **extra_flops: float) -> None:
        self._remember(layout, backend, **extra_flops)
        self._ctx = ctx
        self._dense_call = dense
        if not dense:
            self._sparse_layout = layout

    def _check_reach(self, achieved: float, floor: float, how: str, tol: float = 0.05) -> None:
        """Warn (never silently densify) when ``sparsity`` asks for less than the method's floor."""
        target = 1.0 - self.config.sparsity
        if achieved > target + tol:
            warnings.warn(
                f"{self.name}: sparsity {self.config.sparsity:g} is out of reach here ({how}); the sparsest "
                f"setting keeps {floor:.3f} of tiles, using density {achieved:.3f}",
                stacklevel=3,
            )

    # -- reporting -------------------------------------------------------------------------------
    @property
    def effective_density(self) -> float | None:
        """Density over the whole run described by the last call's context; None before any sparse call."""
        if self._ctx is None or self._sparse_layout is None:
            return None
        c = self.config
        return effective_density(
            self._sparse_layout.density(),
            self._ctx.num_layers,
            self._ctx.num_steps,
            getattr(c, "dense_first_layers", 0),
            getattr(c, "dense_first_steps", 0),
        )

    def report(self) -> MethodReport:
        rep = super().report()
        eff = self.effective_density
        rep.extra.update(self._report_extra)
        rep.extra["dense_call"] = self._dense_call
        rep.extra["effective_density"] = eff
        rep.extra["effective_sparsity"] = None if eff is None else 1.0 - eff
        return rep
