"""A small video classifier trained on the procedural data: the judge of whether samples look like it.

Issue #25's bar asks that a base model's samples be recognisably its data: this classifier, trained on
rendered videos only, must label real validation videos with their class at >= 95% and the base
model's samples with their prompt's class at >= 80% (:mod:`harness.quality.base_bar`), and the
Frechet distance between its features of samples and of real videos is reported beside them.

Network (:class:`VideoClassifier`): a 3D-conv net, ``(B, 3, T, H, W)`` in ``[-1, 1]`` in, logits out.
A 1x3x3 conv of ``frame_width`` channels at full resolution, frame by frame (small shapes are told apart
by their edges), a stem (3x3x3 conv, stride 1x2x2), then one stage per entry of ``widths`` (a strided 3x3x3 conv
halving H and W, and T while it is > 1, then a residual 3x3x3 conv; GroupNorm and GELU after each),
mean and max pooling over space and time, a ``feature_dim`` projection with GELU (:meth:`VideoClassifier.features`, the
vector the Frechet distance uses) and a linear head. GroupNorm, not BatchNorm: the network is the
same function in training and evaluation, whatever the batch holds. Default: 2.0M parameters.

Training (:func:`fit`): cross-entropy on an endless stream of fresh videos (seeds from
:data:`SEED_OFFSET`, away from the DiT's training stream at 0 and the validation split), AdamW, linear
warm-up then cosine; each training video gets Gaussian noise of a random level up to ``noise_aug``
(so a sample's faint residual noise is not a cue the classifier has never seen; a level this small
leaves a blurry or shapeless video unrecognisable). Its accuracy on the validation split is measured
at the end.

Checkpoint (a directory): ``classifier-0000k-of-0000n.safetensors`` shards in bf16 (each < 15 MB; in
practice one of about 2 MB) and ``card.json`` (config, fit recipe, validation accuracy, provenance).
:func:`load_classifier` names the file on any damage (:class:`~harness.quality.model.CheckpointError`).

``python -m salad_bench.harness.quality.classifier --out checkpoints/video-classifier`` trains the
default one for the version-2 data (``--tiny`` for a CPU smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from salad_bench.harness.errors import Parser
from salad_bench.harness.quality.data import (
    NUM_CLASSES,
    SPECS,
    ProceduralVideos,
    ShardedSampler,
    VideoSpec,
    render_videos,
)

__all__ = [
    "SEED_OFFSET",
    "ClassifierConfig",
    "FitConfig",
    "VideoClassifier",
    "fit",
    "frechet_distance",
    "load_classifier",
    "save_classifier",
]

FORMAT = "salad-video-classifier/1"
SEED_OFFSET = 500_000_000  # the classifier's training videos: disjoint from the DiT's stream and from val


@dataclass(frozen=True)
class ClassifierConfig:
    """The network's size and the video spec it reads (frames, pixels, data version)."""

    widths: tuple[int, ...] = (48, 96, 192)
    feature_dim: int = 128
    frame_width: int = 16
    num_classes: int = NUM_CLASSES
    frames: int = 16
    height: int = 48
    width: int = 48
    data_version: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        if not self.widths or min(self.widths) < 4:
            raise ValueError(f"widths must be a non-empty tuple of ints >= 4; got {self.widths}")
        if not isinstance(self.frame_width, int) or self.frame_width < 0:
            raise ValueError(f"frame_width must be an int >= 0 (0: no full-resolution frame stage); got {self.frame_width!r}")
        if not 2 <= self.num_classes <= NUM_CLASSES:
            raise ValueError(f"num_classes must be in [2, {NUM_CLASSES}]; got {self.num_classes}")
        self.spec  # noqa: B018 (checks frames, height, width, version)

    @property
    def spec(self) -> VideoSpec:
        return VideoSpec(frames=self.frames, height=self.height, width=self.width, version=self.data_version)

    @classmethod
    def for_spec(cls, spec: VideoSpec, **kw: Any) -> ClassifierConfig:
        return cls(frames=spec.frames, height=spec.height, width=spec.width, data_version=spec.version, **kw)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ClassifierConfig fields: {', '.join(unknown)}")
        return cls(**d)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class VideoClassifier(nn.Module):
    """``forward(videos (B, 3, T, H, W)) -> logits (B, num_classes)``; see the module docstring."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w0, f = config.widths[0], config.frame_width
        # full resolution, frame by frame (shapes a few pixels across are told apart by their edges here)
        self.frame = nn.Sequential(nn.Conv3d(3, f, (1, 3, 3), padding=(0, 1, 1)), _norm(f), nn.GELU()) if f else nn.Identity()
        self.stem = nn.Sequential(nn.Conv3d(f or 3, w0, 3, stride=(1, 2, 2), padding=1), _norm(w0), nn.GELU())
        self.down, self.mix = nn.ModuleList(), nn.ModuleList()
        frames, c_in = config.frames, w0
        for c in config.widths:
            st = 2 if frames > 1 else 1
            frames = -(-frames // st)
            self.down.append(nn.Sequential(nn.Conv3d(c_in, c, 3, stride=(st, 2, 2), padding=1), _norm(c), nn.GELU()))
            self.mix.append(nn.Sequential(nn.Conv3d(c, c, 3, padding=1), _norm(c), nn.GELU()))
            c_in = c
        self.project = nn.Sequential(nn.Linear(2 * c_in, config.feature_dim), nn.GELU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def embed(self, videos: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.frame(videos))
        for down, mix in zip(self.down, self.mix, strict=True):
            x = down(x)
            x = x + mix(x)
        # mean and max over space and time: a small object's evidence is not averaged away
        return self.project(torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1))

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(videos))

    @torch.no_grad()
    def features(self, videos: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """``(B, feature_dim)`` float64 on the CPU: the pooled features the Frechet distance compares."""
        return self._batched(videos, batch_size, self.embed).double().cpu()

    @torch.no_grad()
    def predict(self, videos: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """``(B,)`` long on the CPU: the most likely class of each video."""
        return self._batched(videos, batch_size, self.forward).argmax(-1).cpu()

    def _batched(self, videos: torch.Tensor, batch_size: int, fn) -> torch.Tensor:
        if videos.dim() != 5 or tuple(videos.shape[1:]) != self.config.spec.shape:
            raise ValueError(
                f"videos must be (B, {', '.join(map(str, self.config.spec.shape))}); got {tuple(videos.shape)}"
            )
        dev = next(self.parameters()).device
        was = self.training
        self.eval()
        out = torch.cat(
            [fn(videos[s : s + batch_size].to(dev, torch.float32)).float() for s in range(0, len(videos), batch_size)]
        )
        self.train(was)
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitConfig:
    """The classifier's training recipe (defaults: the committed judge's schedule, about 4 minutes on
    one H200; its run was cut by a time budget at step 7,522 of 12,000, its cosine ending there)."""

    steps: int = 7500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    noise_aug: float = 0.1
    n_val: int = 512
    seed: int = 0
    log_every: int = 100
    time_budget_s: float | None = None


def _lr(step: int, cfg: FitConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then a cosine that reaches zero at ``cfg.steps`` or, with a time budget, when the
    budget is spent, whichever comes first (a run cut by its budget still ends annealed)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.time_budget_s:
        frac = max(frac, elapsed_s / cfg.time_budget_s)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def accuracy(model: VideoClassifier, videos: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    return float((model.predict(videos, batch_size) == labels.cpu()).float().mean())


def val_videos(
    config: ClassifierConfig, n: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` videos of the validation split (labels cycle through the classes)."""
    return ProceduralVideos("val", n, config.spec, config.num_classes).batch(list(range(n)), device)


