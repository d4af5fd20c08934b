"""Paired bootstrap intervals for a quality study, and the issue's hypotheses checked against them.

``python -m salad_bench.harness.quality.stats RUN [RUN ...] [--ref salad] [--out FILE.md]``

Every ``ok`` quality row carries per-video values (``psnr_per_video``, ``ssim_per_video`` over the
evaluation videos, ``val_loss_per_video`` over the validation videos), and every method saw the same
videos from the same noise. So differences between methods are paired: one bootstrap draw resamples the
videos once and recomputes every method's mean on that draw. Printed per method: mean PSNR, SSIM and
``val_loss / val_loss(full) - 1`` with 95% percentile intervals; per comparison ``ref - other`` the PSNR
difference with its interval and the share of draws above zero. The intervals cover the choice of
videos, not the fine-tuning seed (a study at another ``--seed`` gives that spread).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bootstrap", "hypotheses", "load_study", "main"]

LOSS_MARGIN = 0.02  # "within 2% of the full model's validation loss"


def load_study(runs: list[str | Path], sparsity: float | None = None) -> dict[str, dict[str, Any]]:
    """Latest ``ok`` quality row per method (at ``sparsity_target`` when given), with its per-video values."""
    from salad_bench.harness.results import latest_per_cell, load_rows

    frames = [load_rows(r) for r in runs]
    import pandas as pd

    df = latest_per_cell(pd.concat(frames, ignore_index=True))
    if "kind" in df:
        df = df[df["kind"] == "quality"]
    df = df[df["status"] == "ok"]
    out: dict[str, dict[str, Any]] = {}
    for _, r in df.iterrows():
        row = {k: v for k, v in r.items() if not (isinstance(v, float) and np.isnan(v))}
        if row.get("method") == "full" or sparsity is None or abs(float(row.get("sparsity_target", -1)) - sparsity) < 1e-9:
            out[row["method"]] = row
    missing = [m for m, r in out.items() if not isinstance(r.get("psnr_per_video"), list | np.ndarray) and m != "full"]
    if missing:
        raise ValueError(
            f"rows without per-video values: {', '.join(missing)} (measured before they were recorded); "
            "rerun those methods with python -m salad_bench.harness.quality.evaluate"
        )
    return out


def _psnr_matrix(rows: dict[str, dict[str, Any]], methods: list[str]) -> np.ndarray:
    mats = []
    for m in methods:
        v = np.array([np.nan if x is None else float(x) for x in rows[m]["psnr_per_video"]], dtype=np.float64)
        mats.append(v)
    lens = {len(v) for v in mats}
    if len(lens) != 1:
        raise ValueError(f"methods were scored on different numbers of videos: {sorted(lens)}")
    return np.stack(mats)


def bootstrap(values: np.ndarray, stat, draws: int = 10000, seed: int = 0) -> np.ndarray:
    """``stat`` of ``values`` (methods x videos) on ``draws`` resamplings of the video axis, shared by all
    methods (paired): returns ``draws x stat-shape``."""
    rng = np.random.default_rng(seed)
    n = values.shape[-1]
    idx = rng.integers(0, n, size=(draws, n))
    return np.stack([stat(values[..., i]) for i in idx])


def _ci(x: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(x, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(rows: dict[str, dict[str, Any]], draws: int = 10000) -> list[dict[str, Any]]:
    """Per method: means and 95% intervals of PSNR, SSIM and the relative validation loss."""
    out = []
    full_loss = np.asarray(rows["full"]["val_loss_per_video"], dtype=np.float64) if "full" in rows else None
    for m, r in rows.items():
        rec: dict[str, Any] = {"method": m, "density": r.get("density"), "train_steps": r.get("train_steps")}
        for key in ("psnr", "ssim"):
            vals = r.get(f"{key}_per_video")
            if isinstance(vals, list | np.ndarray) and None not in list(vals):
                v = np.asarray(vals, dtype=np.float64)
                rec[key] = float(v.mean())
                rec[f"{key}_ci"] = _ci(bootstrap(v[None], lambda x: x.mean(-1), draws)[:, 0])
        loss = r.get("val_loss_per_video")
        if full_loss is not None and isinstance(loss, list | np.ndarray) and len(loss) == len(full_loss):
            pair = np.stack([np.asarray(loss, dtype=np.float64), full_loss])
            rel = bootstrap(pair, lambda x: x[0].mean() / x[1].mean() - 1.0, draws)
            rec["val_loss_rel"] = float(pair[0].mean() / pair[1].mean() - 1.0)
            rec["val_loss_rel_ci"] = _ci(rel)
        out.append(rec)
    return out


def compare(rows: dict[str, dict[str, Any]], ref: str, others: list[str], draws: int = 10000) -> list[dict[str, Any]]:
    """``ref - other`` PSNR per other method: mean difference, 95% interval, share of draws above zero."""
    others = [o for o in others if o in rows and o != ref]
    if ref not in rows or not others:
        return []
    mat = _psnr_matrix(rows, [ref, *others])
    diffs = bootstrap(mat, lambda x: x[0].mean() - x[1:].mean(-1), draws)
    out = []
    for j, o in enumerate(others):
        d = diffs[:, j]
        out.append({"ref": ref, "other": o, "psnr_diff": float(mat[0].mean() - mat[j + 1].mean()), "ci": _ci(d),
                    "p_above_zero": float((d > 0).mean())})  # fmt: skip
    return out


def _family(name: str) -> str:
    from salad_bench.harness.quality.evaluate import _family as fam

    return fam(name)


DENSITY_SLACK = 0.05  # a method counts as "at" the target sparsity when its density is within this


def hypotheses(rows: dict[str, dict[str, Any]], ref: str = "salad", draws: int = 10000,
               sparsity: float = 0.9) -> list[dict[str, str]]:
    """The issue's claims at this sparsity, each ``held`` / ``not held`` / ``not tested`` with its evidence.
    A claim holds only when the whole 95% interval is on its side. Training-free methods whose measured
    density stays above ``1 - sparsity + DENSITY_SLACK`` (radial's floor) did not run at this sparsity:
    they are named in the evidence and left out of the comparison."""
    summ = {s["method"]: s for s in summarize(rows, draws)}
    out = []
    s = summ.get(ref, {})
    if "val_loss_rel_ci" in s:
        lo, hi = s["val_loss_rel_ci"]
        verdict = "held" if hi <= LOSS_MARGIN else "not held"
        out.append({"claim": f"{ref} within 2% of full's validation loss", "verdict": verdict,
                    "evidence": f"{s['val_loss_rel']:+.1%} [{lo:+.1%}, {hi:+.1%}]"})  # fmt: skip
    free = [m for m in rows if m != "full" and _family(m) == "training_free"]
    limit = 1.0 - sparsity + DENSITY_SLACK
    above = [m for m in free if (rows[m].get("density") or 1.0) > limit]
    free = [m for m in free if m not in above]
    groups = (
        ("higher PSNR than every training-free method", free),
        ("higher PSNR than sparse_lora", ["sparse_lora"]),
        ("the gate matters (vs salad_no_gate, salad_static_gate)", ["salad_no_gate", "salad_static_gate"]),
        ("the linear branch matters (vs salad_no_linear)", ["salad_no_linear"]),
    )
    for claim, others in groups:
        comps = compare(rows, ref, others, draws)
        if not comps:
            out.append({"claim": f"{ref} {claim}", "verdict": "not tested", "evidence": "rows missing"})
            continue
        held = all(c["ci"][0] > 0 for c in comps)
        ev = "; ".join(f"vs {c['other']} {c['psnr_diff']:+.2f} dB [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]" for c in comps)
        if others is free and above:
            ev += "; not at this sparsity, left out: " + ", ".join(f"{m} (density {rows[m]['density']:.3f})" for m in above)
        out.append({"claim": f"{ref} {claim}", "verdict": "held" if held else "not held", "evidence": ev})
    return out


def markdown(rows: dict[str, dict[str, Any]], ref: str, draws: int = 10000, sparsity: float = 0.9) -> str:
    def ci(rec, key, fmt):
        if key not in rec:
            return "-"
        lo, hi = rec[f"{key}_ci"]
        return f"{format(rec[key], fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"

    n_eval = max((len(r.get("psnr_per_video") or []) for r in rows.values()), default=0)
    n_val = max((len(r.get("val_loss_per_video") or []) for r in rows.values()), default=0)
    lines = [f"Paired bootstrap over {n_eval} evaluation videos (PSNR, SSIM) and {n_val} validation videos (loss), "
             f"{draws} draws, 95% intervals.", "",
             "| method | steps | density | PSNR dB | SSIM | val loss vs full |", "|---|---|---|---|---|---|"]  # fmt: skip
    for rec in sorted(summarize(rows, draws), key=lambda r: -(r.get("psnr") or np.inf)):
        dens = rec.get("density")
        lines.append(f"| {rec['method']} | {rec.get('train_steps') or 0} | {'-' if dens is None else f'{dens:.3f}'} | "
                     f"{ci(rec, 'psnr', '.2f')} | {ci(rec, 'ssim', '.3f')} | {ci(rec, 'val_loss_rel', '+.1%')} |")  # fmt: skip
    lines += ["", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {h['claim']} | {h['verdict']} | {h['evidence']} |" for h in hypotheses(rows, ref, draws, sparsity)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m salad_bench.harness.quality.stats", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="quality run directories (rows.jsonl)")
    p.add_argument("--ref", default="salad", help="the method the claims are about")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--draws", type=int, default=10000)
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    a = p.parse_args(argv)
    try:
        rows = load_study(a.runs, a.sparsity)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown(rows, a.ref, a.draws, a.sparsity)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
