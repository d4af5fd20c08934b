"""``python -m salad_bench.harness.quality.evaluate``: the quality study on the mini Wan, one row per method.

    python -m salad_bench.harness.quality.evaluate --checkpoint checkpoints/mini-wan \
        --methods full,topk,salad,salad_no_gate,sparse_lora --sparsity 0.9 --steps 1600 \
        --out results/quality/<run>

For every method: load the base checkpoint afresh, install the method into every self-attention layer
(``harness.integrations.wan.install_attention``), fine-tune it when it has something to train
(families ``trained``/``salad``/``ablation`` with parameters that receive gradients; the same recipe
and step budget for every such method), apply post-training steps (``drop_fraction`` > 0: SALAD's
dropping of the weakest linear branches after a gate calibration pass), then measure:

* ``val_loss``: flow-matching MSE on held-out videos at a fixed t grid with fixed noise
  (:func:`harness.quality.metrics.val_loss`); ``val_loss_full`` is the base model's, and
  ``val_loss_rel = val_loss / val_loss_full - 1``;
* ``psnr``, ``ssim``: the method's sampled videos against the base full-attention model's
  videos from the same noise and class;
* ``temporal_flickering``: VBench's formula on the sampled videos (``temporal_flickering_full``: the
  reference's);
* ``density``: the measured kept-tile fraction averaged over every attention call of the sampling
  run; ``ms``: one model forward (batch 1) through the harness's timing helper.

Training-free methods are evaluated as they are (``train_steps`` 0). A method that fails to install or
run gives a row with ``status`` "skipped" (:class:`~methods.Unsupported`) or "error" and the reason;
the study goes on. Rows are ``kind="quality"`` and go through :class:`harness.results.RowWriter`
(``--resume`` skips methods already measured). Curves of every fine-tuning go to
``<out>/curves.jsonl``; ``--save-samples`` stores all sampled videos (uint8) in ``<out>/samples.npz``.

Several GPUs, ``torchrun --nproc_per_node=G -m salad_bench.harness.quality.evaluate ...``:

* ``--split methods`` (default): the methods are dealt out over the ranks (a trainable method weighs
  ``--trainable-weight`` training-free ones; heaviest first to the least-loaded rank); each rank fine-tunes
  and measures its own on its own GPU into ``<out>/rows.rank<R>.jsonl``. Methods the run already holds
  as ``ok`` are left out with ``--resume``, so the same command continues a killed study under any rank
  count. More ranks than GPUs on a host are refused unless ``--no-latency`` (nothing is timed then).
* ``--split batch``: every method in turn is fine-tuned data-parallel over all ranks (DDP, the global
  ``--batch`` split over them: the same steps as one process); rank 0 measures and writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salad_bench.harness.distributed import barrier, deal
from salad_bench.harness.quality.data import CLASS_NAMES, ProceduralVideos
from salad_bench.harness.quality.metrics import fidelity, temporal_flickering_videos, to_uint8, val_loss
from salad_bench.harness.quality.model import MiniWan, load_checkpoint, save_finetuned
from salad_bench.harness.quality.sampler import autocast, euler_sample, make_noise
from salad_bench.harness.quality.train import (
    FINETUNE_DEFAULTS,
    CurveLogger,
    Dist,
    TrainConfig,
    finetune,
    init_distributed,
)

__all__ = ["EvalSettings", "QualityStudy", "main", "parse_args"]

TRAINABLE_FAMILIES = ("trained", "salad", "ablation")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What is measured and on how much data (defaults: the committed study)."""

    n_val: int = 32  # validation videos for val_loss
    n_eval: int = 16  # sampled videos per method (one per class)
    sample_steps: int = 20
    noise_seed: int = 2024
    eval_batch: int = 8
    latency: bool = True
    save_samples: bool = False
    vbench_dims: tuple[str, ...] = ()
    vbench_python: str | None = None


def step_for_t(t: float, num_steps: int) -> int:
    """The Euler step whose time is closest to ``t`` (step 0 is t=1)."""
    return int(min(num_steps - 1, max(0, round((1.0 - float(t)) * num_steps))))


def _family(name: str) -> str:
    from salad_bench.methods import METHODS

    entry = METHODS.get(name)
    return entry.family or getattr(entry.cls, "family", "training_free")


