"""Workload presets (REFERENCE.md section 1) and seeded Q/K/V generators.

A workload is the shape of one self-attention call of a video DiT: batch, heads, head_dim and the
latent grid ``(T, H, W)`` after patchify (tokens in t-major order). ``make_qkv`` draws inputs either
``random`` (i.i.d. normal: no structure, the worst case for dynamic selection) or ``video``
(features correlated in space and time, different length scales per head, then rotated by Wan's 3D
RoPE), so that block selection sees the kind of structure real video DiTs have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from salad_bench.kernels.rope import apply_rope, rope_3d_freqs
from salad_bench.methods.registry import UnknownNameError, close_names

__all__ = ["Workload", "WORKLOADS", "DIT_WORKLOADS", "WAN_1_3B", "WAN_14B", "WAN_TINY", "dit_workload",
           "get_workload", "make_qkv", "default_workload"]

QKVKind = Literal["video", "random", "wan"]
# the dtype names every command takes (--dtype) and the torch dtypes they stand for
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# diffusers ``WanTransformer3DModel`` configs. Wan2.1-T2V-1.3B: dim 1536 = 12 heads x 128, ffn 8960, 30 layers;
# Wan2.1-T2V-14B: dim 5120 = 40 heads x 128, ffn 13824, 40 layers (Wan's configs and diffusers'
# convert_wan_to_diffusers.py; also WanTransformer3DModel's defaults).
WAN_1_3B: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_14B: dict[str, Any] = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
# CPU-sized; head_dim 64 is the smallest the Triton kernels take, so dit:tiny also runs on a GPU
WAN_TINY: dict[str, Any] = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 64, "in_channels": 4,
                            "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 256, "num_layers": 2,
                            "rope_max_seq_len": 64}


@dataclass(frozen=True)
class Workload:
    """One self-attention call: ``(B, heads, T*H*W, head_dim)`` with the grid it came from.

    With ``model`` (a ``WanTransformer3DModel`` config) it is also a whole-model workload, ``dit:<name>``:
    the latent ``(frames, height, width)`` is the grid times the patch size, with a ``text_len``-token
    text context."""

    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    layers: int
    batch: int = 1
    note: str = ""
    model: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    text_len: int = 512

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    @property
    def dit_name(self) -> str:
        return f"dit:{self.name}"

    @property
    def latent(self) -> tuple[int, int, int]:
        p = (self.model or {}).get("patch_size", (1, 1, 1))
        return (self.grid[0] * p[0], self.grid[1] * p[1], self.grid[2] * p[2])

    def attention_gib(self, bytes_per_el: int = 2) -> float:
        """Memory of q, k, v and the output (GiB)."""
        return 4 * self.batch * self.heads * self.n * self.head_dim * bytes_per_el / 2**30


def dit_workload(name: str, model: dict[str, Any], latent: tuple[int, int, int], *, text_len: int = 512,
                 note: str = "") -> Workload:
    """A workload from a model config and its latent video shape (VAE latent space, before patchify)."""
    p = model["patch_size"]
    grid = (latent[0] // p[0], latent[1] // p[1], latent[2] // p[2])
    return Workload(name, grid, model["num_attention_heads"], model["attention_head_dim"], model["num_layers"],
                    note=note, model=model, text_len=text_len)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        dit_workload("wan2.1-1.3b-480p", WAN_1_3B, (21, 60, 104), note="Wan2.1-T2V-1.3B, 81 frames, 480x832"),
        dit_workload("wan2.1-1.3b-720p", WAN_1_3B, (21, 90, 160), note="Wan2.1-T2V-1.3B, 81 frames, 720x1280"),
        dit_workload("wan2.1-14b-720p", WAN_14B, (21, 90, 160), note="Wan2.1-T2V-14B, 81 frames, 720x1280"),
        Workload("hunyuan-720p", (33, 45, 80), 24, 128, 60, note="HunyuanVideo, 129 frames, 720x1280 (layers unconfirmed)"),
        Workload("cpu-tiny", (5, 16, 30), 4, 64, 2, note="CPU-sized: 2,400 tokens, not a multiple of 64 or 128"),
        dit_workload("tiny", WAN_TINY, (3, 16, 16), text_len=16, note="CPU-sized Wan: 2 layers, 2 heads x 64, 192 tokens"),
    ]
}
# whole-model workloads: every preset that carries a model config, under ``dit:<name>``
DIT_WORKLOADS: dict[str, Workload] = {w.dit_name: w for w in WORKLOADS.values() if w.model is not None}


def get_workload(name: str) -> Workload:
    if name in WORKLOADS:
        return WORKLOADS[name]
    close = close_names(name, WORKLOADS, n=2)
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
    first self-attention layer of a random-weight Wan2.1 DiT of this shape computes, in the layout the
    model hands a method ((B, H, N, D) views of token-major buffers; needs diffusers;
    :mod:`salad_bench.harness.integrations.wan_qkv`). ``video`` and ``random`` are contiguous.
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

        # a workload without a model of its own (hunyuan-720p, cpu-tiny) takes Wan2.1-1.3B's layer
        return wan_layer_qkv(wl.model or WAN_1_3B, wl.grid, h, d, batch=b, seed=seed, device=device, dtype=dtype)
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
