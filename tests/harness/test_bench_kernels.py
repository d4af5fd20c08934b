"""The kernel benchmark's headline summary: medians over interleaved rounds, ratios taken per round."""

from __future__ import annotations

from harness.bench_kernels import headline_targets


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
