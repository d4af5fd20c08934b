"""The hierarchical bootstrap, the learning-rate picks, the hypotheses' verdicts (from the config, on synthetic
study rows) and the committed runs still read."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from salad_bench.harness.quality.stats import (
    Cells,
    compare,
    hierarchical_bootstrap,
    hypothesis_rows,
    interval,
    load_cells,
    main,
    pick_lrs,
    point,
    summary_rows,
    verdict_of,
)
from salad_bench.harness.quality.study_config import load_config

REPO = Path(__file__).resolve().parents[2]


def _width(x: np.ndarray, draws: int = 2000) -> float:
    lo, hi = interval(hierarchical_bootstrap([x], draws)[:, 0])
    return hi - lo


def test_the_interval_shrinks_with_more_seeds_and_more_videos():
    rng = np.random.default_rng(0)
    seeds = lambda s, v: rng.normal(0, 1.0, (s, 1)) + rng.normal(0, 2.0, (s, v))  # noqa: E731
    assert np.mean([_width(seeds(8, 16)) for _ in range(5)]) < 0.7 * np.mean([_width(seeds(2, 16)) for _ in range(5)])
    videos = lambda v: rng.normal(0, 2.0, (3, v))  # noqa: E731  no seed effect: the videos set the width
    assert np.mean([_width(videos(64)) for _ in range(5)]) < 0.6 * np.mean([_width(videos(8)) for _ in range(5)])


def test_the_interval_covers_the_true_mean_at_about_the_nominal_rate():
    """Quick check on synthetic nested data (seed effect, then video noise): 95% intervals cover 0 about 95%
    of the time with 8 seeds. (With 3 seeds a percentile bootstrap of seeds is too narrow: docs/QUALITY.md.)"""
    rng = np.random.default_rng(1)
    hits = []
    for i in range(200):
        x = rng.normal(0, 1.0, (8, 1)) + rng.normal(0, 2.0, (8, 16))
        lo, hi = interval(hierarchical_bootstrap([x], 400, seed=i)[:, 0])
        hits.append(lo <= 0 <= hi)
    assert 0.88 <= np.mean(hits) <= 0.99, np.mean(hits)


def test_one_seed_is_the_videos_bootstrap_and_one_video_the_seeds():
    rng = np.random.default_rng(2)
    x = rng.normal(5, 1, (1, 24))
    d = hierarchical_bootstrap([x], 4000)[:, 0]
    assert d.std() == pytest.approx(x.std() / np.sqrt(24), rel=0.1)  # the plain bootstrap of a mean
    assert point(x) == pytest.approx(x.mean())
    fd = np.array([[1.0], [2.0], [3.0]])  # a set statistic per seed
    d = hierarchical_bootstrap([fd], 4000)[:, 0]
    assert set(np.round(d * 3).astype(int)) <= set(range(3, 10)) and d.std() > 0
    with pytest.raises(ValueError, match="videos"):
        hierarchical_bootstrap([np.zeros((2, 3)), np.zeros((2, 4))])


def test_comparisons_are_paired_by_seed_and_video():
    rng = np.random.default_rng(3)
    base = rng.normal(15, 4, (3, 24)) + rng.normal(0, 3, (3, 1))  # videos and seeds both vary a lot
    d = hierarchical_bootstrap([base + 1.0, base], 2000)
    assert np.allclose(d[:, 0] - d[:, 1], 1.0)  # a constant shift: no spread at all
    rows = lambda v: [{"train_seed": s, "psnr_per_video": list(v[s])} for s in range(3)]  # noqa: E731
    c = compare(rows(base + 1.0), rows(base), "psnr", "better", draws=500)
    assert c["estimate"] == pytest.approx(1.0) and c["lo"] == pytest.approx(1.0) and c["n_seeds"] == (3, 3)
    c = compare(rows(base + 1.0), rows(base), "psnr", "ratio", draws=500)
    assert c["estimate"] == pytest.approx((base.mean() + 1) / base.mean() - 1)
    lower = [{"train_seed": s, "val_loss_per_video": list(np.abs(base[s]))} for s in range(3)]
    assert compare(lower, lower, "val_loss", "better", draws=100)["estimate"] == 0.0
    assert compare(rows(base), lower, "psnr", "better") is None  # not measured on one side


def test_a_conjunction_of_parts():
    assert verdict_of(["held", "held"]) == "held"
    assert verdict_of(["held", "not held", "unresolved"]) == "not held"
    assert verdict_of(["held", "unresolved"]) == verdict_of(["held", "not tested"]) == "unresolved"
    assert verdict_of(["not tested"]) == "not tested"


# -- synthetic study rows --------------------------------------------------------------------------
STAMP = {"study": "syn", "sweep_steps": 10, "sweep_seed": 0, "budget_steps": 20, "study_seeds": [0, 1, 2]}


def _row(method, arm, s, loss, psnr, *, lr=1e-3, seed=0, steps=20, family="salad", sweep_sparsity=0.9):
    trained = arm != "as_is"
    return {"kind": "quality", "status": "ok", "method": method, "label": method, "arm": arm, "family": family,
            "sparsity_target": s, "train_lr": lr if trained else None, "train_seed": seed if trained else None,
            "train_steps_target": steps if trained else 0, "val_loss": float(np.mean(loss)), "density": 1 - s,
            "val_loss_per_video": list(loss), "psnr_per_video": list(psnr), "velocity_mse_per_video": list(loss / 10),
            "val_loss_band0_per_video": list(loss), "sweep_sparsity": sweep_sparsity, **STAMP}  # fmt: skip


def _study(salad_excess: float, gate_gap: float, rng) -> list[dict]:
    videos = rng.uniform(0.1, 0.2, 16)
    rows = []
    for seed in (0, 1, 2):
        jitter = 1 + rng.normal(0, 0.002)
        ctrl = videos * jitter
        rows.append(_row("full", "ft", 0.0, ctrl, np.full(16, 30.0), seed=seed, family="full", sweep_sparsity=0.0))
        rows.append(_row("salad", "ft", 0.9, ctrl * (1 + salad_excess), 20 + rng.normal(0, 0.01, 16), seed=seed))
        rows.append(_row("salad_static_gate", "ft", 0.9, ctrl * (1 + salad_excess + gate_gap), 20 - 10 * gate_gap
                         + rng.normal(0, 0.01, 16), seed=seed, family="ablation"))  # fmt: skip
    # sweeps (seed 0, 10 steps): salad's best rate is 1e-3; a final row at another rate must be left out
    rows.append(_row("salad", "ft", 0.9, videos * 1.5, np.zeros(16), lr=1e-3, steps=10))
    rows.append(_row("salad", "ft", 0.9, videos * 1.9, np.zeros(16), lr=1e-2, steps=10))
    rows.append(_row("salad", "ft", 0.9, videos * 9, np.zeros(16), lr=1e-2, seed=1))  # not the picked rate
    for m, fam in (("full", "full"), ("salad_static_gate", "ablation")):
        rows.append(_row(m, "ft", 0.0 if m == "full" else 0.9, videos, np.zeros(16), steps=10, family=fam,
                         sweep_sparsity=0.0 if m == "full" else 0.9))  # fmt: skip
    rows.append(_row("topk", "as_is", 0.9, videos * 3, np.full(16, 10.0), family="training_free"))
    return rows


def _config(tmp_path, hypotheses: str):
    p = tmp_path / "syn.toml"
    p.write_text(textwrap.dedent('''
        [study]
        name = "syn"
        [arms.ft]
        lrs = [1e-3, 1e-2]
        [[cells]]
        methods = ["salad"]
        sparsities = [0.9]
        arms = ["ft"]
    ''') + textwrap.dedent(hypotheses))  # fmt: skip
    return load_config(p)


HYP = '''
    [[hypotheses]]
    id = "parity"
    claim = "within 2%"
    method = "salad"
    versus = "@control"
    sparsities = [0.9]
    metrics = ["val_loss", "val_loss_band0"]
    comparison = "within"
    threshold = 0.02
    [[hypotheses]]
    id = "gate"
    claim = "gate"
    method = "salad"
    versus = "salad_static_gate"
    sparsities = [0.9]
    metrics = ["val_loss", "psnr"]
    comparison = "better"
    [[hypotheses]]
    id = "free"
    claim = "beats topk as it is"
    method = "salad"
    versus = "topk"
    sparsities = [0.9, 0.95]
    metrics = ["psnr"]
    comparison = "better"
    [[hypotheses]]
    id = "sq"
    claim = "sample quality"
    method = "salad"
    versus = "topk"
    sparsities = [0.9]
    metrics = ["classifier_accuracy"]
    comparison = "better"
'''


def _n(row):
    from salad_bench.harness.quality.stats import _normalise

    return _normalise(row)


def test_the_picked_rate_and_the_final_rows():
    rows = _study(0.01, 0.1, np.random.default_rng(0))
    assert pick_lrs([_n(r) for r in rows]) == {("salad", "ft"): 1e-3, ("full", "ft"): 1e-3,
                                                              ("salad_static_gate", "ft"): 1e-3}  # fmt: skip
    cells = Cells(rows)
    salad = cells.get("salad", "ft", 0.9)
    assert [r["train_seed"] for r in salad] == [0, 1, 2] and {r["train_lr"] for r in salad} == {1e-3}
    assert len(cells.control("ft")) == 3 and len(cells.get("topk", "ft", 0.9)) == 1  # training-free: as it is
    summ = {r["label"]: r for r in summary_rows(cells, draws=300)}
    assert summ["salad"]["n_seeds"] == 3 and summ["salad"]["val_loss_excess"] == pytest.approx(0.01, abs=2e-3)
    assert summ["salad"]["val_loss_excess_lo"] <= summ["salad"]["val_loss_excess"] <= summ["salad"]["val_loss_excess_hi"]
    assert "val_loss_band0_excess" in summ["salad"] and "val_loss_excess" not in summ["full"]


def test_the_hypotheses_come_from_the_config_with_three_verdicts(tmp_path):
    cfg = _config(tmp_path, HYP)
    v = {h["hypothesis"]: h for h in hypothesis_rows(Cells(_study(0.005, 0.1, np.random.default_rng(0))), cfg, draws=500)}
    assert v["parity"]["verdict"] == "held" and v["gate"]["verdict"] == "held"
    assert v["free"]["verdict"] == "unresolved"  # held at 90%; no rows at 95%
    assert [p["verdict"] for p in v["free"]["parts"]] == ["held", "not tested"] and "no rows" in v["free"]["evidence"]
    assert v["sq"]["verdict"] == "not tested"  # no classifier: not a number
    v = {h["hypothesis"]: h for h in hypothesis_rows(Cells(_study(0.05, -0.1, np.random.default_rng(0))), cfg, draws=500)}
    assert v["parity"]["verdict"] == "not held" and v["gate"]["verdict"] == "not held"
    v = {h["hypothesis"]: h for h in hypothesis_rows(Cells(_study(0.02, 0.0, np.random.default_rng(0))), cfg, draws=500)}
    assert v["parity"]["verdict"] == "unresolved"  # the interval straddles the threshold


def test_the_cli_reads_runs_and_writes_the_tables(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    run.mkdir()
    rows = _study(0.005, 0.1, np.random.default_rng(4))
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.toml"
    cfg.write_text(_config(tmp_path, HYP).text)
    assert main([str(run), "--config", str(cfg), "--draws", "300", "--out", str(tmp_path / "ci.md")]) == 0
    text = (tmp_path / "ci.md").read_text()
    assert "| salad | ft |" in text and "| parity |" in text and "held" in text
    assert main([str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


@pytest.mark.parametrize("runs", [["h200-2026-11-28-d"], ["h200-2026-11-28-d", "h200-2026-11-28-d-seed1"],
                                  ["h200-2026-11-28-a"]])  # fmt: skip
def test_the_committed_runs_still_read(runs):
    """Rows from before issue #25 (one recipe, the adapter arm, no seeds recorded): every run still loads."""
    paths = [REPO / "results" / "quality" / r for r in runs]
    if not all(p.exists() for p in paths):
        pytest.skip("committed runs not in this checkout")
    cells = load_cells(paths)
    salad = cells.get("salad", "adapter", 0.9)
    assert len(salad) == len(runs) and {r["train_seed"] for r in salad} == set(range(len(runs)))
    assert cells.get("topk", "adapter", 0.9)[0]["arm"] == "as_is"
    summ = {r["label"]: r for r in summary_rows(cells, draws=200)}
    if runs == ["h200-2026-11-28-a"]:  # measured before rows carried per-video values: means, no intervals
        assert summ["salad"]["psnr"] == pytest.approx(15.07, abs=0.01) and "psnr_lo" not in summ["salad"]
    else:
        assert summ["salad"]["psnr_lo"] < summ["salad"]["psnr"] < summ["salad"]["psnr_hi"]
    assert main([str(p) for p in paths] + ["--draws", "200"]) == 0
