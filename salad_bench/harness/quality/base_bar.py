"""The bar a base model must pass before any sparse-attention study uses it (issue #25).

``python -m salad_bench.harness.quality.base_bar --checkpoint DIR --classifier DIR [--out DIR]``
measures four criteria and writes a card, ``bar.json`` and ``BAR.md`` (``--out`` defaults to the
checkpoint directory, so the card is committed with the weights it judges):

1. **val loss has plateaued at a constant learning rate** (:func:`plateau_test` on the checkpoint's
   ``curves.jsonl``): over the last ``window`` validation evaluations the learning rate is constant and
   the least-squares line through the val losses falls by less than ``rel_tol`` of their mean across
   the window. The slope's 95% interval is reported beside it. A base cooled down after its plateau
   (``train_base --cooldown``: the lr falls linearly to 0) is tested on the constant-lr phase before
   the cooldown (:func:`checkpoint_plateau`), and the val loss before and after the cooldown is reported;
   the other criteria judge the cooled weights.
2. **samples are recognisably the data**: ``per_class`` videos per class sampled with the study's
   Euler sampler (:mod:`harness.quality.sampler`) are labelled with their prompt's class by the
   video classifier (:mod:`harness.quality.classifier`) at >= 80%. A model with a null class is
   sampled as Wan2.1 is, with classifier-free guidance at the pre-registered scale ``guidance`` (5.0,
   the default of diffusers' Wan pipeline); the unguided samples' accuracy and Frechet distance are
   reported beside it as information, not a criterion. A model without a null class is sampled
   without guidance, and the card says so;
3. ... and the same classifier labels real validation videos at >= 95% (else the judge is too weak to
   say anything). The Frechet distance between the classifier's features of samples and of real
   videos is reported (no threshold), beside the distance between two disjoint real sets of the same
   size (what sampling noise alone gives).
4. **top-k at 90% keeps >= 70% of the attention mass in every layer**: on noised validation videos,
   each self-attention layer's q and k (after qk-norm and RoPE, as a method sees them) go to the
   registered ``topk`` method's ``select``; the kept mass is the softmax probability inside its kept
   tiles, averaged over query rows, heads, videos and ``t``. The oracle's mass (per query block, the
   same number of key blocks chosen by their true mass) is reported beside it, and so is the mass of each
   row's best ``(1 - sparsity) N`` keys: what any pattern at that sparsity could keep.

Exit status: 0 when the card was written (the verdict, pass or fail, is in the card and on stdout); 2
on bad input (a missing or damaged checkpoint or classifier, a classifier for another video spec),
with a message that names the fix. :func:`require_base_bar` is what a study calls to refuse a base
model without a passing card for exactly these weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from salad_bench.harness.errors import Parser, check_writable_dir

__all__ = [
    "BAR_FORMAT",
    "BarSettings",
    "BaseBarError",
    "Thresholds",
    "attention_masses",
    "block_mass",
    "kept_mass",
    "layer_attention_mass",
    "main",
    "oracle_mass",
    "row_top_mass",
    "checkpoint_plateau",
    "plateau_test",
    "read_val_curve",
    "require_base_bar",
    "run_bar",
]

BAR_FORMAT = "salad-base-bar/1"


class BaseBarError(ValueError):
    """A base model without a passing bar card (or bad input to the bar); the message names the fix."""


@dataclass(frozen=True)
class Thresholds:
    """The issue's numbers."""

    sample_accuracy: float = 0.80
    real_accuracy: float = 0.95
    topk_mass: float = 0.70
    sparsity: float = 0.90
    plateau_window: int = 8
    plateau_rel_tol: float = 0.01


@dataclass(frozen=True)
class BarSettings:
    """How much is measured. Defaults: 128 samples (8 per class, 20 Euler steps, guidance 5.0 when the model
    has a null class), 256 real videos, attention on 8 validation videos x 5 noise levels."""

    per_class: int = 8
    sample_steps: int = 20
    guidance: float = 5.0  # pre-registered classifier-free guidance scale (Wan2.1's default in diffusers)
    noise_seed: int = 7
    real_per_class: int = 16
    mass_videos: int = 8
    mass_t: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    batch: int = 16


