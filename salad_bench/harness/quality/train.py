"""Training: the full-attention base model from scratch, and the fine-tuning of trained methods.

Objective (Wan's flow matching): ``x_t = (1 - t) x0 + t * noise``, the network predicts the velocity
``noise - x0``, loss = MSE (``objective="flow"``). ``objective="distill"`` matches a frozen teacher's
velocity at the same ``x_t`` and ``t`` instead (:func:`~harness.quality.metrics.distill_mse`; the study's
teacher is the base model with full attention), with the same draws of ``t``, noise and batches. ``t`` is drawn logit-normal (``sigmoid(N(0, 1))``, SD3's and most Wan
trainers' choice) by default, or uniform (``t_sampling``). Each step's ``t`` and noise are drawn for the
whole global batch from a CPU generator seeded by ``(seed, step)`` and each rank takes its samples' share,
and the batch indices come from a stateless sampler, so a resumed run sees exactly the batches an
uninterrupted run would have seen, and N ranks see exactly what one process with the same global batch
sees (DDP averages the ranks' gradients of equal shards: the same step).

Label dropout (``label_dropout`` p > 0, Wan2.1's prompt dropout for classifier-free guidance): each
sample's label is replaced by the model's null class (:attr:`~harness.quality.model.MiniWan.null_label`)
with probability p, drawn from the same generator after ``t`` and noise (so those draws are the same
whatever p, and p = 0 draws nothing). The val loss stays conditional (true labels).

Optimiser: AdamW (betas 0.9/0.99, weight decay 0.01 on every trained tensor), one schedule for
everything: linear warm-up for ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` (or, with
``decay_start``, constant until that step and then a straight line down: warm-up, stable, decay); gradient
clipping at ``grad_clip`` (global norm); bf16 autocast on CUDA (fp32 master weights), fp32 on the CPU.

Distributed: ``torchrun``-ready. With ``WORLD_SIZE > 1`` :func:`init_distributed` starts the process
group (NCCL on CUDA, gloo on the CPU), each rank renders its own shard of every global batch
(:class:`~harness.quality.data.ShardedSampler`), the model is wrapped in DDP, and only rank 0 writes
curves, states and checkpoints; a state saved by N ranks resumes under any rank count that divides the
global batch. A full fine-tune of a real Wan2.1 that does not fit one GPU shards it instead
(:func:`harness.quality.fsdp.shard_for_finetune`, docs/SCALE_OUT.md).

Curves: one JSON object per logged step appended to a JSONL file (``phase``, ``method``, ``step``,
``loss``, ``lr``, ``grad_norm``, ``elapsed_s``, and ``val_loss`` when measured).
Resume: ``state_path`` holds model, optimiser and step (torch.save, written atomically every
``ckpt_every`` steps and at the end); a run started with an existing state continues from it.

Fine-tuning (:func:`trainable_parameters`, :func:`finetune`): the method is installed into the model
first (``harness.integrations.wan.install_attention``); ``train_params`` says what trains: ``"all"``
(default, as the peers fine-tune: SLA and TurboDiffusion train the whole DiT) = every parameter of the
model, the method's included; ``"method"`` = only what the method adds (its ``trainable_parameters()``
when it defines one, else all its parameters), the base model frozen: the adapter-only arm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from salad_bench.harness.distributed import Dist
from salad_bench.harness.quality.data import ProceduralVideos, ShardedSampler
from salad_bench.harness.quality.metrics import distill_mse, flow_matching_mse, val_loss
from salad_bench.harness.quality.sampler import autocast

__all__ = [
    "BASE_DEFAULTS",
    "FINETUNE_DEFAULTS",
    "LABEL_DROPOUT",
    "CurveLogger",
    "Dist",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "RESUME_FREE",
    "RETIRED",
    "compile_blocks",
    "drop_labels",
    "finetune",
    "init_distributed",
    "lr_at",
    "recipe_of",
    "sample_t",
    "train_loop",
    "trainable_parameters",
]

TrainParams = Literal["method", "all"]
Objective = Literal["flow", "distill"]


@dataclass(frozen=True)
class TrainConfig:
    """One training run's recipe. ``batch_size`` is global (split over ranks)."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    dataset_size: int | None = None  # None: an endless stream of fresh videos
    seed: int = 0
    log_every: int = 10
    val_every: int = 0
    ckpt_every: int = 0
    bf16: bool = True
    time_budget_s: float | None = None  # stop early (the steps actually done are reported); the clock starts after step 1
    fit_to_budget: bool = False  # after ``fit_after`` steps, shrink ``steps`` (and the schedule) to fit the budget
    fit_after: int = 30
    objective: Objective = "flow"  # "distill": match a frozen teacher's velocity (train_loop's ``teacher``)
    compile: bool = False  # torch.compile the model's repeated blocks (regional compilation) before training
    label_dropout: float = 0.0  # each label replaced by the model's null class with this probability (CFG training)
    # warm-up, stable, decay: constant lr from the warm-up's end to this step, then linear to min_lr_ratio * lr at
    # ``steps`` (a cooldown after a constant-lr plateau); None: the cosine from the warm-up's end
    decay_start: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.objective not in ("flow", "distill"):
            raise ValueError(f"objective must be flow or distill; got {self.objective!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"need steps >= 0 and batch_size >= 1; got {self.steps}, {self.batch_size}")
        if self.t_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampling must be logit_normal or uniform; got {self.t_sampling!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0):
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1); got {self.label_dropout}")
        if self.decay_start is not None and not 0 <= self.decay_start <= self.steps:
            raise ValueError(f"decay_start must be in [0, steps={self.steps}]; got {self.decay_start}")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# Base model: ~3 minutes on one H100 at the default size; the recipe for fine-tuning.
