"""topk's selection rule and SALAD's maths, checked against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from salad_bench.kernels.reference import block_sparse_attention_ref, linear_attention_ref
from salad_bench.kernels.rope import apply_rope, rope_3d_freqs
from salad_bench.methods import AttnContext, create_method

GRID = (3, 10, 11)
N = 330


def _qkv(gen, h=2, d=64):
    return [torch.randn(1, h, N, d, generator=gen, dtype=torch.float64) for _ in range(3)]


def test_topk_keeps_best_pooled_blocks_and_diagonal(gen):
    q, k, v = _qkv(gen)
    m = create_method("topk", num_heads=2, head_dim=64, sparsity=0.8)
    layout = m.select(q, k, AttnContext(grid=GRID))
    tiles = layout.to_dense()[0, 0]
    mq, mk = tiles.shape
    # brute force pooled scores
    pq = torch.stack([q[0, 0, i * 128 : (i + 1) * 128].mean(0) for i in range(mq)])
    pk = torch.stack([k[0, 0, j * 64 : (j + 1) * 64].mean(0) for j in range(mk)])
    s = pq @ pk.T
    keep = math.ceil(0.2 * mk - 1e-9)
    for i in range(mq):
        diag = {j for j in range(mk) if j * 64 < min(N, (i + 1) * 128) and (j + 1) * 64 > i * 128}
        assert diag <= set(torch.nonzero(tiles[i]).flatten().tolist())
        kept = set(torch.nonzero(tiles[i]).flatten().tolist())
        assert len(kept) == max(keep, 2 if i < mq - 1 else len(diag))
        others = kept - diag
        best_rest = set(torch.topk(s[i].masked_fill(torch.tensor([j in diag for j in range(mk)]), -1e9), len(others)).indices.tolist()) if others else set()
        assert others == best_rest


def test_topk_selectors_agree_and_bad_selector_is_refused(gen):
    """selector='triton' (the interpreter here) keeps the same tiles as torch; 'auto' is torch on the CPU."""
    q, k, _ = [x.float() for x in _qkv(gen)]
    lays = {s: create_method("topk", num_heads=2, head_dim=64, sparsity=0.8, selector=s).select(q, k, AttnContext(grid=GRID))
            for s in ("torch", "triton", "auto")}
    assert torch.equal(lays["torch"].to_dense(), lays["triton"].to_dense())
    assert torch.equal(lays["torch"].to_dense(), lays["auto"].to_dense())
    with pytest.raises(ValueError, match="selector"):
        create_method("topk", num_heads=2, head_dim=64, sparsity=0.8, selector="cuda")


def test_topk_output_matches_reference_on_its_layout(gen):
    q, k, v = _qkv(gen)
    m = create_method("topk", num_heads=2, head_dim=64, sparsity=0.7)
    out = m(q, k, v, AttnContext(grid=GRID))
    ref = block_sparse_attention_ref(q, k, v, m.layout)
    assert torch.allclose(out, ref, atol=1e-10)


def test_salad_is_pure_sparse_untrained(gen):
    q, k, v = _qkv(gen)
    salad = create_method("salad", num_heads=2, head_dim=64, sparsity=0.8).double()
    topk = create_method("topk", num_heads=2, head_dim=64, sparsity=0.8)
    ctx = AttnContext(grid=GRID)
    assert torch.equal(salad(q, k, v, ctx), topk(q, k, v, ctx))


def _linear_by_hand(q, k, v, grid=GRID, rope=True):
    """The linear branch written out: ReLU features, normaliser on un-rotated features, RoPE in the numerator."""
    fq, fk = torch.relu(q), torch.relu(k)
    den = fq @ fk.sum(2, keepdim=True).transpose(-1, -2) + 1e-6  # (B, H, N, 1)
    if rope:
        cos, sin = rope_3d_freqs(grid, q.shape[-1])
        fq, fk = apply_rope(fq, cos, sin), apply_rope(fk, cos, sin)
    return (fq @ (fk.transpose(-1, -2) @ v)) / den


def _expected(m, q, lin, sparse, g):
    """out_sparse + g * Proj(lin), the gate on each output head of the projection, bias included."""
    b, h, n, d = q.shape
    projected = (lin.transpose(1, 2).reshape(b, n, h * d) @ m.proj.weight.T + m.proj.bias).view(b, n, h, d)
    gate = g[..., None] if g.dim() == 3 else g[:, None, :, None]
    return sparse + (gate * projected).transpose(1, 2)


def test_salad_formula(gen):
    """O = O_sparse + G * Proj(O_linear) with RoPE inside the linear branch, checked by hand."""
    h, d = 2, 64
    q, k, v = _qkv(gen, h, d)
    ctx = AttnContext(grid=GRID)
    m = create_method("salad", num_heads=h, head_dim=d, sparsity=0.6, proj_init="random").double()
    torch.nn.init.normal_(m.gate_proj.weight, std=0.05)
    torch.nn.init.normal_(m.proj.bias)  # a bias the gate must scale too
    out = m(q, k, v, ctx)
    sparse = block_sparse_attention_ref(q, k, v, m.sparse.layout)
    lin = _linear_by_hand(q, k, v)
    cos, sin = rope_3d_freqs(GRID, d)
    assert torch.allclose(lin, linear_attention_ref(q, k, v, "relu", cos, sin), atol=1e-10)
    pooled = q.mean(2).reshape(1, -1)
    g = torch.sigmoid(pooled @ m.gate_proj.weight.T + m.gate_proj.bias).expand(1, h)  # one scalar per sample
    assert torch.allclose(out, _expected(m, q, lin, sparse, g), atol=1e-9)


@pytest.mark.parametrize("granularity", ["sample", "head", "token", "token_head"])
@pytest.mark.parametrize("gate", ["dynamic", "static_dynamic"])
def test_salad_gate_granularity_matches_a_direct_computation(gen, granularity, gate):
    b, h, d = 2, 2, 32
    q, k, v = (torch.randn(b, h, N, d, generator=gen, dtype=torch.float64) for _ in range(3))
    x = torch.randn(b, N, 48, generator=gen, dtype=torch.float64)  # a layer input wider than H*D is fine
    m = create_method("salad", num_heads=h, head_dim=d, sparsity=0.6, proj_init="random", gate=gate,
                      gate_granularity=granularity).double()
    m.gate_proj = torch.nn.Linear(48, m.gate_proj.out_features).double()  # read x (B, N, 48)
    torch.nn.init.normal_(m.proj.bias)
    if gate == "static_dynamic":
        with torch.no_grad():
            m.layer_scale.fill_(0.7)
            m.head_scale.copy_(torch.tensor([0.5, 1.5]))
    ctx = AttnContext(grid=GRID, hidden_states=x)
    with torch.no_grad():
        out = m(q, k, v, ctx)
        wg, bgate = m.gate_proj.weight, m.gate_proj.bias
        if granularity in ("sample", "head"):
            g = torch.sigmoid(x.mean(1) @ wg.T + bgate)  # (B, 1 or H)
            assert g.shape == (b, 1 if granularity == "sample" else h)
            g = g.expand(b, h)
        else:
            g = torch.sigmoid(x @ wg.T + bgate)  # (B, N, 1 or H)
            assert g.shape == (b, N, 1 if granularity == "token" else h)
            g = g.expand(b, N, h)
        if gate == "static_dynamic":
            g = g * 0.7 * torch.tensor([0.5, 1.5], dtype=torch.float64)
        assert torch.allclose(m.gate_value(q, ctx), g, atol=1e-12)
        sparse = block_sparse_attention_ref(q, k, v, m.sparse.layout)
        expect = _expected(m, q, _linear_by_hand(q, k, v), sparse, g)
    assert torch.allclose(out, expect, atol=1e-9)
    assert m.report().extra["gate_granularity"] == granularity
    fresh = create_method("salad", num_heads=h, head_dim=d, gate_granularity=granularity)
    k_out = h if granularity in ("head", "token_head") else 1
    assert tuple(fresh.gate_proj.weight.shape) == (k_out, h * d)  # Linear(C, 1) or Linear(C, H)


@pytest.mark.parametrize("granularity", ["sample", "head", "token", "token_head"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_salad_gate_zero_gives_exactly_the_sparse_output_despite_the_bias(gen, granularity, dtype):
    """The gate multiplies Proj's output, bias included: a closed gate leaves the sparse branch alone."""
    q, k, v = (t.to(dtype) for t in _qkv(gen))
    ctx = AttnContext(grid=GRID)
    m = create_method("salad", num_heads=2, head_dim=64, sparsity=0.6, proj_init="random",
                      gate_granularity=granularity).to(dtype)
    with torch.no_grad():
        m.proj.bias.normal_(generator=gen)
        m.gate_proj.bias.fill_(-1e4)  # sigmoid(-1e4) == 0 exactly
    sparse = create_method("topk", num_heads=2, head_dim=64, sparsity=0.6)(q, k, v, ctx)
    for grad in (False, True):  # the no-grad GEMM path and the differentiable one
        with torch.set_grad_enabled(grad):
            assert torch.equal(m(q, k, v, ctx), sparse)
    static = create_method("salad_static_gate", num_heads=2, head_dim=64, sparsity=0.6, proj_init="random").to(dtype)
    with torch.no_grad():
        static.proj.bias.normal_(generator=gen)
        static.layer_scale.zero_()
        assert torch.equal(static(q, k, v, ctx), sparse)
        static.layer_scale.fill_(1.0)
        assert not torch.equal(static(q, k, v, ctx), sparse)  # the bias alone moves an open gate's output