# -- 1. the plateau ---------------------------------------------------------------------------------
def read_val_curve(path: str | Path) -> list[tuple[int, float, float]]:
    """``(step, val_loss, lr)`` of every row of a curves file that has a val loss, one per step (the
    last row wins: a resumed run may log a step again), in step order. Rows of fine-tunings (a
    ``phase`` other than ``base``) are skipped."""
    points: dict[int, tuple[int, float, float]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if row.get("val_loss") is None or row.get("phase", "base") != "base":
            continue
        points[int(row["step"])] = (int(row["step"]), float(row["val_loss"]), float(row.get("lr", float("nan"))))
    return [points[s] for s in sorted(points)]


def _t975(df: int) -> float:
    """Student's t 97.5% quantile: exact for df 1, 2; Cornish-Fisher expansion (error < 1e-3) above."""
    if df <= 2:
        return (12.7062, 4.3027)[df - 1]
    z = 1.959963984540054
    g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)  # fmt: skip
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def plateau_test(
    points: Sequence[tuple[int, float, float]], *, window: int = 8, rel_tol: float = 0.01
) -> dict[str, Any]:
    """Has the val loss plateaued at a constant learning rate? ``points``: ``(step, val_loss, lr)``.

    Over the last ``window`` evaluations: the learning rate must be the same at all of them, and the
    least-squares line's fall across the window (``-slope * (last step - first step)``) must be below
    ``rel_tol`` times the window's mean loss. Returns ``plateaued`` with the figures (relative fall,
    the slope per 1,000 steps with its 95% interval, whether that interval holds 0) and a reason.
    """
    out: dict[str, Any] = {"plateaued": False, "window": window, "rel_tol": rel_tol, "evaluations": len(points)}
    if window < 3:
        raise ValueError(f"window must be >= 3 evaluations; got {window}")
    if len(points) < window:
        return {**out, "reason": f"{len(points)} val evaluations; the test needs the last {window}"}
    steps = torch.tensor([p[0] for p in points[-window:]], dtype=torch.float64)
    loss = torch.tensor([p[1] for p in points[-window:]], dtype=torch.float64)
    lrs = [p[2] for p in points[-window:]]
    x = steps - steps.mean()
    slope = float((x * (loss - loss.mean())).sum() / (x * x).sum())
    resid = loss - loss.mean() - slope * x
    se = float(math.sqrt(float((resid * resid).sum()) / (window - 2) / float((x * x).sum())))
    half = _t975(window - 2) * se
    span, mean = float(steps[-1] - steps[0]), float(loss.mean())
    fall = -slope * span / mean
    constant = all(math.isclose(lr, lrs[0], rel_tol=1e-6) for lr in lrs)
    out.update({
        "steps": [int(steps[0]), int(steps[-1])], "mean_val_loss": mean, "rel_fall": fall,
        "slope_per_1k": slope * 1e3, "slope_ci95_per_1k": [(slope - half) * 1e3, (slope + half) * 1e3],
        "ci_holds_zero": slope - half <= 0 <= slope + half, "lr_constant": constant, "lr": lrs[-1],
    })  # fmt: skip
    if not constant:
        out["reason"] = (
            f"the learning rate changes inside the window ({min(lrs):.3g} to {max(lrs):.3g}): not a constant-LR plateau"
        )
    elif fall >= rel_tol:
        out["reason"] = (
            f"the val loss still falls {fall:.2%} across the last {window} evaluations (limit {rel_tol:.2%})"
        )
    else:
        out["plateaued"] = True
        out["reason"] = (
            f"falls {fall:.2%} across the last {window} evaluations at lr {lrs[-1]:.3g} (limit {rel_tol:.2%})"
        )
    return out


def checkpoint_plateau(
    curve_path: str | Path, cooldown: dict[str, Any] | None = None, *, window: int = 8, rel_tol: float = 0.01
) -> dict[str, Any]:
    """:func:`plateau_test` on a checkpoint's curves file; not plateaued when the file does not exist.

    ``cooldown`` (the card's ``cooldown``: ``from_step``, ``steps``): the plateau is that of the constant-lr
    phase, the evaluations up to ``from_step``; the result's ``cooldown`` gives the val loss there and at
    the last evaluation after it, and the reason says so."""
    path = Path(curve_path)
    if not path.exists():
        return {"plateaued": False, "evaluations": 0, "reason": f"{path} is missing: no val curve to test"}
    points = read_val_curve(path)
    if not cooldown:
        return plateau_test(points, window=window, rel_tol=rel_tol)
    start, steps = int(cooldown["from_step"]), int(cooldown["steps"])
    stable = [p for p in points if p[0] <= start]
    out = plateau_test(stable, window=window, rel_tol=rel_tol)
    after = [p for p in points if p[0] > start]
    info = {"from_step": start, "steps": steps, "val_loss_before": stable[-1][1] if stable else None,
            "val_loss_after": after[-1][1] if after else None, "last_step": after[-1][0] if after else start}  # fmt: skip
    out["cooldown"] = info
    tail = f"; then a cooldown from step {start}, the lr falling linearly to 0 over {steps:,} steps"
    if after:
        before = f"{info['val_loss_before']:.4f}" if stable else "n/a"
        tail += f" (val loss {before} at step {start}, {info['val_loss_after']:.4f} at step {info['last_step']})"
    out["reason"] = f"constant-lr phase up to step {start}: {out['reason']}{tail}"
    return out


