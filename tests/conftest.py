"""Shared fixtures: seeded generators, the device under test, and the ``gpu`` marker's skip rule.

``SALAD_BENCH_INCLUDE=PATH[:PATH...]`` (``os.pathsep``-separated ``.py`` files or folders of them) loads
methods defined outside the project before collection, as ``run_all.py --include PATH`` does, so the
registry-wide tests (the contract test among them) cover them too.
"""

from __future__ import annotations

import os

# Without an NVIDIA device the Triton kernels run in Triton's CPU interpreter. This must be set before
# anything imports triton (it is read at import), so it lives in the root conftest, loaded first.
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INCLUDE_ENV = "SALAD_BENCH_INCLUDE"


def include_from_env(environ=os.environ) -> list[str]:
    """Load the method files ``SALAD_BENCH_INCLUDE`` names with ``--include``'s loader; their module names."""
    paths = [p for p in environ.get(INCLUDE_ENV, "").split(os.pathsep) if p.strip()]
    if not paths:
        return []
    from salad_bench.harness.errors import BadInput
    from salad_bench.harness.plugins import include_methods

    try:
        return include_methods(paths)
    except BadInput as exc:
        raise pytest.UsageError(f"{INCLUDE_ENV}: {exc}") from None


def pytest_configure(config):
    # before collection: the test modules parametrize over METHODS.names() when they are imported
    include_from_env()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh random generator per test, seeded from pytest's random state so inputs differ per run."""
    import random

    g = torch.Generator()
    g.manual_seed(random.randrange(2**31))
    return g
