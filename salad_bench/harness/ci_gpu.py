"""The GPU gate: measure the code as users call it, on a GPU, and gate it against that card's baseline.

``salad-bench ci-gpu --out results/gpu/<date>-<card>`` (on a GPU) runs a fixed sweep, :data:`SWEEP`:

* every dense backend and ``full``, and ``topk``, ``sta``, ``salad``, ``salad_sta``, ``sparse_lora``, ``sparse_headlora`` at
  50% and 90% target sparsity, at Wan2.1-1.3B 480p, on each input kind: ``video`` (the video-like
  workload), ``random`` and ``wan`` (a Wan2.1 layer's Q/K/V; needs diffusers, else skipped rows);
* the kernel benchmark's ``headline`` rounds, its ``inputs`` section (the forward on random, video-like
  and Wan inputs with the methods' own layouts, and over a sweep of logit spreads) and its ``peers``
  section (the peers' own kernels, where their wheels load, on the same inputs);

writes one run directory with provenance (``PROVENANCE.md``), and gates the sweep's speedups against
``results/baselines/<card>.json``. ``--make-baseline FILE`` writes that card's baseline from this run
instead. A finished gate run removes ``results/gpu_pending.txt`` (see :func:`check_committed`).

``python -m salad_bench.harness.ci_gpu check`` is CI's side (no GPU): the newest committed run of each card
is gated against its baseline, and the newest committed GPU run must be at least as new as the last
commit that touched ``salad_bench/kernels`` or ``salad_bench/methods``, unless ``results/gpu_pending.txt``
names that commit and says why no GPU run was possible.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from salad_bench.harness.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_REGRESSION, BadInput, Parser, guarded

__all__ = ["SWEEP", "check_committed", "evaluate_targets", "load_experiment", "main", "run_gate"]

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = Path(__file__).parent / "experiments" / "gpu_gate.toml"


def load_experiment(path: Path = EXPERIMENT) -> dict[str, Any]:
    """The gate's experiment file: the sweep, the kernel sections and the targets."""
    import tomllib

    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BadInput(f"{path}: cannot read the GPU gate's experiment ({exc})") from None


_EXP = load_experiment()
SWEEP: dict[str, Any] = {
    **_EXP["sweep"],
    "kernel_sections": _EXP["kernels"]["sections"],
    "kernel_rounds": _EXP["kernels"]["rounds"],
}
PENDING = "results/gpu_pending.txt"
# The inputs section's rows written before 2026-12-06 timed two softmax modes of the forward, each row naming
# its ``softmax_mode``; since then the forward is the online softmax alone and its rows name no mode.
ONLINE = "online"
WATCHED = ("salad_bench/kernels", "salad_bench/methods")


# -- on the GPU ------------------------------------------------------------------------------------
def run_gate(out: Path, *, baseline: Path | None, make_baseline: Path | None, quick: bool = False,
             kernels: bool = True) -> int:
    import torch

    from salad_bench.harness.gate import card_slug, gate, load_baseline
    from salad_bench.harness.gate import make_baseline as build_baseline
    from salad_bench.harness.results import card_name, load_rows
    from salad_bench.harness.runner import RunSpec, run

    if not torch.cuda.is_available():
        raise BadInput("salad-bench ci-gpu measures on a GPU and this machine has none; run it on the GPU machine")
    card = card_name("cuda")
    base_path = baseline or ROOT / "results" / "baselines" / f"{card_slug(card)}.json"
    base = None
    if make_baseline is None:
        base = load_baseline(base_path)  # checked before anything is measured
    out.mkdir(parents=True, exist_ok=True)
    for qkv in SWEEP["qkv"]:
        spec = RunSpec(methods=list(SWEEP["methods"]), workloads=[SWEEP["workload"]], sparsities=list(SWEEP["sparsities"]),
                       device="cuda", dtype="bf16", out=out, resume=True, qkv=qkv,
                       warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100)
        try:
            run(spec, quiet=True)
        except ValueError as exc:  # the wan kind without diffusers: say so in the log, the gate goes on
            print(f"qkv={qkv}: not measured ({exc})", file=sys.stderr)
    if kernels:
        from salad_bench.harness.bench_kernels import main as bench_main

        bench_main(["--out", str(out / "kernels"), "--sections", SWEEP["kernel_sections"],
                    "--rounds", str(SWEEP["kernel_rounds"]), *(["--quick"] if quick else [])])
    rows = load_rows(out / "rows.jsonl")
    _provenance(out, rows)
    _summary(out, rows)
    table = targets_markdown(out)
    (out / "targets.md").write_text(table)
    print(table)
    pending = ROOT / PENDING
    if pending.exists():
        pending.unlink()
        print(f"removed {PENDING}: this run measures the pending change")
    if make_baseline is not None:
        data = build_baseline(rows, card=card, source=str(out))
        make_baseline.parent.mkdir(parents=True, exist_ok=True)
        make_baseline.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {make_baseline}: {len(data['entries'])} cells on {card}")
        return EXIT_OK
    res = gate(rows, base, baseline_path=str(base_path))
    print(res.format())
    return res.exit_code


