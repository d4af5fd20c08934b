"""Methods defined outside the project: ``--include PATH`` (a ``.py`` file or a folder of them).

Each file is imported once under a private module name; importing it runs its
``@METHODS.register(...)`` decorators. Installed packages register through the ``salad_bench.methods``
entry-point group instead (see :mod:`salad_bench.methods`), with no flag at all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

from salad_bench.harness.errors import BadInput

__all__ = ["include_methods"]


def include_methods(paths: Iterable[str | Path]) -> list[str]:
    """Import every ``.py`` file named (or found in a named folder); returns the module names."""
    loaded = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
            if not files:
                raise BadInput(f"--include {path}: no .py files in this folder")
        elif path.is_file() and path.suffix == ".py":
            files = [path]
        else:
            raise BadInput(f"--include {path}: not a .py file or a folder of them")
        for f in files:
            loaded.append(_load(f.resolve()))
    return loaded


def _load(path: Path) -> str:
    name = "salad_bench_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
    if name in sys.modules:
        return name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadInput(f"--include {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a user's file: say which and why, no traceback
        del sys.modules[name]
        raise BadInput(f"--include {path}: importing it failed ({type(exc).__name__}: {exc})") from None
    return name
