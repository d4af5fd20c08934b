"""Training: schedule, exact resume, what trains per ``train_params``, the base-training CLI, DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from salad_bench.harness.quality.data import ProceduralVideos  # noqa: E402
from salad_bench.harness.quality.model import MiniWan, MiniWanConfig, load_checkpoint  # noqa: E402
from salad_bench.harness.quality.train import (  # noqa: E402
    TrainConfig,
    finetune,
    lr_at,
    train_loop,
    trainable_parameters,
)

TINY = MiniWanConfig(num_layers=1, num_heads=2, head_dim=64, ffn_dim=64, freq_dim=32, frames=2, height=16, width=16)
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_lr_schedule_warmup_stable_then_linear_decay():
    cfg = TrainConfig(steps=140, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, decay_start=100)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == 1.0 and lr_at(99, cfg) == 1.0
    assert lr_at(100, cfg) == 1.0 and lr_at(110, cfg) == pytest.approx(0.75) and lr_at(139, cfg) == pytest.approx(0.025)
    assert lr_at(140, cfg) == 0.0 and lr_at(500, cfg) == 0.0
    assert lr_at(120, dataclasses.replace(cfg, min_lr_ratio=0.2)) == pytest.approx(0.6)
    for bad in (-1, 141):
        with pytest.raises(ValueError, match="decay_start"):
            TrainConfig(steps=140, decay_start=bad)


def _fresh():
    torch.manual_seed(0)
    return MiniWan(TINY)


def test_time_budget_does_not_count_the_first_step(monkeypatch):
    """A slow first step (Triton compilation and autotuning on the GPU) must not eat a method's budget."""
    import salad_bench.harness.quality.train as tr

    clock = iter([0.0, 50.0, 51.0, 52.0, 53.0, 54.0, 55.0])  # t0, then one reading per step
    monkeypatch.setattr(tr.time, "perf_counter", lambda: next(clock, 99.0))
    data = ProceduralVideos("train", 16, TINY.spec)
    m = _fresh()
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, dataset_size=16, bf16=False, time_budget_s=2.5)
    r = train_loop(m, list(m.parameters()), data, cfg, device=torch.device("cpu"))
    # step 1 ends at 50 s (not counted); steps 2..4 end at 51..53 s: 3 s > 2.5 s after step 4
    assert r.stopped_early and r.steps == 4, (r.steps, r.reason)
    assert "after the first step's 50.0 s" in r.reason


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = ProceduralVideos("train", 16, TINY.spec)
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, dataset_size=16, bf16=False, ckpt_every=2)
    a = _fresh()
    train_loop(a, list(a.parameters()), data, cfg, device=torch.device("cpu"))
    b = _fresh()
    state = tmp_path / "state.pt"
    # interrupted run: the same recipe, stopped after 2 steps (a time budget of 0 s; the clock starts after step 1)
    r = train_loop(
        b,
        list(b.parameters()),
        data,
        dataclasses.replace(cfg, time_budget_s=0.0),
        device=torch.device("cpu"),
        state_path=state,
    )
    assert r.stopped_early and r.steps == 2 and state.exists()
    c = _fresh()
    r2 = train_loop(c, list(c.parameters()), data, cfg, device=torch.device("cpu"), state_path=state)
    assert r2.steps == 4
    for (n, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_resumed_recipe_ignores_free_and_retired_fields_only():
    from salad_bench.harness.quality.train import RESUME_FREE, RETIRED, recipe_of

    base = TrainConfig(steps=4, lr=1e-3).as_dict()
    older = {k: v for k, v in base.items() if k != "label_dropout"}  # saved before a field existed: its default
    assert recipe_of(older) == recipe_of(base)
    changed = {**base, "compile": True, "time_budget_s": 5.0, **{k: "anything" for k in RETIRED}}
    assert recipe_of(changed) == recipe_of(base) and "compile" in RESUME_FREE
    assert recipe_of({**base, "lr": 2e-3}) != recipe_of(base)


def test_resume_with_another_recipe_is_refused(tmp_path):
    data = ProceduralVideos("train", 8, TINY.spec)
    cfg = TrainConfig(steps=1, batch_size=2, dataset_size=8, bf16=False)
    m = _fresh()
    train_loop(m, list(m.parameters()), data, cfg, device=torch.device("cpu"), state_path=tmp_path / "s.pt")
    with pytest.raises(ValueError, match="lr"):
        train_loop(
            m,
            list(m.parameters()),
            data,
            dataclasses.replace(cfg, lr=1.0),
            device=torch.device("cpu"),
            state_path=tmp_path / "s.pt",
        )


def test_fit_to_budget_shrinks_the_run():
    data = ProceduralVideos("train", None, TINY.spec)
    cfg = TrainConfig(steps=10_000, batch_size=2, bf16=False, time_budget_s=2.0, fit_to_budget=True, fit_after=2)
    m = _fresh()
    r = train_loop(m, list(m.parameters()), data, cfg, device=torch.device("cpu"))
    assert r.steps_planned < 10_000 and r.steps <= r.steps_planned


def test_what_trains_per_train_params():
    wan = pytest.importorskip("salad_bench.harness.integrations.wan")
    m = _fresh()
    base = {id(p) for p in m.parameters()}
    methods = wan.install_attention(m.transformer, "salad", sparsity=0.5)
    own = trainable_parameters(m, methods, "method")
    assert own and all(id(p) not in base for p in own)
    assert {id(p) for p in own} == {id(p) for mm in methods for p in mm.parameters()}
    assert all(not p.requires_grad for p in m.parameters() if id(p) in base)
    everything = trainable_parameters(m, methods, "all")
    assert {id(p) for p in everything} == {id(p) for p in m.parameters()}
    assert {id(p) for p in trainable_parameters(m, methods)} == {id(p) for p in m.parameters()}  # "all" by default
    assert all(p.requires_grad for p in m.parameters())

    m2 = _fresh()
    lora = wan.install_attention(m2.transformer, "sparse_lora", sparsity=0.5)
    declared = {id(p) for mm in lora for p in mm.trainable_parameters()}
    assert {id(p) for p in trainable_parameters(m2, lora, "method")} == declared
    with pytest.raises(ValueError, match="train_params"):
        trainable_parameters(m2, lora, "some")


def test_finetune_moves_only_the_method_and_reports_no_grad_methods():
    wan = pytest.importorskip("salad_bench.harness.integrations.wan")
    data = ProceduralVideos("train", 8, TINY.spec)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0, dataset_size=8, bf16=False)
    m = _fresh()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    methods = wan.install_attention(m.transformer, "salad", sparsity=0.5)
    res, trained = finetune(m, methods, data, cfg, train_params="method", device=torch.device("cpu"))
    count = sum(p.numel() for p in trained)
    assert res.steps == 2 and count > 0
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base frozen
    assert any(p.abs().sum() > 0 for mm in methods for p in mm.proj.parameters())  # zero-init proj moved

    m2 = _fresh()
    off = wan.install_attention(m2.transformer, "salad_no_linear", sparsity=0.5)
    res2, _ = finetune(m2, off, data, cfg, train_params="method", device=torch.device("cpu"))
    assert res2.steps == 0 and "gradient" in res2.reason


