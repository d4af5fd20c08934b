"""The trained peers (vsa, sla, sparse_lora; sparse_headlora, the per-head ablation) untrained: shapes, exactness at zero init, gradients,
density, ragged grids, knob validation, and brute-force references for their non-trivial parts.

CPU, tiny shapes, fresh random inputs (the ``gen`` fixture). The shared contract over every method
lives elsewhere; these tests cover what is particular to the trained methods.
"""

from __future__ import annotations

import math

import pytest
import torch

import salad_bench.methods  # noqa: F401  (registers every method)
from salad_bench.kernels import block_sparse_attention
from salad_bench.kernels.reference import feature_map
from salad_bench.methods.base import AttnContext, create_method
from salad_bench.methods.sla import SLAConfig, classify_blocks, marginal_linear_attention
from salad_bench.methods.vsa import cube_partition, fine_token_mask, pool_cubes

H, D = 2, 32
TRAINED = ("vsa", "sla", "sparse_lora", "sparse_headlora")
# What trains in these lives inside the method (sparse_lora's LoRA lives on a model's projections).
OWN_PARAMS = ("vsa", "sla", "sparse_headlora")
GRIDS = [(4, 8, 9), (3, 10, 11)]


def qkv(gen, n, b=1, dtype=torch.float32, requires_grad=False):
    out = [torch.randn(b, H, n, D, generator=gen).to(dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in out]


def full_attention(q, k, v):
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v.double()


def perturb(module: torch.nn.Module, gen) -> None:
    """Give every trainable (zero-initialised) parameter a random value."""
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


# -- shapes, dtypes, exactness untrained -----------------------------------------------------------


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_and_dtype(name, dtype, gen):
    grid = (4, 8, 9)
    q, k, v = qkv(gen, math.prod(grid), b=2, dtype=dtype)
    out = create_method(name, num_heads=H, head_dim=D, sparsity=0.5)(q, k, v, AttnContext(grid=grid))
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("grid", [*GRIDS, (4, 8, 8)])
def test_untrained_at_sparsity_zero_equals_full(name, grid, gen):
    q, k, v = qkv(gen, math.prod(grid))
    m = create_method(name, num_heads=H, head_dim=D, sparsity=0.0)
    out = m(q, k, v, AttnContext(grid=grid))
    torch.testing.assert_close(out.double(), full_attention(q, k, v), atol=2e-5, rtol=1e-5)
    assert m.report().density == 1.0


def test_untrained_sla_is_its_critical_branch(gen):
    q, k, v = qkv(gen, 300)
    m = create_method("sla", num_heads=H, head_dim=D, sparsity=0.6, block_q=32, block_k=32)
    layout = m.select(q, k, AttnContext())
    torch.testing.assert_close(m(q, k, v), block_sparse_attention(q, k, v, layout, backend="torch"))


@pytest.mark.parametrize("name", ["sparse_lora", "sparse_headlora"])
def test_untrained_sparse_lora_is_the_plain_sparse_method(gen, name):
    q, k, v = qkv(gen, 288)
    lora = create_method(name, num_heads=H, head_dim=D, sparsity=0.7)
    plain = create_method("topk", num_heads=H, head_dim=D, sparsity=0.7)
    torch.testing.assert_close(lora(q, k, v), plain(q, k, v), atol=0, rtol=0)
    assert lora.report().density == plain.report().density


# -- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OWN_PARAMS)
def test_gradients_reach_trainable_parameters(name, gen):
    grid = (3, 10, 11)
    q, k, v = qkv(gen, math.prod(grid), requires_grad=True)
    m = create_method(name, num_heads=H, head_dim=D, sparsity=0.5)
    params = m.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    own = {id(p) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in params} == own  # everything that trains is listed, nothing more
    perturb(m, gen)
    out = m(q, k, v, AttnContext(grid=grid))
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_vsa_gate_reads_hidden_states_when_given(gen):
    grid = (4, 8, 9)
    n = math.prod(grid)
    q, k, v = qkv(gen, n)
    m = create_method("vsa", num_heads=H, head_dim=D, sparsity=0.5)
    perturb(m, gen)
    x = torch.randn(1, n, H * D, generator=gen)
    a = m(q, k, v, AttnContext(grid=grid))
    b = m(q, k, v, AttnContext(grid=grid, hidden_states=x))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="hidden_states"):
        m(q, k, v, AttnContext(grid=grid, hidden_states=x[..., :-1]))


