"""Intervals for a quality study and the verdicts on its hypotheses.

``python -m salad_bench.harness.quality.stats RUN [RUN ...] [--config TOML] [--out FILE.md]``

Every ``ok`` quality row carries per-video values (``psnr_per_video``, ``val_loss_per_video``, ...: the
metrics of :data:`~harness.quality.study_config.METRICS`), every cell saw the same videos from the same
noise, and a cell is one fine-tuning seed. So an interval comes from a **hierarchical bootstrap**
(:func:`hierarchical_bootstrap`): each draw resamples the seeds, then the videos within each resampled
seed, and recomputes every compared cell's mean on that draw; cells with the same seeds share the seed
draws and every cell shares the video draws (paired comparisons). A cell with one seed (a training-free
method, or a study with one seed) is resampled over its videos only; a set statistic (Frechet distance)
over its seeds only. Intervals are percentile intervals (``confidence``, 95% by default).

Which rows: per (method, arm, target) the cells of the study's final recipe: the learning rate its
sweep picked (:func:`pick_lrs`: the lowest val loss among the sweep's candidates; rows carry the
sweep's identity) and the budget's steps, every seed. Rows of runs before the study (one recipe, no
sweep) count as they are, each run's ``--seed`` a seed.

Outputs: :func:`summary_rows` (kind ``quality_summary``: per cell group the mean and interval of each
metric, and the val loss's excess over the fine-tuned full control overall and per timestep band) and
:func:`hypothesis_rows` (kind ``hypothesis``: the config's hypotheses, each ``held`` / ``not held`` /
``unresolved`` / ``not tested`` with its intervals); :func:`harness.study_tables.study_tables` turns those
rows into the report's tables and :func:`markdown` into ``intervals.md``. The study runner appends both kinds
to its run.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salad_bench.harness.errors import Parser
from salad_bench.harness.quality.study_config import CONTROL, Hypothesis, StudyConfig, StudyConfigError, metric
from salad_bench.harness.study_tables import study_tables
from salad_bench.harness.tables import to_markdown

__all__ = [
    "Cells",
    "hierarchical_bootstrap",
    "hypothesis_rows",
    "interval",
    "load_cells",
    "main",
    "markdown",
    "pick_lrs",
    "study_tables",
    "summary_rows",
]

Key = tuple[str, str, float]  # (method, arm, sparsity_target)


# -- the bootstrap --------------------------------------------------------------------------------
def hierarchical_bootstrap(groups: Sequence[np.ndarray], draws: int = 10000, seed: int = 0) -> np.ndarray:
    """Each group's mean on ``draws`` hierarchical resamplings: ``(draws, len(groups))``.

    ``groups``: arrays ``(seeds, videos)`` (NaN: a missing value, left out of its mean), all with the same
    number of videos (the same videos: their draws are shared, so comparisons are paired). A draw takes
    ``S`` seeds with replacement (groups with the same ``S`` share these draws: seeds paired by position),
    then for each drawn seed its videos with replacement; a group's value is the mean over its drawn seeds
    of the mean over their drawn videos. One seed: the videos' bootstrap. One video (a set statistic):
    the seeds' bootstrap.
    """
    groups = [np.atleast_2d(np.asarray(g, dtype=np.float64)) for g in groups]
    n_videos = {g.shape[1] for g in groups}
    if len(n_videos) != 1:
        raise ValueError(f"groups have different numbers of videos: {sorted(n_videos)}")
    v = n_videos.pop()
    rng = np.random.default_rng(seed)
    s_max = max(g.shape[0] for g in groups)
    video_idx = rng.integers(0, v, size=(draws, s_max, v))
    seed_idx = {s: rng.integers(0, s, size=(draws, s)) for s in sorted({g.shape[0] for g in groups})}
    out = np.empty((draws, len(groups)))
    for j, g in enumerate(groups):
        s = g.shape[0]
        picked = g[seed_idx[s][:, :, None], video_idx[:, :s, :]]  # (draws, s, v)
        with np.errstate(invalid="ignore"), _quiet():
            out[:, j] = np.nanmean(np.nanmean(picked, axis=2), axis=1)
    return out


class _quiet:
    """Silence numpy's "mean of empty slice" (an all-NaN seed stays NaN, which is what it should say)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def point(group: np.ndarray) -> float:
    """The estimate a bootstrap draw resamples: the mean over seeds of the mean over videos."""
    g = np.atleast_2d(np.asarray(group, dtype=np.float64))
    with _quiet():
        return float(np.nanmean(np.nanmean(g, axis=1)))


