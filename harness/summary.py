"""The table ``run_all.py`` prints and saves at the end of a run (a pure function of rows)."""

from __future__ import annotations

import pandas as pd

__all__ = ["summary_table"]


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and pd.isna(x)):
        return "–"
    return format(x, spec)


def summary_table(df: pd.DataFrame) -> str:
    """Markdown: one line per attention cell, then skipped/error cells with their reasons."""
    if df.empty:
        return "(no rows)\n"
    att = df[df.get("kind", pd.Series(["attention"] * len(df))) == "attention"] if "kind" in df else df
    lines: list[str] = []
    for (workload, card), part in att.groupby(["workload", "card"], sort=False):
        ok = part[part["status"] == "ok"]
        base = ok["baseline_method"].dropna().iloc[0] if "baseline_method" in ok and ok["baseline_method"].notna().any() else None
        base_ms = ok["baseline_ms"].dropna().iloc[0] if base else None
        n = int(part["N"].iloc[0]) if "N" in part else 0
        lines.append(f"### {workload} (N={n:,}) on {card}")
        lines.append("")
        if base:
            lines.append(f"Speedup baseline: fastest dense backend measured in this run, `{base}` at {base_ms:.3f} ms.")
            lines.append("")
        lines.append("| method | pass | sparsity (target) | density (measured) | ms | speedup | TFLOP/s (dense-eq) | TFLOP/s (executed) | rel-L2 vs full | backend |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for _, r in ok.iterrows():
            lines.append(
                "| {m} | {p} | {s} | {d} | {ms} | {sp} | {tde} | {tex} | {rl} | {b} |".format(
                    m=r["method"],
                    p=r.get("pass", "fwd"),
                    s=_fmt(r.get("sparsity_target"), ".2f"),
                    d=_fmt(r.get("density"), ".3f"),
                    ms=_fmt(r.get("ms"), ".3f"),
                    sp=(_fmt(r.get("speedup"), ".2f") + "x") if pd.notna(r.get("speedup", float("nan"))) else "–",
                    tde=_fmt(r.get("tflops_dense_equiv"), ".3g"),
                    tex=_fmt(r.get("tflops_executed"), ".3g"),
                    rl=_fmt(r.get("rel_l2"), ".4f"),
                    b=r.get("backend", "") or "",
                )
            )
        bad = part[part["status"] != "ok"]
        if len(bad):
            lines.append("")
            lines.append("Not measured:")
            lines.append("")
            for _, r in bad.iterrows():
                lines.append(f"- `{r['method']}` (sparsity {r.get('sparsity_target', 0):.2f}): **{r['status']}**: {r.get('reason', '')}")
        lines.append("")
    return "\n".join(lines) + "\n"
