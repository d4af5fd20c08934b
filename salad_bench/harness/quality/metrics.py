"""Quality metrics of the study: validation flow-matching loss, fidelity to the full model's videos
(PSNR, SSIM) and VBench's ``temporal_flickering``.

* :func:`val_loss`: the flow-matching MSE on held-out videos at a fixed grid of ``t`` with fixed noise
  seeds, so it is comparable across methods and runs (VSA's scaling study uses a validation loss).
* :func:`fidelity`: PSNR and SSIM (torchmetrics) of a method's video against the full model's video
  from the same noise and class, frame by frame on [0, 1] images, averaged per video then over videos
  (the SVG / Radial / STA protocol). (LPIPS is not computed: its backbone
  weights cannot be had offline, and torchvision would pin torch.)
* :func:`temporal_flickering`: VBench's formula (``vbench/temporal_flickering.py``): per consecutive
  frame pair the mean absolute difference of the uint8 frames (``cv2.absdiff`` of float32 copies,
  all pixels and channels), averaged over pairs; score ``(255 - mean) / 255`` per video; the dimension
  score is the mean over videos. VBench reads the frames back from mp4 (lossy, BGR); this in-process
  version scores the uint8 frames before encoding (channel order does not change the mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from salad_bench.harness.quality.sampler import autocast, make_noise

__all__ = [
    "DEFAULT_T_GRID",
    "fidelity",
    "temporal_flickering",
    "temporal_flickering_videos",
    "to_uint8",
    "val_loss",
]

DEFAULT_T_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


def flow_matching_mse(
    model: Callable[..., torch.Tensor], x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Per-sample MSE of the velocity prediction at ``x_t = (1 - t) x0 + t noise`` (target ``noise - x0``)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    xt = (1 - tt) * x0 + tt * noise
    pred = model(xt, t, labels).float()
    return (pred - (noise - x0).float()).square().flatten(1).mean(dim=1)


@torch.no_grad()
def val_loss(
    model: Callable[..., torch.Tensor],
    videos: torch.Tensor,
    labels: torch.Tensor,
    *,
    t_grid: Sequence[float] = DEFAULT_T_GRID,
    noise_seed: int = 4321,
    batch_size: int = 8,
    on_t: Callable[[float], None] | None = None,
    bf16: bool = True,
    per_video: bool = False,
) -> float | list[float]:
    """Mean flow-matching MSE over ``videos`` x ``t_grid``; video ``j`` always gets the same noise.

    ``on_t(t)`` runs before each ``t`` (the study maps it to a sampling step for step-aware methods).
    With ``per_video`` the result is each video's mean over ``t_grid`` (their mean is the usual value),
    which paired confidence intervals between methods need.
    """
    from salad_bench.harness.quality.data import VideoSpec

    b, _, f, h, w = videos.shape
    spec = VideoSpec(frames=f, height=h, width=w, patch=(1, 1, 1))
    noise = make_noise(b, spec, noise_seed, videos.device)
    sums = torch.zeros(b, dtype=torch.float64)
    for t_val in t_grid:
        if on_t is not None:
            on_t(float(t_val))
        for s in range(0, b, batch_size):
            x0, lab, nz = videos[s : s + batch_size], labels[s : s + batch_size], noise[s : s + batch_size]
            t = torch.full((x0.shape[0],), float(t_val), device=x0.device)
            with autocast(x0.device, bf16):
                per = flow_matching_mse(model, x0, lab, t, nz)
            sums[s : s + x0.shape[0]] += per.double().cpu()
    each = sums / len(t_grid)
    return [float(x) for x in each] if per_video else float(each.mean())


def to_uint8(videos: torch.Tensor) -> np.ndarray:
    """``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, T, H, W, 3)`` uint8 (what an mp4 writer receives)."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's score of one video, ``frames`` ``(T, H, W, C)`` uint8: ``(255 - mean_i MAE(f_i, f_i+1)) / 255``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"need (T>=2, H, W, C) frames; got shape {frames.shape}")
    f32 = frames.astype(np.float32)
    maes = [float(np.mean(np.abs(f32[i] - f32[i + 1]))) for i in range(len(f32) - 1)]
    return (255.0 - float(np.mean(maes))) / 255.0


def temporal_flickering_videos(videos: torch.Tensor) -> float:
    """Mean VBench temporal-flickering score over a batch ``(B, 3, T, H, W)`` in [-1, 1]."""
    u8 = to_uint8(videos)
    return float(np.mean([temporal_flickering(v) for v in u8]))


def _frames01(videos: torch.Tensor) -> torch.Tensor:
    """``(B, 3, T, H, W)`` [-1, 1] -> ``(B, T, 3, H, W)`` [0, 1] float32."""
    return ((videos.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def fidelity(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """PSNR (dB) and SSIM of ``pred`` against ``ref`` (both ``(B, 3, T, H, W)`` in [-1, 1]), per video then mean:
    ``psnr``/``ssim`` are the means, ``psnr_per_video``/``ssim_per_video`` the lists (for paired intervals).

    A video identical to its reference has infinite PSNR; the mean is then ``inf`` too.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if pred.shape != ref.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and ref {tuple(ref.shape)} differ in shape")
    p, r = _frames01(pred), _frames01(ref)
    psnrs, ssims = [], []
    for pv, rv in zip(p, r, strict=True):
        mse = float((pv - rv).square().mean())
        psnrs.append(math.inf if mse == 0 else float(peak_signal_noise_ratio(pv, rv, data_range=1.0)))
        ssims.append(float(structural_similarity_index_measure(pv, rv, data_range=1.0)))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "psnr_per_video": psnrs, "ssim_per_video": ssims}
