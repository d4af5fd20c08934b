"""Workload presets (REFERENCE.md section 1) and seeded Q/K/V generators.

A workload is the shape of one self-attention call of a video DiT: batch, heads, head_dim and the
latent grid ``(T, H, W)`` after patchify (tokens in t-major order). ``make_qkv`` draws inputs either
``random`` (i.i.d. normal: no structure, the worst case for dynamic selection) or ``video``
(features correlated in space and time, different length scales per head, then rotated by Wan's 3D
RoPE), so that block selection sees the kind of structure real video DiTs have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from salad_bench.kernels.rope import apply_rope, rope_3d_freqs
from salad_bench.methods.registry import UnknownNameError

__all__ = ["Workload", "WORKLOADS", "get_workload", "make_qkv", "default_workload"]

QKVKind = Literal["video", "random", "wan"]
# the dtype names every command takes (--dtype) and the torch dtypes they stand for
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Workload:
    """One self-attention call: ``(B, heads, T*H*W, head_dim)`` with the grid it came from."""

    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    layers: int
    batch: int = 1
    note: str = ""

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    def attention_gib(self, bytes_per_el: int = 2) -> float:
        """Memory of q, k, v and the output (GiB)."""
        return 4 * self.batch * self.heads * self.n * self.head_dim * bytes_per_el / 2**30


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("wan2.1-1.3b-480p", (21, 30, 52), 12, 128, 30, note="Wan2.1-T2V-1.3B, 81 frames, 480x832"),
        Workload("wan2.1-1.3b-720p", (21, 45, 80), 12, 128, 30, note="Wan2.1-T2V-1.3B, 81 frames, 720x1280"),
        Workload("wan2.1-14b-720p", (21, 45, 80), 40, 128, 40, note="Wan2.1-T2V-14B, 81 frames, 720x1280"),
        Workload("hunyuan-720p", (33, 45, 80), 24, 128, 60, note="HunyuanVideo, 129 frames, 720x1280 (layers unconfirmed)"),
        Workload("cpu-tiny", (5, 16, 30), 4, 64, 2, note="CPU-sized: 2,400 tokens, not a multiple of 64 or 128"),
    ]
}


def get_workload(name: str) -> Workload:
    if name in WORKLOADS:
        return WORKLOADS[name]
    import difflib

    close = difflib.get_close_matches(name, list(WORKLOADS), n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UnknownNameError(f"unknown workload {name!r}.{hint} Known: {', '.join(WORKLOADS)} (and dit:<preset> for whole-model runs).")


def default_workload(device: torch.device) -> str:
    """The embedded default: Wan2.1-1.3B 480p on a GPU, ``cpu-tiny`` without one."""
    return "wan2.1-1.3b-480p" if device.type == "cuda" else "cpu-tiny"


def _grid_coords(grid: tuple[int, int, int], device) -> torch.Tensor:
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3).float()


def make_qkv(
    wl: Workload,
    *,
    kind: QKVKind = "video",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    num_features: int = 64,
    sharpness: float = 2.0,
    noise: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``q, k, v`` of shape ``(B, H, N, D)``.

    ``video``: each head has its own length scales along t, h and w (log-uniform between one cell and
    half the grid), random Fourier features of the token position at those scales give a smooth
    field, q and k are the same projection of it (so ``q_i . k_j`` is a kernel of the distance between
    tokens i and j, sharpened by ``sharpness``) plus ``noise``; v is another smooth field; q and k
    are then rotated by Wan's 3D RoPE as in the model. ``random``: standard normal. ``wan``: what the
    first self-attention layer of a random-weight Wan2.1 DiT of this shape computes (needs diffusers;
    :mod:`salad_bench.harness.integrations.wan_qkv`).
    """
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, n, d = wl.batch, wl.heads, wl.n, wl.head_dim
    if kind == "random":
        shape = (b, h, n, d)
        q, k, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        return q, k, v
    if kind == "wan":
        from salad_bench.harness.integrations.wan_qkv import wan_layer_qkv

        return wan_layer_qkv(wl.grid, h, d, batch=b, seed=seed, device=device, dtype=dtype)
    if kind != "video":
        raise ValueError(f"kind must be 'video', 'random' or 'wan'; got {kind!r}")
    pos = _grid_coords(wl.grid, device)  # (N, 3)
    extent = torch.tensor([max(s, 2) for s in wl.grid], dtype=torch.float32)
    lo, hi = torch.zeros(3), torch.log(extent / 2)
    scales = torch.exp(lo + (hi - lo) * torch.rand(h, 3, generator=g))  # (H, 3) length scales in cells
    freqs = torch.randn(h, num_features, 3, generator=g) / scales[:, None, :]  # (H, F, 3)
    phase = torch.rand(h, num_features, generator=g) * 2 * math.pi
    proj_qk = torch.randn(h, 2 * num_features, d, generator=g) / math.sqrt(num_features)
    proj_v = torch.randn(h, 2 * num_features, d, generator=g) / math.sqrt(num_features)
    freqs, phase, proj_qk, proj_v = (x.to(device) for x in (freqs, phase, proj_qk, proj_v))
    ang = torch.einsum("nc,hfc->hnf", pos, freqs) + phase[:, None, :]  # (H, N, F)
    feats = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)  # (H, N, 2F)
    base = torch.einsum("hnf,hfd->hnd", feats, proj_qk) * math.sqrt(sharpness) * d**0.25
    vals = torch.einsum("hnf,hfd->hnd", feats, proj_v)
    dg = torch.Generator(device=device).manual_seed(seed + 1)

    def jitter(x: torch.Tensor) -> torch.Tensor:
        return x + noise * torch.randn(b, *x.shape, generator=dg, device=device) * x.std()

    q, k, v = jitter(base), jitter(base), jitter(vals)
    cos, sin = rope_3d_freqs(wl.grid, d, device)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()