def test_salad_linear_branch_rotates_the_unrotated_qk_once(gen):
    """With AttnContext.q_unrotated/k_unrotated the branch uses them (and rotates them once); the sparse
    branch keeps the q, k it is given. Without them (bare Q/K/V) it uses the given q, k."""
    h, d = 2, 64
    q, k, v = _qkv(gen, h, d)
    q0, k0 = (torch.randn(1, h, N, d, generator=gen, dtype=torch.float64) for _ in range(2))
    m = create_method("salad", num_heads=h, head_dim=d, sparsity=0.6, proj_init="random").double()
    assert m.wants_unrotated_qk
    ctx = AttnContext(grid=GRID, q_unrotated=q0, k_unrotated=k0)
    assert torch.allclose(m.linear_branch(q, k, v, ctx), _linear_by_hand(q0, k0, v), atol=1e-10)
    assert torch.allclose(m.linear_branch(q, k, v, AttnContext(grid=GRID)), _linear_by_hand(q, k, v), atol=1e-10)
    out = m(q, k, v, ctx)
    sparse = block_sparse_attention_ref(q, k, v, m.sparse.layout)
    g = m.gate_value(q, ctx)
    assert torch.allclose(out, _expected(m, q, _linear_by_hand(q0, k0, v), sparse, g), atol=1e-9)
    no_rope = create_method("salad_no_rope", num_heads=h, head_dim=d).double()
    assert torch.allclose(no_rope.linear_branch(q, k, v, ctx), _linear_by_hand(q0, k0, v, rope=False), atol=1e-10)
    m.linear_enabled = False
    assert not m.wants_unrotated_qk  # a dropped branch asks for nothing
    with pytest.raises(ValueError, match="q_unrotated"):
        m(q, k, v, AttnContext(grid=GRID, q_unrotated=q0[:, :, :10]))


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"gate_granularity": "channel"}, r"gate_granularity='channel'.*sample, head, token, token_head"),
        ({"gate_granularity": "head", "gate": "none"}, "gate_granularity='head'"),
        ({"gate_granularity": "token", "gate": "static"}, "gate_granularity='token'"),
        ({"gate": "sometimes"}, r"gate='sometimes'.*dynamic, static, static_dynamic, none"),
    ],
)
def test_salad_bad_gate_knobs(knobs, match):
    with pytest.raises(ValueError, match=match):
        create_method("salad", num_heads=2, head_dim=32, **knobs)


