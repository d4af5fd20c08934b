"""Kernel tests run our Triton kernels through the Triton interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is created, so it is set here before the
kernel modules are imported (or reloaded, if another test module imported them first) and restored
afterwards, so the rest of the session still sees the CPU as "no Triton" (kernels.triton_available).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

# triton's own library and gluon (imported lazily at the first launch) must also be created in
# interpreter mode, so they are imported inside the same window.
# The shared modules first (launch holds the interpreter flag, features Triton functions the kernels import).
KERNEL_MODULES = ("triton", "triton.experimental.gluon", "salad_bench.kernels.launch", "salad_bench.kernels.features",
                  "salad_bench.kernels.block_sparse", "salad_bench.kernels.select_triton", "salad_bench.kernels.linear_attn",
                  "salad_bench.kernels.gather", "salad_bench.kernels.pool")
INTERPRETED = not torch.cuda.is_available()
# Set when triton was imported (compiled mode) before this file ran: the interpreter cannot be turned on.
TRITON_TOO_EARLY = INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules

if INTERPRETED and not TRITON_TOO_EARLY:
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for _name in KERNEL_MODULES:
            if _name in sys.modules and _name.startswith("salad_bench.kernels."):
                importlib.reload(sys.modules[_name])
            else:
                importlib.import_module(_name)
    finally:
        if _prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _prev


def pytest_collection_modifyitems(config, items):
    if not TRITON_TOO_EARLY:
        return
    import pytest

    skip = pytest.mark.skip(
        reason="triton was imported in compiled mode before tests/kernels/conftest.py could enable the "
        "interpreter; run `TRITON_INTERPRET=1 pytest tests/kernels` (or tests/kernels alone)"
    )
    for item in items:
        if "tests/kernels/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
