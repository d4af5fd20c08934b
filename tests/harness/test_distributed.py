"""Sharded sweeps (harness.distributed, runner.plan): the deal, the rank files, the refusal of shared GPUs,
and a real 2-rank torchrun sweep on the CPU (gloo) whose cells equal the single-process run's, resumed
after a rank lost cells."""

from __future__ import annotations

import json
import time

import pytest
import torch

from salad_bench.harness.cli import main
from salad_bench.harness.distributed import Dist, deal, rank_device
from salad_bench.harness.results import RowWriter, cell_key, load_rows, read_jsonl, rows_files
from salad_bench.harness.runner import RunSpec, plan
from salad_bench.harness.workloads import WORKLOADS, Workload
from tests.harness.torchrun import torchrun

# a Q/K/V workload small enough that a torchrun sweep of it takes seconds on a CPU
MICRO = Workload("micro", (2, 8, 16), 2, 64, 2, note="test-sized: 256 tokens")
PLUGIN = f"""from salad_bench.harness.workloads import WORKLOADS, Workload
WORKLOADS["micro"] = Workload("micro", {MICRO.grid}, {MICRO.heads}, {MICRO.head_dim}, {MICRO.layers})
"""
SWEEP = ["--workloads", "micro", "--methods", "full,topk", "--sparsity", "0.5", "--quick", "--device", "cpu"]


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(WORKLOADS, "micro", MICRO)


# -- the deal and the plan ------------------------------------------------------------------------
def test_deal_gives_heaviest_first_to_the_least_loaded_rank():
    costs = [3, 5, 1, 4, 2]
    # 5 -> r0, 4 -> r1, 3 -> r1 (4 < 5), 2 -> r0 (5 < 7), 1 -> r0 (7 = 7: the lower rank)
    assert deal(costs, 2) == [1, 0, 0, 1, 0]
    assert deal(costs, 5) == [2, 0, 4, 1, 3]  # one each, heaviest to rank 0
    assert deal([1.0], 3) == [0] and deal([], 2) == []
    with pytest.raises(ValueError, match="at least one rank"):
        deal([1.0], 0)


def test_plan_splits_every_unit_to_exactly_one_rank(micro):
    spec = RunSpec(methods=["full", "topk", "sta"], workloads=["cpu-tiny", "micro", "dit:tiny"], sparsities=[0.5, 0.9])
    one = plan(spec)
    for world in (2, 3, 5):
        shares = [plan(spec, r, world) for r in range(world)]
        for phase in (0, 1):
            got = sorted(str(u) for s in shares for u in s[phase])
            assert got == sorted(str(u) for u in one[phase])  # each unit once, none lost
    dit = [u for u in one[1] if u.workload == "dit:tiny"]
    assert len(dit) == 1 and dit[0].method is None  # a DiT workload is one unit: its reference in the same process
    assert dit[0].cells == 1 + 2 + 2  # full once, topk and sta at both targets
    heavy = [u for u in one[1] if u.workload == "cpu-tiny"]
    light = [u for u in one[1] if u.workload == "micro"]
    assert heavy[0].cost > light[0].cost  # cost follows the dense FLOPs


def test_plan_leaves_out_what_any_rows_file_holds(tmp_path, micro):
    spec = RunSpec(methods=["full", "topk"], workloads=["micro"], sparsities=[0.5], out=tmp_path, resume=True)
    from salad_bench.harness.results import cell_identity
    from salad_bench.methods import METHODS

    w = RowWriter(tmp_path, rank=1, world_size=2)
    cfg = {**METHODS.get("topk").defaults, "sparsity": 0.5}
    w.append({**cell_identity("attention", "topk", cfg, "micro", "bf16", "fwd", 0.5, "video"), "status": "ok"})
    fresh = RowWriter(tmp_path, resume=True)  # one process resuming a run of two ranks
    base, rest = plan(spec, writer=fresh)
    assert [u.method for u in rest] == ["full"]


# -- rows files -----------------------------------------------------------------------------------
def test_rank_files_are_one_run(tmp_path):
    for r in (1, 0, 10):  # (the ranks of a run pass a barrier before appending; here one after the other)
        RowWriter(tmp_path, rank=r, world_size=11, resume=r != 1).append({"method": f"m{r}", "status": "ok", "kind": "attention"})
    (tmp_path / "rows.other.jsonl").write_text('{"method": "not a rows file"}\n')
    assert [f.name for f in rows_files(tmp_path)] == ["rows.rank0.jsonl", "rows.rank1.jsonl", "rows.rank10.jsonl"]
    df = load_rows(tmp_path)
    assert list(df["method"]) == ["m0", "m1", "m10"] and list(df["rank"]) == [0, 1, 10]
    assert set(df["world_size"]) == {11}
    with pytest.raises(Exception, match="already holds results"):
        RowWriter(tmp_path)  # a new run in a directory a sharded run wrote
    again = RowWriter(tmp_path, resume=True, rank=3, world_size=4)
    assert len(again.existing) == 3 and again.path.name == "rows.rank3.jsonl"


