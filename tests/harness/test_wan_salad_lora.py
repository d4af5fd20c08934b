"""SALAD and sparse_lora inside a tiny diffusers Wan transformer (CPU): the linear branch gets q, k from
before Wan's RoPE and rotates them once; sparse_lora is LoRA (peft) on the attention projections."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from salad_bench.harness.integrations.wan import install_attention, new_transformer  # noqa: E402
from salad_bench.kernels.reference import block_sparse_attention_ref, linear_attention_ref  # noqa: E402
from salad_bench.kernels.rope import apply_rope, rope_3d_freqs  # noqa: E402

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
BLOCKS = (("block_q", 16), ("block_k", 16))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _model(seed: int = 0, dtype=torch.float64):
    return new_transformer(TINY, dtype=dtype, seed=seed)


def _inputs(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 3, 16, 16, generator=g).to(dtype),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g).to(dtype),
        "return_dict": False,
    }


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _capture(method):
    """Record (q, k, v, ctx) and the output of every call of ``method``."""
    calls = []

    def hook(mod, args, kwargs, out):
        calls.append((*args, out))

    method.register_forward_hook(hook, with_kwargs=True)
    return calls


# -- SALAD: RoPE once, in the linear branch, on un-rotated q, k --------------------------------------


@pytest.mark.parametrize("variant", ["salad", "salad_no_rope"])
def test_salad_linear_branch_gets_unrotated_qk_in_wan(variant):
    torch.manual_seed(0)
    model = _model()
    methods = install_attention(model, variant, sparsity=0.5, proj_init="random", sparse_knobs=BLOCKS)
    with torch.no_grad():
        for m in methods:
            m.gate_proj.weight.normal_(std=0.1)
            m.proj.bias.normal_()
    calls = _capture(methods[0])
    _run(model, _inputs())
    q, k, v, ctx, out = calls[0]
    attn, m = model.blocks[0].attn1, methods[0]
    heads, d = attn.heads, q.shape[-1]

    # what the processor must hand over: q, k after qk-norm, before Wan's RoPE, by hand from the layer input
    x = ctx.hidden_states
    q0 = attn.norm_q(attn.to_q(x)).unflatten(2, (heads, -1)).transpose(1, 2)
    k0 = attn.norm_k(attn.to_k(x)).unflatten(2, (heads, -1)).transpose(1, 2)
    assert torch.equal(ctx.q_unrotated, q0) and torch.equal(ctx.k_unrotated, k0)
    cos, sin = rope_3d_freqs(ctx.grid, d)
    # Wan's own RoPE is our 3D RoPE: rotating q0 once gives the q the sparse branch sees
    torch.testing.assert_close(apply_rope(q0, cos, sin), q, atol=1e-6, rtol=1e-6)

    rope = (cos, sin) if variant == "salad" else (None, None)
    lin = linear_attention_ref(q0, k0, v, "relu", *rope)  # RoPE once (or never), on un-rotated q, k
    twice = linear_attention_ref(q, k, v, "relu", *rope)  # what rotating the rotated q, k would give
    sparse = block_sparse_attention_ref(q, k, v, m.sparse.layout)
    g = m.gate_value(q, ctx)[:, None, :, None]
    b, h, n, _ = q.shape

    def expect(branch):
        projected = (branch.transpose(1, 2).reshape(b, n, h * d) @ m.proj.weight.T + m.proj.bias).view(b, n, h, d)
        return sparse + (g * projected).transpose(1, 2)

    torch.testing.assert_close(out, expect(lin), atol=1e-9, rtol=1e-9)
    assert not torch.allclose(out, expect(twice), atol=1e-6)  # RoPE applied twice would be caught


def test_methods_that_do_not_ask_get_no_unrotated_qk():
    model = _model(dtype=torch.float32)
    (m, *_) = install_attention(model, "topk", sparsity=0.5, block_q=16, block_k=16)
    calls = _capture(m)
    _run(model, _inputs(dtype=torch.float32))
    ctx = calls[0][3]
    assert ctx.q_unrotated is None and ctx.k_unrotated is None


def test_salad_in_bf16_wan_gate_zero_is_the_sparse_model():
    """The gated bias in the DiT's dtype: a closed gate gives exactly the sparse-only model."""
    inputs = _inputs(dtype=torch.bfloat16)
    ref_model = _model(dtype=torch.bfloat16)
    install_attention(ref_model, "salad_no_linear", sparsity=0.5, sparse_knobs=BLOCKS)
    ref = _run(ref_model, inputs)
    for granularity in ("sample", "token_head"):
        model = _model(dtype=torch.bfloat16)
        methods = install_attention(model, "salad", sparsity=0.5, proj_init="random", sparse_knobs=BLOCKS,
                                    gate_granularity=granularity)
        with torch.no_grad():
            for m in methods:
                m.proj.bias.normal_()
                m.gate_proj.bias.fill_(-1e4)
        assert torch.equal(_run(model, inputs), ref)
        with torch.no_grad():
            for m in methods:
                m.gate_proj.bias.zero_()
        assert not torch.equal(_run(model, inputs), ref)
