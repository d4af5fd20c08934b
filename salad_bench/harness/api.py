"""The notebook entry point: one call runs a sweep and returns its rows as a pandas DataFrame.

    import salad_bench
    df = salad_bench.sweep("salad,full", sparsity=[0.9])
    df[["method", "sparsity", "ms", "speedup"]]

It is the same engine as ``python run_all.py`` / ``salad-bench run`` (same checks, same rows, same
``rows.jsonl`` on disk), so a DataFrame from a notebook and a table from the command line agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["sweep"]


def sweep(
    methods: str | Sequence[str] = "salad,full",
    *,
    workloads: str | Sequence[str] | None = None,
    sparsity: float | Iterable[float] = (0.5, 0.75, 0.9, 0.95),
    device: str = "auto",
    dtype: str | None = None,
    qkv: str = "video",
    seed: int = 0,
    knobs: dict[str, dict[str, Any]] | None = None,
    baselines: bool = True,
    backward: bool = False,
    out: str | Path | None = None,
    resume: bool = False,
    quick: bool = False,
    weights: str | None = None,
    quiet: bool = True,
):
    """Measure ``methods`` (names or globs) on ``workloads`` at each target ``sparsity``.

    Returns a DataFrame with one row per measured cell (the columns of :mod:`salad_bench.harness.results`);
    the rows are also appended to ``<out>/rows.jsonl`` (default ``runs/<date>-<time>``). Bad input raises
    ``ValueError`` (or :class:`~salad_bench.methods.UnknownNameError`) with the fix in the message.
    """
    from salad_bench.harness.results import load_rows
    from salad_bench.harness.runner import make_spec, run

    targets = [float(sparsity)] if isinstance(sparsity, (int, float)) else [float(s) for s in sparsity]
    spec = make_spec(
        methods, sparsities=targets, workloads=workloads, device=device, dtype=dtype, out=out, knobs=knobs,
        quick=quick, resume=resume, qkv=qkv, seed=seed, backward=backward, baselines=baselines, weights=weights,
    )
    return load_rows(run(spec, quiet=quiet))
