"""Result rows: one flat JSON object per measured cell, appended to ``<run>/rows.jsonl`` at once.

A run of several ranks (torchrun, :mod:`harness.distributed`) writes one file per rank,
``<run>/rows.rank<R>.jsonl``; a run's rows are the rows of all its rows files (:func:`rows_files`), which
:func:`load_rows`, the report and the gate read together, and ``resume`` counts as done.

Every row carries its provenance (git SHA and dirty flag, card, torch/triton/cuDNN/CUDA versions,
date, command line) and the method's full config, so tables, plots and the gate are pure functions of
rows. A run interrupted mid-way keeps every row already written; ``resume`` skips cells whose key is
already present.

Row fields written by the runner (others may add more; readers must tolerate missing ones):

identity   run_id, kind ("attention" | "kernel" | "dit" | "quality"), method, family, config (JSON),
           config_hash, workload, B, H, N, D, grid, dtype, device, card, pass ("fwd" | "fwd+bwd"),
           sparsity_target
outcome    status ("ok" | "skipped" | "error"), reason
measured   density, sparsity (1 - density), ms, ms_p20, ms_p80, reps, timer, select_ms, peak_mem_gib,
           flops_executed, flops_dense, flops_<part>, tflops_dense_equiv, tflops_executed, mfu,
           backend, kernel_path (JSON: which implementation of each Triton kernel ran, from
           kernels.execution_paths; rows before 2026-12-06 have kernel_options, the switches then in force),
           rel_l2, cos_sim, max_abs_err
baseline   baseline_method, baseline_backend, baseline_ms, speedup, fa2_ms, speedup_vs_fa2
provenance git_sha, git_dirty, torch, triton, cudnn, cuda, python, date, host, command; under torchrun
           also rank, world_size (not part of a cell's identity: a cell is the same cell on any rank)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["ResultsFileError", "RowWriter", "cell_key", "config_hash", "headline_times", "load_rows", "provenance",
           "read_jsonl", "round_ratios", "rows_files"]

# rows.jsonl (one process) or rows.rank<R>.jsonl (rank R of a torchrun run)
ROWS_FILE = re.compile(r"rows(?:\.rank(\d+))?\.jsonl")

KEY_FIELDS = ("kind", "method", "config_hash", "workload", "qkv", "dtype", "pass", "sparsity_target", "card")


class ResultsFileError(ValueError):
    """A results file that cannot be read; the message names the file, the line and what to do."""


def git(*args: str, cwd: str | Path | None = None) -> str:
    """``git args`` run in ``cwd`` (default: this package's checkout); its stdout, or "" on any failure."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=cwd or Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def card_name(device: str = "") -> str:
    """GPU name from torch, or ``cpu:<processor>`` on a machine without CUDA."""
    import torch

    if (not device or device.startswith("cuda")) and torch.cuda.is_available():
        idx = torch.device(device).index if device.startswith("cuda:") else torch.cuda.current_device()
        return torch.cuda.get_device_name(idx or 0)
    return f"cpu:{platform.machine()}"


def provenance(device: str = "") -> dict[str, Any]:
    """Where and with what a row was measured."""
    import torch

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env_sha = os.environ.get("SALAD_GIT_SHA")
    if env_sha:
        # A copy of the tree without its own history (a device machine): the sender names the commit and
        # may say whether the copy had local changes (SALAD_GIT_DIRTY=0/1); a git status here would
        # describe some other checkout.
        flag = os.environ.get("SALAD_GIT_DIRTY")
        sha, dirty = env_sha, (None if flag is None else flag not in ("0", "", "false", "False"))
    else:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else None
    return {
        "git_sha": sha or None,
        "git_dirty": dirty,
        "card": card_name(device),
        "torch": torch.__version__,
        "triton": triton_v,
        "cudnn": cudnn,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": " ".join(sys.argv),
    }


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def cell_identity(kind: str, method: str, config: dict[str, Any], workload: str, dtype: str, pass_: str,
                  sparsity_target: float | None, qkv: str | None = None) -> dict[str, Any]:
    """The fields that make a row one cell (:data:`KEY_FIELDS`, less ``card``, which provenance adds):
    every subject (an attention method, a whole DiT, a kernel) names its cells through this."""
    return {
        "kind": kind,
        "method": method,
        "config": json.dumps(config, sort_keys=True, default=str),
        "config_hash": config_hash(config),
        "workload": workload,
        "qkv": qkv,
        "dtype": dtype,
        "pass": pass_,
        "sparsity_target": sparsity_target,
    }


def cell_key(row: dict[str, Any]) -> tuple:
    """The identity of a measured cell, used by resume. Rows of a repeated measurement (a ``round``
    field, e.g. the kernel benchmark's interleaved headline rounds) are cells of their own, told apart
    by variant, round and run (each run's rounds are one interleaved measurement)."""
    key = tuple(str(row.get(f)) for f in KEY_FIELDS)
    rnd = row.get("round")
    if rnd is not None and rnd == rnd:  # NaN: a row without a round, read through pandas
        key += (str(row.get("variant")), str(int(rnd)), str(row.get("run_id")))
    return key


# the kernel benchmark's interleaved rounds: variant "headline_r<i>", or "headline_<option>_r<i>"
_HEADLINE_VARIANT = re.compile(r"headline(?:_(?P<option>.+?))?_r(?P<round>\d+)")


def headline_times(rows: Iterable[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """ms per round of each measurement in a kernel benchmark's headline rounds (ok rows only), keyed by
    method, or "method (option)" for an option set timed in the same rounds."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        m = _HEADLINE_VARIANT.fullmatch(str(r.get("variant", "")))
        if m is None or r.get("status") != "ok":
            continue
        name = str(r["method"]) + (f" ({m['option']})" if m["option"] else "")
        out.setdefault(name, {})[int(m["round"])] = float(r["ms"])
    return out


def round_ratios(times: dict[str, dict[int, float]], num: str, den: str) -> list[float]:
    """``num / den`` in each round that measured both (the speedup of ``den`` over ``num``)."""
    a, b = times.get(num, {}), times.get(den, {})
    return [a[k] / b[k] for k in sorted(a.keys() & b.keys()) if b[k]]


def round_diffs(times: dict[str, dict[int, float]], a: str, b: str) -> list[float]:
    """``a - b`` in each round that measured both (what ``a`` adds on top of ``b``)."""
    x, y = times.get(a, {}), times.get(b, {})
    return [x[k] - y[k] for k in sorted(x.keys() & y.keys())]


def read_jsonl(path: Path, *, tolerate_torn_tail: bool = True, warn: bool = True) -> list[dict[str, Any]]:
    """Rows of one JSONL file.

    A torn last line (no trailing newline: the process died mid-write, or another rank is writing it now)
    is dropped, with a warning when ``warn``, when ``tolerate_torn_tail``; any other bad line raises
    :class:`ResultsFileError` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise ResultsFileError(f"{path}: no such results file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ResultsFileError(
            f"{path}:{line}: not text (byte 0x{raw[exc.start]:02x} is not UTF-8): the results file is corrupt; "
            "remove or fix that line, or write to a new --out directory"
        ) from None
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            if (bad := _bad_field(row)) is not None:
                raise ValueError(bad)
            rows.append(row)
        except ValueError as exc:
            last = i == len(lines) and not text.endswith("\n")
            if last and tolerate_torn_tail:
                if warn:
                    print(f"warning: {path}:{i}: dropping a torn last line (interrupted write)", file=sys.stderr)
                continue
            raise ResultsFileError(
                f"{path}:{i}: not a valid result row ({exc}). The file is corrupt: remove or fix that line, "
                f"or write to a new --out directory."
            ) from None
    return rows


# fields a row holds as numbers (or null): a string there is a corrupt row, refused with its file and line
NUMERIC_FIELDS = ("sparsity_target", "density", "sparsity", "ms", "ms_p20", "ms_p80", "speedup", "rel_l2", "cos_sim",
                  "max_abs_err", "peak_mem_gib", "flops_attention", "flops_executed", "flops_dense",
                  "tflops_dense_equiv", "tflops_executed", "mfu", "select_ms", "baseline_ms", "seed", "round")  # fmt: skip


def _bad_field(row: dict[str, Any]) -> str | None:
    for f in NUMERIC_FIELDS:
        v = row.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"field {f!r} is {v!r}, not a number"
    return None


def rows_files(run_dir: str | Path) -> list[Path]:
    """The rows files of one run directory: ``rows.jsonl`` first, then ``rows.rank<R>.jsonl`` by rank."""
    found = [(m, p) for p in Path(run_dir).glob("rows*.jsonl") if (m := ROWS_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found, key=lambda mp: -1 if mp[0][1] is None else int(mp[0][1]))]


class RowWriter:
    """Appends rows to ``<run_dir>/rows.jsonl`` one at a time (flushed and fsynced); rank ``R`` of a
    torchrun run appends to ``rows.rank<R>.jsonl`` instead, and every row carries ``rank`` and
    ``world_size``. Only this writer's file is written; every rows file of the run is read (``existing``,
    ``is_done``), so a resumed run skips what any rank, in any earlier run of any size, measured."""

    def __init__(self, run_dir: str | Path, *, resume: bool = False, device: str = "", rank: int | None = None,
                 world_size: int = 1) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ("rows.jsonl" if rank is None else f"rows.rank{rank}.jsonl")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._prov = provenance(device)
        if rank is not None:
            self._prov.update(rank=rank, world_size=world_size)
        self.run_id = self.run_dir.name
        self._done: set[tuple] = set()
        self._rows: dict[tuple, dict[str, Any]] = {}
        self.existing: list[dict[str, Any]] = []
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise ResultsFileError(f"{self.path} is not writable, so no new row could be kept; make it writable "
                                   "(chmod u+w) or choose another --out")  # fmt: skip
        held = [f for f in rows_files(self.run_dir) if f.stat().st_size]
        if held and not resume:
            raise ResultsFileError(
                f"{held[0]} already holds results; pass --resume to continue that run or choose another --out"
            )
        self.refresh(warn=True)
        if self.path.exists() and self.path.stat().st_size:
            self._repair_tail()

    def refresh(self, *, warn: bool = False) -> None:
        """Read every rows file of the run again: rows other ranks appended since count as done (a line
        another rank is writing at this moment is left for the next read)."""
        self.existing = [r for f in rows_files(self.run_dir) if f.stat().st_size for r in read_jsonl(f, warn=warn)]
        # ok and skipped cells are done (a skip's reason does not change on a rerun); an error is retried
        self._rows = {cell_key(r): r for r in self.existing if r.get("status") in ("ok", "skipped")}
        self._done = set(self._rows)

    def _repair_tail(self) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            keep = text[: text.rfind("\n") + 1]
            self.path.write_text(keep)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._prov)

    def is_done(self, row_identity: dict[str, Any]) -> bool:
        probe = {**row_identity, "card": row_identity.get("card", self._prov["card"])}
        return cell_key(probe) in self._done

    def done_row(self, row_identity: dict[str, Any]) -> dict[str, Any] | None:
        """The row that made a cell done (from this run's file or appended since)."""
        probe = {**row_identity, "card": row_identity.get("card", self._prov["card"])}
        return self._rows.get(cell_key(probe))

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        full = {"run_id": self.run_id, **row}
        for key, val in self._prov.items():
            full.setdefault(key, val)
        line = json.dumps(full, default=_json_default, allow_nan=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if full.get("status") in ("ok", "skipped"):
            self._done.add(cell_key(full))
            self._rows[cell_key(full)] = full
        return full


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def latest_per_cell(df):
    """Keep, for every measured cell (:func:`cell_key`), only its latest row: by ``date``, then by the
    order the rows were read (a rerun passed after its run supersedes it). Rows without a cell identity
    are kept as they are."""
    if df.empty:
        return df
    keys = [cell_key(r) for r in df.to_dict("records")]
    order = df.assign(_k=keys, _i=range(len(df)), _d=df["date"].astype(str) if "date" in df else "")
    keep = order.sort_values(["_d", "_i"], kind="stable").drop_duplicates("_k", keep="last")["_i"]
    return df.iloc[sorted(keep)]


def load_rows(paths: str | Path | Iterable[str | Path]):
    """A pandas DataFrame of the rows in one or more run directories (every rows file under each, the
    ranks' ``rows.rank<R>.jsonl`` included) or ``.jsonl`` files."""
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        dirs = sorted({f.parent for f in p.rglob("rows*.jsonl")}) if p.is_dir() else []
        files = [f for d in dirs for f in rows_files(d)] if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise ResultsFileError(f"{p}: no rows.jsonl (or rows.rank<R>.jsonl) under this directory")
        for f in files:
            rows.extend(read_jsonl(f))
    return pd.DataFrame(rows)