class QualityStudy:
    """Holds the base model, the validation/eval data and the full model's reference videos."""

    def __init__(
        self,
        base: MiniWan,
        card: dict[str, Any],
        *,
        device: torch.device,
        settings: EvalSettings = EvalSettings(),
        ft_cfg: TrainConfig = FINETUNE_DEFAULTS,
        train_params: str = "method",
        checkpoint: str = "",
        dist: Dist = Dist(),
        curve: CurveLogger | None = None,
    ) -> None:
        self.base = base.to(device).eval().requires_grad_(False)
        self.card = card
        self.device = device
        self.s = settings
        self.ft_cfg = ft_cfg
        self.train_params = train_params
        self.checkpoint = checkpoint
        self.dist = dist
        self.curve = curve or CurveLogger(None)
        cfg = base.config
        self.spec = cfg.spec
        val = ProceduralVideos("val", settings.n_val, self.spec, cfg.num_classes)
        self.val_data = val.batch(list(range(settings.n_val)), device)
        self.train_data = ProceduralVideos("train", ft_cfg.dataset_size, self.spec, cfg.num_classes)
        n = settings.n_eval
        self.eval_labels = torch.arange(n, device=device) % cfg.num_classes
        self.eval_noise = make_noise(n, self.spec, settings.noise_seed, device)
        self.samples: dict[str, np.ndarray] = {}
        # the reference: the base model with diffusers' own attention processor
        self.val_loss_full = val_loss(self.base, *self.val_data, batch_size=settings.eval_batch)
        self.ref_videos = self._sample(self.base, None)
        self.flicker_full = temporal_flickering_videos(self.ref_videos)
        self.flicker_data = temporal_flickering_videos(val.batch(list(range(n)), "cpu")[0])
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
                )
            )
        return torch.cat(outs)

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

    # -- one method -----------------------------------------------------------------------------
    def run_method(self, name: str, sparsity: float) -> dict[str, Any]:
        """Fine-tune (when trainable) and evaluate one registered method; returns the row."""
        from salad_bench.harness.integrations.wan import install_attention, set_step
        from salad_bench.methods import Unsupported

        family = _family(name)
        target = 0.0 if family == "full" else sparsity
        row: dict[str, Any] = {
            "kind": "quality",
            "method": name,
            "family": family,
            "sparsity_target": target,
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
            "train_params": self.train_params,
            "train_steps_target": self.ft_cfg.steps,
            "train_steps": 0,
            "train_batch": self.ft_cfg.batch_size,
            "train_lr": self.ft_cfg.lr,
            "train_samples": self.ft_cfg.dataset_size,
            "sample_steps": self.s.sample_steps,
            "n_eval": self.s.n_eval,
            "n_val": self.s.n_val,
            "val_loss_full": self.val_loss_full,
            "temporal_flickering_full": self.flicker_full,
            "temporal_flickering_data": self.flicker_data,
        }
        model = copy.deepcopy(self.base)
        n_steps = self.s.sample_steps
        try:
            methods = install_attention(model.transformer, name, sparsity=target, num_steps=n_steps)
            model.to(self.device)
            knobs = methods[0].knobs()
            row["config"] = json.dumps(knobs, sort_keys=True, default=str)
            from salad_bench.harness.results import config_hash

            row["config_hash"] = config_hash({"method": name, **knobs})

            def on_step(i: int) -> None:
                set_step(model.transformer, i, n_steps)

            def on_t(t: torch.Tensor) -> None:
                set_step(model.transformer, step_for_t(float(t.float().mean()), n_steps), n_steps)

            trainable = family in TRAINABLE_FAMILIES or (self.train_params == "all" and family == "full")
            if trainable:
                curve = self.curve.with_fields(phase="finetune", method=name)
                ckpt = Path(self.finetuned_dir) / name if self.finetuned_dir else None
                state = ckpt.with_name(f"{name}.resume.pt") if ckpt is not None else None
                res, trained = finetune(
                    model, methods, self.train_data, self.ft_cfg, train_params=self.train_params, device=self.device,
                    dist=self.dist, curve=curve, on_t=on_t, state_path=state,
                )  # fmt: skip
                row.update(
                    train_steps=res.steps, trainable_params=sum(p.numel() for p in trained),
                    train_seconds=round(res.seconds, 2), train_loss_last=res.final_loss, train_note=res.reason,
                )  # fmt: skip
                if ckpt is not None and self.dist.main and res.steps > 0:
                    info = {"method": name, "knobs": knobs, "sparsity_target": target, "train_params": self.train_params,
                            "train_steps": res.steps, "train_config": self.ft_cfg.as_dict(), "base_checkpoint": self.checkpoint,
                            "base_steps": self.card.get("steps_done"), "base_val_loss": self.card.get("val_loss")}  # fmt: skip
                    save_finetuned(model, trained, ckpt, info)
                    row["finetuned_checkpoint"] = str(ckpt)
                if state is not None and self.dist.main and not res.stopped_early:
                    state.unlink(missing_ok=True)  # done: the checkpoint above is what stays
            else:
                row["train_note"] = "training-free: evaluated as is"
            model.eval()
            dropped = self._calibrate_and_drop(model, methods) if hasattr(methods[0], "gate_mean") else None
            if dropped is not None:
                row["dropped_layers"] = dropped
            if not self.dist.main:
                return row
            per_video = val_loss(
                model,
                *self.val_data,
                batch_size=self.s.eval_batch,
                on_t=lambda t: set_step(model.transformer, step_for_t(t, n_steps), n_steps),
                per_video=True,
            )
            row["val_loss"] = float(np.mean(per_video))
            row["val_loss_per_video"] = [round(x, 7) for x in per_video]
            row["val_loss_rel"] = row["val_loss"] / self.val_loss_full - 1.0
            densities: list[float] = []
            videos = self._sample(model, on_step, densities, methods)
            row["density"] = float(np.mean(densities)) if densities else None
            row["sparsity"] = None if row["density"] is None else 1.0 - row["density"]
            fid = fidelity(videos, self.ref_videos)
            row["psnr"] = None if fid["psnr"] == float("inf") else fid["psnr"]
            row["psnr_identical"] = fid["psnr"] == float("inf")
            row["ssim"] = fid["ssim"]
            row["psnr_per_video"] = [None if math.isinf(x) else round(x, 4) for x in fid["psnr_per_video"]]
            row["ssim_per_video"] = [round(x, 5) for x in fid["ssim_per_video"]]
            row["temporal_flickering"] = temporal_flickering_videos(videos)
            if self.s.latency:
                set_step(model.transformer, n_steps // 2, n_steps)
                row.update(self._latency(model))
            if self.s.save_samples:
                self.samples[name] = to_uint8(videos)
            if self.s.vbench_dims:
                row.update(self._vbench(name, videos))
            row["status"], row["reason"] = (
                "ok",
                row.get("train_note", "") if row.get("train_steps", 0) == 0 and trainable else "",
            )
        except Unsupported as exc:
            row.update(status="skipped", reason=str(exc)[:500])
        except Exception as exc:  # one broken method must not end the study
            row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:500]}")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def probe_step_seconds(self, name: str, steps: int = 3) -> float:
        """Seconds per fine-tuning step of ``name`` (``steps`` steps, the first one discarded as warm-up)."""
        from salad_bench.harness.integrations.wan import install_attention

        model = copy.deepcopy(self.base)
        methods = install_attention(model.transformer, name, sparsity=self.sparsity, num_steps=self.s.sample_steps)
        model.to(self.device)
        cfg = dataclasses.replace(self.ft_cfg, steps=steps, log_every=1, time_budget_s=None, fit_to_budget=False)
        res, _ = finetune(
            model, methods, self.train_data, cfg, train_params=self.train_params, device=self.device, dist=self.dist
        )  # no state_path: a probe must not leave a resumable state behind
        rows = [r for r in res.curve if r["step"] in (1, res.steps)]
        if res.steps < 2 or len(rows) < 2:
            return 0.0
        return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (res.steps - 1)

    sparsity: float = 0.9

    def _vbench(self, name: str, videos: torch.Tensor) -> dict[str, Any]:
        from salad_bench.harness.quality.vbench import VBenchUnavailable, run_vbench, write_custom_input

        out = Path(self.vbench_dir) / name
        try:
            prompts = [CLASS_NAMES[int(i)] for i in self.eval_labels]
            write_custom_input(videos, prompts, out / "videos")
            res = run_vbench(out / "videos", self.s.vbench_dims, out / "results", python=self.s.vbench_python)
            return {f"vbench_{d}": v for d, v in res.scores.items()} | {"vbench_runner": res.runner}
        except (VBenchUnavailable, OSError, ValueError) as exc:
            return {"vbench_reason": str(exc)[:300]}

    vbench_dir: str = "vbench"
    finetuned_dir: str | None = None  # per-method checkpoints of what trained (None: not saved)


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
    p = argparse.ArgumentParser(prog="python -m salad_bench.harness.quality.evaluate", description=__doc__.split("\n")[0])
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
    p.add_argument("--train-params", choices=("method", "all"), default="method")
    p.add_argument("--method-time-cap", type=float, default=None, help="stop one fine-tuning after this many seconds")
    p.add_argument(
        "--fit-steps-to",
        type=float,
        default=None,
        help="lower --steps so that the slowest trainable method (timed over 3 steps each) fine-tunes in this many seconds; "
        "every method then gets the same step count",
    )
    p.add_argument("--time-budget", type=float, default=None, help="skip the remaining methods after this many seconds")
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--save-samples", action="store_true", help="write <out>/samples.npz (uint8 videos per method)")
    p.add_argument("--vbench-dims", default="", help="comma list of VBench dimensions to run through the adapter")
    p.add_argument("--vbench-python", default=None, help="VBench interpreter (default $SALAD_VBENCH_PYTHON)")
    p.add_argument(
        "--finetuned-dir",
        default=None,
        help="per-method checkpoints of the trained parameters, and resumable fine-tuning state (default <out>/finetuned; "
        "'none' to skip)",
    )
    p.add_argument("--resume", action="store_true",
                   help="skip methods already measured; an interrupted fine-tuning continues from its state in --finetuned-dir")
    p.add_argument("--split", choices=("methods", "batch"), default="methods",
                   help="under torchrun: deal the methods out over the ranks (default), or fine-tune each method "
                        "data-parallel over all ranks (DDP; rank 0 measures)")
    p.add_argument("--trainable-weight", type=float, default=20.0,
                   help="with --split methods: how many training-free methods one fine-tuned method weighs when "
                        "dealing them out")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--echo", action="store_true", help="print training curves as they come")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from salad_bench.harness.results import RowWriter
    from salad_bench.methods import METHODS

    dist, device = init_distributed(a.device, exclusive=not a.no_latency and not a.check_kernels,
                                    hint=", or pass --no-latency (nothing is timed then)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the torch reference paths run fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    if a.check_kernels:
        why = check_kernels(device)
        print(f"kernel check on {device}: {'ok' if not why else why}", flush=True)
        return 0 if not why else 1
    if not a.checkpoint or not a.out:
        raise SystemExit("--checkpoint and --out are required (unless --check-kernels)")
    names = METHODS.select(a.methods)
    split = a.split if dist.world > 1 else "batch"  # one process: nothing to deal out
    # with --split methods every rank is a study of its own (no DDP), on its own GPU
    study_dist = Dist() if split == "methods" else dist
    tag = f"[rank {dist.rank}] " if split == "methods" else ""
    t_start = time.perf_counter()
    base, card = load_checkpoint(a.checkpoint, device)
    cfg = dataclasses.replace(
        FINETUNE_DEFAULTS, steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=min(a.warmup, max(0, a.steps // 5)),
        dataset_size=a.train_samples, time_budget_s=a.method_time_cap, seed=a.seed,
    )  # fmt: skip
    settings = EvalSettings(
        n_val=a.n_val, n_eval=a.n_eval, sample_steps=a.sample_steps, eval_batch=a.eval_batch, latency=not a.no_latency,
        save_samples=a.save_samples, vbench_dims=tuple(x for x in a.vbench_dims.split(",") if x), vbench_python=a.vbench_python,
    )  # fmt: skip
    out = Path(a.out)
    if split == "methods":
        writer = RowWriter(out, resume=a.resume, device=str(device), rank=dist.rank, world_size=dist.world)
    else:
        writer = RowWriter(out, resume=a.resume, device=str(device)) if dist.main else None
    barrier(dist)  # every rank has read the run's rows before any rank appends: the same deal everywhere
    if split == "methods":
        names = _deal_methods(names, writer, dist.rank, dist.world, a.trainable_weight)
        print(f"{tag}on {device}: {', '.join(names) or 'nothing'}", flush=True)
    curve = CurveLogger(out / "curves.jsonl", enabled=study_dist.main, echo=a.echo and study_dist.main)
    study = QualityStudy(
        base, card, device=device, settings=settings, ft_cfg=cfg, train_params=a.train_params, checkpoint=str(a.checkpoint),
        dist=study_dist, curve=curve,
    )  # fmt: skip
    study.vbench_dir = str(out / "vbench")
    if a.finetuned_dir != "none":
        study.finetuned_dir = a.finetuned_dir or str(out / "finetuned")
    study.sparsity = a.sparsity
    if a.fit_steps_to is not None:
        trainable = [n for n in names if _family(n) in TRAINABLE_FAMILIES]
        probes = {}
        for n in trainable:
            try:
                probes[n] = study.probe_step_seconds(n)
            except Exception as exc:  # the study itself will report this method's failure
                print(f"probe {n}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        slowest = max(probes.values(), default=0.0)
        if split == "methods":  # every method the same steps: the slowest method of all ranks
            slowest = _all_max(slowest, device)
        if slowest > 0:
            fitted = max(1, min(a.steps, int(a.fit_steps_to / slowest)))
            study.ft_cfg = dataclasses.replace(cfg, steps=fitted, warmup_steps=min(cfg.warmup_steps, fitted // 5))
        if dist.main:
            print(
                f"step probe (s/step): {json.dumps({k: round(v, 4) for k, v in probes.items()})}; fine-tuning steps: {study.ft_cfg.steps}",
                flush=True,
            )
    if dist.main:
        print(f"reference: val_loss_full={study.val_loss_full:.5f} flicker_full={study.flicker_full:.4f}", flush=True)
    for name in names:
        if a.time_budget is not None and time.perf_counter() - t_start > a.time_budget:
            row = {"kind": "quality", "method": name, "family": _family(name), "sparsity_target": a.sparsity,
                   "status": "skipped", "reason": f"study time budget of {a.time_budget:.0f} s used up", "train_params": a.train_params}  # fmt: skip
            if writer is not None:
                writer.append(row)
            continue
        if writer is not None and _already_done(writer, name):
            print(f"{name}: already in {out}, skipped (--resume)", flush=True)
            continue
        t0 = time.perf_counter()
        row = study.run_method(name, a.sparsity)
        if writer is not None:
            writer.append(row)
            print(tag + _summary(row, time.perf_counter() - t0), flush=True)
        if writer is not None and settings.save_samples and study.samples:
            save_samples(out / "samples.npz", study.samples, study.eval_labels.cpu().numpy())
    if split == "batch" and dist.world > 1:
        torch.distributed.barrier()
    return 0


def _deal_methods(names: list[str], writer, rank: int, world: int, trainable_weight: float) -> list[str]:
    """This rank's share of the methods not yet ``ok`` in the run, in the order given."""
    todo = [n for n in names if not _already_done(writer, n)]
    owner = deal([trainable_weight if _family(n) in TRAINABLE_FAMILIES else 1.0 for n in todo], world)
    return [n for n, r in zip(todo, owner, strict=True) if r == rank]


def _all_max(x: float, device: torch.device) -> float:
    if not torch.distributed.is_initialized():
        return x
    t = torch.tensor([x], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def _already_done(writer, name: str) -> bool:
    return any(
        r.get("method") == name and r.get("status") == "ok" and r.get("kind") == "quality" for r in writer.existing
    )


def _summary(row: dict[str, Any], seconds: float) -> str:
    def f(key: str, fmt: str) -> str:
        v = row.get(key)
        return "-" if v is None else format(v, fmt)

    return (
        f"{row['method']:>20} {row.get('status', '?'):>7} steps={row.get('train_steps', 0):>4} val={f('val_loss', '.5f')} "
        f"rel={f('val_loss_rel', '+.4f')} psnr={f('psnr', '.2f')} ssim={f('ssim', '.4f')} dens={f('density', '.3f')} "
        f"flick={f('temporal_flickering', '.4f')} ms={f('ms', '.2f')} ({seconds:.0f} s) {row.get('reason', '')[:120]}"
    )


if __name__ == "__main__":
    sys.exit(main())
