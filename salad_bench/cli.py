"""``salad-bench``: one console script with a subcommand per job (the same code ``python -m`` runs).

    salad-bench run --methods salad,full          # = python run_all.py --methods salad,full
    salad-bench list                              # methods and workloads
    salad-bench report RUN [RUN ...] [--out DIR]  # tables and figures
    salad-bench gate RUN --baseline FILE          # exit 1 on a speedup regression
    salad-bench kernels --out DIR                 # kernel benchmark
    salad-bench quality {train-base,evaluate,study,stats,parallel,vbench} ...
    salad-bench weights check DIR                 # real Wan2.1 weights
    salad-bench flops --check FILE                # analytic FLOP speedups
    salad-bench ci-gpu [--out DIR]                # on a GPU: the fixed sweep + kernels, gated for this card
    salad-bench ci-gpu check                      # CI: newest committed GPU runs gated, and current

Exit codes everywhere: 0 done, 1 speedup regression, 2 bad input or refused, 130 interrupted, 3 a crash.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from salad_bench.harness.errors import EXIT_BAD_INPUT, guarded

__all__ = ["main"]


def _run(argv: list[str]) -> int:
    from salad_bench.harness.cli import main as run_main

    return run_main(argv, prog="salad-bench run")


def _list(argv: list[str]) -> int:
    return _run(["--list", *argv])


def _module(path: str) -> Callable[[list[str]], int]:
    def call(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(path).main(argv)

    return call


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": _run,
    "list": _list,
    "report": _module("salad_bench.harness.report"),
    "gate": _module("salad_bench.harness.gate"),
    "kernels": _module("salad_bench.harness.bench_kernels"),
    "weights": _module("salad_bench.harness.weights"),
    "flops": _module("salad_bench.harness.expected_flops"),
    "ci-gpu": _module("salad_bench.harness.ci_gpu"),
}
QUALITY: dict[str, str] = {
    "train-base": "salad_bench.harness.quality.train_base",
    "evaluate": "salad_bench.harness.quality.evaluate",
    "study": "salad_bench.harness.quality.study",
    "stats": "salad_bench.harness.quality.stats",
    "parallel": "salad_bench.harness.quality.parallel",
    "vbench": "salad_bench.harness.quality.vbench",
}


def _usage() -> str:
    return __doc__.split("\n\n")[1] if __doc__ else ""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else EXIT_BAD_INPUT
    cmd, rest = args[0], args[1:]
    if cmd == "quality":
        if not rest or rest[0] not in QUALITY:
            print(f"error: salad-bench quality takes one of {', '.join(QUALITY)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        fn = _module(QUALITY[rest[0]])
        rest = rest[1:]
    elif cmd in COMMANDS:
        fn = COMMANDS[cmd]
    else:
        import difflib

        close = difflib.get_close_matches(cmd, [*COMMANDS, "quality"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {cmd!r}.{hint} Commands: {', '.join([*COMMANDS, 'quality'])}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return guarded(lambda: fn(rest))


if __name__ == "__main__":
    sys.exit(main())
