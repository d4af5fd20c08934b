"""A procedural video dataset, generated in-process from a seed (no download, no files).

Two versions, picked by :attr:`VideoSpec.version`; both have the same 16 classes. The class label is
the pair (shape kind, motion type), 4 x 4 = 16 classes, and doubles as the video's prompt
(:data:`CLASS_NAMES`, e.g. ``"discs orbiting"``).

* shapes: ``disc``, ``square``, ``triangle``, ``cross``; each object carries a texture in its own
  rotating frame, so rotation is visible.
* motions: ``drift`` (straight lines, bouncing off the borders), ``orbit`` (circles around a centre),
  ``spin`` (fast rotation, slow drift), ``pan`` (shapes fixed in the world, fast camera pan).

**Version 1** (the default :class:`VideoSpec`, kept byte-identical for the committed runs and the
audited base model): 2-3 textured shapes over a two-colour striped or checked background that the
camera pans across; shapes occlude each other (painter's order). 16 frames of 32 x 32 pixels: 16 x 16 x
16 = 4,096 tokens after Wan's 1x2x2 patchify. Its background colours are two numbers per video shared
by every background pixel, so a denoiser does well by averaging the whole video (issue #25's audit:
the base trained on it has near-uniform attention).

**Version 2** (:data:`SPEC_V2`, issue #25): 16 frames of 48 x 48 pixels, 16 x 24 x 24 = 9,216 tokens (144
key blocks of 64 tokens, so a 90% block-sparse layout keeps about 15 per query block). The class must
be read from local detail (shape edges, a fine texture rotating with each object) over time (the
motion), and the scene has long-range structure:

* objects keep their identity: each has its own two colours, texture kind (stripes or checks) and
  period for the whole clip;
* a textured foreground panel sweeps across the frame in the middle of most clips and hides objects
  and background for several frames: what reappears behind it is what was there before;
* the camera pans the background (world-locked, revealed consistently as it moves).

How the global-averaging shortcut is avoided: no value is shared by all tokens of a video except the
class, which reaches the model through its prompt (cross-attention), not through self-attention. The
background colour varies over the world (a base colour plus two colour waves of wavelength about one
frame) and carries a fine texture, so a background token is predicted by its neighbours and by the
same world point in other frames (shifted by the camera), not by the video's mean. Each object has
its own colours and texture, so an object token is predicted by the same object in other frames
(across occlusions), not by the other objects. Sizes and speeds scale with the frame size and clip
length, so small specs (tests) show the same scenes.

Layout: ``(B, C=3, T, H, W)`` float32 in ``[-1, 1]`` (the layout ``WanTransformer3DModel`` takes).

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
from typing import Literal, NamedTuple

import torch

__all__ = [
    "CLASS_NAMES",
    "MOTIONS",
    "NUM_CLASSES",
    "SHAPES",
    "SPEC_V2",
    "SPECS",
    "VAL_SEED_OFFSET",
    "ProceduralVideos",
    "Scene",
    "ShardedSampler",
    "VideoSpec",
    "render_scene",
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
    """Frame count and size in pixels; ``patch`` is the DiT's patch size (for the token count);
    ``version`` the renderer (1: the audited dataset, 2: issue #25's; see the module docstring)."""

    frames: int = 16
    height: int = 32
    width: int = 32
    min_objects: int = 2
    max_objects: int = 3
    patch: tuple[int, int, int] = (1, 2, 2)
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", tuple(self.patch))
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2; got {self.version!r}")
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


SPEC_V2 = VideoSpec(frames=16, height=48, width=48, version=2)
SPECS: dict[str, VideoSpec] = {"v1": VideoSpec(), "v2": SPEC_V2}


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
def _trajectories(p: dict, t: torch.Tensor, cam: torch.Tensor, h_: float, w_: float, t_: int):
    """Object centres ``px, py`` and angles ``theta``, each ``(B, K, T)``: straight lines bouncing inside
    the frame plus an orbit; objects of the pan class are fixed in the world, so they move against the
    camera (relative to its position at the middle frame)."""
    margin = p["radius"][..., None]  # keep centres inside the frame
    lin = p["pos0"][:, :, None, :] + p["vel"][:, :, None, :] * t[None, None, :, None]
    px = _bounce(lin[..., 0] - margin, 0.0, w_ - 2 * margin) + margin
    py = _bounce(lin[..., 1] - margin, 0.0, h_ - 2 * margin) + margin
    phase = p["orbit_phase"][..., None] + p["orbit_w"][..., None] * t
    px = px + p["orbit_r"][..., None] * torch.cos(phase)
    py = py + p["orbit_r"][..., None] * torch.sin(phase)
    locked = p["world_locked"][:, :, None]
    px = px - locked * (cam[:, None, :, 0] - cam[:, None, t_ // 2, 0, None])
    py = py - locked * (cam[:, None, :, 1] - cam[:, None, t_ // 2, 1, None])
    return px, py, p["angle0"][..., None] + p["omega"][..., None] * t


def _bounce(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect ``x`` into ``[lo, hi]`` (a triangle wave): straight-line motion bouncing off walls."""
    span = hi - lo
    u = torch.remainder(x - lo, 2 * span)
    return lo + span - (u - span).abs()


def _world(p: dict, t: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor):
    """The camera offset ``(B, T, 2)`` and each pixel's world coordinates ``(B, T, H, W)``."""
    cam = p["cam_v"][:, None, :] * t[None, :, None]
    return cam, xx[None, None] + cam[..., 0, None, None], yy[None, None] + cam[..., 1, None, None]


def _rotated_sines(k: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ang: torch.Tensor):
    """``sin`` of ``k`` times the coordinates rotated by ``ang``: along the direction and across it."""
    return (torch.sin(k * (x * torch.cos(ang) + y * torch.sin(ang))),
            torch.sin(k * (-x * torch.sin(ang) + y * torch.cos(ang))))


def _object_frame(p: dict, k: int, px, py, theta, xx: torch.Tensor, yy: torch.Tensor):
    """Object ``k``'s radius and each pixel's coordinates in its frame, in radii: ``(r, u, v)``."""
    r = p["radius"][:, k, None, None, None]
    dx = xx[None, None] - px[:, k, :, None, None]
    dy = yy[None, None] - py[:, k, :, None, None]
    c, s = torch.cos(theta[:, k, :, None, None]), torch.sin(theta[:, k, :, None, None])
    return r, (c * dx + s * dy) / r, (-s * dx + c * dy) / r


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
    if spec.version == 2:
        return render_scene(seeds, labels, spec, device).video
    return _render_v1(seeds, labels, spec, device)


def _render_v1(
    seeds: Sequence[int], labels: Sequence[int], spec: VideoSpec, device: torch.device | str
) -> torch.Tensor:
    params = [_video_params(s, int(lab), spec) for s, lab in zip(seeds, labels, strict=True)]
    p = {k: torch.stack([q[k] for q in params]).to(device=device, dtype=torch.float32) for k in params[0]}
    t_, h_, w_ = spec.frames, spec.height, spec.width
    t = torch.arange(t_, device=device, dtype=torch.float32)
    ys = torch.arange(h_, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w_, device=device, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)

    # background: stripes or checks in world coordinates, shifted by the camera
    cam, wx, wy = _world(p, t, xx, yy)
    a, b = _rotated_sines(p["bg_freq"][:, :, None, None], wx, wy, p["bg_angle"][:, :, None, None])
    check = p["bg_check"][:, :, None, None]
    mix = 0.5 + 0.5 * torch.where(check > 0.5, torch.sign(a * b) * 0.8, a)  # (B, T, H, W)
    img = p["bg_c1"][:, :, None, None, None] * mix[:, None] + p["bg_c2"][:, :, None, None, None] * (1 - mix[:, None])

    px, py, theta = _trajectories(p, t, cam, h_, w_, t_)

    for k in range(spec.max_objects):  # painter's order: later objects occlude earlier ones
        r, u, v = _object_frame(p, k, px, py, theta, xx, yy)
        dist = _sdf(p["shape"][:, 0], u, v)
        alpha = (0.5 - dist * r).clamp(0, 1) * p["present"][:, k, None, None, None]  # 1-pixel antialiasing
        stripe = 0.5 + 0.5 * torch.sin(p["tex_freq"][:, k, None, None, None] * u * r)
        color = p["c1"][:, k, :, None, None, None] * stripe[:, None] + p["c2"][:, k, :, None, None, None] * (
            1 - stripe[:, None]
        )
        img = img * (1 - alpha[:, None]) + color * alpha[:, None]
    return img.clamp(-1, 1).contiguous()


# -- version 2: persistent objects, a sweeping foreground panel, a world-varying background -----------
class Scene(NamedTuple):
    """A rendered batch with what tests need to check its structure.

    ``video``: ``(B, 3, T, H, W)`` in ``[-1, 1]``; ``visible``: ``(B, K, T, H, W)`` in ``[0, 1]``, how
    much of each pixel shows object ``k`` after the objects in front of it and the panel (0 for absent
    objects); ``panel``: ``(B, T, H, W)`` the panel's coverage; ``present``: ``(B, K)`` bool.
    """

    video: torch.Tensor
    visible: torch.Tensor
    panel: torch.Tensor
    present: torch.Tensor


def _v2_params(seed: int, label: int, spec: VideoSpec) -> dict[str, torch.Tensor]:
    """All random numbers of one version-2 video, drawn in a fixed order from its own generator.

    Lengths are fractions of the frame size ``S`` and speeds fractions of ``S`` per clip, so any spec
    shows the same kind of scene."""
    g = torch.Generator().manual_seed(int(seed))
    shape, motion = class_parts(label)
    k_max, big = spec.max_objects, float(min(spec.height, spec.width))
    per_frame = big / spec.frames  # a speed of 1.0 crosses the frame once per clip
    rad_per_frame = 16.0 / spec.frames  # angular speeds as version 1's at 16 frames
    n_obj = int(torch.randint(spec.min_objects, k_max + 1, (1,), generator=g))
    cam_speed = (_u(g, 0.6, 1.0, 1) if motion == "pan" else _u(g, 0.1, 0.3, 1)) * per_frame
    cam_dir = _u(g, 0, 2 * math.pi, 1)
    p = {
        "cam_v": torch.cat([cam_speed * torch.cos(cam_dir), cam_speed * torch.sin(cam_dir)]),
        "bg_base": _u(g, -0.5, 0.5, 3),
        "bg_wave_amp": _u(g, -0.5, 0.5, 2, 3),
        "bg_wave_k": 2 * math.pi / (_u(g, 0.8, 1.6, 2) * big),
        "bg_wave_dir": _u(g, 0, 2 * math.pi, 2),
        "bg_wave_phase": _u(g, 0, 2 * math.pi, 2),
        "bg_tex_k": 2 * math.pi / (_u(g, 0.12, 0.22, 1) * big),
        "bg_tex_angle": _u(g, 0, math.pi, 1),
        "bg_tex_amp": _u(g, 0.15, 0.3, 1),
        "bg_check": (torch.rand(1, generator=g, dtype=torch.float64) < 0.5).double(),
        "shape": torch.tensor([float(SHAPES.index(shape))], dtype=torch.float64),
        "present": (torch.arange(k_max) < n_obj).double(),
        "radius": _u(g, 0.1, 0.16, k_max) * big,
        "c1": _u(g, -1, 1, k_max, 3),
        "tex_check": (torch.rand(k_max, generator=g, dtype=torch.float64) < 0.5).double(),
        "tex_k": 2 * math.pi / _u(g, 0.5, 0.8, k_max),  # per radius: 0.5-0.8 radii per period
        "angle0": _u(g, 0, 2 * math.pi, k_max),
        "pos0": _u(g, 0.2, 0.8, k_max, 2) * torch.tensor([spec.width, spec.height], dtype=torch.float64),
    }
    # the texture's second colour differs from the first by 0.4-0.9 in every channel (visible texture)
    step = _u(g, 0.4, 0.9, k_max, 3) * torch.where(
        torch.rand(k_max, 3, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0
    )
    p["c2"] = torch.where((p["c1"] + step).abs() <= 1, p["c1"] + step, p["c1"] - step)
    direction = _u(g, 0, 2 * math.pi, k_max)
    spin_sign = torch.where(torch.rand(k_max, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    speed = {"drift": (0.5, 1.0), "orbit": (0.0, 0.0), "spin": (0.05, 0.15), "pan": (0.0, 0.0)}[motion]
    lin = _u(g, *speed, k_max) * per_frame
    p["vel"] = torch.stack([lin * torch.cos(direction), lin * torch.sin(direction)], dim=-1)
    omega = {"drift": (0.02, 0.08), "orbit": (0.05, 0.1), "spin": (0.3, 0.5), "pan": (0.0, 0.0)}[motion]
    p["omega"] = spin_sign * _u(g, *omega, k_max) * rad_per_frame
    orbit = float(motion == "orbit")
    p["orbit_r"] = _u(g, 0.12, 0.2, k_max) * big * orbit
    p["orbit_w"] = spin_sign * _u(g, 0.25, 0.45, k_max) * rad_per_frame * orbit
    p["orbit_phase"] = _u(g, 0, 2 * math.pi, k_max)
    p["world_locked"] = torch.tensor([float(motion == "pan")], dtype=torch.float64)
    # the foreground panel: a band across the frame, off-screen at the first and last frames
    p["panel_on"] = (torch.rand(1, generator=g, dtype=torch.float64) < 0.8).double()
    p["panel_axis"] = (torch.rand(1, generator=g, dtype=torch.float64) < 0.5).double()  # 0: moves along x
    p["panel_dir"] = torch.where(torch.rand(1, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    p["panel_w"] = _u(g, 0.3, 0.45, 1) * big
    t_in = _u(g, 0.1, 0.25, 1) * (spec.frames - 1)
    p["panel_t"] = torch.cat([t_in, t_in + _u(g, 0.5, 0.65, 1) * (spec.frames - 1)])
    p["panel_c"] = _u(g, -1, 1, 3)
    p["panel_tex_k"] = 2 * math.pi / (_u(g, 0.1, 0.16, 1) * big)
    return p


def _texture(check: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stripes ``a`` or checks ``sign(a * b)`` (``check`` > 0.5), in [-1, 1]."""
    return torch.where(check > 0.5, torch.sign(a * b) * 0.8, a)


def render_scene(
    seeds: Sequence[int], labels: Sequence[int], spec: VideoSpec = SPEC_V2, device: torch.device | str = "cpu"
) -> Scene:
    """Render version-2 videos with their visibility maps (see :class:`Scene`)."""
    if spec.version != 2:
        raise ValueError(f"render_scene draws version-2 videos; this spec is version {spec.version}")
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds but {len(labels)} labels")
    params = [_v2_params(s, int(lab), spec) for s, lab in zip(seeds, labels, strict=True)]
    p = {k: torch.stack([q[k] for q in params]).to(device=device, dtype=torch.float32) for k in params[0]}
    t_, h_, w_ = spec.frames, spec.height, spec.width
    t = torch.arange(t_, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(
        torch.arange(h_, device=device, dtype=torch.float32) + 0.5,
        torch.arange(w_, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )

    def per_video(x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 1, 1, 1) against (B, T, H, W)
        return x.view(-1, 1, 1, 1)

    # background in world coordinates: colour waves (B, 3, T, H, W) plus a fine texture
    cam, wx, wy = _world(p, t, xx, yy)
    img = p["bg_base"][:, :, None, None, None].expand(-1, -1, t_, h_, w_)
    for j in range(2):
        d, k = p["bg_wave_dir"][:, j], p["bg_wave_k"][:, j]
        wave = torch.sin(
            per_video(k) * (wx * per_video(torch.cos(d)) + wy * per_video(torch.sin(d)))
            + per_video(p["bg_wave_phase"][:, j])
        )
        img = img + p["bg_wave_amp"][:, j, :, None, None, None] * wave[:, None]
    ang, kt = per_video(p["bg_tex_angle"][:, 0]), per_video(p["bg_tex_k"][:, 0])
    a, b = _rotated_sines(kt, wx, wy, ang)
    img = img + (per_video(p["bg_tex_amp"][:, 0]) * _texture(per_video(p["bg_check"][:, 0]), a, b))[:, None]

    px, py, theta = _trajectories(p, t, cam, h_, w_, t_)  # as version 1

    alphas = []
    for k in range(spec.max_objects):  # painter's order: later objects occlude earlier ones
        r, u, v = _object_frame(p, k, px, py, theta, xx, yy)
        alpha = (0.5 - _sdf(p["shape"][:, 0], u, v) * r).clamp(0, 1) * p["present"][:, k, None, None, None]
        kk = p["tex_k"][:, k, None, None, None]
        pattern = 0.5 + 0.5 * _texture(p["tex_check"][:, k, None, None, None], torch.sin(kk * u), torch.sin(kk * v))
        color = p["c1"][:, k, :, None, None, None] * pattern[:, None] + p["c2"][:, k, :, None, None, None] * (
            1 - pattern[:, None]
        )
        img = img * (1 - alpha[:, None]) + color * alpha[:, None]
        alphas.append(alpha)

    # the panel: a band of width w whose centre sweeps from off-screen to off-screen in [t_in, t_out]
    along = torch.where(per_video(p["panel_axis"][:, 0]) > 0.5, yy[None, None], xx[None, None]).expand(-1, t_, -1, -1)
    length = torch.where(p["panel_axis"][:, 0] > 0.5, float(h_), float(w_))
    half = p["panel_w"][:, 0] / 2
    start = torch.where(p["panel_dir"][:, 0] > 0, -half - 1.0, length + half + 1.0)
    end = torch.where(p["panel_dir"][:, 0] > 0, length + half + 1.0, -half - 1.0)
    t_in, t_out = p["panel_t"][:, 0:1], p["panel_t"][:, 1:2]
    frac = ((t[None] - t_in) / (t_out - t_in)).clamp(0, 1)  # (B, T)
    centre = start[:, None] + (end - start)[:, None] * frac
    panel = (half[:, None, None, None] - (along - centre[:, :, None, None]).abs() + 0.5).clamp(0, 1)
    panel = panel * per_video(p["panel_on"][:, 0])
    hatch = torch.sin(per_video(p["panel_tex_k"][:, 0]) * (xx + yy)[None, None])
    panel_color = p["panel_c"][:, :, None, None, None] * (0.8 + 0.2 * hatch[:, None])
    img = img * (1 - panel[:, None]) + panel_color * panel[:, None]

    visible = []
    for k, alpha in enumerate(alphas):
        front = torch.ones_like(alpha)
        for later in alphas[k + 1 :]:
            front = front * (1 - later)
        visible.append(alpha * front * (1 - panel))
    return Scene(img.clamp(-1, 1).contiguous(), torch.stack(visible, 1), panel, p["present"] > 0.5)


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
