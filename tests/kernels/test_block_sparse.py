"""Triton block-sparse attention vs the torch reference (interpreter on the CPU, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from salad_bench.kernels import block_sparse as bs
from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.kernels.reference import block_sparse_attention_ref
from tests.kernels._tol import assert_close_to_torch, rel_l2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(gen, b, h, n, d, dtype):
    return [torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for _ in range(3)]


def _random_layout(gen, b, h, n, bq, bk, density=0.5, empty=True, parities=False):
    mq, mk = cdiv(n, bq), cdiv(n, bk)
    tiles = torch.rand(b, h, mq, mk, generator=gen) < density
    tiles[..., -1, -1] = True  # the ragged corner tile is exercised
    if parities:  # lists of even and of odd length, whatever the draw (needs b, h, mq, mk >= 2)
        tiles[-1, -1, 0] = False
        tiles[-1, -1, 0, :2] = True
        tiles[-1, -1, 1] = False
        tiles[-1, -1, 1, -1] = True
    if empty:
        tiles[0, 0, 0] = False  # a query block with no key block
    lay = BlockLayout.from_dense(tiles, bq, bk, n)
    # shuffle each row's kept entries: the kernel must not rely on ascending order
    perm = torch.argsort(torch.rand(lay.kv_idx.shape, generator=gen), dim=-1)
    valid = torch.arange(lay.kv_idx.shape[-1]) < lay.kv_cnt.unsqueeze(-1)
    keyed = torch.where(valid, perm, perm + lay.kv_idx.shape[-1])  # padding stays last
    order = torch.argsort(keyed, dim=-1)
    idx = torch.gather(lay.kv_idx, -1, order).contiguous()
    return BlockLayout(idx.to(DEVICE), lay.kv_cnt.to(DEVICE), bq, bk, n)


def _assert_matches_reference(q, k, v, lay, out, lse, lse_atol, empty_rows):
    """``out`` within 2x torch's own error of the float64 reference, ``lse`` close where finite and -inf
    exactly where the reference's is; rows ``[0, empty_rows)`` of (batch 0, head 0) are zeros."""
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay, return_lse=True)
    same = block_sparse_attention_ref(q, k, v, lay)
    assert_close_to_torch(out, same, ref, what="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < lse_atol
    assert (out[0, 0, :empty_rows] == 0).all()


CASES = [
    # n, d, block_q, block_k, dtype
    (200, 64, 128, 64, torch.float32),
    (200, 64, 64, 64, torch.float16),
    (130, 128, 64, 128, torch.float32),
    (96, 128, 64, 64, torch.float16),
]


@pytest.mark.parametrize("n,d,bq,bk,dtype", CASES)
def test_forward_matches_reference(gen, n, d, bq, bk, dtype):
    q, k, v = _inputs(gen, 1, 2, n, d, dtype)
    lay = _random_layout(gen, 1, 2, n, bq, bk)
    out, lse = bs.block_sparse_attention_triton(q, k, v, lay, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    _assert_matches_reference(q, k, v, lay, out, lse, 1e-3, empty_rows=bq)  # (0, 0, 0) keeps no key block


@pytest.mark.parametrize("n,d,bq,bk,dtype", [(200, 64, 128, 64, torch.float32), (136, 64, 64, 64, torch.float16)])
def test_backward_matches_autograd(gen, n, d, bq, bk, dtype):
    q, k, v = _inputs(gen, 1, 2, n, d, dtype)
    lay = _random_layout(gen, 1, 2, n, bq, bk)
    dout = torch.randn(1, 2, n, d, generator=gen).to(DEVICE, dtype)

    def grads(fn, dt):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        fn(*xs, lay).backward(dout.to(dt))
        return [x.grad for x in xs]

    ours = grads(bs.block_sparse_attention_triton, dtype)
    ref = grads(block_sparse_attention_ref, torch.float64)
    same = grads(block_sparse_attention_ref, dtype)
    for name, o, r, s in zip("qkv", ours, ref, same, strict=True):
        assert_close_to_torch(o, s, r, factor=3.0 if dtype == torch.float16 else 2.0, what=f"d{name}")


@pytest.mark.parametrize("use_tma,order", [(True, False), (False, True)])
def test_variants_agree(gen, use_tma, order):
    n, d = 200, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float32)
    lay = _random_layout(gen, 1, 2, n, 128, 64)
    out, lse = bs._forward(q, k, v, lay, d**-0.5, order=order, use_tma=use_tma)
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay)
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("mode", ["pair", "pipe", "lazy", "ws"])
@pytest.mark.parametrize("n,use_tma", [(200, True), (256, False), (136, False)])
def test_forward_loop_variants_match_reference(gen, n, use_tma, mode):
    """Two key blocks per softmax step (pair) and the next block's scores issued before this block's softmax
    (pipe): odd and even counts, empty rows, the ragged block anywhere in a list."""
    d = 64
    lay = _random_layout(gen, 2, 2, n, 64, 64, parities=True)  # shuffled lists, row (0, 0, 0) empty
    q, k, v = _inputs(gen, 2, 2, n, d, torch.float32)
    assert (lay.kv_cnt % 2 == 1).any() and (lay.kv_cnt[lay.kv_cnt > 0] % 2 == 0).any()
    out, lse = bs._forward(q, k, v, lay, d**-0.5, use_tma=use_tma, **{mode: True})
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay)
    assert rel_l2(out, ref) < 1e-5
    assert torch.isneginf(lse[0, 0, :64]).all() and (out[0, 0, :64] == 0).all()
    single, lse1 = bs._forward(q, k, v, lay, d**-0.5, use_tma=use_tma, pair=False)
    assert torch.allclose(lse, lse1, atol=1e-5)