def test_finetune_all_trains_every_parameter():
    """train_params="all" (the default): the whole DiT and the method's own parameters move together."""
    wan = pytest.importorskip("salad_bench.harness.integrations.wan")
    data = ProceduralVideos("train", 8, TINY.spec)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, dataset_size=8, bf16=False)
    m = _fresh()
    methods = wan.install_attention(m.transformer, "salad", sparsity=0.5)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res, trained = finetune(m, methods, data, cfg, device=torch.device("cpu"))
    assert res.steps == 3 and {id(p) for p in trained} == {id(p) for p in m.parameters()}
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    # every tensor moves but those that get no gradient from a single-layer tiny model and start at zero
    still = sorted(set(before) - moved)
    assert all(float(before[n].abs().max()) == 0 for n in still), still
    assert len(moved) > 0.9 * len(before) and any(n.startswith("prompt") for n in moved)
    assert any("sparse_method" in n for n in moved) and any("to_q" in n for n in moved)
    assert not any(p.requires_grad for p in m.parameters())  # frozen again after training
    # sparse_lora with "all": the whole DiT and the LoRA adapters, not its frozen sub-method's own parameters
    m2 = _fresh()
    lora = wan.install_attention(m2.transformer, "sparse_lora", sparsity=0.5)
    chosen = {id(p) for p in trainable_parameters(m2, lora, "all")}
    own = {id(p) for mm in lora for p in mm.parameters()} - {id(p) for mm in lora for p in mm.trainable_parameters()}
    assert chosen == {id(p) for p in m2.parameters()} - own
    assert {id(p) for mm in lora for p in mm.trainable_parameters()} <= chosen


