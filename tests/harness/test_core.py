"""FLOPs, workloads, timing, result rows (append, resume, provenance, corrupt files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from salad_bench.harness.flops import dense_flops, mfu, peak_tflops, tflops
from salad_bench.harness.results import ResultsFileError, RowWriter, load_rows, read_jsonl
from salad_bench.harness.timing import measure
from salad_bench.harness.workloads import WORKLOADS, get_workload, make_qkv


def test_wan_480p_layer_is_6_59_tflop():
    wl = get_workload("wan2.1-1.3b-480p")
    assert wl.n == 32_760
    per_head = dense_flops(1, 1, wl.n, wl.n, wl.head_dim)
    assert per_head / 1e12 == pytest.approx(0.549, abs=0.001)
    layer = dense_flops(1, wl.heads, wl.n, wl.n, wl.head_dim)
    assert layer / 1e12 == pytest.approx(6.59, abs=0.01)
    assert wl.layers * layer / 1e12 == pytest.approx(198, abs=0.5)


def test_presets_match_reference():
    assert get_workload("wan2.1-1.3b-720p").n == 75_600
    assert get_workload("wan2.1-14b-720p").heads == 40
    assert get_workload("hunyuan-720p").n == 118_800
    assert WORKLOADS["cpu-tiny"].n % 64 != 0


def test_unknown_workload_suggests():
    with pytest.raises(KeyError, match="wan2.1-1.3b-480p"):
        get_workload("wan2.1-1.3b-480")


def test_mfu_and_tflops():
    assert tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert peak_tflops("NVIDIA H200") == 989.0
    assert mfu(989e12, 1000.0, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0)
    assert mfu(1.0, 1.0, "cpu:x86_64") is None


def test_qkv_seeded_and_structured():
    wl = get_workload("cpu-tiny")
    a = make_qkv(wl, seed=3)
    b = make_qkv(wl, seed=3)
    c = make_qkv(wl, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert not torch.equal(a[0], c[0])
    q, k, _ = a
    # video-like: a token's nearest neighbour in the raster scores higher than a far-away token
    s = torch.einsum("hnd,hmd->hnm", q[0, :, :200].float(), k[0, :, :200].float())
    near = torch.diagonal(s[:, 1:, :-1], dim1=1, dim2=2).mean()
    far = s[:, :100, 100:].mean()
    assert near > far


def test_measure_cpu_reports_quantiles():
    t = measure(lambda: sum(range(1000)), "cpu", warmup_ms=1, rep_ms=5)
    assert t.p20_ms <= t.median_ms <= t.p80_ms and t.reps >= 3 and t.timer == "cpu-perf_counter"


def test_provenance_from_the_environment_on_a_copy_without_history(monkeypatch):
    from salad_bench.harness.results import provenance

    monkeypatch.setenv("SALAD_GIT_SHA", "abc1234")
    monkeypatch.delenv("SALAD_GIT_DIRTY", raising=False)
    p = provenance()
    assert p["git_sha"] == "abc1234" and p["git_dirty"] is None  # unknown, not this checkout's status
    monkeypatch.setenv("SALAD_GIT_DIRTY", "0")
    assert provenance()["git_dirty"] is False
    monkeypatch.setenv("SALAD_GIT_DIRTY", "1")
    assert provenance()["git_dirty"] is True


def test_rows_append_provenance_and_resume(tmp_path):
    w = RowWriter(tmp_path / "run")
    ident = {"kind": "attention", "method": "topk", "config_hash": "x", "workload": "cpu-tiny", "dtype": "fp32", "pass": "fwd", "sparsity_target": 0.9}
    w.append({**ident, "status": "ok", "ms": 1.0})
    w.append({**ident, "sparsity_target": 0.5, "status": "error", "reason": "boom"})
    rows = read_jsonl(w.path)
    assert len(rows) == 2
    for key in ("git_sha", "git_dirty", "card", "torch", "triton", "cudnn", "date", "command", "run_id"):
        assert key in rows[0]
    with pytest.raises(ResultsFileError, match="--resume"):
        RowWriter(tmp_path / "run")
    w2 = RowWriter(tmp_path / "run", resume=True)
    assert w2.is_done(ident)
    assert not w2.is_done({**ident, "sparsity_target": 0.5})  # errors are retried on resume
    df = load_rows(tmp_path)
    assert list(df["method"]) == ["topk", "topk"]


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    w = RowWriter(tmp_path / "run")
    w.append({"method": "a", "status": "ok"})
    with open(w.path, "a") as f:
        f.write('{"method": "b", "sta')  # the process died mid-write
    w2 = RowWriter(tmp_path / "run", resume=True)
    assert [r["method"] for r in w2.existing] == ["a"]
    w2.append({"method": "c", "status": "ok"})
    assert [r["method"] for r in read_jsonl(w2.path)] == ["a", "c"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"a": 1}) + "\nnot json\n" + json.dumps({"a": 2}) + "\n")
    with pytest.raises(ResultsFileError, match=r"rows.jsonl:2.*corrupt"):
        read_jsonl(p)
    with pytest.raises(ResultsFileError, match="no such results file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_a_number_field_holding_text_is_an_error_naming_line_and_field(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"ms": 1.0}) + "\n" + json.dumps({"method": "a", "density": "x"}) + "\n")
    with pytest.raises(ResultsFileError, match=r"rows.jsonl:2.*'density' is 'x', not a number.*corrupt"):
        read_jsonl(p)
    p.write_text(json.dumps({"ms": None, "speedup": 2, "seed": 0}) + "\n")  # null and int are numbers here
    assert read_jsonl(p) == [{"ms": None, "speedup": 2, "seed": 0}]


def test_a_rows_file_that_cannot_be_written_is_refused_before_measuring(tmp_path, monkeypatch):
    import os

    w = RowWriter(tmp_path / "run")
    w.append({"method": "a", "status": "ok"})
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == w.path else real(path, mode))
    with pytest.raises(ResultsFileError, match=r"rows.jsonl is not writable.*chmod u\+w"):
        RowWriter(tmp_path / "run", resume=True)


def test_wan_qkv_kind_comes_from_a_wan_layer():
    """The third input kind: q, k, v of a random-weight Wan2.1 layer (after qk-norm and RoPE): seeded,
    the workload's shape, and scores far less spread than the video-like kind's."""
    import math

    import pytest

    pytest.importorskip("diffusers")
    from salad_bench.harness.workloads import get_workload, make_qkv

    wl = get_workload("cpu-tiny")
    q, k, v = make_qkv(wl, kind="wan", seed=3)
    q2, _, _ = make_qkv(wl, kind="wan", seed=3)
    assert q.shape == k.shape == v.shape == (1, wl.heads, wl.n, wl.head_dim)
    assert torch.equal(q, q2) and not torch.equal(q, make_qkv(wl, kind="wan", seed=4)[0])
    # in the layout the model hands a method: views of token-major buffers
    assert all(not x.is_contiguous() and x.transpose(1, 2).is_contiguous() for x in (q, k, v))

    def spread(q, k):
        s = q[0, 0] @ k[0, 0].T / math.sqrt(q.shape[-1])
        return float((s.max(-1).values - s.min(-1).values).median())

    vq, vk, _ = make_qkv(wl, kind="video", seed=3)
    assert spread(q, k) < 20 < 100 < spread(vq, vk)
