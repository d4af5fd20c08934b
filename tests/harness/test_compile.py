"""Every registered method inside a ``torch.compile(fullgraph=True)``'d Wan transformer block, compiled
cold (no eager call first, so the static-mask searches run under tracing), equals eager; the kernels'
registered operators have fake implementations that match their real outputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from salad_bench.harness.dit import _inputs  # noqa: E402
from salad_bench.harness.integrations.wan import install_attention, installed_methods, new_transformer  # noqa: E402
from salad_bench.harness.workloads import WAN_TINY as TINY  # noqa: E402
from salad_bench.harness.workloads import dit_workload  # noqa: E402
from salad_bench.methods import METHODS, Unsupported  # noqa: E402
from tests.harness._wan import assert_compiled_trains_like_eager  # noqa: E402

# grid (4, 16, 16) = 1,024 tokens: 8 x 16 tiles of 128 x 64, so 50% is reachable for every method
WL = dit_workload("t", {**TINY, "num_layers": 1}, (4, 32, 32), text_len=8)
CUDA_ONLY = {"full_cudnn", "full_flash_attn", "full_fa4", "full_flex", "full_sage"}


def _model(name: str):
    m = new_transformer(WL.model, dtype=torch.float32, seed=0)
    install_attention(m, name, sparsity=0.5)
    return m


def _inputs_for(model):
    return _inputs(WL, model.config, torch.device("cpu"), torch.float32, 0)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n not in CUDA_ONLY])
def test_method_compiles_fullgraph_cold_and_matches_eager(name):
    torch._dynamo.reset()
    ref_model = _model(name)
    inputs = _inputs_for(ref_model)
    try:
        with torch.no_grad():
            ref = ref_model(**inputs)[0]
    except Unsupported as exc:  # e.g. an SDPA backend this CPU build lacks
        pytest.skip(str(exc))
    model = _model(name)  # a fresh instance: nothing cached from the eager call
    for block in model.blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = model(**inputs)[0]
    compiled_density = [m.report().density for m in installed_methods(model)]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert compiled_density == [m.report().density for m in installed_methods(ref_model)]
    if name in ("topk", "sta", "svg", "salad", "salad_sta", "vsa", "sla", "sparge", "xattention", "sparse_lora"):
        assert min(compiled_density) < 1.0  # the sparse path ran, not a dense fallback


@pytest.mark.parametrize("name", ["topk", "salad"])
def test_inductor_compiles_a_block_and_trains_through_it(name):
    """The real compiler (inductor) on the CPU, forward and backward."""
    torch._dynamo.reset()
    model = _model(name).train().requires_grad_(True)
    inputs = _inputs_for(model)
    assert_compiled_trains_like_eager(model, _model(name).train().requires_grad_(True), inputs)


WARMUP_CASES = [("salad", {}), ("sta", {"dense_first_layers": 1, "dense_first_steps": 1}),
                ("salad_sta", {"sparse_knobs": (("dense_first_layers", 1),)})]


def _one_graph_per_phase(name, knobs, device, dtype, backend, tol):
    """Regional compilation as users deploy it: every block of a several-layer model compiled, two sampling
    steps, inference mode. The layers and steps share one graph per warm-up phase (dense or sparse), so a
    limit of two graphs holds (fullgraph makes a third a hard error), and each step equals eager."""
    from salad_bench.harness.integrations.wan import set_step

    wl = dit_workload("t3", {**TINY, "num_layers": 3}, (4, 32, 32), text_len=8)

    def model():
        m = new_transformer(wl.model, device=device, dtype=dtype, seed=0)
        install_attention(m, name, sparsity=0.5, num_steps=2, **knobs)
        return m

    def phases(model_):
        return [m.report().extra.get("dense_call", m.report().density == 1.0) for m in installed_methods(model_)]

    torch._dynamo.reset()
    ref_model, compiled = model(), model()
    for block in compiled.blocks:
        block.compile(fullgraph=True, backend=backend)
    inputs = _inputs(wl, compiled.config, torch.device(device), dtype, 0)
    for step in (0, 1):
        for m in (ref_model, compiled):
            set_step(m, step)
        with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=2):
            ref, out = ref_model(**inputs)[0], compiled(**inputs)[0]
        torch.testing.assert_close(out.float(), ref.float(), **tol)
        assert phases(compiled) == phases(ref_model)


@pytest.mark.parametrize("name,knobs", WARMUP_CASES)
def test_compiled_blocks_share_one_graph_per_warmup_phase_across_layers_and_steps(name, knobs):
    _one_graph_per_phase(name, knobs, "cpu", torch.float32, "aot_eager", dict(rtol=1e-4, atol=1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("name,knobs", WARMUP_CASES + [("topk", {})])
def test_compiled_blocks_share_one_graph_per_warmup_phase_on_the_gpu(name, knobs):
    """The same with inductor and the Triton operators (their host-side caches must not become guards)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _one_graph_per_phase(name, knobs, "cuda", torch.bfloat16, "inductor", dict(rtol=2e-2, atol=2e-2))


