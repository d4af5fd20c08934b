"""The kernel benchmark's headline summary: medians over interleaved rounds, ratios taken per round."""

from __future__ import annotations

import pytest
import torch

from salad_bench.harness import bench_kernels as bk
from salad_bench.harness.bench_kernels import headline_targets


def _rows(times):
    rows = []
    for r, per in enumerate(times):
        for method, ms in per.items():
            rows.append({"method": method, "variant": f"headline_r{r}", "status": "ok", "ms": ms, "round": r, "pass": "fwd"})
    return rows


def test_ratios_are_taken_per_round_then_the_median():
    # round 1 runs slow for everything (a hot card): per-round ratios stay 1.5, 1.5, 1.2
    times = [
        {"sdpa_cudnn": 12.0, "triton_block_sparse": 1.2, "flex_block_sparse": 1.8, "linear_triton": 0.2, "select_topk_triton": 0.09},
        {"sdpa_cudnn": 13.2, "triton_block_sparse": 1.32, "flex_block_sparse": 1.98, "linear_triton": 0.22, "select_topk_triton": 0.1},
        {"sdpa_cudnn": 12.0, "triton_block_sparse": 1.5, "flex_block_sparse": 1.8, "linear_triton": 0.18, "select_topk_triton": 0.08},
    ]
    lines = headline_targets(_rows(times))
    assert "3 interleaved rounds" in lines[0]
    assert "fwd d=0.10 1.320 [1.200-1.500] ms" in lines[0]
    assert "x cuDNN 10.00 [8.00-10.00]" in lines[0]
    assert "x Flex same mask 1.50 [1.20-1.50]" in lines[0]
    assert "linear fwd 0.200 [0.180-0.220] ms" in lines[1]
    assert "selection top-k 0.090 [0.080-0.100] ms" in lines[1]


def test_no_headline_rows_no_lines_and_failed_rows_ignored():
    assert headline_targets([{"method": "triton_block_sparse", "variant": "", "status": "ok", "ms": 1.0}]) == []
    rows = _rows([{"sdpa_cudnn": 12.0, "triton_block_sparse": 1.2, "flex_block_sparse": 1.8}])
    rows.append({"method": "linear_triton", "variant": "headline_r0", "status": "error", "ms": None, "round": 0})
    lines = headline_targets(rows)
    assert "x Flex same mask 1.50" in lines[0] and "linear fwd - ms" in lines[1]


def test_report_keeps_every_round_and_takes_ratios_per_round():
    """Rounds are cells of their own (resume and the report's latest-row rule keep them all), per run;
    the headline table gives medians and per-round speedups."""
    import pandas as pd

    from salad_bench.harness.report import kernel_headline_tables, kernel_tables
    from salad_bench.harness.results import latest_per_cell

    times = [
        {"sdpa_cudnn": 12.0, "triton_block_sparse": 1.2, "flex_block_sparse": 1.8},
        {"sdpa_cudnn": 13.2, "triton_block_sparse": 1.32, "flex_block_sparse": 1.98},
        {"sdpa_cudnn": 12.0, "triton_block_sparse": 1.5, "flex_block_sparse": 1.8},
    ]
    rows = []
    for run in ("a", "b"):
        for r in _rows(times):
            rows.append({**r, "kind": "kernel", "card": "GPU X", "run_id": run, "git_sha": "abc", "git_dirty": False,
                         "config_hash": "same", "dtype": "bfloat16", "workload": "w", "sparsity_target": 0.9})
    rows.append({"kind": "kernel", "method": "triton_block_sparse", "variant": "", "status": "ok", "ms": 1.0,
                 "pass": "fwd", "card": "GPU X", "dtype": "bfloat16", "run_id": "a", "git_sha": "abc"})
    df = latest_per_cell(pd.DataFrame(rows))
    assert len(df) == 2 * 9 + 1
    tables = kernel_headline_tables(df)
    assert [t.title for t in tables] == ["headline · GPU X · a · abc", "headline · GPU X · b · abc"]
    ours = [c for c in tables[0].cells if c[0] == "triton_block_sparse"][0]
    assert ours[1:5] == ["1.32", "1.20", "1.50", "3"] and ours[5:] == ["10.00", "1.50"]
    # the ordinary kernel table holds the row outside the rounds only
    assert sum(len(t.cells) for t in kernel_tables(df)) == 1