def evaluate_targets(run_dir: Path, targets: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each target of the experiment beside what the run measured: ``[{name, target, measured, met,
    detail}]`` (``measured`` None where the run has no such rows or the target is for another card)."""
    import statistics

    from salad_bench.harness.results import read_jsonl

    targets = _EXP.get("targets", []) if targets is None else targets
    rows = [r for r in read_jsonl(run_dir / "rows.jsonl") if r.get("status") == "ok"]
    krows_path = run_dir / "kernels" / "rows.jsonl"
    krows = [r for r in read_jsonl(krows_path) if r.get("status") == "ok"] if krows_path.exists() else []
    card = str(rows[0].get("card")) if rows else None
    out = []
    for t in targets:
        res = {"name": t["name"], "target": f"<= {t['max_ms']} ms", "measured": None, "met": None, "detail": ""}
        if "cards" in t and card not in t["cards"]:
            continue
        if "method" in t:
            field = t.get("field", "ms")  # "glue_ms": the method's time beyond selection, kernel and own work
            hits = [r for r in rows if r.get("method") == t["method"] and r.get("sparsity_target") == t["sparsity"]
                    and r.get(field) is not None]
            by = {r.get("qkv"): float(r[field]) for r in hits}
            if by:
                res["measured"] = max(by.values())
                res["detail"] = ", ".join(f"{k} {v:.3f}" for k, v in sorted(by.items()))
        else:
            hits = [r for r in krows if r.get("method") == t["kernel"] and str(r.get("variant", "")).startswith(t["variant"])
                    and ("mode" not in t or r.get("softmax_mode", ONLINE) == t["mode"])]
            groups: dict[str, list[float]] = {}
            for r in hits:
                groups.setdefault(str(r.get("input", "")), []).append(float(r["ms"]))
            medians = {k: statistics.median(v) for k, v in groups.items()}
            if medians:
                res["measured"] = max(medians.values())
                res["detail"] = ", ".join(f"{k} {v:.3f}" for k, v in sorted(medians.items()) if k) or f"{len(hits)} rounds"
        if res["measured"] is not None:
            res["met"] = res["measured"] <= t["max_ms"]
        out.append(res)
    return out


def targets_markdown(run_dir: Path) -> str:
    return targets_table(evaluate_targets(run_dir))


def targets_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`evaluate_targets`' results."""
    lines = ["| target | goal | measured (worst input, median) | met | per input |", "|---|---|---|---|---|"]
    for r in rows:
        m = "–" if r["measured"] is None else f"{r['measured']:.3f} ms"
        met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['name']} | {r['target']} | {m} | {met} | {r['detail']} |")
    return "\n".join(lines) + "\n"


