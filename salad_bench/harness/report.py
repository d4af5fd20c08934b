"""Paper-style tables (Markdown and LaTeX/booktabs) from result rows, plus the ``reports/`` writer.

Every table is a pure function of a DataFrame of rows (the schema in :mod:`harness.results`) and
names its card and its dense baseline in the caption. Which tables each file holds, and each table's rows
(kind, families, goal sparsity), grouping and columns, are the experiment config
``harness/experiments/paper_tables.toml`` (:func:`load_tables`, ``--tables FILE`` for another); captions and
the columns that depend on the rows are code here. Tables:

* ``main``: attention rows (``kind`` "attention") per (card, workload, dtype, pass): measured sparsity,
  density, latency, speedup over the run's dense baseline (``speedup``/``baseline_backend``) and over
  FA2 (``speedup_vs_fa2``), TFLOP/s, ``rel_l2`` and whatever quality columns the rows carry.
* ``quality``: rows with ``kind`` "quality" (their own workloads, so not joined into ``main``); a quality
  study's cells (rows with a ``study``) through its summary and hypothesis rows, with their intervals
  (:func:`harness.study_tables.study_tables`).
* ``ablation``: families ``salad`` and ``ablation``, each method at the target sparsity nearest the goal
  (90%); a quality study's too.
* ``kernel``: rows with ``kind`` "kernel".
* ``dit``: end-to-end rows (``kind`` "dit", :mod:`harness.dit`): total ``ms`` (or ``total_ms``),
  self-attention ``attn_ms`` (or ``self_attn_ms``), ``rest_ms`` (or total minus attention),
  ``attn_share``, ``speedup`` and ``attn_speedup``.
* ``skipped``: every row whose status is not "ok", with its reason (never dropped silently).

CLI: ``python -m salad_bench.harness.report results/<run> [more runs] [--out reports/] [--tables FILE]``.
"""

from __future__ import annotations

import difflib
import statistics
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from salad_bench.harness.errors import BadInput, Parser
from salad_bench.harness.frames import (  # noqa: F401  (re-exported: report's public helpers)
    ABLATION_TARGET,
    IDENTITY,
    _missing,
    attention_rows,
    column,
    dense_backend,
    dit_frame,
    group_rows,
    nearest_target,
    ok_rows,
    rows_of_kind,
    with_identity,
)
from salad_bench.harness.results import ResultsFileError, headline_times, latest_per_cell, load_rows, round_ratios
from salad_bench.harness.study_tables import study_tables
from salad_bench.harness.tables import Column, Table, to_latex, to_markdown
from salad_bench.methods.base import FAMILIES

__all__ = [
    "Column",
    "Table",
    "ablation_tables",
    "attention_rows",
    "build_tables",
    "dense_backend",
    "dit_tables",
    "kernel_tables",
    "main",
    "main_tables",
    "nearest_target",
    "quality_columns",
    "quality_tables",
    "skipped_table",
    "to_latex",
    "to_markdown",
    "write_reports",
]

QUALITY_FIXED = ("psnr", "ssim", "lpips", "val_loss", "val_loss_rel", "temporal_flickering")
BACKEND_LABELS = {
    "cudnn": "cuDNN",
    "flash": "FA2 (SDPA flash)",
    "flash_attn2": "FA2",
    "flash_attn3": "FA3",
    "fa4": "FA4",
    "efficient": "SDPA mem-efficient",
    "math": "SDPA math",
    "flex": "FlexAttention",
    "default": "SDPA default",
}


def _num(spec: str) -> Callable[[Any], str]:
    return lambda v: format(float(v), spec)


def _ms(v: Any) -> str:
    v = float(v)
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _rate(v: Any) -> str:
    """TFLOP/s: whole numbers on a GPU, three significant digits for small (CPU) rates."""
    v = float(v)
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f}%"


def _int(v: Any) -> str:
    return str(int(v))


def _backend_label(backend: Any) -> str:
    return BACKEND_LABELS.get(str(backend), str(backend))


def _text(key: str, header: str | None = None, fmt: Callable[[Any], str] = str) -> Column:
    return Column(key, key if header is None else header, fmt, "l")


