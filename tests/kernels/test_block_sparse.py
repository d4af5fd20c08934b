"""Triton block-sparse attention vs the torch reference (interpreter on the CPU, tiny shapes)."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("n,use_tma", [(200, True), (200, False), (256, False), (136, True), (136, False)])
def test_tma_and_pointer_loads_match_reference(gen, n, use_tma):
    """K/V through TMA descriptors (what runs where the card and tensors allow it; the interpreter emulates
    them) and through pointers: shuffled lists of odd and even length, an empty row, the ragged block
    anywhere in a list, ragged and even N."""
    d = 64
    lay = _random_layout(gen, 2, 2, n, 64, 64, parities=True)  # shuffled lists, row (0, 0, 0) empty
    q, k, v = _inputs(gen, 2, 2, n, d, torch.float32)
    assert (lay.kv_cnt % 2 == 1).any() and (lay.kv_cnt[lay.kv_cnt > 0] % 2 == 0).any()
    out, lse = bs._forward(q, k, v, lay, d**-0.5, use_tma=use_tma)
    _assert_matches_reference(q, k, v, lay, out, lse, 1e-4, empty_rows=64)


def test_unaligned_inputs_take_the_pointer_loads(gen):
    """A K/V tensor TMA cannot address (a 2-byte offset) takes the pointer loads, with the same result."""
    n, d = 136, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float16)
    lay = _random_layout(gen, 1, 2, n, 64, 64)
    flat = torch.empty(k.numel() + 1, dtype=k.dtype, device=DEVICE)
    shifted = flat[1:].view_as(k).copy_(k)
    assert bs._tma_ok(k, v) and not bs._tma_ok(shifted, v)
    out = bs.block_sparse_attention_triton(q, k, v, lay)
    torch.testing.assert_close(bs.block_sparse_attention_triton(q, shifted, v, lay), out, rtol=0, atol=0)


@pytest.mark.parametrize("growth", [0.5, 3.0])
def test_growing_scores(gen, growth):
    """Scores whose row maxima grow from block to block (the running max moves, the accumulator is
    rescaled): output and log-sum-exp equal the reference."""
    n, d = 520, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float32)
    k = k * (1.0 + growth * torch.arange(n, device=DEVICE, dtype=torch.float32) / 64)[:, None]
    lay = _random_layout(gen, 1, 2, n, 64, 64, density=0.7)
    out, lse = bs._forward(q, k, v, lay, d**-0.5)
    ref, ref_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay, return_lse=True)
    assert rel_l2(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


@pytest.mark.parametrize("dtype,growth", [(torch.float32, 40.0), (torch.float16, 1.0)])
def test_peaked_scores(gen, dtype, growth):
    """Scores that grow along each ascending list into the thousands (far more peaked than any input
    kind): the output stays finite and matches the reference."""
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
    out, lse = bs._forward(q, k, v, lay, d**-0.5)
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) < (1e-4 if dtype == torch.float32 else 2e-3)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n,dtype,bq,bk", [(200, torch.float32, 64, 64), (256, torch.float16, 64, 64),
                                           (136, torch.float32, 32, 64)])
def test_lists_of_the_ragged_block_alone(gen, n, dtype, bq, bk):
    """Through the public function: shuffled lists, an empty query block and a list holding only the
    ragged block; output and log-sum-exp match the reference."""
    d = 64
    q, k, v = _inputs(gen, 2, 2, n, d, dtype)
    lay = _random_layout(gen, 2, 2, n, bq, bk, density=0.5)
    cnt = lay.kv_cnt.clone()
    mk = cdiv(n, bk)
    idx = lay.kv_idx.clone()
    idx[1, 1, 0, 0], cnt[1, 1, 0] = mk - 1, 1  # a row whose list is the ragged block alone
    lay = BlockLayout(idx, cnt, bq, bk, n)
    out, lse = bs.block_sparse_attention_triton(q, k, v, lay, return_lse=True)
    _assert_matches_reference(q, k, v, lay, out, lse, 1e-4 if dtype == torch.float32 else 2e-3, empty_rows=bq)


def test_short_lists(gen):
    """Rows whose lists hold one unmasked block, only the ragged block, or one of each."""
    n, d = 136, 64  # 3 key blocks of 64, the last ragged
    tiles = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    tiles[0, 0, 0, 1] = True
    tiles[0, 0, 1, 2] = True
    tiles[0, 0, 2, 0] = tiles[0, 0, 2, 2] = True
    lay = BlockLayout.from_dense(tiles, 64, 64, n)
    lay = BlockLayout(lay.kv_idx.to(DEVICE), lay.kv_cnt.to(DEVICE), 64, 64, n)
    q, k, v = _inputs(gen, 1, 1, n, d, torch.float32)
    for use_tma in (True, False):
        out, _ = bs._forward(q, k, v, lay, d**-0.5, use_tma=use_tma)
        ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay)
        assert rel_l2(out, ref) < 1e-5


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_size_gpu(gen, dtype):
    """N = 32,760 (ragged), 128 x 64 tiles, density ~0.1; two heads checked against fp32 reference."""
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


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied into a token-major ``(B, N, H, D)`` buffer, seen as ``(B, H, N, D)``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("n,dtype,token_major", [(200, torch.float32, True), (136, torch.float16, True),
                                                 (256, torch.float32, False)])
def test_residual_is_added_in_the_epilogue_in_its_layout(gen, n, dtype, token_major):
    """``residual=``: attention plus the residual, rows of an empty query block equal to the residual
    alone, the output in the residual's memory layout (token-major or not), ragged and even N."""
    d = 64
    q, k, v = _inputs(gen, 2, 2, n, d, dtype)
    lay = _random_layout(gen, 2, 2, n, 64, 64)  # row (0, 0, 0) empty
    res = torch.randn(2, 2, n, d, generator=gen).to(DEVICE, dtype)
    res = _token_major(res) if token_major else res
    out = bs.block_sparse_attention_triton(q, k, v, lay, residual=res)
    assert out.stride() == res.stride() and out.dtype == dtype
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay) + res.double()
    assert rel_l2(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    torch.testing.assert_close(out[0, 0, :64], res[0, 0, :64], rtol=0, atol=0)  # the empty query block


@pytest.mark.parametrize("q_token_major", [False, True])
def test_output_is_token_major_whatever_the_input_layout(gen, q_token_major):
    """The forward writes a view of a token-major buffer for heads-major and token-major inputs alike (the
    model's ``out.transpose(1, 2).flatten(2)`` is then free), equal to the reference; its gradients too."""
    n, d = 136, 64
    xs = _inputs(gen, 2, 2, n, d, torch.float32)
    xs = [(_token_major(x) if q_token_major else x).requires_grad_() for x in xs]
    lay = _random_layout(gen, 2, 2, n, 64, 64)
    out = bs.block_sparse_attention_triton(*xs, lay)
    assert out.transpose(1, 2).is_contiguous()
    rs = [x.detach().double().requires_grad_() for x in xs]
    ref = block_sparse_attention_ref(*rs, lay)
    assert rel_l2(out, ref) < 1e-5
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    out.backward(dout)
    ref.backward(dout.double())
    for x, r in zip(xs, rs, strict=True):
        assert rel_l2(x.grad, r.grad) < 1e-4


@pytest.mark.parametrize("n,dtype,with_residual", [(200, torch.float32, False), (136, torch.float16, True),
                                                   (256, torch.float32, True)])
def test_q_index_reads_q_and_writes_the_output_through_the_permutation(gen, n, dtype, with_residual):
    """``q_index=perm`` with k, v given in permuted order: the output is the permuted problem's output
    scattered back to q's own tokens (plus the residual of each token), i.e. what gathering q and
    gathering the output back computes; ``lse`` stays in position order; ragged and even N."""
    d = 64
    q, k, v = _inputs(gen, 2, 2, n, d, dtype)
    lay = _random_layout(gen, 2, 2, n, 64, 64)  # row (0, 0, 0) empty
    perm = torch.randperm(n, generator=gen).to(DEVICE)
    res = _token_major(torch.randn(2, 2, n, d, generator=gen).to(DEVICE, dtype)) if with_residual else None
    kp, vp = k[:, :, perm], v[:, :, perm]
    out, lse = bs.block_sparse_attention_triton(q, kp, vp, lay, residual=res, q_index=perm, return_lse=True)
    ref_p, ref_lse = block_sparse_attention_ref(q[:, :, perm].double(), kp.double(), vp.double(), lay, return_lse=True)
    ref = torch.empty_like(ref_p)
    ref[:, :, perm] = ref_p
    if res is not None:
        ref = ref + res.double()
        assert out.stride() == res.stride()
    else:
        assert out.transpose(1, 2).is_contiguous()
    assert rel_l2(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-3
    empty = perm[:64]  # the tokens at the empty block's positions get zeros (the residual alone)
    want = res[0, 0, empty] if res is not None else torch.zeros_like(out[0, 0, empty])
    torch.testing.assert_close(out[0, 0, empty], want, rtol=0, atol=0)


def test_q_index_refuses_a_bad_index_and_autograd(gen):
    q, k, v = _inputs(gen, 1, 2, 128, 64, torch.float32)
    lay = BlockLayout.full(1, 2, 128, 64, 64, DEVICE)
    perm = torch.randperm(128).to(DEVICE)
    for bad in (perm[:100], perm.float(), perm[None]):
        with pytest.raises(ValueError, match="q_index must be an int32/int64 permutation"):
            bs.block_sparse_attention_triton(q, k, v, lay, q_index=bad)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="outside 0..127"):
            bs.block_sparse_attention_triton(q, k, v, lay, q_index=perm + 1)
    with pytest.raises(ValueError, match="no backward"):
        bs.block_sparse_attention_triton(q, k.requires_grad_(), v, lay, q_index=perm)


def test_q_index_on_the_torch_backends_matches_the_kernel(gen):
    """The public entry point's other backends gather q and scatter the output for ``q_index`` alike."""
    from salad_bench.kernels import block_sparse_attention

    n, d = 200, 64
    q, k, v = _inputs(gen, 1, 2, n, d, torch.float32)
    lay = _random_layout(gen, 1, 2, n, 64, 64)
    perm = torch.randperm(n, generator=gen).to(DEVICE)
    res = torch.randn(1, 2, n, d, generator=gen).to(DEVICE)
    ref = bs.block_sparse_attention_triton(q, k, v, lay, residual=res, q_index=perm)
    for index in (perm, perm.int()):  # int64 and int32 alike
        got = block_sparse_attention(q, k, v, lay, backend="torch", residual=res, q_index=index)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_the_flex_backend_keeps_only_the_layouts_tiles_or_refuses(gen):
    """Compiled flex (CUDA) visits only the layout's blocks; eager flex (the CPU) applies no block mask and
    would return dense attention, so it refuses there rather than pass dense off as sparse."""
    from salad_bench.kernels import block_sparse_attention

    q, k, v = _inputs(gen, 1, 2, 256, 64, torch.float32)
    lay = _random_layout(gen, 1, 2, 256, 128, 64, empty=False)
    if DEVICE == "cpu":
        with pytest.raises(Unsupported, match="runs compiled on CUDA only"):
            block_sparse_attention(q, k, v, lay, backend="flex")
        return
    want = block_sparse_attention_ref(q.double(), k.double(), v.double(), lay).float()
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, backend="flex"), want, rtol=2e-3, atol=2e-3)


