"""The speedup gate (both thresholds, like with like, bad input) and the analytic FLOP-speedup check."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from salad_bench.harness import expected_flops, gate

CARD = "NVIDIA H200"
VERSIONS = {"torch": "2.11.0+cu130", "triton": "3.5.0", "cudnn": 91900}
EXPECTED = Path(__file__).parents[2] / "results" / "expected" / "flops.json"


def _row(method: str, target: float, speedup: float, **kw) -> dict:
    return {
        "kind": "attention", "method": method, "family": "training_free", "workload": "wan_480p", "dtype": "bf16",
        "pass": "fwd", "sparsity_target": target, "status": "ok", "card": CARD, **VERSIONS,
        "git_sha": "abc1234def", "date": "2026-11-28T12:00:00+00:00", "baseline_method": "full_cudnn",
        "baseline_ms": 11.5, "ms": 11.5 / speedup, "speedup": speedup, **kw,
    }  # fmt: skip


def _run(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


BASE_ROWS = _run(_row("topk", 0.9, 7.0), _row("salad", 0.9, 5.0), _row("topk", 0.5, 1.2))


@pytest.fixture
def baseline() -> dict:
    return gate.make_baseline(BASE_ROWS, source="results/base")


def _current(topk9: float = 7.0, salad9: float = 5.0, topk5: float = 1.2) -> pd.DataFrame:
    return _run(_row("topk", 0.9, topk9), _row("salad", 0.9, salad9), _row("topk", 0.5, topk5))


# -- thresholds ----------------------------------------------------------------------------------
def test_synthetic_regression_fails(baseline: dict) -> None:
    res = gate.gate(_current(topk9=5.5), baseline, baseline_path="b.json")
    assert res.exit_code == 1 and [c.cell[1] for c in res.regressions] == ["topk"]
    text = res.format()
    assert "REGRESSED" in text and "7.00x -> 5.50x" in text and "-21.4%" in text and "vs dense cudnn" in text
    assert "b.json" in text and "abc1234def" in text and "2026-11-28" in text and "FAIL" in text


def test_noise_within_thresholds_passes(baseline: dict) -> None:
    res = gate.gate(_current(topk9=6.8, salad9=5.1, topk5=1.19), baseline)
    assert res.exit_code == 0 and not res.regressions and len(res.passed) == 3


def test_only_relative_crossing_passes(baseline: dict) -> None:
    res = gate.gate(_current(topk5=1.06), baseline)  # -11.7% but only -0.14x
    assert res.exit_code == 0 and not res.regressions


def test_only_absolute_crossing_passes(baseline: dict) -> None:
    res = gate.gate(_current(topk9=6.5), baseline)  # -0.5x but only -7.1%
    assert res.exit_code == 0 and not res.regressions


def test_improvement_reported_not_failed(baseline: dict) -> None:
    res = gate.gate(_current(salad9=6.0), baseline)
    assert res.exit_code == 0 and [c.cell[1] for c in res.improvements] == ["salad"]


def test_per_card_thresholds_and_overrides(baseline: dict) -> None:
    baseline["thresholds"][CARD] = {"rel": 0.05, "abs": 0.1}
    assert gate.gate(_current(topk9=6.5), baseline).exit_code == 1  # -7.1%, -0.5x: over the card's thresholds
    assert gate.gate(_current(topk9=6.5), baseline, rel=0.2).exit_code == 0  # command line wins
    assert gate.thresholds_for({"card": "X"}) == gate.DEFAULT_THRESHOLDS


# -- like with like ------------------------------------------------------------------------------
def test_different_card_is_not_gated(baseline: dict) -> None:
    rows = _run(_row("topk", 0.9, 2.0, card="NVIDIA H100 80GB HBM3"))
    res = gate.gate(rows, baseline)
    assert not res.regressions and res.gated == 0
    assert res.exit_code == 2 and res.exit_code_for(allow_empty=True) == 0  # nothing gated is not a pass
    assert "NOTHING GATED" in res.format()
    assert any("card 'NVIDIA H100 80GB HBM3', baseline is for 'NVIDIA H200'" in s for s in res.not_gated)


def test_nothing_comparable_exits_2_from_the_command_line(baseline: dict, tmp_path) -> None:
    import json

    run = tmp_path / "run"
    run.mkdir()
    rows = _run(_row("topk", 0.9, 2.0, card="NVIDIA H100 80GB HBM3"))
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.to_dict("records")))
    path = tmp_path / "base.json"
    path.write_text(json.dumps(baseline))
    assert gate.main([str(run), "--baseline", str(path)]) == 2
    assert gate.main([str(run), "--baseline", str(path), "--allow-empty"]) == 0


@pytest.mark.parametrize("field,value", [("torch", "2.12.0+cu130"), ("triton", "3.6.0"), ("cudnn", 92000)])
def test_mismatched_versions_not_gated(baseline: dict, field: str, value) -> None:
    rows = _current(topk9=1.0)
    rows.loc[rows["method"] == "topk", field] = value
    res = gate.gate(rows, baseline)
    assert res.exit_code == 0
    assert any("versions differ" in s and field in s for s in res.not_gated)


def test_other_dense_baseline_not_gated(baseline: dict) -> None:
    rows = _current(topk9=1.0)
    rows.loc[rows["method"] == "topk", "baseline_method"] = "full_flash"
    res = gate.gate(rows, baseline)
    assert res.exit_code == 0 and any("dense baseline 'flash'" in s for s in res.not_gated)


def test_missing_and_new_cells_reported(baseline: dict) -> None:
    rows = _run(
        _row("topk", 0.9, 7.0),
        _row("salad", 0.9, 5.0, status="skipped", reason="needs a CUDA GPU"),
        _row("vsa", 0.9, 4.0),
    )
    res = gate.gate(rows, baseline)
    assert res.exit_code == 0
    assert any("salad" in s and "needs a CUDA GPU" in s for s in res.missing)
    assert any("topk" in s and "s=0.50" in s and "not in the run" in s for s in res.missing)
    assert any(s.startswith("vsa") for s in res.new)


def test_nothing_comparable_says_so(baseline: dict) -> None:
    res = gate.gate(_run(_row("topk", 0.9, 7.0, card="other")), baseline)
    assert "no cell of the run is comparable" in res.format() and res.exit_code == 2


def test_make_baseline_contents(baseline: dict) -> None:
    assert baseline["card"] == CARD and baseline["versions"] == VERSIONS and baseline["git_sha"] == "abc1234def"
    assert baseline["source_run"] == "results/base"  # .ci/run gates this run against its baseline
    assert baseline["thresholds"]["default"] == gate.DEFAULT_THRESHOLDS
    e = next(e for e in baseline["entries"] if e["method"] == "topk" and e["sparsity_target"] == 0.9)
    assert e["speedup"] == 7.0 and e["baseline_backend"] == "cudnn"
    with pytest.raises(ValueError, match="2 cards"):
        gate.make_baseline(_run(_row("topk", 0.9, 7.0), _row("topk", 0.9, 7.0, card="other")))
    assert gate.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# -- CLI and bad input ---------------------------------------------------------------------------
def _write_run(path: Path, rows: pd.DataFrame) -> Path:
    path.mkdir(parents=True)
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.to_dict("records")))
    return path


def test_cli_round_trip(tmp_path: Path, capsys) -> None:
    base_run = _write_run(tmp_path / "base", BASE_ROWS)
    out = tmp_path / "baselines" / "nvidia-h200.json"
    assert gate.main(["--make-baseline", str(base_run), "--out", str(out)]) == 0
    assert gate.main([str(base_run), "--baseline", str(out)]) == 0
    bad_run = _write_run(tmp_path / "bad", _current(topk9=5.0))
    assert gate.main([str(bad_run), "--baseline", str(out)]) == 1
    assert "REGRESSED (1)" in capsys.readouterr().out


def test_cli_default_baseline_path(tmp_path: Path, monkeypatch) -> None:
    run = _write_run(tmp_path / "base", BASE_ROWS)
    monkeypatch.chdir(tmp_path)
    assert gate.main(["--make-baseline", str(run)]) == 0
    assert (tmp_path / "results" / "baselines" / "nvidia-h200.json").is_file()


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such baseline file"),
        ('{"card": "x", "entries": [', "not valid JSON"),
        ('{"entries": []}', "missing key(s) card"),
        ('{"card": "x", "entries": [{"method": "a"}]}', "entry 0 has no method or no speedup"),
        ("[1, 2]", "a baseline is a JSON object"),
    ],
)
def test_bad_baseline_exit_2(tmp_path: Path, capsys, content: str | None, message: str) -> None:
    run = _write_run(tmp_path / "run", BASE_ROWS)
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    assert gate.main([str(run), "--baseline", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err and "--make-baseline" in err


def test_bad_results_exit_2(tmp_path: Path, baseline: dict, capsys) -> None:
    path = tmp_path / "base.json"
    path.write_text(json.dumps(baseline))
    assert gate.main([str(tmp_path / "no_run"), "--baseline", str(path)]) == 2
    assert "no_run" in capsys.readouterr().err
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "rows.jsonl").write_text('{"method": "a"}\n{broken\n{"method": "b"}\n')
    assert gate.main([str(run), "--baseline", str(path)]) == 2
    assert "rows.jsonl:2" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "rows.jsonl").write_text("")
    assert gate.main([str(empty), "--baseline", str(path)]) == 2
    assert "no result rows" in capsys.readouterr().err
    assert gate.main([str(run)]) == 2  # no --baseline


def _gate_cli(argv: list[str]) -> int:
    """``salad-bench gate ARGV`` as the command runs it: a crash is exit 3 with a traceback, not an exception."""
    from salad_bench.harness.errors import guarded

    return guarded(lambda: gate.main(argv))


def _set(data: dict, where: str, value) -> None:
    *keys, last = [int(k) if k.isdigit() else k for k in where.split(".")]
    for k in keys:
        data = data[k]
    data[last] = value


@pytest.mark.parametrize(
    "where,value,names",
    [
        ("thresholds", [1, 2], "'thresholds'"),
        ("thresholds.default", 0.1, "thresholds.default"),
        ("thresholds.default.rel", "abc", "thresholds.default.rel"),
        ("thresholds.default.rel", float("nan"), "thresholds.default.rel"),
        ("thresholds.default.abs", -1, "thresholds.default.abs"),
        ("versions", "x", "'versions'"),
        ("versions.torch", ["2.11"], "versions.torch"),
        ("card", ["NVIDIA H200"], "'card'"),
        ("git_sha", 123, "'git_sha'"),
        ("entries.0.method", ["a"], "entry 0 field method"),
        ("entries.1.workload", {"a": 1}, "entry 1 field workload"),
        ("entries.0.sparsity_target", "x", "entry 0 field sparsity_target"),
        ("entries.0.speedup", "abc", "entry 0 field speedup"),
        ("entries.0.speedup", 0, "entry 0 has speedup 0"),
        ("entries.0.speedup", -5, "entry 0 has speedup -5"),
        ("entries.0.speedup", float("inf"), "entry 0 has speedup inf"),
        ("entries.0.baseline_backend", ["cudnn"], "entry 0 field baseline_backend"),
    ],
)
def test_malformed_baseline_fields_exit_2(tmp_path: Path, baseline: dict, capsys, where: str, value, names: str) -> None:
    """A field of the wrong type or an impossible value: exit 2 naming the file, the field and the fix (never a
    crash, never a gate switched off)."""
    run = _write_run(tmp_path / "run", _current(topk9=0.7))  # a 90% regression: nothing may let it pass
    _set(baseline, where, value)
    path = tmp_path / "base.json"
    path.write_text(json.dumps(baseline))
    assert _gate_cli([str(run), "--baseline", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert str(path) in err and names in err and "--make-baseline" in err, err


def test_binary_baseline_exit_2(tmp_path: Path, capsys) -> None:
    run = _write_run(tmp_path / "run", BASE_ROWS)
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xae\x00\xff\xfe" + bytes(range(256)) * 4)
    assert _gate_cli([str(run), "--baseline", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert str(path) in err and "UTF-8" in err and "--make-baseline" in err, err


@pytest.mark.parametrize("content", [b"\xae\x00\xff\xfe", b'{"card": "x", "thresholds": [1, 2], "entries": []}'])
def test_run_all_gate_checks_malformed_baseline_before_measuring(tmp_path: Path, capsys, content: bytes) -> None:
    from salad_bench.harness.cli import main as run_main

    path = tmp_path / "base.json"
    path.write_bytes(content)
    out = tmp_path / "r"
    args = ["--methods", "topk", "--out", str(out), "--gate", str(path), "--quick", "--no-baselines", "--sparsity", "0.9"]
    assert run_main(args) == 2
    std, err = capsys.readouterr()
    assert "Traceback" not in std + err and str(path) in err and "--make-baseline" in err, err
    assert not (out / "rows.jsonl").exists()  # refused before anything was measured


@pytest.mark.parametrize(
    "flag,value",
    [("--rel", "nan"), ("--abs", "nan"), ("--rel", "-1"), ("--abs", "-0.5"), ("--rel", "inf"), ("--rel", "abc")],
)
def test_bad_threshold_arguments_exit_2(tmp_path: Path, baseline: dict, capsys, flag: str, value: str) -> None:
    run = _write_run(tmp_path / "run", _current(topk9=0.7))  # a 90% regression
    path = tmp_path / "base.json"
    path.write_text(json.dumps(baseline))
    assert _gate_cli([str(run), "--baseline", str(path), flag, value]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "usage:" not in err
    assert flag in err and repr(value) in err and "a threshold is a finite number >= 0" in err, err
    assert err.count("\n") == 1  # one line, not argparse's usage block


def test_bad_gate_arguments_one_line(capsys) -> None:
    assert _gate_cli(["--bogus"]) == 2
    err = capsys.readouterr().err
    assert "--bogus" in err and "usage:" not in err and err.count("\n") == 1, err


def test_nonfinite_thresholds_refused_in_the_api(baseline: dict) -> None:
    with pytest.raises(ValueError, match="finite number >= 0"):
        gate.gate(_current(), baseline, rel=float("nan"))
    baseline["thresholds"]["default"]["abs"] = float("nan")
    with pytest.raises(ValueError, match="thresholds.default.abs"):
        gate.thresholds_for(baseline)


# -- analytic FLOP speedups ----------------------------------------------------------------------
def test_expected_flops_committed_file_passes() -> None:
    res = expected_flops.check(EXPECTED, log=lambda s: None)
    assert res.ok, res.failures
    assert any(s.startswith("topk@0.90") for s in res.passed)


def test_expected_flops_tampered_copy_fails(tmp_path: Path, capsys) -> None:
    data = json.loads(EXPECTED.read_text())
    for e in data["entries"]:
        if e["method"] == "topk" and e["sparsity"] == 0.9:
            e["flop_speedup"] *= 1.05
    path = tmp_path / "flops.json"
    path.write_text(json.dumps(data))
    assert expected_flops.main(["--check", str(path), "--only", "topk"]) == 1
    assert "FAIL: topk@0.90" in capsys.readouterr().out


def test_expected_flops_bad_file_and_unknown_method(tmp_path: Path, capsys) -> None:
    assert expected_flops.main(["--check", str(tmp_path / "none.json")]) == 2
    (tmp_path / "bad.json").write_text('{"entries": [{"method": "topk"}]}')
    assert expected_flops.main(["--check", str(tmp_path / "bad.json")]) == 2
    assert "--write" in capsys.readouterr().err
    entries, skipped = expected_flops.compute([("no_such_method", 0.5)], log=lambda s: None)
    assert entries == [] and skipped == ["no_such_method@0.50: method not registered"]


def test_expected_flops_write_then_check(tmp_path: Path) -> None:
    path = tmp_path / "flops.json"
    cases = [("full", 0.0), ("topk", 0.9)]
    entries, _ = expected_flops.compute(cases, log=lambda s: None)
    assert entries[0]["flop_speedup"] == 1.0 and entries[1]["flop_speedup"] > 5
    path.write_text(json.dumps({"shape": expected_flops._shape_json(expected_flops.SHAPE), "entries": entries}))
    res = expected_flops.check(path, only=["full", "topk", "salad"], log=lambda s: None)
    assert res.ok and len(res.passed) == 2 and any(s.startswith("salad@") for s in res.unchecked)
    assert not expected_flops.check(path, only=["salad"], strict=True, log=lambda s: None).ok
