"""``dit:`` workloads: presets, rows, the attention split, resume, skipped/error cells (CPU, dit:tiny)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from salad_bench.harness import dit  # noqa: E402
from salad_bench.harness.dit import DIT_WORKLOADS, get_dit_workload, run_dit_workload  # noqa: E402
from salad_bench.harness.results import RowWriter, read_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = dict(device="cpu", dtype=torch.float32, warmup_ms=1.0, rep_ms=5.0, attn_reps=2)
TOPK_SMALL = {"block_q": 32, "block_k": 32}


def _params(cfg) -> int:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return sum(p.numel() for p in WanTransformer3DModel(**cfg).parameters())


def test_presets_match_the_reference():
    w = get_dit_workload("dit:wan2.1-1.3b-480p")
    assert w.grid == (21, 30, 52) and w.n == 32_760 and w.text_len == 512 and w.model["text_dim"] == 4096
    assert _params(w.model) == 1_418_996_800  # REFERENCE.md section 1
    w = get_dit_workload("dit:wan2.1-1.3b-720p")
    assert w.grid == (21, 45, 80) and w.n == 75_600
    w = get_dit_workload("dit:wan2.1-14b-720p")
    assert (w.heads, w.head_dim, w.model["num_layers"], w.model["ffn_dim"]) == (40, 128, 40, 13824)
    assert 14.0e9 < _params(w.model) < 14.5e9
    assert set(DIT_WORKLOADS) >= {"dit:tiny"}
    # one registry: each whole-model preset is the attention workload of the same name, plus its model
    from salad_bench.harness.workloads import get_workload

    for name, w in DIT_WORKLOADS.items():
        a = get_workload(name.removeprefix("dit:"))
        assert (a.grid, a.heads, a.head_dim, a.layers) == (w.grid, w.heads, w.head_dim, w.model["num_layers"])
    with pytest.raises(KeyError, match="Did you mean 'dit:wan2.1-1.3b-480p'"):
        get_dit_workload("dit:wan2.1-1.3b-480")


def test_refuses_full_size_presets_on_the_cpu(tmp_path):
    with pytest.raises(ValueError, match="too large for a CPU run"):
        run_dit_workload(
            "dit:wan2.1-1.3b-480p",
            ["full"],
            [0.9],
            writer=RowWriter(tmp_path / "r"),
            device="cpu",
            dtype=torch.bfloat16,
        )


def test_rows_for_dense_and_sparse_methods(tmp_path):
    writer = RowWriter(tmp_path / "run")
    seen = []
    run_dit_workload(
        "dit:tiny", ["full", "topk", "salad"], [0.5], writer=writer, progress=seen.append,
        knobs={"topk": TOPK_SMALL, "salad": {"sparse_knobs": (("block_q", 32), ("block_k", 32))}}, **FAST,
    )  # fmt: skip
    rows = read_jsonl(writer.path)
    assert [r["method"] for r in rows] == ["full", "topk", "salad"] and len(seen) == 3
    full, topk, salad = rows
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["kind"] == "dit" and r["workload"] == "dit:tiny" and r["grid"] == [3, 8, 8] and r["N"] == 192
        assert r["baseline_method"] == "full" and r["baseline_backend"] == "default" and r["baseline_ms"] > 0
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert 0 < r["attn_ms"] < r["ms"] and r["rest_ms"] == pytest.approx(r["ms"] - r["attn_ms"])
        assert r["attn_share"] == pytest.approx(r["attn_ms"] / r["ms"])
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"])
        assert r["rest_ms_stub"] > 0 and r["output_finite"] is True
        assert r["layers"] == 2 and r["H"] == 2 and r["D"] == 64 and r["step"] == 25
        assert json.loads(r["config"])["sparsity"] == r["sparsity_target"]
    assert full["sparsity_target"] == 0.0 and full["density"] == 1.0 and full["speedup"] == 1.0
    assert topk["sparsity_target"] == 0.5 and topk["density"] < 1.0 and topk["backend"] == "torch"
    assert salad["density"] < 1.0 and salad["family"] == "salad"
    # SALAD's own work (linear branch, projection, gate, merge) apart from its sparse branch's calls
    assert 0 < salad["attn_extra_ms"] < salad["attn_ms"] and topk["attn_extra_ms"] is None
    assert topk["flops_attn_executed"] < topk["flops_attn_dense"]
    assert not any(r["token_order"] for r in rows)  # none of these poses its problem in another order


def test_rows_say_when_the_blocks_ran_in_the_methods_token_order(tmp_path):
    writer = RowWriter(tmp_path / "run")
    run_dit_workload("dit:tiny", ["full", "sta", "vsa"], [0.5], writer=writer, knobs={"sta": {"tile": (1, 4, 4)}}, **FAST)
    rows = {r["method"]: r for r in read_jsonl(writer.path)}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["sta"]["token_order"] is True and rows["vsa"]["token_order"] is True
    assert rows["full"]["token_order"] is False


def test_resume_skips_done_cells(tmp_path):
    writer = RowWriter(tmp_path / "run")
    run_dit_workload("dit:tiny", ["full", "topk"], [0.5], writer=writer, knobs={"topk": TOPK_SMALL}, **FAST)
    again = RowWriter(tmp_path / "run", resume=True)
    run_dit_workload("dit:tiny", ["full", "topk"], [0.5, 0.75], writer=again, knobs={"topk": TOPK_SMALL}, **FAST)
    rows = read_jsonl(again.path)
    assert [(r["method"], r["sparsity_target"]) for r in rows] == [("full", 0.0), ("topk", 0.5), ("topk", 0.75)]


def test_unsupported_is_skipped_and_failures_are_error_rows(tmp_path):
    writer = RowWriter(tmp_path / "run")
    run_dit_workload("dit:tiny", ["full_cudnn", "topk"], [0.5], writer=writer, knobs={"topk": {"block_q": 48}}, **FAST)
    cudnn, topk = read_jsonl(writer.path)
    assert cudnn["status"] == "skipped" and "CUDA" in cudnn["reason"]
    assert topk["status"] == "error" and "block_q" in topk["reason"]


def test_a_model_that_does_not_fit_gives_skipped_rows(tmp_path, monkeypatch):
    import salad_bench.harness.integrations.wan as wan

    def boom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")

    monkeypatch.setattr(wan, "new_transformer", boom)
    writer = RowWriter(tmp_path / "run")
    run_dit_workload("dit:tiny", ["full", "topk"], [0.5], writer=writer, **FAST)
    rows = read_jsonl(writer.path)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "out of memory building dit:tiny" in rows[0]["reason"] and "GiB" in rows[0]["reason"]


def test_real_weights_are_loaded_and_named(tmp_path):
    from salad_bench.harness.integrations.wan import new_transformer

    new_transformer(get_dit_workload("dit:tiny").model, seed=5).save_pretrained(tmp_path / "w" / "transformer")
    writer = RowWriter(tmp_path / "run")
    run_dit_workload("dit:tiny", ["full"], [0.5], writer=writer, weights=str(tmp_path / "w"), **FAST)
    (row,) = read_jsonl(writer.path)
    assert row["status"] == "ok" and row["workload"] == "dit:tiny[weights=w]" and row["weights"].endswith("w")


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = dit.main(
        ["--workload", "dit:tiny", "--methods", "full,topk", "--sparsity", "0.5", "--out", str(out), "--device", "cpu",
         "--dtype", "fp32", "--warmup-ms", "1", "--rep-ms", "5", "--attn-reps", "1", "--knobs", json.dumps({"topk": TOPK_SMALL})]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "speedup" in text and "rows:" in text
    assert len(read_jsonl(out / "rows.jsonl")) == 2
    assert dit.main(["--list"]) == 0


@pytest.mark.gpu
def test_tiny_on_cuda_bf16(tmp_path):
    writer = RowWriter(tmp_path / "run", device="cuda")
    run_dit_workload("dit:tiny", ["full", "topk", "salad"], [0.5], writer=writer, device="cuda", dtype=torch.bfloat16)
    rows = read_jsonl(writer.path)
    assert all(r["status"] in ("ok", "skipped") for r in rows), [r["reason"] for r in rows]
    assert rows[0]["status"] == "ok" and rows[0]["baseline_backend"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(
        r["timer_attn"].startswith("cuda-events") and r["peak_mem_gib"] > 0 and 0 < r["attn_ms"] < r["ms"] for r in ok
    )


def test_scale_blocks_arithmetic():
    got = {"ms": 10.0, "ms_p20": 9.0, "ms_p80": 11.0, "attn_ms": 4.0, "flops_attn_executed": 6.0, "peak_mem_gib": 1.5}
    out = dit.scale_blocks(got, 2.0, k=2, depth=8)
    assert out["ms"] == 2.0 + 4 * 8.0 and out["ms_p20"] == 2.0 + 4 * 7.0 and out["ms_measured"] == 10.0
    assert out["attn_ms"] == 16.0 and out["rest_ms"] == out["ms"] - 16.0 and out["flops_attn_executed"] == 24.0
    assert out["peak_mem_gib"] is None and out["peak_mem_gib_measured"] == 1.5  # a K-block model's memory is not L's
    dense = {"ms": 42.0, "attn_ms": 8.0, "flops_attn_executed": 80.0}  # already whole-model: 5 ms a block
    warm = dit.scale_blocks(got, 2.0, k=2, depth=8, dense=dense, dense_layers=2)
    assert warm["ms"] == pytest.approx(2.0 + 3 * 8.0 + 2 * 5.0)  # 6 sparse layers at 4 ms, 2 dense at 5 ms
    assert warm["attn_ms"] == pytest.approx(3 * 4.0 + 2 * 1.0) and warm["flops_attn_executed"] == pytest.approx(18 + 20)


def test_a_model_of_fewer_blocks_stands_for_the_whole(tmp_path):
    writer = RowWriter(tmp_path / "run")
    run_dit_workload("dit:tiny", ["full", "topk", "svg"], [0.5], writer=writer, blocks=1,
                     knobs={"topk": TOPK_SMALL, "svg": {"dense_first_layers": 1}}, **FAST)
    full, topk, svg = read_jsonl(writer.path)
    for r in (full, topk, svg):
        assert r["status"] == "ok", r["reason"]
        assert r["workload"] == "dit:tiny[blocks=1/2]" and r["layers"] == 2 and r["blocks_measured"] == 1
        assert "1 of 2 blocks timed" in r["extrapolated"] and r["peak_mem_gib"] is None
        assert r["speedup"] == pytest.approx(full["ms"] / r["ms"])
    nb = full["no_blocks_ms"]
    assert 0 < nb < full["ms_measured"]
    for r in (full, topk):  # no warm-up layers: the one block counts twice
        assert r["ms"] == pytest.approx(nb + 2 * (r["ms_measured"] - nb))
    # svg keeps layer 0 dense: its one timed block is layer 1 (sparse), layer 0 is the dense block's time
    assert svg["density"] < 1.0
    assert svg["ms"] == pytest.approx(nb + (svg["ms_measured"] - nb) + (full["ms"] - nb) / 2)


def test_bad_block_counts_are_refused(tmp_path):
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="whole number of transformer blocks"):
            run_dit_workload("dit:tiny", ["full"], [0.5], writer=RowWriter(tmp_path / "r"), blocks=bad, **FAST)
    # every block timed is the whole model: no extrapolation, the plain workload name
    run_dit_workload("dit:tiny", ["full"], [0.5], writer=(w := RowWriter(tmp_path / "w")), blocks=2, **FAST)
    assert [(r["workload"], r.get("blocks_measured")) for r in read_jsonl(w.path)] == [("dit:tiny", None)]
    # more warm-up layers than the timed blocks can stand beside: that cell is an error row saying so
    run_dit_workload("dit:tiny", ["svg"], [0.5], writer=(x := RowWriter(tmp_path / "x")), blocks=1,
                     knobs={"svg": {"dense_first_layers": 2}}, **FAST)
    (row,) = read_jsonl(x.path)
    assert row["status"] == "error" and "keeps its first 2 of 2 layers dense" in row["reason"] and "--dit-blocks" in row["reason"]


def test_the_stub_keeps_the_q_and_k_work_when_compiled():
    """The compiled split's stub must read q and k: a stub that returns ``v`` lets the compiler drop the
    q and k projections of this layer as dead code."""
    from torch._inductor.utils import run_and_get_code

    stub = dit._stub_factory(num_heads=2, head_dim=8)
    wq, wk, wv = (torch.randn(16, 16) for _ in range(3))

    def layer(x):
        q, k, v = ((x @ w).unflatten(-1, (2, 8)).transpose(1, 2) for w in (wq, wk, wv))
        return stub.attend(q, k, v, None).transpose(1, 2).flatten(2)

    x = torch.randn(1, 24, 16)
    out, codes = run_and_get_code(torch.compile(layer, fullgraph=True), x)
    assert out.shape == (1, 24, 16)
    code = "\n".join(codes)
    assert code.count("extern_kernels.mm(") + code.count("extern_kernels.bmm(") >= 3, code
    assert "zero_cost_attention" in code
