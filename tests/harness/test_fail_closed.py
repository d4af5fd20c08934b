"""Inputs that fail closed: each bad input exits 2 with a message naming the problem and the fix, before
anything is measured; an interruption exits 130 and keeps its rows; resume keeps every field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from salad_bench.harness import report
from salad_bench.harness.cli import main
from salad_bench.harness.results import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--quick", "--no-baselines", "--sparsity", "0.9"]


def _rows(out: Path) -> list[dict]:
    return read_jsonl(out / "rows.jsonl")


# -- knobs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("false", False), ("False", False), ("0", False), ("TRUE", True), ("1", True)])
def test_boolean_knobs_parse_strictly(tmp_path, text, value):
    out = tmp_path / "r"
    assert main(["--methods", "salad", "--knob", f"salad.rope={text}", "--out", str(out), *QUICK]) == 0
    (row,) = _rows(out)
    assert json.loads(row["config"])["rope"] is value


@pytest.mark.parametrize(
    "knob,needle",
    [
        ("salad.rope=maybe", "not a boolean"),
        ("sald.rope=False", "'sald' is not a method of this run"),
        ("topk.block_q=64", "'topk' is not a method of this run"),
        ("salad.eps=abc", "salad.eps='abc' is not a number"),
        ("salad.sparsity=0.5", "set for every method with --sparsity"),
        ("salad.nope=1", "salad has no knob 'nope'"),
        ("salad.gate=sometimes", "choose one of"),
        ("salad=1", "METHOD.KEY=VALUE"),
    ],
)
def test_bad_knobs_exit_2_naming_the_knob(tmp_path, capsys, knob, needle):
    out = tmp_path / "r"
    assert main(["--methods", "salad", "--knob", knob, "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (out / "rows.jsonl").exists()


# -- the other arguments -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sparsity", ""], "--sparsity got no value"),
        (["--sparsity", ","], "--sparsity got no value"),
        (["--sparsity", "abc"], "comma-separated numbers"),
        (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
        (["--device", "meta"], "runs on cpu or cuda"),
        (["--dtype", "fp8"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as ei:  # argparse's own exit for a value it cannot parse
        rc = main(["--methods", "topk", "--out", str(tmp_path / "r"), "--quick", "--no-baselines", *args])
        raise SystemExit(rc)
    assert ei.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_out_pointing_at_a_file_exits_2(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["--methods", "topk", "--out", str(f), *QUICK]) == 2
    assert "is a file" in capsys.readouterr().err


def test_out_below_a_file_exits_2_and_creates_nothing(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["--methods", "topk", "--out", str(f / "run"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "cannot be created or written" in err and "is a file" in err and "Traceback" not in err
    assert f.read_text() == "x"


def test_out_the_system_refuses_exits_2_without_a_traceback(tmp_path, capsys, monkeypatch):
    def refuse(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["--methods", "topk", "--out", str(tmp_path / "r"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert f"cannot use {tmp_path / 'r'}: Permission denied" in err and "Traceback" not in err


def test_a_full_disk_exits_2_and_says_so(capsys):
    import errno

    from salad_bench.harness.errors import guarded

    def write():
        raise OSError(errno.ENOSPC, "No space left on device")

    assert guarded(write) == 2
    assert "the disk is full" in capsys.readouterr().err


def test_an_os_error_without_a_path_is_a_crash(capsys):
    from salad_bench.harness.errors import guarded

    def bug():
        raise OSError("something internal")

    assert guarded(bug) == 3
    assert "this is a bug" in capsys.readouterr().err


def test_dit_workload_without_diffusers_exits_2(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert main(["--methods", "full", "--workloads", "dit:tiny", "--out", str(tmp_path / "r"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "diffusers is not installed" in err and "pip install" in err


@pytest.mark.parametrize("content", [None, "{not json", '{"card": "X"}', "[]"])
def test_gate_baseline_is_checked_before_measuring(tmp_path, capsys, content):
    base = tmp_path / "base.json"
    if content is not None:
        base.write_text(content)
    out = tmp_path / "r"
    assert main(["--methods", "topk", "--out", str(out), "--gate", str(base), *QUICK]) == 2
    assert str(base) in capsys.readouterr().err
    assert not (out / "rows.jsonl").exists()  # nothing measured


def test_interrupt_exits_130_and_keeps_rows(tmp_path, monkeypatch, capsys):
    import salad_bench.harness.runner as runner

    out = tmp_path / "r"
    real_cell = runner._Sweep.measure_cell
    calls = {"n": 0}

    def cell(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_cell(self, *a, **kw)

    monkeypatch.setattr(runner._Sweep, "measure_cell", cell)
    assert main(["--methods", "topk,full", "--out", str(out), *QUICK]) == 130
    assert "--resume" in capsys.readouterr().err
    assert [r["method"] for r in _rows(out)] == ["topk"]


def test_sigterm_is_an_interrupt_and_a_second_signal_is_ignored():
    """SIGTERM (a scheduler's stop) ends a command as Ctrl-C does (exit 130, rows kept); after the first
    signal both are ignored, so a second one while torch tears down prints no traceback over the message
    that says how to resume. A command that ends normally leaves SIGTERM as it found it."""
    import os
    import signal
    import time

    from salad_bench.harness.errors import EXIT_INTERRUPTED, guarded

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert guarded(lambda: 0) == 0 and signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]

        def body() -> int:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return 0

        assert guarded(body) == EXIT_INTERRUPTED
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# -- resume --------------------------------------------------------------------------------------
def test_resume_carries_the_dense_baseline_and_adds_no_duplicates(tmp_path):
    out = tmp_path / "r"
    base = ["--out", str(out), "--quick"]
    assert main(["--methods", "topk", "--sparsity", "0.9", *base]) == 0
    first = _rows(out)
    assert main(["--methods", "topk", "--sparsity", "0.9,0.95", *base, "--resume"]) == 0
    rows = _rows(out)
    new = rows[len(first):]
    assert [(r["method"], r["sparsity_target"]) for r in new] == [("topk", 0.95)]  # skipped rows not re-appended
    (resumed,) = new
    (before,) = [r for r in first if r["method"] == "topk"]
    assert resumed["speedup"] is not None and resumed["baseline_method"] == before["baseline_method"]
    assert resumed["baseline_ms"] == before["baseline_ms"]
    assert resumed["speedup"] == pytest.approx(before["baseline_ms"] / resumed["ms"])
    keys = [(r["method"], r["sparsity_target"], r["config_hash"]) for r in rows]
    assert len(keys) == len(set(keys))


# -- NaN -----------------------------------------------------------------------------------------
NAN_METHOD = '''
from dataclasses import dataclass
import torch
from salad_bench.methods.base import METHODS, AttentionMethod, MethodConfig


@dataclass(frozen=True)
class NanConfig(MethodConfig):
    pass


@METHODS.register("nan_for_test", family="training_free")
class NanMethod(AttentionMethod):
    """Returns NaN (a broken method)."""

    Config = NanConfig

    def attend(self, q, k, v, ctx):
        self._remember(None, backend="torch")
        return torch.full_like(q, float("nan"))
'''


def test_a_method_returning_nan_gives_an_error_row(tmp_path):
    plugin = tmp_path / "nan_method.py"
    plugin.write_text(NAN_METHOD)
    out = tmp_path / "r"
    res = subprocess.run(
        [sys.executable, str(ROOT / "run_all.py"), "--include", str(plugin), "--methods", "nan_for_test",
         "--out", str(out), *QUICK],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    (row,) = _rows(out)
    assert row["status"] == "error" and "NaN" in row["reason"]


def test_include_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["--include", str(tmp_path / "nope.py"), "--methods", "topk", "--out", str(tmp_path / "r"), *QUICK]) == 2
    assert "not a .py file" in capsys.readouterr().err


# -- result files and reports ---------------------------------------------------------------------
def test_binary_junk_in_rows_exits_2_naming_file_and_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["--methods", "topk", "--out", str(out), *QUICK]) == 0
    with open(out / "rows.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00junk\n")
    assert main(["--methods", "topk", "--out", str(out), "--resume", *QUICK]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'rows.jsonl'}:2" in err and "corrupt" in err
    assert report.main([str(out)]) == 2


def test_report_without_out_writes_under_the_run(tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert main(["--methods", "topk", "--out", str(out), *QUICK]) == 0
    monkeypatch.chdir(tmp_path)  # a reports/ here would be the committed one
    assert report.main([str(out), "--no-figures"]) == 0
    assert (out / "report" / "README.md").exists()
    assert not (tmp_path / "reports").exists()


def test_cpu_table_says_it_is_a_smoke_test_and_has_no_fa2_column(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["--methods", "topk", "--out", str(out), "--quick", "--sparsity", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "smoke test" in text and "not a speedup claim" in text
    assert "× FA2" not in text


# -- every module entry point the docs name: bad input exits 2 with a message, never a traceback -------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["salad_bench.harness.quality.train_base", "--out", "{f}/x", "--steps", "1"], "cannot be created or written"),
        (["salad_bench.harness.quality.classifier", "--out", "{f}/x", "--tiny"], "cannot be created or written"),
        (["salad_bench.harness.quality.base_bar", "--checkpoint", "{d}", "--classifier", "{d}", "--out", "{f}/x"],
         "cannot be created or written"),
        (["salad_bench.harness.quality.evaluate", "--checkpoint", "{d}"], "--checkpoint and --out are required"),
        (["salad_bench.harness.dit", "--out", "{f}/x"], "cannot be created or written"),
        (["salad_bench.harness.bench_kernels", "--out", "{f}/x"], "cannot be created or written"),
        (["salad_bench.harness.weights", "check", "{d}/none"], "does not exist"),
        (["salad_bench.harness.quality.parallel", "--methods", "full", "--out", "{d}/r", "--per-gpu", "0"],
         "--per-gpu must be at least 1"),
    ],
    ids=lambda v: v[0].rsplit(".", 1)[-1] if isinstance(v, list) else None,
)
def test_module_entry_points_exit_2_on_bad_input(tmp_path, args, needle):
    f = tmp_path / "afile"
    f.write_text("x")
    cmd = [sys.executable, "-m", *(a.format(f=f, d=tmp_path) for a in args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert f.read_text() == "x"
