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
    the state with the features' lo parts (what it does for half-precision inputs)."""
    _run(gen, kind, torch.float16, (2, 5, 7), 128, rope=False)


@pytest.mark.parametrize("grad", [False, True])
def test_output_is_token_major_for_heads_major_inputs(gen, grad):
    """Contiguous (B, H, N, D) inputs still give a view of a token-major buffer: the layout the branch's
    projection reads (its (B, N, H*D) reshape is then free), with and without autograd."""
    q, k, v = [torch.randn(2, 3, 70, 64, generator=gen).to(DEVICE, torch.float32).requires_grad_(grad)
               for _ in range(3)]
    out = linear_attention_triton(q, k, v, "relu")
    assert q.is_contiguous() and out.transpose(1, 2).is_contiguous()
    ref = linear_attention_ref(*(x.detach().double() for x in (q, k, v)), "relu")
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-4, atol=1e-5)


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
@pytest.mark.parametrize("kind", ["relu", "elu", "softmax"])
@pytest.mark.parametrize("d,dtype,rope", [(64, torch.float16, True), (128, torch.bfloat16, True),
                                          (128, torch.float16, False)])
def test_gluon_passes_gpu(gen, kind, d, dtype, rope):
    """The Gluon K/V and output passes (kernels.linear_gluon, what runs on sm_90) at a ragged N (70 and 4,030
    tokens: one and several 64-token tiles per program): the output against the float64 reference, and
    the gradients (the Triton backward) too; the Gluon passes' other builds (4 warps, the output stored from
    registers) likewise."""
    from salad_bench.kernels import linear_attn as la
    from salad_bench.kernels import linear_gluon as lg

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon passes need an sm_90 GPU")
    for grid in ((2, 5, 7), (5, 13, 62)):
        n = grid[0] * grid[1] * grid[2]
        q, k, v = [torch.randn(1, 3, n, d, generator=gen).to("cuda", dtype) for _ in range(3)]
        cos, sin = rope_3d_freqs(grid, d, "cuda") if rope else (None, None)
        dout = torch.randn(1, 3, n, d, generator=gen).to("cuda", dtype)
        assert la._gluon(cos, q, k, v) is lg
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = linear_attention_triton(*xs, kind=kind, cos=cos, sin=sin)
        out.backward(dout)
        ref_xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref = linear_attention_ref(*ref_xs, kind, cos, sin)
        ref.backward(dout.double())
        same_xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        same = linear_attention_ref(*same_xs, kind, cos, sin)
        same.backward(dout)
        what = f"gluon {kind} {dtype} d={d} rope={rope} n={n}"
        assert_close_to_torch(out.detach(), same.detach(), ref.detach(), what=f"{what} out")
        for name, a, s, r in zip("qkv", xs, same_xs, ref_xs, strict=True):
            assert_close_to_torch(a.grad, s.grad, r.grad, factor=3.0, what=f"{what} d{name}")
        qp, kp, vp, cos_t, sin_t, rope_on, kind_id = la._prepare(q, k, v, kind, cos, sin)
        for warps in (4, 8):
            for out_tma in (False, True):
                chunks = la._chunks(n, 3, q.device, block=lg.BLOCK, per_sm=1)
                state = lg.state_pass_gluon(kp, vp, cos_t, sin_t, rope_on, kind_id, *chunks, warps, 3)
                other = lg.out_pass_gluon(qp, state, cos_t, sin_t, rope_on, kind_id, 1e-6, *chunks, warps, 3, out_tma)
                assert_close_to_torch(other, same.detach(), ref.detach(), what=f"{what} warps={warps} out_tma={out_tma}")


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gluon_passes_take_the_model_layout_gpu(gen, fused):
    """The layout a Wan layer hands a method: (B, H, N, D) views of token-major (B, N, H*D) projections (or
    slices of a fused (B, N, 3*H*D) one), two batches, ragged N. The Gluon passes read them in place (no
    copy, no Triton fallback) and match the float64 reference; the output is token-major like q."""
    from salad_bench.kernels import linear_attn as la
    from salad_bench.kernels import linear_gluon as lg

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon passes need an sm_90 GPU")
    b, h, d, grid = 2, 3, 128, (5, 13, 62)
    n = grid[0] * grid[1] * grid[2]
    cos, sin = rope_3d_freqs(grid, d, "cuda")
    if fused:
        qkv = torch.randn(b, n, 3 * h * d, generator=gen).to("cuda", torch.bfloat16)
        q, k, v = (t.unflatten(2, (h, d)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    else:
        q, k, v = (torch.randn(b, n, h, d, generator=gen).to("cuda", torch.bfloat16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous() and la._gluon(cos, q, k, v) is lg
    ref = linear_attention_ref(*(x.double() for x in (q, k, v)), "relu", cos, sin)
    same = linear_attention_ref(q, k, v, "relu", cos, sin)
    for grad in (False, True):  # the no-grad plan, and the general path under autograd
        xs = [x.detach().requires_grad_(grad) for x in (q, k, v)]
        out = linear_attention_triton(*xs, "relu", cos, sin).detach()
        assert out.transpose(1, 2).is_contiguous()
        assert_close_to_torch(out, same, ref, what=f"model layout fused={fused} grad={grad}")
    qp, kp, vp, cos_t, sin_t, rope_on, kind_id = la._prepare(q, k, v, "relu", cos, sin)
    chunks = la._chunks(n, b * h, q.device, block=lg.BLOCK, per_sm=1)
    state = lg.state_pass_gluon(kp, vp, cos_t, sin_t, rope_on, kind_id, *chunks, 8, 3)
    for out_tma in (False, True):
        other = lg.out_pass_gluon(qp, state, cos_t, sin_t, rope_on, kind_id, 1e-6, *chunks, 8, 3, out_tma)
        assert other.transpose(1, 2).is_contiguous()
        assert_close_to_torch(other, same, ref, what=f"model layout fused={fused} out_tma={out_tma}")


@pytest.mark.gpu
def test_no_grad_plans_gpu(gen, monkeypatch):
    """No-grad calls go through a plan per input signature (kernels.linear_attn._plan): the same output as
    the general path (bitwise), for new tensors of a seen signature (the plan reused), a new shape, tables
    at a new address and non-contiguous inputs (the general path)."""
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
    # with gradients the general path runs, and agrees
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    assert torch.equal(linear_attention_triton(*xs, "relu", c2, s2).detach(), general(q, k, v, c2, s2))