# -- 4. attention mass --------------------------------------------------------------------------------
def _mass_pass(
    q: torch.Tensor, k: torch.Tensor, *, blocks: tuple[int, int] | None = None, keep: int = 0, rows_per_chunk: int = 1024
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pass over ``softmax(q k^T / sqrt(D))`` in fp32, a chunk of query rows at a time: the tile map of
    :func:`block_mass` where ``blocks = (block_q, block_k)``, the row means of :func:`row_top_mass` where
    ``keep``; None for what is not asked."""
    b, h, n, d = q.shape
    step = rows_per_chunk
    tiles = None
    if blocks is not None:
        block_q, block_k = blocks
        mk = -(-n // block_k)
        step = max(block_q, rows_per_chunk // block_q * block_q)
        tiles = torch.zeros(b, h, -(-n // block_q), mk, dtype=torch.float32, device=q.device)
    keep = max(0, min(int(keep), n))
    top = torch.zeros(b, h, dtype=torch.float32, device=q.device) if keep else None
    kf = k.float()
    for s in range(0, n, step):
        p = torch.softmax(q[:, :, s : s + step].float() @ kf.transpose(-1, -2) / math.sqrt(d), dim=-1)
        if top is not None:
            top += p.topk(keep, dim=-1, sorted=False).values.sum((-1, -2))
        if tiles is not None:
            p = F.pad(p, (0, mk * block_k - n)).unflatten(-1, (mk, block_k)).sum(-1)  # (B, H, r, Mk)
            r = p.shape[2]
            p = F.pad(p, (0, 0, 0, -r % block_q)).unflatten(2, (-1, block_q)).sum(3)  # (B, H, r / block_q, Mk)
            tiles[:, :, s // block_q : s // block_q + p.shape[2]] += p
    return tiles, None if top is None else top / n


def block_mass(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, *, rows_per_chunk: int = 1024
) -> torch.Tensor:
    """Softmax attention mass per tile: ``(B, H, Mq, Mk)`` float32, the sum over a query block's rows of
    ``softmax(q k^T / sqrt(D))`` inside each key block. Every row sums to 1, so the whole map sums to
    ``N`` per head. ``q, k``: ``(B, H, N, D)``; computed in fp32 a chunk of query rows at a time."""
    return _mass_pass(q, k, blocks=(block_q, block_k), rows_per_chunk=rows_per_chunk)[0]


def row_top_mass(q: torch.Tensor, k: torch.Tensor, keep: int, *, rows_per_chunk: int = 1024) -> torch.Tensor:
    """``(B, H)``: the mean over query rows of the softmax mass of each row's ``keep`` largest keys, the
    most any attention pattern keeping ``keep`` keys per row can hold (blocks or not). Below the bar's
    threshold the model's attention itself is too spread for that sparsity, whatever the selection."""
    return _mass_pass(q, k, keep=max(1, keep), rows_per_chunk=rows_per_chunk)[1]


def kept_mass(bm: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """``(B, H)``: the mean over query rows of the softmax mass inside the kept tiles (``tiles``: bool
    ``(B, H, Mq, Mk)``, e.g. ``BlockLayout.to_dense()``), from a :func:`block_mass` map."""
    n = bm.sum((-1, -2))  # rows per head (each sums to 1)
    return (bm * tiles).sum((-1, -2)) / n


def oracle_mass(bm: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(B, H)``: the best a layout with ``counts[b, h, qb]`` key blocks per query block can keep: each
    query block's largest tiles of ``bm``."""
    best = torch.sort(bm, dim=-1, descending=True).values.cumsum(-1)  # (B, H, Mq, Mk)
    idx = (counts.long().clamp(1, bm.shape[-1]) - 1).unsqueeze(-1)
    kept = torch.gather(best, -1, idx).squeeze(-1) * (counts > 0)
    return kept.sum(-1) / bm.sum((-1, -2))


def attention_masses(q: torch.Tensor, k: torch.Tensor, ctx: Any, sparsity: float) -> dict[str, torch.Tensor]:
    """``topk`` (the registered method, default knobs) at ``sparsity`` on these q, k: its kept mass, the
    oracle's with the same block counts, the layout's density and the best any pattern at ``sparsity``
    can keep (:func:`row_top_mass`, ``ceil((1 - sparsity) N)`` keys per row), each ``(B, H)``."""
    from salad_bench.methods import create_method

    method = create_method("topk", num_heads=q.shape[1], head_dim=q.shape[3], sparsity=sparsity)
    layout = method.select(q, k, ctx)  # as the study runs it (under the sampler's autocast)
    with torch.autocast(q.device.type, enabled=False):  # the mass itself in fp32, not autocast's bf16
        keep = max(1, math.ceil((1 - sparsity) * q.shape[2] - 1e-9))  # each row's best keys (row_top_mass)
        bm, best = _mass_pass(q, k, blocks=(layout.block_q, layout.block_k), keep=keep)
    tiles = layout.to_dense()
    return {
        "topk": kept_mass(bm, tiles),
        "oracle": oracle_mass(bm, layout.kv_cnt),
        "density": tiles.float().mean((-1, -2)),
        "row_top": best,
    }


_MASS_KEYS = ("topk", "oracle", "density", "row_top")


def layer_attention_mass(
    model: Any,
    videos: torch.Tensor,
    labels: torch.Tensor,
    t_grid: Sequence[float],
    *,
    sparsity: float = 0.9,
    noise_seed: int = 4321,
    batch: int = 4,
) -> list[dict[str, Any]]:
    """Per self-attention layer of a :class:`~harness.quality.model.MiniWan`: ``topk``'s kept mass, the
    oracle's and the layout's density, averaged over videos, heads and ``t`` (each noised as in
    training, ``x_t = (1 - t) x0 + t noise``), with the per-``t`` means. The model runs its usual
    dense attention (SDPA) throughout; q, k are read where a sparse method would get them."""
    from salad_bench.harness.integrations.wan import install_attention, restore_attention
    from salad_bench.harness.quality.sampler import autocast, make_noise
    from salad_bench.methods.base import AttentionMethod, MethodConfig

    sums: dict[tuple[int, float], dict[str, float]] = {}
    current = {"t": 0.0}

    class _Probe(AttentionMethod):
        family = "full"

        def attend(self, q, k, v, ctx):
            m = attention_masses(q, k, ctx, sparsity)
            acc = sums.setdefault((ctx.layer, current["t"]), {**dict.fromkeys(_MASS_KEYS, 0.0), "n": 0})
            for key in _MASS_KEYS:
                acc[key] = acc[key] + m[key].sum(0).double().cpu()  # (H,): summed over videos, kept per head
            acc["n"] += m["topk"].shape[0]
            return F.scaled_dot_product_attention(q, k, v)

    wan = model.transformer
    install_attention(
        wan, lambda **kw: _Probe(MethodConfig(), num_heads=kw["num_heads"], head_dim=kw["head_dim"], name="mass_probe")
    )
    try:
        dev = videos.device
        noise = make_noise(len(videos), model.config.spec, noise_seed, dev)
        with torch.no_grad():
            for t in t_grid:
                current["t"] = float(t)
                for s in range(0, len(videos), batch):
                    x0, lab = videos[s : s + batch], labels[s : s + batch]
                    xt = (1 - t) * x0 + t * noise[s : s + batch]
                    with autocast(dev):
                        model(xt, torch.full((len(x0),), float(t), device=dev), lab)
    finally:
        restore_attention(wan)
    layers = sorted({layer for layer, _ in sums})
    out = []
    for layer in layers:
        per_t = {  # per head, (H,) each
            t: {k: v / sums[(layer, t)]["n"] for k, v in sums[(layer, t)].items() if k != "n"}
            for t in map(float, t_grid)
        }
        heads = {k: sum(pt[k] for pt in per_t.values()) / len(per_t) for k in _MASS_KEYS}
        mean = {k: float(v.mean()) for k, v in heads.items()}
        out.append({"layer": layer, "topk_mass": mean["topk"], "oracle_mass": mean["oracle"], "density": mean["density"],
                    "row_top_mass": mean["row_top"],
                    "per_head": {k: [round(float(x), 5) for x in heads[k]] for k in ("topk", "row_top")},
                    "per_t": {f"{t:g}": {k: round(float(v.mean()), 5) for k, v in pt.items()} for t, pt in per_t.items()}})  # fmt: skip
    return out


# -- a picture of the samples ------------------------------------------------------------------------
def _write_png(path: Path, rgb: torch.Tensor) -> None:
    """A minimal PNG writer (8-bit RGB, no filter) so the card needs no imaging package."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].contiguous().numpy().tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def sample_grid(samples: torch.Tensor, real: torch.Tensor, columns: int = 4) -> torch.Tensor:
    """``(rows * H, 2 * columns * W, 3)`` uint8: per row (a class), ``columns`` evenly spaced frames of a
    sample, then of a real video of the same class; ``samples``, ``real``: ``(rows, 3, T, H, W)``."""
    t = samples.shape[2]
    idx = [round(i * (t - 1) / max(1, columns - 1)) for i in range(columns)]
    both = torch.cat([samples[:, :, idx], real[:, :, idx]], dim=2).float().cpu()  # (rows, 3, 2c, H, W)
    img = ((both.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 3, 2, 4, 1).flatten(0, 1).flatten(1, 2)  # rows*H, 2c*W, 3


# -- the whole bar ----------------------------------------------------------------------------------
def _criterion(name: str, measured: float | None, threshold: float, passed: bool, **detail: Any) -> dict[str, Any]:
    return {"name": name, "measured": measured, "threshold": threshold, "pass": bool(passed), **detail}


def run_bar(
    checkpoint: str | Path,
    classifier: str | Path,
    *,
    settings: BarSettings = BarSettings(),
    thresholds: Thresholds = Thresholds(),
    device: torch.device | str = "cpu",
    echo: bool = False,
) -> dict[str, Any]:
    """Measure every criterion on ``checkpoint`` with the classifier in ``classifier``; returns the card
    (nothing is written). Bad input raises :class:`BaseBarError`."""
    from salad_bench.harness.quality.classifier import frechet_distance, load_classifier
    from salad_bench.harness.quality.data import ProceduralVideos
    from salad_bench.harness.quality.model import CheckpointError, load_checkpoint
    from salad_bench.harness.quality.sampler import euler_sample, make_noise

    if not (math.isfinite(settings.guidance) and settings.guidance >= 1):
        raise BaseBarError(f"guidance must be a number >= 1 (1: no guidance); got {settings.guidance}")
    device = torch.device(device)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if echo:
            print(f"[bar {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    ckpt = Path(checkpoint)
    try:
        model, card = load_checkpoint(ckpt, device)
    except CheckpointError as exc:
        raise BaseBarError(f"{exc}\nfix: restore the checkpoint (git checkout {ckpt}) or train one with "
                           f"python -m salad_bench.harness.quality.train_base --out {ckpt}") from None  # fmt: skip
    try:
        clf, clf_card = load_classifier(classifier, device)
    except CheckpointError as exc:
        raise BaseBarError(f"{exc}\nfix: train a classifier with python -m salad_bench.harness.quality.classifier "
                           f"--out {classifier}") from None  # fmt: skip
    spec, cspec = model.config.spec, clf.config.spec
    if (spec.frames, spec.height, spec.width, spec.version) != (cspec.frames, cspec.height, cspec.width, cspec.version):
        raise BaseBarError(
            f"{classifier}: the classifier reads {cspec.frames}x{cspec.height}x{cspec.width} videos of data version "
            f"{cspec.version}, the model makes {spec.frames}x{spec.height}x{spec.width} of version {spec.version}; "
            "fix: train a classifier for this spec (python -m salad_bench.harness.quality.classifier --data v<N>)"
        )
    if clf.config.num_classes != model.config.num_classes:
        raise BaseBarError(f"{classifier}: {clf.config.num_classes} classes, the model {model.config.num_classes}; "
                           "fix: train a classifier with the model's classes")  # fmt: skip
    model.eval().requires_grad_(False)
    s, th, nc = settings, thresholds, model.config.num_classes
    criteria = []

    # 1. plateau
    plateau = checkpoint_plateau(ckpt / "curves.jsonl", card.get("cooldown"), window=th.plateau_window,
                                 rel_tol=th.plateau_rel_tol)  # fmt: skip
    criteria.append(_criterion("val_loss_plateau", plateau.get("rel_fall"), th.plateau_rel_tol, plateau["plateaued"],
                               rule="relative fall of the fitted line across the window, at a constant lr, below the threshold",
                               detail=plateau))  # fmt: skip
    say(f"plateau: {plateau['reason']}")

    # 2-3. samples and real videos through the classifier
    n = s.per_class * nc
    labels = torch.arange(n, device=device) % nc
    noise = make_noise(n, spec, s.noise_seed, device)
    null = model.null_label
    scale = s.guidance if null is not None else 1.0

    def sample(g: float) -> torch.Tensor:
        return torch.cat([euler_sample(model, noise[i : i + s.batch], labels[i : i + s.batch], num_steps=s.sample_steps,
                                       guidance=g, null_label=null) for i in range(0, n, s.batch)])  # fmt: skip

    def judge(videos: torch.Tensor) -> tuple[float, list[float]]:
        pred, lab = clf.predict(videos, s.batch), labels.cpu()
        return float((pred == lab).float().mean()), [float((pred[lab == c] == c).float().mean()) for c in range(nc)]

    samples = sample(scale)
    say(f"sampled {n} videos ({s.sample_steps} Euler steps, guidance {scale:g})")
    sample_acc, per_class = judge(samples)
    n_real = s.real_per_class * nc
    real, real_labels = ProceduralVideos("val", n_real, spec, nc).batch(list(range(n_real)), device)
    real_acc = float((clf.predict(real, s.batch) == real_labels.cpu()).float().mean())
    other = ProceduralVideos("train", None, spec, nc).batch(list(range(n)), device)[0]  # a disjoint real set, size n
    f_samples, f_real, f_other = (clf.features(v, s.batch) for v in (samples, real, other))
    fd = {"samples_vs_real": frechet_distance(f_samples, f_real), "real_vs_real": frechet_distance(f_other, f_real),
          "n_samples": n, "n_real": n_real, "feature_dim": int(f_real.shape[1]),
          "note": "real_vs_real: train-split videos (as many as the samples) against the same real set: the floor sampling noise gives"}  # fmt: skip
    guidance: dict[str, Any] = {"scale": scale, "setting": s.guidance, "null_class": null is not None}
    if null is None:
        guidance["note"] = "the model has no null class (trained without label dropout): sampled without guidance"
    elif scale == 1.0:
        guidance["note"] = "guidance 1: the conditional model alone"
    else:
        unguided = sample(1.0)
        acc1, per_class1 = judge(unguided)
        guidance["unguided"] = {
            "sample_accuracy": acc1, "per_class": [round(a, 4) for a in per_class1],
            "frechet_samples_vs_real": frechet_distance(clf.features(unguided, s.batch), f_real),
            "note": "the same noise and labels sampled with guidance 1: information, not a criterion"}  # fmt: skip
        guidance["note"] = (f"classifier-free guidance {scale:g} against the null class (pre-registered, Wan2.1's "
                            "default in diffusers); the criterion and samples.png use the guided samples")  # fmt: skip
        say(f"unguided: samples {acc1:.3f}, Frechet {guidance['unguided']['frechet_samples_vs_real']:.3f}")
    criteria.append(_criterion("sample_accuracy", sample_acc, th.sample_accuracy, sample_acc >= th.sample_accuracy,
                               n=n, guidance=scale, per_class=[round(a, 4) for a in per_class]))  # fmt: skip
    criteria.append(_criterion("real_accuracy", real_acc, th.real_accuracy, real_acc >= th.real_accuracy, n=n_real))
    say(
        f"classifier: samples {sample_acc:.3f}, real {real_acc:.3f}; Frechet {fd['samples_vs_real']:.3f} (real vs real {fd['real_vs_real']:.3f})"
    )

    # 4. attention mass per layer
    m = min(s.mass_videos, n_real)
    layers = layer_attention_mass(
        model, real[:m], real_labels[:m], s.mass_t, sparsity=th.sparsity, batch=max(1, s.batch // 4)
    )
    worst = min(layers, key=lambda r: r["topk_mass"])
    criteria.append(_criterion("topk_mass_every_layer", worst["topk_mass"], th.topk_mass, worst["topk_mass"] >= th.topk_mass,
                               worst_layer=worst["layer"], mean_over_layers=sum(r["topk_mass"] for r in layers) / len(layers)))  # fmt: skip
    say("attention mass kept by topk at 90%: " + ", ".join(f"L{r['layer']} {r['topk_mass']:.3f}" for r in layers))

    from salad_bench.harness.results import provenance

    grid = sample_grid(samples[:nc], real[:nc])  # labels cycle, so the first nc videos are one per class
    prov = provenance(str(device))
    verdict = "pass" if all(c["pass"] for c in criteria) else "fail"
    return {
        "format": BAR_FORMAT,
        "verdict": verdict,
        "checkpoint": str(ckpt),
        "checkpoint_shard_sha256": card.get("shard_sha256"),
        "checkpoint_steps": card.get("steps_done"),
        "model_config": model.config.as_dict(),
        "classifier": str(classifier),
        "classifier_shard_sha256": clf_card.get("shard_sha256"),
        "classifier_val_accuracy": clf_card.get("val_accuracy"),
        "criteria": criteria,
        "frechet_distance": fd,
        "guidance": guidance,
        "attention": layers,
        "attention_inputs": f"{m} validation videos x t in {list(s.mass_t)}; topk at sparsity {th.sparsity} (block_q 128, block_k 64, diagonal kept)",
        "settings": {**dataclasses.asdict(s), "mass_t": list(s.mass_t)},
        "thresholds": dataclasses.asdict(th),
        "seconds": round(time.perf_counter() - t0, 1),
        **{k: prov[k] for k in ("git_sha", "git_dirty", "card", "torch", "date")},
        "_grid": grid,  # samples.png; not written into bar.json
    }


def render_markdown(bar: dict[str, Any]) -> str:
    """``BAR.md``: the verdict, each criterion beside its threshold, the per-layer attention table."""
    lines = [f"# Base-model bar: **{bar['verdict'].upper()}**", "",
             f"Checkpoint `{bar['checkpoint']}` (step {bar.get('checkpoint_steps')}), classifier `{bar['classifier']}`; "
             f"{bar.get('card')}, git {bar.get('git_sha')}, {bar.get('date')}. Written by "
             "`python -m salad_bench.harness.quality.base_bar` (docs/QUALITY.md).", "",
             "| criterion | measured | threshold | pass |", "|---|---|---|---|"]  # fmt: skip
    for c in bar["criteria"]:
        val = "n/a" if c["measured"] is None else f"{c['measured']:.4f}"
        op = "<" if c["name"] == "val_loss_plateau" else ">="
        lines.append(f"| {c['name']} | {val} | {op} {c['threshold']} | {'yes' if c['pass'] else '**no**'} |")
    plateau = bar["criteria"][0]["detail"]
    fd = bar["frechet_distance"]
    lines += ["", f"Plateau: {plateau['reason']}."]
    if "slope_per_1k" in plateau:
        lo, hi = plateau["slope_ci95_per_1k"]
        lines.append(f"Slope {plateau['slope_per_1k']:.3g} per 1,000 steps, 95% interval [{lo:.3g}, {hi:.3g}] "
                     f"(steps {plateau['steps'][0]}-{plateau['steps'][1]}).")  # fmt: skip
    lines += ["", f"Frechet distance of classifier features (dim {fd['feature_dim']}): samples vs real "
              f"{fd['samples_vs_real']:.4f}; two real sets {fd['real_vs_real']:.4f} ({fd['n_samples']} vs {fd['n_real']} videos).",
              "", _guidance_line(bar.get("guidance")),
              "", f"Attention ({bar['attention_inputs']}):", "",
              "| layer | topk kept mass | oracle mass | topk density | best keys per row (any pattern) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in bar["attention"]:
        best = f"{r['row_top_mass']:.4f}" if "row_top_mass" in r else "–"  # cards before the column
        lines.append(f"| {r['layer']} | {r['topk_mass']:.4f} | {r['oracle_mass']:.4f} | {r['density']:.4f} | {best} |")
    lines += ["", "Oracle: each query block's best key blocks, as many as topk keeps. Best keys per row: the mass of each "
              "row's top (1 - sparsity) N keys, what any pattern at this sparsity could keep; when it is below the "
              "threshold the model's attention is too spread for the criterion, whatever the selection."]  # fmt: skip
    if all("per_head" in r for r in bar["attention"]):  # cards before the column have none
        lines += ["", "Per head, topk kept mass / best keys per row (a head sparse per row but not in blocks attends "
                  "to keys scattered across its query block; one low in both attends broadly):", "",
                  "| layer | " + " | ".join(f"head {h}" for h in range(len(bar["attention"][0]["per_head"]["topk"]))) + " |",
                  "|---|" + "---|" * len(bar["attention"][0]["per_head"]["topk"])]  # fmt: skip
        for r in bar["attention"]:
            ph = r["per_head"]
            lines.append(f"| {r['layer']} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(ph["topk"], ph["row_top"], strict=True)) + " |")
    lines += ["", "`samples.png`: one row per class (in class order); four frames of the first sample (sampled as "
              "above), then four of a real validation video of the same class."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _guidance_line(g: dict[str, Any] | None) -> str:
    if g is None:
        return "Sampling: without guidance (a card written before the bar reported guidance)."
    if not g.get("null_class"):
        return "Sampling: without guidance: the model has no null class (trained without label dropout)."
    if "unguided" not in g:
        return f"Sampling: guidance {g['scale']:g} (the conditional model alone)."
    u = g["unguided"]
    return (f"Sampling: classifier-free guidance {g['scale']:g} against the null class (pre-registered, Wan2.1's default "
            f"in diffusers). Unguided (guidance 1), for information: sample accuracy {u['sample_accuracy']:.4f}, "
            f"Frechet distance to real {u['frechet_samples_vs_real']:.4f}.")  # fmt: skip


def write_bar(bar: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = bar.get("_grid")
    bar = {k: v for k, v in bar.items() if k != "_grid"}
    (out / "bar.json").write_text(json.dumps(bar, indent=2, sort_keys=True, default=str) + "\n")
    (out / "BAR.md").write_text(render_markdown(bar))
    if grid is not None:
        _write_png(out / "samples.png", grid)


def require_base_bar(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The bar card of ``checkpoint_dir`` if it passed for exactly these weights; else
    :class:`BaseBarError` naming the fix. A study calls this before it uses a base model."""
    d = Path(checkpoint_dir)
    fix = (f"run python -m salad_bench.harness.quality.base_bar --checkpoint {d} --classifier checkpoints/video-classifier "
           "(and train the base further if it fails)")  # fmt: skip
    path = d / "bar.json"
    if not path.exists():
        raise BaseBarError(
            f"{path}: no bar card; this base model has not been checked against issue #25's bar; fix: {fix}"
        )
    try:
        bar = json.loads(path.read_text())
    except ValueError as exc:
        raise BaseBarError(f"{path}: not valid JSON ({exc}); fix: {fix}") from None
    if bar.get("format") != BAR_FORMAT:
        raise BaseBarError(f"{path}: not a bar card (format={bar.get('format')!r}); fix: {fix}")
    from salad_bench.harness.quality.model import read_card

    try:
        digests = read_card(d).get("shard_sha256")
    except (OSError, ValueError):
        digests = None
    if not digests or digests != bar.get("checkpoint_shard_sha256"):
        raise BaseBarError(f"{path}: the card judged other weights than {d}'s shards now (sha256 differ); fix: {fix}")
    if bar.get("verdict") != "pass":
        failed = ", ".join(
            f"{c['name']} {c['measured']} vs {c['threshold']}" for c in bar.get("criteria", []) if not c.get("pass")
        )
        raise BaseBarError(f"{path}: the base model fails the bar ({failed}); fix: train it further "
                           "(python -m salad_bench.harness.quality.train_base --until-plateau ...), then rerun the bar")  # fmt: skip
    g = bar.get("guidance") or {}
    if g.get("null_class") and g.get("scale") != BarSettings.guidance:
        raise BaseBarError(f"{path}: the card passed with guidance {g.get('scale')}, not the pre-registered "
                           f"{BarSettings.guidance:g} (a scale picked after seeing samples proves nothing); "
                           f"fix: rerun the bar without --guidance")  # fmt: skip
    return bar


# -- CLI ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    s, th = BarSettings(), Thresholds()
    p = Parser(
        prog="python -m salad_bench.harness.quality.base_bar", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="the base model's checkpoint directory")
    p.add_argument("--classifier", required=True, help="the video classifier's checkpoint directory")
    p.add_argument("--out", default=None, help="where bar.json and BAR.md go (default: the checkpoint directory)")
    p.add_argument("--per-class", type=int, default=s.per_class, help="sampled videos per class")
    p.add_argument("--sample-steps", type=int, default=s.sample_steps)
    p.add_argument("--guidance", type=float, default=s.guidance,
                   help="classifier-free guidance scale for a model with a null class (>= 1; 1: none)")
    p.add_argument("--real-per-class", type=int, default=s.real_per_class)
    p.add_argument("--mass-videos", type=int, default=s.mass_videos)
    p.add_argument("--mass-t", default=",".join(f"{t:g}" for t in s.mass_t), help="noise levels for the attention mass")
    p.add_argument("--batch", type=int, default=s.batch)
    p.add_argument("--plateau-window", type=int, default=th.plateau_window)
    p.add_argument("--plateau-rel-tol", type=float, default=th.plateau_rel_tol)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    )
    try:
        settings = BarSettings(per_class=a.per_class, sample_steps=a.sample_steps, real_per_class=a.real_per_class,
                               mass_videos=a.mass_videos, mass_t=tuple(float(x) for x in a.mass_t.split(",") if x),
                               batch=a.batch, guidance=a.guidance)  # fmt: skip
        thresholds = Thresholds(plateau_window=a.plateau_window, plateau_rel_tol=a.plateau_rel_tol)
        if min(a.per_class, a.real_per_class, a.mass_videos, a.sample_steps, a.batch) < 1 or not settings.mass_t:
            raise BaseBarError(
                "--per-class, --real-per-class, --mass-videos, --sample-steps, --batch must be >= 1 and --mass-t non-empty"
            )
        if not (math.isfinite(a.guidance) and a.guidance >= 1):
            raise BaseBarError(f"--guidance must be a number >= 1 (1: no guidance; the bar's default {BarSettings.guidance:g}); "
                               f"got {a.guidance:g}")  # fmt: skip
        check_writable_dir(a.out or a.checkpoint, "--out" if a.out else "--checkpoint (where the card goes)")
        bar = run_bar(a.checkpoint, a.classifier, settings=settings, thresholds=thresholds, device=device, echo=True)
    except (BaseBarError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    out = Path(a.out) if a.out else Path(a.checkpoint)
    write_bar(bar, out)
    for c in bar["criteria"]:
        val = "n/a" if c["measured"] is None else f"{c['measured']:.4f}"
        print(f"{'PASS' if c['pass'] else 'FAIL'} {c['name']}: {val} (threshold {c['threshold']})", flush=True)
    print(f"verdict: {bar['verdict'].upper()} -> {out / 'bar.json'}, {out / 'BAR.md'}", flush=True)
    return 0


if __name__ == "__main__":
    from salad_bench.harness.errors import guarded

    sys.exit(guarded(main))
