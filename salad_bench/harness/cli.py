"""``run_all.py``: argument parsing and error reporting around :func:`harness.runner.run`.

Exit codes: 0 done; 1 the speedup gate found a regression; 2 bad input (the message says what and
how to fix it). Rows measured before an interruption stay in ``<out>/rows.jsonl``; ``--resume``
continues the same run.

Under ``torchrun --nproc_per_node=G run_all.py ...`` every rank measures its share of the cells into
``<out>/rows.rank<R>.jsonl`` (``harness.runner``); rank 0 then writes the summary, the report and the
gate's verdict over all of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from salad_bench.harness.errors import Parser, ignore_stop_signals

__all__ = ["main", "build_parser"]


def _floats(text: str) -> list[float]:
    parts = [x.strip() for x in text.split(",")]
    try:
        vals = [float(x) for x in parts if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sparsity takes comma-separated numbers in [0, 1), got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("--sparsity got no value; give one or more targets, e.g. --sparsity 0.9 or 0.5,0.9")
    return vals


def _knob(text: str) -> tuple[str, str, str]:
    from salad_bench.harness.knobs import KnobError, parse_knob

    try:
        return parse_knob(text)
    except KnobError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"--seed takes a whole number in [0, 2**63), got {text!r}")
    return seed


def build_parser(prog: str = "run_all.py") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Benchmark sparse-attention methods against the fastest dense attention on this machine.",
    )
    p.add_argument("--methods", default="salad,full", help="comma list of registered names or globs ('salad*,full')")
    p.add_argument("--workloads", default=None, help="comma list of presets (see --list); default: wan2.1-1.3b-480p on a GPU, cpu-tiny without one; dit:<preset> times a whole Wan transformer")
    p.add_argument("--sparsity", type=_floats, default=[0.5, 0.75, 0.9, 0.95], help="target sparsities, fraction of tiles skipped (default 0.5,0.75,0.9,0.95)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--qkv", default="video", choices=["video", "random", "wan"],
                   help="video-like (structured), i.i.d. random, or taken from a Wan2.1 self-attention layer (needs diffusers)")
    p.add_argument("--include", action="append", default=[], type=Path, metavar="PATH",
                   help="a .py file or a folder of them that registers your own methods (repeatable)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--no-baselines", action="store_true", help="skip timing the dense backends (no speedup column)")
    p.add_argument("--knob", type=_knob, action="append", default=[], help="METHOD.KEY=VALUE override, repeatable")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping cells already measured")
    p.add_argument("--weights", default=None, help="diffusers-format Wan2.1 directory for dit: workloads")
    p.add_argument("--compile", action="store_true",
                   help="dit: workloads: torch.compile every transformer block (fullgraph), dense and sparse alike; "
                        "compile time is reported on its own (compile_s), not in the latency")
    p.add_argument("--report", action="store_true", help="also write tables and figures to <out>/report")
    p.add_argument("--gate", type=Path, default=None, help="baseline JSON: fail (exit 1) on a speedup regression")
    p.add_argument("--allow-empty", action="store_true", help="with --gate: pass when no cell is comparable with the baseline")
    p.add_argument("--quick", action="store_true", help="shorter timing budgets (smoke runs)")
    p.add_argument("--dit-blocks", type=int, default=None, metavar="K",
                   help="dit: workloads: time a model of K transformer blocks and scale to the full depth "
                        "(the forward without blocks + K blocks x L/K; rows say so); for models too slow to time whole")
    p.add_argument("--list", action="store_true", help="list methods (family, knobs) and workloads, then exit")
    return p


def _list() -> str:
    import dataclasses

    from salad_bench.harness.workloads import WORKLOADS
    from salad_bench.methods import METHODS

    lines = ["Methods (name | family | description | knobs with this variant's defaults):"]
    for e in METHODS.entries():
        cfg = e.cls.Config(**e.defaults)
        knobs = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))
        lines.append(f"  {e.name:<20} {e.family:<14} {e.description}")
        lines.append(f"  {'':<20} knobs: {knobs}")
    lines.append("")
    lines.append("Workloads (name | grid T x H x W | tokens | heads x head_dim):")
    for w in WORKLOADS.values():
        lines.append(f"  {w.name:<20} {'x'.join(map(str, w.grid)):<10} {w.n:>7,}  {w.heads} x {w.head_dim}   {w.note}")
    lines.append("  dit:<preset>         one whole Wan2.1 transformer forward (see salad_bench/harness/dit.py)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "run_all.py") -> int:
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a value argparse cannot parse (2): a code, not an exception
        return int(exc.code or 0)
    from salad_bench.harness.errors import guarded

    return guarded(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from salad_bench.harness.errors import BadInput
    from salad_bench.harness.plugins import include_methods
    from salad_bench.harness.runner import make_spec, run

    include_methods(args.include)
    if args.list:
        print(_list())
        return 0
    raw: dict[str, dict] = {}
    for method, key, value in args.knob:
        if key in raw.get(method, {}):
            print(f"warning: --knob {method}.{key} is given more than once; the last one counts ({value})", file=sys.stderr)
        raw.setdefault(method, {})[key] = value
    if args.allow_empty and args.gate is None:
        raise BadInput("--allow-empty applies to the gate; add --gate BASELINE or drop it")
    spec = make_spec(
        args.methods, sparsities=args.sparsity, workloads=args.workloads, device=args.device, dtype=args.dtype,
        out=args.out, knobs=raw, quick=args.quick, resume=args.resume, qkv=args.qkv, seed=args.seed,
        backward=args.backward, baselines=not args.no_baselines, weights=args.weights, compile=args.compile, dit_blocks=args.dit_blocks,
    )
    if args.gate is not None:
        from salad_bench.harness.gate import load_baseline

        load_baseline(args.gate)  # a missing or malformed baseline stops the run before anything is measured
    out = spec.out
    try:
        rows_path = run(spec)
    except KeyboardInterrupt:
        ignore_stop_signals()
        print(f"\ninterrupted: rows measured so far are in {out}/rows*.jsonl; rerun with --out {out} --resume", file=sys.stderr)
        return 130
    from salad_bench.harness.distributed import Dist

    if not Dist.from_env().main:
        return 0  # rank 0 reports on every rank's rows
    return _finish(rows_path, args)


def _finish(rows_path: Path, args) -> int:
    from salad_bench.harness.report import dit_tables, main_tables, skipped_table, to_markdown
    from salad_bench.harness.results import load_rows, rows_files

    files = rows_files(rows_path.parent)  # every rank's rows file
    df = load_rows(files)
    tables = main_tables(df) + dit_tables(df)
    bad = skipped_table(df)
    table = to_markdown(tables + ([bad] if bad.cells else []))
    (rows_path.parent / "summary.md").write_text(table)
    print(table)
    print(f"rows: {', '.join(map(str, files))}")
    if args.report:
        from salad_bench.harness.report import write_reports

        write_reports(df, rows_path.parent / "report")
        print(f"report: {rows_path.parent / 'report'}")
    if args.gate is not None:
        from salad_bench.harness.gate import main as gate_main

        return gate_main([str(rows_path.parent), "--baseline", str(args.gate), *(["--allow-empty"] if args.allow_empty else [])])
    return 0
