"""The quality study over ranks: methods dealt out by weight (evaluate --split methods under torchrun, through
the parallel launcher), one run directory (CPU, gloo, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salad_bench.harness.quality.parallel import assign, command, main, parse_args

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")
pytest.importorskip("salad_bench.harness.integrations.wan")


def test_assign_balances_heaviest_first_and_keeps_order():
    names = ["full", "salad", "topk", "vsa", "sta", "sla"]
    w = {"salad": 20, "vsa": 20, "sla": 20, "full": 1, "topk": 1, "sta": 1}
    shares = assign(names, w, 2)
    assert sorted(sum(shares, [])) == sorted(names)  # every method once
    loads = [sum(w[n] for n in s) for s in shares]
    assert max(loads) - min(loads) <= 20  # no better split exists with three 20s
    for s in shares:
        assert s == [n for n in names if n in s]  # the caller's order within a worker
    assert assign(["a"], {}, 3) == [["a"]]  # idle workers are dropped
    with pytest.raises(ValueError, match="at least one rank"):
        assign(names, w, 0)


def test_the_launcher_is_one_torchrun_command():
    a, extra = parse_args(["--methods", "full", "--out", "RUN", "--per-gpu", "3", "--", "--steps", "5"])
    cmd, env = command(a, extra, ["0", "1"], ["full", "salad"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=6" in cmd
    assert cmd[cmd.index("-m", 2) + 1] == "salad_bench.harness.quality.evaluate"
    assert cmd[-2:] == ["--steps", "5"] and "--no-latency" in cmd and "--resume" in cmd  # 3 ranks share a GPU
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    a, extra = parse_args(["--methods", "full", "--out", "RUN"])
    cmd, env = command(a, extra, ["0", "1"], ["full"])
    assert "--nproc_per_node=2" in cmd and "--no-latency" not in cmd  # one rank per GPU: latency measured


def test_launcher_refuses_flags_it_owns(tmp_path, capsys):
    for argv, needle in ((["--", "--resume"], "--resume is set by the launcher"), (["--per-gpu", "0"], "--per-gpu must be at least 1")):
        with pytest.raises(SystemExit) as ei:
            main(["--methods", "full", "--out", str(tmp_path), *argv])
        assert ei.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_share_one_run(tmp_path):
    from salad_bench.harness.quality.model import MiniWan, MiniWanConfig, save_checkpoint
    from salad_bench.harness.results import load_rows, read_jsonl, rows_files

    tiny = MiniWanConfig(num_layers=2, num_heads=2, head_dim=64, ffn_dim=64, freq_dim=32, frames=4, height=16, width=16)
    torch.manual_seed(0)
    save_checkpoint(MiniWan(tiny), tmp_path / "ckpt", {"steps_done": 0})
    out = tmp_path / "run"
    args = ["--methods", "full,topk,salad,sparse_lora", "--out", str(out), "--gpus", "none", "--per-gpu", "2",
            "--threads", "1", "--", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", "--sparsity", "0.5",
            "--steps", "2", "--batch", "2", "--train-samples", "4", "--n-val", "2", "--n-eval", "2", "--sample-steps",
            "2", "--eval-batch", "2", "--save-samples", "--no-base-bar"]  # fmt: skip
    assert main(args) == 0
    files = rows_files(out)
    assert [f.name for f in files] == ["rows.rank0.jsonl", "rows.rank1.jsonl"]
    # the three fine-tuned cells (20 evaluated ones each: salad, sparse_lora, the full control) heaviest first,
    # the rest evens the load
    assert [[r["label"] for r in read_jsonl(f)] for f in files] == [["salad", "full_ft"], ["full", "topk", "sparse_lora"]]
    rows = load_rows(out).to_dict("records")
    assert sorted(r["label"] for r in rows) == ["full", "full_ft", "salad", "sparse_lora", "topk"]
    assert all(r["status"] == "ok" and "ms" not in r for r in rows)  # a shared device: no latency
    for r in rows:  # per-video values for paired intervals
        assert len(r["val_loss_per_video"]) == 2 and len(r["ssim_per_video"]) == 2
        assert r["val_loss"] == pytest.approx(np.mean(r["val_loss_per_video"]), rel=1e-6)
    with np.load(out / "samples.npz") as f:  # both workers' videos survive the shared file
        assert {r["cell"] for r in rows} <= set(f.files)
    log = (out / "log.txt").read_text()
    assert "[rank 0]" in log and "[rank 1]" in log
    assert main(args) == 0  # everything is done: a second call runs nothing
    assert len(load_rows(out)) == 5