# -- density ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINED)
def test_density_decreases_with_sparsity(name, gen):
    grid = (8, 16, 16)  # 32 full cubes, 32 blocks of 64 tokens
    q, k, v = qkv(gen, math.prod(grid))
    dens = []
    for s in (0.0, 0.5, 0.75, 0.9):
        m = create_method(name, num_heads=H, head_dim=D, sparsity=s)
        layout = m.select(q, k, AttnContext(grid=grid))
        dens.append(layout.density())
    assert dens[0] == 1.0
    assert all(a > b for a, b in zip(dens, dens[1:], strict=False)), dens
    assert abs(dens[-1] - 0.1) < 0.05  # kept fraction tracks 1 - sparsity on an aligned grid


def test_vsa_on_aligned_grid_keeps_exactly_k_cubes(gen):
    grid = (8, 8, 12)
    q, k, _ = qkv(gen, math.prod(grid))
    m = create_method("vsa", num_heads=H, head_dim=D, sparsity=0.75)
    layout = m.select(q, k, AttnContext(grid=grid))
    m_cubes = 2 * 2 * 3
    assert layout.num_k_blocks == m_cubes and (layout.kv_cnt == math.ceil(0.25 * m_cubes)).all()


# -- VSA: permutation, pooling, ragged grids against brute force -----------------------------------


@pytest.mark.parametrize("grid", [*GRIDS, (4, 8, 8), (21, 6, 10), (1, 1, 7)])
def test_vsa_permutation_round_trips(grid, gen):
    n = math.prod(grid)
    part = cube_partition(grid, (4, 4, 4), "cpu")
    assert torch.equal(torch.sort(part.perm).values, torch.arange(n))
    x = torch.randn(1, H, n, D, generator=gen)
    assert torch.equal(x[:, :, part.perm][:, :, part.inv], x)
    assert torch.equal(x[:, :, part.inv][:, :, part.perm], x)
    cubes_in_order = part.token_cube[part.perm]
    assert (cubes_in_order.diff() >= 0).all()  # a cube's tokens are contiguous
    assert int(part.cube_sizes.sum()) == n
    assert torch.equal(torch.bincount(part.token_cube, minlength=part.num_cubes), part.cube_sizes)
    full = (part.cube_sizes == 64).nonzero().flatten()
    assert torch.equal(full, torch.arange(full.numel()))  # full cubes first: cube i is block i
    assert (part.overlap[torch.arange(full.numel()), full] == 1).all()


