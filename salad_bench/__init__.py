"""salad-bench: sparse attention for video DiTs, measured against the fastest dense attention on the card.

Three packages under this namespace, imports running one way: :mod:`salad_bench.kernels` (Triton and torch
kernels, no method) <- :mod:`salad_bench.methods` (the registry and one file per method) <-
:mod:`salad_bench.harness` (workloads, timing, rows, runner, reports, gate, integrations) <- the CLI
(:mod:`salad_bench.cli`, ``run_all.py``).

From a notebook: ``salad_bench.sweep("salad,full", sparsity=[0.9])`` returns a pandas DataFrame.
"""

from __future__ import annotations

from typing import Any

__all__ = ["sweep", "__version__"]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # lazy: importing the package stays cheap (no torch) until a sweep is asked for
    if name == "sweep":
        from salad_bench.harness.api import sweep

        return sweep
    raise AttributeError(f"module 'salad_bench' has no attribute {name!r}")