class _Affine(torch.nn.Module):
    """``velocity = w * x_t``: small enough to differentiate by hand."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))

    def forward(self, x, t, labels):
        return self.w * x


def test_distill_loss_is_zero_for_the_teacher_and_its_gradient_matches_a_hand_computation():
    from salad_bench.harness.quality.metrics import distill_mse

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    t, labels = torch.tensor([0.25, 0.75]), torch.zeros(2, dtype=torch.long)
    teacher = _Affine(0.5).requires_grad_(False)
    assert float(distill_mse(_Affine(0.5), teacher, x0, labels, t, noise).mean().detach()) == 0.0
    student = _Affine(2.0)
    loss = distill_mse(student, teacher, x0, labels, t, noise).mean()
    loss.backward()
    # by hand: x_t = (1 - t) x0 + t noise; loss = mean_b mean_i ((w - w0) x_t)^2; d/dw = 2 (w - w0) mean(x_t^2)
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    assert float(loss.detach()) == pytest.approx(1.5**2 * float(xt.square().mean()), rel=1e-6)
    assert float(student.w.grad) == pytest.approx(2 * 1.5 * float(xt.square().mean()), rel=1e-6)
    assert teacher.w.grad is None


def test_distill_objective_in_the_training_loop():
    """With the student equal to its teacher every step's loss is 0; the objective is part of the recipe."""
    wan = pytest.importorskip("salad_bench.harness.integrations.wan")
    data = ProceduralVideos("train", 8, TINY.spec)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, dataset_size=8, bf16=False, log_every=1,
                      objective="distill")  # fmt: skip
    teacher = _fresh().requires_grad_(False)
    m = _fresh()
    methods = wan.install_attention(m.transformer, "full")  # dense attention: the student computes the teacher
    res, _ = finetune(m, methods, data, cfg, device=torch.device("cpu"), teacher=teacher)
    assert res.steps == 2 and all(r["loss"] == pytest.approx(0.0, abs=1e-10) for r in res.curve)
    with pytest.raises(ValueError, match="teacher"):
        finetune(_fresh(), [], data, cfg, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="kl")
    # a sparse student against the dense teacher: a positive loss that training lowers
    s = _fresh()
    sparse = wan.install_attention(s.transformer, "salad", sparsity=0.5)
    long = dataclasses.replace(cfg, steps=6, lr=3e-3)
    r2, _ = finetune(s, sparse, data, long, device=torch.device("cpu"), teacher=teacher)
    assert r2.curve[0]["loss"] > 0


