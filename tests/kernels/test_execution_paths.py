"""kernels.execution_paths: what a result row says ran, for a device, dtype and head dim."""

from __future__ import annotations

import pytest
import torch

import salad_bench.kernels as kernels
from salad_bench.kernels import execution_paths


def test_interpreter_paths():
    paths = execution_paths(torch.device("cpu"), torch.float32, 64)
    assert paths == {"block_sparse": "triton interpreter, online-softmax, TMA K/V loads",
                     "linear": "triton interpreter", "select": "triton interpreter"}
    odd = execution_paths(torch.device("cpu"), torch.float32, 96)
    assert odd["block_sparse"].startswith("unsupported") and odd["linear"].startswith("unsupported")
    assert execution_paths(torch.device("cpu"), torch.float16, 32)["linear"] == "triton interpreter"


def test_without_triton(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda device: False)
    assert execution_paths(torch.device("cpu"), torch.float32, 64) == {
        "block_sparse": "unavailable on cpu", "linear": "unavailable on cpu", "select": "torch"}


@pytest.mark.parametrize("major,dtype,d,sparse,linear", [
    (9, torch.bfloat16, 128, "triton online-softmax, TMA K/V loads", "gluon sm90 forward, triton backward"),
    (9, torch.float32, 128, "triton online-softmax, TMA K/V loads", "triton"),
    (9, torch.float16, 32, "unsupported (float16, head_dim 32)", "triton"),
    (10, torch.bfloat16, 128, "triton online-softmax, TMA K/V loads", "triton"),
    (8, torch.bfloat16, 64, "triton online-softmax, pointer K/V loads", "triton"),
])
def test_cuda_paths_follow_the_card(monkeypatch, major, dtype, d, sparse, linear):
    """A fake CUDA device of compute capability ``major``: TMA K/V loads from sm90, the Gluon linear
    passes on sm_90 only (bf16/fp16, D 64/128)."""
    pytest.importorskip("triton.experimental.gluon")
    from salad_bench.kernels import linear_gluon

    monkeypatch.setattr(kernels, "triton_available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(linear_gluon, "_major", lambda index: major)
    assert execution_paths(torch.device("cuda", 0), dtype, d) == {"block_sparse": sparse, "linear": linear,
                                                                   "select": "triton"}
