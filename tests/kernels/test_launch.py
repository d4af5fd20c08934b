"""salad_bench.kernels.launch: when the cached launcher is reused, and with which arguments (a fake kernel and driver)."""

from __future__ import annotations

import types

import pytest
import torch

from salad_bench.kernels import launch as lm


class _Compiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args):
        self.calls.append(("fast", args))


class _Kernel:
    """Parameters X, n, D (constexpr) and FLAG (constexpr with a default)."""

    params = [types.SimpleNamespace(name=n, default=d) for n, d in (("X", None), ("n", None), ("D", None), ("FLAG", 7))]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("slow", grid, args, kwargs))
            return _Compiled(self.calls)

        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(lm, "_stream", lambda: 1234)
    monkeypatch.setattr(lm, "_COMPILED", {})


def test_second_launch_reuses_the_compiled_kernel(fake_cuda):
    k, x = _Kernel(), torch.zeros(64)
    lm.launch(k, (3, 2), (x, 32), {"D": 64}, {"num_warps": 4})
    lm.launch(k, (3, 2), (x, 48), {"D": 64}, {"num_warps": 4})
    assert [c[0] for c in k.calls] == ["slow", "fast"]
    assert k.calls[0][1:] == ((3, 2), (x, 32), {"D": 64, "num_warps": 4})
    # grid padded to 3-D, the stream, the kernel's handles, no hooks, then every parameter in order
    # (the constexpr that was not passed takes its default)
    assert k.calls[1][1] == (3, 2, 1, 1234, "fn", "meta", None, None, None, x, 48, 64, 7)


@pytest.mark.parametrize("change", ["int not divisible by 16", "int equal to 1", "misaligned pointer", "dtype",
                                    "constexpr", "option"])
def test_a_different_specialisation_compiles_again(fake_cuda, change):
    k, x = _Kernel(), torch.zeros(64)
    args, consts, opts = (x, 32), {"D": 64}, {"num_warps": 4}
    lm.launch(k, (1,), args, consts, opts)
    if change == "int not divisible by 16":
        args = (x, 33)
    elif change == "int equal to 1":
        args = (x, 1)
    elif change == "misaligned pointer":
        args = (x[1:], 32)
    elif change == "dtype":
        args = (x.half(), 32)
    elif change == "constexpr":
        consts = {"D": 128}
    else:
        opts = {"num_warps": 8}
    lm.launch(k, (1,), args, consts, opts)
    assert [c[0] for c in k.calls] == ["slow", "slow"]


def test_unknown_argument_types_and_hooks_take_the_normal_path(fake_cuda, monkeypatch):
    from triton import knobs

    k, x = _Kernel(), torch.zeros(64)
    for _ in range(2):
        lm.launch(k, (1,), (x, object()), {"D": 64})
    assert [c[0] for c in k.calls] == ["slow", "slow"]
    lm.launch(k, (1,), (x, 32), {"D": 64})
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    lm.launch(k, (1,), (x, 32), {"D": 64})
    assert [c[0] for c in k.calls] == ["slow", "slow", "slow", "slow"]


def test_without_cuda_every_launch_is_a_normal_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    k = _Kernel()
    for _ in range(2):
        lm.launch(k, (1,), (torch.zeros(4), 32), {"D": 64})
    assert [c[0] for c in k.calls] == ["slow", "slow"]


def test_a_site_launches_through_launch_once_then_directly(fake_cuda, monkeypatch):
    from triton import knobs

    k, x = _Kernel(), torch.zeros(64)
    site = lm.Site(k, (3, 2), {"D": 64})
    site(x, 32)
    site(x, 32)
    y = torch.zeros(64)
    site(y, 16)  # new arguments, same specialisation: the kept kernel with the new arguments
    assert [c[0] for c in k.calls] == ["slow", "fast", "fast"]
    assert k.calls[2][1][9:] == (y, 16, 64, 7)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    site(x, 32)  # a profiler hook: the normal path
    assert k.calls[-1][0] == "slow"


def test_fitted_retries_smaller_when_shared_memory_overflows(monkeypatch):
    import triton

    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, BLOCK, num_warps, num_stages, **consts):
                calls.append((BLOCK, num_stages))
                if BLOCK * num_stages > 64:
                    raise triton.runtime.errors.OutOfResources(BLOCK * num_stages * 1024, 65536, "shared memory")

            return run

    monkeypatch.setattr(lm, "_FITTED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # launch() then calls kernel[grid] directly
    cfg = {"BLOCK": 64, "num_warps": 8, "num_stages": 3}
    lm.fitted(FakeKernel(), (1,), (), {"D": 64}, cfg)
    assert calls == [(64, 3), (64, 2), (64, 1)]
    calls.clear()
    lm.fitted(FakeKernel(), (1,), (), {"D": 64}, cfg)  # the fitted config is remembered
    assert calls == [(64, 1)]
    assert cfg == {"BLOCK": 64, "num_warps": 8, "num_stages": 3}  # the caller's config is left alone


def test_autotuned_runs_one_fixed_config_in_the_interpreter(monkeypatch):
    calls = []

    class Fn:
        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append(("fixed", grid, args, meta))

    class Tuned:
        fn = Fn()

        def __getitem__(self, grid):
            return lambda *args, **consts: calls.append(("tuned", grid, args, consts))

    monkeypatch.setattr(lm, "INTERPRET", True)
    lm.autotuned(Tuned(), lambda meta: (meta["BLOCK_M"],), (1,), {"D": 64}, {"BLOCK_M": 32, "num_warps": 4})
    assert calls == [("fixed", (32,), (1,), {"D": 64, "BLOCK_M": 32, "num_warps": 4})]
    calls.clear()
    monkeypatch.setattr(lm, "INTERPRET", False)
    lm.autotuned(Tuned(), (7,), (1,), {"D": 64}, {"BLOCK_M": 32})
    assert calls == [("tuned", (7,), (1,), {"D": 64})]
