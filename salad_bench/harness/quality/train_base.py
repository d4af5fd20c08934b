"""``python -m salad_bench.harness.quality.train_base --out checkpoints/mini-wan``: train the full-attention base model.

A thin CLI over :func:`harness.quality.train.train_base_model`; ``torchrun --nproc_per_node N -m
harness.quality.train_base ...`` trains data-parallel. Defaults: the model of
:class:`~harness.quality.model.MiniWanConfig` and the recipe :data:`~harness.quality.train.BASE_DEFAULTS`.
``--tiny`` selects a CPU-sized model (tests, smoke runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from salad_bench.harness.quality.model import MiniWanConfig
from salad_bench.harness.quality.train import BASE_DEFAULTS, init_distributed, train_base_model

TINY = MiniWanConfig(num_layers=2, num_heads=2, head_dim=64, ffn_dim=128, freq_dim=32, frames=4, height=16, width=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = BASE_DEFAULTS
    p = argparse.ArgumentParser(prog="python -m salad_bench.harness.quality.train_base", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory (shards + card.json + README.md)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument("--t-sampling", choices=("logit_normal", "uniform"), default=d.t_sampling)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="save the resumable state every N steps")
    p.add_argument("--n-val", type=int, default=32, help="validation videos")
    p.add_argument(
        "--time-budget", type=float, default=None, help="stop after this many seconds (steps done are recorded)"
    )
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model (2 layers, 4x16x16 videos)")
    p.add_argument("--curves", default=None, help="JSONL file for the training curve (default <out>/curves.jsonl)")
    p.add_argument("--state", default=None, help="resumable training state (default <out>/resume/state.pt)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    model_cfg = TINY if a.tiny else MiniWanConfig()
    if a.layers is not None:
        model_cfg = dataclasses.replace(model_cfg, num_layers=a.layers)
    cfg = dataclasses.replace(
        BASE_DEFAULTS,
        steps=a.steps,
        batch_size=a.batch,
        lr=a.lr,
        warmup_steps=min(a.warmup, max(0, a.steps // 5)),
        t_sampling=a.t_sampling,
        val_every=a.val_every,
        ckpt_every=a.ckpt_every,
        time_budget_s=a.time_budget,
        fit_to_budget=a.time_budget is not None,
        seed=a.seed,
    )
    dist, device = init_distributed(a.device)
    curves = a.curves or f"{a.out}/curves.jsonl"
    train_base_model(
        a.out, model_cfg, cfg, device=device, dist=dist, n_val=a.n_val, curve_path=curves, state_path=a.state, echo=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
