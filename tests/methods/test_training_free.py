"""The training-free peers: sta, svg, radial, xattention, sparge, and the dense warm-up helper.

Method-specific checks (the registry-wide contract lives in test_contract.py): each mask rule against
a brute-force token-level construction on tiny inputs, each sparsity mapping (density falls as
sparsity rises, near the target where the method can reach it), the knobs that keep everything, knob
validation, and the per-method selection logic (STA calibration, SVG head classification, radial
band halving, XAttention antidiagonals, SpargeAttn's self-similarity guard).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from salad_bench.kernels.layout import cdiv
from salad_bench.methods import AttnContext, create_method
from salad_bench.methods._warmup import effective_density
from salad_bench.methods.radial import band_rule, radial_tile_map, radial_token_mask
from salad_bench.methods.sta import axis_window, tile_major_order
from salad_bench.methods.svg import spatial_major_order
from salad_bench.methods.xattention import antidiagonal_scores, tile_mass

PEERS = ["sta", "svg", "radial", "xattention", "sparge"]
RAGGED = (3, 10, 11)  # N = 330: not a multiple of 64 or 128
# A knob setting that keeps every tile, per method (besides sparsity 0).
KEEP_ALL = {
    "sta": {"window": (99, 99, 99)},
    "svg": {"band_frames": 100.0},
    "radial": {"decay_factor": 1e6, "min_window": 16},
    "xattention": {"threshold": 1.0},
    "sparge": {"sparsity": 0.0, "sim_threshold": 0.99},
}


def _qkv(gen, grid, heads=2, dim=32, dtype=torch.float32):
    n = math.prod(grid)
    return [torch.randn(1, heads, n, dim, generator=gen).to(dtype) for _ in range(3)]


def _run(name, q, k, v, grid, **knobs):
    m = create_method(name, num_heads=q.shape[1], head_dim=q.shape[3], **knobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m(q, k, v, AttnContext(grid=grid))
    return m, out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _blocks_any(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Token mask ``(N, N)`` -> tile map: a tile is kept iff it holds a kept pair."""
    n = mask.shape[0]
    mq, mk = cdiv(n, bq), cdiv(n, bk)
    pad = torch.zeros(mq * bq, mk * bk, dtype=torch.bool)
    pad[:n, :n] = mask
    return pad.view(mq, bq, mk, bk).any(3).any(1)


