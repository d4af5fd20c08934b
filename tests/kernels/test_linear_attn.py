"""Triton linear attention vs kernels.reference.linear_attention_ref (interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.linear_attn import linear_attention_triton
from salad_bench.kernels.reference import linear_attention_ref
from salad_bench.kernels.rope import rope_3d_freqs
from tests.kernels._tol import assert_close_to_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(gen, kind, dtype, grid, d, rope, b=1, h=2):
    n = grid[0] * grid[1] * grid[2]
    q, k, v = [torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    cos, sin = rope_3d_freqs(grid, d, DEVICE) if rope else (None, None)
    dout = torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype)

    def go(fn, dt):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        out = fn(*xs, kind=kind, cos=cos, sin=sin)
        out.backward(dout.to(dt))
        return [out.detach()] + [x.grad for x in xs]

    ours = go(linear_attention_triton, dtype)
    ref = go(linear_attention_ref, torch.float64)
    same = go(linear_attention_ref, dtype)
    for name, o, r, s in zip(("out", "dq", "dk", "dv"), ours, ref, same, strict=True):
        assert o.dtype == dtype
        assert_close_to_torch(o, s, r, what=f"{kind} {dtype} rope={rope} {name}")


@pytest.mark.parametrize("kind", ["relu", "elu", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_with_rope(gen, kind, dtype):
    _run(gen, kind, dtype, (2, 5, 7), 64, rope=True)  # N = 70: ragged against every tile size


@pytest.mark.parametrize("kind", ["relu", "elu", "softmax"])
def test_without_rope_and_head_dim_128(gen, kind):
    """Without RoPE at D=128 in fp16. elu's dq was 2.3x torch's own error before the backward recomputed
    the state with the features' lo parts (OPTIONS["bwd_split_state"])."""
    _run(gen, kind, torch.float16, (2, 5, 7), 128, rope=False)


@pytest.mark.parametrize("kind,rope", [("relu", True), ("softmax", False)])
def test_state_in_halves(gen, monkeypatch, kind, rope):
    """The K/V pass with the state split over two programs per chunk gives the same result and gradients."""
    from salad_bench.kernels import linear_attn as la

    monkeypatch.setitem(la.OPTIONS, "state_halves", True)
    _run(gen, kind, torch.float16, (2, 5, 7), 64, rope=rope)
    _run(gen, kind, torch.float32, (1, 3, 13), 128, rope=rope)


@pytest.mark.parametrize("kind", ["relu", "elu"])
def test_split_state_pass(gen, monkeypatch, kind):
    """With the lo-part dots in the K/V pass (off by default), forward and gradients stay within the bound."""
    from salad_bench.kernels import linear_attn as la

    monkeypatch.setitem(la.OPTIONS, "state_split", True)
    _run(gen, kind, torch.float16, (2, 5, 7), 64, rope=True)


@pytest.mark.parametrize("option", ["pairs", "tma"])
@pytest.mark.parametrize("kind,rope,dtype", [("relu", True, torch.float16), ("elu", True, torch.float32),
                                             ("softmax", True, torch.float16), ("relu", False, torch.float32)])
def test_forward_layout_options(gen, monkeypatch, option, kind, rope, dtype):
    """Two forward options give the same output and gradients: ``pairs`` (natural channel order, RoPE pairs
    rotated in registers, one D x D state, converted to the half layout for the backward) and ``tma`` (TMA
    descriptors; ragged N: their zero rows and dropped stores)."""
    from salad_bench.kernels import linear_attn as la

    monkeypatch.setitem(la.OPTIONS, option, True)
    if option == "tma":
        assert la._use_tma(torch.zeros(8, 8, device=DEVICE))
    _run(gen, kind, dtype, (2, 5, 7), 64, rope=rope)
    _run(gen, kind, dtype, (1, 3, 13), 128, rope=rope)


def test_tma_forward_fp16_tables_and_unaligned_fallback(gen, monkeypatch):
    """Half-precision tables go through their own descriptors; a tensor TMA cannot address (a 2-byte
    offset) takes the pointer loads, with the same result."""
    from salad_bench.kernels import linear_attn as la

    monkeypatch.setitem(la.OPTIONS, "tma", True)
    q, k, v = [torch.randn(1, 2, 70, 64, generator=gen).to(DEVICE, torch.float16) for _ in range(3)]
    cos, sin = rope_3d_freqs((2, 5, 7), 64, DEVICE)
    ref = linear_attention_ref(q.double(), k.double(), v.double(), "relu", cos, sin)
    ours = linear_attention_triton(q, k, v, "relu", cos.half(), sin.half())
    assert_close_to_torch(ours, linear_attention_ref(q, k, v, "relu", cos, sin), ref, what="tma fp16 tables")
    flat = torch.empty(q.numel() + 1, dtype=torch.float16, device=DEVICE)
    shifted = flat[1:].view_as(q).copy_(q)
    assert not la._use_tma(shifted)
    torch.testing.assert_close(linear_attention_triton(shifted, k, v, "relu", cos, sin),
                               linear_attention_triton(q, k, v, "relu", cos, sin), rtol=0, atol=0)