@pytest.mark.parametrize("growth", [0.5, 3.0])
def test_lazy_rescale_with_growing_scores(gen, growth):
    """Scores whose row maxima grow from block to block, by less and by more than the 2^8 threshold:
    the lazily rescaled forward still equals the reference (output and log-sum-exp)."""
    n, d = 520, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float32)
    k = k * (1.0 + growth * torch.arange(n, device=DEVICE, dtype=torch.float32) / 64)[:, None]
    lay = _random_layout(gen, 1, 2, n, 64, 64, density=0.7)
    out, lse = bs._forward(q, k, v, lay, d**-0.5, lazy=True)
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay, return_lse=True)
    assert rel_l2(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


@pytest.mark.parametrize("mode", ["pair", "pipe", "lazy", "ws"])
def test_forward_loop_variants_on_short_lists(gen, mode):
    """Rows whose lists hold one unmasked block, only the ragged block, or one of each."""
    n, d = 136, 64  # 3 key blocks of 64, the last ragged
    tiles = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    tiles[0, 0, 0, 1] = True
    tiles[0, 0, 1, 2] = True
    tiles[0, 0, 2, 0] = tiles[0, 0, 2, 2] = True
    lay = BlockLayout.from_dense(tiles, 64, 64, n)
    lay = BlockLayout(lay.kv_idx.to(DEVICE), lay.kv_cnt.to(DEVICE), 64, 64, n)
    q, k, v = _inputs(gen, 1, 1, n, d, torch.float32)
    out, _ = bs._forward(q, k, v, lay, d**-0.5, **{mode: True})
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay)
    assert rel_l2(out, ref) < 1e-5


def test_exp2_fma_accuracy():
    """The FMA-pipe exponential against float64 on [-130, 0]: within 1e-4 relative down to 2^-125, at most
    2^-126 below it, never negative or NaN."""
    x = torch.cat([torch.linspace(-130.0, 0.0, 4001), -torch.rand(4000) * 8, torch.tensor([0.0, -0.5, -126.0])])
    got = torch.empty_like(x)

    @triton.jit
    def kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, bs._exp2_fma(tl.load(X + offs, mask=offs < n, other=0.0)), mask=offs < n)

    n = x.numel()
    xd, yd = x.to(DEVICE), got.to(DEVICE)
    kernel[(cdiv(n, 1024),)](xd, yd, n, BLOCK=1024)
    got, want = yd.cpu().double(), torch.exp2(x.double())
    normal = x >= -125
    assert ((got[normal] - want[normal]).abs() / want[normal]).max() < 1e-4
    assert (got[~normal] >= 0).all() and (got[~normal] <= 2.0**-125).all()


