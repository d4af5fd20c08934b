"""Sampling through a real (tiny) WanPipeline: step time, fixed cost and the extrapolated run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from salad_bench.harness.dit import main, run_pipeline_workload, video_size  # noqa: E402
from salad_bench.harness.errors import BadInput  # noqa: E402
from salad_bench.harness.results import RowWriter, read_jsonl  # noqa: E402
from salad_bench.harness.workloads import get_workload  # noqa: E402
from tests.harness.test_wan_integration import _tiny_pipeline  # noqa: E402


def test_video_size_inverts_the_vae():
    assert video_size(get_workload("wan2.1-1.3b-480p")) == (81, 480, 832)
    assert video_size(get_workload("wan2.1-14b-720p")) == (81, 720, 1280)


def test_pipeline_rows(tmp_path, monkeypatch):
    """The pipeline really runs with each method installed; its wall time is replaced by a known one
    (0.2 s + 50 ms per step) so the arithmetic is checked exactly (CPU timings are noise here)."""
    import salad_bench.harness.dit as dit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = _tiny_pipeline(tmp_path / "wan-tiny")
    real, calls = dit._pipeline_seconds, []

    def fake(pipe, steps, *args):
        real(pipe, steps, *args)
        calls.append((steps, [m.report().density for m in dit_installed(pipe.transformer)]))
        return 0.2 + 0.05 * steps

    from salad_bench.harness.integrations.wan import installed_methods as dit_installed

    monkeypatch.setattr(dit, "_pipeline_seconds", fake)
    writer = RowWriter(tmp_path / "run")
    run_pipeline_workload("tiny", ["topk"], [0.5], weights=str(root), writer=writer, device="cpu",
                          dtype=torch.float32, num_steps=10, short=(1, 4))
    rows = read_jsonl(tmp_path / "run" / "rows.jsonl")
    assert [r["method"] for r in rows] == ["full", "topk"]  # the dense reference comes first, unasked
    for r in rows:
        assert r["status"] == "ok", r["reason"]
        assert r["kind"] == "pipeline" and r["workload"].startswith("pipeline:tiny[weights=wan-tiny]")
        assert r["step_ms"] > 0 and r["fixed_ms"] >= 0 and r["num_frames"] == 9 and r["height"] == 128
        assert r["step_ms"] == pytest.approx(50.0) and r["fixed_ms"] == pytest.approx(200.0)
        assert r["sampling_ms_est"] == pytest.approx(r["fixed_ms"] + 10 * r["step_ms"])
        assert "extrapolated to 10 CFG steps" in r["sampling_note"]
    assert rows[0]["speedup"] == pytest.approx(1.0)
    # warm-up + 3 reps of each length, per method; topk really ran sparse inside the pipeline
    assert [c[0] for c in calls] == [1, 1, 1, 1, 4, 4, 4] * 2
    assert all(d == 1.0 for d in calls[0][1]) and all(d < 1.0 for d in calls[-1][1])
    # resumed: nothing is measured again
    writer = RowWriter(tmp_path / "run", resume=True)
    run_pipeline_workload("tiny", ["topk"], [0.5], weights=str(root), writer=writer, device="cpu",
                          dtype=torch.float32, num_steps=10, short=(1, 4))
    assert len(read_jsonl(tmp_path / "run" / "rows.jsonl")) == 2


def test_pipeline_needs_weights(tmp_path):
    with pytest.raises(BadInput, match="--pipeline needs --weights"):
        main(["--workloads", "dit:tiny", "--pipeline", "--out", str(tmp_path), "--device", "cpu"])
