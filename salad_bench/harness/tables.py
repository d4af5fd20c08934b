"""The table model and its two renderings: a :class:`Table` of formatted cells, written as GitHub Markdown
(:func:`to_markdown`) or LaTeX/booktabs (:func:`to_latex`).

The report (:mod:`salad_bench.harness.report`) and a quality study's intervals
(:mod:`salad_bench.harness.quality.stats`) build tables from rows; both render them through here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

__all__ = ["Column", "Table", "to_latex", "to_markdown"]


@dataclass(frozen=True)
class Column:
    """A column of a table: the row field ``key``, its header, how a value is written, and which way is better."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str
    align: Literal["l", "r"] = "r"
    best: Literal["max", "min"] | None = None  # bold the best value of the table's non-dense rows


@dataclass
class Table:
    """One rendered table: ``cells`` hold strings, ``None`` for a missing value."""

    title: str
    caption: str
    headers: list[str]
    align: list[str]
    cells: list[list[str | None]] = field(default_factory=list)
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) of the best values

    @property
    def label(self) -> str:
        """A LaTeX label from the title: ``tab:<slug>``."""
        return "tab:" + re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def _md_cell(s: str | None) -> str:
    return "–" if s is None else s.replace("|", "\\|").replace("\n", " ")


def to_markdown(tables: Table | list[Table]) -> str:
    """GitHub-flavoured Markdown: a heading, the caption, the table."""
    tables = [tables] if isinstance(tables, Table) else tables
    out = []
    for t in tables:
        out += [f"### {t.title}", "", t.caption, ""]
        if not t.cells:
            out += ["(no rows)", ""]
            continue
        out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
        out.append("|" + "|".join(":---" if a == "l" else "---:" for a in t.align) + "|")
        out += ["| " + " | ".join(f"**{_md_cell(c)}**" if (i, j) in t.bold else _md_cell(c)
                                  for j, c in enumerate(row)) + " |" for i, row in enumerate(t.cells)]
        out.append("")
    return "\n".join(out)


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "×": r"$\times$",
    "−": "$-$",
    "–": "--",
    "·": r"$\cdot$",
}


def _tex(s: str | None) -> str:
    return "--" if s is None else "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)


def to_latex(tables: Table | list[Table]) -> str:
    """LaTeX through pandas' Styler: booktabs rules, a caption and a ``tab:`` label per table, the best
    values in bold, and ``longtable`` past 40 rows (needs ``\\usepackage{booktabs,longtable}``)."""
    tables = [tables] if isinstance(tables, Table) else tables
    out = []
    for t in tables:
        cells = t.cells or [["(no rows)"] + [""] * (len(t.headers) - 1)]
        body = [
            [(rf"\textbf{{{_tex(c)}}}" if (i, j) in t.bold else _tex(c)) for j, c in enumerate(row)]
            for i, row in enumerate(cells)
        ]
        frame = pd.DataFrame(body, columns=[_tex(h) for h in t.headers])
        long = len(cells) > 40
        out.append(
            frame.style.hide(axis="index").to_latex(
                hrules=True, caption=_tex(t.caption), label=t.label, column_format="".join(t.align),
                position=None if long else "t", position_float=None if long else "centering",
                environment="longtable" if long else None,
            )
        )
    return "\n".join(out)
