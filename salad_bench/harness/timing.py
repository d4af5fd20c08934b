"""The one timing helper of the project.

On CUDA: ``triton.testing.do_bench`` (CUDA events, an L2 flush before every repetition, warm-up and
repetition budgets in milliseconds) asked for the median and the 20th/80th percentiles. A call longer
than ``long_call_ms`` (a whole DiT forward) is timed by CUDA events around each of at least
``min_reps`` calls after one warm-up call instead: ``do_bench``'s five estimation calls alone would
take a minute for a 14B forward, and an L2 flush is noise beside seconds of work. On the CPU:
``time.perf_counter`` around each call after warm-up calls, same statistics. Never ``time.time()``
around GPU work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "measure", "peak_memory_gib"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str

    def as_row(self, prefix: str = "") -> dict[str, float | int | str]:
        return {
            f"{prefix}ms": self.median_ms,
            f"{prefix}ms_p20": self.p20_ms,
            f"{prefix}ms_p80": self.p80_ms,
            f"{prefix}reps": self.reps,
            f"{prefix}timer": self.timer,
        }


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure(
    fn: Callable[[], Any],
    device: torch.device | str,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 3,
    max_reps: int = 200,
    long_call_ms: float = 250.0,
) -> Timing:
    """Time ``fn()`` on ``device``; returns the median and p20/p80 in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        first = _cuda_call_ms(fn, device)  # also the warm-up of a long call
        if first >= long_call_ms:
            reps = max(min_reps, min(max_reps, int(rep_ms / first)))
            times = [_cuda_call_ms(fn, device) for _ in range(reps)]
            return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), reps,
                          "cuda-events-per-call")

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        est_reps = max(1, int(rep_ms / max(q[0], 1e-3)))
        return Timing(float(q[0]), float(q[1]), float(q[2]), min(est_reps, 1000), "cuda-do_bench")
    # CPU: one call to estimate, warm up for warmup_ms, then repeat within rep_ms (bounded).
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(max(0, min(10, int(warmup_ms / max(first, 1e-3))))):
        fn()
    reps = max(min_reps, min(max_reps, int(rep_ms / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), reps, "cpu-perf_counter")


def _cuda_call_ms(fn: Callable[[], Any], device: torch.device) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return float(start.elapsed_time(end))


def peak_memory_gib(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """Peak device memory (GiB) allocated while ``fn()`` runs; None on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30
