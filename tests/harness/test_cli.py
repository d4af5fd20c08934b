"""run_all.py end to end on the CPU: the table, rows, resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from salad_bench.harness.cli import main
from salad_bench.harness.results import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_run_writes_rows_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--methods", "topk,full", "--sparsity", "0.9", "--out", str(out), "--quick", "--no-baselines"])
    assert rc == 0
    rows = read_jsonl(out / "rows.jsonl")
    by = {r["method"]: r for r in rows}
    assert by["topk"]["status"] == "ok" and by["topk"]["density"] < 0.3
    assert by["full"]["rel_l2"] < 1e-5
    assert "| topk |" in capsys.readouterr().out
    assert (out / "summary.md").exists()


def test_rows_split_a_method_into_selection_kernel_own_work_and_glue(tmp_path):
    """Methods made of the block-sparse kernel get its time alone on their layout, their own work alone and
    the rest as glue, timed in interleaved rounds (the glue is the median of each round's forward minus its
    parts, with its spread); others (SLA's own kernel, dense) get no split rather than a wrong one."""
    out = tmp_path / "run"
    assert main(["--methods", "topk,salad,sla,full", "--sparsity", "0.9", "--out", str(out), "--quick", "--no-baselines"]) == 0
    by = {r["method"]: r for r in read_jsonl(out / "rows.jsonl")}
    for name in ("topk", "salad"):
        r = by[name]
        assert r["kernel_ms"] > 0 and r["split_fwd_ms"] > 0 and r["split_rounds"] == 5
        assert r["glue_ms_p20"] <= r["glue_ms"] <= r["glue_ms_p80"]  # the arithmetic: the scripted test below
    assert by["topk"]["own_ms"] == 0 and by["salad"]["own_ms"] > 0
    assert "kernel_ms" not in by["sla"] and "glue_ms" not in by["full"]


def test_rows_name_the_memory_layout_of_their_inputs(tmp_path):
    """The wan kind hands methods q, k, v as the model does (views of token-major buffers); the others are
    contiguous. Every method row says which it got, and methods agree with full on both."""
    pytest.importorskip("diffusers")
    for kind, layout in (("video", "heads"), ("wan", "tokens")):
        out = tmp_path / kind
        assert main(["--methods", "topk,salad,full", "--sparsity", "0.5", "--qkv", kind, "--out", str(out), "--quick",
                     "--no-baselines"]) == 0
        rows = read_jsonl(out / "rows.jsonl")
        assert {r["qkv_layout"] for r in rows} == {layout} and all(r["status"] == "ok" for r in rows)
        assert all(r["rel_l2"] < 0.5 for r in rows)


def test_missing_backend_is_a_skipped_row_with_reason(tmp_path):
    out = tmp_path / "run"
    assert main(["--methods", "full_cudnn", "--out", str(out), "--quick", "--no-baselines"]) == 0
    (row,) = read_jsonl(out / "rows.jsonl")
    assert row["status"] == "skipped" and "CUDA" in row["reason"]


def test_resume_skips_measured_cells(tmp_path):
    out = tmp_path / "run"
    args = ["--methods", "topk", "--sparsity", "0.9", "--out", str(out), "--quick", "--no-baselines"]
    assert main(args) == 0
    assert main(args) == 2  # refuses to mix into an existing run without --resume
    assert main([*args, "--resume", "--sparsity", "0.9,0.95"]) == 0
    rows = read_jsonl(out / "rows.jsonl")
    assert sorted(r["sparsity_target"] for r in rows) == [0.9, 0.95]


def test_resume_with_another_seed_is_refused_and_keeps_the_rows(tmp_path, capsys):
    """The seed makes the inputs but is not part of a cell's key: a resume under another seed would take the
    first seed's rows for its own, so it is refused, and the rows stay as they were."""
    out = tmp_path / "run"
    args = ["--methods", "topk", "--sparsity", "0.9", "--workloads", "tiny", "--out", str(out), "--quick", "--no-baselines"]
    assert main(args) == 0
    before = (out / "rows.jsonl").read_bytes()
    assert main([*args, "--resume", "--seed", "5"]) == 2
    assert "measured with --seed 0" in capsys.readouterr().err
    assert (out / "rows.jsonl").read_bytes() == before
    assert main([*args, "--resume", "--seed", "0"]) == 0


def test_an_option_given_twice_keeps_the_last_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--methods", "full", "--methods", "topk", "--sparsity=0.5", "--sparsity", "0.9", "--workloads", "tiny",
                 "--knob", "topk.block_q=32", "--knob", "topk.block_q=64", "--out", str(out), "--quick",
                 "--no-baselines"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "--methods is given more than once" in err and "--sparsity is given more than once" in err
    assert "--knob topk.block_q is given more than once; the last one counts (64)" in err
    (row,) = read_jsonl(out / "rows.jsonl")
    assert (row["method"], row["sparsity_target"], json.loads(row["config"])["block_q"]) == ("topk", 0.9, 64)


def test_a_repeated_workload_or_sparsity_is_measured_once(tmp_path):
    out = tmp_path / "run"
    assert main(["--methods", "topk", "--sparsity", "0.9,0.9", "--workloads", "tiny,tiny", "--out", str(out),
                 "--quick", "--no-baselines"]) == 0  # fmt: skip
    rows = read_jsonl(out / "rows.jsonl")
    assert len(rows) == 1 and rows[0]["sparsity_target"] == 0.9


def test_an_indexed_cpu_device_runs(tmp_path):
    out = tmp_path / "run"
    assert main(["--methods", "topk", "--sparsity", "0.9", "--workloads", "tiny", "--device", "cpu:0", "--out", str(out),
                 "--quick", "--no-baselines"]) == 0  # fmt: skip
    assert read_jsonl(out / "rows.jsonl")[0]["status"] == "ok"


def test_forward_backward_rows_are_timed_against_the_dense_forward_backward(tmp_path):
    out = tmp_path / "run"
    assert main(["--methods", "topk", "--sparsity", "0.9", "--workloads", "tiny", "--backward", "--out", str(out),
                 "--quick"]) == 0  # fmt: skip
    rows = read_jsonl(out / "rows.jsonl")
    for p in ("fwd", "fwd+bwd"):
        dense = {r["method"]: r["ms"] for r in rows if r["pass"] == p and r["method"].startswith("full_") and r["status"] == "ok"}
        (topk,) = [r for r in rows if r["method"] == "topk" and r["pass"] == p]
        best = min(dense, key=dense.get)
        assert (topk["baseline_method"], topk["baseline_ms"]) == (best, dense[best])
        assert topk["speedup"] == pytest.approx(dense[best] / topk["ms"])


def test_speedup_is_over_fastest_measured_dense(tmp_path):
    out = tmp_path / "run"
    assert main(["--methods", "topk", "--sparsity", "0.9", "--out", str(out), "--quick"]) == 0
    rows = read_jsonl(out / "rows.jsonl")
    dense = {r["method"]: r["ms"] for r in rows if r["method"].startswith("full_") and r["status"] == "ok"}
    (topk,) = [r for r in rows if r["method"] == "topk"]
    best = min(dense, key=dense.get)
    assert topk["baseline_method"] == best
    assert topk["speedup"] == pytest.approx(dense[best] / topk["ms"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--methods", "salda"], "did you mean 'salad'"),
        (["--methods", "topk", "--sparsity", "1.0"], "impossible"),
        (["--methods", "topk", "--sparsity", "-0.2"], "impossible"),
        (["--methods", "topk", "--workloads", "wan2.1-1.3b-480p", "--device", "cpu"], "too large for a CPU"),
        (["--methods", "topk", "--knob", "topk.block_q=48"], "block_q=48"),
        (["--methods", "topk", "--workloads", "nope"], "unknown workload"),
        (["--methods", "topk", "--dit-blocks", "2"], "--dit-blocks applies to whole-model workloads"),
        (["--methods", "topk", "--workloads", "dit:tiny", "--dit-blocks", "3"], "has 2 transformer blocks"),
        (["--methods", "topk", "--workloads", "dit:tiny", "--dit-blocks", "two"], "invalid int value"),
        (["--methods", "SALAD"], "did you mean 'salad'"),
        (["--methods", "topk", "--workloads", "TINY"], "did you mean 'tiny'"),
        (["--methods", ","], "give one or more names"),
        (["--methods", "topk", "--workloads", ","], "no workload selected"),
        (["--methods", "topk", "--seed", "99999999999999999999999"], "--seed takes a whole number"),
        (["--methods", "topk", "--seed", "-1"], "--seed takes a whole number"),
        (["--methods", "topk", "--compile"], "--compile applies to whole-model workloads"),
        (["--methods", "topk", "--allow-empty"], "--allow-empty applies to the gate"),
        (["--methods", "salad", "--knob", "salad.sparse_knobs=(('sparsity',0.5),)"], "sparse_knobs sets 'sparsity'"),
        (["--methods", "sparse_lora", "--knob", "sparse_lora.sparse_knobs=(('sparsity',0.5),)"], "sparse_knobs sets 'sparsity'"),
        (["--methods", "salad", "--knob", "salad.sparse_knobs=3"], "is not a tuple"),
    ],
)
def test_bad_input_exits_2_with_message(args, needle, tmp_path, capsys):
    rc = main([*args, "--out", str(tmp_path / "r")])
    assert rc == 2
    assert needle.lower() in capsys.readouterr().err.lower()
    assert not (tmp_path / "r" / "rows.jsonl").exists()


def test_cli_entry_point_and_list():
    res = subprocess.run([sys.executable, "run_all.py", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "salad_no_gate" in res.stdout and "ablation" in res.stdout and "wan2.1-1.3b-480p" in res.stdout
    bad = subprocess.run([sys.executable, "run_all.py", "--methods", "fulll"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'full'" in bad.stderr.lower()


def test_split_glue_is_the_median_of_each_rounds_residual(monkeypatch, tmp_path):
    """The split times forward, selection, kernel and own work in turn, round after round; a window that
    runs slow (here the forward of round 3, and every part of round 4) moves one round's glue, not the
    median. Timings are scripted, so the arithmetic is checked exactly."""
    from salad_bench.harness import runner
    from salad_bench.harness.results import RowWriter
    from salad_bench.harness.timing import Timing

    script = {  # per round: forward, select, kernel, own (ms)
        0: (10.0, 1.0, 5.0, 2.0), 1: (10.5, 1.0, 5.0, 2.0), 2: (50.0, 1.0, 5.0, 2.0),
        3: (20.0, 2.0, 10.0, 4.0), 4: (9.5, 1.0, 5.0, 2.0),
    }
    calls: list[float] = []

    def fake_measure(fn, device, **kw):
        i = len(calls)
        ms = script[i // 4][i % 4]
        calls.append(ms)
        return Timing(ms, ms, ms, 3, "scripted")

    monkeypatch.setattr(runner, "measure", fake_measure)

    class Method:
        def own_work(self, q, k, v, ctx):
            return 0

    spec = runner.RunSpec(methods=["topk"], workloads=["cpu-tiny"], sparsities=[0.9], device="cpu", out=str(tmp_path))
    sweep = runner._Sweep(spec, RowWriter(tmp_path / "rows.jsonl"), progress=lambda *_: None)
    got = sweep.split(Method(), None, None, None, None, None, "torch")
    assert len(calls) == 20
    # round glues: 2.0, 2.5, 42.0, 4.0, 1.5 -> sorted 1.5, 2.0, 2.5, 4.0, 42.0
    assert got["glue_ms"] == 2.5 and got["glue_ms_p20"] == 2.0 and got["glue_ms_p80"] == 4.0
    assert got["kernel_ms"] == 5.0 and got["own_ms"] == 2.0 and got["split_fwd_ms"] == 10.5 and got["split_rounds"] == 5
