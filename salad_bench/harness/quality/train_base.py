"""``python -m salad_bench.harness.quality.train_base --out DIR``: train the full-attention base model.

A CLI over :func:`harness.quality.train.train_base_model`; ``torchrun --nproc_per_node N -m
salad_bench.harness.quality.train_base ...`` trains data-parallel.

Models (``--preset``): ``bar`` (default, issue #25): :data:`BAR`, 8 layers, 4 heads x 64, FFN 1024 (about
9.1M parameters) on the version-2 videos (16 x 48 x 48 px, 9,216 tokens); ``v1``: the audited model
(:class:`~harness.quality.model.MiniWanConfig`'s defaults, version-1 videos). ``--tiny``: a CPU-sized
network on 4 x 16 x 16 videos of the preset's data version (tests, smoke runs).

Two ways to train:

* a fixed schedule (``--steps``, warm-up then cosine; ``--time-budget`` fits it to a budget), as before;
* ``--until-plateau``: the issue's bar needs a val loss that has plateaued at a constant learning
  rate, so the rate is held at ``--lr`` after warm-up and the run goes on until the val curve passes
  :func:`harness.quality.base_bar.plateau_test` (``--plateau-window``, ``--plateau-rel-tol``), or
  ``--max-steps`` are done, or this call's ``--time-budget`` is spent. It trains in pieces of
  ``--check-every`` seconds and tests the curve after each. Calling the same command again continues
  from the saved state (``<out>/resume/state.pt``, exact: the same batches and noise as one
  uninterrupted run) until it prints ``done``. Without that state (a new machine: it is too large to
  carry) a rerun refuses to start over the checkpoint; ``--from-checkpoint`` goes on from the
  checkpoint's weights with fresh AdamW moments (inexact; the curve and ``optimizer_resets_at`` in
  the card say where).

``--cooldown N``: after the plateau, the last phase of a warm-up/stable/decay schedule: from the
plateaued checkpoint's step the lr falls linearly from the plateau's rate to 0 over N steps, with the
checkpoint's own recipe (batch, data, label dropout, seed). It refuses a checkpoint whose curve has not
plateaued. Like ``--until-plateau`` it trains in pieces, resumes exactly from the resume state (which
goes on with its AdamW moments when it is the plateau's own), and needs ``--from-checkpoint`` without
it. The card's ``cooldown`` names the step it started from; its ``plateau`` is the test of the
constant-lr phase before it (:func:`~harness.quality.base_bar.checkpoint_plateau`), and a cooled
checkpoint takes no more ``--until-plateau``.

Label dropout (``--label-dropout``; 0.1 with ``--until-plateau``, as Wan2.1 drops its prompts, else 0):
each training label is replaced by the null class with that probability, so the sampler can guide
(classifier-free guidance); a new model then has a null class (``MiniWanConfig.null_class``). A
checkpoint trained without dropout goes on with it only through ``--from-checkpoint``: its null class
is added (:func:`~harness.quality.model.add_null_class`, the row the mean of the class rows) and the
card's ``null_class_added_at`` names the step (0: from the start). A resume state saved with another
dropout is refused (an exact resume cannot change the recipe), with the way out in the message.

``--background`` starts the same command in a new process session (it outlives the shell that
started it), logging to ``<out>/train.log`` with its pid in ``<out>/train.pid``; ``--status`` prints
where a run in ``--out`` stands (steps, last val loss, the plateau test, whether it is running).

After every piece the checkpoint in ``--out`` is complete: shards in ``--weights-dtype`` (bf16 by
default, each < 15 MB), ``card.json``/``README.md`` with the plateau test, and ``curves.jsonl``.
Do not commit ``resume/``, ``train.log`` or ``train.pid``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from salad_bench.harness.errors import Parser, check_writable_dir
from salad_bench.harness.quality.model import MiniWanConfig, read_card
from salad_bench.harness.quality.train import (
    BASE_DEFAULTS,
    LABEL_DROPOUT,
    TrainConfig,
    init_distributed,
    recipe_of,
    train_base_model,
)

__all__ = ["BAR", "TINY", "main", "parse_args"]

TINY = MiniWanConfig(num_layers=2, num_heads=2, head_dim=64, ffn_dim=128, freq_dim=32, frames=4, height=16, width=16)
BAR = MiniWanConfig(
    num_layers=8, num_heads=4, head_dim=64, ffn_dim=1024, frames=16, height=48, width=48, data_version=2
)
PRESETS = {"bar": BAR, "v1": MiniWanConfig()}
# --until-plateau's recipe: a constant rate after warm-up, a val evaluation every 250 steps, Wan's label dropout
PLATEAU_DEFAULTS = dict(batch=16, lr=3e-4, warmup=500, val_every=250, ckpt_every=250, max_steps=100_000,
                        label_dropout=LABEL_DROPOUT)  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp32": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = BASE_DEFAULTS
    p = Parser(
        prog="python -m salad_bench.harness.quality.train_base", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="checkpoint directory (shards + card.json + README.md)")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="bar", help="the model and its data (see the docstring)"
    )
    p.add_argument("--steps", type=int, default=d.steps, help="fixed schedule: total steps")
    p.add_argument(
        "--batch", type=int, default=None, help=f"global batch size (default {d.batch_size}; --until-plateau 16)"
    )
    p.add_argument(
        "--lr", type=float, default=None, help=f"peak learning rate (default {d.lr}; --until-plateau 3e-4, constant)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help=f"warm-up steps (default {d.warmup_steps}; --until-plateau 500)"
    )
    p.add_argument("--t-sampling", choices=("logit_normal", "uniform"), default=d.t_sampling)
    p.add_argument(
        "--label-dropout", type=float, default=None,
        help=f"probability of training on the null class instead of the label (default {d.label_dropout:g}; "
        f"--until-plateau {PLATEAU_DEFAULTS['label_dropout']:g}); above 0 a new model has a null class",
    )  # fmt: skip
    p.add_argument("--val-every", type=int, default=None, help=f"default {d.val_every}; --until-plateau 250")
    p.add_argument("--ckpt-every", type=int, default=None, help="save the resumable state every N steps")
    p.add_argument("--n-val", type=int, default=32, help="validation videos")
    p.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds: a fixed schedule is fitted to it; --until-plateau stops this call after it (rerun to go on)",
    )  # fmt: skip
    p.add_argument(
        "--until-plateau", action="store_true", help="constant lr until the val curve plateaus (rerun until done)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=PLATEAU_DEFAULTS["max_steps"],
        help="--until-plateau: give up after this many steps",
    )
    p.add_argument(
        "--check-every", type=float, default=300.0, help="--until-plateau: seconds of training between plateau tests"
    )
    p.add_argument(
        "--cooldown", type=int, default=None, metavar="N",
        help="after the plateau: the lr falls linearly to 0 over N steps from the checkpoint's step (rerun until done)",
    )  # fmt: skip
    p.add_argument("--plateau-window", type=int, default=8, help="val evaluations the plateau test looks at")
    p.add_argument("--plateau-rel-tol", type=float, default=0.01, help="largest relative fall across the window")
    p.add_argument(
        "--from-checkpoint", action="store_true",
        help="--until-plateau without the resume state (a new machine): go on from the checkpoint's weights with "
        "fresh optimiser moments (not exact; the curve and the card say where)",
    )  # fmt: skip
    p.add_argument("--weights-dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the saved shards")
    p.add_argument("--background", action="store_true", help="run detached (new session), log to <out>/train.log")
    p.add_argument("--status", action="store_true", help="print where the run in --out stands and exit")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model (2 layers, 4x16x16 videos)")
    p.add_argument("--curves", default=None, help="JSONL file for the training curve (default <out>/curves.jsonl)")
    p.add_argument("--state", default=None, help="resumable training state (default <out>/resume/state.pt)")
    p.add_argument(
        "--compile", action="store_true",
        help="torch.compile the transformer blocks (regional, fullgraph) before training; resumable either way",
    )  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.label_dropout is not None and not 0 <= a.label_dropout < 1:
        p.error(f"--label-dropout must be in [0, 1); got {a.label_dropout}")
    if a.cooldown is not None:
        if a.cooldown < 1:
            p.error(f"--cooldown must be a positive number of steps; got {a.cooldown}")
        if a.until_plateau:
            p.error("--cooldown follows the plateau: run --until-plateau first, then --cooldown N on its own")
    return a


def _label_dropout(a: argparse.Namespace) -> float:
    if a.label_dropout is not None:
        return a.label_dropout
    return PLATEAU_DEFAULTS["label_dropout"] if a.until_plateau else BASE_DEFAULTS.label_dropout


def _model_config(a: argparse.Namespace) -> MiniWanConfig:
    """The preset's model; with a null class when the recipe drops labels."""
    cfg = PRESETS[a.preset]
    if a.tiny:
        cfg = dataclasses.replace(TINY, data_version=cfg.data_version)
    if a.layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    return dataclasses.replace(cfg, null_class=_label_dropout(a) > 0)