def test_salad_gate_uses_hidden_states_when_given(gen):
    q, k, v = _qkv(gen)
    m = create_method("salad", num_heads=2, head_dim=64, proj_init="random").double()
    torch.nn.init.normal_(m.gate_proj.weight)
    x1 = torch.randn(1, N, 128, generator=gen, dtype=torch.float64)
    g1 = m.gate_value(q, AttnContext(grid=GRID, hidden_states=x1))
    g2 = m.gate_value(q, AttnContext(grid=GRID, hidden_states=-x1))
    assert g1.shape == (1, 2) and not torch.allclose(g1, g2)


def test_salad_extra_parameters_match_paper_on_wan13b():
    # One C x C projection (+bias) per block and a C -> 1 gate: the paper's +4.99% on 1,418,996,800.
    m = create_method("salad", num_heads=12, head_dim=128)
    per_layer = m.extra_parameters()
    c = 12 * 128
    assert per_layer == c * c + c + c + 1
    assert 30 * per_layer / 1_418_996_800 == pytest.approx(0.0499, abs=0.0003)


def test_salad_gradients_reach_projection_and_gate(gen):
    q, k, v = _qkv(gen)
    m = create_method("salad", num_heads=2, head_dim=64, sparsity=0.5).double()
    out = m(q, k, v, AttnContext(grid=GRID))
    out.square().sum().backward()
    assert m.proj.weight.grad is not None and m.proj.weight.grad.abs().sum() > 0
    # Proj starts at zero, so the gate's gradient is zero at step 0 and non-zero after Proj moves.
    with torch.no_grad():
        m.proj.weight.normal_(std=0.01)
    m.zero_grad()
    m(q, k, v, AttnContext(grid=GRID)).square().sum().backward()
    assert m.gate_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant,attr,value", [("salad_no_rope", "rope", False), ("salad_static_gate", "gate", "static"), ("salad_separate_qkv", "shared_qkv", False)])
