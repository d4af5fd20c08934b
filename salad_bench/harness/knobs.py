"""Method knobs given on the command line (``METHOD.KEY=VALUE``) or from Python, checked strictly.

A knob is a field of the method's config dataclass. Its value is converted by the field's type: a
``bool`` takes only true/false/1/0 (any case), an ``int`` an integer, a ``float`` a number, a
``Literal`` one of its choices, ``X | None`` also ``none``. A knob for a method that is not in the run,
an unknown key, ``sparsity`` (set with ``--sparsity``) and a value that does not convert are errors:
:class:`KnobError`, a ``ValueError`` whose message names the knob and what to write instead.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

from salad_bench.methods import METHODS
from salad_bench.methods.registry import close_names

__all__ = ["KnobError", "check_knobs", "method_config", "parse_knob"]

_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


def method_config(name: str, knobs: dict[str, dict[str, Any]], sparsity: float) -> dict[str, Any]:
    """A method's full config in a run (the ``config`` of its rows): its defaults, its knobs, the sparsity."""
    return {**METHODS.get(name).defaults, **knobs.get(name, {}), "sparsity": sparsity}


class KnobError(ValueError):
    """A knob that cannot be used; the message names it and the fix."""


def parse_knob(text: str) -> tuple[str, str, str]:
    """``"salad.rope=false"`` -> ``("salad", "rope", "false")``; the value stays text until checked."""
    lhs, sep, value = text.partition("=")
    method, dot, key = lhs.partition(".")
    if not sep or not dot or not method.strip() or not key.strip():
        raise KnobError(f"--knob takes METHOD.KEY=VALUE (e.g. topk.block_q=64), got {text!r}")
    return method.strip(), key.strip(), value.strip()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(method: str) -> dict[str, Any]:
    cfg = METHODS.get(method).cls.Config
    names = {f.name for f in dataclasses.fields(cfg)}
    return {k: v for k, v in _hints(cfg).items() if k in names}


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` (text from the CLI, or a Python value) as type ``tp``; raises KnobError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return _convert(value, opt, where)
            except KnobError as exc:
                errors.append(str(exc))
        raise KnobError(errors[0] if len(errors) == 1 else f"{where}={value!r} fits none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and not isinstance(c, str) and value == str(c)):
                return c
        raise KnobError(f"{where}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise KnobError(f"{where}={value!r} is not a boolean; write true or false (or 1 or 0)")
    if tp in (int, float):
        accepted = (int,) if tp is int else (int, float)
        if isinstance(value, accepted) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise KnobError(f"{where}={value!r} is not {'an integer' if tp is int else 'a number'}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise KnobError(f"{where}={value!r} is not a string")
    if origin in (tuple, list) and isinstance(value, str):
        import ast

        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise KnobError(f"{where}={value!r} is not a {tp} (write e.g. (1,2,3))") from None
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise KnobError(f"{where}={value!r} is not a {tp}")
        args = typing.get_args(tp)
        if origin is tuple and args and Ellipsis not in args:  # fixed positions: tuple[str, Any]
            if len(value) != len(args):
                raise KnobError(f"{where}={value!r} needs {len(args)} items")
            types_ = list(args)
        else:
            types_ = [args[0] if args else Any] * len(value)
        conv = [v if t is Any else _convert(v, t, where) for v, t in zip(value, types_, strict=True)]
        return tuple(conv) if origin is tuple else conv
    return value


def check_knobs(knobs: dict[str, dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Every knob checked and converted for the methods of this run; raises :class:`KnobError`."""
    out: dict[str, dict[str, Any]] = {}
    for method, kv in knobs.items():
        if method not in methods:
            close = close_names(method, methods + METHODS.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close and close[0] != method else ""
            raise KnobError(
                f"--knob {method}.*: {method!r} is not a method of this run (--methods {','.join(methods)}){hint}; "
                "fix the name or add the method to --methods"
            )
        fields = _fields(method)
        for key, value in kv.items():
            where = f"{method}.{key}"
            if key == "sparsity":
                raise KnobError(f"--knob {where}: sparsity is set for every method with --sparsity, not as a knob")
            if key not in fields:
                raise KnobError(
                    f"--knob {where}: {method} has no knob {key!r}; its knobs: "
                    f"{', '.join(k for k in fields if k != 'sparsity')} (python run_all.py --list)"
                )
            out.setdefault(method, {})[key] = _convert(value, fields[key], where)
    return out