def test_finetuned_checkpoint_round_trip_and_bad_files(tmp_path):
    from salad_bench.harness.quality.model import CheckpointError, load_finetuned, save_finetuned

    wan = pytest.importorskip("salad_bench.harness.integrations.wan")
    data = ProceduralVideos("train", 8, TINY.spec)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0, dataset_size=8, bf16=False)
    m = _fresh()
    methods = wan.install_attention(m.transformer, "salad", sparsity=0.5)
    _, trained = finetune(m, methods, data, cfg, train_params="method", device=torch.device("cpu"))
    paths = save_finetuned(m, trained, tmp_path / "salad", {"method": "salad", "train_steps": 2}, max_shard_bytes=131_100)
    assert len(paths) >= 2 and all(p.stat().st_size < 131_100 for p in paths)  # sharded under the limit
    m2 = _fresh()
    wan.install_attention(m2.transformer, "salad", sparsity=0.5)
    assert load_finetuned(m2, tmp_path / "salad")["train_steps"] == 2
    for (n, p), q in zip(m.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q), n
    m3 = _fresh()
    wan.install_attention(m3.transformer, "topk", sparsity=0.5)  # no salad parameters to receive them
    with pytest.raises(CheckpointError, match="install the same method"):
        load_finetuned(m3, tmp_path / "salad")
    paths[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_finetuned(m2, tmp_path / "salad")


def test_interrupted_finetune_resumes_from_its_state(tmp_path):
    wan = pytest.importorskip("salad_bench.harness.integrations.wan")
    data = ProceduralVideos("train", 8, TINY.spec)
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=0, dataset_size=8, bf16=False, ckpt_every=1)
    a = _fresh()
    ma = wan.install_attention(a.transformer, "salad", sparsity=0.5)
    finetune(a, ma, data, cfg, device=torch.device("cpu"))
    b = _fresh()
    mb = wan.install_attention(b.transformer, "salad", sparsity=0.5)
    state = tmp_path / "resume.pt"
    r1, _ = finetune(b, mb, data, dataclasses.replace(cfg, time_budget_s=0.0), device=torch.device("cpu"), state_path=state)
    assert r1.stopped_early and r1.steps == 2
    c = _fresh()
    mc = wan.install_attention(c.transformer, "salad", sparsity=0.5)
    r2, _ = finetune(c, mc, data, cfg, device=torch.device("cpu"), state_path=state)
    assert r2.steps == 4
    for (n, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


class _Recorder(torch.nn.Module):
    """``velocity = w * x_t``; keeps what each forward received."""

    def __init__(self, null_label: int | None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.null_label = null_label
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, labels):
        self.seen.append((x.detach().clone(), t.detach().clone(), labels.clone()))
        return self.w * x


def _record(p: float, steps: int = 3, batch: int = 64) -> tuple[_Recorder, ProceduralVideos, TrainConfig]:
    data = ProceduralVideos("train", None, TINY.spec)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=0, bf16=False, label_dropout=p, seed=3)
    m = _Recorder(TINY.num_classes)
    train_loop(m, list(m.parameters()), data, cfg, device=torch.device("cpu"))
    return m, data, cfg


def test_label_dropout_draws_are_deterministic_near_p_and_leave_t_and_noise_alone():
    from salad_bench.harness.quality.data import ShardedSampler
    from salad_bench.harness.quality.train import sample_t

    p = 0.3
    a, data, cfg = _record(p)
    b, _, _ = _record(p)
    none, _, _ = _record(0.0)
    null = TINY.num_classes
    sampler = ShardedSampler(None, cfg.batch_size, seed=cfg.seed)
    dropped = 0
    for step, ((x, t, lab), (x2, t2, lab2), (xn, tn, labn)) in enumerate(zip(a.seen, b.seen, none.seen, strict=True)):
        assert torch.equal(lab, lab2) and torch.equal(x, x2) and torch.equal(t, t2)  # the same draws every run
        assert torch.equal(x, xn) and torch.equal(t, tn)  # t and noise: the draws of a run without dropout
        x0, true = data.batch(sampler.batch_indices(step), "cpu")
        assert torch.equal(labn, true)  # p = 0: the true labels
        # the scheme: the step's generator draws t, noise, then the dropout numbers for the whole batch
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        want_t = sample_t(cfg.batch_size, cfg.t_sampling, gen)
        want_noise = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < p
        tt = want_t.view(-1, 1, 1, 1, 1)
        assert torch.equal(t, want_t) and torch.equal(x, (1 - tt) * x0 + tt * want_noise)
        assert torch.equal(lab, torch.where(drop, torch.full_like(true, null), true))
        dropped += int((lab == null).sum())
    rate = dropped / (len(a.seen) * cfg.batch_size)
    assert 0.2 < rate < 0.4, rate  # 192 draws at p = 0.3: about 0.3


def test_label_dropout_needs_a_null_class_and_a_rate_below_one():
    data = ProceduralVideos("train", 8, TINY.spec)
    cfg = TrainConfig(steps=1, batch_size=2, dataset_size=8, bf16=False, label_dropout=0.1)
    m = _fresh()
    with pytest.raises(ValueError, match="null class.*add_null_class"):
        train_loop(m, list(m.parameters()), data, cfg, device=torch.device("cpu"))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_dropout"):
            TrainConfig(label_dropout=bad)
    torch.manual_seed(0)
    nc = MiniWan(dataclasses.replace(TINY, null_class=True))
    assert train_loop(nc, list(nc.parameters()), data, cfg, device=torch.device("cpu")).steps == 1