def test_ablation_variants_change_the_output(gen, variant, attr, value):
    q, k, v = _qkv(gen)
    ctx = AttnContext(grid=GRID)
    torch.manual_seed(0)
    base = create_method("salad", num_heads=2, head_dim=64, sparsity=0.6, proj_init="random").double()
    torch.manual_seed(0)
    abl = create_method(variant, num_heads=2, head_dim=64, sparsity=0.6, proj_init="random").double()
    assert getattr(abl.config, attr) == value
    abl.load_state_dict(base.state_dict(), strict=False)
    if value == "static":
        with torch.no_grad():
            abl.layer_scale.fill_(0.3)
    if variant == "salad_separate_qkv":
        with torch.no_grad():
            abl.qkv_maps.add_(0.1 * torch.randn_like(abl.qkv_maps))
    assert not torch.allclose(base(q, k, v, ctx), abl(q, k, v, ctx))


def test_drop_weakest_linear_branches():
    from salad_bench.methods.salad import drop_weakest_linear_branches

    mods = [create_method("salad", num_heads=2, head_dim=32) for _ in range(10)]
    for i, m in enumerate(mods):
        m.gate_mean = torch.tensor(float((i * 7) % 10))
    dropped = drop_weakest_linear_branches(mods, 0.2)
    assert dropped == [0, 3]  # gates 0 and 1
    assert [m.linear_enabled for m in mods].count(False) == 2


@pytest.mark.parametrize("name", ["salad", "salad_sta", "salad_token_gate", "salad_no_linear"])
def test_own_work_is_what_salad_adds_to_its_sparse_branch(gen, name):
    """A harness splits SALAD's time into selection, the sparse kernel and ``own_work``: the latter must be
    exactly what the forward adds to the sparse output (None without a linear branch)."""
    h, d = 2, 64
    q, k, v = _qkv(gen, h, d)
    ctx = AttnContext(grid=GRID)
    m = create_method(name, num_heads=h, head_dim=d, sparsity=0.6, proj_init="random").double()
    if hasattr(m, "gate_proj"):
        torch.nn.init.normal_(m.gate_proj.weight, std=0.05)
    out = m(q, k, v, ctx)
    sparse = m.sparse(q, k, v, ctx)  # the sparse branch as the forward runs it (STA's: in tile order)
    own = m.own_work(q, k, v, ctx)
    assert m.splits_into_kernel()
    if name == "salad_no_linear":
        assert own is None and torch.allclose(out, sparse, atol=1e-10)
    else:
        assert own.abs().max() > 1e-3 and torch.allclose(out, sparse + own, atol=1e-9)


def test_only_methods_made_of_the_block_sparse_kernel_split_into_it():
    split = {n: create_method(n, num_heads=2, head_dim=64, sparsity=0.9).splits_into_kernel()
             for n in ("topk", "sta", "svg", "sparse_lora", "sparse_headlora", "salad", "sla", "vsa", "full")}
    assert split == {"topk": True, "sta": True, "svg": True, "sparse_lora": True, "sparse_headlora": True,
                     "salad": True, "sla": False, "vsa": False, "full": False}