def test_pairs_state_converts_to_halves(gen):
    """The pairs-layout state, converted, equals the half-layout state of the same inputs."""
    from salad_bench.kernels import linear_attn as la

    q, k, v = [torch.randn(1, 2, 70, 64, generator=gen).to(DEVICE) for _ in range(3)]
    cos, sin = rope_3d_freqs((2, 5, 7), 64, DEVICE)
    saved = la.OPTIONS["pairs"]
    try:
        la.OPTIONS["pairs"] = False
        _, halves, was_pairs = la._forward(q, k, v, 0, cos, sin, True, 1e-6)
        assert not was_pairs
        la.OPTIONS["pairs"] = True
        _, pairs, was_pairs = la._forward(q, k, v, 0, cos, sin, True, 1e-6)
        assert was_pairs
    finally:
        la.OPTIONS["pairs"] = saved
    assert not torch.allclose(pairs, halves)  # the layouts differ ...
    torch.testing.assert_close(la._pairs_to_halves(pairs, 64), halves, rtol=1e-5, atol=1e-4)  # ... by a permutation


def test_half_rope_tables_forward(gen):
    """fp16 RoPE tables are accepted as they are; the forward stays within 2x torch's error (the
    gradients need not: through dq they measured 2.2x torch's at this size, so tables stay fp32 by default)."""
    grid, d = (2, 5, 7), 64
    q, k, v = [torch.randn(1, 2, 70, d, generator=gen).to(DEVICE, torch.float16) for _ in range(3)]
    cos, sin = rope_3d_freqs(grid, d, DEVICE)
    ours = linear_attention_triton(q, k, v, "elu", cos.half(), sin.half())
    ref = linear_attention_ref(q.double(), k.double(), v.double(), "elu", cos, sin)
    assert_close_to_torch(ours, linear_attention_ref(q, k, v, "elu", cos, sin), ref, what="fp16 tables")


def test_rejects_what_it_cannot_run(gen):
    x = torch.randn(1, 1, 16, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(Unsupported, match="float64"):
        linear_attention_triton(x, x, x)
    y = torch.randn(1, 1, 16, 48, device=DEVICE)
    with pytest.raises(Unsupported, match="head_dim"):
        linear_attention_triton(y, y, y)
    with pytest.raises(ValueError, match="kind"):
        linear_attention_triton(x.float(), x.float(), x.float(), kind="gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wan_shape_gpu(gen, dtype):
    """Wan 480p: 21 x 30 x 52 grid, 12 heads x 128."""
    _run(gen, "relu", dtype, (21, 30, 52), 128, rope=True, h=12)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{"state_split": True}, {"state_halves": True}, {"pairs": True},
                                  {"out_programs_per_sm": 4}, {"tma": True}, {"out_gluon": True},
                                  {"out_gluon": True, "state_gluon": True,
                                   "out_gluon_cfg": {"num_warps": 8, "stages": 3, "programs_per_sm": 1}}])
def test_wan_shape_cheap_options_gpu(gen, monkeypatch, opts):
    """The K/V-pass options the benchmark times, at Wan 480p in bf16."""
    from salad_bench.kernels import linear_attn as la

    for key, val in opts.items():
        monkeypatch.setitem(la.OPTIONS, key, val)
    _run(gen, "relu", torch.bfloat16, (21, 30, 52), 128, rope=True, h=12)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["relu", "elu", "softmax"])
@pytest.mark.parametrize("d,dtype,rope", [(64, torch.float16, True), (128, torch.bfloat16, True),
                                          (128, torch.float16, False)])
