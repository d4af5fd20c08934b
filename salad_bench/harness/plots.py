"""Figures from result rows (matplotlib, no pyplot state; PNG and PDF).

Each ``fig_*`` function is a pure function of a DataFrame of rows returning a ``Figure`` (or ``None``
when there is nothing to plot); one panel per (card, workload, dtype, pass) group, so a figure never
mixes cards. :func:`write_figures` saves them all.

* ``speedup_vs_sparsity``: speedup over the run's dense baseline against measured sparsity, per method.
* ``quality_vs_speedup``: PSNR (higher is better) or, without it, rel L2 (lower is better) against
  speedup, with the Pareto front marked (attention and quality rows that carry both).
* ``latency_breakdown``: stacked bars of select / sparse / linear / rest per method at the target
  sparsity nearest 90% (explicit ``select_ms``, ``sparse_ms``, ``linear_ms`` when rows have them;
  otherwise the time after selection is split by the rows' ``flops_<part>`` shares, and the panel says
  so), plus self-attention / rest for end-to-end DiT rows.
* ``speedup_vs_n``: speedup against sequence length N, per (method, target sparsity).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from salad_bench.harness.frames import (
    attention_rows,
    column,
    dit_frame,
    group_rows,
    nearest_target,
    ok_rows,
    rows_of_kind,
)

__all__ = [
    "FIGURES",
    "breakdown_frame",
    "fig_latency_breakdown",
    "fig_quality_vs_speedup",
    "fig_speedup_vs_n",
    "fig_speedup_vs_sparsity",
    "pareto_front",
    "quality_metric",
    "write_figures",
]

GROUP_KEYS = ("card", "workload", "qkv", "dtype", "pass")
LINEAR_PARTS = ("linear", "projection", "gate", "linear_qkv")
NOT_PARTS = ("executed", "dense", "selection", "total")
SEGMENTS = ("select", "sparse", "linear", "rest")


def pareto_front(x: Any, y: Any, *, maximize_x: bool = True, maximize_y: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates (at least as good in both, better in one).

    Points with a NaN coordinate are never on the front; equal points are both on it.
    """
    xs = np.asarray(x, dtype=float) * (1 if maximize_x else -1)
    ys = np.asarray(y, dtype=float) * (1 if maximize_y else -1)
    valid = ~(np.isnan(xs) | np.isnan(ys))
    front = valid.copy()
    for i in np.flatnonzero(valid):
        ge = valid & (xs >= xs[i]) & (ys >= ys[i])
        front[i] = not np.any(ge & ((xs > xs[i]) | (ys > ys[i])))
    return front


def quality_metric(df: pd.DataFrame) -> tuple[str, bool] | None:
    """The quality column to plot and whether higher is better: psnr, else rel_l2; None if neither."""
    for name, higher in (("psnr", True), ("rel_l2", False)):
        if name in df and pd.to_numeric(df[name], errors="coerce").notna().any():
            return name, higher
    return None


