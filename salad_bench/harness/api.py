"""The notebook entry point: one call runs a sweep and returns its rows as a pandas DataFrame.

    import salad_bench
    df = salad_bench.sweep("salad,full", sparsity=[0.9])
    df[["method", "sparsity", "ms", "speedup"]]

It is the same engine as ``python run_all.py`` / ``salad-bench run`` (same checks, same rows, same
``rows.jsonl`` on disk), so a DataFrame from a notebook and a table from the command line agree.
"""

from __future__ import annotations

import datetime as dt
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
    import torch

    from salad_bench.harness.knobs import check_knobs
    from salad_bench.harness.results import load_rows
    from salad_bench.harness.runner import RunSpec, check_device, run
    from salad_bench.harness.workloads import default_workload
    from salad_bench.methods import METHODS

    dev = check_device(device)
    names = METHODS.select(methods if isinstance(methods, str) else list(methods))
    wls = workloads or default_workload(torch.device(dev))
    wls = [w.strip() for w in (wls.split(",") if isinstance(wls, str) else wls) if w.strip()]
    targets = [float(sparsity)] if isinstance(sparsity, (int, float)) else [float(s) for s in sparsity]
    spec = RunSpec(
        methods=names,
        workloads=wls,
        sparsities=targets,
        device=dev,
        dtype=dtype or ("bf16" if dev.startswith("cuda") else "fp32"),
        out=Path(out) if out is not None else Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        resume=resume,
        qkv=qkv,
        seed=seed,
        backward=backward,
        baselines=baselines,
        weights=weights,
        knobs=check_knobs(knobs or {}, names),
        warmup_ms=10 if quick else 25,
        rep_ms=30 if quick else 100,
    )
    return load_rows(run(spec, quiet=quiet))
