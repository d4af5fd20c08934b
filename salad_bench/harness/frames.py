"""Row frames shared by the tables and the figures: pure functions of a DataFrame of result rows.

Both :mod:`salad_bench.harness.report` and :mod:`salad_bench.harness.plots` read rows through these, so
neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

__all__ = ["ABLATION_TARGET", "IDENTITY", "attention_rows", "column", "dense_backend", "dit_frame", "group_rows", "nearest_target",
           "ok_rows", "rows_of_kind", "with_identity"]

ABLATION_TARGET = 0.9
IDENTITY = ("kind", "method", "family", "workload", "dtype", "pass", "sparsity_target", "card", "status", "reason")


def dense_backend(method: Any, backend: Any = None) -> str | None:
    """The dense backend a speedup is over: ``baseline_backend``, else read from ``baseline_method``
    (``full_cudnn`` -> ``cudnn``)."""
    if not _missing(backend):
        return str(backend)
    if _missing(method):
        return None
    return str(method)[5:] if str(method).startswith("full_") else str(method)


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def with_identity(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every identity column present (as missing values where rows lack it)."""
    return df.assign(**{c: column(df, c) for c in IDENTITY if c not in df})


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with status ok (a missing status counts as ok), identity columns present, ``baseline_backend``
    filled in."""
    df = with_identity(df)
    ok = df[column(df, "status").fillna("ok") == "ok"]
    backend = [
        dense_backend(m, b) for m, b in zip(column(ok, "baseline_method"), column(ok, "baseline_backend"), strict=True)
    ]
    return ok.assign(baseline_backend=pd.Series(backend, index=ok.index, dtype=object))


def rows_of_kind(df: pd.DataFrame, *kinds: str) -> pd.DataFrame:
    kind = column(df, "kind").fillna("attention")
    return df[kind.isin(kinds)]


def group_rows(df: pd.DataFrame, keys: tuple[str, ...]) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Split by ``keys`` (missing values kept as their own group), in sorted order of the key values."""
    if df.empty:
        return []
    frame = pd.DataFrame({k: column(df, k).map(lambda v: "" if _missing(v) else str(v)) for k in keys}, index=df.index)
    out = []
    for vals, idx in sorted(frame.groupby(list(keys), sort=False).groups.items(), key=lambda kv: kv[0]):
        vals = vals if isinstance(vals, tuple) else (vals,)
        out.append((dict(zip(keys, vals, strict=True)), df.loc[idx]))
    return out


def nearest_target(targets: Iterable[float], goal: float = ABLATION_TARGET) -> float | None:
    """The target sparsity closest to ``goal`` (ties go to the higher one); None when there is none."""
    vals = [float(t) for t in targets if not _missing(t)]
    return min(vals, key=lambda t: (abs(t - goal), -t)) if vals else None


def attention_rows(df: pd.DataFrame) -> pd.DataFrame:
    """ok rows of kind "attention" (rows without a kind count as attention), ``sparsity`` filled from density."""
    att = rows_of_kind(ok_rows(df), "attention")
    return att.assign(
        sparsity=pd.to_numeric(column(att, "sparsity"), errors="coerce").fillna(
            1 - pd.to_numeric(column(att, "density"), errors="coerce")
        )
    )


def dit_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``kind`` "dit" ok rows with ``total_ms``, ``attn_ms``, ``rest_ms`` and ``attn_share`` filled in."""
    dit = rows_of_kind(ok_rows(df), "dit").copy()
    num = lambda name: pd.to_numeric(column(dit, name), errors="coerce")  # noqa: E731
    total = num("total_ms").fillna(num("ms"))
    attn = num("attn_ms").fillna(num("self_attn_ms"))
    dit["total_ms"] = total
    dit["attn_ms"] = attn
    dit["rest_ms"] = num("rest_ms").fillna(total - attn)
    dit["attn_share"] = num("attn_share").fillna(attn / total)
    return dit

