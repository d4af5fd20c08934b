"""Attention methods: the base class, the registry, and one module per method.

Importing this package registers every method module found in it, so adding a method is adding one
file with one decorated class (no list to edit).
"""

from __future__ import annotations

import importlib
import pkgutil

from methods.base import METHODS, AttentionMethod, AttnContext, MethodConfig, MethodReport, Unsupported, create_method
from methods.registry import UnknownNameError

__all__ = ["METHODS", "UnknownNameError", "AttentionMethod", "AttnContext", "MethodConfig", "MethodReport", "Unsupported", "create_method"]

_INFRA = {"base", "registry"}

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _INFRA and not _mod.startswith("_"):
        importlib.import_module(f"methods.{_mod}")
