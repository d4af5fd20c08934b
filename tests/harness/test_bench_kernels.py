"""The kernel benchmark's headline summary: medians over interleaved rounds, ratios taken per round."""

from __future__ import annotations

import pytest

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


def test_variants_filter_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown variants.*nope"):
        bk.variants_section(None, [0.1], only=["ws", "nope"])


def test_fused_linear_cost_is_the_per_round_difference():
    rows = _rows([{"triton_block_sparse": 1.3, "fused_sparse_linear_triton": 1.42, "linear_state_triton": 0.09},
                  {"triton_block_sparse": 1.4, "fused_sparse_linear_triton": 1.53, "linear_state_triton": 0.08}])
    line = headline_targets(rows)[1]
    assert "fused into the sparse forward 0.125 [0.120-0.130] ms" in line
    assert "K/V pass 0.085 [0.080-0.090] ms" in line