# -- common behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", PEERS)
def test_shape_dtype_ragged(name, dtype, gen):
    q, k, v = _qkv(gen, RAGGED, dtype=dtype)
    m, out = _run(name, q, k, v, RAGGED, sparsity=0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    rep = m.report()
    assert 0.0 < rep.density <= 1.0 and rep.flops["attention"] > 0
    assert rep.extra["effective_density"] == pytest.approx(rep.density)


@pytest.mark.parametrize("name", PEERS)
def test_keep_all_knob_equals_full(name, gen):
    q, k, v = _qkv(gen, RAGGED)
    _, ref = _run("full", q, k, v, RAGGED)
    m, out = _run(name, q, k, v, RAGGED, **KEEP_ALL[name])
    assert m.report().density == 1.0
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("name", PEERS)
def test_density_falls_with_sparsity(name, gen):
    grid = (16, 16, 32) if name == "radial" else (16, 8, 16)
    knobs = {"block_q": 64, "block_k": 64, **({"tile": (2, 4, 4)} if name == "sta" else {})}
    sparsities = (0.1, 0.3, 0.45) if name == "radial" else (0.3, 0.5, 0.7, 0.85)
    q, k, _ = _qkv(gen, grid, heads=1)
    dens = []
    for s in sparsities:
        m = create_method(name, num_heads=1, head_dim=32, sparsity=s, **knobs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dens.append(m.select(q, k, AttnContext(grid=grid)).density())
    assert all(a >= b for a, b in itertools.pairwise(dens)), dens
    assert dens[0] > dens[-1], dens
    # Documented tolerances: exact top-k methods within one block per row (plus the diagonal for
    # xattention); the band width (svg) within 0.03; radial's continuous decay within 0.05; STA's
    # discrete window family within 0.1 on this 8 x 2 x 4 tile grid.
    tol = {"sta": 0.1, "svg": 0.03, "radial": 0.05, "xattention": 2 / 32 + 1e-9, "sparge": 1 / 32 + 1e-9}[name]
    for s, d in zip(sparsities, dens, strict=True):
        assert abs(d - (1 - s)) <= tol, (s, d)


BAD_KNOBS = [
    ("sta", "window", (0, 1, 1)),
    ("sta", "tile", (1, 2)),
    ("sta", "token_order", "zigzag"),
    ("sta", "head_windows", ((1, 1, 1),)),  # one window for two heads
    ("sta", "dense_first_steps", -1),
    ("svg", "num_sampled_rows", 0),
    ("svg", "sink_frames", -1),
    ("svg", "band_frames", -1.0),
    ("svg", "dense_first_layers", 1.5),
    ("radial", "decay_factor", 0.0),
    ("radial", "min_window", 0),
    ("radial", "dense_band", -1),
    ("xattention", "stride", 3),
    ("xattention", "stride", 128),  # larger than block_k=64
    ("xattention", "threshold", 1.5),
    ("xattention", "threshold", 0.0),
    ("xattention", "score_precision", "bf16"),
    ("sparge", "cdf_threshold", 0.0),
    ("sparge", "sim_threshold", 2.0),
    ("sparge", "sparsity", 1.0),
]


@pytest.mark.parametrize("name,knob,value", BAD_KNOBS)
def test_bad_knob_names_itself(name, knob, value):
    with pytest.raises(ValueError, match=knob):
        create_method(name, num_heads=2, head_dim=32, **{knob: value})


@pytest.mark.parametrize("name", ["sta", "svg", "radial"])
def test_grid_required(name):
    m = create_method(name, num_heads=2, head_dim=32)
    q = torch.randn(1, 2, 64, 32)
    with pytest.raises(ValueError, match="grid"):
        m(q, q, q, AttnContext())


@pytest.mark.parametrize("name", PEERS)
def test_deterministic_layout_and_output(name, gen):
    q, k, v = _qkv(gen, (4, 8, 12))
    m1, a = _run(name, q, k, v, (4, 8, 12), sparsity=0.6, block_q=32, block_k=32)
    m2, b = _run(name, q, k, v, (4, 8, 12), sparsity=0.6, block_q=32, block_k=32)
    assert torch.equal(a, b)
    assert torch.equal(m1.layout.to_dense(), m2.layout.to_dense())


# -- dense warm-up -------------------------------------------------------------------------------


def test_effective_density_formula():
    # 30 layers x 50 steps, first layer and first 12 steps dense: 29 * 38 sparse calls of 1500.
    assert effective_density(0.1, 30, 50, 1, 12) == pytest.approx((1500 - 1102 + 0.1 * 1102) / 1500)
    assert effective_density(0.2, 30, 50, 0, 0) == pytest.approx(0.2)
    assert effective_density(0.2, 4, 4, 10, 0) == 1.0
    with pytest.raises(ValueError, match="per_call_density"):
        effective_density(1.5, 1, 1, 0, 0)


@pytest.mark.parametrize("name", ["sta", "svg", "radial", "xattention"])
def test_warmup_calls_are_dense_and_reported(name, gen):
    grid = (4, 8, 12)
    q, k, v = _qkv(gen, grid)
    m = create_method(
        name, num_heads=2, head_dim=32, sparsity=0.7, block_q=32, block_k=32, dense_first_layers=1, dense_first_steps=2
    )
    _, ref = _run("full", q, k, v, grid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m(q, k, v, AttnContext(grid=grid, layer=0, num_layers=30, step=5, num_steps=10))
        rep = m.report()
        assert rep.density == 1.0 and rep.extra["dense_call"] and rep.flops.get("selection", 0.0) == 0.0
        assert rep.extra["effective_density"] is None  # no sparse call seen yet
        assert _rel(out, ref) < 1e-5
        m(q, k, v, AttnContext(grid=grid, layer=3, num_layers=30, step=5, num_steps=10))
    rep = m.report()
    assert rep.density < 1.0 and not rep.extra["dense_call"]
    assert rep.extra["effective_density"] == pytest.approx(effective_density(rep.density, 30, 10, 1, 2))


# -- sta -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["raster", "tile"])
@pytest.mark.parametrize("window", [(1, 1, 1), (1, 2, 1), (2, 1, 3), (3, 3, 3)])
def test_sta_tile_map_matches_token_mask(order, window):
    grid, tile, bq, bk = RAGGED, (2, 4, 4), 32, 16
    m = create_method("sta", num_heads=1, head_dim=32, tile=tile, token_order=order, block_q=bq, block_k=bk)
    n = math.prod(grid)
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    inside = torch.ones(n, n, dtype=torch.bool)
    for coord, size, ntiles, win in zip(
        (t, h, w), tile, (cdiv(g, s) for g, s in zip(grid, tile, strict=True)), window, strict=True
    ):
        a = coord.reshape(-1) // size
        inside &= axis_window(ntiles, win, "cpu")[a][:, a].bool()
    if order == "tile":
        perm = tile_major_order(grid, tile, "cpu")
        inside = inside[perm][:, perm]
    assert torch.equal(m.tile_map(grid, n, window, "cpu"), _blocks_any(inside, bq, bk))


def test_sta_calibration_picks_per_head_windows(gen):
    grid, tile = (4, 16, 16), (1, 4, 4)
    n, d = math.prod(grid), 64
    t, h, w = (x.reshape(-1) for x in torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"))
    frame_emb = torch.nn.functional.normalize(torch.randn(4, d, generator=gen), dim=-1)
    place_emb = torch.nn.functional.normalize(torch.randn(16, d, generator=gen), dim=-1)
    local = 8.0 * frame_emb[t]  # head 0 attends within its frame
    across = 8.0 * place_emb[(h // 4) * 4 + w // 4]  # head 1 attends to its spatial tile in every frame
    qk = torch.stack([local, across])[None]
    v = torch.randn(1, 2, n, d, generator=gen)
    m = create_method("sta", num_heads=2, head_dim=d, tile=tile, block_q=64, block_k=64)
    cands = [(1, 4, 4), (4, 1, 1), (2, 2, 2), (4, 4, 4)]
    windows = m.calibrate([qk], [qk], [v], grid, target_sparsity=0.75, candidates=cands)
    assert windows == ((1, 4, 4), (4, 1, 1))
    assert all(m.window_density(grid, n, w) <= 0.25 + 1e-9 for w in windows)
    # The default candidates (every maximal window meeting the target) also meet it.
    for w in m.calibrate(qk, qk, v, grid, target_sparsity=0.8):
        assert m.window_density(grid, n, w) <= 0.2 + 1e-9
    m(qk, qk, v, AttnContext(grid=grid))
    assert m.report().extra["windows"] == list(m.calibrated_windows)


def test_sta_per_head_windows_give_per_head_layouts(gen):
    grid = (4, 16, 16)
    q, k, v = _qkv(gen, grid)
    m, _ = _run("sta", q, k, v, grid, tile=(1, 4, 4), block_q=64, block_k=64, head_windows=((1, 1, 1), (4, 4, 4)))
    tiles = m.layout.to_dense()[0]
    assert tiles[1].all() and tiles[0].float().mean() < 0.2


# -- svg -----------------------------------------------------------------------------------------


def test_svg_classifies_spatial_and_temporal_heads(gen):
    grid, d = (6, 8, 8), 64
    n, frame = math.prod(grid), 64
    idx = torch.arange(n)
    frame_emb = torch.nn.functional.normalize(torch.randn(grid[0], d, generator=gen), dim=-1)
    place_emb = torch.nn.functional.normalize(torch.randn(frame, d, generator=gen), dim=-1)
    qk = torch.stack([8.0 * frame_emb[idx // frame], 8.0 * place_emb[idx % frame]])[None]
    v = torch.randn(1, 2, n, d, generator=gen)
    m, out = _run("svg", qk, qk, v, grid, band_frames=1.0, block_q=32, block_k=32)
    assert m.report().extra["temporal_heads"] == [0, 1]
    # The temporal head ran the band in the transposed order: compare with an explicit token mask.
    tiles = m.layout.to_dense()[0, 1]
    pos = torch.empty(n, dtype=torch.long).index_copy_(0, spatial_major_order(grid, "cpu"), idx)
    mask = tiles[(pos // 32)][:, pos // 32]
    s = (qk[0, 1] @ qk[0, 1].T / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    assert _rel(out[0, 1], torch.softmax(s, -1) @ v[0, 1]) < 1e-5


def test_svg_sampling_is_seeded(gen):
    q, k, v = _qkv(gen, (4, 8, 12))
    knobs = dict(sparsity=0.6, block_q=32, block_k=32, num_sampled_rows=8)
    a = [_run("svg", q, k, v, (4, 8, 12), sample_seed=s, **knobs)[1] for s in (3, 3)]
    assert torch.equal(a[0], a[1])


def test_svg_warns_when_target_is_out_of_reach(gen):
    q, k, v = _qkv(gen, RAGGED)
    m = create_method("svg", num_heads=2, head_dim=32, sparsity=0.95)
    with pytest.warns(UserWarning, match="out of reach"):
        m(q, k, v, AttnContext(grid=RAGGED))


# -- radial --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decay,min_window,sink,band", [(0.1, 4, 1, 1), (1.0, 16, 1, 1), (4.0, 64, 2, 0), (0.5, 8, 0, 2)]
)
def test_radial_tile_map_matches_token_mask(decay, min_window, sink, band):
    grid = (6, 8, 12)
    tokens = radial_token_mask(grid, decay, sink, band, min_window)
    for bq, bk in [(16, 16), (32, 64), (128, 64)]:
        tiles = radial_tile_map(grid, bq, bk, decay, sink, band, min_window)
        assert torch.equal(tiles, _blocks_any(tokens, bq, bk))


def test_radial_density_halves_per_band():
    frame = 1024  # 32 x 32 tokens per frame, P = 2048
    dist = torch.tensor([2, 3, 4, 7, 8, 15, 16, 31])
    keep, width = band_rule(dist, frame, decay_factor=0.5, min_window=16)
    assert keep.all() and width.tolist() == [256, 256, 128, 128, 64, 64, 32, 32]
    # Once the window reaches min_window, whole frames are skipped instead: every 2nd, 4th, ...
    keep, width = band_rule(torch.arange(2, 32), frame, decay_factor=1.0, min_window=256)
    assert (width[:2] == 512).all() and (width[2:] == 256).all()
    for lo, hi, every in [(2, 8, 1), (8, 16, 2), (16, 32, 4)]:
        d = torch.arange(lo, hi)
        assert torch.equal(keep[d - 2], d % every == 0)
    # Token density of each band's far frame pairs halves from band to band.
    grid = (16, 32, 32)
    tiles = radial_tile_map(grid, 64, 64, 0.5, sink_frames=0, dense_band=1, min_window=16).float()
    per = frame // 64
    pair = tiles.view(16, per, 16, per).mean(dim=(1, 3))  # (query frame, key frame) density
    f = torch.arange(16)
    dist_f = (f[:, None] - f[None, :]).abs()
    band_density = [pair[(dist_f >= lo) & (dist_f < 2 * lo)].mean().item() for lo in (2, 4, 8)]
    for a, b in itertools.pairwise(band_density):
        assert 0.4 <= b / a <= 0.65, band_density


def test_radial_mask_is_cached_and_static(gen):
    grid = (8, 16, 16)
    q, k, _ = _qkv(gen, grid)
    m = create_method("radial", num_heads=2, head_dim=32, sparsity=0.2, block_q=64, block_k=64)
    a = m.select(q, k, AttnContext(grid=grid))
    b = m.select(torch.randn_like(q), torch.randn_like(k), AttnContext(grid=grid))
    assert torch.equal(a.to_dense(), b.to_dense())
    assert len(m._maps) <= 2  # the chosen map and the floor map, search maps dropped


# -- xattention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,stride", [(37, 4), (64, 8), (30, 1)])
def test_xattention_antidiagonals_match_brute_force(n, stride, gen):
    q = torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64)
    full = q @ k.transpose(-1, -2)
    runs = cdiv(n, stride)
    ref = torch.zeros(1, 2, runs, runs, dtype=torch.float64)
    for r in range(runs):
        for c in range(runs):
            for i in range(stride):
                a, b = r * stride + stride - 1 - i, c * stride + i
                if a < n and b < n:
                    ref[..., r, c] += full[..., a, b]
    assert torch.allclose(antidiagonal_scores(q, k, stride), ref, atol=1e-10)
    # Tile mass: softmax of the scaled antidiagonals over key runs, summed per tile (chunked).
    bq, bk = 2 * stride, stride
    probs = torch.softmax(ref / (math.sqrt(8) * stride), -1)
    mass = torch.zeros(1, 2, cdiv(n, bq), cdiv(n, bk), dtype=torch.float64)
    for r in range(runs):
        for c in range(runs):
            mass[..., r * stride // bq, c * stride // bk] += probs[..., r, c]
    assert torch.allclose(tile_mass(q, k, stride, bq, bk, chunk_q_blocks=2), mass, atol=1e-12)


def test_xattention_threshold_keeps_the_mass(gen):
    q, k, v = _qkv(gen, (4, 16, 18))
    for tau in (0.5, 0.9):
        m, _ = _run("xattention", q, k, v, (4, 16, 18), threshold=tau, block_q=64, block_k=64)
        tiles = m.layout.to_dense()
        mass = tile_mass(q, k, 8, 64, 64)
        kept = (mass * tiles).sum(-1) / mass.sum(-1)
        assert (kept >= tau - 1e-6).all()
        assert tiles.diagonal(dim1=-2, dim2=-1).all()  # diagonal kept
        assert m.report().flops["selection"] > 0


# -- sparge --------------------------------------------------------------------------------------


def test_sparge_guard_keeps_non_self_similar_rows_and_columns(gen):
    n, d, bq, bk = 1024, 64, 128, 64
    q_base = torch.randn(n // bq, d, generator=gen).repeat_interleave(bq, 0)
    k_base = torch.randn(n // bk, d, generator=gen).repeat_interleave(bk, 0)
    q = (q_base + 0.1 * torch.randn(n, d, generator=gen))[None, None]
    k = (k_base + 0.1 * torch.randn(n, d, generator=gen))[None, None]
    q[..., 128:256, :] = torch.randn(128, d, generator=gen)  # query block 1: not self-similar
    k[..., 320:384, :] = torch.randn(64, d, generator=gen)  # key block 5: not self-similar
    v = torch.randn(1, 1, n, d, generator=gen)
    m, _ = _run("sparge", q, k, v, None, sparsity=0.9, sim_threshold=0.5)
    tiles = m.layout.to_dense()[0, 0]
    assert tiles[1].all() and tiles[:, 5].all()
    others = [i for i in range(tiles.shape[0]) if i != 1]
    assert (tiles[others].sum(-1) == 2 + 1).all()  # ceil(0.1 * 16) by score, plus forced column 5
    m, _ = _run("sparge", q, k, v, None, sparsity=0.9)  # top-k mode default: guard off
    assert (m.layout.to_dense().sum(-1) == 2).all()


def test_sparge_cdf_mode_reaches_the_mass(gen):
    q, k, v = _qkv(gen, (4, 16, 18))
    m, _ = _run("sparge", q, k, v, None, cdf_threshold=0.7, sim_threshold=-0.1)
    from salad_bench.kernels.selection import block_scores

    probs = torch.softmax(block_scores(q, k, 128, 64), -1)
    tiles = m.layout.to_dense()
    assert ((probs * tiles).sum(-1) >= 0.7 - 1e-6).all()
    assert m.report().extra["mode"] == "cdf" and tiles.float().mean() < 1.0


def test_xattention_tf32_switch_is_scoped():
    from salad_bench.methods.xattention import _matmul_precision

    before = torch.backends.cuda.matmul.allow_tf32
    with _matmul_precision(not before):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    assert torch.backends.cuda.matmul.allow_tf32 is before


@pytest.mark.gpu
def test_xattention_tf32_scores_keep_the_fp32_tiles_at_wan_480p():
    """TF32 scoring (the default on CUDA) must select (nearly) the tiles IEEE fp32 scoring selects."""
    from salad_bench.harness.workloads import get_workload, make_qkv

    wl = get_workload("wan2.1-1.3b-480p")
    q, k, _ = make_qkv(wl, device="cuda", dtype=torch.bfloat16)
    ctx = AttnContext(grid=wl.grid)
    lays = {p: create_method("xattention", num_heads=wl.heads, head_dim=wl.head_dim, sparsity=0.9, score_precision=p).select(q, k, ctx)
            for p in ("tf32", "fp32")}
    a, b = lays["tf32"].to_dense(), lays["fp32"].to_dense()
    assert (a ^ b).float().mean().item() < 0.01 * a.float().mean().item()  # < 1% of the kept tiles differ


@pytest.mark.parametrize("token_major", [False, True])
def test_gather_tokens_is_advanced_indexing_in_the_input_layout(gen, token_major):
    """STA's, VSA's and SVG's permutations: ``x[:, :, index]``, token-major in for token-major out (the
    gather then moves whole H*D rows), with the gradient of the indexing."""
    from salad_bench.methods.base import gather_tokens

    x = torch.randn(2, 3, 70, 16, generator=gen)
    x = (x.transpose(1, 2).contiguous().transpose(1, 2) if token_major else x).requires_grad_()
    index = torch.randperm(70, generator=gen)[:50]
    got = gather_tokens(x, index)
    assert torch.equal(got, x[:, :, index])
    assert got.transpose(1, 2).is_contiguous() == token_major
    w = torch.randn(got.shape, generator=gen)
    (grad,) = torch.autograd.grad((got * w).sum(), x)
    (want,) = torch.autograd.grad((x[:, :, index] * w).sum(), x)
    assert torch.equal(grad, want)