def _train_config(a: argparse.Namespace) -> TrainConfig:
    d, plateau = BASE_DEFAULTS, a.until_plateau

    def pick(value, fixed, until):
        return value if value is not None else (until if plateau else fixed)

    steps = a.max_steps if plateau else a.steps
    warmup = pick(a.warmup, d.warmup_steps, PLATEAU_DEFAULTS["warmup"])
    val_every = pick(a.val_every, d.val_every, PLATEAU_DEFAULTS["val_every"])
    return dataclasses.replace(
        d,
        steps=steps,
        batch_size=pick(a.batch, d.batch_size, PLATEAU_DEFAULTS["batch"]),
        lr=pick(a.lr, d.lr, PLATEAU_DEFAULTS["lr"]),
        warmup_steps=min(warmup, max(0, steps // 5)),
        min_lr_ratio=1.0 if plateau else d.min_lr_ratio,  # 1.0: constant after warm-up
        t_sampling=a.t_sampling,
        val_every=val_every,
        log_every=math.gcd(d.log_every, val_every) if val_every else d.log_every,  # val runs on logged steps only
        ckpt_every=pick(a.ckpt_every, d.ckpt_every, PLATEAU_DEFAULTS["ckpt_every"]),
        time_budget_s=None if plateau else a.time_budget,
        fit_to_budget=not plateau and a.time_budget is not None,
        seed=a.seed,
        compile=a.compile,
        label_dropout=_label_dropout(a),
    )


def _plateau(a: argparse.Namespace, curves: str | Path, cooldown: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plateau test of ``--plateau-window`` and ``--plateau-rel-tol`` on a curves file
    (:func:`~harness.quality.base_bar.checkpoint_plateau`: with the card's ``cooldown``, of the constant-lr
    phase before it)."""
    from salad_bench.harness.quality.base_bar import checkpoint_plateau

    return checkpoint_plateau(curves, cooldown, window=a.plateau_window, rel_tol=a.plateau_rel_tol)


def _finish_checkpoint(out: Path, plateau: dict[str, Any], dtype_name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the checkpoint train_base_model saved: shards in the chosen dtype, the plateau test and
    the run's totals in the card."""
    from salad_bench.harness.quality.model import load_checkpoint, save_checkpoint

    model, card = load_checkpoint(out)
    for key in ("shards", "shard_sha256", "model_config"):  # save_checkpoint writes these afresh
        card.pop(key, None)
    card.update(extra, plateau=plateau, weights_dtype=dtype_name, data_version=model.config.data_version)
    save_checkpoint(model, out, card, dtype=DTYPES[dtype_name])
    return card


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _last_card(out: Path) -> dict[str, Any]:
    try:
        return read_card(out)
    except (OSError, ValueError):
        return {}


def _paths(a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """``--out``, its curves file and its resume state (``--curves``, ``--state`` where given)."""
    out = Path(a.out)
    return out, Path(a.curves or out / "curves.jsonl"), Path(a.state or out / "resume" / "state.pt")


def _train_fixed(a: argparse.Namespace) -> int:
    model_cfg, cfg = _model_config(a), _train_config(a)
    dist, device = init_distributed(a.device)
    out, curves, state = _paths(a)
    done = _last_card(out).get("steps_done")
    if done and not state.exists():
        raise _Refused(f"{out} holds a checkpoint at step {done} but no resume state ({state}); a fresh start would "
                       "overwrite it. Train into another --out, or go on from its weights with --until-plateau "
                       "--from-checkpoint")  # fmt: skip
    card = train_base_model(out, model_cfg, cfg, device=device, dist=dist, n_val=a.n_val, curve_path=curves,
                            state_path=state, echo=True)  # fmt: skip
    if dist.main:
        plateau = _plateau(a, curves)
        extra = {"train_seconds_total": card["train_seconds"], "null_class_added_at": _null_class_added_at(curves, model_cfg)}
        _finish_checkpoint(out, plateau, a.weights_dtype, extra)
    _barrier(dist.world)
    return 0


class _Refused(Exception):
    pass


def _state_from_checkpoint(a: argparse.Namespace, out: Path, state: Path, model_cfg: MiniWanConfig, cfg: TrainConfig,
                           curves: Path, main: bool) -> None:  # fmt: skip
    """A run whose checkpoint exists but whose resume state does not (another machine): refuse, since a
    fresh start would overwrite the checkpoint, or with ``--from-checkpoint`` write a resume state from the
    checkpoint's weights at its step with fresh AdamW moments (the data, t and noise still follow the step).
    The one change of recipe it allows is label dropout where the checkpoint was trained without: the null
    class is added then, and the curve records the step. A resume state saved with another label dropout
    than the recipe's is refused."""
    card = _last_card(out)
    if card.get("steps_done") and (
        int(card["steps_done"]) >= cfg.steps or _plateau(a, curves)["plateaued"]
    ):
        return  # nothing left to train: the loop says done
    if state.exists():
        _check_state_dropout(state, cfg)
        return
    if not card.get("steps_done"):
        return
    if not a.from_checkpoint:
        raise _Refused(
            f"{out} holds a checkpoint at step {card['steps_done']} but no resume state ({state}); a fresh start would "
            "overwrite it. Pass --from-checkpoint to go on from its weights (fresh optimiser moments), or another --out"
        )
    from salad_bench.harness.quality.model import add_null_class, load_checkpoint

    model, card = load_checkpoint(out)
    old, new = recipe_of(card.get("train_config", {})), recipe_of(cfg.as_dict())
    starts_dropout = cfg.label_dropout > 0 and not old["label_dropout"]
    if starts_dropout:
        old["label_dropout"] = cfg.label_dropout  # the recipe's dropout from this step on
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise _Refused(f"{out}/card.json: trained with another recipe ({', '.join(diff)}); use the same settings")
    add_null = starts_dropout and not model.config.null_class
    if add_null:
        model = add_null_class(model)
    if model.config != model_cfg:
        raise _Refused(f"{out}: the checkpoint's model is not this preset's ({model.config} vs {model_cfg})")
    if not main:
        return
    step = _state_from_weights(model, card, cfg, state, curves)
    if add_null:
        _log_event(curves, step, "null_class_added", label_dropout=cfg.label_dropout,
                   note=f"label dropout {cfg.label_dropout:g} from this step (trained without before): null class "
                   "added, its prompt row the mean of the class rows")  # fmt: skip
        print(f"label dropout {cfg.label_dropout:g} from step {step}: null class added to the checkpoint's model", flush=True)


def _log_event(curves: Path, step: int, event: str, **fields: Any) -> None:
    """One ``event`` row in the curves file (read back by :func:`_event_steps`; no val loss, so the plateau
    test skips it)."""
    with open(curves, "a") as f:
        f.write(json.dumps({"phase": "base", "method": "full", "step": step, "event": event, **fields}) + "\n")


def _state_from_weights(model: torch.nn.Module, card: dict[str, Any], cfg: TrainConfig, state: Path, curves: Path) -> int:
    """Write a resume state at the checkpoint's step from ``model`` (its weights) with fresh AdamW moments,
    and record the reset in the curve; returns the step."""
    opt = torch.optim.AdamW(list(model.parameters()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    state.parent.mkdir(parents=True, exist_ok=True)
    step = int(card["steps_done"])
    torch.save(
        {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "config": cfg.as_dict()}, state
    )
    _log_event(curves, step, "optimizer_reset", note=f"continued from the {card.get('weights_dtype', 'saved')} "
               "checkpoint without its resume state: fresh AdamW moments")  # fmt: skip
    print(f"no resume state: going on from the checkpoint at step {step} with fresh optimiser moments", flush=True)
    return step


def _check_state_dropout(state: Path, cfg: TrainConfig) -> None:
    """Refuse a resume state saved with another label dropout than ``cfg``'s, naming the ways on."""
    try:
        saved = torch.load(state, map_location="cpu", weights_only=False, mmap=True).get("config", {})
    except Exception:  # noqa: BLE001 - an unreadable state: train_loop reports it
        return
    was = float(saved.get("label_dropout", 0.0))
    if was == cfg.label_dropout:
        return
    raise _Refused(
        f"{state}: saved with label dropout {was:g}, the recipe now uses {cfg.label_dropout:g}; an exact resume cannot "
        f"change it. Pass --label-dropout {was:g} to go on exactly, or move {state} away and rerun with --from-checkpoint "
        "(the checkpoint's weights, a null class added if it needs one, fresh optimiser moments; the card records both)"
    )


def _event_steps(curves: Path, event: str) -> list[int]:
    """The steps of the curve's ``event`` rows (``optimizer_reset``, ``null_class_added``), in order."""
    curves = Path(curves)
    if not curves.exists():
        return []
    rows = (json.loads(x) for x in curves.read_text().splitlines() if f'"{event}"' in x)
    return [int(r["step"]) for r in rows if r.get("event") == event]


def _null_class_added_at(curves: Path, model_cfg: MiniWanConfig) -> int | None:
    """The step from which the model has its null class: the curve's ``null_class_added`` event, else 0 (from
    the start); None for a model without one."""
    if not model_cfg.null_class:
        return None
    return (_event_steps(curves, "null_class_added") or [0])[-1]


def _train_in_pieces(a: argparse.Namespace, out: Path, model_cfg: MiniWanConfig, cfg: TrainConfig, curves: Path,
                     state: Path, dist: Any, device: torch.device, *, schedule: str,
                     cooldown: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:  # fmt: skip
    """Train in pieces of ``--check-every`` seconds until ``cfg.steps`` are done, this call's ``--time-budget``
    is spent or (no ``cooldown``) the plateau test passes, finishing the checkpoint after each piece (its card
    names ``schedule`` and ``cooldown``). Returns the last plateau test and the steps done before it."""
    start = time.monotonic()
    _barrier(dist.world)  # rank 0 has written the curve and the checkpoint: every rank reads the same files
    plateau = _plateau(a, curves, cooldown)
    while True:
        prev = _last_card(out)
        done_steps = int(prev.get("steps_done", 0))
        left = None if a.time_budget is None else a.time_budget - (time.monotonic() - start)
        if (plateau["plateaued"] and cooldown is None) or done_steps >= cfg.steps or (left is not None and left < 1.0):
            return plateau, done_steps
        piece = a.check_every if left is None else min(a.check_every, left)
        card = train_base_model(out, model_cfg, dataclasses.replace(cfg, time_budget_s=piece), device=device, dist=dist,
                                n_val=a.n_val, curve_path=curves, state_path=state, echo=True)  # fmt: skip
        _barrier(dist.world)  # rank 0 has written the piece's curve
        plateau = _plateau(a, curves, cooldown)
        if dist.main:
            total = float(prev.get("train_seconds_total", 0.0)) + card["train_seconds"]
            extra = {"train_seconds_total": round(total, 1), "schedule": schedule,
                     "optimizer_resets_at": _event_steps(curves, "optimizer_reset"),
                     "null_class_added_at": _null_class_added_at(curves, model_cfg)}  # fmt: skip
            if cooldown is not None:
                extra["cooldown"] = cooldown
            _finish_checkpoint(out, plateau, a.weights_dtype, extra)
        _barrier(dist.world)  # and its checkpoint
        if card["steps_done"] == done_steps:  # nothing moved (e.g. max steps reached inside the state)
            return plateau, done_steps


def _train_until_plateau(a: argparse.Namespace) -> int:
    model_cfg, cfg = _model_config(a), _train_config(a)
    dist, device = init_distributed(a.device)
    out, curves, state = _paths(a)
    cool = _card_cooldown(_last_card(out))
    if cool is not None:
        raise _Refused(f"{out}: cooled down from step {cool['from_step']} (--cooldown {cool['steps']}); a constant "
                       "lr after the cooldown would undo it: go on with the same --cooldown, or train another --out")  # fmt: skip
    _state_from_checkpoint(a, out, state, model_cfg, cfg, curves, dist.main)
    plateau, done_steps = _train_in_pieces(a, out, model_cfg, cfg, curves, state, dist, device,
                                           schedule="constant lr after warm-up (--until-plateau)")  # fmt: skip
    if dist.main:
        card = _last_card(out)
        if plateau["plateaued"]:
            word = "done: the val loss has plateaued"
        elif done_steps >= cfg.steps:
            word = f"done: --max-steps {cfg.steps} reached without a plateau"
        else:
            word = "not done: run the same command again to continue"
        print(
            f"{word} (step {card.get('steps_done')}, val_loss {card.get('val_loss')}): {plateau['reason']}", flush=True
        )
    return 0


def _card_cooldown(card: dict[str, Any]) -> dict[str, Any] | None:
    """The card's cooldown (``from_step``, ``steps``); from its recipe's ``decay_start`` when a piece was cut off
    before the card was finished; None for a checkpoint never cooled down."""
    if card.get("cooldown"):
        return card["cooldown"]
    tc = card.get("train_config", {})
    if tc.get("decay_start") is None:
        return None
    return {"from_step": int(tc["decay_start"]), "steps": int(tc["steps"]) - int(tc["decay_start"])}


def _cooldown_config(card: dict[str, Any], a: argparse.Namespace, start: int) -> TrainConfig:
    """The checkpoint's own recipe (batch, lr, data, label dropout, seed), its lr falling linearly from
    ``start`` to 0 at ``start + a.cooldown``."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in card.get("train_config", {}).items() if k in names})
    return dataclasses.replace(
        base, steps=start + a.cooldown, decay_start=start, min_lr_ratio=0.0, time_budget_s=None, fit_to_budget=False,
        compile=a.compile, val_every=a.val_every or base.val_every, ckpt_every=a.ckpt_every or base.ckpt_every,
    )  # fmt: skip


def _prepare_cooldown(a: argparse.Namespace, out: Path, state: Path, curves: Path, main: bool
                      ) -> tuple[MiniWanConfig, TrainConfig, int]:  # fmt: skip
    """The model, the cooldown's recipe and its first step, with a resume state in place to train from:
    the cooldown's own (an exact resume), the plateau's at the same step (its AdamW moments go on; the
    recipe in it becomes the cooldown's), or, with ``--from-checkpoint`` only, one from the checkpoint's
    weights with fresh moments. Refuses a checkpoint that has not plateaued, another N than the cooldown
    under way, and a state of another run."""
    from salad_bench.harness.quality.model import load_checkpoint
    from salad_bench.harness.quality.train import recipe_of

    card = _last_card(out)
    if not card.get("steps_done"):
        raise _Refused(f"{out} holds no trained checkpoint (card.json with steps_done); train the base first "
                       "(--until-plateau), then --cooldown")  # fmt: skip
    cool = _card_cooldown(card)
    if cool is not None:
        start = int(cool["from_step"])
        if int(cool["steps"]) != a.cooldown:
            raise _Refused(f"{out}: a cooldown of {int(cool['steps'])} steps from step {start} is under way or done; "
                           f"rerun with --cooldown {int(cool['steps'])}")  # fmt: skip
    else:
        start = int(card["steps_done"])
        plateau = _plateau(a, curves)
        if not plateau["plateaued"]:
            raise _Refused(f"{out}: the val loss has not plateaued at a constant lr ({plateau['reason']}); the cooldown "
                           "follows the plateau: train on with --until-plateau first")  # fmt: skip
    model, card = load_checkpoint(out)
    cfg = _cooldown_config(card, a, start)
    done = int(card["steps_done"])
    if done >= cfg.steps:
        return model.config, cfg, start
    if state.exists():
        try:
            saved = torch.load(state, map_location="cpu", weights_only=False)  # whole: it may be rewritten in place
        except Exception as exc:  # noqa: BLE001 - a damaged state: say which file and the way on
            raise _Refused(f"{state}: cannot read the resume state ({type(exc).__name__}: {exc}); move it away and "
                           "rerun with --from-checkpoint") from None  # fmt: skip
        was, step = saved.get("config", {}), int(saved.get("step", -1))
        if recipe_of(was) == recipe_of(cfg.as_dict()):
            return model.config, cfg, start  # the cooldown's own state
        schedule = {k: was.get(k) for k in ("steps", "decay_start", "min_lr_ratio")}
        if cool is None and step == start and recipe_of(was) == recipe_of({**cfg.as_dict(), **schedule}):
            if main:
                torch.save({**saved, "config": cfg.as_dict()}, state)
                _log_event(curves, start, "cooldown_start", steps=a.cooldown, lr_from=cfg.lr,
                           note="the plateau's resume state goes on (its AdamW moments), the lr falling linearly to 0")  # fmt: skip
            return model.config, cfg, start
        raise _Refused(f"{state}: a resume state at step {step} of another run than this cooldown from step {start}; "
                       "move it away and rerun with --from-checkpoint")  # fmt: skip
    if not a.from_checkpoint:
        raise _Refused(
            f"{out} holds a checkpoint at step {done} but no resume state ({state}); pass --from-checkpoint to cool "
            "down from its weights with fresh optimiser moments (the curve and the card say where)"
        )
    if main:
        if cool is None:
            _log_event(curves, start, "cooldown_start", steps=a.cooldown, lr_from=cfg.lr,
                       note="the lr falls linearly to 0 from this step")  # fmt: skip
        _state_from_weights(model, card, cfg, state, curves)
    return model.config, cfg, start


def _train_cooldown(a: argparse.Namespace) -> int:
    dist, device = init_distributed(a.device)
    out, curves, state = _paths(a)
    model_cfg, cfg, start = _prepare_cooldown(a, out, state, curves, dist.main)
    cooldown = {"from_step": start, "steps": a.cooldown, "lr_from": cfg.lr, "lr_to": 0.0, "schedule": "linear"}
    _train_in_pieces(a, out, model_cfg, cfg, curves, state, dist, device, cooldown=cooldown,
                     schedule=f"constant lr {cfg.lr:g} after warm-up until step {start} (the plateau), then linear to 0 "
                     f"over {a.cooldown:,} steps (--cooldown)")  # fmt: skip
    if dist.main:
        card = _last_card(out)
        word = "done: cooled down" if int(card.get("steps_done", 0)) >= cfg.steps else "not done: run the same command again to continue"
        print(f"{word} (step {card.get('steps_done')} of {cfg.steps}, val_loss {card.get('val_loss')})", flush=True)
    return 0


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _background(a: argparse.Namespace, argv: list[str]) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pidfile = out / "train.pid"
    running = _pid_alive(pidfile)
    if running is not None:
        print(
            f"error: a run is already training in {out} (pid {running}); wait for it or stop it first", file=sys.stderr
        )
        return 2
    args = [x for x in argv if x != "--background"]
    with open(out / "train.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "salad_bench.harness.quality.train_base", *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    pidfile.write_text(f"{proc.pid}\n")
    print(f"training in the background: pid {proc.pid}, log {out / 'train.log'}; "
          f"progress: python -m salad_bench.harness.quality.train_base --out {out} --status", flush=True)  # fmt: skip
    return 0


def _status(a: argparse.Namespace) -> int:
    out, curves, _ = _paths(a)
    card = _last_card(out)
    cool = _card_cooldown(card)
    plateau = _plateau(a, curves, cool)
    pid = _pid_alive(out / "train.pid")
    print(json.dumps({
        "running": pid is not None, "pid": pid, "steps_done": card.get("steps_done"), "val_loss": card.get("val_loss"),
        "train_seconds_total": card.get("train_seconds_total"), "plateaued": plateau["plateaued"], "plateau": plateau["reason"],
        "rel_fall": plateau.get("rel_fall"), "cooldown": cool,
    }, indent=1), flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.status:
        return _status(a)
    check_writable_dir(a.out)
    if a.background:
        return _background(a, argv)
    try:
        if a.cooldown is not None:
            return _train_cooldown(a)
        return _train_until_plateau(a) if a.until_plateau else _train_fixed(a)
    except _Refused as exc:  # refused before training: the message names the fix
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        pidfile = Path(a.out) / "train.pid"
        if pidfile.exists() and pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