# Every column a table can name (experiments/paper_tables.toml): a row field shown the same way in every table.
COLUMNS: dict[str, Column] = {c.key: c for c in (
    *map(_text, ("method", "family", "variant", "backend", "workload", "card", "kind", "pass", "status", "reason")),
    _text("baseline_backend", "baseline", _backend_label),
    Column("N", "N", _int),
    Column("git_sha", "commit", lambda v: str(v)[:7]),
    Column("sparsity_target", "target", _num(".2f")),
    Column("sparsity", "sparsity", _num(".3f")),
    Column("density", "density", _num(".3f")),
    Column("ms", "ms", _ms),
    Column("ms_p20", "p20", _ms),
    Column("ms_p80", "p80", _ms),
    Column("total_ms", "total ms", _ms),
    Column("attn_ms", "self-attn ms", _ms),
    Column("rest_ms", "rest ms", _ms),
    Column("attn_share", "attn share", _pct),
    Column("speedup", "speedup", _num(".2f"), best="max"),
    Column("speedup_vs_fa2", "× FA2", _num(".2f"), best="max"),
    Column("attn_speedup", "attn speedup", _num(".2f"), best="max"),
    Column("tflops_dense_equiv", "TFLOP/s (dense-eq.)", _rate),
    Column("tflops_executed", "TFLOP/s (exec.)", _rate),
    Column("mfu", "MFU", _pct),
    Column("rel_l2", "rel L2", _num(".4f"), best="min"),
    Column("psnr", "psnr", _num(".2f"), best="max"),
    Column("ssim", "ssim", _num(".4f"), best="max"),
    Column("lpips", "lpips", _num(".4f"), best="min"),
    Column("val_loss", "val loss", _num(".4f"), best="min"),
    Column("val_loss_rel", "val loss rel", _num(".4f"), best="min"),
    Column("compile_s", "compile s", _num(".1f")),
    Column("sampling_ms_est", "50-step CFG s (est.)", lambda v: f"{float(v) / 1000:.1f}"),
    # the kernel headline's summary of each measurement over the rounds
    _text("name", "measurement"),
    Column("median", "median ms", _ms),
    Column("min", "min", _ms),
    Column("max", "max", _ms),
    Column("rounds", "rounds", _int),
    Column("x_cudnn", "x cuDNN dense (median of rounds)", _num(".2f")),
    Column("x_flex", "x Flex same mask (median of rounds)", _num(".2f")),
)}  # fmt: skip
QUALITY_METRICS = "quality_metrics"  # in a column list: the quality metrics the rows carry (quality_columns)


def col(key: str, header: str | None = None) -> Column:
    """A registered column (``header`` overrides its header in one table)."""
    return COLUMNS[key] if header is None else replace(COLUMNS[key], header=header)


def _make_table(
    df: pd.DataFrame, columns: list[Column], title: str, caption: str, *, drop_empty: Iterable[str] = ()
) -> Table:
    """Render ``df`` under ``columns``; columns named in ``drop_empty`` vanish when every value is missing."""
    drop = set(drop_empty)
    cols = [c for c in columns if c.key not in drop or (c.key in df and df[c.key].notna().any())]
    records = df.to_dict("records")
    cells = [[None if (c.key not in df or _missing(r.get(c.key))) else c.fmt(r.get(c.key)) for c in cols] for r in records]
    bold: set[tuple[int, int]] = set()
    for j, c in enumerate(cols):
        if c.best is None or c.key not in df:
            continue
        vals = pd.to_numeric(df[c.key], errors="coerce").where(column(df, "family").astype(str) != "full")
        if vals.notna().sum() < 2:
            continue
        target = vals.max() if c.best == "max" else vals.min()
        bold |= {(i, j) for i, v in enumerate(vals) if v == target}
    return Table(title, caption, [c.header for c in cols], [c.align for c in cols], cells, bold)


# -- row selection helpers -----------------------------------------------------------------------
def _sort(df: pd.DataFrame) -> pd.DataFrame:
    fam = column(df, "family").map(lambda f: FAMILIES.index(f) if f in FAMILIES else len(FAMILIES))
    key = pd.DataFrame(
        {
            "fam": fam,
            "method": column(df, "method").astype(str),
            "target": pd.to_numeric(column(df, "sparsity_target"), errors="coerce"),
            "N": pd.to_numeric(column(df, "N"), errors="coerce"),
        },
        index=df.index,
    )
    order = key.sort_values(["fam", "method", "target", "N"], kind="stable", na_position="first").index
    return df.loc[order]


def _unique(df: pd.DataFrame, name: str) -> list[Any]:
    seen: list[Any] = []
    for v in column(df, name):
        if not _missing(v) and v not in seen:
            seen.append(v)
    return seen


