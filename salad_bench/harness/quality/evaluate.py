"""``python -m salad_bench.harness.quality.evaluate``: the quality study on the mini Wan, one row per cell.

    python -m salad_bench.harness.quality.evaluate --checkpoint checkpoints/mini-wan-v2 \
        --methods full,topk,salad,sparse_lora --sparsity 0.9 --steps 1600 --out results/quality/<run>

A *cell* is one method at one target sparsity with one fine-tuning recipe (:class:`Recipe`: what trains,
the objective, learning rate, seed, steps) or none (evaluated as it is). The many-cell study of issue #25
(learning-rate sweep, seeds, sparsities, arms) is :mod:`harness.quality.study`, which runs these cells.

A base with a null class (trained with label dropout, as Wan2.1 is) is sampled as its bar samples it,
with classifier-free guidance ``EvalSettings.guidance`` (5.0, ``--guidance``), and every fine-tuning
keeps label dropout 0.1 so that guidance still works afterwards; a base without one is sampled unguided
and fine-tuned without dropout. Both follow the base, as the base itself does: neither enters a cell's
``config_hash``; the rows record them (``sample_guidance``, ``train_label_dropout``).

For every cell: load the base checkpoint afresh, install the method into every self-attention layer
(``harness.integrations.wan.install_attention``; new parameters initialised from the recipe's seed),
fine-tune it when the registry marks the method ``trainable`` (trait; the same recipe and budget for
every such method; ``train_params`` "all" by default: the whole DiT trains, as the peers fine-tune;
"method": the adapter-only arm), apply post-training steps (``drop_fraction`` > 0: SALAD's dropping of the
weakest linear branches after a gate calibration pass), then measure:

* ``val_loss``: flow-matching MSE on held-out videos at a fixed grid of ``t`` with points in every
  timestep band and fixed noise (:func:`harness.quality.metrics.velocity_metrics`); ``val_loss_band<j>``
  per band (they partition the overall mean), each with its per-video list; ``val_loss_full`` is the base
  model's and ``val_loss_rel = val_loss / val_loss_full - 1`` (the excess over the fine-tuned full control
  is a comparison between rows: ``harness.quality.stats``);
* ``velocity_mse``: the velocity's MSE against the base model's (full attention, the teacher) at the
  same ``(x_t, t)``, per band too;
* ``psnr``, ``ssim``: the cell's sampled videos against the base model's videos from the same noise and
  class;
* ``classifier_accuracy``, ``frechet_distance``: sample quality against real videos through the
  base-model bar's classifier (:func:`harness.quality.metrics.sample_quality`; ``sample_quality``
  "skipped" with its reason when that classifier is not there);
* ``temporal_flickering``: VBench's formula on the mp4 files the VBench adapter writes, decoded as VBench
  decodes them (``temporal_flickering_source``), so it agrees with VBench's own run on those files
  (``temporal_flickering_full``: the base model's videos; ``_data``: real validation videos);
* ``density``: the measured kept-tile fraction averaged over every attention call of the sampling run;
  ``ms``: one model forward (batch 1) through the harness's timing helper.

With trainable methods selected, the reference dense method (trait ``reference``) is also fine-tuned with
the same recipe (``--control``, on by default): the full-attention control every claim is measured
against, its rows labelled ``<reference>_ft`` (``label`` column; ``arm`` names the recipe). The
reference itself is evaluated as it is (the base model, the teacher).

A method that fails to install or run gives a row with ``status`` "skipped" (:class:`~methods.Unsupported`)
or "error" and the reason; the study goes on. Rows are ``kind="quality"`` and go through
:class:`harness.results.RowWriter`; a cell's identity (``config_hash``) covers the method, the target and
the recipe, so ``--resume`` skips exactly the cells already ``ok``, and a killed fine-tuning continues
from its state in ``--finetuned-dir``. Curves of every fine-tuning go to ``<out>/curves.jsonl``;
``--save-samples`` stores all sampled videos (uint8) in ``<out>/samples.npz``.

Before any work the base checkpoint must pass the base-model bar (``harness/quality/base_bar.py``'s
``require_base_bar``, when that module exists): a base that does not is refused (exit 2) unless
``--no-base-bar``; the rows record which (``base_bar``).

Several GPUs, ``torchrun --nproc_per_node=G -m salad_bench.harness.quality.evaluate ...``:

* ``--split methods`` (default): the cells are dealt out over the ranks (a fine-tuned cell weighs
  ``--trainable-weight`` evaluated ones; heaviest first to the least-loaded rank); each rank fine-tunes
  and measures its own on its own GPU into ``<out>/rows.rank<R>.jsonl``. Cells the run already holds
  as ``ok`` are left out with ``--resume``, so the same command continues a killed study under any rank
  count. More ranks than GPUs on a host are refused unless ``--no-latency`` (nothing is timed then).
* ``--split batch``: every cell in turn is fine-tuned data-parallel over all ranks (DDP, the global
  ``--batch`` split over them: the same steps as one process); rank 0 measures and writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salad_bench.harness.distributed import barrier, deal
from salad_bench.harness.errors import EXIT_BAD_INPUT, BadInput, Parser, check_writable_dir
from salad_bench.harness.quality.data import CLASS_NAMES, ProceduralVideos
from salad_bench.harness.quality.metrics import (
    T_BANDS,
    band_grid,
    band_means,
    fidelity,
    sample_quality,
    temporal_flickering_mp4,
    temporal_flickering_videos,
    to_uint8,
    velocity_metrics,
)
from salad_bench.harness.quality.model import MiniWan, load_checkpoint, save_finetuned
from salad_bench.harness.quality.sampler import autocast, euler_sample, make_noise
from salad_bench.harness.quality.train import (
    FINETUNE_DEFAULTS,
    LABEL_DROPOUT,
    CurveLogger,
    Dist,
    Objective,
    TrainConfig,
    TrainParams,
    finetune,
    init_distributed,
)

__all__ = [
    "Cell",
    "EvalSettings",
    "QualityStudy",
    "Recipe",
    "arm_name",
    "check_base_bar",
    "done_hashes",
    "main",
    "make_cell",
    "parse_args",
    "run_cells",
    "with_base_label_dropout",
]

BASE_BAR_MODULE = "salad_bench.harness.quality.base_bar"
DEFAULT_CLASSIFIER = "checkpoints/video-classifier"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is measured and on how much data (defaults: the committed study)."""

    n_val: int = 32  # validation videos for val_loss and velocity_mse
    n_eval: int = 16  # sampled videos per cell (one per class)
    sample_steps: int = 20
    guidance: float = 5.0  # classifier-free guidance of a base with a null class (the bar's); 1 for one without
    noise_seed: int = 2024
    eval_batch: int = 8
    latency: bool = True
    save_samples: bool = False
    vbench_dims: tuple[str, ...] = ()
    vbench_python: str | None = None
    t_bands: tuple[float, ...] = T_BANDS  # timestep bands of the per-band losses
    t_per_band: int = 2  # grid points of t inside each band
    keep_videos: bool = False  # keep each cell's mp4 files under <out>/vbench/<tag>/videos (always with vbench_dims)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.guidance) and self.guidance >= 1):
            raise ValueError(f"guidance must be a number >= 1 (1: no guidance); got {self.guidance}")

    @property
    def t_grid(self) -> tuple[float, ...]:
        return band_grid(self.t_bands, self.t_per_band)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a cell fine-tunes; the rest of the recipe (batch, data, warm-up, schedule) is the study's budget.

    ``arm`` names the recipe in rows and labels (:func:`arm_name` for the CLI's); ``steps`` is the target
    (a time cap may stop earlier; the row says)."""

    arm: str = "ft"
    train_params: TrainParams = "all"
    objective: Objective = "flow"
    lr: float = FINETUNE_DEFAULTS.lr
    seed: int = 0
    steps: int = FINETUNE_DEFAULTS.steps

    def __post_init__(self) -> None:
        if self.train_params not in ("all", "method") or self.objective not in ("flow", "distill"):
            raise ValueError(f"train_params all|method and objective flow|distill; got {self.train_params}, {self.objective}")
        if not (self.lr > 0 and self.steps >= 0):
            raise ValueError(f"need lr > 0 and steps >= 0; got {self.lr}, {self.steps}")

    def config(self, budget: TrainConfig) -> TrainConfig:
        """The training config of this recipe on ``budget`` (its warm-up at most a fifth of the steps)."""
        return dataclasses.replace(budget, lr=self.lr, seed=self.seed, steps=self.steps, objective=self.objective,
                                   warmup_steps=min(budget.warmup_steps, self.steps // 5))  # fmt: skip


def with_base_label_dropout(budget: TrainConfig, base: MiniWan) -> TrainConfig:
    """``budget`` with the label dropout fine-tuning ``base`` needs: :data:`~harness.quality.train.LABEL_DROPOUT`
    for a base with a null class (unless the budget sets its own), so guidance still works after fine-tuning;
    none for a base without one (a budget that asks for it is refused)."""
    if base.null_label is None:
        if budget.label_dropout > 0:
            raise ValueError(
                f"label_dropout {budget.label_dropout:g}: the base has no null class to drop labels to; "
                "fine-tune it with label_dropout 0, or use a base trained with label dropout"
            )
        return budget
    return budget if budget.label_dropout > 0 else dataclasses.replace(budget, label_dropout=LABEL_DROPOUT)


def arm_name(train_params: str, objective: str) -> str:
    """The CLI's arm names: ``ft`` (whole model, flow matching), ``distill``, ``adapter``, ``adapter_distill``."""
    base = "ft" if train_params == "all" else "adapter"
    return base if objective == "flow" else ("distill" if base == "ft" else "adapter_distill")


def _traits(name: str) -> frozenset[str]:
    from salad_bench.methods import METHODS

    return METHODS.get(name).traits


def _family(name: str) -> str:
    from salad_bench.methods import METHODS

    return METHODS.get(name).family


def reference_method() -> str:
    """The registry's reference dense method (trait ``reference``)."""
    from salad_bench.methods import METHODS

    names = METHODS.with_trait("reference")
    if len(names) != 1:
        raise ValueError(f"the registry needs exactly one method with the trait 'reference'; got {names}")
    return names[0]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method at one target sparsity with a recipe (None: evaluated as it is) and its row label."""

    method: str
    sparsity: float
    recipe: Recipe | None
    label: str

    @property
    def trains(self) -> bool:
        return self.recipe is not None

    def identity(self, budget: TrainConfig) -> dict[str, Any]:
        """What makes two rows the same measurement: hashed into ``config_hash`` (resume, latest-row-wins). Like
        the base checkpoint, what follows from the base (label dropout, sampling guidance) is not part of it."""
        train = None
        if self.recipe is not None:
            cfg = self.recipe.config(budget).as_dict()
            keep = ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "betas", "grad_clip",
                    "t_sampling", "dataset_size", "seed", "objective")  # fmt: skip
            train = {"train_params": self.recipe.train_params, **{k: cfg[k] for k in keep}}
        return {"method": self.method, "sparsity_target": round(float(self.sparsity), 6), "train": train}

    def config_hash(self, budget: TrainConfig) -> str:
        from salad_bench.harness.results import config_hash

        return config_hash(self.identity(budget))

    @property
    def tag(self) -> str:
        """A file-safe name of the cell (checkpoints, videos, samples)."""
        t = f"{self.label}@{self.sparsity:g}"
        if self.recipe is not None:
            r = self.recipe
            t += f"-lr{r.lr:g}-seed{r.seed}-steps{r.steps}"
        return t


def make_cell(name: str, sparsity: float, recipe: Recipe | None, *, control: bool = False, default_arm: str = "ft") -> Cell:
    """The cell of ``name``: dense methods (trait) at target 0; the recipe kept only for a ``trainable`` method,
    or for the ``reference`` one with ``control`` (the fine-tuned full-attention control); labels ``<name>``
    (default arm, or untrained), ``<name>+<arm>``, ``<reference>_ft`` (the control; ``+<arm>`` for another arm)."""
    traits = _traits(name)
    target = 0.0 if "dense" in traits else float(sparsity)
    if "trainable" not in traits and not (control and "reference" in traits):
        recipe = None  # training-free, or the base reference itself: evaluated as it is
    if recipe is None:
        return Cell(name, target, None, name)
    stem = f"{name}_ft" if "reference" in traits else name
    return Cell(name, target, recipe, stem if recipe.arm == default_arm else f"{stem}+{recipe.arm}")


def step_for_t(t: float, num_steps: int) -> int:
    """The Euler step whose time is closest to ``t`` (step 0 is t=1)."""
    return int(min(num_steps - 1, max(0, round((1.0 - float(t)) * num_steps))))


def default_classifier(checkpoint: str | Path) -> str | None:
    """The video classifier that judged ``checkpoint``'s bar (its ``bar.json``), else ``checkpoints/video-classifier``
    when it exists; None when neither (sample quality is then skipped, with that reason)."""
    bar = Path(checkpoint) / "bar.json"
    try:
        named = json.loads(bar.read_text()).get("classifier") if bar.exists() else None
    except ValueError:
        named = None
    for cand in (named, DEFAULT_CLASSIFIER):
        if cand and Path(cand).is_dir():
            return str(cand)
    return None


def check_base_bar(checkpoint: str | Path, *, skip: bool = False) -> str:
    """Ask the base-model bar (``harness/quality/base_bar.py``'s ``require_base_bar``) whether ``checkpoint``
    may carry the study. Returns what the rows record: "passed", or "not checked: why" (skipped, or the
    module not there yet). Whatever ``require_base_bar`` raises (the base misses the bar) propagates."""
    if skip:
        return "not checked (--no-base-bar)"
    try:
        mod = importlib.import_module(BASE_BAR_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != BASE_BAR_MODULE:
            raise
        return "not checked: harness/quality/base_bar.py does not exist yet"
    require = getattr(mod, "require_base_bar", None)
    if require is None:
        return "not checked: base_bar has no require_base_bar"
    require(checkpoint)
    return "passed"


class QualityStudy:
    """Holds the base model (the teacher), the validation/eval data and the base model's reference videos."""

    def __init__(
        self,
        base: MiniWan,
        card: dict[str, Any],
        *,
        device: torch.device,
        settings: EvalSettings = EvalSettings(),
        ft_cfg: TrainConfig = FINETUNE_DEFAULTS,
        checkpoint: str = "",
        dist: Dist = Dist(),
        curve: CurveLogger | None = None,
        base_bar: str = "",
    ) -> None:
        self.base = base.to(device).eval().requires_grad_(False)
        self.card = card
        self.device = device
        self.s = settings
        # the budget: batch, data, warm-up, schedule (a cell's recipe sets lr, seed, steps); label dropout follows the base
        self.ft_cfg = with_base_label_dropout(ft_cfg, base)
        self.null_label = base.null_label
        self.guidance = settings.guidance if self.null_label is not None else 1.0  # what the sampler uses
        self.checkpoint = checkpoint
        self.dist = dist
        self.curve = curve or CurveLogger(None)
        self.base_bar = base_bar
        self.steps_cap: int | None = None  # --fit-steps-to: run at most this many steps (identity keeps the target)
        self.vbench_dir = "vbench"
        self.finetuned_dir: str | None = None  # per-cell checkpoints of what trained (None: not saved)
        self.sparsity = 0.9
        self.classifier_dir: str | None = None  # the video classifier of sample quality (None: rows say skipped)
        cfg = base.config
        self.spec = cfg.spec
        val = ProceduralVideos("val", settings.n_val, self.spec, cfg.num_classes)
        self.val_data = val.batch(list(range(settings.n_val)), device)
        self.train_data = ProceduralVideos("train", ft_cfg.dataset_size, self.spec, cfg.num_classes)
        n = settings.n_eval
        self.eval_labels = torch.arange(n, device=device) % cfg.num_classes
        self.eval_noise = make_noise(n, self.spec, settings.noise_seed, device)
        self.samples: dict[str, np.ndarray] = {}
        # the reference and teacher: the base model with diffusers' own attention processor
        ref = velocity_metrics(self.base, *self.val_data, t_grid=settings.t_grid, batch_size=settings.eval_batch)
        self.val_loss_full = float(ref["loss"].mean())
        self.ref_videos = self._sample(self.base, None)
        flick = self._flicker(self.ref_videos, "reference_full")
        self.flicker_full = flick["temporal_flickering"]
        real = val.batch(list(range(n)), "cpu")[0]
        self.flicker_data = self._flicker(real, "real_data")["temporal_flickering"]
        if settings.save_samples:
            self.samples["reference_full"] = to_uint8(self.ref_videos)

    # -- pieces ---------------------------------------------------------------------------------
    def _sample(
        self, model: torch.nn.Module, on_step, densities: list[float] | None = None, methods=None
    ) -> torch.Tensor:
        def fwd(x, t, labels):
            out = model(x, t, labels)
            if densities is not None and methods:
                densities.append(float(np.mean([m.report().density for m in methods])))
            return out

        outs = []
        bs = self.s.eval_batch
        for s in range(0, self.s.n_eval, bs):
            outs.append(
                euler_sample(
                    fwd,
                    self.eval_noise[s : s + bs],
                    self.eval_labels[s : s + bs],
                    num_steps=self.s.sample_steps,
                    on_step=on_step,
                    guidance=self.guidance,
                    null_label=self.null_label,
                )
            )
        return torch.cat(outs)

    def _prompts(self, n: int) -> list[str]:
        return [CLASS_NAMES[int(i)] for i in (torch.arange(n) % self.base.config.num_classes)]

    def _mp4_dir(self, tag: str) -> Path:
        return Path(self.vbench_dir) / tag / "videos"

    def _flicker(self, videos: torch.Tensor, tag: str) -> dict[str, Any]:
        """Temporal flickering on the mp4 files the VBench adapter writes (kept under ``vbench_dir`` when VBench
        runs or ``keep_videos``); the uint8 frames' score when no mp4 can be written or read (the row says)."""
        from salad_bench.harness.quality.vbench import write_custom_input

        keep = bool(self.s.vbench_dims) or self.s.keep_videos
        try:
            with tempfile.TemporaryDirectory() as tmp:
                folder = self._mp4_dir(tag) if keep else Path(tmp)
                paths = write_custom_input(videos, self._prompts(videos.shape[0]), folder)
                res = temporal_flickering_mp4(paths)
            return {"temporal_flickering": res["score"], "temporal_flickering_per_video": [round(x, 6) for x in res["per_video"]],
                    "temporal_flickering_source": f"mp4 ({res['reader']})"}  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - no ffmpeg/imageio: the uint8 frames, and the row says so
            return {"temporal_flickering": temporal_flickering_videos(videos),
                    "temporal_flickering_source": f"uint8 frames (mp4 failed: {type(exc).__name__}: {str(exc)[:120]})"}  # fmt: skip

    def _latency(self, model: torch.nn.Module) -> dict[str, Any]:
        from salad_bench.harness.timing import measure

        x = self.eval_noise[:1]
        t = torch.full((1,), 0.5, device=self.device)
        lab = self.eval_labels[:1]

        def run():
            with torch.no_grad(), autocast(self.device):
                model(x, t, lab)

        return measure(run, self.device, warmup_ms=50, rep_ms=200).as_row()

    def _calibrate_and_drop(self, model: MiniWan, methods: list) -> list[int] | None:
        """SALAD's post-training drop: mean gate per layer on validation data, then switch off the
        linear branch of the ``drop_fraction`` of layers with the smallest gates."""
        frac = max(float(getattr(m.config, "drop_fraction", 0.0)) for m in methods)
        if frac <= 0:
            return None
        from salad_bench.methods.salad import drop_weakest_linear_branches

        sums = [0.0] * len(methods)
        grid = (0.1, 0.3, 0.5, 0.7, 0.9)
        videos, labels = self.val_data
        x0, lab = videos[: self.s.eval_batch], labels[: self.s.eval_batch]
        with torch.no_grad():
            for t_val in grid:
                t = torch.full((x0.shape[0],), t_val, device=self.device)
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).to(self.device)
                with autocast(self.device):
                    model((1 - t_val) * x0 + t_val * noise, t, lab)
                for i, m in enumerate(methods):
                    sums[i] += float(m.gate_mean)
        for i, m in enumerate(methods):
            m.gate_mean = torch.tensor(sums[i] / len(grid), device=m.gate_mean.device)
        return drop_weakest_linear_branches(methods, frac)

    def _row_head(self, cell: Cell) -> dict[str, Any]:
        r = cell.recipe
        return {
            "kind": "quality",
            "method": cell.method,
            "label": cell.label,
            "arm": r.arm if r is not None else "as_is",
            "family": _family(cell.method),
            "sparsity_target": cell.sparsity,
            "config_hash": cell.config_hash(self.ft_cfg),
            "cell": cell.tag,
            "workload": f"mini-wan {'x'.join(map(str, self.spec.grid))}",
            "pass": "sample",
            "dtype": "bf16" if self.device.type == "cuda" else "fp32",
            "device": str(self.device),
            "B": 1,
            "H": self.base.config.num_heads,
            "N": self.spec.tokens,
            "D": self.base.config.head_dim,
            "grid": list(self.spec.grid),
            "checkpoint": self.checkpoint,
            "checkpoint_steps": self.card.get("steps_done"),
            "base_bar": self.base_bar,
            "train_params": r.train_params if r is not None else None,
            "objective": r.objective if r is not None else None,
            "train_seed": r.seed if r is not None else None,
            "train_lr": r.lr if r is not None else None,
            "train_steps_target": r.steps if r is not None else 0,
            "train_steps": 0,
            "train_batch": self.ft_cfg.batch_size,
            "train_samples": self.ft_cfg.dataset_size,
            "train_label_dropout": self.ft_cfg.label_dropout if r is not None else None,
            "sample_steps": self.s.sample_steps,
            "sample_guidance": self.guidance,
            "n_eval": self.s.n_eval,
            "n_val": self.s.n_val,
            "t_bands": list(self.s.t_bands),
            "t_grid": list(self.s.t_grid),
            "val_loss_full": self.val_loss_full,
            "temporal_flickering_full": self.flicker_full,
            "temporal_flickering_data": self.flicker_data,
        }

    def _finetune(self, cell: Cell, model: MiniWan, methods: list, knobs: dict[str, Any], on_t) -> dict[str, Any]:
        r = cell.recipe
        cfg = r.config(self.ft_cfg)
        if self.steps_cap is not None and self.steps_cap < cfg.steps:
            cfg = dataclasses.replace(cfg, steps=self.steps_cap, warmup_steps=min(cfg.warmup_steps, self.steps_cap // 5))
        curve = self.curve.with_fields(phase="finetune", method=cell.method, label=cell.label, cell=cell.tag)
        ckpt = Path(self.finetuned_dir) / cell.tag if self.finetuned_dir else None
        state = ckpt.with_name(f"{cell.tag}.resume.pt") if ckpt is not None else None
        res, trained = finetune(
            model, methods, self.train_data, cfg, train_params=r.train_params, device=self.device, dist=self.dist,
            curve=curve, on_t=on_t, state_path=state, teacher=self.base if r.objective == "distill" else None,
        )  # fmt: skip
        out = {"train_steps": res.steps, "train_steps_planned": cfg.steps, "trainable_params": sum(p.numel() for p in trained),
               "train_seconds": round(res.seconds, 2), "train_loss_last": res.final_loss, "train_note": res.reason}  # fmt: skip
        if r.objective == "distill":
            out["teacher"] = "the base model, full attention, frozen"
        if ckpt is not None and self.dist.main and res.steps > 0:
            info = {"method": cell.method, "label": cell.label, "knobs": knobs, "sparsity_target": cell.sparsity,
                    "recipe": dataclasses.asdict(r), "train_steps": res.steps, "train_config": cfg.as_dict(),
                    "base_checkpoint": self.checkpoint, "base_steps": self.card.get("steps_done"),
                    "base_val_loss": self.card.get("val_loss")}  # fmt: skip
            save_finetuned(model, trained, ckpt, info)
            out["finetuned_checkpoint"] = str(ckpt)
        if state is not None and self.dist.main and not res.stopped_early:
            state.unlink(missing_ok=True)  # done: the checkpoint above is what stays
        return out

    def _measure(self, cell: Cell, model: MiniWan, methods: list, row: dict[str, Any]) -> None:
        from salad_bench.harness.integrations.wan import set_step

        n_steps = self.s.sample_steps
        grid, bands = self.s.t_grid, self.s.t_bands
        vm = velocity_metrics(
            model, *self.val_data, teacher=self.base, t_grid=grid, batch_size=self.s.eval_batch,
            on_t=lambda t: set_step(model.transformer, step_for_t(t, n_steps), n_steps),
        )  # fmt: skip
        for key, name in (("loss", "val_loss"), ("teacher_mse", "velocity_mse")):
            per_video = vm[key].mean(axis=1)
            row[name] = float(per_video.mean())
            row[f"{name}_per_video"] = [float(f"{x:.7g}") for x in per_video]
            for j, band in enumerate(band_means(vm[key], grid, bands).T):
                row[f"{name}_band{j}"] = float(np.mean(band))
                row[f"{name}_band{j}_per_video"] = [float(f"{x:.7g}") for x in band]
        row["val_loss_rel"] = row["val_loss"] / self.val_loss_full - 1.0
        densities: list[float] = []
        videos = self._sample(model, lambda i: set_step(model.transformer, i, n_steps), densities, methods)
        row["density"] = float(np.mean(densities)) if densities else None
        row["sparsity"] = None if row["density"] is None else 1.0 - row["density"]
        fid = fidelity(videos, self.ref_videos)
        row["psnr"] = None if fid["psnr"] == float("inf") else fid["psnr"]
        row["psnr_identical"] = fid["psnr"] == float("inf")
        row["ssim"] = fid["ssim"]
        row["psnr_per_video"] = [None if math.isinf(x) else round(x, 4) for x in fid["psnr_per_video"]]
        row["ssim_per_video"] = [round(x, 5) for x in fid["ssim_per_video"]]
        row.update(sample_quality(videos, self.eval_labels, self.val_data[0], classifier_dir=self.classifier_dir))
        row.update(self._flicker(videos, cell.tag))
        if self.s.latency:
            set_step(model.transformer, n_steps // 2, n_steps)
            row.update(self._latency(model))
        if self.s.save_samples:
            self.samples[cell.tag] = to_uint8(videos)
        if self.s.vbench_dims:
            row.update(self._vbench(cell.tag))

    # -- one cell -------------------------------------------------------------------------------
    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Fine-tune (when the cell has a recipe) and evaluate one cell; returns its row."""
        from salad_bench.harness.integrations.wan import install_attention, set_step
        from salad_bench.harness.results import config_hash
        from salad_bench.methods import Unsupported

        row = self._row_head(cell)
        model = copy.deepcopy(self.base)
        n_steps = self.s.sample_steps
        try:
            torch.manual_seed(cell.recipe.seed if cell.recipe is not None else 0)  # new parameters: from the seed
            methods = install_attention(model.transformer, cell.method, sparsity=cell.sparsity, num_steps=n_steps)
            model.to(self.device)
            knobs = methods[0].knobs()
            row["config"] = json.dumps(knobs, sort_keys=True, default=str)
            row["method_config_hash"] = config_hash({"method": cell.method, **knobs})

            def on_t(t: torch.Tensor) -> None:
                set_step(model.transformer, step_for_t(float(t.float().mean()), n_steps), n_steps)

            if cell.trains:
                row.update(self._finetune(cell, model, methods, knobs, on_t))
            else:
                row["train_note"] = "evaluated as is"
            model.eval()
            dropped = self._calibrate_and_drop(model, methods) if hasattr(methods[0], "gate_mean") else None
            if dropped is not None:
                row["dropped_layers"] = dropped
            if not self.dist.main:
                return row
            self._measure(cell, model, methods, row)
            no_steps = cell.trains and row.get("train_steps", 0) == 0
            row["status"], row["reason"] = "ok", row.get("train_note", "") if no_steps else ""
        except Unsupported as exc:
            row.update(status="skipped", reason=str(exc)[:500])
        except Exception as exc:  # one broken method must not end the study
            row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:500]}")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def run_method(self, name: str, sparsity: float, recipe: Recipe | None = None) -> dict[str, Any]:
        """:meth:`run_cell` of ``make_cell(name, sparsity, recipe)``."""
        return self.run_cell(make_cell(name, sparsity, recipe))

    def probe_step_seconds(self, cell: Cell, steps: int = 3) -> float:
        """Seconds per fine-tuning step of ``cell`` (``steps`` steps, the first one discarded as warm-up)."""
        from salad_bench.harness.integrations.wan import install_attention

        model = copy.deepcopy(self.base)
        methods = install_attention(model.transformer, cell.method, sparsity=cell.sparsity, num_steps=self.s.sample_steps)
        model.to(self.device)
        cfg = dataclasses.replace(cell.recipe.config(self.ft_cfg), steps=steps, log_every=1, time_budget_s=None,
                                  fit_to_budget=False)  # fmt: skip
        res, _ = finetune(
            model, methods, self.train_data, cfg, train_params=cell.recipe.train_params, device=self.device,
            dist=self.dist, teacher=self.base,
        )  # no state_path: a probe must not leave a resumable state behind
        rows = [r for r in res.curve if r["step"] in (1, res.steps)]
        if res.steps < 2 or len(rows) < 2:
            return 0.0
        return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (res.steps - 1)

    def _vbench(self, tag: str) -> dict[str, Any]:
        """VBench (its own environment) on the mp4 files :meth:`_flicker` kept for this cell."""
        from salad_bench.harness.quality.vbench import VBenchUnavailable, run_vbench

        out = Path(self.vbench_dir) / tag
        try:
            res = run_vbench(out / "videos", self.s.vbench_dims, out / "results", python=self.s.vbench_python)
            return {f"vbench_{d}": v for d, v in res.scores.items()} | {"vbench_runner": res.runner}
        except (VBenchUnavailable, OSError, ValueError) as exc:
            return {"vbench_reason": str(exc)[:300]}


# -- running cells ----------------------------------------------------------------------------------
def existing_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every row of the run directory ``out`` (all its rows files; none when it does not exist)."""
    from salad_bench.harness.results import read_jsonl, rows_files

    return [r for f in rows_files(out) if f.stat().st_size for r in read_jsonl(f, warn=False)] if Path(out).is_dir() else []


def done_hashes(rows: Iterable[dict[str, Any]]) -> set[str]:
    """``config_hash`` of every ``ok`` quality row: the cells a resumed run leaves out."""
    return {str(r.get("config_hash")) for r in rows if r.get("kind") == "quality" and r.get("status") == "ok"}


def deal_cells(cells: list[Cell], rank: int, world: int, trainable_weight: float) -> list[Cell]:
    """This rank's share of ``cells`` (heaviest first to the least-loaded rank), in the order given."""
    owner = deal([trainable_weight if c.trains else 1.0 for c in cells], world)
    return [c for c, r in zip(cells, owner, strict=True) if r == rank]


def run_cells(
    study: QualityStudy, cells: list[Cell], writer, *, out: Path, time_budget: float | None = None,
    t_start: float | None = None, tag: str = "", extras: dict[Cell, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``cells`` in order, appending each row at once (with its ``extras`` fields); cells already ``ok`` in
    the run are left out, and after ``time_budget`` seconds (from ``t_start``) the rest get ``skipped`` rows."""
    t_start = time.perf_counter() if t_start is None else t_start
    rows = []
    for cell in cells:
        extra = (extras or {}).get(cell)
        if writer is not None and cell.config_hash(study.ft_cfg) in done_hashes(writer.existing):
            print(f"{tag}{cell.tag}: already in {out}, skipped (resume)", flush=True)
            continue
        if time_budget is not None and time.perf_counter() - t_start > time_budget:
            row = {**study._row_head(cell), **(extra or {}), "status": "skipped",
                   "reason": f"study time budget of {time_budget:.0f} s used up"}  # fmt: skip
            if writer is not None:
                writer.append(row)
            continue
        t0 = time.perf_counter()
        row = {**study.run_cell(cell), **(extra or {})}
        if writer is not None:
            rows.append(writer.append(row))
            print(tag + _summary(row, time.perf_counter() - t0), flush=True)
        if writer is not None and study.s.save_samples and study.samples:
            save_samples(out / "samples.npz", study.samples, study.eval_labels.cpu().numpy())
    return rows


def save_samples(path: Path, samples: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Merge ``samples`` into ``path`` (an earlier call's methods stay; the same method is replaced) and
    write it atomically, so a killed or resumed study keeps every video sampled so far."""
    import fcntl  # the ranks of a study (--split methods) share one samples file

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_samples(path, samples, labels)


def _merge_samples(path: Path, samples: dict[str, np.ndarray], labels: np.ndarray) -> None:
    merged: dict[str, np.ndarray] = {}
    if path.exists():
        try:
            with np.load(path) as old:
                merged = {k: old[k] for k in old.files}
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable samples file ({exc}); move it away or delete it to start afresh") from None
        if "labels" in merged and not np.array_equal(merged["labels"], labels):
            raise ValueError(f"{path}: its videos are for other evaluation labels; use another --out")
    merged.update(samples)
    merged["labels"] = labels
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **merged)
    tmp.replace(path)


def check_kernels(device: torch.device, n: int = 4096, tol: float = 3e-2) -> str:
    """Compare the default ("auto") block-sparse and linear-attention paths on ``device`` with their torch
    references, forward and backward, at the study's shapes. Returns "" when they agree, else why not.

    Run before a GPU study (``--check-kernels``) so that a broken kernel is caught before it spoils rows.
    """
    from salad_bench.kernels import block_sparse_attention, linear_attention, linear_attention_ref
    from salad_bench.kernels.rope import rope_3d_freqs
    from salad_bench.methods import AttnContext, create_method

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, n, 64, generator=g).to(device, dtype) for _ in range(4))
    grid = (n // 256, 16, 16)
    layout = create_method("topk", num_heads=4, head_dim=64, sparsity=0.9).select(q, k, AttnContext(grid=grid))
    cos, sin = rope_3d_freqs(grid, 64, device)

    def run(fn):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = fn(qq, kk, vv)
        (out.float() * dout.float()).sum().backward()
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    pairs = {
        "block_sparse": (
            lambda a, b, c: block_sparse_attention(a, b, c, layout, backend="auto"),
            lambda a, b, c: block_sparse_attention(a, b, c, layout, backend="torch"),
        ),
        "linear": (
            lambda a, b, c: linear_attention(a, b, c, kind="relu", cos=cos, sin=sin),
            lambda a, b, c: linear_attention_ref(a.float(), b.float(), c.float(), kind="relu", cos=cos, sin=sin),
        ),
    }
    problems = []
    for name, (fast, ref) in pairs.items():
        try:
            got, want = run(fast), run(ref)
        except Exception as exc:
            problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            err = float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
            if not err < tol:
                problems.append(f"{name} {what}: relative error {err:.3g} > {tol}")
    return "; ".join(problems)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = FINETUNE_DEFAULTS
    p = Parser(prog="python -m salad_bench.harness.quality.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="base model directory (python -m salad_bench.harness.quality.train_base)")
    p.add_argument(
        "--check-kernels",
        action="store_true",
        help="only compare the default kernels with their torch references (fwd+bwd) and exit 1 if they disagree",
    )
    p.add_argument("--methods", default="full,topk,salad", help="comma list / globs of registered methods")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--out", help="run directory: rows.jsonl, curves.jsonl, samples.npz")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per trainable method (paper: <=1600)")
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument(
        "--train-samples", type=int, default=d.dataset_size, help="fine-tuning set size (paper: 2000 videos)"
    )
    p.add_argument("--train-params", choices=("all", "method"), default="all",
                   help="all (default): the whole DiT trains; method: only what the method adds (the adapter arm)")
    p.add_argument("--objective", choices=("flow", "distill"), default="flow",
                   help="flow matching, or distillation: the base model's (full attention) velocity at the same x_t, t")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also fine-tune the reference dense method with the same recipe (rows labelled <reference>_ft) "
                        "when trainable methods are selected")
    p.add_argument("--method-time-cap", type=float, default=None, help="stop one fine-tuning after this many seconds")
    p.add_argument(
        "--fit-steps-to",
        type=float,
        default=None,
        help="lower --steps so that the slowest fine-tuned cell (timed over 3 steps each) fine-tunes in this many seconds; "
        "every cell then gets the same step count",
    )
    p.add_argument("--time-budget", type=float, default=None, help="skip the remaining cells after this many seconds")
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=EvalSettings.guidance,
                   help="classifier-free guidance scale when the base has a null class (>= 1; the bar's 5.0)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--save-samples", action="store_true", help="write <out>/samples.npz (uint8 videos per cell)")
    p.add_argument("--keep-videos", action="store_true", help="keep each cell's mp4 files under <out>/vbench/<cell>/videos")
    p.add_argument("--vbench-dims", default="", help="comma list of VBench dimensions to run through the adapter")
    p.add_argument("--vbench-python", default=None, help="VBench interpreter (default $SALAD_VBENCH_PYTHON)")
    p.add_argument(
        "--finetuned-dir",
        default=None,
        help="per-cell checkpoints of the trained parameters, and resumable fine-tuning state (default <out>/finetuned; "
        "'none' to skip)",
    )
    p.add_argument("--resume", action="store_true",
                   help="skip cells already measured; an interrupted fine-tuning continues from its state in --finetuned-dir")
    p.add_argument("--classifier", default=None,
                   help="video classifier directory for sample quality (default: the one the base's bar.json names, "
                        f"else {DEFAULT_CLASSIFIER}; none there: rows say skipped)")
    p.add_argument("--no-base-bar", action="store_true",
                   help="do not ask the base-model bar (salad_bench/harness/quality/base_bar.py) about --checkpoint; the rows say so")
    p.add_argument("--split", choices=("methods", "batch"), default="methods",
                   help="under torchrun: deal the cells out over the ranks (default), or fine-tune each cell "
                        "data-parallel over all ranks (DDP; rank 0 measures)")
    p.add_argument("--trainable-weight", type=float, default=20.0,
                   help="with --split methods: how many evaluated cells one fine-tuned cell weighs when dealing them out")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="the fine-tuning seed (batch order, t and noise draws, new parameters)")
    p.add_argument("--echo", action="store_true", help="print training curves as they come")
    a = p.parse_args(argv)
    if not (math.isfinite(a.guidance) and a.guidance >= 1):
        p.error(f"--guidance must be a number >= 1 (1: no guidance); got {a.guidance}")
    return a


def budget_config(a: argparse.Namespace) -> TrainConfig:
    """The study's training budget from the CLI (a recipe sets lr, seed, steps and the objective)."""
    return dataclasses.replace(FINETUNE_DEFAULTS, steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup,
                               dataset_size=a.train_samples, time_budget_s=a.method_time_cap, seed=a.seed)  # fmt: skip


def cells_from_args(a: argparse.Namespace) -> list[Cell]:
    """The CLI's cells: every selected method at ``--sparsity`` with the one recipe (trainable ones), plus the
    fine-tuned control when trainable methods are selected and ``--control``."""
    from salad_bench.methods import METHODS

    recipe = Recipe(arm_name(a.train_params, a.objective), a.train_params, a.objective, a.lr, a.seed, a.steps)
    cells = [make_cell(n, a.sparsity, recipe) for n in METHODS.select(a.methods)]
    if a.control and any(c.trains for c in cells):
        control = make_cell(reference_method(), a.sparsity, recipe, control=True)
        if control not in cells:
            cells.append(control)
    return cells


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from salad_bench.harness.results import RowWriter

    dist, device = rank_and_device(a.device, ddp=a.split == "batch", exclusive=not a.no_latency and not a.check_kernels,
                                   hint=", or pass --no-latency (nothing is timed then)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the torch reference paths run fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    if a.check_kernels:
        why = check_kernels(device)
        print(f"kernel check on {device}: {'ok' if not why else why}", flush=True)
        return 0 if not why else EXIT_BAD_INPUT  # a refusal: the kernels must not be used on this card
    if not a.checkpoint or not a.out:
        raise BadInput("--checkpoint and --out are required (unless --check-kernels): python -m "
                       "salad_bench.harness.quality.evaluate --checkpoint DIR --out DIR ...")
    check_writable_dir(a.out)
    cells = cells_from_args(a)
    try:
        bar = check_base_bar(a.checkpoint, skip=a.no_base_bar)
    except Exception as exc:  # noqa: BLE001 - the bar's own verdict, whatever its type
        print(f"error: {a.checkpoint} does not pass the base-model bar: {type(exc).__name__}: {exc} "
              "(train a better base, or pass --no-base-bar to measure anyway)", file=sys.stderr)  # fmt: skip
        return 2
    split = a.split if dist.world > 1 else "batch"  # one process: nothing to deal out
    # with --split methods every rank is a study of its own (no DDP), on its own GPU
    study_dist = Dist() if split == "methods" else dist
    tag = f"[rank {dist.rank}] " if split == "methods" else ""
    t_start = time.perf_counter()
    base, card = load_checkpoint(a.checkpoint, device)
    cfg = budget_config(a)
    settings = EvalSettings(
        n_val=a.n_val, n_eval=a.n_eval, sample_steps=a.sample_steps, guidance=a.guidance, eval_batch=a.eval_batch,
        latency=not a.no_latency, save_samples=a.save_samples, vbench_dims=tuple(x for x in a.vbench_dims.split(",") if x),
        vbench_python=a.vbench_python, keep_videos=a.keep_videos,
    )  # fmt: skip
    out = Path(a.out)
    if split == "methods":
        writer = RowWriter(out, resume=a.resume, device=str(device), rank=dist.rank, world_size=dist.world)
    else:
        writer = RowWriter(out, resume=a.resume, device=str(device)) if dist.main else None
    barrier(dist)  # every rank has read the run's rows before any rank appends: the same deal everywhere
    done = done_hashes(existing_rows(out)) if a.resume else set()  # every rank reads the same files
    barrier(dist)
    cells = [c for c in cells if c.config_hash(cfg) not in done]
    if split == "methods":
        cells = deal_cells(cells, dist.rank, dist.world, a.trainable_weight)
        print(f"{tag}on {device}: {', '.join(c.label for c in cells) or 'nothing'}", flush=True)
    curve = CurveLogger(out / "curves.jsonl", enabled=study_dist.main, echo=a.echo and study_dist.main)
    study = QualityStudy(
        base, card, device=device, settings=settings, ft_cfg=cfg, checkpoint=str(a.checkpoint), dist=study_dist,
        curve=curve, base_bar=bar,
    )  # fmt: skip
    study.vbench_dir = str(out / "vbench")
    if a.finetuned_dir != "none":
        study.finetuned_dir = a.finetuned_dir or str(out / "finetuned")
    study.sparsity = a.sparsity
    study.classifier_dir = a.classifier or default_classifier(a.checkpoint)
    if a.fit_steps_to is not None:
        _fit_steps(study, cells, a, split, device, dist)
    if dist.main:
        print(f"reference: val_loss_full={study.val_loss_full:.5f} flicker_full={study.flicker_full:.4f}", flush=True)
    run_cells(study, cells, writer, out=out, time_budget=a.time_budget, t_start=t_start, tag=tag)
    if split == "batch" and dist.world > 1:
        torch.distributed.barrier()
    return 0


def _fit_steps(study: QualityStudy, cells: list[Cell], a: argparse.Namespace, split: str, device, dist: Dist) -> None:
    probes = {}
    for c in cells:
        if c.trains:
            try:
                probes[c.label] = study.probe_step_seconds(c)
            except Exception as exc:  # the study itself will report this cell's failure
                print(f"probe {c.label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    slowest = max(probes.values(), default=0.0)
    if split == "methods":  # every cell the same steps: the slowest cell of all ranks
        slowest = _all_max(slowest, device)
    if slowest > 0:
        study.steps_cap = max(1, min(a.steps, int(a.fit_steps_to / slowest)))
    if dist.main:
        print(f"step probe (s/step): {json.dumps({k: round(v, 4) for k, v in probes.items()})}; "
              f"fine-tuning steps: {study.steps_cap or a.steps}", flush=True)  # fmt: skip


def rank_and_device(device: str, *, ddp: bool, exclusive: bool, hint: str = "") -> tuple[Dist, torch.device]:
    """This rank's place and device. With ``ddp`` (cells trained data-parallel over the ranks) the process
    group is NCCL on CUDA (:func:`~harness.quality.train.init_distributed`); otherwise every rank studies on
    its own and the ranks only meet at barriers, over gloo (:func:`harness.distributed.barrier`): NCCL
    refuses two ranks on one GPU, which ranks that share GPUs are."""
    from salad_bench.harness.distributed import rank_device

    dist = Dist.from_env()
    if ddp and dist.world > 1:
        return init_distributed(device, exclusive=exclusive, hint=hint)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(rank_device(device, dist, exclusive=exclusive, hint=hint))
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    return dist, dev


def _all_max(x: float, device: torch.device) -> float:
    if not torch.distributed.is_initialized():
        return x
    gloo = torch.distributed.get_backend() == "gloo"
    t = torch.tensor([x], device="cpu" if gloo else device, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def _summary(row: dict[str, Any], seconds: float) -> str:
    def f(key: str, fmt: str) -> str:
        v = row.get(key)
        return "-" if v is None else format(v, fmt)

    return (
        f"{row.get('cell', row['method']):>34} {row.get('status', '?'):>7} steps={row.get('train_steps', 0):>4} "
        f"val={f('val_loss', '.5f')} rel={f('val_loss_rel', '+.4f')} vmse={f('velocity_mse', '.5f')} psnr={f('psnr', '.2f')} "
        f"ssim={f('ssim', '.4f')} dens={f('density', '.3f')} flick={f('temporal_flickering', '.4f')} ms={f('ms', '.2f')} "
        f"({seconds:.0f} s) {row.get('reason', '')[:120]}"
    )


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