def _summary(out: Path, rows) -> None:
    """``summary.md`` (the report's tables of this run) and a compact table on stdout."""
    from salad_bench.harness.report import main_tables, to_markdown

    (out / "summary.md").write_text(to_markdown(main_tables(rows)))
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    cols = [c for c in ("qkv", "method", "sparsity_target", "density", "ms", "speedup", "baseline_method") if c in ok]
    print(ok[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    bad = rows[rows["status"] != "ok"] if "status" in rows else rows.iloc[:0]
    for r in bad.to_dict("records"):
        print(f"{r['status']}: {r.get('qkv')} {r['method']}: {str(r.get('reason'))[:160]}")


def _provenance(out: Path, rows) -> None:
    first = rows.iloc[0].to_dict() if len(rows) else {}
    lines = [
        f"# GPU gate run: {first.get('card')}",
        "",
        "Written by `salad-bench ci-gpu` (salad_bench/harness/ci_gpu.py); the sweep is its `SWEEP`.",
        "",
        *(f"- {k}: `{first.get(k)}`" for k in ("git_sha", "git_dirty", "card", "torch", "triton", "cudnn", "cuda", "date")),
        f"- rows: {len(rows)} in `rows.jsonl` (sweep), kernel rows in `kernels/rows.jsonl`",
    ]
    (out / "PROVENANCE.md").write_text("\n".join(lines) + "\n")


# -- in CI (no GPU) -------------------------------------------------------------------------------
def card_runs(results: Path) -> dict[str, list[tuple[Path, str, str]]]:
    """``{card: [(run dir, newest row date, git sha), ...]}``: every gate run of each card, newest first."""
    from salad_bench.harness.results import read_jsonl

    runs: dict[str, list[tuple[Path, str, str]]] = {}
    for rows_file in sorted((results / "gpu").glob("*/rows.jsonl")):
        rows = read_jsonl(rows_file)
        if not rows:
            continue
        card, date = str(rows[0].get("card")), max(str(r.get("date", "")) for r in rows)
        shas = [r.get("git_sha") for r in rows if r.get("git_sha")]
        sha = max(set(shas), key=shas.count) if shas else ""
        runs.setdefault(card, []).append((rows_file.parent, date, sha))
    return {card: sorted(found, key=lambda r: r[1], reverse=True) for card, found in runs.items()}


def newest_runs(results: Path) -> dict[str, tuple[Path, str, str]]:
    """``{card: (run dir, newest row date, git sha)}`` of the newest gate run of each card."""
    return {card: found[0] for card, found in card_runs(results).items()}


def check_committed(repo: Path = ROOT) -> int:
    """CI: gate the newest committed run of each card; refuse a GPU run older than the kernels/methods."""
    from salad_bench.harness.gate import card_slug, gate, load_baseline
    from salad_bench.harness.results import load_rows

    results = repo / "results"
    runs = newest_runs(results)
    if not runs:
        print(f"error: no GPU gate run under {results / 'gpu'}; run salad-bench ci-gpu on a GPU and commit it", file=sys.stderr)
        return EXIT_BAD_INPUT
    code = EXIT_OK
    for card, (run_dir, date, sha) in sorted(runs.items()):
        base_path = results / "baselines" / f"{card_slug(card)}.json"
        print(f"== {card}: newest run {run_dir.relative_to(results.parent)} ({date}, git {sha[:10]})")
        res = gate(load_rows(run_dir / "rows.jsonl"), load_baseline(base_path), baseline_path=str(base_path))
        print(res.format())
        code = max(code, res.exit_code)
    from salad_bench.harness.results import git

    last = git("log", "-1", "--format=%H", "--", *WATCHED, cwd=repo)
    newest_sha = max(runs.values(), key=lambda r: r[1])[2]
    fresh = bool(last) and bool(newest_sha) and (
        newest_sha.startswith(last) or last.startswith(newest_sha)
        or subprocess.run(["git", "merge-base", "--is-ancestor", last, newest_sha], cwd=repo,
                          capture_output=True, timeout=30).returncode == 0
    )
    if fresh or not last:
        print(f"GPU run is current: it measured {newest_sha[:10]}, the last change to {' or '.join(WATCHED)} is {last[:10]}")
        return code
    pending = repo / PENDING
    note = pending.read_text() if pending.exists() else ""
    if last[:7] in note:
        why = next(line for line in note.splitlines() if last[:7] in line)  # the line naming the change
        print(f"GPU run pending for {last[:10]} ({PENDING}): {why.strip()}")
        return code
    print(
        f"error: the newest committed GPU run measured {newest_sha[:10]}, older than {last[:10]}, the last commit "
        f"touching {' or '.join(WATCHED)}. Run `salad-bench ci-gpu` on a GPU and commit its run, or commit "
        f"{PENDING} naming {last[:10]} and why no GPU run was possible.",
        file=sys.stderr,
    )
    return max(code, EXIT_REGRESSION)


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="salad-bench ci-gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", nargs="?", default="run", choices=["run", "check", "targets"],
                    help="run: measure and gate on this GPU (default); check: CI's gate of the committed runs; "
                         "targets: the experiment's targets beside a run's figures (--out RUN)")
    ap.add_argument("--out", type=Path, help="run directory (default results/gpu/<date>-<card>)")
    ap.add_argument("--baseline", type=Path, help="baseline file (default results/baselines/<card>.json)")
    ap.add_argument("--make-baseline", type=Path, metavar="FILE", help="write this card's baseline from the run instead of gating")
    ap.add_argument("--quick", action="store_true", help="shorter timing budgets (not for committed runs)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel benchmark sections")
    args = ap.parse_args(argv)

    def body() -> int:
        if args.action == "check":
            return check_committed()
        if args.action == "targets":
            if args.out is None or not (args.out / "rows.jsonl").exists():
                raise BadInput("salad-bench ci-gpu targets --out RUN: RUN must be a gate run directory with rows.jsonl")
            print(targets_markdown(args.out))
            return EXIT_OK
        import datetime as dt

        from salad_bench.harness.gate import card_slug
        from salad_bench.harness.results import card_name

        out = args.out or ROOT / "results" / "gpu" / f"{dt.date.today():%Y-%m-%d}-{card_slug(card_name('cuda'))}"
        return run_gate(out, baseline=args.baseline, make_baseline=args.make_baseline, quick=args.quick,
                        kernels=not args.no_kernels)

    return guarded(body)


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
