"""Attention methods: the base class, the registry, and one module per method.

Importing this package registers every method module found in it, so adding a method is adding one
file with one decorated class (no list to edit).
"""

from __future__ import annotations

import importlib
import pkgutil

from salad_bench.methods.base import (
    METHODS,
    AttentionMethod,
    AttnContext,
    MethodConfig,
    MethodReport,
    Unsupported,
    create_method,
)
from salad_bench.methods.registry import UnknownNameError

__all__ = ["METHODS", "UnknownNameError", "AttentionMethod", "AttnContext", "MethodConfig", "MethodReport", "Unsupported", "create_method"]

_INFRA = {"base", "registry"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRA and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")


def _load_entry_points() -> None:
    """Methods from installed packages: ``[project.entry-points."salad_bench.methods"] mine = "pkg.mod"``.

    Loading the entry point imports its module, whose decorators register the methods. A package that
    fails to import is reported and skipped, so one broken plugin cannot take the project down."""
    import sys
    from importlib.metadata import entry_points

    for ep in entry_points(group="salad_bench.methods"):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a third party's package
            print(f"warning: method plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}", file=sys.stderr)


_load_entry_points()
