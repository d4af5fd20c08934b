"""A procedural video dataset, generated in-process from a seed (no download, no files).

Every video shows 2-3 textured shapes of one kind moving over a textured background that the camera
pans across; shapes rotate and occlude each other (painter's order). The class label is the pair
(shape kind, motion type), 4 x 4 = 16 classes, and doubles as the video's prompt
(:data:`CLASS_NAMES`, e.g. ``"discs orbiting"``).

* shapes: ``disc``, ``square``, ``triangle``, ``cross``; each carries a stripe texture in its own
  rotating frame, so rotation is visible.
* motions: ``drift`` (straight lines, bouncing off the borders), ``orbit`` (circles around a centre),
  ``spin`` (fast rotation, slow drift), ``pan`` (shapes fixed in the world, fast camera pan).
* the background (stripes or checks) always pans with the camera; slowly except in ``pan``.

Layout: ``(B, C=3, T, H, W)`` float32 in ``[-1, 1]`` (the layout ``WanTransformer3DModel`` takes).
Default 16 frames of 32 x 32 pixels: 16 x 16 x 16 = 4,096 tokens after Wan's 1x2x2 patchify.

Determinism: a video is a pure function of ``(seed, label, spec)``. Its parameters are drawn on the CPU
from ``torch.Generator().manual_seed(seed)`` and the frames are rendered with vectorised torch ops on
any device, so the same seed gives the same video on the CPU and the GPU (up to float rounding).
Splits: ``train`` uses seeds ``0, 1, 2, ...``; ``val`` uses seeds from :data:`VAL_SEED_OFFSET` on,
so the two never share a video. Labels cycle through the classes (``label = index % num_classes``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "CLASS_NAMES",
    "MOTIONS",
    "NUM_CLASSES",
    "SHAPES",
    "VAL_SEED_OFFSET",
    "ProceduralVideos",
    "ShardedSampler",
    "VideoSpec",
    "render_videos",
]

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "cross")
MOTIONS: tuple[str, ...] = ("drift", "orbit", "spin", "pan")
_MOTION_WORD = {"drift": "drifting", "orbit": "orbiting", "spin": "spinning", "pan": "under a panning camera"}
_PLURAL = {"disc": "discs", "square": "squares", "triangle": "triangles", "cross": "crosses"}
CLASS_NAMES: tuple[str, ...] = tuple(f"{_PLURAL[s]} {_MOTION_WORD[m]}" for s in SHAPES for m in MOTIONS)
NUM_CLASSES = len(CLASS_NAMES)
VAL_SEED_OFFSET = 1_000_000_000

Split = Literal["train", "val"]


@dataclass(frozen=True)
class VideoSpec:
    """Frame count and size in pixels; ``patch`` is the DiT's patch size (for the token count)."""

    frames: int = 16
    height: int = 32
    width: int = 32
    min_objects: int = 2
    max_objects: int = 3
    patch: tuple[int, int, int] = (1, 2, 2)

    def __post_init__(self) -> None:
        pt, ph, pw = self.patch
        if self.frames % pt or self.height % ph or self.width % pw:
            raise ValueError(f"video {self.frames}x{self.height}x{self.width} is not divisible by patch {self.patch}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects; got {self.min_objects}, {self.max_objects}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Latent token grid ``(T, H, W)`` after patchify."""
        pt, ph, pw = self.patch
        return self.frames // pt, self.height // ph, self.width // pw

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return 3, self.frames, self.height, self.width


def class_parts(label: int) -> tuple[str, str]:
    """``(shape, motion)`` of a class id."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}); got {label}")
    return SHAPES[label // len(MOTIONS)], MOTIONS[label % len(MOTIONS)]


# -- parameters (CPU, per-video generator) -------------------------------------------------------
def _u(g: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)


def _video_params(seed: int, label: int, spec: VideoSpec) -> dict[str, torch.Tensor]:
    """All random numbers of one video, drawn in a fixed order from its own generator."""
    g = torch.Generator().manual_seed(int(seed))
    shape, motion = class_parts(label)
    k_max, size = spec.max_objects, float(min(spec.height, spec.width))
    n_obj = int(torch.randint(spec.min_objects, k_max + 1, (1,), generator=g))
    # camera: background pans every video; fast in the "pan" class
    cam_speed = _u(g, 0.8, 1.4, 1) if motion == "pan" else _u(g, 0.15, 0.5, 1)
    cam_dir = _u(g, 0, 2 * math.pi, 1)
    p = {
        "cam_v": torch.cat([cam_speed * torch.cos(cam_dir), cam_speed * torch.sin(cam_dir)]),
        "bg_c1": _u(g, -1, 1, 3),
        "bg_c2": _u(g, -1, 1, 3),
        "bg_freq": _u(g, 0.25, 0.7, 1),
        "bg_angle": _u(g, 0, math.pi, 1),
        "bg_check": (torch.rand(1, generator=g, dtype=torch.float64) < 0.5).double(),
        "shape": torch.tensor([float(SHAPES.index(shape))], dtype=torch.float64),
        "present": (torch.arange(k_max) < n_obj).double(),
        "radius": _u(g, 0.15, 0.26, k_max) * size,
        "c1": _u(g, -1, 1, k_max, 3),
        "c2": _u(g, -1, 1, k_max, 3),
        "tex_freq": _u(g, 0.8, 1.6, k_max),
        "angle0": _u(g, 0, 2 * math.pi, k_max),
        "pos0": _u(g, 0.25, 0.75, k_max, 2) * size,
    }
    direction = _u(g, 0, 2 * math.pi, k_max)
    spin_sign = torch.where(torch.rand(k_max, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    speed = {"drift": (0.8, 1.6), "orbit": (0.0, 0.0), "spin": (0.1, 0.3), "pan": (0.0, 0.0)}[motion]
    lin = _u(g, *speed, k_max)
    p["vel"] = torch.stack([lin * torch.cos(direction), lin * torch.sin(direction)], dim=-1)
    omega = {"drift": (0.02, 0.08), "orbit": (0.05, 0.1), "spin": (0.3, 0.5), "pan": (0.0, 0.0)}[motion]
    p["omega"] = spin_sign * _u(g, *omega, k_max)
    orbit = motion == "orbit"
    p["orbit_r"] = _u(g, 0.12, 0.25, k_max) * size * float(orbit)
    p["orbit_w"] = spin_sign * _u(g, 0.25, 0.45, k_max) * float(orbit)
    p["orbit_phase"] = _u(g, 0, 2 * math.pi, k_max)
    p["world_locked"] = torch.tensor([float(motion == "pan")], dtype=torch.float64)
    return p


# -- rendering (vectorised, any device) -----------------------------------------------------------
def _bounce(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect ``x`` into ``[lo, hi]`` (a triangle wave): straight-line motion bouncing off walls."""
    span = hi - lo
    u = torch.remainder(x - lo, 2 * span)
    return lo + span - (u - span).abs()


def _sdf(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii) to each shape kind in its local frame; picked per video by ``shape``."""
    disc = torch.sqrt(u * u + v * v) - 1.0
    square = torch.maximum(u.abs(), v.abs()) - 0.8
    tri = torch.maximum(u.abs() * 0.866 + v * 0.5, -v) - 0.5
    cross = torch.minimum(torch.maximum(u.abs() - 1.0, v.abs() - 0.33), torch.maximum(u.abs() - 0.33, v.abs() - 1.0))
    s = shape.view(-1, *([1] * (u.dim() - 1)))
    return torch.where(s == 0, disc, torch.where(s == 1, square, torch.where(s == 2, tri, cross)))


def render_videos(
    seeds: Sequence[int], labels: Sequence[int], spec: VideoSpec = VideoSpec(), device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Render one video per ``(seed, label)``: ``(B, 3, T, H, W)`` float32 in ``[-1, 1]``."""
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds but {len(labels)} labels")
    params = [_video_params(s, int(lab), spec) for s, lab in zip(seeds, labels, strict=True)]
    p = {k: torch.stack([q[k] for q in params]).to(device=device, dtype=torch.float32) for k in params[0]}
    t_, h_, w_ = spec.frames, spec.height, spec.width
    t = torch.arange(t_, device=device, dtype=torch.float32)
    ys = torch.arange(h_, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w_, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)

    # background: stripes or checks in world coordinates, shifted by the camera
    cam = p["cam_v"][:, None, :] * t[None, :, None]  # (B, T, 2)
    wx = xx[None, None] + cam[..., 0, None, None]
    wy = yy[None, None] + cam[..., 1, None, None]
    ang, fr = p["bg_angle"][:, :, None, None], p["bg_freq"][:, :, None, None]
    a = torch.sin(fr * (wx * torch.cos(ang) + wy * torch.sin(ang)))
    b = torch.sin(fr * (-wx * torch.sin(ang) + wy * torch.cos(ang)))
    check = p["bg_check"][:, :, None, None]
    mix = 0.5 + 0.5 * torch.where(check > 0.5, torch.sign(a * b) * 0.8, a)  # (B, T, H, W)
    img = p["bg_c1"][:, :, None, None, None] * mix[:, None] + p["bg_c2"][:, :, None, None, None] * (1 - mix[:, None])

    # object trajectories (B, K, T, 2) and angles (B, K, T)
    margin = p["radius"][..., None]  # keep centres inside the frame
    lin = p["pos0"][:, :, None, :] + p["vel"][:, :, None, :] * t[None, None, :, None]
    px = _bounce(lin[..., 0] - margin, 0.0, w_ - 2 * margin) + margin
    py = _bounce(lin[..., 1] - margin, 0.0, h_ - 2 * margin) + margin
    phase = p["orbit_phase"][..., None] + p["orbit_w"][..., None] * t
    px = px + p["orbit_r"][..., None] * torch.cos(phase)
    py = py + p["orbit_r"][..., None] * torch.sin(phase)
    locked = p["world_locked"][:, :, None]  # pan class: objects move against the camera
    px = px - locked * (cam[:, None, :, 0] - cam[:, None, t_ // 2, 0, None])
    py = py - locked * (cam[:, None, :, 1] - cam[:, None, t_ // 2, 1, None])
    theta = p["angle0"][..., None] + p["omega"][..., None] * t

    for k in range(spec.max_objects):  # painter's order: later objects occlude earlier ones
        r = p["radius"][:, k, None, None, None]
        dx = xx[None, None] - px[:, k, :, None, None]
        dy = yy[None, None] - py[:, k, :, None, None]
        c, s = torch.cos(theta[:, k, :, None, None]), torch.sin(theta[:, k, :, None, None])
        u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
        dist = _sdf(p["shape"][:, 0], u, v)
        alpha = (0.5 - dist * r).clamp(0, 1) * p["present"][:, k, None, None, None]  # 1-pixel antialiasing
        stripe = 0.5 + 0.5 * torch.sin(p["tex_freq"][:, k, None, None, None] * u * r)
        color = p["c1"][:, k, :, None, None, None] * stripe[:, None] + p["c2"][:, k, :, None, None, None] * (
            1 - stripe[:, None]
        )
        img = img * (1 - alpha[:, None]) + color * alpha[:, None]
    return img.clamp(-1, 1).contiguous()


# -- splits and sharding --------------------------------------------------------------------------
class ProceduralVideos:
    """A split of the procedural dataset: ``size`` videos (``None`` = an endless stream).

    ``seed(i)`` and ``label(i)`` define video ``i``; :meth:`batch` renders a list of indices.
    """

    def __init__(
        self,
        split: Split = "train",
        size: int | None = None,
        spec: VideoSpec = VideoSpec(),
        num_classes: int = NUM_CLASSES,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        if not 1 <= num_classes <= NUM_CLASSES:
            raise ValueError(f"num_classes must be in [1, {NUM_CLASSES}]; got {num_classes}")
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1 or None; got {size}")
        self.split, self.size, self.spec, self.num_classes = split, size, spec, num_classes

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError("an endless stream has no length")
        return self.size

    def seed(self, i: int) -> int:
        return (VAL_SEED_OFFSET if self.split == "val" else 0) + int(i)

    def label(self, i: int) -> int:
        return int(i) % self.num_classes

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(videos (B, 3, T, H, W), labels (B,) long)`` for these indices."""
        if self.size is not None and any(not 0 <= i < self.size for i in indices):
            raise IndexError(f"index out of range for a {self.split} split of {self.size} videos")
        labels = [self.label(i) for i in indices]
        videos = render_videos([self.seed(i) for i in indices], labels, self.spec, device)
        return videos, torch.tensor(labels, dtype=torch.long, device=device)


class ShardedSampler:
    """DistributedSampler-style batches: each epoch a seeded permutation; rank ``r`` of ``world`` takes
    every ``world``-th index, ``batch_size`` (per rank) at a time. An endless stream walks fresh
    indices ``step * world * batch + ...`` instead (no repeats)."""

    def __init__(self, size: int | None, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        if size is not None and size < batch_size * world:
            raise ValueError(f"a split of {size} videos cannot fill a global batch of {batch_size * world}")
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed

    def batch_indices(self, step: int) -> list[int]:
        """Indices of this rank's batch at global ``step`` (stateless, so resuming is exact)."""
        per_step = self.batch_size * self.world
        if self.size is None:
            start = step * per_step + self.rank * self.batch_size
            return list(range(start, start + self.batch_size))
        steps_per_epoch = self.size // per_step
        epoch, within = divmod(step, steps_per_epoch)
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        block = perm[within * per_step : (within + 1) * per_step]
        return block[self.rank :: self.world].tolist()

    def positions(self) -> list[int]:
        """Where this rank's samples sit in the global batch (the batch one process would draw at the same
        step), so per-sample randomness drawn for the global batch is shared out the same way."""
        if self.size is None:
            return list(range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size))
        return list(range(self.rank, self.batch_size * self.world, self.world))

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        while True:
            yield self.batch_indices(step)
            step += 1
