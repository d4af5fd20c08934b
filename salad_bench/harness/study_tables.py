"""The report's tables of a quality study: its ``quality_summary`` rows (means with intervals, the val loss's
excess over the fine-tuned control per timestep band) and its ``hypothesis`` rows (the verdicts).

:mod:`salad_bench.harness.quality.stats` makes those rows; the report's quality and ablation files and the
study's ``intervals.md`` show them through :func:`study_tables`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

import pandas as pd

from salad_bench.harness.frames import ABLATION_TARGET, column, nearest_target, ok_rows, rows_of_kind
from salad_bench.harness.tables import Table

__all__ = ["study_tables"]


def _ci(rec: dict[str, Any], key: str, spec: str) -> str | None:
    v = rec.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    lo, hi = rec.get(f"{key}_lo"), rec.get(f"{key}_hi")
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return format(v, spec)
    return f"{format(v, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


_COLUMNS = (  # key, header, format
    ("val_loss", "val loss", ".4f"), ("val_loss_excess", "vs control", "+.1%"), ("velocity_mse", "velocity MSE", ".4g"),
    ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".3f"), ("classifier_accuracy", "classifier acc.", ".2f"),
    ("frechet_distance", "Frechet", ".3g"), ("temporal_flickering", "flicker", ".4f"),
)  # fmt: skip


def study_tables(
    df: pd.DataFrame, part: str = "quality", *, families: Collection[str] = (), goal: float = ABLATION_TARGET
) -> list[Table]:
    """The report's tables of a study's ``quality_summary`` and ``hypothesis`` rows (``df``: any rows).
    ``part`` "quality": per study and card the cells with intervals, the per-band excess over the control
    and the hypotheses; "ablation": the methods of ``families`` at the target nearest ``goal``, with the
    fine-tuned control."""
    summ = rows_of_kind(ok_rows(df), "quality_summary")
    hyp = rows_of_kind(ok_rows(df), "hypothesis")
    tables = []
    def text(name: str, frame):
        return column(frame, name).map(lambda v: "?" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))

    for (study, card), g in summ.groupby([text("study", summ), text("card", summ)], sort=True):
        recs = g.to_dict("records")
        if part == "ablation":
            fam = {r["method"]: r.get("family") for r in recs}
            picked = nearest_target([r["sparsity_target"] for r in recs if fam.get(r["method"]) in families], goal)
            recs = [r for r in recs if (r.get("family") in families and r["sparsity_target"] == picked)
                    or r.get("family") == "full" and r.get("arm") != "as_is"]  # fmt: skip
            if picked is None or not recs:
                continue
        recs.sort(key=lambda r: (r["sparsity_target"], str(r.get("family")), r["label"]))
        conf = recs[0].get("confidence") or 0.95
        headers = ["method", "arm", "target", "lr", "seeds", "density"] + [h for k, h, _ in _COLUMNS]
        cells = [[r["label"], r.get("arm"), f"{r['sparsity_target']:.2f}", None if pd.isna(r.get("train_lr")) else f"{r['train_lr']:g}",
                  str(int(r["n_seeds"])), None if pd.isna(r.get("density")) else f"{r['density']:.3f}"]
                 + [_ci(r, k, spec) for k, _, spec in _COLUMNS] for r in recs]  # fmt: skip
        keep = [j for j in range(len(headers)) if j < 6 or any(c[j] is not None for c in cells)]
        title = f"quality study {study} · {card}" + (" · ablations" if part == "ablation" else "")
        caption = (f"Means with {conf:.0%} intervals (hierarchical bootstrap: seeds, then videos within each seed). "
                   "'vs control': val loss over the full-attention control fine-tuned with the same recipe, minus 1. "
                   "Each row: the learning rate its sweep picked, every seed.")  # fmt: skip
        tables.append(Table(title, caption, [headers[j] for j in keep], ["l", "l"] + ["r"] * (len(keep) - 2),
                            [[c[j] for j in keep] for c in cells]))  # fmt: skip
        if part == "quality":
            bands = sorted({int(m.group(1)) for k in g.columns if (m := re.fullmatch(r"val_loss_band(\d+)_excess", k))})
            brecs = [r for r in recs if any(not pd.isna(r.get(f"val_loss_band{j}_excess")) for j in bands)]
            if bands and brecs:
                tables.append(Table(
                    f"quality study {study} · {card} · val loss by t band", "Val loss over the fine-tuned control's, minus 1, "
                    f"per timestep band (band j of the rows' t_bands), {conf:.0%} intervals.",
                    ["method", "arm", "target"] + [f"band {j}" for j in bands], ["l", "l", "r"] + ["r"] * len(bands),
                    [[r["label"], r.get("arm"), f"{r['sparsity_target']:.2f}"] + [_ci(r, f"val_loss_band{j}_excess", "+.1%")
                                                                               for j in bands] for r in brecs],
                ))  # fmt: skip
    if part == "quality":
        for study, g in hyp.groupby(text("study", hyp), sort=True):
            cells = [[r["hypothesis"], r["claim"], r["verdict"], r["evidence"]] for r in g.to_dict("records")]
            tables.append(Table(f"quality study {study} · hypotheses", "Held: the whole interval on the claim's side; "
                                "not held: the whole interval on the other side; unresolved: otherwise.",
                                ["id", "claim", "verdict", "evidence"], ["l", "l", "l", "l"], cells))  # fmt: skip
    return tables
