"""A typed registry: string names, decorator registration, typo suggestions, glob selection.

Modelled on lm-evaluation-harness and timm: the registry key is the CLI token, the ``method`` column
in result rows and the table label. Ablations and variants are one-line registrations of an existing
class with different config defaults (``register_variant``), not runner flags.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "Entry", "UnknownNameError", "close_names"]

T = TypeVar("T")


def close_names(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The known names closest to ``name``, compared case-insensitively (``SALAD`` finds ``salad``)."""
    lower: dict[str, str] = {}
    for k in known:
        lower.setdefault(k.lower(), k)
    return [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)]


class UnknownNameError(KeyError):
    """An unknown registry name; the message carries suggestions and the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: a class plus the config overrides that define this variant."""

    name: str
    cls: type[T]
    defaults: dict[str, Any] = field(default_factory=dict)
    family: str | None = None
    description: str = ""
    traits: frozenset[str] = frozenset()


class Registry(Generic[T]):
    """Names to classes deriving from ``base``."""

    def __init__(self, kind: str, base: type[T], families: tuple[str, ...] | None = None) -> None:
        self.kind = kind
        self.base = base
        self.families = families  # the families an entry may have (None: any)
        self._entries: dict[str, Entry[T]] = {}

    def _add(self, entry: Entry[T]) -> None:
        """Register ``entry``; a missing family is the class's own (its ``family`` attribute)."""
        import dataclasses

        entry = dataclasses.replace(entry, family=entry.family or getattr(entry.cls, "family", None))
        if self.families is not None and entry.family not in self.families:
            raise ValueError(f"{self.kind} {entry.name!r}: family {entry.family!r} is not one of "
                             f"{', '.join(self.families)}")  # fmt: skip
        if not entry.name or entry.name != entry.name.lower() or " " in entry.name:
            raise ValueError(f"{self.kind} names are lowercase snake_case; got {entry.name!r}")
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered (by {self._entries[entry.name].cls.__qualname__})")
        if not (isinstance(entry.cls, type) and issubclass(entry.cls, self.base)):
            raise TypeError(f"{entry.cls!r} must subclass {self.base.__name__} to be registered as a {self.kind}")
        self._entries[entry.name] = entry

    def register(self, name: str, *, family: str | None = None, description: str = "",
                 traits: Iterable[str] = ()) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@METHODS.register("topk")``. ``traits`` are what a harness may ask of an
        entry without naming it (see :meth:`with_trait`)."""

        def deco(cls: type[T]) -> type[T]:
            self._add(Entry(name, cls, {}, family, description or (cls.__doc__ or "").strip().split("\n")[0],
                            frozenset(traits)))
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def register_variant(
        self, name: str, base: str, *, family: str | None = None, description: str = "",
        traits: Iterable[str] | None = None, **defaults: Any
    ) -> None:
        """Register ``name`` as ``base`` with different config defaults (an ablation in one line); it
        inherits ``base``'s traits unless ``traits`` is given."""
        parent = self.get(base)
        merged = {**parent.defaults, **defaults}
        own = parent.traits if traits is None else frozenset(traits)
        self._add(Entry(name, parent.cls, merged, family or parent.family, description, own))

    def with_trait(self, trait: str) -> list[str]:
        """Names of the entries that carry ``trait``, sorted."""
        return [n for n in self.names() if trait in self._entries[n].traits]

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        close = close_names(name, self._entries)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}."

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def select(self, spec: str | list[str]) -> list[str]:
        """Expand a comma list of names and globs (``'salad*,full'``), keeping order, no repeats.

        A glob that matches nothing and an unknown plain name both raise :class:`UnknownNameError`.
        """
        tokens = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
        out: list[str] = []
        for tok in tokens:
            if not tok:
                continue
            if any(ch in tok for ch in "*?["):
                hits = [n for n in self.names() if fnmatch.fnmatchcase(n, tok)]
                if not hits:
                    raise UnknownNameError(f"no {self.kind} matches {tok!r}. Known: {', '.join(self.names())}.")
            else:
                self.get(tok)
                hits = [tok]
            out.extend(h for h in hits if h not in out)
        if not out:
            raise ValueError(f"no {self.kind} selected from {spec!r}: give one or more names, e.g. "
                             f"{', '.join(self.names()[:2])} (salad-bench list shows them all)")
        return out
