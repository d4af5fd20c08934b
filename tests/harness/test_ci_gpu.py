"""CI's side of the GPU gate, on a throwaway git repository: the newest run of each card is gated, and
a GPU run older than the last change to the kernels or methods fails unless a pending note names it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from salad_bench.harness import ci_gpu
from salad_bench.harness.gate import make_baseline
from salad_bench.harness.results import load_rows

CARD = "NVIDIA H100 80GB HBM3"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def _commit(repo: Path, path: str, text: str) -> str:
    f = repo / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"change {path}")
    return _git(repo, "rev-parse", "HEAD")


def _rows(sha: str, date: str, topk: float) -> list[dict]:
    common = {"card": CARD, "git_sha": sha, "date": date, "torch": "2.11", "triton": "3.6", "cudnn": 91900,
              "workload": "wan2.1-1.3b-480p", "dtype": "bf16", "pass": "fwd", "kind": "attention", "qkv": "video",
              "status": "ok", "baseline_method": "full_cudnn", "baseline_backend": "cudnn", "baseline_ms": 11.0}
    return [{**common, "method": "topk", "sparsity_target": 0.9, "ms": 11.0 / topk, "speedup": topk},
            {**common, "method": "salad", "sparsity_target": 0.9, "ms": 11.0 / 4.0, "speedup": 4.0}]


def _write_run(repo: Path, name: str, rows: list[dict]) -> Path:
    d = repo / "results" / "gpu" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    sha = _commit(tmp_path, "salad_bench/kernels/k.py", "v1")
    run = _write_run(tmp_path, "2026-12-01-h100", _rows(sha, "2026-12-01T00:00:00", 8.0))
    base = make_baseline(load_rows(run / "rows.jsonl"), source="x")
    (tmp_path / "results" / "baselines").mkdir(parents=True)
    (tmp_path / "results" / "baselines" / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(base))
    _commit(tmp_path, "results/README", "runs")
    return tmp_path


def test_current_run_passes(repo, capsys):
    assert ci_gpu.check_committed(repo) == 0
    assert "GPU run is current" in capsys.readouterr().out


def test_newest_run_of_the_card_is_gated(repo, capsys):
    sha = _git(repo, "rev-parse", "HEAD")
    _write_run(repo, "2026-12-02-h100", _rows(sha, "2026-12-02T00:00:00", 5.0))  # topk 8x -> 5x
    assert ci_gpu.check_committed(repo) == 1
    assert "2026-12-02-h100" in capsys.readouterr().out


def test_stale_run_fails_unless_a_pending_note_names_the_change(repo, capsys):
    last = _commit(repo, "salad_bench/methods/m.py", "new method code")
    assert ci_gpu.check_committed(repo) == 1
    assert "older than" in capsys.readouterr().err
    (repo / "results" / "gpu_pending.txt").write_text(f"GPU gate pending:\n- {last[:10]}: no GPU lent this session\n- x\n")
    assert ci_gpu.check_committed(repo) == 0
    assert f"pending for {last[:10]} (results/gpu_pending.txt): - {last[:10]}: no GPU lent" in capsys.readouterr().out


def test_a_change_elsewhere_does_not_make_the_run_stale(repo):
    _commit(repo, "README.md", "docs")
    assert ci_gpu.check_committed(repo) == 0


def test_no_run_at_all_is_refused(tmp_path, capsys):
    _git(tmp_path, "init", "-q")
    assert ci_gpu.check_committed(tmp_path) == 2
    assert "no GPU gate run" in capsys.readouterr().err


def test_the_gate_command_refuses_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert ci_gpu.main(["--out", str(tmp_path / "r")]) == 2
    assert "has none" in capsys.readouterr().err


def test_targets_are_read_from_the_experiment_and_reported_beside_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "kernels").mkdir(parents=True)
    rows = [{"status": "ok", "card": CARD, "method": "topk", "sparsity_target": 0.9, "qkv": q, "ms": ms, "glue_ms": g}
            for q, ms, g in (("video", 1.2, 0.2), ("random", 1.4, 0.1))]
    rows.append({"status": "ok", "card": CARD, "method": "sta", "sparsity_target": 0.9, "qkv": "video", "ms": 1.8})
    (run / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    krows = [{"status": "ok", "method": "linear_triton", "variant": f"headline_r{i}", "ms": ms}
             for i, ms in enumerate((0.12, 0.125, 0.2))]
    (run / "kernels" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in krows))
    targets = [
        {"name": "topk", "method": "topk", "sparsity": 0.9, "max_ms": 1.3},
        {"name": "linear", "kernel": "linear_triton", "variant": "headline_r", "max_ms": 0.13, "cards": [CARD]},
        {"name": "linear elsewhere", "kernel": "linear_triton", "variant": "headline_r", "max_ms": 0.1, "cards": ["X"]},
        {"name": "absent", "method": "salad", "sparsity": 0.9, "max_ms": 1.6},
        {"name": "topk glue", "method": "topk", "sparsity": 0.9, "field": "glue_ms", "max_ms": 0.15},
        {"name": "sta glue", "method": "sta", "sparsity": 0.9, "field": "glue_ms", "max_ms": 0.15},
    ]
    got = {r["name"]: r for r in ci_gpu.evaluate_targets(run, targets)}
    assert got["topk"]["measured"] == 1.4 and got["topk"]["met"] is False  # the worst input counts
    assert got["linear"]["measured"] == 0.125 and got["linear"]["met"] is True  # median of the rounds
    assert "linear elsewhere" not in got  # another card's target
    assert got["absent"]["measured"] is None and got["absent"]["met"] is None
    assert got["topk glue"]["measured"] == 0.2 and got["topk glue"]["met"] is False  # a row's other field
    assert got["sta glue"]["measured"] is None  # rows from before the split have none: no figure, not 0


def test_the_committed_experiment_parses_with_a_sweep_and_targets():
    exp = ci_gpu.load_experiment()
    assert exp["sweep"]["methods"] and exp["sweep"]["qkv"] == ["video", "random", "wan"]
    assert all("max_ms" in t and ("method" in t or "kernel" in t) for t in exp["targets"])


def _kernel_target():
    return [t for t in ci_gpu.load_experiment()["targets"] if t.get("kernel") == "triton_block_sparse"]


def test_kernel_target_reads_old_rows_by_mode_and_new_rows_as_the_online_softmax(tmp_path):
    """Rows written before 2026-12-06 timed two softmax modes (``softmax_mode``); the target takes the
    online ones. Newer rows name no mode: they are the one forward, the online softmax."""
    (target,) = _kernel_target()
    assert target["mode"] == "online"

    def row(inp, r, ms, **extra):
        return {"method": "triton_block_sparse", "status": "ok", "ms": ms, "input": inp, **extra,
                "variant": f"inputs_{inp}_{extra.get('softmax_mode', '') + '_' if extra else ''}r{r}"}

    old = [row(inp, r, ms, softmax_mode=mode) for inp in ("random", "video") for r in range(3)
           for mode, ms in (("online", 1.0 + r / 100), ("fixed_max", 2.5))]
    new = [row(inp, r, 1.2 - r / 100) for inp in ("random", "video") for r in range(3)]
    for name, rows, want in (("old", old, 1.01), ("new", new, 1.19)):
        run = tmp_path / name
        (run / "kernels").mkdir(parents=True)
        (run / "rows.jsonl").write_text("")
        (run / "kernels" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (res,) = ci_gpu.evaluate_targets(run, [target])
        assert res["measured"] == pytest.approx(want) and res["met"] is (want <= target["max_ms"])
        assert res["detail"] == f"random {want:.3f}, video {want:.3f}"


def test_kernel_target_on_the_committed_runs():
    """The committed H100 runs measured the online softmax at 1.25-1.49 ms on every input (their fixed_max
    rows, up to 2.8 ms, are left out)."""
    runs = sorted((ci_gpu.ROOT / "results" / "gpu").glob("*/kernels/rows.jsonl"))
    if not runs:
        pytest.skip("no committed kernel rows")
    for rows_file in runs:
        (res,) = ci_gpu.evaluate_targets(rows_file.parent.parent, _kernel_target())
        assert res["measured"] is not None and res["measured"] < 2.0, (rows_file, res)
