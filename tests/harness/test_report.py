"""Tables (golden files), figures and the report CLI, all from a fixed synthetic set of rows.

Regenerate the golden files after an intended change of layout: ``UPDATE_GOLDEN=1 pytest tests/harness/test_report.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from salad_bench.harness import plots, report

GOLDEN = Path(__file__).parent / "golden"
CARD = "NVIDIA H200"
PROV = {
    "git_sha": "7f466b1aaaaabbbbccccddddeeeeffff00001111",
    "torch": "2.11.0+cu130",
    "triton": "3.5.0",
    "cudnn": 91900,
    "date": "2026-11-28T12:00:00+00:00",
}
SHAPE = {
    "workload": "wan_480p",
    "B": 1,
    "H": 12,
    "N": 32760,
    "D": 128,
    "grid": [21, 30, 52],
    "dtype": "bf16",
    "pass": "fwd",
}
BASE = {"baseline_method": "full_cudnn", "baseline_ms": 11.54, "fa2_ms": 18.53, "reps": 20, "timer": "do_bench"}
LINEAR = {"flops_linear": 2.0e11, "flops_projection": 2.6e11, "flops_gate": 1.0e7}


def _att(method: str, family: str, target: float, density: float, ms: float, rel_l2: float, **extra) -> dict:
    dense = 4.0 * 12 * 32760**2 * 128
    row = {
        "kind": "attention", "method": method, "family": family, "sparsity_target": target, "status": "ok", "card": CARD,
        **SHAPE, **PROV, **BASE, "density": density, "sparsity": 1 - density, "ms": ms, "speedup": 11.54 / ms,
        "speedup_vs_fa2": 18.53 / ms, "rel_l2": rel_l2, "flops_dense": dense, "flops_attention": dense * density,
        "tflops_dense_equiv": dense / ms / 1e9, "tflops_executed": dense * density / ms / 1e9,
    }  # fmt: skip
    row.update(extra)
    return row


def synthetic_rows() -> pd.DataFrame:
    """Every kind of row once: attention (two workloads), quality, kernel, dit, skipped, error."""
    small = {"workload": "wan_small", "N": 8190, "grid": [5, 39, 42], "baseline_ms": 0.9, "fa2_ms": 1.4}
    rows = [
        _att("full_cudnn", "full", 0.0, 1.0, 11.54, 0.0),
        _att("full_flash", "full", 0.0, 1.0, 18.53, 0.0),
        _att("topk", "training_free", 0.5, 0.5, 6.1, 0.021, select_ms=0.12),
        _att("topk", "training_free", 0.9, 0.1, 1.62, 0.094, select_ms=0.12),
        _att("salad", "salad", 0.5, 0.5, 6.9, 0.011, select_ms=0.12, psnr=31.2, **LINEAR),
        _att("salad", "salad", 0.9, 0.1, 2.31, 0.043, select_ms=0.12, psnr=27.5, **LINEAR),
        _att("salad_no_gate", "ablation", 0.9, 0.1, 2.29, 0.051, select_ms=0.12, psnr=26.9, **LINEAR),
        _att("salad_no_rope", "ablation", 0.85, 0.15, 2.70, 0.040, select_ms=0.12, **LINEAR),
        _att("salad_no_rope", "ablation", 0.5, 0.5, 6.80, 0.012, select_ms=0.12, **LINEAR),
        _att("topk", "training_free", 0.9, 0.1, 0.40, 0.094, **small, speedup=0.9 / 0.40, speedup_vs_fa2=1.4 / 0.40),
        {"kind": "quality", "method": "topk", "family": "training_free", "sparsity_target": 0.9, "status": "ok",
         "card": CARD, "workload": "wan_480p_video", "psnr": 24.1, "ssim": 0.81, "lpips": 0.152,
         "vbench_subject_consistency": 0.953, **PROV},
        {"kind": "kernel", "method": "block_sparse_triton", "backend": "triton", "status": "ok", "card": CARD,
         **SHAPE, **PROV, **BASE, "density": 0.1, "ms": 1.62, "ms_p20": 1.60, "ms_p80": 1.65,
         "tflops_executed": 404.0, "tflops_dense_equiv": 4070.0, "mfu": 0.408, "speedup": 7.12, "sparsity_target": 0.9},
        {"kind": "dit", "method": "full", "family": "full", "sparsity_target": 0.0, "status": "ok", "card": CARD,
         "workload": "wan2.1_1.3b_480p", "dtype": "bf16", **PROV, "ms": 1180.0, "attn_ms": 420.0, "speedup": 1.0,
         "baseline_method": "full", "baseline_backend": "cudnn", "baseline_ms": 1180.0},
        {"kind": "dit", "method": "salad", "family": "salad", "sparsity_target": 0.9, "sparsity": 0.9, "status": "ok",
         "card": CARD, "workload": "wan2.1_1.3b_480p", "dtype": "bf16", **PROV, "ms": 840.0, "attn_ms": 80.0,
         "speedup": 1180.0 / 840.0, "attn_speedup": 420.0 / 80.0, "baseline_method": "full", "baseline_backend": "cudnn", "baseline_ms": 1180.0},
        {"kind": "attention", "method": "full_flash_attn", "family": "full", "sparsity_target": 0.0, "status": "skipped",
         "card": CARD, **SHAPE, "reason": "the flash_attn package is not installed (pip install flash-attn)"},
        {"kind": "attention", "method": "sta", "family": "training_free", "sparsity_target": 0.9, "status": "error",
         "card": CARD, **SHAPE, "reason": "RuntimeError: CUDA out of memory | tried to allocate 2 GiB"},
    ]  # fmt: skip
    return pd.DataFrame(rows)


# -- golden tables -------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["main", "ablation", "quality", "kernel", "dit", "skipped"])
@pytest.mark.parametrize("ext", ["md", "tex"])
def test_table_matches_golden(stem: str, ext: str) -> None:
    tables = report.build_tables(synthetic_rows())[stem]
    text = (report.to_markdown if ext == "md" else report.to_latex)(tables)
    path = GOLDEN / f"{stem}.{ext}"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), f"{stem}.{ext} differs from {path}; if intended, regenerate with UPDATE_GOLDEN=1"


def test_every_table_names_card_and_baseline() -> None:
    for stem, tables in report.build_tables(synthetic_rows()).items():
        if stem in ("skipped", "quality"):
            continue
        for t in tables:
            assert CARD in t.caption, (stem, t.caption)
            assert "Speedup over dense" in t.caption, (stem, t.caption)


def test_main_table_names_cudnn_and_fa2() -> None:
    t = report.main_tables(synthetic_rows())[0]
    assert "× cuDNN" in t.headers and "× FA2" in t.headers
    assert "full_cudnn (cuDNN, 11.54 ms)" in t.caption and "18.53 ms" in t.caption


def test_skipped_rows_are_listed_with_reasons() -> None:
    df = synthetic_rows()
    t = report.skipped_table(df)
    assert len(t.cells) == int((df["status"] != "ok").sum())
    reasons = [row[t.headers.index("reason")] for row in t.cells]
    assert any("flash_attn" in r for r in reasons) and any("out of memory" in r for r in reasons)
    assert "\\|" in report.to_markdown(t)  # a pipe in a reason does not break the Markdown table


def test_ablation_picks_target_nearest_90() -> None:
    t = report.ablation_tables(synthetic_rows())[0]
    targets = {row[0]: row[t.headers.index("target")] for row in t.cells}
    assert targets == {"salad": "0.90", "salad_no_gate": "0.90", "salad_no_rope": "0.85"}
    assert report.nearest_target([0.85, 0.95]) == 0.95  # a tie goes to the sparser one
    assert report.nearest_target([]) is None


def test_dit_frame_derives_rest_and_share() -> None:
    dit = report.dit_frame(synthetic_rows()).set_index("method")
    assert dit.loc["full", "rest_ms"] == pytest.approx(760.0)
    assert dit.loc["salad", "attn_share"] == pytest.approx(80.0 / 840.0)


def test_quality_columns_order() -> None:
    df = pd.DataFrame(
        {"vbench_b": [1.0], "psnr": [1.0], "lpips": [None], "vbench_a": [2.0], "ssim": [0.9], "vbench_runner": ["cli"]}
    )
    assert report.quality_columns(df) == ["psnr", "ssim", "vbench_a", "vbench_b"]


def test_latex_escapes_specials() -> None:
    t = report.Table("t", "50% of a_b & c", ["x_y"], ["l"], [["1 × 2"], [None]])
    tex = report.to_latex(t)
    assert r"50\% of a\_b \& c" in tex and r"x\_y" in tex and r"1 $\times$ 2" in tex and "-- \\\\" in tex
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex


# -- figures -------------------------------------------------------------------------------------
def test_pareto_front_hand_made() -> None:
    # (speedup, psnr): C dominates B; D ties A on speedup with lower psnr; E has NaN.
    x = [1.0, 2.0, 3.0, 1.0, np.nan, 5.0]
    y = [30.0, 25.0, 26.0, 29.0, 40.0, 20.0]
    assert plots.pareto_front(x, y).tolist() == [True, False, True, False, False, True]
    # minimise the second coordinate (rel_l2): smaller error is better
    err = [0.01, 0.05, 0.03, 0.02, 0.0, 0.10]
    assert plots.pareto_front(x, err, maximize_y=False).tolist() == [True, False, True, False, False, True]
    assert plots.pareto_front([1.0, 1.0], [2.0, 2.0]).tolist() == [True, True]  # equal points both stay
    assert plots.pareto_front([], []).tolist() == []


def test_quality_metric_prefers_psnr() -> None:
    assert plots.quality_metric(synthetic_rows()) == ("psnr", True)
    assert plots.quality_metric(synthetic_rows().drop(columns=["psnr"])) == ("rel_l2", False)
    assert plots.quality_metric(pd.DataFrame({"ms": [1.0]})) is None


def test_breakdown_splits_time_after_selection() -> None:
    b = plots.breakdown_frame(synthetic_rows())
    parts = b[list(plots.SEGMENTS)].sum(axis=1)
    assert np.allclose(parts, b["ms"])
    salad = b[(b["method"] == "salad") & (b["workload"] == "wan_480p")].iloc[0]
    assert salad["sparsity_target"] == 0.9 and salad["select"] == pytest.approx(0.12) and salad["linear"] > 0
    assert bool(salad["estimated"])


def test_figures_written_non_empty(tmp_path: Path) -> None:
    written = plots.write_figures(synthetic_rows(), tmp_path)
    assert set(written) == set(plots.FIGURES)
    for stem, paths in written.items():
        assert [p.suffix for p in paths] == [".png", ".pdf"], stem
        assert all(p.stat().st_size > 1000 for p in paths), stem


def _series(fig) -> list[tuple[str, list[str]]]:
    """(panel title, line/collection labels) of every visible panel."""
    out = []
    for ax in fig.axes:
        if ax.get_visible():
            labels = [a.get_label() for a in (*ax.lines, *ax.collections) if not a.get_label().startswith("_")]
            out.append((ax.get_title(), labels))
    return out


def test_speedup_figure_separates_ablations_and_leaves_dense_out() -> None:
    fig = plots.fig_speedup_vs_sparsity(synthetic_rows())
    panels = dict(_series(fig))
    main = next(v for t, v in panels.items() if "wan_480p" in t and "ablations" not in t)
    ablations = next(v for t, v in panels.items() if "ablations" in t)
    assert main == ["salad", "topk"]  # no dense backend, no ablation among the peers
    assert ablations == ["salad", "salad_no_gate", "salad_no_rope"]
    colors = plots._colors(synthetic_rows())
    assert colors["salad_no_gate"] != colors["topk"] and colors["salad_no_gate"][2] > colors["salad_no_gate"][1]  # purple


def test_speedup_vs_n_only_with_several_n() -> None:
    rows = synthetic_rows()
    assert plots.fig_speedup_vs_n(rows[rows["workload"] != "wan_small"]) is None  # one N: no figure
    fig = plots.fig_speedup_vs_n(rows)
    assert fig is not None and any("topk@0.90" in labels for _, labels in _series(fig))


def test_quality_vs_speedup_joins_quality_and_latency_rows() -> None:
    joined = plots.quality_speedup_frame(synthetic_rows())
    rows = {r["workload"]: r for r in joined[joined["kind"] == "quality+latency"].to_dict("records")}
    assert set(rows) == {"wan_480p (quality: trained model)", "wan_small (quality: trained model)"}
    assert all(r["method"] == "topk" and r["psnr"] == 24.1 for r in rows.values())
    assert rows["wan_480p (quality: trained model)"]["speedup"] == pytest.approx(11.54 / 1.62)
    assert rows["wan_small (quality: trained model)"]["speedup"] == pytest.approx(0.9 / 0.40)
    fig = plots.fig_quality_vs_speedup(synthetic_rows())
    assert any("Pareto front" in labels and "topk" in labels for _, labels in _series(fig))


def test_breakdown_keeps_only_the_headline_dense_backend() -> None:
    frame = plots.breakdown_frame(synthetic_rows())
    assert "full_flash" not in set(frame["method"])


def test_figures_on_empty_rows() -> None:
    empty = pd.DataFrame([{"kind": "attention", "method": "x", "status": "skipped", "reason": "no GPU"}])
    assert all(make(empty) is None for make in plots.FIGURES.values())


# -- writing and the CLI ---------------------------------------------------------------------------
def _run_dir(tmp_path: Path, df: pd.DataFrame) -> Path:
    run = tmp_path / "run1"
    run.mkdir()
    with open(run / "rows.jsonl", "w") as f:
        for r in df.to_dict("records"):
            f.write(json.dumps({k: v for k, v in r.items() if not (isinstance(v, float) and np.isnan(v))}) + "\n")
    return run


def test_write_reports_index(tmp_path: Path) -> None:
    paths = report.write_reports(synthetic_rows(), tmp_path / "reports", figures=False)
    names = {p.name for p in paths}
    assert {"main.md", "main.tex", "skipped.md", "dit.tex", "README.md"} <= names
    index = (tmp_path / "reports" / "README.md").read_text()
    assert "NVIDIA H200" in index and "[main.md](main.md)" in index and "1 skipped" in index


def test_a_kind_without_rows_writes_no_empty_table_files(tmp_path: Path) -> None:
    rows = synthetic_rows()
    attention = rows[rows["kind"] == "attention"]
    out = tmp_path / "reports"
    out.mkdir()
    (out / "dit.md").write_text("a table from an earlier report\n")
    report.write_reports(attention, out, figures=False)
    assert (out / "main.md").stat().st_size > 0
    assert not (out / "dit.md").exists() and not (out / "kernel.tex").exists()
    assert "`dit`: no rows of this kind" in (out / "README.md").read_text()


def test_cli_writes_tables(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, synthetic_rows())
    out = tmp_path / "reports"
    assert report.main([str(run), "--out", str(out), "--no-figures"]) == 0  # figures: test_figures_written_non_empty
    for name in (
        "main.md",
        "main.tex",
        "ablation.md",
        "quality.tex",
        "kernel.tex",
        "dit.md",
        "skipped.md",
        "README.md",
    ):
        assert (out / name).stat().st_size > 0, name
    # the same tables from the JSONL round trip as from the DataFrame
    assert (out / "main.md").read_text() == report.to_markdown(report.main_tables(synthetic_rows()))


def test_a_rerun_supersedes_its_cell_unless_keep_all(tmp_path: Path) -> None:
    import json

    from salad_bench.harness.results import latest_per_cell, load_rows

    cell = {"kind": "quality", "method": "salad", "config_hash": "h", "workload": "mini", "dtype": "bf16",
            "pass": "fwd", "sparsity_target": 0.9, "card": "NVIDIA H200", "status": "ok"}
    first, rerun = tmp_path / "a", tmp_path / "b"
    for d, rows in ((first, [{**cell, "psnr": 10.0, "date": "2026-11-28T10:00"}, {**cell, "method": "vsa", "psnr": 17.0, "date": "2026-11-28T10:00"}]),
                    (rerun, [{**cell, "psnr": 16.0, "date": "2026-11-28T10:30"}])):
        d.mkdir()
        (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = load_rows([first, rerun])
    kept = latest_per_cell(df)
    assert sorted(zip(kept["method"], kept["psnr"], strict=True)) == [("salad", 16.0), ("vsa", 17.0)]
    assert len(df) == 3  # load_rows itself keeps everything (--keep-all)


def test_cli_bad_input_exit_2(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    run = tmp_path / "bad"
    run.mkdir()
    (run / "rows.jsonl").write_text('{"method": "a"}\nnot json\n{"method": "b"}\n')
    assert report.main([str(run), "--out", str(tmp_path / "r")]) == 2
    assert "rows.jsonl:2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "row",
    [
        {"method": "a"},
        {"method": "a", "ms": 1.0, "speedup": 2.0},
        {"kind": "dit", "method": "a", "ms": 3.0},
        {"kind": "kernel", "ms": 1.0},
        {"kind": "quality", "method": "m", "psnr": None, "vbench_runner": "cli"},
        {"status": "error"},
    ],
)
def test_rows_missing_fields_still_render(row: dict) -> None:
    df = pd.DataFrame([row])
    tables = [t for ts in report.build_tables(df).values() for t in ts]
    assert sum(len(t.cells) for t in tables) == 1  # the row shows up exactly once
    report.to_markdown(tables), report.to_latex(tables)
    for make in plots.FIGURES.values():
        make(df)


def test_quality_captions_say_when_the_base_never_passed_its_bar() -> None:
    base = {"kind": "quality", "family": "training_free", "status": "ok", "workload": "mini", "dtype": "bf16",
            "card": "H", "sparsity_target": 0.9, "psnr": 20.0, "checkpoint": "ckpt/a", "checkpoint_steps": 2618}  # fmt: skip
    old = report.quality_tables(pd.DataFrame([{**base, "method": "topk"}, {**base, "method": "sta"}]))
    assert "Base model `ckpt/a` (2,618 steps) without a passing base-model bar card" in old[0].caption
    mixed = [{**base, "method": "topk", "base_bar": "passed"}, {**base, "method": "sta", "base_bar": "not checked (--no-base-bar)"}]
    assert "without a passing base-model bar card" in report.quality_tables(pd.DataFrame(mixed))[0].caption
    passed = [{**base, "method": m, "base_bar": "passed"} for m in ("topk", "sta")]
    assert "bar card" not in report.quality_tables(pd.DataFrame(passed))[0].caption