def interval(x: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap draws ``x``."""
    a = (1 - confidence) / 2 * 100
    with _quiet():
        lo, hi = np.nanpercentile(x, [a, 100 - a])
    return float(lo), float(hi)


# -- rows into cells ------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _traits(method: str) -> frozenset[str]:
    from salad_bench.methods import METHODS

    return METHODS.get(method).traits if method in METHODS else frozenset()


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    """Fill a row of any vintage with arm, seed and label (runs before issue #25 have none of them)."""
    r = dict(row)
    if not r.get("arm"):  # before issue #25 a run had one recipe, and only trainable methods followed it
        if "trainable" in _traits(str(r.get("method"))):
            from salad_bench.harness.quality.evaluate import arm_name

            r["arm"] = arm_name(r.get("train_params") or "method", r.get("objective") or "flow")
        else:
            r["arm"] = "as_is"
    if r["arm"] == "as_is":
        r["train_seed"] = r["train_lr"] = None
    elif r.get("train_seed") is None:
        m = re.search(r"--seed[ =](\d+)", str(r.get("command", "")))
        r["train_seed"] = int(m.group(1)) if m else 0
    r.setdefault("label", r["method"])
    r["sparsity_target"] = round(float(r.get("sparsity_target") or 0.0), 6)
    return r


def _dedup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest row of each measurement (by date, then read order): seeds and rates are kept apart."""
    keep: dict[tuple, dict[str, Any]] = {}
    for r in sorted(enumerate(rows), key=lambda ir: (str(ir[1].get("date", "")), ir[0])):
        row = r[1]
        k = (row["method"], row["arm"], row["sparsity_target"], _num(row.get("train_lr")), row.get("train_seed"),
             _num(row.get("train_steps_target")), row.get("objective"), row.get("train_params"), row.get("study"))  # fmt: skip
        keep[k] = row
    return list(keep.values())


def pick_lrs(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Per (method, arm): the learning rate whose sweep cell (the row's ``sweep_*`` stamps: steps, seed,
    sparsity) has the lowest val loss; ties go to the smaller rate. Rows without stamps are not sweeps."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in rows:
        lr, loss = _num(r.get("train_lr")), _num(r.get("val_loss"))
        if lr is None or loss is None or r.get("sweep_steps") is None or r.get("status", "ok") != "ok":
            continue
        if not (_num(r.get("train_steps_target")) == r["sweep_steps"] and r.get("train_seed") == r.get("sweep_seed")
                and abs(r["sparsity_target"] - float(r.get("sweep_sparsity", -1))) < 1e-6):  # fmt: skip
            continue
        k = (r["method"], r["arm"])
        if k not in best or (loss, lr) < best[k]:
            best[k] = (loss, lr)
    return {k: lr for k, (_, lr) in best.items()}


class Cells:
    """The final rows of a study by (method, arm, target), each list ordered by seed."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        rows = _dedup([_normalise(r) for r in rows])
        self.picks = pick_lrs(rows)
        self.by_key: dict[Key, list[dict[str, Any]]] = {}
        for r in rows:
            if r["arm"] != "as_is" and r.get("budget_steps") is not None:  # a study's row: the final recipe only
                if _num(r.get("train_steps_target")) != r["budget_steps"]:
                    continue
                if r.get("study_seeds") is not None and r.get("train_seed") not in r["study_seeds"]:
                    continue
                pick = self.picks.get((r["method"], r["arm"]))
                if pick is None or not math.isclose(float(r["train_lr"]), pick, rel_tol=1e-9):
                    continue
            self.by_key.setdefault((r["method"], r["arm"], r["sparsity_target"]), []).append(r)
        for k, rs in self.by_key.items():
            rs.sort(key=lambda r: -1 if r.get("train_seed") is None else int(r["train_seed"]))
            if r_dup := [r for r in rs if r.get("train_seed") is None][1:]:
                raise ValueError(f"{k}: {len(r_dup) + 1} rows of one untrained cell")

    def get(self, method: str, arm: str, sparsity: float) -> list[dict[str, Any]]:
        """The rows of ``method`` in ``arm`` at ``sparsity``; an untrained method (no such arm) as it is."""
        s = round(float(sparsity), 6)
        rows = self.by_key.get((method, arm, s))
        if rows is None and "trainable" not in _traits(method):
            rows = self.by_key.get((method, "as_is", 0.0 if "dense" in _traits(method) else s))
        return rows or []

    def control(self, arm: str) -> list[dict[str, Any]]:
        """The fine-tuned full-attention control: the registry's reference method in ``arm``, target 0."""
        from salad_bench.harness.quality.evaluate import reference_method

        return self.by_key.get((reference_method(), arm, 0.0), [])


def load_cells(runs: Sequence[str | Path]) -> Cells:
    """:class:`Cells` of the ``ok`` quality rows of every rows file in ``runs``."""
    from salad_bench.harness.quality.evaluate import existing_rows
    from salad_bench.harness.results import read_jsonl

    rows = []
    for run in runs:
        p = Path(run)
        if p.is_dir():
            got = existing_rows(p)
            if not got:
                raise FileNotFoundError(f"{p}: no rows.jsonl (or rows.rank<R>.jsonl) here")
        else:
            got = read_jsonl(p)
        rows += got
    return Cells([r for r in rows if r.get("kind") == "quality" and r.get("status") == "ok"])


def _values(rows: list[dict[str, Any]], name: str) -> np.ndarray | None:
    """``(seeds, videos)`` of metric ``name`` over ``rows`` (``(seeds, 1)`` for a set statistic); None when a
    row lacks it."""
    m = metric(name)
    out = []
    for r in rows:
        if m.per_video is None:
            v = _num(r.get(m.value))
            if v is None:
                return None
            out.append([v])
        else:
            vals = r.get(m.per_video)
            if not isinstance(vals, list | tuple | np.ndarray) or len(vals) == 0:
                return None
            out.append([np.nan if x is None else float(x) for x in vals])
    if not out or len({len(x) for x in out}) != 1:
        return None
    return np.asarray(out)


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two trained cells on the seeds both have (paired by seed); as they are otherwise."""
    sa, sb = {r.get("train_seed") for r in a}, {r.get("train_seed") for r in b}
    if None in sa or None in sb or not (sa & sb) or sa == sb:
        return a, b
    common = sa & sb
    return [r for r in a if r.get("train_seed") in common], [r for r in b if r.get("train_seed") in common]


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]], name: str, how: str, *, draws: int = 10000,
            confidence: float = 0.95, seed: int = 0) -> dict[str, Any] | None:  # fmt: skip
    """``how`` "ratio": ``mean(a) / mean(b) - 1``; "better": ``(mean(a) - mean(b))`` signed so that positive
    means ``a`` is better; "difference": ``mean(a) - mean(b)``. None when either side lacks the metric."""
    a, b = _paired(a, b)
    va, vb = _values(a, name), _values(b, name)
    if va is None or vb is None or va.shape[1] != vb.shape[1]:
        return None
    sign = 1.0 if metric(name).better == "higher" else -1.0
    f = {"ratio": lambda x, y: x / y - 1.0, "difference": lambda x, y: x - y, "better": lambda x, y: sign * (x - y)}[how]
    d = hierarchical_bootstrap([va, vb], draws, seed)
    lo, hi = interval(f(d[:, 0], d[:, 1]), confidence)
    return {"estimate": float(f(point(va), point(vb))), "lo": lo, "hi": hi, "n_seeds": (len(a), len(b))}


def estimate(rows: list[dict[str, Any]], name: str, *, draws: int = 10000, confidence: float = 0.95) -> dict[str, Any] | None:
    v = _values(rows, name)
    if v is None:
        return None
    lo, hi = interval(hierarchical_bootstrap([v], draws)[:, 0], confidence)
    return {"estimate": point(v), "lo": lo, "hi": hi}


# -- summaries and verdicts -------------------------------------------------------------------------
SUMMARY_METRICS = ("val_loss", "velocity_mse", "psnr", "ssim", "classifier_accuracy", "frechet_distance", "temporal_flickering")


def _label(rows: list[dict[str, Any]]) -> str:
    return str(rows[0].get("label") or rows[0]["method"])


def summary_rows(cells: Cells, *, control_arm: str = "ft", study: str | None = None, draws: int = 10000,
                 confidence: float = 0.95) -> list[dict[str, Any]]:  # fmt: skip
    """One ``quality_summary`` row per (method, arm, target): each metric's mean and interval over seeds and
    videos, and the val loss's excess over the fine-tuned control (overall and per band)."""
    from salad_bench.harness.results import config_hash

    control = cells.control(control_arm)
    out = []
    for (method, arm, s), rows in sorted(cells.by_key.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        r0 = rows[0]
        rec: dict[str, Any] = {
            "kind": "quality_summary", "study": study or r0.get("study"), "method": method, "label": _label(rows),
            "arm": arm, "family": r0.get("family"), "sparsity_target": s, "workload": r0.get("workload"),
            "dtype": r0.get("dtype"), "card": r0.get("card"), "train_lr": r0.get("train_lr"), "n_seeds": len(rows),
            "seeds": [r.get("train_seed") for r in rows], "train_steps": r0.get("train_steps"),
            "trainable_params": r0.get("trainable_params"), "train_params": r0.get("train_params"),
            "objective": r0.get("objective"), "n_val": r0.get("n_val"), "n_eval": r0.get("n_eval"),
            "density": float(np.mean([r["density"] for r in rows if r.get("density") is not None] or [np.nan])),
            "bootstrap_draws": draws, "confidence": confidence, "status": "ok",
            "git_sha": r0.get("git_sha"), "date": max(str(r.get("date", "")) for r in rows),
        }  # fmt: skip
        rec["config_hash"] = config_hash({"summary": rec["study"], "method": method, "arm": arm, "sparsity": s})
        for name in SUMMARY_METRICS:
            e = estimate(rows, name, draws=draws, confidence=confidence)
            if e is not None:
                rec[name], rec[f"{name}_lo"], rec[f"{name}_hi"] = e["estimate"], e["lo"], e["hi"]
            elif all(_num(r.get(metric(name).value)) is not None for r in rows):  # rows without per-video values
                rec[name] = float(np.mean([_num(r.get(metric(name).value)) for r in rows]))  # a mean, no interval
        if control and rows is not control:
            bands = sorted({int(m.group(1)) for k in r0 if (m := re.fullmatch(r"val_loss_band(\d+)_per_video", k))})
            for name, key in [("val_loss", "val_loss_excess")] + [(f"val_loss_band{j}", f"val_loss_band{j}_excess") for j in bands]:
                c = compare(rows, control, name, "ratio", draws=draws, confidence=confidence)
                if c is not None:
                    rec[key], rec[f"{key}_lo"], rec[f"{key}_hi"] = c["estimate"], c["lo"], c["hi"]
            rec["control_seeds"] = [r.get("train_seed") for r in control]
        out.append(rec)
    return out


def _part_verdict(c: dict[str, Any], comparison: str, threshold: float) -> str:
    if comparison == "within":  # the excess at most the threshold
        return "held" if c["hi"] <= threshold else "not held" if c["lo"] > threshold else "unresolved"
    return "held" if c["lo"] > threshold else "not held" if c["hi"] < threshold else "unresolved"


def verdict_of(parts: list[str]) -> str:
    """A conjunction: held when every part holds; not held when any part does not; not tested when no part
    was measured; unresolved otherwise (a part unresolved or not measured)."""
    if parts and all(p == "not tested" for p in parts):
        return "not tested"
    if "not held" in parts:
        return "not held"
    return "held" if parts and all(p == "held" for p in parts) else "unresolved"


def hypothesis_rows(cells: Cells, config: StudyConfig, *, draws: int | None = None) -> list[dict[str, Any]]:
    """One ``hypothesis`` row per hypothesis of ``config``: its parts (metric x sparsity) with estimate and
    interval, and the verdict."""
    from salad_bench.harness.results import config_hash

    draws = draws or config.bootstrap_draws
    out = []
    for h in config.hypotheses:
        parts = []
        for s in h.sparsities:
            a = cells.get(h.method, h.arm, s)
            b = cells.control(h.versus_arm) if h.versus == CONTROL else cells.get(h.versus, h.versus_arm, s)
            for name in h.metrics:
                part: dict[str, Any] = {"metric": name, "sparsity": s}
                c = compare(a, b, name, "ratio" if h.comparison == "within" else "better", draws=draws,
                            confidence=config.confidence) if a and b else None  # fmt: skip
                if c is None:
                    missing = [who for who, rows in ((h.method, a), (h.versus, b)) if not rows]
                    why = f"no rows of {', '.join(missing)}" if missing else f"{name} not measured"
                    parts.append({**part, "verdict": "not tested", "why": why})
                    continue
                parts.append({**part, **c, "verdict": _part_verdict(c, h.comparison, h.threshold)})
        out.append({
            "kind": "hypothesis", "study": config.name, "method": h.id, "hypothesis": h.id, "claim": h.claim,
            "verdict": verdict_of([p["verdict"] for p in parts]), "parts": parts, "evidence": _evidence(h, parts),
            "comparison": h.comparison, "threshold": h.threshold, "versus": h.versus, "arm": h.arm,
            "config_hash": config_hash(h.as_dict()), "bootstrap_draws": draws, "confidence": config.confidence,
            "status": "ok",
        })  # fmt: skip
    return out


def _fmt(name: str, x: float, ratio: bool) -> str:
    if ratio:
        return f"{x:+.1%}"
    return f"{x:+.2f}" if name in ("psnr",) else f"{x:+.3g}"


def _evidence(h: Hypothesis, parts: list[dict[str, Any]]) -> str:
    ratio = h.comparison == "within"
    what = "excess over" if ratio else "improvement over"
    vs = "the fine-tuned control" if h.versus == CONTROL else h.versus
    bits = []
    for p in parts:
        where = f"{p['metric']} at {p['sparsity']:.0%}"
        if p["verdict"] == "not tested":
            bits.append(f"{where}: not tested ({p['why']})")
        else:
            n = "x".join(map(str, p["n_seeds"]))
            bits.append(f"{where}: {_fmt(p['metric'], p['estimate'], ratio)} [{_fmt(p['metric'], p['lo'], ratio)}, "
                        f"{_fmt(p['metric'], p['hi'], ratio)}] ({p['verdict']}; seeds {n})")  # fmt: skip
    return f"{what} {vs} (threshold {h.threshold:+g}): " + "; ".join(bits)


def markdown(summary: list[dict[str, Any]], hypotheses: list[dict[str, Any]]) -> str:
    """The study's tables as Markdown (``intervals.md`` beside the rows)."""
    import pandas as pd

    df = pd.DataFrame(summary + hypotheses)
    return to_markdown(study_tables(df, "quality")) if not df.empty else "(no rows)\n"


def main(argv: list[str] | None = None) -> int:
    from salad_bench.harness.quality.study_config import load_config

    p = Parser(prog="python -m salad_bench.harness.quality.stats", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="quality run directories (rows*.jsonl) or rows files")
    p.add_argument("--config", default=None, help="the study config whose hypotheses are checked (default: the committed one)")
    p.add_argument("--draws", type=int, default=None, help="bootstrap draws (default: the config's)")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    a = p.parse_args(argv)
    try:
        config = load_config(a.config)
        cells = load_cells(a.runs)
    except (StudyConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    draws = a.draws or config.bootstrap_draws
    summ = summary_rows(cells, control_arm=config.control_arm, draws=draws, confidence=config.confidence)
    hyp = hypothesis_rows(cells, config, draws=draws)
    text = markdown(summ, hyp)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