def test_operator_fakes_match_the_real_outputs():
    from salad_bench.kernels.layout import BlockLayout
    from salad_bench.kernels.selection import diagonal_blocks, topk_layout

    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    scores = torch.rand(1, 2, 3, 5)
    lay = topk_layout(scores, 2, 300, 128, 64, diagonal_blocks(300, 128, 64, "cpu"))
    assert isinstance(lay, BlockLayout)
    args = (q, k, v, lay.kv_idx, lay.kv_cnt, 128, 64, "torch", -1.0)
    torch.library.opcheck(torch.ops.salad_bench.block_sparse_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    assert torch.ops.salad_bench.block_sparse_attention(*args).transpose(1, 2).is_contiguous()  # as Triton writes it
    res = torch.randn(1, 300, 2, 64).transpose(1, 2)  # token-major: the output takes its strides
    torch.library.opcheck(torch.ops.salad_bench.block_sparse_attention_inference.default, (*args, res, None),
                          test_utils=("test_schema", "test_faketensor"))
    perm = torch.randperm(300)
    for extra in ((None, perm), (res, perm)):  # q read and the output written through a query index
        torch.library.opcheck(torch.ops.salad_bench.block_sparse_attention_inference.default, (*args, *extra),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.salad_bench.linear_attention.default, (q, k, v, None, None, "relu", 1e-6, "torch"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out = torch.ops.salad_bench.linear_attention(q, k, v, None, None, "relu", 1e-6, "torch")
    assert out.transpose(1, 2).is_contiguous()  # token-major on every backend, as the fake says


def test_dit_workload_compiled_rows_say_so(tmp_path):
    """``--compile``: both sides compiled, the rows say so, compile time apart from the latency."""
    from salad_bench.harness.cli import main
    from salad_bench.harness.results import read_jsonl

    out = tmp_path / "r"
    assert main(["--workloads", "dit:tiny", "--methods", "full,topk", "--sparsity", "0.5", "--compile", "--quick",
                 "--out", str(out)]) == 0
    rows = {r["method"]: r for r in read_jsonl(out / "rows.jsonl")}
    assert set(rows) == {"full", "topk"}
    for r in rows.values():
        assert r["status"] == "ok" and r["compiled"] is True and r["workload"] == "dit:tiny+compile"
        assert r["compile_s"] > 0 and r["ms"] > 0 and r["attn_split"].startswith("compiled forward minus")
        assert r["sampling_ms_est"] == pytest.approx(2 * 50 * r["ms"])
    assert rows["topk"]["speedup"] == pytest.approx(rows["full"]["ms"] / rows["topk"]["ms"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["topk", "salad", "sta"])
def test_compiled_block_on_the_gpu_uses_the_triton_operators(name):
    """On CUDA the methods call the Triton kernels through the registered operators."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch._dynamo.reset()
    wl = dit_workload("g", {**TINY, "num_layers": 1}, (4, 32, 32), text_len=8)
    mk = lambda: install_attention(m := new_transformer(wl.model, device="cuda", dtype=torch.bfloat16, seed=0),  # noqa: E731
                                   name, sparsity=0.5) and m
    ref_model, model = mk(), mk()
    inputs = _inputs(wl, model.config, torch.device("cuda"), torch.bfloat16, 0)
    for block in model.blocks:
        block.compile(fullgraph=True)
    with torch.no_grad():
        out, ref = model(**inputs)[0], ref_model(**inputs)[0]
    assert installed_methods(model)[0].report().backend == "triton"
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
