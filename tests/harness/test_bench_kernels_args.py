"""``salad-bench kernels`` on bad input: exit 2, one line naming the flag, the value and the fix, nothing measured;
on a machine without CUDA it refuses the full Wan shape; a failed section is one line and an error row."""

from __future__ import annotations

import pytest
import torch

from salad_bench import cli
from salad_bench.harness import bench_kernels as bk

SMOKE = ["--n", "128", "--heads", "1", "--dtype", "fp32", "--quick"]


def _smoke_except(args: list[str]) -> list[str]:
    """SMOKE less the flags ``args`` sets itself (a flag given twice would warn and add a line)."""
    pairs = [("--n", "128"), ("--heads", "1"), ("--dtype", "fp32")]
    return [x for flag, value in pairs if flag not in args for x in (flag, value)] + ["--quick"]


@pytest.fixture
def no_bench(monkeypatch):
    """``Bench`` replaced by one that fails the test: a refused command must measure nothing."""

    def measured(*_a, **_k):
        raise AssertionError("the benchmark was set up: bad input must be refused before anything is measured")

    monkeypatch.setattr(bk, "Bench", measured)


def _kernels(tmp_path, capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["kernels", "--out", str(tmp_path / "k"), *args])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--n", "-5"], ("--n", "-5", ">= 1")),
        (["--n", "0"], ("--n", "0", ">= 1")),
        (["--n", "many"], ("--n", "'many'", ">= 1")),
        (["--heads", "0"], ("--heads", "0", ">= 1")),
        (["--rounds", "0"], ("--rounds", "0", ">= 1")),
        (["--densities", "1.5,-1"], ("--densities", "1.5", "(0, 1]")),
        (["--densities", "0.5,-1"], ("--densities", "-1", "(0, 1]")),
        (["--densities", "abc"], ("--densities", "'abc'", "(0, 1]")),
        (["--densities", ","], ("--densities", "(0, 1]")),
        (["--variant-densities", "2"], ("--variant-densities", "2", "(0, 1]")),
        (["--sections", "bogus"], ("--sections", "'bogus'", "dense,sparse,selection")),
        (["--sections", "dense,heldline"], ("--sections", "'heldline'", "'headline'")),
        (["--sections", ""], ("--sections", "dense,sparse,selection")),
        (["--dtype", "fp8"], ("--dtype", "'fp8'")),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_arguments_exit_2_with_one_line_naming_the_flag(tmp_path, capsys, no_bench, args, needles):
    code, text = _kernels(tmp_path, capsys, *_smoke_except(args), *args)
    assert code == 2, text
    assert "Traceback" not in text and "usage:" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "k").exists()


def test_unknown_workload_exits_2_before_anything_is_measured(tmp_path, capsys, no_bench):
    code, text = _kernels(tmp_path, capsys, *SMOKE, "--workload", "wan-nope")
    assert code == 2 and "Traceback" not in text and "unknown workload 'wan-nope'" in text


def test_help_exits_0(capsys):
    assert bk.main(["--help"]) == 0
    assert "--densities" in capsys.readouterr().out


def test_no_cuda_refuses_the_full_wan_shape_and_names_the_fix(tmp_path, capsys, monkeypatch, no_bench):
    """Without a GPU the default (N=32,760, 12 heads) would try 51 GB score matrices for minutes: refused,
    with the GPU and an explicit small ``--n`` as the fixes; nothing created."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, text = _kernels(tmp_path, capsys)
    assert code == 2, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert "GPU" in text and "--n 256" in text and "32,760" in text
    assert not (tmp_path / "k").exists()
    code, text = _kernels(tmp_path, capsys, "--workload", "wan2.1-14b-720p", "--sections", "dense")
    assert code == 2 and "--n 256" in text


def test_no_cuda_runs_an_explicit_small_size(tmp_path, capsys, monkeypatch):
    """An explicit ``--n`` (or the ``cpu-tiny`` workload) is the user's CPU smoke run: not refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []

    class Stop(Exception):
        pass

    def bench(args):
        seen.append(args)
        raise Stop

    monkeypatch.setattr(bk, "Bench", bench)
    for args in (SMOKE, ["--workload", "cpu-tiny"]):
        with pytest.raises(Stop):
            bk.main(["--out", str(tmp_path / "k"), *args])
    assert seen[0].n == 128 and seen[1].workload == "cpu-tiny"
    assert seen[0].densities == [1.0, 0.5, 0.25, 0.1, 0.05] and seen[0].sections == [
        "dense", "sparse", "selection", "linear", "video", "variants", "headline"]


def test_a_failed_section_is_one_line_and_an_error_row(tmp_path, capsys, monkeypatch):
    from salad_bench.harness.results import read_jsonl

    def boom(bench):
        raise RuntimeError("cannot allocate\n51539607552 bytes")

    monkeypatch.setattr(bk, "linear_section", boom)
    code, text = _kernels(tmp_path, capsys, *SMOKE, "--sections", "linear")
    assert code == 0, text
    assert "Traceback" not in text
    (line,) = [x for x in text.splitlines() if x.startswith("section linear")]
    assert "failed: RuntimeError: cannot allocate 51539607552 bytes" in line
    (row,) = read_jsonl(tmp_path / "k" / "rows.jsonl")
    assert row["method"] == "section:linear" and row["status"] == "error" and "cannot allocate" in row["reason"]


def test_a_backward_that_fails_the_accuracy_check_is_one_line(tmp_path, capsys, monkeypatch):
    """The forward rows stay; the gradients' failure is one line on stderr and the fwd+bwd cell's error row."""
    from salad_bench.harness.timing import Timing

    monkeypatch.setattr(bk, "measure", lambda fn, device, rep_ms=None: (fn(), Timing(1.0, 0.9, 1.1, 3, "fake"))[1])

    def fwd_only(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).detach()  # no graph: grad() raises

    monkeypatch.setattr(bk, "_ours", lambda layout: fwd_only)
    code, text = _kernels(tmp_path, capsys, *SMOKE, "--sections", "sparse", "--densities", "1.0")
    assert code == 0, text
    assert "Traceback" not in text
    (line,) = [x for x in text.splitlines() if "gradients not checked" in x and "triton_block_sparse" in x]
    assert "RuntimeError" in line
