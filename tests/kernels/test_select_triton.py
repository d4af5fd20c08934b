"""Triton block selection vs kernels.selection (interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from salad_bench.kernels import select_triton as st
from salad_bench.kernels import selection as ref
from salad_bench.kernels.layout import keep_count

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qk(gen, n, d=64, h=2):
    return [torch.randn(1, h, n, d, generator=gen).to(DEVICE) for _ in range(2)]


@pytest.mark.parametrize("block", [16, 64, 128])
def test_pool_and_scores(gen, block):
    q, k = _qk(gen, 300)  # ragged for both block sizes
    torch.testing.assert_close(st.pool_blocks_triton(q, block), ref.pool_blocks(q, block), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        st.block_scores_triton(q, k, 128, block), ref.block_scores(q, k, 128, block), rtol=1e-5, atol=1e-6
    )


def test_scores_and_selection_stay_fp32_inside_a_bf16_autocast_region(gen):
    """A model's bf16 autocast forward (training, the base bar) must not round the pooled scores: the
    planned CUDA path crashed on bf16 scores, the others selected from rounded ones."""
    q, k = _qk(gen, 300)
    want = (ref.block_scores(q, k, 128, 64), st.block_scores_triton(q, k, 128, 64), st.select_topk_triton(q, k, 2))
    with torch.autocast(q.device.type, dtype=torch.bfloat16):
        got = (ref.block_scores(q, k, 128, 64), st.block_scores_triton(q, k, 128, 64), st.select_topk_triton(q, k, 2))
    for a, b in zip(want[:2], got[:2], strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(want[2].kv_idx, got[2].kv_idx) and torch.equal(want[2].kv_cnt, got[2].kv_cnt)


@pytest.mark.parametrize("bq,bk", [(128, 64), (64, 128)])
def test_topk_same_scores_same_layout(gen, bq, bk):
    n = 700
    q, k = _qk(gen, n)
    scores = ref.block_scores(q, k, bq, bk)
    force = ref.diagonal_blocks(n, bq, bk, DEVICE)
    keep = keep_count(0.7, scores.shape[-1])
    want = ref.topk_layout(scores, keep, n, bq, bk, force)
    for f in ("diagonal", force):
        got = st.topk_layout_triton(scores, keep, n, bq, bk, f)
        assert torch.equal(got.kv_idx, want.kv_idx) and torch.equal(got.kv_cnt, want.kv_cnt)


def test_topk_pipeline_up_to_ties(gen):
    n, bq, bk = 700, 128, 64
    q, k = _qk(gen, n)
    got = st.select_topk_triton(q, k, 3, bq, bk, keep_diagonal=False)
    scores = ref.block_scores(q, k, bq, bk)
    kth = torch.topk(scores, 3, dim=-1).values[..., -1:]
    chosen = torch.gather(scores, -1, got.kv_idx.long())
    assert (chosen >= kth - 1e-5).all()
    assert (got.kv_idx[..., 1:] > got.kv_idx[..., :-1]).all()


def test_topp_matches_up_to_boundary(gen):
    n, bq, bk = 700, 64, 64
    q, k = _qk(gen, n)
    scores = ref.block_scores(q, k, bq, bk) * 4.0
    force = ref.diagonal_blocks(n, bq, bk, DEVICE)
    for mass in (0.5, 0.9):
        got = st.topp_layout_triton(scores, mass, n, bq, bk, "diagonal").to_dense()
        want = ref.topp_layout(scores, mass, n, bq, bk, force).to_dense()
        # where they differ, the reference's "mass before this block" must sit on the threshold
        p = torch.softmax(scores, -1)
        before = (p.unsqueeze(-1) * (p.unsqueeze(-1) > p.unsqueeze(-2))).sum(-2)
        differ = got != want
        assert (before[differ] - mass).abs().max().item() < 1e-5 if differ.any() else True
        assert (got | ~force).all()  # diagonal kept


def test_pipelines_from_qk_keep_diagonal(gen):
    n, bq, bk = 700, 128, 64
    q, k = _qk(gen, n)
    scores = ref.block_scores(q, k, bq, bk)
    force = ref.diagonal_blocks(n, bq, bk, DEVICE)
    got = st.select_topk_triton(q, k, 4, bq, bk).to_dense()
    want = ref.topk_layout(scores, 4, n, bq, bk, force).to_dense()
    assert (got | ~force).all() and (got.sum(-1) == want.sum(-1)).all()
    s_forced = scores.masked_fill(force, float("inf"))
    kth = torch.topk(s_forced, 4, dim=-1).values[..., -1:]
    assert (s_forced[got] >= kth.expand_as(s_forced)[got] - 1e-5).all()
    got_p = st.select_topp_triton(q, k, 0.8, bq, bk).to_dense()
    want_p = ref.topp_layout(scores, 0.8, n, bq, bk, force).to_dense()
    p = torch.softmax(scores, -1)
    before = (p.unsqueeze(-1) * (p.unsqueeze(-1) > p.unsqueeze(-2))).sum(-2)
    differ = got_p != want_p
    assert not differ.any() or (before[differ] - 0.8).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["from_qk", "scores_given"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_triton_selector_matches_torch_on_gpu_at_wan_480p(sparsity, path):
    """On the H200 (2026-11-28) a selector with 16 query-block rows per program kept other blocks than the
    torch rule (Triton 3.6 miscompiled its row-wise bisection at Mk = 512) although the interpreter
    agreed. This full-size check is what the interpreter cannot give: ``from_qk`` runs the whole
    pipeline (pool, score, select), ``scores_given`` selects from torch's scores.
    """
    from salad_bench.harness.workloads import get_workload, make_qkv
    from salad_bench.kernels import keep_count
    from salad_bench.kernels.select_triton import block_scores_triton, select_topk_triton, topk_layout_triton
    from salad_bench.kernels.selection import block_scores, diagonal_blocks, topk_layout

    wl = get_workload("wan2.1-1.3b-480p")
    q, k, _ = make_qkv(wl, device="cuda", dtype=torch.bfloat16)
    keep = keep_count(sparsity, -(-wl.n // 64))
    ref_scores = block_scores(q, k, 128, 64)
    ref = topk_layout(ref_scores, keep, wl.n, 128, 64, diagonal_blocks(wl.n, 128, 64, q.device)).to_dense()
    if path == "from_qk":
        ours = select_topk_triton(q, k, keep, 128, 64, keep_diagonal=True).to_dense()
    else:
        scores = block_scores_triton(q, k, 128, 64)
        assert torch.allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
        ours = topk_layout_triton(scores, keep, wl.n, 128, 64, "diagonal").to_dense()
    # fp32 summation order may flip near-ties: allow a tiny fraction of differing tiles
    assert (ours ^ ref).float().mean().item() < 1e-3


@pytest.mark.gpu
def test_selector_replays_from_a_cuda_graph():
    """The kernel benchmark times the selector from a CUDA graph too: capture must work (no host sync)
    and a replay must give the eager layout."""
    from salad_bench.harness.bench_kernels import cuda_graph

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(1, 2, 4000, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    want = st.select_topk_triton(q, k, 8, 128, 64).to_dense()
    got = {}

    def fn():
        got["layout"] = st.select_topk_triton(q, k, 8, 128, 64)

    replay = cuda_graph(fn)
    got["layout"].kv_idx.fill_(-1)
    replay()
    torch.cuda.synchronize()
    assert torch.equal(got["layout"].to_dense(), want)


@pytest.mark.gpu
def test_selector_plans_gpu(monkeypatch):
    """select_topk/topp_triton go through a plan per input signature (select_triton._plan): the same
    layout as the general path (bitwise), for new tensors of a seen signature (the plan reused), another
    shape, top-p and no forced diagonal; a strided k takes the general path."""
    monkeypatch.setattr(st, "_PLANS", {})
    gen = torch.Generator(device="cuda").manual_seed(1)

    def qk(n, h=2):
        return [torch.randn(1, h, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2)]

    def general(q, k, keep=0, mass=0.0, topp=False, diag=True):
        scores = st.block_scores_triton(q, k, 128, 64)
        return st._select(scores, q.shape[2], 128, 64, "diagonal" if diag else None, keep=keep, mass=mass, topp=topp)

    def same(a, b):
        return torch.equal(a.kv_idx, b.kv_idx) and torch.equal(a.kv_cnt, b.kv_cnt)

    for q, k in (qk(4000), qk(4000)):
        assert same(st.select_topk_triton(q, k, 8, 128, 64), general(q, k, keep=8))
    assert len(st._PLANS) == 1 and all(st._PLANS.values())
    plan = next(iter(st._PLANS.values()))
    q, k = qk(1000, h=3)
    assert same(st.select_topk_triton(q, k, 5, 128, 64, keep_diagonal=False), general(q, k, keep=5, diag=False))
    assert same(st.select_topp_triton(q, k, 0.9, 128, 64), general(q, k, mass=0.9, topp=True))
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)  # last dim strided: the general path copies it
    assert same(st.select_topk_triton(q, kt, 5, 128, 64), general(q, kt, keep=5))
    assert len(st._PLANS) == 4 and next(iter(st._PLANS.values())) is plan
    assert st._PLANS[next(reversed(st._PLANS))] is False
