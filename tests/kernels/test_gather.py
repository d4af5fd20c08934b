"""gather_pair (one Triton launch for k and v through a token index) against index_select."""

from __future__ import annotations

import pytest
import torch

from salad_bench.kernels import gather as g
from salad_bench.kernels.layout import is_token_major

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(gen, n, d, token_major, dtype=torch.float16, h=3, b=2):
    xs = [torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    if token_major:
        xs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs]
    return xs


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("n,d", [(200, 64), (77, 128), (5, 48)])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gather_pair_is_index_select(gen, token_major, n, d, idx_dtype):
    k, v = _pair(gen, n, d, token_major)
    perm = torch.randperm(n, generator=gen).to(DEVICE, idx_dtype)
    gk, gv = g.gather_pair(k, v, perm)
    assert torch.equal(gk, k.index_select(2, perm.long())) and torch.equal(gv, v.index_select(2, perm.long()))
    assert is_token_major(gk) == token_major and is_token_major(gv) == token_major
    assert token_major or (gk.is_contiguous() and gv.is_contiguous())


def test_gather_pair_takes_any_index_length_and_strided_inputs(gen):
    k, v = _pair(gen, 150, 64, False, dtype=torch.float32)
    k = k[:, :, ::2]  # token stride 2 * D
    idx = torch.tensor([3, 3, 0, 74], device=DEVICE)
    gk, gv = g.gather_pair(k, v[:, :, :75], idx)
    assert torch.equal(gk, k[:, :, idx]) and torch.equal(gv, v[:, :, idx])
    ek, ev = g.gather_pair(k, v[:, :, :75], idx[:0])
    assert ek.shape == (2, 3, 0, 64) and ev.shape == (2, 3, 0, 64)


def test_gather_pair_refuses_bad_input(gen):
    k, v = _pair(gen, 16, 64, False)
    perm = torch.arange(16, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        g.gather_pair(k, v[:, :, :8], perm)
    with pytest.raises(ValueError, match="one shape"):
        g.gather_pair(k, v.float(), perm)
    with pytest.raises(ValueError, match="last dim contiguous"):
        g.gather_pair(k.transpose(2, 3), v.transpose(2, 3), perm)
    with pytest.raises(ValueError, match="int32/int64"):
        g.gather_pair(k, v, perm.float())
    with pytest.raises(ValueError, match="no backward"):
        g.gather_pair(k.requires_grad_(), v, perm)


@pytest.mark.filterwarnings("ignore:sta. sparsity")
@pytest.mark.parametrize("name,knobs", [("sta", {"backend": "triton"}), ("vsa", {"backend": "triton"}),
                                        ("salad_sta", {"sparse_knobs": (("backend", "triton"),)})])
def test_tile_ordered_methods_gather_k_v_in_one_launch_at_inference(gen, name, knobs, monkeypatch):
    """On the Triton backend sta, vsa and salad_sta put k and v into their token order with gather_pair at
    inference, and give what they give under autograd (index_select gathers throughout)."""
    from salad_bench.kernels import gather as kernel_gather
    from salad_bench.methods import AttnContext, create_method

    calls = []
    real = kernel_gather.gather_pair
    monkeypatch.setattr(kernel_gather, "gather_pair", lambda *a: calls.append(1) or real(*a))
    h, d, grid = 2, 64, (3, 10, 11)
    q, k, v = (torch.randn(1, h, 330, d, generator=gen).to(DEVICE) for _ in range(3))
    m = create_method(name, num_heads=h, head_dim=d, sparsity=0.7, **knobs).to(DEVICE)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ctx = AttnContext(grid=grid)
    with torch.no_grad():
        inferred = m(q, k, v, ctx)
    assert calls == [1]
    trained = m(*(x.clone().requires_grad_() for x in (q, k, v)), ctx)
    assert calls == [1]
    torch.testing.assert_close(inferred, trained.detach(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("token_major", [False, True])
def test_the_dispatch_launches_for_heads_major_pairs_only(gen, token_major, monkeypatch):
    """``kernels.gather_pair`` on the Triton backend at inference: one launch for a heads-major pair, whole-row
    ``index_select`` for a token-major one (where the launch measured no faster); the same tensors either way."""
    import salad_bench.kernels as K

    calls = []
    real = g.gather_pair
    monkeypatch.setattr(g, "gather_pair", lambda *a: calls.append(1) or real(*a))
    k, v = _pair(gen, 90, 64, token_major)
    perm = torch.randperm(90, generator=gen).to(DEVICE)
    gk, gv = K.gather_pair(k, v, perm, "triton")
    assert calls == ([] if token_major else [1])
    assert torch.equal(gk, k[:, :, perm]) and torch.equal(gv, v[:, :, perm]) and is_token_major(gk) == token_major


@pytest.mark.parametrize("token_major", [False, True])
def test_gather_pair_operator_fake_matches_the_kernel(gen, token_major):
    """``salad_bench::gather_pair`` (what a compiled model calls): its fake gives the kernel's shapes and
    strides (token-major stays token-major)."""
    import salad_bench.kernels  # noqa: F401  (registers the operators)

    k, v = _pair(gen, 40, 64, token_major)
    idx = torch.randperm(40, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.salad_bench.gather_pair.default, (k, v, idx), test_utils=("test_schema", "test_faketensor"))
    gk, gv = torch.ops.salad_bench.gather_pair(k, v, idx)
    assert torch.equal(gk, k[:, :, idx]) and torch.equal(gv, v[:, :, idx])
