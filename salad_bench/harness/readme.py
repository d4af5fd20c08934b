"""The README's measured tables, generated from the committed runs.

``python -m salad_bench.harness.readme`` rewrites every block of ``README.md`` that sits between
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; ``--check`` only compares, and exits 2
naming the stale blocks (CI runs it through the tests, so a README number never drifts from its run).

Blocks:

* ``headline``: the newest GPU gate run of each card (``results/gpu/``): every method of the gate's
  sweep at 90%, on each input kind, against SDPA cuDNN in the same process;
* ``targets``: the same runs against the gate's targets (``experiments/gpu_gate.toml``);
* ``dit``: the whole-model runs of each card (``results/dit/``): one Wan2.1 transformer forward,
  eager and compiled, each against the dense model run the same way; per model and way, the rows of one
  run (a whole-model measurement before a block-scaled one, then the newest).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from salad_bench.harness.errors import EXIT_BAD_INPUT, EXIT_OK, BadInput, Parser, guarded

__all__ = ["blocks", "main", "render"]

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)
_INPUTS = ("video", "random", "wan")


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(float("nan"), index=df.index)


def _provenance_line(rows: pd.DataFrame, runs: pd.Series | str) -> str:
    """The runs behind ``rows`` (``runs``: each row's run, or one run for all), each with its commit."""
    runs = pd.Series(runs, index=rows.index) if isinstance(runs, str) else runs
    sha = lambda g: str(g["git_sha"].mode().iloc[0])[:7] if "git_sha" in g else "?"  # noqa: E731
    named = [f"`{run}` (commit {sha(rows[runs == run])})" for run in dict.fromkeys(runs)]
    r = rows.iloc[0]
    return (f"{'Run' if len(named) == 1 else 'Runs'} {', '.join(named)}, one **{r['card']}**, torch {r.get('torch')}, "
            f"Triton {r.get('triton')}, cuDNN {_cudnn(r.get('cudnn'))}.")


def _cudnn(v) -> str:
    try:
        n = int(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{n // 10000}.{n % 10000 // 100}" if n >= 10000 else str(n)


def headline_block(root: Path = ROOT) -> str:
    from salad_bench.harness.ci_gpu import newest_runs
    from salad_bench.harness.results import load_rows

    out = []
    for _card, (run, _date, _sha) in sorted(newest_runs(root / "results").items()):
        rows = load_rows(run / "rows.jsonl")
        from salad_bench.methods import METHODS

        lossy = rows["method"].isin(METHODS.with_trait("lossy"))  # dense but approximate: shown beside
        ok = rows[(rows["status"] == "ok") & ((_num(rows, "sparsity_target") == 0.9) | lossy)]
        dense = rows[(rows["status"] == "ok") & (rows["method"] == "full_cudnn")]
        base = {q: float(_num(g, "ms").median()) for q, g in dense.groupby("qkv")}
        kinds = [q for q in _INPUTS if q in base]
        out.append(_provenance_line(rows, run.relative_to(root).as_posix()) + " Wan2.1-1.3B 480p attention (B=1, H=12, N=32,760, "
                   "D=128, bf16), 90% target sparsity; speedup over SDPA cuDNN in the same process ("
                   + " / ".join(f"{base[q]:.2f}" for q in kinds) + f" ms on the {' / '.join(kinds)} inputs).")
        out.append("")
        head = "| method | density | " + " | ".join(f"{q} ms | × cuDNN" for q in kinds) + " | rel L2 (video) |"
        out += [head, "|---|---|" + "---|---|" * len(kinds) + "---|"]
        for method, g in ok.groupby("method", sort=False):
            by = {q: x.iloc[0] for q, x in g.groupby("qkv")}
            first = next(iter(by.values()))
            cells = []
            for q in kinds:
                if q in by:
                    ms = float(by[q]["ms"])
                    cells.append(f"{ms:.3f} | {base[q] / ms:.2f}x")
                else:
                    cells.append("– | –")
            rel = by.get("video", first).get("rel_l2")
            out.append(f"| {method} | {float(first['density']):.3f} | " + " | ".join(cells)
                       + f" | {'–' if pd.isna(rel) else f'{float(rel):.3f}'} |")
        out.append("")
    return "\n".join(out)


def targets_block(root: Path = ROOT) -> str:
    """Each card's newest gate run against the targets; a target that run has no rows for comes from the
    newest earlier run of the card that measured it, named with its commit."""
    from salad_bench.harness.ci_gpu import card_runs, evaluate_targets, targets_table

    out = []
    for card, runs in sorted(card_runs(root / "results").items()):
        (run, _date, _sha), older = runs[0], runs[1:]
        results = evaluate_targets(run)
        missing = [r["name"] for r in results if r["measured"] is None]
        table = targets_table([r for r in results if r["measured"] is not None])
        out += [f"{card}, `{run.relative_to(root).as_posix()}`:", "", *table.splitlines(), ""]
        for prev, _, sha in older:
            found = [r for r in evaluate_targets(prev) if r["name"] in missing and r["measured"] is not None]
            if found:
                out += [f"Not measured in that run; from the newest earlier run of this card that measured them, "
                        f"`{prev.relative_to(root).as_posix()}` (git {sha[:7]}):", "",
                        *targets_table(found).splitlines(), ""]  # fmt: skip
                missing = [m for m in missing if m not in {r["name"] for r in found}]
        if missing:
            out += [f"Targets without rows in any run of this card: {'; '.join(missing)}.", ""]
    return "\n".join(out)


def dit_rows(root: Path = ROOT) -> dict[str, pd.DataFrame]:
    """``{card: rows}``: for each model and way of running it (eager or compiled), the rows of one run:
    a whole-model measurement before a block-scaled one (``[blocks=K/L]``), then the newest. All methods
    of a (model, way) come from one run, so each speedup is over a dense model timed in the same process."""
    from salad_bench.harness.frames import dit_frame
    from salad_bench.harness.results import load_rows

    by_card: dict[str, list[pd.DataFrame]] = {}
    for f in sorted((root / "results" / "dit").glob("*/rows.jsonl")):
        dit = dit_frame(load_rows(f))
        if dit.empty:
            continue
        wl = dit["workload"].astype(str).str.replace("dit:", "", regex=False)
        model = wl.str.replace("+compile", "", regex=False)
        dit = dit.assign(run=f.parent.relative_to(root).as_posix(), compiled=wl.str.endswith("+compile"), model=model,
                         base=model.str.replace(r"\[blocks=[^\]]*\]", "", regex=True),
                         scaled=model.str.contains("[blocks=", regex=False), run_date=dit["date"].astype(str).max())
        by_card.setdefault(str(dit["card"].iloc[0]), []).append(dit)
    out = {}
    for card, frames in by_card.items():
        allr = pd.concat(frames, ignore_index=True)
        picks = (allr[["base", "compiled", "run", "model", "scaled", "run_date"]].drop_duplicates()
                 .sort_values(["scaled", "run_date"], ascending=[True, False])
                 .drop_duplicates(["base", "compiled"]))
        keep = allr.merge(picks[["run", "model", "compiled"]], on=["run", "model", "compiled"])
        out[card] = keep.sort_values(["base", "compiled"], kind="stable").reset_index(drop=True)
    return out


def dit_block(root: Path = ROOT) -> str:
    out = []
    for _card, dit in sorted(dit_rows(root).items()):
        out += [_provenance_line(dit, dit["run"]) + " One transformer forward (random bf16 weights); speedup over "
                "the dense model (SDPA cuDNN) run the same way in the same process; compile time apart; "
                "sampling = 2 forwards (CFG) x 50 steps, extrapolated from one forward.", "",
                "| model | method | eager ms | × dense | compiled ms | × dense (compiled) | attention share | "
                "compile s | 50-step CFG s (compiled) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for (model, method), g in dit.groupby(["model", "method"], sort=False):
            e, c = g[~g["compiled"]], g[g["compiled"]]
            cell = lambda x, col, fmt: "–" if x.empty or pd.isna(x.iloc[0].get(col)) else fmt(float(x.iloc[0][col]))  # noqa: E731
            share = c if not c.empty else e
            out.append(" | ".join([
                f"| {model}", method,
                cell(e, "total_ms", lambda v: f"{v:.1f}"), cell(e, "speedup", lambda v: f"{v:.2f}x"),
                cell(c, "total_ms", lambda v: f"{v:.1f}"), cell(c, "speedup", lambda v: f"**{v:.2f}x**"),
                cell(share, "attn_share", lambda v: f"{100 * v:.0f}%"), cell(c, "compile_s", lambda v: f"{v:.0f}"),
                cell(c, "sampling_ms_est", lambda v: f"{v / 1e3:.1f}"),
            ]) + " |")
        out += ["", *_ceilings(dit), *_extras(dit), ""]
    return "\n".join(out) if out else "No whole-model GPU run is committed yet.\n"


def _ceilings(dit: pd.DataFrame) -> list[str]:
    """Per model, the Amdahl ceiling: the dense model's time over its time without attention (the
    speedup if attention cost nothing), eager and compiled."""
    from salad_bench.methods import METHODS

    dense = dit[dit["method"].isin(METHODS.with_trait("reference"))]
    models = []
    for model, g in dense.groupby("model", sort=False):
        parts = [f"{'compiled' if comp else 'eager'} {r.total_ms / r.rest_ms:.2f}x (attention {100 * r.attn_share:.0f}%)"
                 for comp, r in ((c, g[g["compiled"] == c].iloc[0]) for c in (False, True) if (g["compiled"] == c).any())
                 if r.rest_ms and r.rest_ms > 0]
        if parts:
            models.append(f"{model} " + ", ".join(parts))
    if not models:
        return []
    return ["Ceiling if attention cost nothing (dense time / dense time without attention): " + "; ".join(models) + "."]


def _extras(dit: pd.DataFrame) -> list[str]:
    """The eager rows' own work of methods built on another (SALAD beyond its sparse branch)."""
    if "attn_extra_ms" not in dit:
        return []
    got = dit[dit["attn_extra_ms"].notna() & ~dit["compiled"]]
    parts = [f"{r.method} on {r.model} {r.attn_extra_ms:.1f} ms of {r.total_ms:.1f} ms" for r in got.itertuples()]
    if not parts:
        return []
    return ["Own work beyond the sparse method it is built on (SALAD: linear branch, projection, gate, merge), "
            "eager, per forward, timed by hooks around the calls (an upper bound: it also holds the GPU's waits on "
            "the host around them): " + "; ".join(parts) + "."]


RENDERERS = {"headline": headline_block, "targets": targets_block, "dit": dit_block}


def blocks(text: str) -> list[str]:
    return [m.group(2) for m in _BLOCK.finditer(text)]


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated block rewritten from the committed runs under ``root``."""
    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise BadInput(f"README block {name!r} has no generator; known: {', '.join(RENDERERS)}")
        body = RENDERERS[name](root).rstrip("\n") + "\n"
        return m.group(1) + body + m.group(4)

    return _BLOCK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    return guarded(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = Parser(prog="python -m salad_bench.harness.readme", description=__doc__.split("\n")[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="only compare; exit 2 if a block is stale")
    args = ap.parse_args(argv)
    if not args.readme.exists():
        raise BadInput(f"{args.readme}: no such file")
    text = args.readme.read_text()
    new = render(text, args.readme.resolve().parent)
    if args.check:
        stale = [n for n, a, b in zip(blocks(text), _BLOCK.findall(text), _BLOCK.findall(new), strict=True) if a != b]
        if stale:
            print(f"{args.readme}: generated blocks out of date: {', '.join(stale)}; "
                  "run `python -m salad_bench.harness.readme` and commit the README")
            return EXIT_BAD_INPUT
        print(f"{args.readme}: {len(blocks(text))} generated blocks up to date")
        return EXIT_OK
    args.readme.write_text(new)
    print(f"{args.readme}: rewrote {', '.join(blocks(text)) or 'no blocks'}")
    return EXIT_OK


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    raise SystemExit(guarded(main))
