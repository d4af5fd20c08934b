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
  :func:`temporal_flickering_mp4` scores the mp4 files the VBench adapter writes
  (:func:`harness.quality.vbench.write_custom_input`), decoded as VBench decodes them, so it agrees with
  VBench's own run on the same files.

For the study of issue #25:

* :func:`velocity_metrics`: per video and per ``t`` of a grid, the flow-matching MSE and the MSE of the
  velocity against a teacher's (the full-attention base model) at the same ``(x_t, t)``; the grid has
  points in every timestep band (:func:`band_grid`) and :func:`band_means` gives each band's mean, which
  partition the overall mean.
* :func:`distill_mse`: the distillation objective, the student's velocity against the frozen teacher's.
* :func:`sample_quality`: classifier accuracy and Frechet distance of samples against real videos,
  through the base-model bar's classifier (``harness/quality/classifier.py``); without it a clearly
  named ``skipped`` with the reason, never a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salad_bench.harness.quality.sampler import autocast, make_noise

__all__ = [
    "DEFAULT_T_GRID",
    "T_BANDS",
    "band_grid",
    "band_means",
    "distill_mse",
    "fidelity",
    "read_mp4_frames",
    "sample_quality",
    "temporal_flickering",
    "temporal_flickering_mp4",
    "temporal_flickering_videos",
    "to_uint8",
    "val_loss",
    "velocity_metrics",
]