def fit(
    config: ClassifierConfig, cfg: FitConfig = FitConfig(), *, device: torch.device | str = "cpu", echo: bool = False
) -> tuple[VideoClassifier, dict[str, Any]]:
    """Train a classifier from scratch; returns it (eval mode) and what happened (val accuracy, steps...)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = VideoClassifier(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = ShardedSampler(None, cfg.batch_size, seed=cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # noise drawn where the videos are
    t0, step, curve = time.perf_counter(), 0, []
    model.train()
    while step < cfg.steps:
        idx = sampler.batch_indices(step)
        labels = torch.tensor([i % config.num_classes for i in idx])
        x = render_videos([SEED_OFFSET + i for i in idx], labels.tolist(), config.spec, device)
        sigma = torch.rand(len(idx), generator=gen, device=device) * cfg.noise_aug
        x = x + sigma.view(-1, 1, 1, 1, 1) * torch.randn(x.shape, generator=gen, device=device)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg, time.perf_counter() - t0)
        loss = F.cross_entropy(model(x), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": round(time.perf_counter() - t0, 2)}
            curve.append(row)
            if echo:
                print(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
                )
        if cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s:
            break
    model.eval()
    vx, vy = val_videos(config, cfg.n_val, device)
    info = {
        "steps_done": step,
        "steps_planned": cfg.steps,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "val_accuracy": accuracy(model, vx, vy),
        "val_set": f"the first {cfg.n_val} videos of the validation split",
        "fit_config": dataclasses.asdict(cfg),
        "curve": curve,
    }
    return model, info


# -- the Frechet distance ---------------------------------------------------------------------------
def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(n, d)`` and ``(m, d)``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, in float64.

    ``tr((S_a S_b)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S_a S_b``, which are
    those of the symmetric ``A S_b A`` with ``A = S_a^(1/2)`` (eigen-decomposition; no inverse), so
    singular covariances (fewer samples than dimensions) are fine; rounding's tiny negative
    eigenvalues are clipped to zero.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (n, d) feature sets with the same d; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least two samples in each set for a covariance")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    ev, vec = torch.linalg.eigh(s_a)
    root_a = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    middle = root_a @ s_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross
    return float(fd.clamp_min(0))


# -- checkpoints ------------------------------------------------------------------------------------
def save_classifier(model: VideoClassifier, out_dir: str | Path, card: dict[str, Any]) -> list[Path]:
    """Write bf16 shards and ``card.json`` (``card`` plus the config and the shards' digests)."""
    from salad_bench.harness.quality.model import shard_digests, write_shards

    out = Path(out_dir)
    meta = {"format": FORMAT, "config": json.dumps(model.config.as_dict(), sort_keys=True)}
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    paths = write_shards(state, out, "classifier", meta, 15 * 10**6)
    full = {**card, "format": FORMAT, "config": model.config.as_dict(), "parameters": count_parameters(model),
            "weights_dtype": "bfloat16", "shards": [p.name for p in paths], "shard_sha256": shard_digests(paths)}  # fmt: skip
    (out / "card.json").write_text(json.dumps(full, indent=2, sort_keys=True, default=str) + "\n")
    return paths


def load_classifier(ckpt_dir: str | Path, device: torch.device | str = "cpu") -> tuple[VideoClassifier, dict[str, Any]]:
    """Load a :func:`save_classifier` directory; returns ``(model in eval mode, card)``."""
    from salad_bench.harness.quality.model import CheckpointError, read_card, read_shards

    d = Path(ckpt_dir)
    metas, state, where = read_shards(d, "classifier")
    for path, meta in metas:
        if meta.get("format") != FORMAT or "config" not in meta:
            raise CheckpointError(
                f"{path}: not a video-classifier shard (format={meta.get('format')!r}, expected {FORMAT!r})"
            )
    try:
        config = ClassifierConfig.from_dict(json.loads(metas[0][1]["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{metas[0][0]}: bad classifier config in metadata ({exc})") from None
    model = VideoClassifier(config)
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) or sorted(k for k in own if tuple(own[k].shape) != tuple(state[k].shape))
    if bad:
        raise CheckpointError(
            f"{where.get(bad[0], d)}: tensors do not match the config: {', '.join(bad[:3])}; retrain the classifier"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), read_card(d)


# -- CLI ----------------------------------------------------------------------------------------------
TINY = dict(widths=(8, 16), feature_dim=16, frame_width=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = FitConfig()
    p = Parser(
        prog="python -m salad_bench.harness.quality.classifier", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="checkpoint directory (shards + card.json)")
    p.add_argument("--data", choices=sorted(SPECS), default="v2", help="the dataset version (its default spec)")
    p.add_argument("--tiny", action="store_true", help="a CPU-sized net on 4x16x16 videos (smoke runs)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--n-val", type=int, default=d.n_val)
    p.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds (the cosine then ends there)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from salad_bench.harness.errors import check_writable_dir
    from salad_bench.harness.results import provenance

    check_writable_dir(a.out)

    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    )
    spec = SPECS[a.data]
    if a.tiny:
        spec = dataclasses.replace(spec, frames=4, height=16, width=16)
    config = ClassifierConfig.for_spec(spec, **(TINY if a.tiny else {}))
    cfg = FitConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=min(100, a.steps // 10), n_val=a.n_val,
                    seed=a.seed, time_budget_s=a.time_budget)  # fmt: skip
    model, info = fit(config, cfg, device=device, echo=True)
    prov = provenance(str(device))
    card = {"name": "video-classifier", "data": f"procedural videos version {spec.version}", **info,
            **{k: prov[k] for k in ("git_sha", "git_dirty", "card", "torch", "date")}}  # fmt: skip
    save_classifier(model, a.out, card)
    print(f"classifier: val accuracy {info['val_accuracy']:.4f} on {a.n_val} videos after {info['steps_done']} steps "
          f"({info['train_seconds']:.0f} s) -> {a.out}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