def test_residual_refuses_a_mismatch_and_autograd(gen):
    q, k, v = _inputs(gen, 1, 2, 128, 64, torch.float32)
    lay = BlockLayout.full(1, 2, 128, 64, 64, DEVICE)
    with pytest.raises(ValueError, match="residual must match q"):
        bs.block_sparse_attention_triton(q, k, v, lay, residual=q[:, :1])
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        bs.block_sparse_attention_triton(q, k, v, lay, residual=q.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="no backward"):
        bs.block_sparse_attention_triton(q.requires_grad_(), k, v, lay, residual=torch.zeros_like(q))


def test_salad_adds_its_projection_in_the_sparse_kernel_and_matches_the_unfused_sum(gen):
    """SALAD on the Triton sparse branch: at inference the gated projection is the kernel's residual
    (token-major output); under autograd it is added after. Both give the same output."""
    from salad_bench.methods import AttnContext, create_method

    b, h, n, d = 1, 2, 330, 64
    q, k, v = _inputs(gen, b, h, n, d, torch.float32)
    m = create_method("salad", num_heads=h, head_dim=d, sparsity=0.6, proj_init="random",
                      sparse_knobs=(("backend", "triton"),)).to(DEVICE)
    torch.nn.init.normal_(m.gate_proj.weight, std=0.05)
    torch.nn.init.normal_(m.proj.bias)
    m.eval()
    ctx = AttnContext(grid=(3, 10, 11))
    with torch.no_grad():
        fused = m(q, k, v, ctx)
    assert fused.transpose(1, 2).is_contiguous()  # the residual's token-major buffer, written by the kernel
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    unfused = m(*xs, ctx)
    assert m.sparse.report().backend == "triton"
    torch.testing.assert_close(fused, unfused.detach(), rtol=1e-5, atol=1e-5)
    want = block_sparse_attention_ref(q.double(), k.double(), v.double(), m.sparse.layout).float()
    want = want + m.project(m.linear_branch(q, k, v, ctx), m.gate_value(q, ctx)).detach()
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
