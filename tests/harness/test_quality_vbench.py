"""The VBench adapter: custom_input layout, result parsing, and a real run where VBench is configured."""

from __future__ import annotations

import json
import os

import pytest
import torch

from salad_bench.harness.quality.metrics import temporal_flickering_videos
from salad_bench.harness.quality.vbench import (
    ENV_VAR,
    VBenchUnavailable,
    _parse,
    resolve_python,
    run_vbench,
    vbench_rows,
    write_custom_input,
)


def _videos() -> torch.Tensor:
    from salad_bench.harness.quality.data import ProceduralVideos, VideoSpec

    return ProceduralVideos("val", 2, VideoSpec(frames=6, height=32, width=32)).batch([0, 1])[0]


def test_custom_input_layout(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    paths = write_custom_input(_videos(), ["discs drifting", "discs drifting"], tmp_path)
    assert [p.name for p in paths] == ["discs drifting-0.mp4", "discs drifting-1.mp4"]
    assert all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="prompts"):
        write_custom_input(_videos(), ["one"], tmp_path)


def test_results_json_is_read_into_rows(tmp_path):
    path = tmp_path / "results_x_eval_results.json"
    path.write_text(json.dumps({"temporal_flickering": [0.97, [{"video_path": "a-0.mp4", "video_results": 0.97}]]}))
    res = _parse(path, "cli", [])
    rows = vbench_rows(res, method="salad")
    assert rows == [
        {"method": "salad", "dimension": "temporal_flickering", "score": 0.97, "n_videos": 1, "vbench_runner": "cli",
         "vbench_results_file": str(path), "reason": ""}
    ]  # fmt: skip


def test_unconfigured_environment_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(VBenchUnavailable, match=ENV_VAR):
        resolve_python(None)
    with pytest.raises(VBenchUnavailable, match="not an executable"):
        resolve_python("/nonexistent/python")
    with pytest.raises(ValueError, match="custom_input"):
        run_vbench("x", ["scene"], "y")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(ENV_VAR), reason=f"VBench environment not configured (set {ENV_VAR})")
def test_temporal_flickering_through_vbench_matches_ours(tmp_path):
    videos = _videos()
    write_custom_input(videos, ["discs drifting", "discs orbiting"], tmp_path / "videos")
    res = run_vbench(tmp_path / "videos", ["temporal_flickering"], tmp_path / "out")
    # VBench decodes the (lossy) mp4s; ours scores the uint8 frames before encoding
    assert res.scores["temporal_flickering"] == pytest.approx(temporal_flickering_videos(videos), abs=0.01)
    assert len(res.per_video["temporal_flickering"]) == 2
