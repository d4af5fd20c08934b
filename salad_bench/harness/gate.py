"""The CI gate on speedup: compare a run's speedups over dense with a committed per-card baseline.

A cell is (kind, method, workload, dtype, pass, sparsity_target). Its speedup is the row's ``speedup``
(over the dense baseline measured in the same run on the same card; ``baseline_ms / ms`` when the
field is missing). A cell regresses only when its speedup drops by more than BOTH the relative
threshold (default 10%) AND the absolute one (default 0.15x), so noise on small speedups and small
relative wobbles on large ones both pass (FastVideo's performance-CI rule). The input kind (``qkv``: video, random, wan) is part of the cell. Like with like only: rows
measured on another card, with other torch/triton/cuDNN versions, or against another dense backend
are reported and not gated.

    python -m salad_bench.harness.gate results/<run> --baseline results/baselines/<card-slug>.json
    python -m salad_bench.harness.gate --make-baseline results/<run> [--out results/baselines/<card-slug>.json]

Exit codes: 0 pass, 1 regression, 2 bad input (missing or malformed results or baseline file) or nothing
gated (no cell comparable with the baseline; ``--allow-empty`` makes that 0).

Baseline file (JSON)::

    {"schema": 1, "card": "NVIDIA H200", "versions": {"torch": ..., "triton": ..., "cudnn": ...},
     "git_sha": ..., "date": ..., "source_run": "results/<run>" (space-separated when several),
     "thresholds": {"default": {"rel": 0.10, "abs": 0.15}, "NVIDIA H200": {"rel": ..., "abs": ...}},
     "entries": [{"kind", "method", "workload", "dtype", "pass", "sparsity_target", "speedup",
                  "baseline_backend", "ms", "baseline_ms", "family", "N", "config_hash"}, ...]}
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import numbers
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from salad_bench.harness.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REGRESSION, Parser
from salad_bench.harness.frames import dense_backend
from salad_bench.harness.results import ResultsFileError, load_rows

__all__ = [
    "BaselineError",
    "Comparison",
    "DEFAULT_THRESHOLDS",
    "GateResult",
    "VERSION_FIELDS",
    "card_slug",
    "gate",
    "load_baseline",
    "main",
    "make_baseline",
]

SCHEMA = 1
CELL_FIELDS = ("kind", "method", "workload", "qkv", "dtype", "pass", "sparsity_target")
VERSION_FIELDS = ("torch", "triton", "cudnn")
DEFAULT_THRESHOLDS = {"rel": 0.10, "abs": 0.15}


class BaselineError(ValueError):
    """A baseline file that cannot be used; the message names the file and what to do."""


def card_slug(card: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"`` (the baseline file name)."""
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown-card"


def _norm(v: Any) -> Any:
    """Comparable form of a key or version value (JSON and pandas disagree on ints, floats and NaN)."""
    if v is None:
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(v, float):
        return int(v) if v.is_integer() else round(v, 6)
    return v


def _cell(row: dict[str, Any]) -> tuple:
    out = []
    for f in CELL_FIELDS:
        v = _norm(row.get(f))
        if f == "kind" and v is None:
            v = "attention"
        if f == "qkv" and v is None and out[0] == "attention":
            v = "video"  # the runner's default input kind (rows and baselines from before the field existed)
        if f == "sparsity_target" and v is not None:
            v = round(float(v), 6)
        out.append(v)
    return tuple(out)


def _cell_text(cell: tuple) -> str:
    d = dict(zip(CELL_FIELDS, cell, strict=True))
    target = "" if d["sparsity_target"] is None else f" s={d['sparsity_target']:.2f}"
    qkv = f" qkv={d['qkv']}" if d.get("qkv") else ""
    return f"{d['method']} [{d['kind']}] {d['workload']}{qkv} {d['dtype'] or ''} {d['pass'] or ''}{target}".replace(
        "  ", " "
    )


def _is_ok(row: dict[str, Any]) -> bool:
    return (_norm(row.get("status")) or "ok") == "ok"


def _speedup(row: dict[str, Any]) -> float | None:
    s = _norm(row.get("speedup"))
    if s is not None:
        return float(s)
    base, ms = _norm(row.get("baseline_ms")), _norm(row.get("ms"))
    return float(base) / float(ms) if base is not None and ms else None


