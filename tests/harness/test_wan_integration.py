"""Methods inside diffusers' Wan transformer, and the real-weights path, on tiny random configs (CPU)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

pytest.importorskip("diffusers")

from salad_bench.harness.integrations.wan import (  # noqa: E402
    METHOD_ATTR,
    SparseWanAttnProcessor,
    attention_state,
    install_attention,
    installed_methods,
    new_transformer,
    restore_attention,
    set_step,
    step_callback,
    time_attention,
)
from salad_bench.harness.weights import WeightsError, check_safetensors, generate, load_method_state, load_transformer  # noqa: E402
from salad_bench.methods import AttentionMethod, AttnContext, MethodConfig  # noqa: E402
from tests.harness._wan import WAN_TINY_16, run_model, wan_inputs  # noqa: E402

TINY = WAN_TINY_16


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, dtype=torch.float32):
    return new_transformer(TINY, dtype=dtype, seed=seed)


def _inputs(frames=3, h=16, w=16, seed=1, dtype=torch.float32):
    return wan_inputs(frames, h, w, seed, dtype)


_run = run_model


class _Probe(AttentionMethod):
    """Dense attention that records the context of every call."""

    family = "full"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[AttnContext] = []

    def attend(self, q, k, v, ctx):
        self.seen.append(ctx)
        self.shapes = (tuple(q.shape), tuple(ctx.hidden_states.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _probe(*, num_heads, head_dim, sparsity=0.0):
    return _Probe(MethodConfig(sparsity=sparsity), num_heads=num_heads, head_dim=head_dim, name="probe")


# -- the processor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_full_is_bit_identical_to_stock_processor(fused):
    model = _model()
    if fused:
        model.fuse_qkv_projections()
    x = _inputs()
    ref = _run(model, x)
    install_attention(model, "full")
    out = _run(model, x)
    assert torch.equal(out, ref), (out - ref).abs().max()


def test_only_self_attention_is_swapped_and_methods_are_submodules():
    model = _model()
    stock2 = [b.attn2.processor for b in model.blocks]
    methods = install_attention(model, "topk", sparsity=0.5, block_q=16, block_k=16)
    assert len(methods) == TINY["num_layers"]
    for i, b in enumerate(model.blocks):
        assert isinstance(b.attn1.processor, SparseWanAttnProcessor) and b.attn1.processor.layer == i
        assert b.attn1._modules[METHOD_ATTR] is methods[i]
        assert b.attn2.processor is stock2[i] and not hasattr(b.attn2, METHOD_ATTR)
    names = {n for n, _ in model.named_modules()}
    assert "blocks.0.attn1.sparse_method" in names
    _run(model, _inputs())
    assert all(m.report().density < 1.0 for m in installed_methods(model))


def test_restore_puts_everything_back():
    model = _model()
    keys = list(model.state_dict())
    procs = [b.attn1.processor for b in model.blocks]
    x = _inputs()
    ref = _run(model, x)
    install_attention(model, "salad", sparsity=0.5)
    install_attention(model, "topk", sparsity=0.5)  # a second install replaces the first
    assert len(model._forward_pre_hooks) == 1
    restore_attention(model)
    assert attention_state(model) is None and not model._forward_pre_hooks
    assert [b.attn1.processor for b in model.blocks] == procs
    assert list(model.state_dict()) == keys
    assert torch.equal(_run(model, x), ref)
    restore_attention(model)  # idempotent


def test_context_grid_layer_step_and_hidden_states():
    model = _model()
    install_attention(model, _probe, num_steps=10)
    set_step(model, 7)
    _run(model, _inputs(frames=3, h=16, w=16))
    probes = installed_methods(model)
    for i, p in enumerate(probes):
        ctx = p.seen[-1]
        assert ctx.grid == (3, 8, 8) and ctx.layer == i and ctx.num_layers == 3
        assert (ctx.step, ctx.num_steps) == (7, 10)
        assert p.shapes == ((1, 2, 192, 16), (1, 192, 32))
    _run(model, _inputs(frames=2, h=8, w=12))  # the grid follows the input
    assert probes[0].seen[-1].grid == (2, 4, 6)
    with pytest.raises(ValueError, match="outside"):
        set_step(model, 10)
    # the three blocks standing for layers 5..7 of an 8-layer model (a model built with fewer blocks)
    install_attention(model, _probe, layer_offset=5, num_layers=8)
    _run(model, _inputs(frames=3, h=16, w=16))
    assert [(p.seen[-1].layer, p.seen[-1].num_layers) for p in installed_methods(model)] == [(5, 8), (6, 8), (7, 8)]
    with pytest.raises(ValueError, match="does not fit a model of 7 layers"):
        install_attention(model, _probe, layer_offset=5, num_layers=7)


def test_step_callback_advances_the_step():
    model = _model()
    install_attention(model, _probe)
    set_step(model, 0, 4)
    cb = step_callback(model)
    for i in range(4):
        assert cb(None, i, None, {}) == {}
    assert attention_state(model).step == 3  # clamped to the last step


def test_salad_parameters_train_save_and_load(tmp_path):
    model = _model()
    install_attention(model, "salad", sparsity=0.5, sparse_knobs=(("block_q", 16), ("block_k", 16)))
    keys = [k for k in model.state_dict() if ".sparse_method." in k]
    assert (
        "blocks.0.attn1.sparse_method.proj.weight" in keys and "blocks.2.attn1.sparse_method.gate_proj.weight" in keys
    )
    trainable = [n for n, _ in model.named_parameters() if ".sparse_method." in n]
    assert trainable
    model.requires_grad_(False)
    for m in installed_methods(model):
        m.requires_grad_(True)
    model.train()
    x = _inputs()
    out = model(**x)[0]
    out.square().mean().backward()
    grad = model.blocks[1].attn1.sparse_method.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # zero-init proj still gets a gradient
    with torch.no_grad():
        for m in installed_methods(model):
            m.proj.weight.normal_(0, 0.05)
    model.eval()
    ref = _run(model, x)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if ".sparse_method." in k},
        tmp_path / "salad.safetensors",
    )
    other = _model()
    install_attention(other, "salad", sparsity=0.5, sparse_knobs=(("block_q", 16), ("block_k", 16)))
    assert not torch.equal(_run(other, x), ref)
    load_method_state(other, tmp_path / "salad.safetensors")
    assert torch.equal(_run(other, x), ref)
    install_attention(other, "salad_no_gate", sparsity=0.5)  # no gate_proj: the state does not fit
    with pytest.raises(WeightsError, match="does not match the installed method"):
        load_method_state(other, tmp_path / "salad.safetensors")
    install_attention(other, "topk", sparsity=0.5)
    with pytest.raises(WeightsError, match="no installed method"):
        load_method_state(other, tmp_path / "salad.safetensors")


def _registered():
    from salad_bench.methods import METHODS

    return METHODS.names()


# The processor hands over zero-copy (B, H, N, D) views of the (B, N, H, D) projections, exactly what
# diffusers gives SDPA, so every method must accept strided inputs (also checked in test_contract.py).
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", _registered())
def test_every_registered_method_runs_inside_wan(name):
    from salad_bench.methods import Unsupported

    model = _model()
    try:
        methods = install_attention(model, name, sparsity=0.5, num_steps=4)
        set_step(model, 2)
        out = _run(model, _inputs())
    except Unsupported as exc:
        pytest.skip(f"{name}: {exc}")
    assert out.shape == (1, 4, 3, 16, 16) and torch.isfinite(out).all()
    assert all(0.0 < m.report().density <= 1.0 for m in methods)


def test_time_attention_times_every_layer():
    model = _model()
    install_attention(model, "full")
    with time_attention(model) as timer:
        _run(model, _inputs())
        calls = timer.take_calls_ms()
    assert len(calls) == TINY["num_layers"] and all(c > 0 for c in calls)
    assert attention_state(model).timer is None


def test_time_attention_times_the_method_a_method_is_built_on_apart():
    model = _model()
    install_attention(model, "salad", sparsity=0.5)
    with time_attention(model) as timer:
        _run(model, _inputs())
        outer, inner = timer.take_calls_ms(), timer.take_calls_ms(inner=True)
    assert len(outer) == len(inner) == TINY["num_layers"]
    assert all(0 < i < o for i, o in zip(inner, outer, strict=True))
    # the hooks go with the timer
    assert not any(m.sparse._forward_hooks or m.sparse._forward_pre_hooks for m in installed_methods(model))


def test_methods_follow_model_dtype_and_bf16_keeps_fp32_modules():
    model = _model(dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert model.rope.freqs_cos.dtype == torch.float32
    (m0, *_) = install_attention(model, "salad", sparsity=0.5)
    assert m0.proj.weight.dtype == torch.bfloat16
    out = _run(model, _inputs(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_rejects_non_wan_models():
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        install_attention(torch.nn.Linear(2, 2), "full")


def test_missing_diffusers_is_a_clear_error(monkeypatch):
    import sys

    from salad_bench.harness.integrations import require_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install"):
        require_diffusers()


# -- real-weights path -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan") / "transformer"
    _model(seed=3).save_pretrained(d)
    return d


def test_load_transformer_roundtrip(saved_transformer):
    ref_model = _model(seed=3)
    x = _inputs()
    for where in (saved_transformer, saved_transformer.parent):  # DIR/transformer or DIR
        model = load_transformer(where, dtype=torch.float32)
        assert torch.equal(_run(model, x), _run(ref_model, x))
    bf = load_transformer(saved_transformer, dtype=torch.bfloat16)
    assert bf.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert bf.blocks[0].scale_shift_table.dtype == torch.float32


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_dir(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*REAL_WEIGHTS"):
        load_transformer(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no config.json"):
        load_transformer(tmp_path)


def test_garbage_config(saved_transformer, tmp_path):
    d = _copy(saved_transformer, tmp_path / "t")
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config.json: not valid JSON"):
        load_transformer(d)
    (d / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 1536, "num_heads": 12}))
    with pytest.raises(WeightsError, match="original Wan repository format"):
        load_transformer(d)
    (d / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(WeightsError, match="not 'WanTransformer3DModel'"):
        load_transformer(d)
    (d / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 2}))
    with pytest.raises(WeightsError, match="missing patch_size"):
        load_transformer(d)


def test_config_that_does_not_match_the_weights(saved_transformer, tmp_path):
    d = _copy(saved_transformer, tmp_path / "t")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 96}))
    with pytest.raises(WeightsError, match="shapes do not match"):
        load_transformer(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_layers": 4}))
    with pytest.raises(WeightsError, match="tensors missing"):
        load_transformer(d)


def test_truncated_and_garbage_safetensors(saved_transformer, tmp_path):
    d = _copy(saved_transformer, tmp_path / "t")
    f = d / "diffusion_pytorch_model.safetensors"
    check_safetensors(f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated.*download it again"):
        load_transformer(d)
    f.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="too short"):
        load_transformer(d)
    f.write_bytes(struct.pack("<Q", 12) + b"{not a json}" + b"\0" * 64)
    with pytest.raises(WeightsError, match="header is not valid JSON"):
        load_transformer(d)
    f.unlink()
    with pytest.raises(WeightsError, match="no .safetensors weights"):
        load_transformer(d)


# -- a whole tiny pipeline: text -> mp4 ------------------------------------------------------------


def _tiny_pipeline(path):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i, w in enumerate("a cat walks on the grass in the sun".split()):
        vocab.setdefault(w, i + 3)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    cfg = UMT5Config(
        vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8
    )
    text_encoder = UMT5EncoderModel(cfg)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(**{**TINY, "in_channels": 16, "out_channels": 16, "num_layers": 2})
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path


def test_generate_writes_a_real_mp4(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = _tiny_pipeline(tmp_path / "wan-tiny")
    out = generate(
        root,
        "a cat walks on the grass",
        0,
        2,
        5.0,
        "topk",
        0.5,
        tmp_path / "v" / "cat.mp4",
        5,
        32,
        32,
        dtype=torch.float32,
        device="cpu",
    )
    assert out.exists() and out.stat().st_size > 0
    reader = imageio.get_reader(out)
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    meta = json.loads((tmp_path / "v" / "cat.mp4.json").read_text())
    assert meta["method"] == "topk" and meta["num_frames"] == 5 and 0 < meta["density_mean"] <= 1
    # the same seed through the dense path is reproducible
    a = generate(root, "a cat", 1, 1, 1.0, None, 0.0, tmp_path / "a.mp4", 5, 32, 32, dtype=torch.float32, device="cpu")
    b = generate(
        root, "a cat", 1, 1, 1.0, "full", 0.0, tmp_path / "b.mp4", 5, 32, 32, dtype=torch.float32, device="cpu"
    )
    assert all((fa == fb).all() for fa, fb in zip(imageio.get_reader(a), imageio.get_reader(b), strict=True))
    # a truncated component is named before anything slow is loaded
    vae_file = root / "vae" / "diffusion_pytorch_model.safetensors"
    vae_file.write_bytes(vae_file.read_bytes()[:-10])
    with pytest.raises(WeightsError, match=r"vae/diffusion_pytorch_model.safetensors: truncated"):
        generate(root, "a cat", 0, 1, 1.0, None, 0.0, tmp_path / "c.mp4", 5, 32, 32, device="cpu")
    # a pipeline directory without model_index.json cannot generate
    (root / "model_index.json").unlink()
    with pytest.raises(WeightsError, match="model_index.json: missing"):
        generate(root, "a cat", 0, 1, 1.0, None, 0.0, tmp_path / "c.mp4", 5, 32, 32, device="cpu")


# -- token order -----------------------------------------------------------------------------------
ORDERED = [("sta", {"tile": (2, 4, 4)}), ("vsa", {}), ("salad_sta", {"sparse_knobs": (("tile", (2, 4, 4)),)})]


def _ordered_and_raster(name, knobs, monkeypatch, train=False):
    """The model's output (and every parameter's gradient with ``train``) with the blocks run in the method's
    token order, then with the order refused (the method gathers per layer), and the gathers counted."""
    import salad_bench.methods.base as mbase

    inputs = _inputs(frames=6, h=24, w=24)  # grid (6, 12, 12): vsa's cubes ragged in t
    calls = {"gathers": 0}
    for fn in ("gather_pair", "gather_tokens"):
        real = getattr(mbase, fn)
        monkeypatch.setattr(mbase, fn, lambda *a, real=real: calls.__setitem__("gathers", calls["gathers"] + 1) or real(*a))
    results = []
    for refuse in (False, True):
        model = _model()
        methods = install_attention(model, name, sparsity=0.6, **knobs)
        g = torch.Generator().manual_seed(3)
        for m in methods:
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if refuse:
            monkeypatch.setattr(type(methods[0]), "token_order", lambda self, grid, n, device: None)
        calls["gathers"] = 0
        if train:
            model.train().requires_grad_(True)  # the whole DiT trains (and the methods' own parameters)
            out = model(**inputs)[0]
            out.square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
        else:
            out, grads = _run(model, inputs), []
        state = attention_state(model)
        results.append((out.detach(), grads, calls["gathers"], state.order))
        assert methods[0].report().density < 0.95
    return results


@pytest.mark.parametrize("name,knobs", ORDERED)
def test_a_method_with_a_token_order_runs_the_blocks_in_it(name, knobs, monkeypatch):
    """sta (tiles), vsa (cubes) and salad_sta (STA's tiles; its linear branch's RoPE tables permuted alike)
    pose their problem in a token order: the blocks run in it (the patch embedding written so, the rotary
    tables permuted, proj_out's output put back) and the methods gather nothing per layer; the model's
    output is the one they give gathering k and v in every layer."""
    (ordered, _, gathers, order), (raster, _, raster_gathers, no_order) = _ordered_and_raster(name, knobs, monkeypatch)
    assert order is not None and no_order is None
    assert gathers == 0 and raster_gathers == TINY["num_layers"]  # k and v: one gather_pair per layer
    torch.testing.assert_close(ordered, raster, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,knobs", ORDERED)
def test_training_in_the_token_order_gives_the_same_gradients(name, knobs, monkeypatch):
    (ordered, g_ordered, _, _), (raster, g_raster, _, _) = _ordered_and_raster(name, knobs, monkeypatch, train=True)
    torch.testing.assert_close(ordered, raster, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ordered, g_raster, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_token_order_without_a_shared_one_or_with_a_per_token_timestep():
    """salad (its sparse branch, topk, poses nothing in another order) keeps raster order; so does a
    forward with a per-token timestep (Wan 2.2 TI2V conditions tokens by position); restore removes the hooks."""
    model = _model()
    inputs = _inputs(frames=6, h=24, w=24)
    install_attention(model, "salad", sparsity=0.5)
    _run(model, inputs)
    assert attention_state(model).order is None
    install_attention(model, "sta", sparsity=0.5, tile=(2, 4, 4))
    _run(model, inputs)
    assert attention_state(model).order is not None
    n = 6 * 12 * 12
    hook = model._forward_pre_hooks[attention_state(model).hook.id]
    hook(model, (), dict(inputs, timestep=torch.full((1, n), 700.0)))  # as the model's forward would be called
    assert attention_state(model).order is None
    restore_attention(model)
    assert not model.patch_embedding._forward_hooks and not model.rope._forward_hooks and not model.proj_out._forward_hooks