@pytest.mark.parametrize("mode", ["fma", "fma4"])
@pytest.mark.parametrize("n,dtype", [(200, torch.float32), (256, torch.float16)])
def test_fma_exponential_forward(gen, n, dtype, mode, monkeypatch):
    """``fwd_exp="fma"``/``"fma4"`` (every second/fourth column's exponential by a cubic) through the public function:
    output and log-sum-exp match the reference to the cubic's 1e-4, and differ from the special-function
    path (so the cubic ran)."""
    d = 64
    q, k, v = _inputs(gen, 1, 2, n, d, dtype)
    lay = _random_layout(gen, 1, 2, n, 64, 64, density=0.6)
    exact = bs.block_sparse_attention_triton(q, k, v, lay)
    monkeypatch.setitem(bs.OPTIONS, "fwd_exp", mode)
    out, lse = bs.block_sparse_attention_triton(q, k, v, lay, return_lse=True)
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay, return_lse=True)
    assert rel_l2(out, ref) < (3e-4 if dtype == torch.float32 else 2e-3)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    if dtype == torch.float32:
        assert (out - exact).abs().max() > 0
    monkeypatch.setitem(bs.OPTIONS, "fwd_exp", "fast")
    with pytest.raises(ValueError, match="fwd_exp"):
        bs.block_sparse_attention_triton(q, k, v, lay)


@pytest.mark.parametrize("n,dtype,bq,bk", [(200, torch.float32, 64, 64), (256, torch.float16, 64, 64),
                                           (136, torch.float32, 32, 64)])
def test_fixed_max_forward(gen, n, dtype, bq, bk, monkeypatch):
    """``fwd_fixed_max`` on (the default: each row's reference is one key's score, no running max) and off
    (the online softmax), with and without ``fwd_lane_sums``, through the public function: shuffled lists, an empty query block, lists holding
    only the ragged block; output and log-sum-exp match the reference."""
    d = 64
    q, k, v = _inputs(gen, 2, 2, n, d, dtype)
    lay = _random_layout(gen, 2, 2, n, bq, bk, density=0.5)
    cnt = lay.kv_cnt.clone()
    mk = cdiv(n, bk)
    idx = lay.kv_idx.clone()
    idx[1, 1, 0, 0], cnt[1, 1, 0] = mk - 1, 1  # a row whose list is the ragged block alone
    lay = BlockLayout(idx, cnt, bq, bk, n)
    for fixed, lanes in ((True, False), (True, True), (False, False)):
        monkeypatch.setitem(bs.OPTIONS, "fwd_fixed_max", fixed)
        monkeypatch.setitem(bs.OPTIONS, "fwd_lane_sums", lanes)
        out, lse = bs.block_sparse_attention_triton(q, k, v, lay, return_lse=True)
        _assert_matches_reference(q, k, v, lay, out, lse, 1e-4 if dtype == torch.float32 else 2e-3, empty_rows=bq)


