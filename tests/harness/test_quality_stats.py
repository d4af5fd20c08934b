"""Paired bootstrap intervals and the hypothesis verdicts on synthetic study rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from salad_bench.harness.quality.stats import bootstrap, compare, hypotheses, load_study, main, summarize


def _rows(rng, shift_nogate=1.0, loss_rel=0.01):
    base = rng.normal(15, 4, size=24)  # videos differ a lot; methods differ by a constant per video
    full_loss = rng.uniform(0.1, 0.2, size=16)
    def row(m, psnr, rel, family_steps=200):
        return {"method": m, "kind": "quality", "status": "ok", "sparsity_target": 0.9, "density": 0.1,
                "train_steps": family_steps, "psnr_per_video": list(psnr), "ssim_per_video": list(np.full(24, 0.5)),
                "val_loss_per_video": list(full_loss * (1 + rel))}
    rows = {
        "full": {"method": "full", "kind": "quality", "status": "ok", "sparsity_target": 0.0, "density": 1.0,
                 "psnr_per_video": [None] * 24, "ssim_per_video": [1.0] * 24, "val_loss_per_video": list(full_loss)},
        "salad": row("salad", base + 2.0, loss_rel),
        "salad_no_gate": row("salad_no_gate", base + 2.0 - shift_nogate, 0.3),
        "salad_static_gate": row("salad_static_gate", base + 1.5, 0.3),
        "salad_no_linear": row("salad_no_linear", base - 5.0, 1.0, 0),
        "sparse_lora": row("sparse_lora", base + 2.0 + rng.normal(0, 0.01, 24), 0.3),
        "topk": row("topk", base - 5.0, 1.2, 0),
        "radial": {**row("radial", base + 9.0, 0.03, 0), "density": 0.69},  # cannot reach 90%: left out
    }
    return rows


def test_paired_difference_is_tight_when_videos_vary():
    rows = _rows(np.random.default_rng(0))
    (c,) = compare(rows, "salad", ["salad_no_gate"], draws=2000)
    assert c["psnr_diff"] == pytest.approx(1.0)
    assert c["ci"][0] == pytest.approx(1.0, abs=1e-9) and c["p_above_zero"] == 1.0  # a constant shift: no spread
    # unpaired, the per-method intervals overlap widely (video spread ~4 dB)
    s = {r["method"]: r for r in summarize(rows, draws=2000)}
    assert s["salad"]["psnr_ci"][0] < s["salad_no_gate"]["psnr_ci"][1]
    assert s["salad"]["val_loss_rel"] == pytest.approx(0.01) and "psnr" not in s["full"]


def test_hypotheses_verdicts():
    rows = _rows(np.random.default_rng(1))
    v = {h["claim"].split(" ", 1)[1]: h["verdict"] for h in hypotheses(rows, draws=2000)}
    assert v["within 2% of full's validation loss"] == "held"
    assert v["higher PSNR than every training-free method"] == "held"
    ev = {h["claim"].split(" ", 1)[1]: h["evidence"] for h in hypotheses(rows, draws=500)}
    assert "radial (density 0.690)" in ev["higher PSNR than every training-free method"]
    assert v["higher PSNR than sparse_lora"] == "not held"  # equal up to noise
    assert v["the gate matters (vs salad_no_gate, salad_static_gate)"] == "held"
    assert v["the linear branch matters (vs salad_no_linear)"] == "held"
    rows = _rows(np.random.default_rng(1), shift_nogate=0.0, loss_rel=0.05)
    v = {h["claim"].split(" ", 1)[1]: h["verdict"] for h in hypotheses(rows, draws=2000)}
    assert v["within 2% of full's validation loss"] == "not held"
    assert v["the gate matters (vs salad_no_gate, salad_static_gate)"] == "not held"


def test_bootstrap_resamples_all_methods_together():
    vals = np.arange(10.0)[None].repeat(2, 0)
    draws = bootstrap(vals, lambda x: x[0].mean() - x[1].mean(), draws=50)
    assert np.all(draws == 0)


def test_cli_reads_runs_and_refuses_rows_without_per_video_values(tmp_path, capsys):
    rows = _rows(np.random.default_rng(2))
    run = tmp_path / "run"
    run.mkdir()
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    assert set(load_study([run], 0.9)) == set(rows)
    assert main([str(run), "--draws", "500", "--out", str(tmp_path / "ci.md")]) == 0
    text = (tmp_path / "ci.md").read_text()
    assert "| salad |" in text and "| claim | verdict |" in text
    old = dict(rows["topk"])
    del old["psnr_per_video"]
    (run / "rows.jsonl").write_text(json.dumps(old) + "\n")
    assert main([str(run)]) == 2
    assert "per-video values" in capsys.readouterr().err
