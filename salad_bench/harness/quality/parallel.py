"""The quality study on several GPUs: a shorthand for ``torchrun ... -m salad_bench.harness.quality.evaluate``.

``python -m salad_bench.harness.quality.parallel --gpus 0,1 --per-gpu 3 --methods salad,vsa,... --out RUN -- [evaluate args]``

runs (and prints) the one command that does the work::

    CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc_per_node=6 -m salad_bench.harness.quality.evaluate \\
        --split methods --methods ... --out RUN --resume [--no-latency] [evaluate args]

Each rank gets a share of the methods (:func:`harness.distributed.deal`: a trainable method weighs as
much as ``--trainable-weight`` training-free ones, heaviest first to the least-loaded rank) and writes
``RUN/rows.rank<R>.jsonl``; curves are appended to one ``curves.jsonl`` and ``samples.npz`` is merged under
a lock. Methods that ``RUN`` already holds as ``ok`` are left out (``--resume``), so calling the same
command again continues a killed study, under any rank count.

This is data parallelism across methods: every method trains on one GPU with the study's batch
(``torchrun ... evaluate --split batch`` splits each method's batch over the ranks instead). With more than
one rank per GPU latency would be measured under contention, so those ranks run with ``--no-latency``
(their rows carry no ``ms``); measure latency with one rank per GPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from salad_bench.harness.errors import Parser

__all__ = ["assign", "command", "main"]


def assign(names: list[str], weights: dict[str, float], workers: int) -> list[list[str]]:
    """Deal ``names`` to ``workers`` lists as the ranks of ``evaluate --split methods`` get them (heaviest first
    to the least-loaded; ties: lowest index); each list keeps the order ``names`` had. Empty lists are
    dropped."""
    from salad_bench.harness.distributed import deal

    owner = deal([weights.get(n, 1.0) for n in names], workers)
    shares = [[n for n, r in zip(names, owner, strict=True) if r == w] for w in range(workers)]
    return [s for s in shares if s]


def _visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _pending(out: Path, names: list[str], extra: list[str]) -> list[str]:
    """Labels of the cells ``evaluate`` would run with these arguments that ``out`` does not yet hold as ``ok``
    (evaluate's own parser and cell identities, so the two agree on what is done)."""
    from salad_bench.harness.quality import evaluate as ev

    a = ev.parse_args(["--methods", ",".join(names), "--out", str(out), *extra])
    done = ev.done_hashes(ev.existing_rows(out))
    budget = ev.budget_config(a)
    return [c.label for c in ev.cells_from_args(a) if c.config_hash(budget) not in done]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1 :]
    p = Parser(prog="python -m salad_bench.harness.quality.parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", required=True, help="comma list / globs of registered methods")
    p.add_argument("--out", required=True, help="the run directory all ranks share")
    p.add_argument("--gpus", default="auto", help="comma list of GPU indices, 'auto' (all visible) or 'none' (CPU)")
    p.add_argument("--per-gpu", type=int, default=1, help="ranks per GPU (more than 1 turns latency off)")
    p.add_argument("--trainable-weight", type=float, default=20.0,
                   help="how many training-free methods one fine-tuned method weighs when dealing them out")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / ranks)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    for flag in ("--resume", "--no-latency", "--split", "--methods", "--out"):
        if flag in extra:  # the launcher decides these
            p.error(f"{flag} is set by the launcher; leave it out of the evaluate arguments")
    a = p.parse_args(argv)
    if a.per_gpu < 1:
        p.error(f"--per-gpu must be at least 1, got {a.per_gpu}")
    return a, extra


def command(a: argparse.Namespace, extra: list[str], gpus: list[str], methods: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and the environment it adds."""
    ranks = a.per_gpu * max(1, len(gpus))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "salad_bench.harness.quality.evaluate", "--split", "methods", "--methods", ",".join(methods),
           "--out", str(a.out), "--resume", "--trainable-weight", str(a.trainable_weight)]  # fmt: skip
    if a.per_gpu > 1 or not gpus:
        cmd.append("--no-latency")
    if not gpus:
        cmd += ["--device", "cpu"]
    env = {"OMP_NUM_THREADS": str(a.threads or max(1, (os.cpu_count() or 1) // ranks)), "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return cmd + extra, env


def main(argv: list[str] | None = None) -> int:
    a, extra = parse_args(argv)
    from salad_bench.methods import METHODS

    names = METHODS.select(a.methods)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = _pending(out, names, extra)
    if not todo:
        print("nothing left to run", flush=True)
        return 0
    print(f"to run: {', '.join(todo)}", flush=True)
    gpus = _visible_gpus() if a.gpus == "auto" else [] if a.gpus == "none" else [g.strip() for g in a.gpus.split(",") if g.strip()]
    cmd, env = command(a, extra, gpus, names)  # evaluate leaves out the cells already done
    shown = " ".join(f"{k}={v}" for k, v in env.items() if k != "PYTHONUNBUFFERED")
    print(f"running: {shown} {shlex.join(['torchrun', *cmd[3:]])}", flush=True)
    if a.per_gpu > 1 or not gpus:
        print("ranks share a device: latency is not measured (rows carry no ms)", flush=True)
    if a.dry_run:
        return 0
    with open(out / "log.txt", "a") as log:
        p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_pump, args=(p.stdout, log), daemon=True)
        pump.start()
        try:
            code = p.wait()
        except KeyboardInterrupt:  # torchrun passes the signal on to its ranks; their rows so far stay
            code = p.wait()
        pump.join()
    left = _pending(out, names, extra)
    print(f"still to run: {', '.join(left) or 'none'}" + (f"; torchrun exit {code} (see {out / 'log.txt'})" if code else ""),
          flush=True)  # fmt: skip
    return 1 if code else 0


def _pump(stream, log) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if _interesting(line):
            sys.stdout.write(line)
            sys.stdout.flush()


def _interesting(line: str) -> bool:
    return any(k in line for k in (" ok ", " error ", " skipped ", "reference:", "Error", "Traceback", "[rank"))


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