def _num(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(column(df, name), errors="coerce")


FAMILY_CMAPS = {"full": "Greys", "training_free": "Blues", "trained": "Greens", "salad": "Oranges", "ablation": "Purples"}


def _colors(df: pd.DataFrame) -> dict[str, Any]:
    """One colour per method, a shade of its family's colour map (dense grey, training-free blue, trained
    green, SALAD orange, ablations purple), so a reader sees the families before the names."""
    import matplotlib

    fam = df.assign(_f=column(df, "family").fillna("").astype(str))[["method", "_f"]].dropna(subset=["method"])
    out: dict[str, Any] = {}
    for family, g in fam.drop_duplicates("method").groupby("_f", sort=True):
        cmap = matplotlib.colormaps[FAMILY_CMAPS.get(family, "Greys")]
        names = sorted(g["method"].astype(str))
        for i, m in enumerate(names):
            out[m] = cmap(0.85 - 0.5 * i / max(len(names) - 1, 1))
    return out


def _by_family(g: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The methods of a panel split in two: the comparison (every family but ablations) and, when
    there are ablations, SALAD beside its ablations in a panel of their own."""
    fam = column(g, "family").fillna("").astype(str)
    main, abl = g[fam != "ablation"], g[fam.isin(["salad", "ablation"])]
    out = [("", main)] if not main.empty else []
    if (fam == "ablation").any():
        out.append(("SALAD ablations", abl))
    return out


def _legend(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _panels(
    groups: list[tuple[dict, pd.DataFrame]], title: str, draw: Callable[[Any, pd.DataFrame], None]
) -> Figure | None:
    if not groups:
        return None
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (group, g) in zip(axes, groups, strict=False):
        draw(ax, g)
        ax.set_title(" · ".join(v for v in group.values() if v), fontsize=9)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return fig


def _baseline_label(g: pd.DataFrame) -> str:
    backends = sorted(str(b) for b in column(g, "baseline_backend").dropna().unique())
    return f"speedup over dense ({', '.join(backends)})" if backends else "speedup over dense"


def fig_speedup_vs_sparsity(df: pd.DataFrame) -> Figure | None:
    """Speedup over the dense baseline against measured sparsity, one line per method; dense backends
    are left out (they sit at sparsity 0) and ablations get a panel of their own."""
    att = attention_rows(df)
    att = att[_num(att, "speedup").notna() & (column(att, "family").astype(str) != "full")]
    colors = _colors(att)
    panels = [({**gk, "part": part}, sub) for gk, g in group_rows(att, GROUP_KEYS) for part, sub in _by_family(g)]

    def draw(ax, g):
        for method, m in g.groupby("method", sort=True):
            m = m.sort_values("sparsity")
            ax.plot(m["sparsity"], _num(m, "speedup"), marker="o", ms=4, label=method, color=colors[method])
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        sp = _num(g, "sparsity")
        ax.set_xlim(max(0.0, sp.min() - 0.05), min(1.0, sp.max() + 0.05))
        ax.set_xlabel("sparsity (measured)")
        ax.set_ylabel(_baseline_label(g) + " (×)")
        _legend(ax)
        ax.grid(alpha=0.3)

    return _panels(panels, "Speedup vs sparsity", draw)


def quality_speedup_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Quality rows joined with latency rows: each quality row (method, target sparsity) gets the
    median speedup the attention rows measured for the same method and target, per (card, workload)
    of the latency rows. Attention rows that carry their own error (rel_l2) are kept as they are."""
    att = attention_rows(df)
    att = att[_num(att, "speedup").notna()]
    qual = rows_of_kind(ok_rows(df), "quality")
    if qual.empty or att.empty:
        return att
    metric = quality_metric(qual)
    if metric is None:
        return att
    speed = (att.assign(_t=_num(att, "sparsity_target").round(4))
             .groupby(["card", "workload", "method", "_t"], dropna=False)["speedup"].median().reset_index())
    q = qual.assign(_t=_num(qual, "sparsity_target").round(4))[["method", "family", "_t", metric[0]]]
    joined = q.merge(speed, on=["method", "_t"], how="inner")
    joined = joined.assign(sparsity_target=joined["_t"], kind="quality+latency").drop(columns="_t")
    joined["workload"] = joined["workload"].astype(str) + " (quality: trained model)"
    return joined


def fig_quality_vs_speedup(df: pd.DataFrame) -> Figure | None:
    """Quality against speedup with the Pareto front (bigger speedup, better quality): PSNR of the
    quality study joined with the latency rows' speedups, else the attention rows' own rel L2."""
    att = quality_speedup_frame(df)
    metric = quality_metric(att)
    if metric is None:
        return None
    name, higher = metric
    att = att[_num(att, "speedup").notna() & _num(att, name).notna()]
    if att.empty:
        return None
    colors = _colors(att)

    def draw(ax, g):
        x, y = _num(g, "speedup").to_numpy(), _num(g, name).to_numpy()
        front = pareto_front(x, y, maximize_y=higher)
        for method, idx in g.groupby("method", sort=True).indices.items():
            ax.scatter(x[idx], y[idx], s=22, color=colors[method], label=method, zorder=3)
        order = np.argsort(x[front])
        ax.plot(x[front][order], y[front][order], color="black", lw=1.0, ls="--", zorder=2, label="Pareto front")
        ax.scatter(x[front], y[front], s=70, facecolors="none", edgecolors="black", zorder=4)
        ax.set_xlabel(_baseline_label(g) + " (×)")
        ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)")
        _legend(ax)
        ax.grid(alpha=0.3)

    keys = ("card", "workload") if "quality+latency" in set(column(att, "kind").astype(str)) else GROUP_KEYS
    return _panels(group_rows(att, keys), f"Quality ({name}) vs speedup", draw)


def breakdown_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Attention rows at the target nearest 90% per method, with ms per segment (select/sparse/linear/rest)
    and ``estimated`` (True where the sparse/linear split came from FLOP shares)."""
    att = attention_rows(df)
    att = att[_num(att, "ms").notna()]
    # dense backends other than the run's baseline would set the scale (math: ~280 ms) and hide the rest
    dense = column(att, "family").astype(str) == "full"
    att = att[~dense | (column(att, "method") == column(att, "baseline_method")) | column(att, "baseline_method").isna() & (column(att, "method") == "full")]
    if att.empty:
        return att
    picked = []
    for _, g in att.groupby([column(att, k).fillna("") for k in (*GROUP_KEYS, "method")], sort=True):
        t = nearest_target(column(g, "sparsity_target"))
        picked.append(g if t is None else g[_num(g, "sparsity_target") == t])
    att = pd.concat(picked)
    part_cols = [c for c in att.columns if str(c).startswith("flops_") and str(c)[6:] not in NOT_PARTS]
    parts = (
        att[part_cols].apply(pd.to_numeric, errors="coerce").fillna(0.0) if part_cols else pd.DataFrame(index=att.index)
    )
    sparse_f = parts.get("flops_attention", pd.Series(0.0, index=att.index))
    linear_f = sum(
        (parts[f"flops_{p}"] for p in LINEAR_PARTS if f"flops_{p}" in parts), pd.Series(0.0, index=att.index)
    )
    other_f = parts.sum(axis=1) - sparse_f - linear_f
    total_f = (sparse_f + linear_f + other_f).replace(0.0, np.nan)
    ms = _num(att, "ms")
    select = _num(att, "select_ms").fillna(0.0)
    after = (ms - select).clip(lower=0.0)
    explicit = _num(att, "sparse_ms").notna()
    sparse = _num(att, "sparse_ms").fillna(after * (sparse_f / total_f).fillna(1.0))
    linear = _num(att, "linear_ms").fillna(0.0).where(explicit, after * (linear_f / total_f).fillna(0.0))
    rest = (ms - select - sparse - linear).clip(lower=0.0)
    return att.assign(select=select, sparse=sparse, linear=linear, rest=rest, estimated=~explicit)


def fig_latency_breakdown(df: pd.DataFrame) -> Figure | None:
    """Stacked bars: select / sparse / linear / rest per method (attention), attention / rest (DiT)."""
    att = breakdown_frame(df)
    dit = dit_frame(df)
    dit = dit[dit["total_ms"].notna()] if "total_ms" in dit else dit
    groups = [("attention", gk, g) for gk, g in group_rows(att, GROUP_KEYS)]
    groups += [("dit", gk, g) for gk, g in group_rows(dit, ("card", "workload", "dtype"))]
    seg_colors = dict(
        zip((*SEGMENTS, "self-attention"), ("#c44e52", "#4c72b0", "#55a868", "#8c8c8c", "#4c72b0"), strict=True)
    )

    def draw_one(ax, kind, g):
        g = g.sort_values(["method", "sparsity_target"], kind="stable")
        labels = [
            f"{m}@{t:.2f}" if not pd.isna(t) else str(m)
            for m, t in zip(g["method"], _num(g, "sparsity_target"), strict=True)
        ]
        segs = SEGMENTS if kind == "attention" else ("self-attention", "rest")
        values = (
            g[list(SEGMENTS)]
            if kind == "attention"
            else pd.DataFrame({"self-attention": g["attn_ms"], "rest": g["rest_ms"]})
        )
        bottom = np.zeros(len(g))
        for seg in segs:
            vals = pd.to_numeric(values[seg], errors="coerce").fillna(0.0).to_numpy()
            ax.bar(range(len(g)), vals, bottom=bottom, label=seg, color=seg_colors[seg])
            bottom += vals
        ax.set_xticks(range(len(g)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("ms")
        note = " (sparse/linear split by FLOP share)" if kind == "attention" and g["estimated"].any() else ""
        ax.set_xlabel(("attention call" if kind == "attention" else "DiT forward") + note, fontsize=8)
        _legend(ax)

    if not groups:
        return None
    panels = [(gk, (kind, g)) for kind, gk, g in groups]
    return _panels(panels, "Latency breakdown", lambda ax, kg: draw_one(ax, *kg))


def fig_speedup_vs_n(df: pd.DataFrame) -> Figure | None:
    """Speedup against sequence length N, one line per (method, target sparsity)."""
    att = attention_rows(df)
    att = att[_num(att, "speedup").notna() & _num(att, "N").notna()]
    groups = [(gk, g) for gk, g in group_rows(att, ("card", "qkv", "dtype", "pass")) if _num(g, "N").nunique() > 1]
    if not groups:  # one N per panel would be a column of dots: no figure
        return None
    colors = _colors(att)

    def draw(ax, g):
        for (method, target), m in g.groupby(["method", column(g, "sparsity_target").fillna(-1.0)], sort=True):
            m = m.sort_values("N")
            label = method if target < 0 else f"{method}@{target:.2f}"
            ax.plot(_num(m, "N"), _num(m, "speedup"), marker="o", ms=4, label=label, color=colors[method])
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(_baseline_label(g) + " (×)")
        _legend(ax)
        ax.grid(alpha=0.3, which="both")

    return _panels(groups, "Speedup vs sequence length", draw)


FIGURES: dict[str, Callable[[pd.DataFrame], Figure | None]] = {
    "speedup_vs_sparsity": fig_speedup_vs_sparsity,
    "quality_vs_speedup": fig_quality_vs_speedup,
    "latency_breakdown": fig_latency_breakdown,
    "speedup_vs_n": fig_speedup_vs_n,
}


def write_figures(df: pd.DataFrame, out_dir: str | Path) -> dict[str, list[Path]]:
    """Save every figure as ``<stem>.png`` and ``<stem>.pdf``; an empty list where nothing was plotted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for stem, make in FIGURES.items():
        fig = make(df)
        written[stem] = []
        if fig is None:
            continue
        for ext in ("png", "pdf"):
            path = out / f"{stem}.{ext}"
            fig.savefig(path, dpi=150, metadata={"CreationDate": None} if ext == "pdf" else None)
            fig.set_layout_engine("none")  # keep the layout the first save computed (the slow part)
            written[stem].append(path)
    return written