BASE_DEFAULTS = TrainConfig(steps=3000, batch_size=8, lr=5e-4, warmup_steps=200, val_every=500, ckpt_every=500)
FINETUNE_DEFAULTS = TrainConfig(steps=1600, batch_size=8, lr=1e-3, warmup_steps=50, dataset_size=2000, log_every=10, ckpt_every=200)
# Wan2.1's prompt dropout: the base recipe's, and every fine-tuning's of a base with a null class
LABEL_DROPOUT = 0.1


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr`` at ``steps``; with
    ``decay_start``, ``lr`` until that step and a straight line to ``min_lr_ratio * lr`` at ``steps`` instead."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_start is not None:
        frac = min(1.0, max(0, step - cfg.decay_start) / max(1, cfg.steps - cfg.decay_start))
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * frac)
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def drop_labels(labels: torch.Tensor, drop: torch.Tensor, null_label: int) -> torch.Tensor:
    """``labels`` with the entries where ``drop`` (bool, same shape) is true replaced by ``null_label``."""
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)


def sample_t(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Training times in (0, 1): logit-normal ``sigmoid(N(0,1))`` or uniform."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    return torch.rand(n, generator=gen)


# -- distributed ----------------------------------------------------------------------------------
def init_distributed(device: str = "auto", *, exclusive: bool = False, hint: str = "") -> tuple[Dist, torch.device]:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``: NCCL on CUDA, gloo on the
    CPU) and pick this rank's device (``cuda:LOCAL_RANK``). ``exclusive``: refuse more ranks on a host than
    GPUs (anything that times; ``hint`` ends the refusal)."""
    from salad_bench.harness.distributed import rank_device

    dist = Dist.from_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.world > 1 and device.startswith("cuda"):
        device = rank_device("cuda", dist, exclusive=exclusive, hint=hint)  # each rank its own GPU, whatever index was named
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    if dist.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist, dev


def _all_mean(x: float, dist: Dist, device: torch.device) -> float:
    if dist.world == 1:
        return x
    t = torch.tensor([x], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t) / dist.world


def _any(flag: bool, dist: Dist, device: torch.device) -> bool:
    if dist.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# -- logging --------------------------------------------------------------------------------------
class CurveLogger:
    """Appends one JSON object per call to a JSONL file (nothing when ``path`` is None or not rank 0)."""

    def __init__(self, path: str | Path | None, *, enabled: bool = True, echo: bool = False, **fields: Any) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        self.echo = echo
        self.fields = fields
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def with_fields(self, **fields: Any) -> CurveLogger:
        other = CurveLogger(self.path, enabled=self.enabled, echo=self.echo, **{**self.fields, **fields})
        return other

    def log(self, **row: Any) -> None:
        full = {**self.fields, **row}
        if self.echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in full.items()), flush=True)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(full) + "\n")


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    val_loss: float | None
    seconds: float
    stopped_early: bool = False
    reason: str = ""
    steps_planned: int = 0
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` the repeated transformer blocks of every diffusers model inside ``model``, in place
    (diffusers' regional compilation, as a DiT is deployed): parameters and state dict stay the eager
    model's, and an installed attention method's kernels run as registered operators inside the graphs."""
    found = [m for m in model.modules() if getattr(m, "_repeated_blocks", None) and hasattr(m, "compile_repeated_blocks")]
    if not found:
        raise ValueError("compile: the model holds no diffusers model with repeated blocks to compile; train it eager")
    for m in found:
        m.compile_repeated_blocks(fullgraph=True)


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "config": cfg.as_dict()}, tmp)
    os.replace(tmp, path)