def test_refresh_sees_other_ranks_and_skips_a_line_being_written(tmp_path):
    mine = RowWriter(tmp_path, rank=0, world_size=2)
    other = tmp_path / "rows.rank1.jsonl"
    ident = {"kind": "attention", "method": "x", "status": "ok", "card": mine.provenance["card"]}
    other.write_text(json.dumps(ident) + "\n" + '{"kind": "att')  # rank 1 is mid-write
    mine.refresh()
    assert mine.is_done(ident) and len(mine.existing) == 1


# -- one GPU per rank -----------------------------------------------------------------------------
def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    d = Dist(rank=1, world=4, local_rank=1, local_world=4)
    with pytest.raises(ValueError, match="4 ranks on this host but 2 visible GPU"):
        rank_device("cuda", d)
    assert rank_device("cuda", d, exclusive=False) == "cuda:1"
    assert rank_device("cuda", Dist(3, 4, 1, 2)) == "cuda:1"  # two hosts of two
    assert rank_device("cpu", d) == "cpu"  # gloo: every rank on the CPU
    with pytest.raises(ValueError, match="names one GPU"):
        rank_device("cuda:1", Dist(0, 2, 0, 2))


def test_cli_refuses_two_ranks_on_one_gpu_with_exit_2(tmp_path, monkeypatch, capsys):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--methods", "topk", "--device", "cuda", "--out", str(tmp_path / "r"), "--quick"]) == 2
    assert "would measure each other" in capsys.readouterr().err
    assert not rows_files(tmp_path / "r")


def test_dist_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert Dist.from_env() == Dist() and Dist().main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="do not fit"):
        Dist.from_env()


# -- a real torchrun sweep ------------------------------------------------------------------------
def _cells(rows) -> list[tuple]:
    return sorted(cell_key(r) for r in rows)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """One 2-rank torchrun sweep (module-scoped: each torchrun start costs seconds)."""
    d = tmp_path_factory.mktemp("sharded")
    (d / "micro.py").write_text(PLUGIN)
    t0 = time.perf_counter()
    p = torchrun(["run_all.py", "--include", str(d / "micro.py"), *SWEEP, "--out", str(d / "run")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return d / "run", p, time.perf_counter() - t0


@pytest.mark.slow
def test_two_ranks_measure_the_cells_of_one_process(sharded_run, tmp_path, micro):
    run, p, _ = sharded_run
    assert [f.name for f in rows_files(run)] == ["rows.rank0.jsonl", "rows.rank1.jsonl"]
    per_rank = [read_jsonl(f) for f in rows_files(run)]
    assert all(rows for rows in per_rank)  # both ranks measured something
    assert all(r["rank"] == k and r["world_size"] == 2 for k, rows in enumerate(per_rank) for r in rows)
    sharded = [r for rows in per_rank for r in rows]
    assert main([*SWEEP, "--out", str(tmp_path / "one")]) == 0
    single = read_jsonl(tmp_path / "one" / "rows.jsonl")
    assert _cells(sharded) == _cells(single)  # the same cells, each once
    by = {r["method"]: r for r in sharded}
    assert by["topk"]["status"] == "ok" and by["topk"]["speedup"] > 0  # a baseline, whichever rank timed it
    assert by["topk"]["baseline_method"] in {r["method"] for r in sharded if r["status"] == "ok"}
    summary = (run / "summary.md").read_text()  # rank 0 summarised both ranks' rows
    assert "| topk |" in summary and "| full_flash |" in summary and "| full_math |" in summary


@pytest.mark.slow
def test_a_rank_that_lost_cells_is_completed_by_resume(sharded_run, tmp_path, micro):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sharded_run[0], run)
    everything = _cells(load_rows(run).to_dict("records"))
    # rank 1 died before its last cell; rank 0's last row was torn mid-write
    f1 = run / "rows.rank1.jsonl"
    lines = f1.read_text().splitlines(keepends=True)
    lost = json.loads(lines[-1])
    f1.write_text("".join(lines[:-1]))
    f0 = run / "rows.rank0.jsonl"
    lines0 = f0.read_text().splitlines(keepends=True)
    torn = json.loads(lines0[-1])
    f0.write_text("".join(lines0[:-1]) + lines0[-1][:20])
    assert main([*SWEEP, "--out", str(run)]) == 2  # not without --resume
    assert main([*SWEEP, "--out", str(run), "--resume"]) == 0  # one process resumes a run of two ranks
    redone = read_jsonl(run / "rows.jsonl")
    assert sorted(r["method"] for r in redone) == sorted([lost["method"], torn["method"]])
    assert _cells(load_rows(run).to_dict("records")) == everything
    assert main([*SWEEP, "--out", str(run), "--resume"]) == 0  # nothing left: nothing measured
    assert len(read_jsonl(run / "rows.jsonl")) == 2