# -- baseline files ------------------------------------------------------------------------------
# the type of each entry field the gate reads ("text": a string, "number": a JSON number, "key": either)
_ENTRY_TYPES = {
    **dict.fromkeys(CELL_FIELDS, "key"),
    "method": "text",
    "sparsity_target": "number",
    "speedup": "number",
    "ms": "number",
    "baseline_ms": "number",
    "baseline_backend": "text",
}
_TYPE_TEXT = {"text": "a string", "number": "a number", "key": "a string or a number"}


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _has_type(v: Any, kind: str) -> bool:
    return v is None or (kind != "number" and isinstance(v, str)) or (kind != "text" and _is_number(v))


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _threshold(value: Any, what: str) -> float:
    """``value`` as a threshold; raises ValueError naming ``what`` unless it is a finite number >= 0."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} is {_show(value)}; a threshold is a finite number >= 0")
    return float(value)


def _threshold_arg(text: str) -> float:
    """argparse ``type`` of --rel and --abs: NaN, infinity or a negative number would switch the gate off."""
    try:
        return _threshold(float(text), "it")
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; a threshold is a finite number >= 0 (e.g. --rel 0.1 --abs 0.15)") from None


def _threshold_table(table: Any) -> dict[str, dict[str, float]]:
    """A baseline's ``thresholds`` (``{card or 'default': {rel, abs}}``, absent: ``{}``), every value checked by
    :func:`_threshold`; raises ValueError naming the first bad one."""
    if table is None:
        return {}
    example = '{"rel": 0.1, "abs": 0.15}'
    if not isinstance(table, dict):
        raise ValueError(f"'thresholds' is {_show(table)}, not an object like {{\"default\": {example}}}")
    out = {}
    for key, t in table.items():
        if not isinstance(t, dict):
            raise ValueError(f"thresholds.{key} is {_show(t)}, not an object like {example}")
        out[key] = {k: _threshold(v, f"thresholds.{key}.{k}") for k, v in t.items() if k in DEFAULT_THRESHOLDS}
    return out


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read and validate a baseline file; raises :class:`BaselineError` naming the file and the fix.

    Every field the gate reads is checked here (types, finite thresholds >= 0, finite speedups > 0), so a
    malformed baseline is refused before anything is measured (``run_all.py --gate``), never mid-gate.
    """
    path = Path(path)
    make = f"create one with: python -m salad_bench.harness.gate --make-baseline results/<run> --out {path}"

    def bad(what: str, fix: str = "regenerate it") -> BaselineError:
        return BaselineError(f"{path}: {what}; {fix} ({make})")

    if not path.is_file():
        raise BaselineError(f"{path}: no such baseline file; {make}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BaselineError(
            f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); fix it or regenerate it ({make})"
        ) from None
    except UnicodeDecodeError as exc:
        raise bad(f"not text (not UTF-8: byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    if not isinstance(data, dict):
        raise BaselineError(f"{path}: a baseline is a JSON object; regenerate it ({make})")
    if data.get("schema", SCHEMA) != SCHEMA:
        raise BaselineError(
            f"{path}: schema {_show(data.get('schema'))}, this gate reads schema {SCHEMA}; regenerate it ({make})"
        )
    missing = [k for k in ("card", "entries") if k not in data]
    if missing:
        raise BaselineError(f"{path}: missing key(s) {', '.join(missing)}; regenerate it ({make})")
    if not isinstance(data["card"], str) or not data["card"]:
        raise bad(f"'card' is {_show(data['card'])}, not a card's name (a string, e.g. 'NVIDIA H200')")
    for k in ("git_sha", "date"):
        if data.get(k) is not None and not isinstance(data[k], str):
            raise bad(f"'{k}' is {_show(data[k])}, not a string")
    versions = data.get("versions")
    if versions is not None:
        if not isinstance(versions, dict):
            raise bad(f"'versions' is {_show(versions)}, not an object of {', '.join(VERSION_FIELDS)}")
        for k, v in versions.items():
            if not _has_type(v, "key"):
                raise bad(f"versions.{k} is {_show(v)}, not a string or a number")
    try:
        _threshold_table(data.get("thresholds"))
    except ValueError as exc:
        raise bad(str(exc), "fix it or regenerate it") from None
    if not isinstance(data["entries"], list) or not all(isinstance(e, dict) for e in data["entries"]):
        raise BaselineError(f"{path}: 'entries' must be a list of objects; regenerate it ({make})")
    for i, e in enumerate(data["entries"]):
        for f, kind in _ENTRY_TYPES.items():
            if not _has_type(e.get(f), kind):
                raise bad(f"entry {i} field {f} is {_show(e[f])}, not {_TYPE_TEXT[kind]}")
        speedup = _speedup(e)
        if speedup is None or e.get("method") is None:
            raise BaselineError(f"{path}: entry {i} has no method or no speedup; regenerate it ({make})")
        if not math.isfinite(speedup) or speedup <= 0:
            raise bad(f"entry {i} has speedup {speedup:g}; a speedup is a finite number > 0")
    return data


def thresholds_for(baseline: dict[str, Any], card: str | None = None) -> dict[str, float]:
    """The card's thresholds from the baseline file, else its default, else :data:`DEFAULT_THRESHOLDS`.

    Raises ValueError for a threshold that is not a finite number >= 0 (NaN would switch the gate off).
    """
    table = _threshold_table(baseline.get("thresholds"))
    card = card or baseline.get("card")
    out = dict(DEFAULT_THRESHOLDS)
    for key in ("default", card):
        out.update(table.get(key) or {})
    return out


def _most_common(values: list[Any]) -> Any:
    vals = [_norm(v) for v in values if _norm(v) is not None]
    return max(set(vals), key=vals.count) if vals else None


def make_baseline(
    rows: pd.DataFrame,
    *,
    card: str | None = None,
    source: str = "",
    rel: float = DEFAULT_THRESHOLDS["rel"],
    abs_: float = DEFAULT_THRESHOLDS["abs"],
) -> dict[str, Any]:
    """A baseline from a run's ok rows that carry a speedup (one card; ``card`` picks one of several)."""
    recs = [r for r in rows.to_dict("records") if _is_ok(r) and _speedup(r) is not None]
    cards = sorted({str(r.get("card")) for r in recs})
    if card is None:
        if len(cards) != 1:
            raise ValueError(f"the rows hold {len(cards)} cards ({', '.join(cards) or 'none'}); choose one with --card")
        card = cards[0]
    recs = [r for r in recs if str(r.get("card")) == card]
    if not recs:
        raise ValueError(f"no ok rows with a speedup on card {card!r} (cards present: {', '.join(cards) or 'none'})")
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in recs:
        cells.setdefault(_cell(r), []).append(r)
    entries = []
    for cell, group in sorted(cells.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        last = group[-1]
        entry = dict(zip(CELL_FIELDS, cell, strict=True))
        entry["speedup"] = round(statistics.median(_speedup(r) for r in group), 6)
        backend = dense_backend(last.get("baseline_method"), last.get("baseline_backend"))
        if backend:
            entry["baseline_backend"] = backend
        for f in ("ms", "baseline_ms", "family", "N", "config_hash"):
            if _norm(last.get(f)) is not None:
                entry[f] = _norm(last.get(f))
        entries.append(entry)
    versions = {f: _most_common([r.get(f) for r in recs]) for f in VERSION_FIELDS}
    dates = sorted(str(r["date"]) for r in recs if r.get("date"))
    return {
        "schema": SCHEMA,
        "card": card,
        "versions": versions,
        "git_sha": _most_common([r.get("git_sha") for r in recs]),
        "date": dates[-1] if dates else _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source_run": source,
        "thresholds": {"default": {"rel": rel, "abs": abs_}},
        "entries": entries,
    }


# -- the gate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    cell: tuple
    baseline: float
    current: float
    backend: str | None = None

    @property
    def drop(self) -> float:
        return self.baseline - self.current

    @property
    def rel_drop(self) -> float:
        return self.drop / self.baseline if self.baseline else 0.0

    def text(self) -> str:
        vs = f" vs dense {self.backend}" if self.backend else ""
        return (
            f"{_cell_text(self.cell)}: {self.baseline:.2f}x -> {self.current:.2f}x "
            f"({round(-self.drop, 2) + 0.0:+.2f}x, {round(-100 * self.rel_drop, 1) + 0.0:+.1f}%){vs}"
        )


@dataclass
class GateResult:
    """What the gate found; :attr:`exit_code` is 1 when anything regressed."""

    baseline_path: str
    baseline_card: str
    baseline_sha: str | None
    baseline_date: str | None
    thresholds: dict[str, float]
    regressions: list[Comparison] = field(default_factory=list)
    improvements: list[Comparison] = field(default_factory=list)
    passed: list[Comparison] = field(default_factory=list)
    not_gated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.regressions

    @property
    def gated(self) -> int:
        return len(self.regressions) + len(self.improvements) + len(self.passed)

    def exit_code_for(self, allow_empty: bool = False) -> int:
        """1 on a regression; 2 when nothing was comparable (unless ``allow_empty``); else 0."""
        if not self.ok:
            return EXIT_REGRESSION
        return EXIT_OK if self.gated or allow_empty else EXIT_BAD_INPUT

    @property
    def exit_code(self) -> int:
        return self.exit_code_for(False)

    def format(self) -> str:
        t = self.thresholds
        sha = (self.baseline_sha or "unknown sha")[:12]
        lines = [
            f"speedup gate against {self.baseline_path} (card {self.baseline_card}, git {sha}, {self.baseline_date or 'undated'})",
            f"a regression = speedup drop > {100 * t['rel']:.0f}% AND > {t['abs']:.2f}x",
        ]
        sections = [
            ("REGRESSED", [c.text() for c in self.regressions]),
            ("improved", [c.text() for c in self.improvements]),
            ("within thresholds", [c.text() for c in self.passed]),
            ("not gated (not like with like)", self.not_gated),
            ("missing from the run", self.missing),
            ("new (no baseline entry)", self.new),
        ]
        for title, items in sections:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {s}" for s in items]
        gated = len(self.regressions) + len(self.improvements) + len(self.passed)
        if self.ok and gated:
            lines.append(f"PASS: {gated} cell(s) gated, none regressed")
        elif self.ok:
            lines.append(
                "NOTHING GATED: no cell of the run is comparable with the baseline (another card, other versions "
                "or no common cells); measure on the baseline's card or make a baseline for this one "
                "(--make-baseline), or pass --allow-empty"
            )
        else:
            lines.append(f"FAIL: {len(self.regressions)} of {gated} gated cell(s) regressed")
        return "\n".join(lines)


def _unlike(row: dict[str, Any], baseline: dict[str, Any], entry: dict[str, Any] | None) -> str | None:
    """Why this row cannot be compared with the baseline, or None when it can."""
    if str(row.get("card")) != str(baseline["card"]):
        return f"card {row.get('card')!r}, baseline is for {baseline['card']!r}"
    versions = baseline.get("versions") or {}
    diff = [
        f"{f} {_norm(row.get(f))} vs {_norm(versions.get(f))}"
        for f in VERSION_FIELDS
        if f in versions and _norm(row.get(f)) != _norm(versions.get(f))
    ]
    if diff:
        return "versions differ: " + ", ".join(diff)
    backend = dense_backend(row.get("baseline_method"), row.get("baseline_backend"))
    expected = (entry or {}).get("baseline_backend")
    if backend and expected and backend != expected:
        return f"dense baseline {backend!r}, the baseline file's is {expected!r}"
    return None


def gate(
    rows: pd.DataFrame,
    baseline: dict[str, Any],
    *,
    rel: float | None = None,
    abs_: float | None = None,
    baseline_path: str = "<baseline>",
) -> GateResult:
    """Compare ``rows`` (one or more runs) with ``baseline``; ``rel``/``abs_`` override its thresholds."""
    th = thresholds_for(baseline)
    th = {k: th[k] if v is None else _threshold(v, k) for k, v in (("rel", rel), ("abs", abs_))}
    res = GateResult(baseline_path, str(baseline["card"]), baseline.get("git_sha"), baseline.get("date"), th)
    entries = {_cell(e): e for e in baseline["entries"]}
    by_cell: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows.to_dict("records"):
        by_cell.setdefault(_cell(r), []).append(r)
    for cell, group in sorted(by_cell.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        entry = entries.get(cell)
        why = [(_unlike(r, baseline, entry), r) for r in group if _is_ok(r) and _speedup(r) is not None]
        unlike = {w for w, _ in why if w}
        like = [r for w, r in why if w is None]
        for why in sorted(unlike):
            res.not_gated.append(f"{_cell_text(cell)}: {why}")
        if entry is None:
            if like:
                res.new.append(f"{_cell_text(cell)}: {statistics.median(_speedup(r) for r in like):.2f}x")
            continue
        if not like:
            if not unlike:
                reasons = "; ".join(
                    sorted({f"{_norm(r.get('status'))}: {_norm(r.get('reason')) or ''}".strip() for r in group})
                )
                res.missing.append(f"{_cell_text(cell)}: no ok measurement ({reasons})")
            continue
        comp = Comparison(
            cell, float(_speedup(entry)), statistics.median(_speedup(r) for r in like), entry.get("baseline_backend")
        )
        crossed = abs(comp.drop) > th["abs"] and abs(comp.rel_drop) > th["rel"]
        (res.regressions if crossed and comp.drop > 0 else res.improvements if crossed else res.passed).append(comp)
    for cell in sorted(set(entries) - set(by_cell), key=lambda c: tuple(str(x) for x in c)):
        res.missing.append(f"{_cell_text(cell)}: not in the run (baseline {float(_speedup(entries[cell])):.2f}x)")
    return res


# -- CLI -----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="python -m salad_bench.harness.gate", description="Gate a run's speedups against a per-card baseline."
    )
    ap.add_argument("runs", nargs="*", help="run directories (containing rows.jsonl) or .jsonl files")
    ap.add_argument("--baseline", help="baseline JSON (results/baselines/<card-slug>.json)")
    ap.add_argument(
        "--make-baseline", metavar="RUN", nargs="+", help="write a baseline from these runs' ok rows instead of gating"
    )
    ap.add_argument("--out", help="with --make-baseline: output path (default results/baselines/<card-slug>.json)")
    ap.add_argument("--card", help="with --make-baseline: the card to take when the run holds several")
    ap.add_argument("--allow-empty", action="store_true", help="exit 0 when no cell is comparable (default: exit 2)")
    ap.add_argument(
        "--rel", type=_threshold_arg, help=f"relative threshold (default: baseline file, else {DEFAULT_THRESHOLDS['rel']})"
    )
    ap.add_argument(
        "--abs",
        dest="abs_",
        type=_threshold_arg,
        help=f"absolute threshold in x (default: baseline file, else {DEFAULT_THRESHOLDS['abs']})",
    )
    return ap


def _load(runs: list[str]) -> pd.DataFrame:
    df = load_rows(runs)
    if df.empty:
        raise ResultsFileError(f"{', '.join(runs)}: no result rows; run the sweep first (python run_all.py ...)")
    return df


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, one line): a code, not an exception
        return int(exc.code or 0)
    try:
        if args.make_baseline:
            df = _load(args.make_baseline)
            kw = {k: v for k, v in (("rel", args.rel), ("abs_", args.abs_)) if v is not None}
            base = make_baseline(df, card=args.card, source=" ".join(args.make_baseline), **kw)
            out = Path(args.out or f"results/baselines/{card_slug(base['card'])}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(base, indent=1, sort_keys=False) + "\n")
            print(
                f"wrote {out}: {len(base['entries'])} cell(s) on {base['card']} (git {str(base['git_sha'])[:12]}, {base['date']})"
            )
            return EXIT_OK
        if not args.runs or not args.baseline:
            print("error: give a run and --baseline FILE (or --make-baseline RUN); see --help", file=sys.stderr)
            return EXIT_BAD_INPUT
        baseline = load_baseline(args.baseline)
        result = gate(_load(args.runs), baseline, rel=args.rel, abs_=args.abs_, baseline_path=args.baseline)
    except (ResultsFileError, BaselineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result.format())
    return result.exit_code_for(args.allow_empty)


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