@pytest.mark.parametrize("dtype,growth", [(torch.float32, 40.0), (torch.float16, 1.0)])
def test_fixed_max_redoes_overflowing_tiles(gen, dtype, growth):
    """Scores that grow along each list far past the reference key's score (sums past 2^64 in fp32, 2^14 in
    fp16): the overflowing tiles are redone with the online softmax and still match the reference."""
    n, d = 520, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float32)
    q = q.abs() + 0.5
    k = k.abs() * (1.0 + growth * torch.arange(n, device=DEVICE, dtype=torch.float32) / 64)[:, None]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    tiles = torch.rand(1, 2, cdiv(n, 64), cdiv(n, 64), generator=gen) < 0.7
    tiles[..., 0] = True
    lay = BlockLayout.from_dense(tiles, 64, 64, n)  # ascending lists: the scores grow along each list
    lay = BlockLayout(lay.kv_idx.to(DEVICE), lay.kv_cnt.to(DEVICE), 64, 64, n)
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay, return_lse=True)
    online, _ = bs._forward(q, k, v, lay, d**-0.5)
    finite = torch.isfinite(ref_lse)
    for lanes in (False, True):
        out, lse = bs._forward(q, k, v, lay, d**-0.5, fixed_max=True, lane_sums=lanes)
        assert torch.isfinite(out).all()
        assert rel_l2(out, ref) < (1e-4 if dtype == torch.float32 else 2e-3)  # scores in the thousands
        assert rel_l2(out, online) < 1e-3
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n_tiles,slots,want", [
    (3072, 264, (3, 2904)),  # Wan 480p on an H200: a 168-tile tail, three parts make it 2/3 of a wave
    (264 * 3, 264, (1, 792)),  # whole waves: nothing to split
    (100, 264, (2, 0)),  # less than a wave: every tile split
    (265, 264, (4, 264)),  # one tile left over
    (500, 264, (1, 500)),  # tail of 236: 2 to 4 parts all take a whole wave
    (7, 0, (1, 7)),
])
def test_split_plan(n_tiles, slots, want):
    parts, n_main = bs._split_plan(n_tiles, slots)
    assert (parts, n_main) == want
    tail = n_tiles - n_main
    assert parts == 1 or -(-tail * parts // slots) / parts < 1.0  # a split always shortens the tail


@pytest.mark.parametrize("n,bq,bk,dtype,slots", [
    (200, 64, 64, torch.float32, 3),
    (200, 64, 32, torch.float16, 5),
    (130, 32, 64, torch.float32, 8),
    (256, 64, 64, torch.float32, 5),
    (256, 64, 64, torch.float32, 64),  # fewer tiles than slots: all of them split
])
def test_split_last_wave_matches_reference(gen, n, bq, bk, dtype, slots):
    """The last wave's tiles split over several programs and merged (``split_slots``): output and
    log-sum-exp equal the reference, with ragged N, shuffled lists, an empty query block and lists
    shorter than the number of parts."""
    d, bm = 64, min(bq, 32)
    q, k, v = _inputs(gen, 2, 2, n, d, dtype)
    lay = _random_layout(gen, 2, 2, n, bq, bk, density=0.3)
    parts, n_main = bs._split_plan(cdiv(n, bq) * (bq // bm) * 4, slots)
    assert parts > 1 and (lay.kv_cnt < parts).any()
    out, lse = bs._forward(q, k, v, lay, d**-0.5, split_slots=slots,
                           config={"BLOCK_M": bm, "num_warps": 4, "num_stages": 2})
    _assert_matches_reference(q, k, v, lay, out, lse, 1e-4, empty_rows=bq)


def test_split_option_forward_and_backward(gen, monkeypatch):
    """``OPTIONS["fwd_split"]`` through the public function (one "SM" in the interpreter, so the option is
    the slot count): the split forward's output and log-sum-exp feed the backward."""
    n, d = 200, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float32)
    lay = _random_layout(gen, 1, 2, n, 64, 64)
    dout = torch.randn(1, 2, n, d, generator=gen).to(DEVICE)
    monkeypatch.setitem(bs.OPTIONS, "fwd_config", {"BLOCK_M": 32, "num_warps": 4, "num_stages": 2})
    grads, outs = [], []
    for split in (0, 3):
        monkeypatch.setitem(bs.OPTIONS, "fwd_split", split)
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = bs.block_sparse_attention_triton(*xs, lay)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, xs, dout))
    assert rel_l2(outs[1], outs[0]) < 1e-6
    for a, b in zip(*grads, strict=True):
        assert rel_l2(a, b) < 1e-6


@pytest.mark.parametrize("mode", ["pair", "pipe", "ws"])
def test_split_rejects_other_loops(gen, mode):
    q, k, v = _inputs(gen, 1, 1, 128, 64, torch.float32)
    lay = BlockLayout.full(1, 1, 128, 64, 64, DEVICE)
    with pytest.raises(ValueError, match="fwd_split"):
        bs._forward(q, k, v, lay, 0.125, split_slots=3, **{mode: True})


