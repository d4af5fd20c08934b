"""Shared fixtures: seeded generators, the device under test, and the ``gpu`` marker's skip rule."""

from __future__ import annotations

import os

# Without an NVIDIA device the Triton kernels run in Triton's CPU interpreter. This must be set before
# anything imports triton (it is read at import), so it lives in the root conftest, loaded first.
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