def _run(args, env=None, timeout=120):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)


def test_train_base_cli_writes_a_loadable_checkpoint_with_a_card(tmp_path):
    out = tmp_path / "ckpt"
    p = _run([sys.executable, "-m", "salad_bench.harness.quality.train_base", "--out", str(out), "--tiny", "--steps", "3", "--batch", "2",
              "--n-val", "2", "--val-every", "3"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    model, card = load_checkpoint(out)
    assert card["steps_done"] == 3 and card["train_config"]["batch_size"] == 2 and card["val_loss"] > 0
    assert "git_sha" in card and (out / "README.md").exists()
    curve = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]
    assert curve[-1]["step"] == 3 and "val_loss" in curve[-1]
    # the same command where the checkpoint has no resume state (another machine) must not start over on it
    shutil.rmtree(out / "resume", ignore_errors=True)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    again = _run([sys.executable, "-m", "salad_bench.harness.quality.train_base", "--out", str(out), "--tiny", "--steps", "3",
                  "--batch", "2", "--n-val", "2", "--val-every", "3"])  # fmt: skip
    assert again.returncode == 2 and "a fresh start would overwrite it" in again.stderr, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


def test_ranks_take_their_share_of_the_global_batch():
    from salad_bench.harness.quality.data import ShardedSampler

    for size in (None, 24):
        one = ShardedSampler(size, 6, seed=3)
        for step in (0, 5):
            glob = one.batch_indices(step)
            for r in range(3):
                s = ShardedSampler(size, 2, rank=r, world=3, seed=3)
                assert s.batch_indices(step) == [glob[i] for i in s.positions()]  # noise follows the sample
            assert sorted(i for r in range(3) for i in ShardedSampler(size, 2, rank=r, world=3).positions()) == list(range(6))


@pytest.mark.slow
def test_ddp_on_two_ranks_equals_one_process_and_resumes_under_another_rank_count(tmp_path):
    """torchrun, 2 ranks (gloo): the same steps as one process with the same global batch; the state they save
    is continued by one process to the weights of an uninterrupted single-process run."""
    from salad_bench.harness.quality.train_base import TINY as BASE_TINY
    from salad_bench.harness.quality.train_base import main as train_base

    common = ["--tiny", "--steps", "3", "--batch", "4", "--lr", "1e-3", "--n-val", "2", "--val-every", "0", "--device", "cpu"]
    # two ranks, stopped after step 2 (a time budget of 0 s; its clock starts after step 1)
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "salad_bench.harness.quality.train_base", "--out", str(tmp_path / "ddp"), *common,
              "--time-budget", "0"], timeout=240)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    _, card = load_checkpoint(tmp_path / "ddp")  # written by rank 0
    assert card["world_size"] == 2 and card["steps_done"] == 2 and card["stopped_early"]
    assert train_base(["--out", str(tmp_path / "one"), *common, "--time-budget", "1e9"]) == 0
    state = tmp_path / "ddp" / "resume" / "state.pt"
    assert train_base(["--out", str(tmp_path / "resumed"), *common, "--time-budget", "1e9", "--state", str(state)]) == 0

    def curve(run: str) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / "curves.jsonl").read_text().splitlines())}

    assert curve("ddp")[1] == pytest.approx(curve("one")[1], rel=1e-5)  # the same global batch, noise and t
    torch.manual_seed(0)
    init = MiniWan(BASE_TINY).state_dict()
    one, resumed = (load_checkpoint(tmp_path / run)[0].state_dict() for run in ("one", "resumed"))
    moved = sum(float((one[k] - init[k]).norm() ** 2) for k in init) ** 0.5
    apart = sum(float((one[k] - resumed[k]).norm() ** 2) for k in init) ** 0.5
    assert moved > 0 and apart < 1e-3 * moved, (apart, moved)  # rounding only: not another trajectory