@pytest.mark.parametrize("grid,cube", [((3, 10, 11), (4, 4, 4)), ((5, 9, 8), (2, 4, 8)), ((1, 4, 4), (4, 4, 4))])
@pytest.mark.parametrize("layout", ["heads", "tokens", "strided"])
def test_vsa_cube_tokens_follow_the_grid(gen, grid, cube, layout):
    """Cubes are cells of the grid (ragged at its edges), and pool_cubes is each cell's mean whatever x's
    memory layout: heads-major and token-major pool over the grid, anything else through index_add."""
    part = cube_partition(grid, cube, "cpu")
    t, h, w = torch.meshgrid(*(torch.arange(s) for s in grid), indexing="ij")
    coords = torch.stack([t // cube[0], h // cube[1], w // cube[2]], -1).reshape(-1, 3)
    for c in range(part.num_cubes):
        members = coords[part.token_cube == c]
        assert (members == members[0]).all()  # one cube = one cell of the grid
    x = torch.randn(2, H, math.prod(grid), D, generator=gen)
    if layout == "tokens":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        x = torch.randn(2, H, math.prod(grid), 2 * D, generator=gen)[..., ::2]
    pooled = pool_cubes(x, part)
    assert pooled.shape == (2, H, part.num_cubes, D) and pooled.dtype == torch.float32
    for c in range(part.num_cubes):
        torch.testing.assert_close(pooled[:, :, c], x[:, :, part.token_cube == c].mean(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("token_major", [False, True])
def test_vsa_pools_bf16_on_the_gpu_close_to_the_fp32_mean(gen, token_major):
    """On CUDA a bf16 x is pooled by one avg_pool3d pass (fp32 accumulation, each frame's window mean
    rounded to bf16 once), then the frames averaged in fp32: within bf16 rounding of the fp32 mean."""
    grid = (5, 10, 11)
    part = cube_partition(grid, (4, 4, 4), "cuda")
    x = torch.randn(1, 3, math.prod(grid), 128, generator=gen).cuda().bfloat16()
    if token_major:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    want = torch.stack([x[:, :, part.token_cube == c].float().mean(2) for c in range(part.num_cubes)], 2)
    torch.testing.assert_close(pool_cubes(x, part), want.bfloat16().float(), rtol=0, atol=1e-2)
    torch.testing.assert_close(pool_cubes(x, part), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("grid", [*GRIDS, (4, 8, 8)])
def test_vsa_matches_brute_force(grid, gen):
    n = math.prod(grid)
    q, k, v = qkv(gen, n)
    m = create_method("vsa", num_heads=H, head_dim=D, sparsity=0.6)
    perturb(m, gen)
    ctx = AttnContext(grid=grid)
    out = m(q, k, v, ctx)
    part = cube_partition(grid, (4, 4, 4), "cpu")
    # coarse: cube means by explicit loops
    means = [
        torch.stack([t[:, :, part.token_cube == c].double().mean(2) for c in range(part.num_cubes)], 2)
        for t in (q, k, v)
    ]
    scores = means[0] @ means[1].transpose(-1, -2) / math.sqrt(D)
    out_c = (torch.softmax(scores, -1) @ means[2])[:, :, part.token_cube]
    # fine: the layout's token mask must contain every (query, key in a selected cube) pair ...
    mask = fine_token_mask(m.layout, part)
    keep = math.ceil(0.4 * part.num_cubes)
    top = torch.topk(scores, keep, -1).indices
    cube_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    token_cube_mask = cube_mask[:, :, part.token_cube][:, :, :, part.token_cube]
    assert (mask | ~token_cube_mask).all()
    # ... and equal it exactly between full cubes
    full_tok = (part.cube_sizes == 64)[part.token_cube]
    both = full_tok[:, None] & full_tok[None, :]
    assert torch.equal(mask[..., both], token_cube_mask[..., both])
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    out_f = torch.softmax(s, -1) @ v.double()
    gate = m.gate_value(q, ctx).double()
    torch.testing.assert_close(out.double(), out_f + gate * out_c, atol=2e-5, rtol=1e-5)


def test_vsa_needs_grid(gen):
    q, k, v = qkv(gen, 64)
    with pytest.raises(ValueError, match="grid"):
        create_method("vsa", num_heads=H, head_dim=D)(q, k, v)


# -- SLA: classification and marginal linear attention ---------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "elu", "relu"])
def test_sla_marginal_linear_matches_brute_force(kind, gen):
    n, bq, bk = 150, 32, 16  # ragged in both block sizes
    q, k, v = (t.double() for t in qkv(gen, n))
    mq, mk = math.ceil(n / bq), math.ceil(n / bk)
    marginal = torch.rand(1, H, mq, mk, generator=gen) < 0.5
    marginal[0, 0, 0] = False  # a query block with no marginal block gives zeros
    out = marginal_linear_attention(q, k, v, marginal, bq, bk, kind, eps=1e-5)
    fq, fk = feature_map(q, kind), feature_map(k, kind)
    tokens = torch.arange(n)
    keys = marginal[:, :, tokens // bq][:, :, :, tokens // bk]  # (1, H, N, N) token mask
    w = (fq @ fk.transpose(-1, -2)) * keys
    ref = (w @ v) / (w.sum(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, ref)
    assert (out[0, 0, :bq] == 0).all()


def test_sla_block_classes_partition_the_key_blocks(gen):
    q, k, _ = qkv(gen, 40 * 64)
    cfg = SLAConfig(sparsity=0.8, negligible=0.25)
    crit, marginal, n_neg = classify_blocks(q, k, cfg)
    mk = 40
    assert crit.shape[-1] == 8 and n_neg == 10
    assert (marginal.sum(-1) == mk - 8 - 10).all()
    assert not marginal.gather(-1, crit.long()).any()
    # critical = the best-ranked pooled scores with K centred (smooth-k)
    pq = q.view(1, H, 40, 64, D).mean(3)
    pk = (k - k.mean(2, keepdim=True)).view(1, H, 40, 64, D).mean(3)
    best = torch.topk(pq @ pk.transpose(-1, -2), 8, -1).indices.sort(-1).values
    assert torch.equal(crit.long(), best)


def test_sla_report_has_branch_fractions(gen):
    q, k, v = qkv(gen, 20 * 64)
    m = create_method("sla", num_heads=H, head_dim=D, sparsity=0.75, negligible=0.1)
    m(q, k, v)
    rep = m.report()
    assert rep.density == pytest.approx(0.25)
    assert rep.extra["negligible_fraction"] == pytest.approx(0.1)
    assert rep.extra["marginal_fraction"] == pytest.approx(0.65)
    assert {"attention", "selection", "linear", "projection"} <= set(rep.flops)


def test_sla_negligible_never_eats_critical(gen):
    q, k, v = qkv(gen, 10 * 64)
    crit, marginal, n_neg = classify_blocks(q, k, SLAConfig(sparsity=0.05, negligible=0.5))
    assert crit.shape[-1] == 10 and n_neg == 0 and not marginal.any()


# -- sparse_lora -----------------------------------------------------------------------------------


def test_sparse_lora_on_bare_qkv_is_its_sparse_method_and_asks_for_projection_lora(gen):
    """No projections on bare Q/K/V: the sparse method alone, nothing to train, and the report says where
    the LoRA lives; the request a model integration honours names rank, alpha and the roles."""
    grid = (3, 10, 11)
    q, k, v = qkv(gen, math.prod(grid))
    m = create_method("sparse_lora", num_heads=H, head_dim=D, sparsity=0.5, rank=8, alpha=4.0, targets=("q", "out"))
    plain = create_method("topk", num_heads=H, head_dim=D, sparsity=0.5)
    assert torch.equal(m(q, k, v, AttnContext(grid=grid)), plain(q, k, v, AttnContext(grid=grid)))
    assert m.trainable_parameters() == [] and not list(m.parameters())
    rep = m.report()
    assert rep.flops == plain.report().flops and "projections" in rep.extra["lora"]
    want = m.wants_projection_lora
    assert (want.rank, want.alpha, want.targets) == (8, 4.0, ("q", "out"))
    assert create_method("sparse_lora", num_heads=H, head_dim=D).wants_projection_lora.alpha == 16.0  # alpha = rank
    assert create_method("topk", num_heads=H, head_dim=D).wants_projection_lora is None
    # what an integration hands back is what trains and what the report counts
    a, b = torch.nn.Parameter(torch.zeros(8, 64)), torch.nn.Parameter(torch.zeros(64, 8))
    m.attach_projection_lora([a, b], [(64, 64)])
    assert m.trainable_parameters() == [a, b]
    n = math.prod(grid)
    assert m.report().flops["lora_projections"] == 2.0 * n * 8 * (64 + 64) + 2.0 * n * 64
    assert "installed" in m.report().extra["lora"]
    m.attach_projection_lora(None)
    assert m.trainable_parameters() == [] and "lora_projections" not in m.report().flops


def test_sparse_headlora_targets_knob(gen):
    m = create_method("sparse_headlora", num_heads=H, head_dim=D, targets=("q", "v"), rank=4)
    assert sorted(m.lora) == ["q", "v"] and len(m.trainable_parameters()) == 4
    assert sum(p.numel() for p in m.trainable_parameters()) == 2 * 2 * H * D * 4


# -- knobs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, knobs, knob",
    [
        ("vsa", {"sparsity": 1.0}, "sparsity"),
        ("vsa", {"cube": (4, 4, 3)}, "cube"),
        ("vsa", {"cube": (0, 4, 4)}, "cube"),
        ("vsa", {"cube": (4, 4)}, "cube"),
        ("vsa", {"gate": "sigmoid"}, "gate"),
        ("vsa", {"backend": "cuda"}, "backend"),
        ("sla", {"sparsity": -0.1}, "sparsity"),
        ("sla", {"negligible": 1.0}, "negligible"),
        ("sla", {"feature_map": "tanh"}, "feature_map"),
        ("sla", {"proj": "full"}, "proj"),
        ("sla", {"block_q": 48}, "block_q"),
        ("sla", {"eps": 0.0}, "eps"),
        ("sparse_lora", {"rank": 0}, r"rank=0 .*>= 1"),
        ("sparse_lora", {"rank": 2.5}, "rank"),
        ("sparse_lora", {"rank": 65}, r"rank=65 .*\[1, 64\]"),  # more than the projections' width H*D
        ("sparse_lora", {"alpha": 0.0}, "alpha"),
        ("sparse_lora", {"targets": ("q", "o")}, r"targets=.*\('q', 'k', 'v', 'out'\)"),
        ("sparse_lora", {"targets": ()}, "targets"),
        ("sparse_lora", {"sparse": "sparse_lora"}, "sparse"),
        ("sparse_lora", {"sparse": "sparse_headlora"}, "sparse"),
        ("sparse_headlora", {"rank": 64}, r"rank=64 .*\[1, 32\]"),  # more than head_dim
        ("sparse_headlora", {"sparse": "sparse_lora"}, "sparse"),
    ],
)
def test_bad_knobs_raise_naming_the_knob(name, knobs, knob):
    with pytest.raises(ValueError, match=knob):
        create_method(name, num_heads=H, head_dim=D, **knobs)
