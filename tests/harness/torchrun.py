"""``torchrun`` on the CPU for tests: ``python -m torch.distributed.run --standalone`` (a free port of its own,
so tests may run side by side), one thread per rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 180, env: dict | None = None):
    """Run ``args`` (a script or ``-m module`` and its arguments) on ``nproc`` ranks; the completed process."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)  # a test run under torchrun itself must not hand its own place down
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)