def test_full_layout_is_dense_attention(gen):
    n, d = 150, 64
    q, k, v = _inputs(gen, 1, 1, n, d, torch.float32)
    lay = BlockLayout.full(1, 1, n, 64, 64, DEVICE)
    out = bs.block_sparse_attention_triton(q, k, v, lay, scale=0.1)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.1)
    assert rel_l2(out, ref) < 1e-5


def test_transpose_layout(gen):
    lay = _random_layout(gen, 2, 3, 500, 128, 64)
    idx, cnt = bs.transpose_layout(lay)
    dense_t = lay.to_dense().transpose(-1, -2)
    assert torch.equal(cnt, dense_t.sum(-1).int())
    rebuilt = torch.zeros_like(dense_t)
    for b in range(2):
        for h in range(3):
            for kb in range(dense_t.shape[2]):
                c = int(cnt[b, h, kb])
                rows = idx[b, h, kb, :c].long()
                assert torch.all(rows[1:] > rows[:-1])  # ascending
                rebuilt[b, h, kb, rows] = True
    assert torch.equal(rebuilt, dense_t)


def test_unsupported_inputs(gen):
    q, k, v = _inputs(gen, 1, 1, 64, 64, torch.float32)
    lay = BlockLayout.full(1, 1, 64, 64, 64, DEVICE)
    with pytest.raises(Unsupported, match="float64"):
        bs.block_sparse_attention_triton(q.double(), k.double(), v.double(), lay)
    q96 = torch.randn(1, 1, 64, 96, device=DEVICE)
    with pytest.raises(Unsupported, match="head_dim"):
        bs.block_sparse_attention_triton(q96, q96, q96, lay)
    big = BlockLayout.full(1, 1, 64, 256, 64, DEVICE)
    with pytest.raises(Unsupported, match="block sizes"):
        bs.block_sparse_attention_triton(q, k, v, big)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,opt", [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, "fwd_pair"),
                                       (torch.bfloat16, "fwd_pipe"), (torch.bfloat16, "fwd_lazy"),
                                       (torch.float16, "fwd_lazy"), (torch.bfloat16, "fwd_ws"),
                                       (torch.float16, "fwd_ws"), (torch.bfloat16, "fwd_split"),
                                       (torch.float16, "fwd_split"), (torch.bfloat16, "fwd_gluon"),
                                       (torch.float16, "fwd_gluon"), (torch.bfloat16, "fwd_exp=fma"),
                                       (torch.float16, "fwd_exp=fma"), (torch.bfloat16, "fwd_exp=fma4"),
                                       (torch.bfloat16, "fwd_gluon=ws"), (torch.bfloat16, "gluon_ws_group=2"),
                                       (torch.bfloat16, "fwd_fixed_max=False"), (torch.float16, "fwd_fixed_max=False"),
                                       (torch.bfloat16, "fwd_lane_sums=False"), (torch.float16, "fwd_lane_sums=False")])
def test_full_size_gpu(gen, dtype, opt, monkeypatch):
    """N = 32,760 (ragged), 128 x 64 tiles, density ~0.1; two heads checked against fp32 reference
    (``fwd_split``: 3 "programs per SM", so that 512 tiles on 132 SMs leave a tail of 116 to split)."""
    if opt:
        name, _, value = opt.partition("=")
        if name == "gluon_ws_group":  # the warp-specialised Gluon forward, two key blocks per step
            monkeypatch.setitem(bs.OPTIONS, "fwd_gluon", "ws")
            monkeypatch.setitem(bs.OPTIONS, "gluon_ws_slots", 2)
            value = int(value)
        value = {"False": False, "True": True}.get(value, value)
        monkeypatch.setitem(bs.OPTIONS, name, value if value != "" else (3 if opt == "fwd_split" else True))
    b, h, n, d = 1, 2, 32760, 128
    q, k, v = _inputs(gen, b, h, n, d, dtype)
    mq, mk = cdiv(n, 128), cdiv(n, 64)
    tiles = torch.rand(b, h, mq, mk, generator=gen) < 0.1
    tiles[..., torch.arange(mq), torch.arange(mq) * 2] = True
    lay = BlockLayout.from_dense(tiles.to(DEVICE), 128, 64, n)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = bs.block_sparse_attention_triton(*xs, lay)
    dout = torch.randn_like(out)
    out.backward(dout)
    rs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = block_sparse_attention_ref(*rs, lay)
    ref.backward(dout.float())
    same = block_sparse_attention_ref(q, k, v, lay)
    assert_close_to_torch(out, same, ref, what="out")
    for x, r in zip(xs, rs, strict=True):
        assert rel_l2(x.grad, r.grad) < 2e-2