def quality_columns(df: pd.DataFrame) -> list[str]:
    """Numeric quality columns with at least one value, in a fixed order (``vbench_*`` sorted, last).

    Text columns such as ``vbench_runner`` or ``vbench_reason`` are not metrics and are left out."""

    def numeric(c: str) -> bool:
        return c in df and pd.to_numeric(df[c], errors="coerce").notna().any()

    fixed = [c for c in QUALITY_FIXED if numeric(c)]
    return fixed + sorted(c for c in map(str, df.columns) if c.startswith("vbench_") and numeric(c))


def _quality_cols(names: list[str]) -> list[Column]:
    return [col(n, n.replace("_", " ")) if n in COLUMNS
            else Column(n, (n[7:] if n.startswith("vbench_") else n).replace("_", " "), _num(".4f")) for n in names]


# -- captions ------------------------------------------------------------------------------------
def _shape_text(df: pd.DataFrame) -> str:
    parts = []
    dims = [(_unique(df, k) or [None])[0] for k in ("B", "H", "N", "D")]
    if all(d is not None for d in dims) and all(len(_unique(df, k)) == 1 for k in ("B", "H", "N", "D")):
        parts.append("B×H×N×D = " + "×".join(str(int(d)) for d in dims))
    grids = _unique(df.assign(grid=column(df, "grid").map(_grid_text)), "grid")
    if len(grids) == 1 and grids[0]:
        parts.append(f"grid {grids[0]}")
    return ", ".join(parts)


def _grid_text(g: Any) -> str | None:
    if isinstance(g, (list, tuple)):
        return "×".join(str(x) for x in g)
    return None if _missing(g) else str(g)


def _baseline_text(df: pd.DataFrame, *, fa2: bool = True) -> str:
    """Which dense baseline the speedups use, with its time when it is one value."""
    texts = []
    df = df[column(df, "baseline_method").notna() | column(df, "baseline_backend").notna()]
    for (method, backend), g in df.groupby(
        [column(df, "baseline_method").fillna("?"), column(df, "baseline_backend").fillna("?")], sort=True
    ):
        ms = _unique(g, "baseline_ms")
        on_cpu = str(_unique(g, "card")[0] if _unique(g, "card") else "").startswith("cpu")
        label = (f"{backend}, CPU" if on_cpu else _backend_label(backend)) if backend != "?" else "unknown backend"
        time = f", {_ms(ms[0])} ms" if len(ms) == 1 else ""
        texts.append(f"dense {method} ({label}{time})")
    if not texts:
        return "Speedup baseline: none recorded in these rows."
    text = "Speedup over " + "; ".join(texts) + ", measured in the same run on the same card."
    fa2_ms = _unique(df, "fa2_ms")
    if fa2 and fa2_ms:
        text += f" vs FA2: over SDPA flash ({_ms(fa2_ms[0])} ms)." if len(fa2_ms) == 1 else " vs FA2: over SDPA flash."
    return text


def _timing_text(df: pd.DataFrame) -> str:
    reps, timers = _unique(df, "reps"), _unique(df, "timer")
    if len(reps) == 1 and len(timers) == 1:
        return f" Latency: median of {int(reps[0])} ({timers[0]})."
    return " Latency: median."


def _title(group: dict[str, Any]) -> str:
    return " · ".join(v for v in group.values() if v) or "rows"


# -- the paper's tables (experiments/paper_tables.toml) ------------------------------------------
PAPER_TABLES = Path(__file__).parent / "experiments" / "paper_tables.toml"
KINDS = ("attention", "quality", "kernel", "dit")
_FRAMES: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {"attention": attention_rows, "dit": dit_frame}


class _Group(dict):
    """A group's key values; a field the table does not group by reads as missing ("")."""

    def __missing__(self, key: str) -> str:
        return ""


