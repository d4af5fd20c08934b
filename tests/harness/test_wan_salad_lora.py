"""SALAD and sparse_lora inside a tiny diffusers Wan transformer (CPU): the linear branch gets q, k from
before Wan's RoPE and rotates them once; sparse_lora is LoRA (peft) on the attention projections."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from salad_bench.harness.integrations.wan import install_attention, new_transformer  # noqa: E402
from salad_bench.kernels.reference import block_sparse_attention_ref, linear_attention_ref  # noqa: E402
from salad_bench.kernels.rope import apply_rope, rope_3d_freqs  # noqa: E402
from tests.harness._wan import WAN_TINY_16, assert_compiled_trains_like_eager, run_model, wan_inputs  # noqa: E402

TINY = {**WAN_TINY_16, "num_layers": 2}
BLOCKS = (("block_q", 16), ("block_k", 16))


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, dtype=torch.float64):
    return new_transformer(TINY, dtype=dtype, seed=seed)


def _inputs(seed=1, dtype=torch.float64):
    return wan_inputs(seed=seed, dtype=dtype)


_run = run_model


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


# -- sparse_lora: peft LoRA on to_q, to_k, to_v, to_out.0 at the sparse method's pattern ----------------

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

TOPK = {"sparsity": 0.5, "block_q": 16, "block_k": 16}
LORA = {"sparsity": 0.5, "sparse_knobs": BLOCKS, "rank": 4, "alpha": 8.0}
PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def _perturb(methods, std=0.1):
    with torch.no_grad():
        for m in methods:
            for p in m.trainable_parameters():
                p.normal_(std=std)


def test_sparse_lora_is_peft_lora_on_the_projections_and_untrained_is_the_sparse_model():
    inputs = _inputs(dtype=torch.float32)
    model = _model(dtype=torch.float32)
    keys = list(model.state_dict())
    install_attention(model, "topk", **TOPK)
    ref = _run(model, inputs)
    methods = install_attention(model, "sparse_lora", **LORA)
    for block in model.blocks:
        for name in PROJ:
            layer = block.attn1.get_submodule(name)
            assert isinstance(layer, LoraLayer) and layer.r["default"] == 4 and layer.scaling["default"] == 2.0
        assert not any(isinstance(mod, LoraLayer) for mod in block.attn2.modules())  # cross-attention untouched
        assert not any(isinstance(mod, LoraLayer) for mod in block.ffn.modules())
    assert torch.equal(_run(model, inputs), ref)  # B = 0: exactly the plain sparse model
    # the model came frozen: the LoRA factors are the only trainable parameters, and what the methods declare
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn1.{t}.lora_{ab}.default.weight" for i in range(2) for t in PROJ for ab in "AB"}
    declared = [p for m in methods for p in m.trainable_parameters()]
    assert {id(p) for p in declared} == {id(p) for p in model.parameters() if p.requires_grad}
    # the report: the sparse method's density, plus the LoRA's FLOPs where it is installed
    rep, plain = methods[0].report(), installed_methods_report(model, "topk")
    n, c, r = 192, 32, 4
    assert rep.density == plain.density
    assert rep.flops["lora_projections"] == 4 * (2.0 * n * r * (c + c) + 2.0 * n * c)
    assert "installed" in rep.extra["lora"]
    # once it trains it moves the output; restoring puts the stock model back, keys and all
    _perturb(methods)
    assert not torch.equal(_run(model, inputs), ref)
    install_attention(model, "topk", **TOPK)  # a second install removes the LoRA first
    assert torch.equal(_run(model, inputs), ref)
    from salad_bench.harness.integrations.wan import restore_attention

    restore_attention(model)
    assert list(model.state_dict()) == keys and not hasattr(model.blocks[0].attn1, "peft_config")
    assert all(type(b.attn1.to_q) is torch.nn.Linear for b in model.blocks)
    assert methods[0].trainable_parameters() == []


def installed_methods_report(model, name):
    """The report of ``name`` run on a fresh copy of the model (same weights and inputs)."""
    from salad_bench.harness.integrations.wan import installed_methods

    other = _model(dtype=torch.float32)
    install_attention(other, name, **TOPK)
    _run(other, _inputs(dtype=torch.float32))
    return installed_methods(other)[0].report()


def test_sparse_lora_trains_only_its_factors():
    model = _model(dtype=torch.float32).train()
    methods = install_attention(model, "sparse_lora", **LORA)
    _perturb(methods, std=0.05)  # B != 0 so that A gets a gradient too
    model(**_inputs(dtype=torch.float32))[0].square().mean().backward()
    for m in methods:
        for p in m.trainable_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_sparse_lora_keeps_flags_of_a_trainable_model_and_only_freezes_the_adapted_linears():
    model = _model(dtype=torch.float32).requires_grad_(True)
    install_attention(model, "sparse_lora", **{**LORA, "targets": ("q", "v")})
    attn = model.blocks[0].attn1
    assert not attn.to_q.base_layer.weight.requires_grad and not attn.to_v.base_layer.weight.requires_grad
    assert attn.to_k.weight.requires_grad and attn.norm_q.weight.requires_grad  # not adapted: left as they were
    assert type(attn.to_k) is torch.nn.Linear and isinstance(attn.to_q, LoraLayer)
    from salad_bench.harness.integrations.wan import restore_attention

    restore_attention(model)
    assert all(p.requires_grad for p in model.parameters())


def test_sparse_lora_state_saves_and_loads_back(tmp_path):
    from safetensors.torch import save_file

    from salad_bench.harness.weights import load_method_state

    inputs = _inputs(dtype=torch.float32)
    model = _model(dtype=torch.float32)
    _perturb(install_attention(model, "sparse_lora", **LORA))
    ref = _run(model, inputs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if ".lora_" in k}, tmp_path / "lora.safetensors")
    other = _model(dtype=torch.float32)
    install_attention(other, "sparse_lora", **LORA)
    assert not torch.equal(_run(other, inputs), ref)
    load_method_state(other, tmp_path / "lora.safetensors")
    assert torch.equal(_run(other, inputs), ref)


def test_sparse_lora_refuses_fused_projections_and_missing_peft(monkeypatch):
    import sys

    from salad_bench.methods import Unsupported

    model = _model(dtype=torch.float32)
    model.fuse_qkv_projections()
    with pytest.raises(Unsupported, match="to_qkv"):
        install_attention(model, "sparse_lora", **LORA)
    assert all(type(b.attn1.to_out[0]) is torch.nn.Linear for b in model.blocks)  # nothing left behind
    install_attention(model, "sparse_lora", **{**LORA, "targets": ("out",)})  # the output projection is not fused
    assert isinstance(model.blocks[0].attn1.to_out[0], LoraLayer)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(Unsupported, match="pip install peft"):
        install_attention(_model(dtype=torch.float32), "sparse_lora", **LORA)


def test_sparse_lora_block_compiles_with_inductor_and_trains_through_it():
    torch._dynamo.reset()
    inputs = _inputs(dtype=torch.float32)

    def build():
        torch.manual_seed(0)
        m = _model(dtype=torch.float32).train()
        _perturb(install_attention(m, "sparse_lora", **LORA), std=0.05)
        return m

    assert_compiled_trains_like_eager(build(), build(), inputs)


@pytest.mark.parametrize("name", ["salad", "salad_token_gate", "sparse_lora", "sparse_headlora"])
def test_untrained_at_density_one_equals_full_in_wan(name):
    inputs = _inputs(dtype=torch.float32)
    model = _model(dtype=torch.float32)
    install_attention(model, "full")
    ref = _run(model, inputs)
    methods = install_attention(model, name, sparsity=0.0)
    out = _run(model, inputs)
    assert all(m.report().density == 1.0 for m in methods)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
