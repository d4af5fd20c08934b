"""window_means (each grid cell's mean in one Triton launch) against float64 means by explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from salad_bench.kernels import pool as p

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cells(grid, window):
    """Raster token ids of each cell, cells in raster order of the cell grid."""
    t, h, w = (torch.arange(s) for s in grid)
    tt, hh, ww = torch.meshgrid(t // window[0], h // window[1], w // window[2], indexing="ij")
    nh, nw = math.ceil(grid[1] / window[1]), math.ceil(grid[2] / window[2])
    cell = ((tt * nh + hh) * nw + ww).reshape(-1)
    return [torch.nonzero(cell == c).flatten() for c in range(int(cell.max()) + 1)]


def _want(x, grid, window):
    return torch.stack([x[:, :, ids].double().mean(2) for ids in _cells(grid, window)], 2)


@pytest.mark.parametrize("grid,window", [((3, 10, 11), (4, 4, 4)), ((5, 9, 8), (2, 4, 8)), ((1, 4, 4), (4, 4, 4)),
                                         ((6, 7, 5), (3, 2, 5))])
@pytest.mark.parametrize("layout", ["heads", "tokens", "strided"])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.float16, 48)])
def test_window_means_are_each_cells_mean(gen, grid, window, layout, dtype, d):
    n = math.prod(grid)
    x = torch.randn(2, 3, n, d, generator=gen)
    if layout == "tokens":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":  # tokens two rows apart
        x = torch.randn(2, 3, 2 * n, d, generator=gen)[:, :, ::2]
    x = x.to(DEVICE, dtype)
    got = p.window_means(x, grid, window)
    cells = len(_cells(grid, window))
    assert got.shape == (2, 3, cells, d) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double().cpu(), _want(x.cpu(), grid, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_window_means_put_the_cells_in_the_named_order(gen, idx_dtype):
    grid, window = (5, 9, 8), (2, 4, 8)
    x = torch.randn(1, 2, math.prod(grid), 32, generator=gen).to(DEVICE)
    m = len(_cells(grid, window))
    order = torch.randperm(m, generator=gen).to(DEVICE, idx_dtype)
    got = p.window_means(x, grid, window, order)
    torch.testing.assert_close(got, p.window_means(x, grid, window)[:, :, order.long()], rtol=0, atol=0)


def test_window_means_refuse_bad_input(gen):
    x = torch.randn(1, 2, 60, 32, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="N = T\\*H\\*W = 48"):
        p.window_means(x, (3, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        p.window_means(x, (3, 4, 5), (0, 2, 2))
    with pytest.raises(ValueError, match="last dim contiguous"):
        p.window_means(torch.randn(1, 2, 60, 64, generator=gen).to(DEVICE)[..., ::2], (3, 4, 5), (2, 2, 2))
    with pytest.raises(ValueError, match="order must be"):
        p.window_means(x, (3, 4, 5), (2, 2, 2), torch.arange(5, device=DEVICE))
    with pytest.raises(ValueError, match="no backward"):
        p.window_means(x.requires_grad_(), (3, 4, 5), (2, 2, 2))


def test_window_means_operator_fake_matches_the_kernel(gen):
    """``salad_bench::window_means`` (what a compiled method calls): its fake gives the kernel's shape and dtype."""
    import salad_bench.kernels  # noqa: F401  (registers the operators)

    x = torch.randn(1, 2, 3 * 10 * 11, 32, generator=gen).to(DEVICE, torch.float16)
    order = torch.randperm(9, generator=gen).to(DEVICE)  # 1 x 3 x 3 cells
    torch.library.opcheck(torch.ops.salad_bench.window_means.default, (x, [3, 10, 11], [4, 4, 4], order),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("token_major", [False, True])
def test_vsa_pools_with_one_launch_at_inference_and_as_it_trains(gen, token_major, monkeypatch):
    """On the Triton backend vsa's coarse stage pools q, k and v (and its selection q and k) with
    window_means at inference, and gives what it gives under autograd (torch pooling throughout)."""
    from salad_bench.methods import AttnContext, create_method
    from salad_bench.methods import vsa as vsa_mod

    calls = []
    real = vsa_mod.window_means
    monkeypatch.setattr(vsa_mod, "window_means", lambda *a: calls.append(1) or real(*a))
    h, d, grid = 2, 64, (5, 9, 8)
    q, k, v = (torch.randn(1, h, 360, d, generator=gen).to(DEVICE) for _ in range(3))
    if token_major:
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    m = create_method("vsa", num_heads=h, head_dim=d, sparsity=0.7, backend="triton").to(DEVICE)
    for prm in m.parameters():
        torch.nn.init.normal_(prm, std=0.05)
    ctx = AttnContext(grid=grid)
    with torch.no_grad():
        inferred = m(q, k, v, ctx)
        m.select(q, k, ctx)
    assert len(calls) == 5
    trained = m(*(x.clone().requires_grad_() for x in (q, k, v)), ctx)
    assert len(calls) == 5
    torch.testing.assert_close(inferred, trained.detach(), rtol=2e-5, atol=2e-5)