DEFAULT_T_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
# timestep bands of the study's per-band losses: [0, .25), [.25, .5), [.5, .75), [.75, 1]
T_BANDS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def flow_matching_mse(
    model: Callable[..., torch.Tensor], x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Per-sample MSE of the velocity prediction at ``x_t = (1 - t) x0 + t noise`` (target ``noise - x0``)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    xt = (1 - tt) * x0 + tt * noise
    pred = model(xt, t, labels).float()
    return (pred - (noise - x0).float()).square().flatten(1).mean(dim=1)


def distill_mse(
    model: Callable[..., torch.Tensor],
    teacher: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    labels: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-sample MSE of the student's velocity against the frozen teacher's at the same ``x_t`` and ``t``
    (no gradient reaches the teacher): zero when the student computes what the teacher computes."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    xt = (1 - tt) * x0 + tt * noise
    with torch.no_grad():
        target = teacher(xt, t, labels).float()
    pred = model(xt, t, labels).float()
    return (pred - target).square().flatten(1).mean(dim=1)


def band_grid(edges: Sequence[float] = T_BANDS, per_band: int = 2) -> tuple[float, ...]:
    """``per_band`` evenly spaced times inside each band (midpoints of equal sub-intervals), so every band
    weighs the same in the overall mean."""
    if per_band < 1 or len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"need increasing band edges and per_band >= 1; got {list(edges)}, {per_band}")
    return tuple(
        round(a + (i + 0.5) * (b - a) / per_band, 10) for a, b in zip(edges, edges[1:], strict=False) for i in range(per_band)
    )


def band_means(values: np.ndarray, t_grid: Sequence[float], edges: Sequence[float] = T_BANDS) -> np.ndarray:
    """``values`` (videos, len(t_grid)) -> (videos, bands): each band's mean over its grid points (band
    ``[a, b)``, the last one closed). A band without grid points is NaN."""
    t = np.asarray(t_grid, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    out = np.full((values.shape[0], len(edges) - 1), np.nan)
    for j, (a, b) in enumerate(zip(edges, edges[1:], strict=False)):
        inside = (t >= a) & ((t < b) if j < len(edges) - 2 else (t <= b))
        if inside.any():
            out[:, j] = values[:, inside].mean(axis=1)
    return out


@torch.no_grad()
def velocity_metrics(
    model: Callable[..., torch.Tensor],
    videos: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher: Callable[..., torch.Tensor] | None = None,
    t_grid: Sequence[float] = DEFAULT_T_GRID,
    noise_seed: int = 4321,
    batch_size: int = 8,
    on_t: Callable[[float], None] | None = None,
    bf16: bool = True,
) -> dict[str, np.ndarray]:
    """Per video and ``t``: ``loss`` (flow-matching MSE, the numbers :func:`val_loss` averages, same noise)
    and, with a ``teacher``, ``teacher_mse`` (the velocity's MSE against the teacher's at the same
    ``(x_t, t)``). Each is ``(videos, len(t_grid))`` float64."""
    from salad_bench.harness.quality.data import VideoSpec

    b, _, f, h, w = videos.shape
    noise = make_noise(b, VideoSpec(frames=f, height=h, width=w, patch=(1, 1, 1)), noise_seed, videos.device)
    loss = np.zeros((b, len(t_grid)))
    tmse = np.zeros((b, len(t_grid)))
    for j, t_val in enumerate(t_grid):
        if on_t is not None:
            on_t(float(t_val))
        for s in range(0, b, batch_size):
            x0, lab, nz = videos[s : s + batch_size], labels[s : s + batch_size], noise[s : s + batch_size]
            t = torch.full((x0.shape[0],), float(t_val), device=x0.device)
            tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
            xt = (1 - tt) * x0 + tt * nz  # as flow_matching_mse forms it: the same numbers as val_loss
            with autocast(x0.device, bf16):
                pred = model(xt, t, lab).float()
                ref = teacher(xt, t, lab).float() if teacher is not None else None
            loss[s : s + x0.shape[0], j] = (pred - (nz - x0).float()).square().flatten(1).mean(1).double().cpu().numpy()
            if ref is not None:
                tmse[s : s + x0.shape[0], j] = (pred - ref).square().flatten(1).mean(1).double().cpu().numpy()
    out = {"loss": loss}
    if teacher is not None:
        out["teacher_mse"] = tmse
    return out


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


# -- temporal flickering on the mp4 files VBench reads ------------------------------------------------
def read_mp4_frames(path: str | Path) -> tuple[np.ndarray, str]:
    """The frames of an mp4 as VBench reads them: ``cv2.VideoCapture`` (BGR uint8) when OpenCV is
    installed, else imageio's ffmpeg reader (RGB uint8; the same decoder and colour conversion, channels in
    the other order, which the flicker score does not see). Returns ``(T, H, W, 3)`` and the reader's name."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cap = cv2.VideoCapture(str(path))
        frames = []
        while cap.isOpened():
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
        cap.release()
        if frames:
            return np.stack(frames), "cv2"
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="ffmpeg")
    try:
        frames = [np.asarray(f) for f in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path}: no frames could be decoded")
    return np.stack(frames), "imageio-ffmpeg"


def temporal_flickering_mp4(paths: Sequence[str | Path]) -> dict[str, Any]:
    """VBench's temporal-flickering score of each mp4 (decoded by :func:`read_mp4_frames`): ``score`` the
    mean over videos, ``per_video`` the scores in the order given, ``reader`` the decoder used."""
    scores, readers = [], set()
    for p in paths:
        frames, reader = read_mp4_frames(p)
        readers.add(reader)
        scores.append(temporal_flickering(frames))
    if not scores:
        raise ValueError("no videos to score")
    return {"score": float(np.mean(scores)), "per_video": scores, "reader": ",".join(sorted(readers))}


# -- sample quality against real videos --------------------------------------------------------------
CLASSIFIER_MODULE = "salad_bench.harness.quality.classifier"


def sample_quality(
    videos: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, *, classifier_dir: str | Path | None = None
) -> dict[str, Any]:
    """Classifier accuracy of ``videos`` on their ``labels`` and the Frechet distance of their classifier
    features to those of ``real`` videos, through the base-model bar's video classifier
    (:mod:`harness.quality.classifier`: ``load_classifier(dir) -> (model, card)``, ``model.predict``,
    ``model.features``, ``frechet_distance``) loaded from ``classifier_dir``.

    Without the module, without a classifier directory, or when the classifier cannot judge these videos
    (another video spec), the result is ``{"sample_quality": "skipped", "sample_quality_reason": why}``: a
    reason, never a number. On success: ``classifier_accuracy``, ``classifier_correct_per_video`` (0/1 per
    video, for intervals), ``frechet_distance`` (a set statistic: its intervals resample seeds only),
    ``classifier`` (the directory) and ``sample_quality`` "ok".
    """
    import importlib

    def skipped(why: str) -> dict[str, Any]:
        return {"sample_quality": "skipped", "sample_quality_reason": why[:300]}

    try:
        mod = importlib.import_module(CLASSIFIER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != CLASSIFIER_MODULE:
            return skipped(f"{CLASSIFIER_MODULE} failed to import: {exc}")
        return skipped("no classifier module (harness/quality/classifier.py, the base-model bar's classifier)")
    except Exception as exc:  # noqa: BLE001 - another part's module: report, do not crash the study
        return skipped(f"{CLASSIFIER_MODULE} failed to import: {type(exc).__name__}: {exc}")
    missing = [n for n in ("load_classifier", "frechet_distance") if not hasattr(mod, n)]
    if missing:
        return skipped(f"{CLASSIFIER_MODULE} has no {', '.join(missing)} (the interface this hook calls)")
    if classifier_dir is None:
        return skipped("no classifier checkpoint (evaluate --classifier, the study's [study] classifier, or the "
                       "base's bar.json)")  # fmt: skip
    try:
        clf, _ = mod.load_classifier(classifier_dir, videos.device)
        correct = (clf.predict(videos) == labels.cpu()).to(torch.int64).tolist()
        fd = float(mod.frechet_distance(clf.features(videos), clf.features(real)))
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint or another video spec: a reason, no number
        return skipped(f"classifier {classifier_dir} failed: {type(exc).__name__}: {exc}")
    return {"sample_quality": "ok", "classifier_accuracy": float(np.mean(correct)),
            "classifier_correct_per_video": correct, "frechet_distance": fd, "classifier": str(classifier_dir)}  # fmt: skip