@dataclass(frozen=True)
class TableSpec:
    """One ``[tables.<name>]`` of the paper's tables: which rows, grouped how, under which columns."""

    name: str
    group_by: tuple[str, ...]
    columns: tuple[str, ...]
    kind: str | None = None
    families: tuple[str, ...] = ()
    goal: float = ABLATION_TARGET
    optional: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)

    def rows(self, df: pd.DataFrame) -> pd.DataFrame:
        """The ok rows of this table's kind (every row when it names none), of its families."""
        if self.kind is None:
            rows = with_identity(df)
        else:
            rows = _FRAMES.get(self.kind, lambda d: rows_of_kind(ok_rows(d), self.kind))(df)
        return rows[column(rows, "family").isin(self.families)] if self.families else rows

    def groups(self, rows: pd.DataFrame) -> list[tuple[_Group, pd.DataFrame]]:
        return [(_Group(key), g) for key, g in group_rows(rows, self.group_by)]

    def table(self, g: pd.DataFrame, title: str, caption: str, *, skip: Iterable[str] = (),
              headers: dict[str, str] | None = None) -> Table:  # fmt: skip
        """``g`` under this table's columns, less ``skip``, with ``headers`` over the configured ones."""
        names = {**self.headers, **(headers or {})}
        cols: list[Column] = []
        for key in (k for k in self.columns if k not in set(skip)):
            cols += _quality_cols(quality_columns(g)) if key == QUALITY_METRICS else [col(key, names.get(key))]
        return _make_table(g, cols, title, caption, drop_empty=self.optional)


@dataclass(frozen=True)
class PaperTables:
    """The report's files (stem -> its tables in order) and every table's spec."""

    files: dict[str, tuple[str, ...]]
    tables: dict[str, TableSpec]