# what may change when a run resumes (how long and how often it reports, not what it trains)
RESUME_FREE = ("time_budget_s", "log_every", "val_every", "ckpt_every", "compile")
# fields that older cards and states carry and that never changed what was trained (sdpa_first: which exact
# SDPA backend torch tried first, removed after it measured no faster; docs/lab/2026-12-07-flat-heads.md)
RETIRED = ("sdpa_first",)


def recipe_of(config: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with ``config`` (a saved ``TrainConfig.as_dict()``, possibly older than
    some fields: those take their defaults): everything but :data:`RESUME_FREE` and :data:`RETIRED`."""
    return {k: v for k, v in {**TrainConfig().as_dict(), **config}.items() if k not in RESUME_FREE + RETIRED}


def _load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot read the training state ({type(exc).__name__}: {exc}); delete it to start over"
        ) from None
    old, new = recipe_of(state.get("config", {})), recipe_of(cfg.as_dict())
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(
            f"{path}: saved with a different recipe ({', '.join(diff)}); delete it or use the same settings"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def _fit_steps(
    cfg: TrainConfig, step: int, done: int, seconds: float, elapsed: float, dist: Dist, device: torch.device
) -> TrainConfig:
    """Shrink ``cfg.steps`` so the run ends inside ``time_budget_s`` at the pace of the last ``done`` steps
    (``seconds`` long: measured after the first half of ``fit_after``, so warm-up does not count), with a
    5% margin. Ranks agree on the pace."""
    per_step = _all_mean(seconds / max(1, done), dist, device)
    fit = step + int(max(0.0, 0.95 * cfg.time_budget_s - elapsed) / per_step)
    if fit >= cfg.steps:
        return cfg
    return dataclasses.replace(cfg, steps=fit, warmup_steps=min(cfg.warmup_steps, fit // 5))


def train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    data: ProceduralVideos,
    cfg: TrainConfig,
    *,
    device: torch.device,
    dist: Dist = Dist(),
    curve: CurveLogger | None = None,
    state_path: str | Path | None = None,
    val_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_t: Callable[[torch.Tensor], None] | None = None,
    stop_if_no_grad: bool = False,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train ``params`` of ``model`` (called as ``model(x_t, t, labels)``) with flow matching, or with
    ``cfg.objective == "distill"`` against ``teacher`` (frozen, same call signature; required then).

    ``on_t(t)`` runs before each forward with the batch's times (step-aware methods). With
    ``stop_if_no_grad`` the run ends after the first step when no parameter received a gradient.
    """
    curve = curve or CurveLogger(None)
    if cfg.objective == "distill" and teacher is None:
        raise ValueError("objective 'distill' needs a teacher model")
    null_label = getattr(model, "null_label", None)
    if cfg.label_dropout > 0 and null_label is None:
        raise ValueError(
            f"label_dropout {cfg.label_dropout:g} needs a model with a null class (MiniWanConfig(null_class=True), "
            "or harness.quality.model.add_null_class for a trained one); or train with label_dropout 0"
        )
    if not params:
        return TrainResult(0, None, None, 0.0, reason="no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start = 0
    state_file = Path(state_path) if state_path is not None else None
    if state_file is not None and state_file.exists():
        start = _load_state(state_file, model, opt, cfg)
    fwd: nn.Module = model
    if dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    if cfg.batch_size % dist.world:
        raise ValueError(f"global batch {cfg.batch_size} does not split over {dist.world} ranks")
    sampler = ShardedSampler(
        cfg.dataset_size, cfg.batch_size // dist.world, rank=dist.rank, world=dist.world, seed=cfg.seed
    )
    if cfg.compile:
        compile_blocks(model)
    model.train()
    t0 = time.perf_counter()
    loss_val: float | None = None
    vloss: float | None = None
    result = TrainResult(start, None, None, 0.0, steps_planned=cfg.steps)
    t_half = 0.0
    t_first = 0.0  # the first step carries Triton compilation and autotuning: the time budget starts after it
    step = start
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, labels = data.batch(sampler.batch_indices(step), device)
        # t and noise for the whole global batch, then this rank's samples' share: any rank count draws the
        # same numbers for the same sample (one rank: the draws of the single-process recipe)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        t_all = sample_t(cfg.batch_size, cfg.t_sampling, gen)
        noise_all = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=gen)
        mine = sampler.positions()
        t, noise = t_all[mine].to(device), noise_all[mine].to(device)
        if cfg.label_dropout > 0:  # drawn after t and noise: those stay the draws of a run without dropout
            drop_all = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
            labels = drop_labels(labels, drop_all[mine], null_label)
        if on_t is not None:
            on_t(t_all.to(device))  # step-aware methods: every rank picks the step from the same times
        with autocast(device, cfg.bf16):
            if cfg.objective == "distill":
                loss = distill_mse(fwd, teacher, x0, labels, t, noise).mean()
            else:
                loss = flow_matching_mse(fwd, x0, labels, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        if stop_if_no_grad and step == start and not _any(any(p.grad is not None for p in params), dist, device):
            result.reason = "no parameter receives a gradient"
            result.steps = 0
            break
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1:
            loss_val = _all_mean(float(loss.detach()), dist, device)
            row = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "elapsed_s": round(elapsed, 3)}
            if val_data is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                vloss = val_loss(model, *val_data, bf16=cfg.bf16)
                model.train()
                row["val_loss"] = vloss
            if dist.main:
                curve.log(**row)
            result.curve.append(row)
        if state_file is not None and dist.main and cfg.ckpt_every and step % cfg.ckpt_every == 0:
            _save_state(state_file, model, opt, step, cfg)
        if step == start + 1:
            t_first = elapsed
        half = start + max(1, cfg.fit_after // 2)
        if step == half:
            t_half = elapsed
        if cfg.fit_to_budget and cfg.time_budget_s and step == start + cfg.fit_after and step > half:
            cfg = _fit_steps(cfg, step, step - half, elapsed - t_half, elapsed - t_first, dist, device)
            result.steps_planned = cfg.steps
        over = cfg.time_budget_s is not None and elapsed - t_first > cfg.time_budget_s
        if _any(over, dist, device) and step < cfg.steps:
            result.stopped_early = True
            result.reason = (f"time budget of {cfg.time_budget_s:.0f} s (after the first step's {t_first:.1f} s) "
                             f"reached at step {step} of {cfg.steps}")
            break
    if result.reason != "no parameter receives a gradient":
        result.steps = step
    result.final_loss = loss_val if loss_val is not None else (float(loss.detach()) if step > start else None)
    result.val_loss = vloss
    result.seconds = time.perf_counter() - t0
    if state_file is not None and dist.main and step > start:
        _save_state(state_file, model, opt, step, cfg)
    model.eval()
    return result


# -- fine-tuning ----------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module, methods: list[nn.Module], train_params: TrainParams = "all") -> list[nn.Parameter]:
    """Select and unfreeze what trains; freeze the rest.

    ``"method"``: each installed method's ``trainable_parameters()`` if it defines one, else all its
    parameters. ``"all"``: every parameter of the model (a method that declares
    ``trainable_parameters()`` keeps its other parameters frozen, e.g. sparse_lora's frozen sub-method).
    """
    if train_params not in ("method", "all"):
        raise ValueError(f"train_params must be 'method' or 'all'; got {train_params!r}")
    declared: list[nn.Parameter] = []
    method_ids: set[int] = set()
    for m in methods:
        own = list(m.trainable_parameters()) if hasattr(m, "trainable_parameters") else list(m.parameters())
        declared.extend(own)
        method_ids.update(id(p) for p in m.parameters())
    if train_params == "method":
        chosen = declared
    else:
        keep = {id(p) for p in declared}
        chosen = [p for p in model.parameters() if id(p) not in method_ids or id(p) in keep]
    chosen_ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen_ids)
    unique: dict[int, nn.Parameter] = {id(p): p for p in chosen}
    return list(unique.values())


def finetune(
    model: nn.Module,
    methods: list[nn.Module],
    data: ProceduralVideos,
    cfg: TrainConfig,
    *,
    train_params: TrainParams = "all",
    device: torch.device,
    dist: Dist = Dist(),
    curve: CurveLogger | None = None,
    on_t: Callable[[torch.Tensor], None] | None = None,
    state_path: str | Path | None = None,
    teacher: nn.Module | None = None,
) -> tuple[TrainResult, list[nn.Parameter]]:
    """Fine-tune a model whose attention methods are installed; returns the result and the parameters
    that trained. With ``state_path`` the run saves its state there and resumes from it if present;
    ``teacher``: the frozen model ``cfg.objective == "distill"`` matches."""
    params = trainable_parameters(model, methods, train_params)
    result = train_loop(
        model, params, data, cfg, device=device, dist=dist, curve=curve, on_t=on_t, stop_if_no_grad=True,
        state_path=state_path, teacher=teacher,
    )  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    return result, params


# -- the base model -------------------------------------------------------------------------------
def train_base_model(
    out_dir: str | Path,
    model_cfg: Any,
    cfg: TrainConfig,
    *,
    device: torch.device,
    dist: Dist = Dist(),
    n_val: int = 32,
    curve_path: str | Path | None = None,
    state_path: str | Path | None = None,
    echo: bool = False,
    init_seed: int = 0,
) -> dict[str, Any]:
    """Train the full-attention mini Wan from scratch and save it (rank 0) with its card; returns the card."""
    from salad_bench.harness.quality.data import CLASS_NAMES
    from salad_bench.harness.quality.model import MiniWan, count_parameters, save_checkpoint
    from salad_bench.harness.results import provenance

    torch.manual_seed(init_seed)
    model = MiniWan(model_cfg).to(device)
    data = ProceduralVideos("train", cfg.dataset_size, model_cfg.spec, model_cfg.num_classes)
    val = ProceduralVideos("val", n_val, model_cfg.spec, model_cfg.num_classes)
    val_data = val.batch(list(range(n_val)), device)
    curve = CurveLogger(curve_path, enabled=dist.main, echo=echo and dist.main, phase="base", method="full")
    state = Path(state_path) if state_path is not None else Path(out_dir) / "resume" / "state.pt"
    res = train_loop(
        model,
        list(model.parameters()),
        data,
        cfg,
        device=device,
        dist=dist,
        curve=curve,
        state_path=state,
        val_data=val_data,
    )
    final_val = val_loss(model, *val_data, bf16=cfg.bf16)
    prov = provenance(str(device))
    import diffusers

    card = {
        "name": "mini-wan",
        "architecture": "diffusers WanTransformer3DModel (Wan2.1), pixel space, class-conditioned",
        "parameters": count_parameters(model),
        "tokens_per_video": model_cfg.spec.tokens,
        "latent_grid": list(model_cfg.grid),
        "objective": f"flow matching: x_t=(1-t)x0+t*noise, target noise-x0, t~{cfg.t_sampling}"
        + (f"; labels replaced by the null class with p={cfg.label_dropout:g} (CFG training)" if cfg.label_dropout else ""),
        "dataset": f"procedural videos (harness/quality/data.py), {len(CLASS_NAMES)} classes, train seeds "
        + ("0.. (endless stream)" if cfg.dataset_size is None else f"0..{cfg.dataset_size - 1}"),
        "train_config": cfg.as_dict(),
        "world_size": dist.world,
        "steps_done": res.steps,
        "steps_planned": res.steps_planned,
        "samples_seen": res.steps * cfg.batch_size,
        "stopped_early": res.stopped_early,
        "stop_reason": res.reason,
        "train_loss_last": res.final_loss,
        "val_loss": final_val,
        "val_set": f"{n_val} val videos (seeds 1e9..), t grid 0.1..0.9 (5), noise seed 4321",
        "train_seconds": round(res.seconds, 1),
        "git_sha": prov["git_sha"],
        "git_dirty": prov["git_dirty"],
        "card": prov["card"],
        "torch": prov["torch"],
        "diffusers": diffusers.__version__,
        "date": prov["date"],
    }
    if dist.main:
        save_checkpoint(model, out_dir, card)
    if echo and dist.main:
        print(f"base model: {res.steps} steps, val_loss {final_val:.4f}, {res.seconds:.0f} s -> {out_dir}", flush=True)
    return card
