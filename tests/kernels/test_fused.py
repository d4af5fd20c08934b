"""SALAD's fused sparse + linear forward (linear Q pass in the sparse kernel's epilogue) against the two
references, forward and gradients (interpreter on the CPU; full size under the ``gpu`` marker)."""

from __future__ import annotations

import pytest
import torch

from salad_bench.kernels import block_sparse as bs
from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.fused import sparse_linear_attention_triton
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.kernels.reference import block_sparse_attention_ref, linear_attention_ref
from salad_bench.kernels.rope import rope_3d_freqs
from tests.kernels._tol import assert_close_to_torch
from tests.kernels.test_block_sparse import _random_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(gen, lay, kind, dtype, grid, d, rope, h=2, ref_dtype=torch.float64):
    n = grid[0] * grid[1] * grid[2]
    q, k, v = [torch.randn(1, h, n, d, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    cos, sin = rope_3d_freqs(grid, d, DEVICE) if rope else (None, None)
    do_s, do_l = [torch.randn(1, h, n, d, generator=gen).to(DEVICE, dtype) for _ in range(2)]

    def go(dt, fused):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        if fused:
            out_s, out_l = sparse_linear_attention_triton(*xs, lay, kind=kind, cos=cos, sin=sin)
        else:
            out_s = block_sparse_attention_ref(*xs, lay)
            out_l = linear_attention_ref(*xs, kind=kind, cos=cos, sin=sin)
        ((out_s * do_s.to(dt)).sum() + (out_l * do_l.to(dt)).sum()).backward()
        return [out_s.detach(), out_l.detach()] + [x.grad for x in xs]

    ours, ref, same = go(dtype, True), go(ref_dtype, False), go(dtype, False)
    for name, o, r, s in zip(("out", "out_linear", "dq", "dk", "dv"), ours, ref, same, strict=True):
        assert o.dtype == dtype
        factor = 3.0 if (dtype == torch.float16 and name.startswith("d")) else 2.0
        assert_close_to_torch(o, s, r, factor=factor, what=f"{kind} {dtype} rope={rope} {name}")
    return ours


@pytest.mark.parametrize("kind", ["relu", "elu", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matches_both_references(gen, kind, dtype):
    grid, d = (2, 10, 10), 64  # N = 200: ragged for 64-token blocks
    lay = _random_layout(gen, 1, 2, 200, 64, 64)  # shuffled lists, an empty query block, the ragged corner
    out_s = _check(gen, lay, kind, dtype, grid, d, rope=True)[0]
    assert (out_s[0, 0, :64] == 0).all()


def test_fused_head_dim_128_without_rope(gen):
    lay = _random_layout(gen, 1, 2, 78, 64, 64)
    _check(gen, lay, "relu", torch.float32, (1, 6, 13), 128, rope=False)


def test_fused_rejects_what_it_cannot_run(gen, monkeypatch):
    q = torch.randn(1, 1, 64, 64, generator=gen).to(DEVICE)
    lay = BlockLayout.full(1, 1, 64, 64, 64, DEVICE)
    with pytest.raises(ValueError, match="kind"):
        sparse_linear_attention_triton(q, q, q, lay, kind="cosine")
    with pytest.raises(Unsupported, match="head_dim"):
        q96 = torch.randn(1, 1, 64, 96, generator=gen).to(DEVICE)
        sparse_linear_attention_triton(q96, q96, q96, lay)
    monkeypatch.setitem(bs.OPTIONS, "fwd_ws", True)
    with pytest.raises(Unsupported, match="fwd_ws"):
        sparse_linear_attention_triton(q, q, q, lay)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["relu", "softmax"])
def test_fused_full_size_gpu(gen, kind):
    """Wan2.1-1.3B shape (N = 32,760 on a 21 x 30 x 52 grid), bf16, density ~0.1; fp32 reference."""
    b, h, n, d = 1, 2, 32760, 128
    mq, mk = cdiv(n, 128), cdiv(n, 64)
    tiles = torch.rand(b, h, mq, mk, generator=gen) < 0.1
    tiles[..., torch.arange(mq), torch.arange(mq) * 2] = True
    lay = BlockLayout.from_dense(tiles.to(DEVICE), 128, 64, n)
    _check(gen, lay, kind, torch.bfloat16, (21, 30, 52), d, rope=True, h=h, ref_dtype=torch.float32)


def test_fused_gradient_of_one_output_alone(gen):
    """Only the sparse output used: the fused op's gradients are the sparse kernel's."""
    q, k, v = [torch.randn(1, 2, 136, 64, generator=gen).to(DEVICE) for _ in range(3)]
    lay = _random_layout(gen, 1, 2, 136, 64, 64)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    sparse_linear_attention_triton(*xs, lay)[0].sum().backward()
    ys = [x.clone().requires_grad_() for x in (q, k, v)]
    bs.block_sparse_attention_triton(*ys, lay).sum().backward()
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x.grad, y.grad)