def load_tables(path: str | Path = PAPER_TABLES) -> PaperTables:
    """Read and check the paper's tables; a bad file is :class:`BadInput` naming the key and the fix."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BadInput(f"{path}: cannot read the paper's tables ({exc})") from None

    def bad(where: str, what: str) -> BadInput:
        return BadInput(f"{path}: {where}: {what} (see {PAPER_TABLES.name}'s header for the keys)")

    def names(where: str, value: Any, known: Iterable[str] | None = None) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(where, f"must be a list of strings, not {value!r}")
        for v in value if known is not None else ():
            if v not in known:
                hint = difflib.get_close_matches(v, list(known), n=1)
                raise bad(where, f"unknown name {v!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; known: {', '.join(known)}")  # fmt: skip
        return tuple(value)

    if set(raw) != {"files", "tables"} or not all(isinstance(raw[k], dict) for k in raw):
        raise bad("top level", f"must hold [files] and [tables.<name>] and nothing else, not {', '.join(raw) or 'nothing'}")
    tables: dict[str, TableSpec] = {}
    for name, t in raw["tables"].items():
        where = f"[tables.{name}]"
        names("tables", [name], BUILDERS)
        if not isinstance(t, dict):
            raise bad(where, "must be a table of keys")
        names(where, list(t), TableSpec.__dataclass_fields__.keys() - {"name"})
        columns = names(f"{where} columns", t.get("columns"), [*COLUMNS, QUALITY_METRICS])
        headers = t.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise bad(f"{where} headers", 'must be a table of column = "header"')
        names(f"{where} headers", list(headers), columns)
        goal = t.get("goal", ABLATION_TARGET)
        if isinstance(goal, bool) or not isinstance(goal, int | float) or not 0 <= goal <= 1:
            raise bad(f"{where} goal", f"must be a sparsity in [0, 1], not {goal!r}")
        kind = t.get("kind")
        if kind is not None and kind not in KINDS:
            raise bad(f"{where} kind", f"must be one of {', '.join(KINDS)}, not {kind!r}")
        tables[name] = TableSpec(
            name, names(f"{where} group_by", t.get("group_by")), columns, kind,
            names(f"{where} families", t.get("families", []), FAMILIES), float(goal),
            names(f"{where} optional", t.get("optional", []), columns), headers,
        )  # fmt: skip
    files = {stem: names(f"[files] {stem}", v, tables) for stem, v in raw["files"].items()}
    if unused := tables.keys() - {n for v in files.values() for n in v}:
        raise bad("[files]", f"no file shows {', '.join(sorted(unused))}; add it to a file or remove its section")
    return PaperTables(files, tables)


# -- tables --------------------------------------------------------------------------------------
def main_tables(df: pd.DataFrame, spec: TableSpec | None = None) -> list[Table]:
    """The main comparison table(s), one per (card, workload, input, dtype, pass)."""
    spec = spec or TABLES.tables["main"]
    tables = []
    for group, g in spec.groups(spec.rows(df)):
        g = _sort(g)
        backends = _unique(g, "baseline_backend")
        vs = _backend_label(backends[0]) if len(backends) == 1 else "dense"
        on_cpu = str(group["card"] or "").startswith("cpu")
        # FA2 is a GPU kernel; and when FA2 is itself the fastest dense backend its column repeats speedup
        fa2_col = not on_cpu and set(_unique(g, "baseline_method")) != {"full_flash"}
        if on_cpu:  # SDPA's "flash" backend on a CPU is a CPU kernel, not FlashAttention-2
            vs = f"dense ({backends[0]}, CPU)" if len(backends) == 1 else "dense"
        skip = ([] if len(backends) > 1 else ["baseline_backend"]) + ([] if fa2_col else ["speedup_vs_fa2"])
        smoke = (
            "CPU timings are a smoke test of the code path, not a speedup claim: speedups are measured on a GPU. "
            if on_cpu else ""
        )
        caption = (
            smoke
            + f"Attention on {group['card'] or 'unknown card'}: {group['workload'] or 'workload ?'}"
            f" ({', '.join(p for p in (_shape_text(g), group['dtype'], group['pass']) if p)}). "
            + _baseline_text(g, fa2=fa2_col)
            + _timing_text(g)
            + " Sparsity is measured (1 − kept tile fraction)."
        )
        tables.append(spec.table(g, _title(group), caption, skip=skip, headers={"speedup": f"× {vs}"}))
    return tables


def ablation_tables(df: pd.DataFrame, spec: TableSpec | None = None) -> list[Table]:
    """SALAD and its ablations (the spec's families), each method at the target sparsity nearest the spec's
    goal; then a quality study's."""
    spec = spec or TABLES.tables["ablation"]
    tables = []
    for group, g in spec.groups(spec.rows(df)):
        picked = [
            m[
                pd.to_numeric(column(m, "sparsity_target"), errors="coerce")
                == nearest_target(column(m, "sparsity_target"), spec.goal)
            ]
            for _, m in g.groupby("method", sort=True)
        ]
        g = _sort(pd.concat(picked))
        caption = (
            f"Ablations on {group['card'] or 'unknown card'}: {group['workload'] or 'workload ?'}"
            f" ({', '.join(p for p in (group['dtype'], group['pass']) if p)}), each method at the target sparsity"
            f" nearest {spec.goal:.0%}. " + _baseline_text(g, fa2=False)
        )
        tables.append(spec.table(g, _title(group), caption))
    return tables + study_tables(df, "ablation", families=spec.families, goal=spec.goal)


def quality_tables(df: pd.DataFrame, spec: TableSpec | None = None) -> list[Table]:
    """Quality rows (``kind`` "quality"), one table per (card, workload, dtype); their own workloads
    (videos, held-out data) are not the attention workloads, so they are not joined into ``main``."""
    spec = spec or TABLES.tables["quality"]
    qual = spec.rows(df)
    qual = qual[column(qual, "study").isna()]  # a study's cells: summarised with intervals below
    tables = []
    for group, g in spec.groups(qual):
        g = _sort(g)
        parts = (
            f"Quality on {group['card'] or 'unknown card'}: {group['workload'] or 'workload ?'}"
            f"{' (' + group['dtype'] + ')' if group['dtype'] else ''}.",
            _baseline_text(g, fa2=False) if column(g, "speedup").notna().any() else "",
            _base_bar_text(g),
        )
        caption = " ".join(p.strip() for p in parts if p.strip())
        tables.append(spec.table(g, _title(group), caption))
    return tables + study_tables(df, "quality")


def _base_bar_text(g: pd.DataFrame) -> str:
    """Where the rows' base model did not pass the base-model bar (issue #25), the caption says so: such
    figures are history, not a test of a method's quality claim."""
    verdicts = column(g, "base_bar")
    if (verdicts == "passed").all():
        return ""
    bases = sorted({f"`{c}` ({int(s):,} steps)" if pd.notna(s) else f"`{c}`"
                    for c, s in zip(column(g, "checkpoint"), column(g, "checkpoint_steps"), strict=True) if pd.notna(c)})  # fmt: skip
    where = f" {', '.join(bases)}" if bases else ""
    return (f"Base model{where} without a passing base-model bar card: history, not a test of the paper's claim "
            "(docs/QUALITY.md).")


def _is_headline(df: pd.DataFrame) -> pd.Series:
    return column(df, "variant").astype(str).str.startswith("headline") & column(df, "round").notna()


def kernel_tables(df: pd.DataFrame, spec: TableSpec | None = None) -> list[Table]:
    """Kernel micro-benchmarks (``kind`` "kernel"), one table per (card, dtype, pass); the interleaved
    headline rounds get their own table (:func:`kernel_headline_tables`)."""
    spec = spec or TABLES.tables["kernel"]
    ker = spec.rows(df)
    tables = []
    for group, g in spec.groups(ker[~_is_headline(ker)]):
        g = _sort(g)
        caption = (
            f"Kernels on {group['card'] or 'unknown card'} ({', '.join(p for p in (group['dtype'], group['pass']) if p)}). "
            + _baseline_text(g, fa2=False)
        )
        tables.append(spec.table(g, _title(group), caption))
    return tables


def kernel_headline_tables(df: pd.DataFrame, spec: TableSpec | None = None) -> list[Table]:
    """The kernel benchmark's headline rounds (``round`` set): per run, each measurement's median and range
    over the rounds, and the speedups as medians of per-round ratios (drift between rounds cancels)."""
    spec = spec or TABLES.tables["kernel_headline"]
    ker = spec.rows(df)
    tables = []
    for group, g in spec.groups(ker[_is_headline(ker)]):
        times = headline_times(g.to_dict("records"))
        out = []
        for name in sorted(times):
            vals = list(times[name].values())
            row: dict[str, Any] = {"name": name, "median": statistics.median(vals), "min": min(vals),
                                   "max": max(vals), "rounds": len(vals)}
            if name.startswith("triton_block_sparse"):
                for ref, key in (("sdpa_cudnn", "x_cudnn"), ("flex_block_sparse", "x_flex")):
                    if ratios := round_ratios(times, ref, name):
                        row[key] = statistics.median(ratios)
            out.append(row)
        dirty = " plus uncommitted changes" if column(g, "git_dirty").fillna(False).astype(bool).any() else ""
        caption = (
            f"Interleaved rounds on {group['card'] or 'unknown card'} (run {group['run_id']}, commit "
            f"{str(group['git_sha'])[:12]}{dirty}): each round times every measurement once, back to back; "
            "speedups are medians of the per-round ratios."
        )
        tables.append(spec.table(pd.DataFrame(out), "headline · " + _title(group), caption))
    return tables


def dit_tables(df: pd.DataFrame, spec: TableSpec | None = None) -> list[Table]:
    """End-to-end DiT forward (``kind`` "dit"), one table per (card, workload, dtype)."""
    spec = spec or TABLES.tables["dit"]
    tables = []
    for group, g in spec.groups(spec.rows(df)):
        g = _sort(g)
        compiled = "+compile" in str(group["workload"])
        caption = (
            f"End-to-end DiT forward on {group['card'] or 'unknown card'}: {group['workload'] or 'workload ?'}"
            f"{' (' + group['dtype'] + ')' if group['dtype'] else ''}"
            + (", every transformer block torch.compile'd on both sides (compile time apart)" if compiled else ", eager")
            + ". " + _baseline_text(g, fa2=False)
            + " Sampling: 2 forwards (CFG) x 50 steps extrapolated from one forward, dense warm-up steps at the dense time."
        )
        tables.append(spec.table(g, _title(group), caption))
    return tables


def skipped_table(df: pd.DataFrame, spec: TableSpec | None = None) -> Table:
    """Every row whose status is not ok, with its reason, in the spec's order (run order within)."""
    spec = spec or TABLES.tables["skipped"]
    rows = spec.rows(df)
    bad = rows[column(rows, "status").fillna("ok") != "ok"]
    bad = bad.assign(kind=column(bad, "kind").fillna("attention"), card=column(bad, "card").astype(str))
    bad = bad.sort_values([k for k in spec.group_by if k in bad], kind="stable")
    summary = ", ".join(f"{n} {s}" for s, n in column(bad, "status").value_counts().sort_index().items()) or "none"
    return spec.table(bad, "skipped and failed cells", f"Cells that did not produce a measurement ({summary}).")


BUILDERS: dict[str, Callable[[pd.DataFrame, TableSpec], list[Table]]] = {
    "main": main_tables,
    "ablation": ablation_tables,
    "quality": quality_tables,
    "kernel_headline": kernel_headline_tables,
    "kernel": kernel_tables,
    "dit": dit_tables,
    "skipped": lambda df, spec: [skipped_table(df, spec)],
}
TABLES = load_tables()


def build_tables(df: pd.DataFrame, paper: PaperTables | None = None) -> dict[str, list[Table]]:
    """All tables by file stem, as ``paper`` (default: :data:`PAPER_TABLES`) lays them out."""
    paper = paper or TABLES
    return {stem: [t for name in names for t in BUILDERS[name](df, paper.tables[name])] for stem, names in paper.files.items()}


# -- writing -------------------------------------------------------------------------------------
def write_reports(
    df: pd.DataFrame, out_dir: str | Path = "reports", *, sources: Iterable[str] = (), figures: bool = True,
    paper: PaperTables | None = None,
) -> list[Path]:
    """Write every table (``.md``, ``.tex``; laid out as ``paper``, default :data:`PAPER_TABLES`), every
    figure (``.png``, ``.pdf``) and ``README.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index = ["# Reports", "", "Generated by `python -m salad_bench.harness.report` from result rows; do not edit by hand.", ""]
    index += _provenance_lines(df, list(sources))
    index += ["", "## Tables", ""]
    for stem, tables in build_tables(df, paper).items():
        if not tables:  # no rows of this kind: no empty files (and none left from an earlier report here)
            for ext in ("md", "tex"):
                (out / f"{stem}.{ext}").unlink(missing_ok=True)
            index.append(f"- `{stem}`: no rows of this kind")
            continue
        for ext, render in (("md", to_markdown), ("tex", to_latex)):
            path = out / f"{stem}.{ext}"
            path.write_text(render(tables))
            written.append(path)
        n_rows = sum(len(t.cells) for t in tables)
        index.append(
            f"- `{stem}` ({len(tables)} table(s), {n_rows} row(s)): [{stem}.md]({stem}.md), [{stem}.tex]({stem}.tex)"
        )
    if figures:
        from salad_bench.harness.plots import write_figures

        index += ["", "## Figures", ""]
        for stem, paths in write_figures(df, out).items():
            if paths:
                written += paths
                index.append(
                    f"- `{stem}`: "
                    + ", ".join(f"[{p.suffix[1:]}]({p.name})" for p in paths)
                    + f"\n\n  ![{stem}]({stem}.png)"
                )
            else:
                index.append(f"- `{stem}`: no rows to plot")
    readme = out / "README.md"
    readme.write_text("\n".join(index) + "\n")
    written.append(readme)
    return written


def _provenance_lines(df: pd.DataFrame, sources: list[str]) -> list[str]:
    lines = []
    if sources:
        lines.append("Sources: " + ", ".join(f"`{s}`" for s in sources))
    for name, label in (
        ("card", "Cards"),
        ("git_sha", "Git SHAs"),
        ("torch", "torch"),
        ("triton", "triton"),
        ("cudnn", "cuDNN"),
    ):
        vals = [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in _unique(df, name)]
        if vals:
            lines.append(f"{label}: " + ", ".join(f"`{v[:12] if name == 'git_sha' else v}`" for v in vals))
    dates = sorted(str(v) for v in _unique(df, "date"))
    if dates:
        lines.append(f"Measured: {dates[0]} to {dates[-1]}")
    status = column(df, "status").fillna("ok").value_counts().sort_index()
    lines.append("Rows: " + (", ".join(f"{n} {s}" for s, n in status.items()) or "none"))
    return [line + "  " for line in lines]


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m salad_bench.harness.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+",
                    help="run directories (every rows file in them: rows.jsonl, a torchrun run's rows.rank<R>.jsonl) "
                         "or .jsonl files")
    ap.add_argument("--out", default=None,
                    help="output directory (default: <first run>/report; the committed reports/ only when named)")
    ap.add_argument("--no-figures", action="store_true", help="tables only")
    ap.add_argument("--keep-all", action="store_true",
                    help="keep every row of a cell measured more than once (default: the latest row wins)")
    ap.add_argument("--tables", default=None,
                    help=f"the paper's tables: which tables, their rows and columns (default: experiments/{PAPER_TABLES.name})")
    args = ap.parse_args(argv)
    try:
        paper = load_tables(args.tables) if args.tables else TABLES
        df = load_rows(args.runs)
        if not args.keep_all:
            df = latest_per_cell(df)
    except (ResultsFileError, BadInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"error: no rows in {', '.join(args.runs)}; run a sweep first (python run_all.py ...)", file=sys.stderr)
        return 2
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "report"
    paths = write_reports(df, out, sources=args.runs, figures=not args.no_figures, paper=paper)
    print(f"wrote {len(paths)} files to {out}/ (index: {out / 'README.md'})")
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