@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("out_tma", [False, True])
def test_gluon_passes_gpu(gen, monkeypatch, kind, d, dtype, rope, warps, out_tma):
    """The Gluon K/V and output passes (kernels.linear_gluon) at a ragged N (70 and 4,030 tokens: one and
    several 64-token tiles per program), the output stored from registers or through a TMA store: the
    output against the float64 reference, and the gradients (the Triton backward, reading the Gluon
    state) against the all-Triton path's."""
    from salad_bench.kernels import linear_attn as la
    from tests.kernels._tol import rel_l2

    for grid in ((2, 5, 7), (5, 13, 62)):
        n = grid[0] * grid[1] * grid[2]
        q, k, v = [torch.randn(1, 3, n, d, generator=gen).to("cuda", dtype) for _ in range(3)]
        cos, sin = rope_3d_freqs(grid, d, "cuda") if rope else (None, None)
        dout = torch.randn(1, 3, n, d, generator=gen).to("cuda", dtype)

        def go(q, k, v, cos, sin, dout):
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            out = linear_attention_triton(*xs, kind=kind, cos=cos, sin=sin)
            out.backward(dout)
            return [out.detach()] + [x.grad for x in xs]

        with monkeypatch.context() as m:
            m.setitem(la.OPTIONS, "out_gluon", False)
            triton_only = go(q, k, v, cos, sin, dout)
        cfg = {"num_warps": warps, "stages": 3, "programs_per_sm": 1, "out_tma": out_tma}
        with monkeypatch.context() as m:
            for key, val in (("out_gluon", True), ("state_gluon", True), ("out_gluon_cfg", cfg), ("state_gluon_cfg", cfg)):
                m.setitem(la.OPTIONS, key, val)
            ours = go(q, k, v, cos, sin, dout)
        ref = linear_attention_ref(*[x.double() for x in (q, k, v)], kind, cos, sin)
        same = linear_attention_ref(q, k, v, kind, cos, sin)
        assert_close_to_torch(ours[0], same, ref, what=f"gluon {kind} {dtype} d={d} rope={rope} n={n} out")
        for name, a, b in zip(("dq", "dk", "dv"), ours[1:], triton_only[1:], strict=True):
            assert torch.isfinite(a).all() and rel_l2(a, b) < 3e-3, f"{name}: rel L2 {rel_l2(a, b):.2e} to the Triton path"


@pytest.mark.gpu
def test_no_grad_plans_gpu(gen, monkeypatch):
    """No-grad calls go through a plan per input signature (kernels.linear_attn._plan): the same output as
    the general path (bitwise), for new tensors of a seen signature (the plan reused), a new shape, tables
    at a new address and non-contiguous inputs (the general path); OPTIONS changes drop the plans."""
    from salad_bench.kernels import linear_attn as la

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the plans cover the Gluon passes, which need an sm_90 GPU")
    monkeypatch.setattr(la, "_PLANS", {})

    def inputs(grid, d=128):
        n = grid[0] * grid[1] * grid[2]
        return [torch.randn(1, 3, n, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(3)]

    def general(q, k, v, cos, sin):
        q, k, v, cos, sin, rope, kind = la._prepare(q, k, v, "relu", cos, sin)
        return la._forward(q, k, v, kind, cos, sin, rope, 1e-6)[0]

    cos, sin = rope_3d_freqs((5, 13, 62), 128, "cuda")
    for q, k, v in (inputs((5, 13, 62)), inputs((5, 13, 62))):
        with torch.no_grad():
            out = linear_attention_triton(q, k, v, "relu", cos, sin)
        assert torch.equal(out, general(q, k, v, cos, sin))
    assert len(la._PLANS) == 1 and all(la._PLANS.values())
    plan = next(iter(la._PLANS.values()))
    q, k, v = inputs((2, 5, 7))
    c2, s2 = rope_3d_freqs((2, 5, 7), 128, "cuda")
    with torch.no_grad():
        assert torch.equal(linear_attention_triton(q, k, v, "relu", c2, s2), general(q, k, v, c2, s2))
        assert torch.equal(linear_attention_triton(q, k, v, "relu", c2.clone(), s2.clone()), general(q, k, v, c2, s2))
        qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided heads: the general path copies nothing
        assert torch.equal(linear_attention_triton(qt, k, v, "relu", c2, s2), general(qt, k, v, c2, s2))
    assert len(la._PLANS) == 4 and next(iter(la._PLANS.values())) is plan
    monkeypatch.setitem(la.OPTIONS, "out_gluon_cfg", {**la.OPTIONS["out_gluon_cfg"], "out_tma": False})
    with torch.no_grad():
        assert torch.equal(linear_attention_triton(q, k, v, "relu", c2, s2), general(q, k, v, c2, s2))
    assert len(la._PLANS) == 1
    # with gradients the general path runs, and agrees
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    assert torch.equal(linear_attention_triton(*xs, "relu", c2, s2).detach(), general(q, k, v, c2, s2))


def test_launch_retries_smaller_when_shared_memory_overflows():
    import triton

    from salad_bench.kernels import linear_attn as la

    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, BLOCK, num_warps, num_stages, **consts):
                calls.append((BLOCK, num_stages))
                if BLOCK * num_stages > 64:
                    raise triton.runtime.errors.OutOfResources(BLOCK * num_stages * 1024, 65536, "shared memory")

            return run

    cfg = {"BLOCK": 64, "num_warps": 8, "num_stages": 3}
    la._launch(FakeKernel(), (1,), (), {"D": 64}, cfg)
    assert calls == [(64, 3), (64, 2), (64, 1)]
    calls.clear()
    la._launch(FakeKernel(), (1,), (), {"D": 64}, cfg)  # the fitted config is remembered
    assert calls == [(64, 1)]
