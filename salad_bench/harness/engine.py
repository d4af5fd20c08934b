"""The sweep engine: cells -> measure -> row, for every subject (attention methods, whole DiTs, kernel ops).

A subject names its cells (:class:`Cell`, identity from :func:`results.cell_identity`), sets up what a
group of cells shares (q/k/v, a model, a layout) and gives a ``measure(cell) -> dict`` of measured
fields. The engine does the rest, the same way for all: a cell already done is not measured again and
its row is handed back (resume); a failure becomes the cell's row (``skipped`` for
:class:`kernels.errors.Unsupported`, ``error`` for out of memory or any other exception) and the sweep
goes on; each row is appended through the :class:`results.RowWriter` as soon as it is measured, with
its speedups over the cell's baselines; progress advances one step per cell.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from salad_bench.harness.results import RowWriter
from salad_bench.kernels.errors import Unsupported

__all__ = ["Cell", "Engine", "failure"]


@dataclass
class Cell:
    """One row to measure. ``ident``: the identity fields (:func:`results.cell_identity`); ``fields``:
    fields the row carries whatever happens (shape, device, baseline); ``base``: speedup field ->
    baseline ms, set to ``base / ms`` on a row that has a time (None without a baseline); ``label``: the
    progress text."""

    ident: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    base: dict[str, float | None] = field(default_factory=dict)
    label: str = ""


def failure(exc: BaseException) -> dict[str, str]:
    """The ``status`` and ``reason`` of a cell that raised ``exc``."""
    if isinstance(exc, Unsupported):
        return {"status": "skipped", "reason": str(exc)}
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return {"status": "error", "reason": f"out of memory: {first}; try a smaller workload or batch"}
    tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
    return {"status": "error", "reason": f"{type(exc).__name__}: {exc} [{tb}]"[:500]}


class Engine:
    """Measures cells into rows through ``writer``. ``progress``: a tqdm-like bar (``update``,
    ``set_postfix_str``), a callable given each new row, or None. ``resume``: cells the run's rows
    already hold (ok or skipped) are handed back, not measured."""

    def __init__(self, writer: RowWriter, progress: Any = None, *, resume: bool = True) -> None:
        self.writer, self.progress, self.resume = writer, progress, resume

    def pending(self, cells: Iterable[Cell]) -> list[Cell]:
        """The cells not yet done (every cell without ``resume``); each done one counts as progress."""
        todo = []
        for c in cells:
            if self.resume and self.writer.is_done(c.ident):
                self._advance(None)
            else:
                todo.append(c)
        return todo

    def run(self, cells: Iterable[Cell], measure: Callable[[Cell], dict[str, Any]]) -> list[dict[str, Any]]:
        """Each cell's row, in order: measured now, or handed back when done."""
        return [self.cell(c, measure) for c in cells]

    def cell(self, cell: Cell, measure: Callable[[Cell], dict[str, Any]]) -> dict[str, Any]:
        """One cell's row: its done row on resume, else ``measure(cell)`` (or its failure) appended."""
        if self.resume and (done := self.writer.done_row(cell.ident)) is not None:
            self._advance(None)
            return done
        if cell.label:
            self.note(cell.label)
        try:
            got = measure(cell)
        except Exception as exc:  # noqa: BLE001 - a failed cell becomes its row and the sweep goes on
            got = failure(exc)
        row = {**cell.ident, **cell.fields, **got}
        ms = row.get("ms")
        if isinstance(ms, (int, float)) and ms > 0:
            row.update({key: base / ms if base else None for key, base in cell.base.items()})
        row = self.writer.append(row)
        self._advance(row)
        return row

    def fail(self, cells: Iterable[Cell], status: str, reason: str) -> list[dict[str, Any]]:
        """Rows for cells that cannot be measured at all (their shared setup failed); done cells as in :meth:`run`."""
        return self.run(cells, lambda _: {"status": status, "reason": reason})

    def note(self, text: str) -> None:
        """Show ``text`` beside the progress bar (a callable ``progress`` is given rows only)."""
        if hasattr(self.progress, "set_postfix_str"):
            self.progress.set_postfix_str(text)

    def _advance(self, row: dict[str, Any] | None) -> None:
        if hasattr(self.progress, "update"):
            self.progress.update(1)
        elif callable(self.progress) and row is not None:
            self.progress(row)