def test_inputs_and_headline_rows_name_the_kernel_path_and_meet_the_gate_target(tmp_path, monkeypatch):
    """A CPU run of the inputs and headline sections with the timer faked: one forward row per input kind
    and round (no softmax modes any more), every row naming ``kernel_path``, and the GPU gate's kernel
    target matching the new rows."""
    import json

    from salad_bench.harness import ci_gpu, workloads
    from salad_bench.harness.results import read_jsonl
    from salad_bench.harness.timing import Timing

    monkeypatch.setattr(bk, "measure", lambda fn, device, rep_ms=None: Timing(1.0, 0.9, 1.1, 3, "fake"))
    real_make_qkv = workloads.make_qkv

    def make_qkv(wl, *, kind="video", **kw):
        if kind == "wan":
            raise ImportError("no diffusers in this test")
        return real_make_qkv(wl, kind=kind, **kw)

    monkeypatch.setattr(workloads, "make_qkv", make_qkv)
    run = tmp_path / "run"
    run.mkdir()
    (run / "rows.jsonl").write_text("")
    assert bk.main(["--out", str(run / "kernels"), "--sections", "inputs,headline", "--n", "256", "--heads", "1",
                    "--dtype", "fp32", "--rounds", "2", "--quick"]) == 0
    rows = read_jsonl(run / "kernels" / "rows.jsonl")
    ours = [r for r in rows if r["method"] == "triton_block_sparse" and r["variant"].startswith("inputs_")]
    assert sorted(r["variant"] for r in ours if r["variant"].endswith("_r0")) == sorted(
        f"inputs_{k}_r0" for k in ("random", "video", "video_model_layout", "spread5", "spread20", "spread80", "spread300"))
    (tm,) = [r for r in ours if r["variant"] == "inputs_video_model_layout_r0"]
    (cm,) = [r for r in ours if r["variant"] == "inputs_video_r0"]
    assert tm["density"] == cm["density"] and tm["logit_spread"] == cm["logit_spread"]
    assert all("softmax_mode" not in r and "kernel_options" not in r for r in rows)
    paths = {json.loads(r["kernel_path"])["block_sparse"] for r in rows}
    assert paths == {"triton interpreter, online-softmax, TMA K/V loads"}
    assert {r["method"] for r in rows if r["variant"] == "headline_r1"} == {
        "sdpa_cudnn", "triton_block_sparse", "flex_block_sparse", "linear_triton", "select_topk_triton"}
    (res,) = [t for t in ci_gpu.evaluate_targets(run) if t["name"].startswith("block-sparse forward")]
    assert res["measured"] == 1.0 and "video 1.000" in res["detail"]


def test_model_layout_is_a_token_major_view_of_the_same_values():
    x = torch.randn(2, 3, 5, 4)
    y = bk.model_layout(x)
    assert torch.equal(x, y) and not y.is_contiguous() and y.transpose(1, 2).is_contiguous()


def test_resume_hands_back_done_kernel_cells_and_retries_errors(tmp_path, monkeypatch, capsys):
    """A resumed kernel benchmark measures again only the cells that failed; its table still holds every
    cell, the done ones read back."""
    from salad_bench.harness.results import read_jsonl
    from salad_bench.harness.timing import Timing

    timed = []

    def fake(fn, device, rep_ms=None):
        timed.append(fn)
        return Timing(1.0, 0.9, 1.1, 3, "fake")

    def flex_like(q, k, v):  # a dense backend whose forward runs and whose autograd fails, as on some cards
        if q.requires_grad:
            raise RuntimeError("no autograd on this backend")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(bk, "measure", fake)
    monkeypatch.setattr("salad_bench.kernels.flex.flex_dense_attention", flex_like)
    args = ["--out", str(tmp_path / "k"), "--sections", "dense", "--n", "128", "--heads", "1", "--dtype", "fp32",
            "--quick"]
    assert bk.main(args) == 0
    first = read_jsonl(tmp_path / "k" / "rows.jsonl")
    assert {r["status"] for r in first} == {"ok", "skipped", "error"}
    n_timed = len(timed)
    capsys.readouterr()
    assert bk.main([*args, "--resume"]) == 0
    rows = read_jsonl(tmp_path / "k" / "rows.jsonl")
    again = rows[len(first):]
    assert again and [r["method"] for r in again] == [r["method"] for r in first if r["status"] == "error"]
    assert {r["status"] for r in again} == {"error"} and len(timed) == n_timed  # nothing ok timed twice
    table = capsys.readouterr().out.split("| method |", 1)[1]
    assert table.count("\n| ") == len(first)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA reports")
def test_cuda_only_baselines_are_skipped_rows_without_cuda(tmp_path):
    """The cuDNN baseline and the CUDA-graph replays become ``skipped`` rows saying why, not errors."""
    from salad_bench.harness.results import read_jsonl
    from salad_bench.kernels.errors import Unsupported

    x = torch.randn(1, 1, 64, 64)
    with pytest.raises(Unsupported, match="cuDNN backend needs a CUDA device"):
        bk.sdpa_cudnn(x, x, x)
    with pytest.raises(Unsupported, match="CUDA graphs need a CUDA device"):
        bk.cuda_graph(lambda: None)
    assert bk.main(["--out", str(tmp_path / "k"), "--sections", "selection", "--n", "256", "--heads", "1",
                    "--dtype", "fp32", "--quick"]) == 0
    graphs = [r for r in read_jsonl(tmp_path / "k" / "rows.jsonl") if r.get("variant") == "cuda_graph"]
    assert graphs and all(r["status"] == "skipped" and "need a CUDA device" in r["reason"] for r in graphs)