def test_backward_tma_and_pointer_paths_agree(gen, monkeypatch):
    n, d = 200, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float32)
    lay = _random_layout(gen, 1, 2, n, 128, 64)
    dout = torch.randn(1, 2, n, d, generator=gen).to(DEVICE)
    grads = []
    for tma, order in ((False, False), (True, True)):
        monkeypatch.setitem(bs.OPTIONS, "bwd_tma", tma)
        monkeypatch.setitem(bs.OPTIONS, "bwd_order", order)
        monkeypatch.setitem(bs.OPTIONS, "fwd_tma", tma)
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        grads.append(torch.autograd.grad(bs.block_sparse_attention_triton(*xs, lay), xs, dout))
    for a, b in zip(*grads, strict=True):
        assert rel_l2(a, b) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [128, 64, "ws", "ws_pingpong", "ws_pairs"])
@pytest.mark.parametrize("n,d,dtype", [(1000, 128, torch.bfloat16), (1024, 64, torch.float16), (200, 128, torch.float16)])
def test_gluon_forward_gpu(gen, n, d, dtype, rows):
    """The Gluon forward (sm_90) on shuffled lists with an empty row, lists of 1 to 3 blocks, the ragged
    block anywhere, ragged and even N, against the float64 reference; the backward then runs on its
    output and log-sum-exp."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward needs an sm_90 GPU")
    from salad_bench.kernels.block_sparse_gluon import block_sparse_forward_gluon

    b, h = 2, 3
    q, k, v = _inputs(gen, b, h, n, d, dtype)
    lay = _random_layout(gen, b, h, n, 128, 64, density=0.3)
    cnt = lay.kv_cnt.clone()
    m = min(3, cnt.shape[-1])
    cnt[1, 0, :m] = torch.arange(1, m + 1, device=cnt.device).clamp(max=lay.kv_cnt[1, 0, :m])
    lay = BlockLayout(lay.kv_idx, cnt, 128, 64, n)
    ws = isinstance(rows, str)
    pairs = rows == "ws_pairs"  # two key blocks per step: odd and even list lengths
    out, lse = block_sparse_forward_gluon(q, k, v, lay, d**-0.5, rows="ws" if ws else rows,
                                          ws_pingpong=rows == "ws_pingpong", ws_group=2 if pairs else 1,
                                          ws_slots=2 if pairs else 4)
    _assert_matches_reference(q, k, v, lay, out, lse, 1e-3, empty_rows=128)
    tri_out, tri_lse = bs._forward(q, k, v, lay, d**-0.5)
    assert rel_l2(out, tri_out) < 1e-2 and torch.equal(torch.isneginf(lse), torch.isneginf(tri_lse))


def test_gluon_forward_refuses_what_it_cannot_run(gen):
    """Off sm_90 (the CPU here) or with other tiles, the Gluon forward names the problem."""
    from salad_bench.kernels.block_sparse_gluon import block_sparse_forward_gluon

    q, k, v = _inputs(gen, 1, 1, 128, 64, torch.float32)
    with pytest.raises(Unsupported, match="sm_90|fwd_gluon"):
        block_sparse_forward_gluon(q, k, v, BlockLayout.full(1, 1, 128, 128, 64, DEVICE), 0.125)
