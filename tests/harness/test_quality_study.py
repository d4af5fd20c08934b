"""The study runner (issue #25) on a tiny config: plan, end to end on the CPU, resume, a killed cell, the
config's checks (exit 2 naming the key), the report and the commit."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")
pytest.importorskip("salad_bench.harness.integrations.wan")

from salad_bench.harness.quality.model import MiniWan, MiniWanConfig, save_checkpoint  # noqa: E402
from salad_bench.harness.quality.study import main, plan  # noqa: E402
from salad_bench.harness.quality.study_config import StudyConfigError, load_config  # noqa: E402
from salad_bench.harness.results import read_jsonl  # noqa: E402

TINY = MiniWanConfig(num_layers=1, num_heads=2, head_dim=64, ffn_dim=64, freq_dim=32, frames=4, height=16, width=16)


def _toml(ckpt) -> str:
    text = f'''
        [study]
        name = "tiny"
        checkpoint = "{ckpt}"
        require_base_bar = false

        [budget]
        train_videos = 4
        steps = 3
        batch = 2
        warmup = 0
        seeds = [0, 1]

        [sweep]
        steps = 2
        seed = 0
        sparsity = 0.5

        [eval]
        n_val = 2
        n_eval = 2
        sample_steps = 2
        bootstrap_draws = 200

        [arms.ft]
        train_params = "all"
        objective = "flow"
        lrs = [1e-3, 1e-2]

        [[cells]]
        methods = ["salad", "salad_no_linear", "topk"]
        sparsities = [0.5]
        arms = ["ft"]

        [[hypotheses]]
        id = "parity"
        claim = "salad within 2% of the control"
        method = "salad"
        versus = "@control"
        sparsities = [0.5]
        metrics = ["val_loss"]
        comparison = "within"
        threshold = 0.02

        [[hypotheses]]
        id = "linear"
        claim = "salad beats salad_no_linear"
        method = "salad"
        versus = "salad_no_linear"
        sparsities = [0.5]
        metrics = ["val_loss", "psnr", "classifier_accuracy"]
        comparison = "better"

        [[hypotheses]]
        id = "free"
        claim = "salad beats topk as it is"
        method = "salad"
        versus = "topk"
        sparsities = [0.5]
        metrics = ["velocity_mse"]
        comparison = "better"
    '''
    return textwrap.dedent(text)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    torch.manual_seed(0)
    save_checkpoint(MiniWan(TINY), root / "ckpt", {"steps_done": 0})
    cfg = root / "tiny.toml"
    cfg.write_text(_toml(root / "ckpt"))
    return root, cfg


def test_the_plan_sweeps_each_pair_then_seeds_the_pick(tiny):
    root, cfg = tiny
    p = plan(load_config(cfg))
    assert set(p.pairs) == {("salad", "ft"), ("salad_no_linear", "ft"), ("full", "ft")}  # the control is a pair
    assert [c.label for c in p.as_is] == ["full", "topk"]  # the base reference, and training-free as it is
    assert len(p.sweep) == 6 and {c.recipe.steps for c in p.sweep} == {2}
    finals, missing = p.final({("salad", "ft"): 1e-2})
    assert {(c.label, c.recipe.lr, c.recipe.seed, c.recipe.steps) for c in finals} == {("salad", 1e-2, 0, 3), ("salad", 1e-2, 1, 3)}
    assert set(missing) == {("salad_no_linear", "ft"), ("full", "ft")}
    control = [c for c in p.sweep if c.method == "full"]
    assert {c.label for c in control} == {"full_ft"} and {c.sparsity for c in control} == {0.0}
    # the hypotheses first: the cells they compare, the same cells (a later full run skips them)
    cfg2 = root / "two.toml"
    cfg2.write_text(cfg.read_text().replace('"salad", "salad_no_linear", "topk"', '"salad", "salad_no_linear", "salad_no_rope", "topk"'))
    full, core = plan(load_config(cfg2)), plan(load_config(cfg2), only_hypotheses=True)
    assert ("salad_no_rope", "ft") in full.pairs and ("salad_no_rope", "ft") not in core.pairs
    assert set(core.sweep) < set(full.sweep) and set(core.as_is) <= set(full.as_is)


def test_the_study_runs_end_to_end_resumes_and_skips_done_cells(tiny, capsys):
    root, cfg = tiny
    out, reports = root / "run", root / "reports"
    argv = ["--config", str(cfg), "--out", str(out), "--device", "cpu", "--reports", str(reports), "--no-figures"]
    assert main(argv) == 0
    rows = read_jsonl(out / "rows.jsonl")
    cells = [r for r in rows if r["kind"] == "quality"]
    assert all(r["status"] == "ok" for r in cells), [(r["cell"], r.get("reason")) for r in cells if r["status"] != "ok"]
    assert len(cells) == 2 + 6 + 6  # untrained, sweep (3 pairs x 2 rates), final (3 pairs x 2 seeds)
    assert all(r["study"] == "tiny" and r["git_sha"] is not None or r["git_sha"] is None for r in cells)
    sweeps = [r for r in cells if r["study_phase"] == "sweep"]
    assert {r["train_steps"] for r in sweeps} == {2} and all(r["sweep_steps"] == 2 for r in sweeps)
    finals = [r for r in cells if r["study_phase"] == "final"]
    for (m, label) in (("salad", "salad"), ("full", "full_ft")):
        mine = [r for r in sweeps if r["method"] == m]
        best = min(mine, key=lambda r: (r["val_loss"], r["train_lr"]))["train_lr"]
        picked = [r for r in finals if r["label"] == label]
        assert {r["train_lr"] for r in picked} == {best} and sorted(r["train_seed"] for r in picked) == [0, 1]
    summary = {(r["label"], r["sparsity_target"]): r for r in rows if r["kind"] == "quality_summary"}
    assert summary[("salad", 0.5)]["n_seeds"] == 2 and "val_loss_excess_lo" in summary[("salad", 0.5)]
    assert "val_loss_band3_excess" in summary[("salad", 0.5)] and summary[("topk", 0.5)]["n_seeds"] == 1
    verdicts = {r["hypothesis"]: r for r in rows if r["kind"] == "hypothesis"}
    assert set(verdicts) == {"parity", "linear", "free"}
    assert all(v["verdict"] in ("held", "not held", "unresolved") for v in verdicts.values())
    parts = {p["metric"]: p for p in verdicts["linear"]["parts"]}
    assert parts["classifier_accuracy"]["verdict"] == "not tested"  # no classifier here: never a number
    assert verdicts["linear"]["verdict"] in ("not held", "unresolved")  # a part not measured cannot hold
    assert "| parity |" in (out / "intervals.md").read_text()
    quality = (reports / "quality.md").read_text()
    assert "quality study tiny" in quality and "full_ft" in quality and "hypotheses" in quality
    assert "[" in quality.split("quality study tiny")[1]  # intervals in the table
    assert "quality study tiny" in (reports / "ablation.md").read_text()
    assert (out / "study.toml").read_text() == cfg.read_text()
    capsys.readouterr()
    # the same command again: every cell is done, nothing runs, the verdicts are appended again
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "0 of 8 cells to run" in log and "0 of 6 cells to run" in log
    again = read_jsonl(out / "rows.jsonl")
    assert len([r for r in again if r["kind"] == "quality"]) == len(cells)


def test_a_killed_cell_restarts_from_its_checkpoint(tiny, monkeypatch):
    """A fine-tuning killed mid-way (here: after its second step) continues from its state on the next call."""
    import salad_bench.harness.quality.train as tr

    root, cfg = tiny
    one = root / "one.toml"
    text = _toml(root / "ckpt").replace('"salad", "salad_no_linear", "topk"', '"salad"').replace("seeds = [0, 1]", "seeds = [0]")
    text = text.replace("lrs = [1e-3, 1e-2]", "lrs = [1e-3]").replace("\nsteps = 2", "\nsteps = 3")  # the sweep is final
    one.write_text(text.replace("seeds = [0]", "seeds = [0]\ncheckpoint_every = 1"))
    out = root / "killed"
    real = tr.lr_at
    calls = {"n": 0}

    def dying(step, c):
        if c.steps == 3 and step == 2 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt  # the process is killed after step 2's checkpoint
        return real(step, c)

    monkeypatch.setattr(tr, "lr_at", dying)
    import salad_bench.harness.quality.study as study_mod

    argv = ["--config", str(one), "--out", str(out), "--device", "cpu", "--reports", "none"]
    with pytest.raises(KeyboardInterrupt):
        study_mod.main(argv)
    states = list((out / "finetuned").glob("*.resume.pt"))
    assert len(states) == 1
    assert study_mod.main(argv) == 0
    cell = states[0].name.removesuffix(".resume.pt")
    curve = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines() if json.loads(x).get("cell") == cell]
    assert [c["step"] for c in curve] == [1, 3]  # step 1 logged before the kill; the rerun starts at step 3
    row = next(r for r in read_jsonl(out / "rows.jsonl") if r.get("cell") == cell)
    assert row["status"] == "ok" and row["train_steps"] == 3 and not states[0].exists()


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('"val_loss", "psnr", "classifier_accuracy"', '"val_loss", "psnrr"', "hypotheses[1].metrics[1]"),
        ("lrs = [1e-3, 1e-2]", "lrs = [1e-3, -1.0]", "arms.ft.lrs[1]"),
        ('"salad", "salad_no_linear", "topk"', '"salad", "nope"', "cells[0].methods[1]"),
        ('name = "tiny"', "", "study.name"),
        ('comparison = "within"', 'comparison = "within"\nsparsity = 0.5', "hypotheses[0].sparsity"),
        ('arms = ["ft"]', 'arms = ["fast"]', "cells[0].arms[0]"),
        ("seeds = [0, 1]", "seeds = [0, 0]", "budget.seeds"),
        ('metrics = ["val_loss"]', 'metrics = ["psnr"]', "hypotheses[0].metrics"),
        ("[sweep]", "[sweep", "not valid TOML"),
    ],
)
def test_a_malformed_config_exits_2_naming_the_key(tiny, tmp_path, capsys, old, new, key):
    from salad_bench.harness.quality.stats import main as stats_main

    root, cfg = tiny
    bad = tmp_path / "bad.toml"
    text = cfg.read_text()
    assert old in text
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(StudyConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(bad)
    assert main(["--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert key in capsys.readouterr().err
    assert stats_main([str(tmp_path), "--config", str(bad)]) == 2  # the verdicts read the same config
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_committed_config_reads_and_names_its_hypotheses():
    c = load_config()
    assert [h.id for h in c.hypotheses] == ["h1_loss_parity", "h2_beats_sparse_lora", "h3_input_gate", "h4_linear_branch", "h5_rope"]
    assert c.steps == 1600 and c.batch == 8 and c.train_videos == 2000 and len(c.seeds) == 3
    assert all(len(a.lrs) == 3 for a in c.arms.values()) and c.arms["ft"].train_params == "all"
    p = plan(c)
    headline = {m for (m, arm), s in p.pairs.items() if s == (0.75, 0.85, 0.9, 0.95)}
    assert headline == {"salad", "salad_sta", "sla", "sparse_lora", "vsa"}  # topk: training-free, evaluated as is
    assert {c.method for c in p.as_is} >= {"full", "topk", "sta", "radial", "svg"}


def test_commit_run_commits_only_its_paths(tmp_path):
    from salad_bench.harness.quality.study import commit_run

    def git(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "other.txt").write_text("someone else's work\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "rows.jsonl").write_text("{}\n")
    assert commit_run([run / "rows.jsonl", run / "absent.md"], "a run", cwd=tmp_path).startswith("committed")
    assert git("show", "--name-only", "--format=").split() == ["run/rows.jsonl"]
    assert "other.txt" in git("status", "--porcelain")  # untouched
    assert commit_run([run / "rows.jsonl"], "again", cwd=tmp_path) == "nothing to commit"
    assert commit_run([run / "rows.jsonl"], "x", cwd=tmp_path / "run").startswith(("committed", "nothing"))
    outside = tmp_path.parent / f"{tmp_path.name}-nogit"
    outside.mkdir()
    assert commit_run([], "x", cwd=outside).startswith("not committed")


@pytest.mark.slow
def test_two_ranks_share_one_study(tiny):
    """torchrun, 2 ranks on the CPU (gloo barriers only): cells dealt out, one run, the same rows as one process would
    hold; a second call runs nothing."""
    import os
    import sys
    from pathlib import Path

    root, cfg = tiny
    two = root / "two-ranks.toml"
    two.write_text(cfg.read_text().replace('"salad", "salad_no_linear", "topk"', '"salad", "topk"'))
    out = root / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "salad_bench.harness.quality.study", "--config", str(two), "--out", str(out), "--device", "cpu",
           "--reports", "none"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[2]
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    per_rank = {f.name: [r for r in read_jsonl(f) if r["kind"] == "quality"] for f in sorted(out.glob("rows.rank*.jsonl"))}
    assert set(per_rank) == {"rows.rank0.jsonl", "rows.rank1.jsonl"} and all(per_rank.values())
    cells = [r for rows in per_rank.values() for r in rows]
    assert len(cells) == 2 + 4 + 4 and all(r["status"] == "ok" and r["world_size"] == 2 for r in cells)
    assert len({r["cell"] for r in cells}) == len(cells)  # every cell once
    summary = [r for r in read_jsonl(out / "rows.jsonl") if r["kind"] == "hypothesis"]  # rank 0's verdicts
    assert {r["hypothesis"] for r in summary} == {"parity", "linear", "free"}
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and "0 of 6 cells to run" in p.stdout and "0 of 4 cells to run" in p.stdout, p.stdout[-2000:]
