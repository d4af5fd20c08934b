"""Run one quality study as several side-by-side workers: methods spread over GPUs, one run directory.

``python -m salad_bench.harness.quality.parallel --gpus 0,1 --per-gpu 3 --methods salad,vsa,... --out RUN -- [evaluate args]``

Each worker is a :mod:`harness.quality.evaluate` process that gets a share of the methods and writes into
the same ``RUN`` (rows and curves are appended line by line; ``samples.npz`` is merged under a lock). The
methods are dealt out largest first (a trainable method weighs as much as ``--trainable-weight``
training-free ones) to the least-loaded worker, so the workers finish at about the same time. Methods that
``RUN`` already holds as ``ok`` are left out, and every worker resumes (``--resume``), so a killed run is
continued by calling the same command again.

This is data parallelism across methods, not within one: every method still trains on one GPU with the
study's batch (``torchrun ... -m salad_bench.harness.quality.evaluate`` splits one method's batch instead). When more
than one worker shares a GPU, latency would be measured under contention, so those workers run with
``--no-latency`` (their rows carry no ``ms``); measure latency in a study of one worker per GPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["assign", "main", "plan_workers"]


def assign(names: list[str], weights: dict[str, float], workers: int) -> list[list[str]]:
    """Deal ``names`` to ``workers`` lists, heaviest first to the least-loaded (ties: lowest index); each list
    keeps the order ``names`` had. Empty lists are dropped."""
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    load = [0.0] * workers
    out: list[list[str]] = [[] for _ in range(workers)]
    for name in sorted(names, key=lambda n: -weights.get(n, 1.0)):
        i = min(range(workers), key=lambda j: (load[j], j))
        out[i].append(name)
        load[i] += weights.get(name, 1.0)
    order = {n: k for k, n in enumerate(names)}
    return [sorted(x, key=order.__getitem__) for x in out if x]


def plan_workers(gpus: list[str], per_gpu: int) -> list[str | None]:
    """One entry per worker: the ``CUDA_VISIBLE_DEVICES`` value it gets (``None``: CPU, no GPU pinned)."""
    if per_gpu < 1:
        raise ValueError(f"--per-gpu must be at least 1, got {per_gpu}")
    return [g for g in gpus for _ in range(per_gpu)] if gpus else [None] * per_gpu


def _visible_gpus() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _done(out: Path) -> set[str]:
    if not (out / "rows.jsonl").exists():
        return set()
    from salad_bench.harness.results import latest_per_cell, load_rows

    df = latest_per_cell(load_rows(out))
    if df.empty or "method" not in df:
        return set()
    ok = df["status"] == "ok"
    if "kind" in df:
        ok &= df["kind"] == "quality"
    return set(df[ok]["method"])


def _pump(tag: str, stream, log, lock: threading.Lock, echo) -> None:
    for line in stream:
        with lock:
            log.write(f"[{tag}] {line}")
            log.flush()
            if echo(line):
                sys.stdout.write(f"[{tag}] {line}")
                sys.stdout.flush()


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1 :]
    p = argparse.ArgumentParser(prog="python -m salad_bench.harness.quality.parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", required=True, help="comma list / globs of registered methods")
    p.add_argument("--out", required=True, help="the run directory all workers share")
    p.add_argument("--gpus", default="auto", help="comma list of GPU indices, 'auto' (all visible) or 'none' (CPU)")
    p.add_argument("--per-gpu", type=int, default=1, help="workers per GPU (more than 1 turns latency off)")
    p.add_argument("--trainable-weight", type=float, default=20.0,
                   help="how many training-free methods one fine-tuned method weighs when dealing them out")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: cores / workers)")
    for flag in ("--resume", "--no-latency"):
        if flag in extra:  # the launcher decides these
            raise SystemExit(f"{flag} is set by the launcher; leave it out of the evaluate arguments")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    a, extra = parse_args(argv)
    from salad_bench.harness.quality.evaluate import TRAINABLE_FAMILIES, _family
    from salad_bench.methods import METHODS

    names = METHODS.select(a.methods)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    todo = [n for n in names if n not in done]
    if done & set(names):
        print(f"already in {out}: {', '.join(n for n in names if n in done)}", flush=True)
    if not todo:
        print("nothing left to run", flush=True)
        return 0
    gpus = _visible_gpus() if a.gpus == "auto" else [] if a.gpus == "none" else [g.strip() for g in a.gpus.split(",") if g.strip()]
    slots = plan_workers(gpus, a.per_gpu)
    weights = {n: a.trainable_weight if _family(n) in TRAINABLE_FAMILIES else 1.0 for n in todo}
    shares = assign(todo, weights, len(slots))
    threads = a.threads or max(1, (os.cpu_count() or 1) // len(shares))
    shared_gpu = a.per_gpu > 1 or not gpus
    base = [sys.executable, "-m", "salad_bench.harness.quality.evaluate", "--out", str(out), "--resume", *extra]
    if shared_gpu:
        base.append("--no-latency")
        print("workers share a device: latency is not measured (rows carry no ms)", flush=True)
    procs, pumps, lock = [], [], threading.Lock()
    t0 = time.perf_counter()
    with open(out / "log.txt", "a") as log:
        for i, (share, gpu) in enumerate(zip(shares, slots, strict=False)):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            tag = f"w{i}" + (f"/gpu{gpu}" if gpu is not None else "")
            print(f"{tag}: {', '.join(share)}", flush=True)
            p = subprocess.Popen([*base, "--methods", ",".join(share)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
            t = threading.Thread(target=_pump, args=(tag, p.stdout, log, lock, _interesting), daemon=True)
            t.start()
            procs.append((tag, p))
            pumps.append(t)
        def stop(signum, _frame):  # a timeout or Ctrl-C: stop the workers too (their rows so far stay)
            for _, p in procs:
                p.terminate()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        codes = [p.wait() for _, p in procs]
        for t in pumps:
            t.join()
    failed = [f"{tag} (exit {c})" for (tag, _), c in zip(procs, codes, strict=True) if c != 0]
    left = [n for n in names if n not in _done(out)]
    print(f"{len(shares)} workers, {time.perf_counter() - t0:.0f} s; still to run: {', '.join(left) or 'none'}"
          + (f"; failed: {', '.join(failed)} (see {out / 'log.txt'})" if failed else ""), flush=True)  # fmt: skip
    return 1 if failed else 0


def _interesting(line: str) -> bool:
    return any(k in line for k in (" ok ", " error ", " skipped ", "reference:", "Error", "Traceback"))


if __name__ == "__main__":
    sys.exit(main())
