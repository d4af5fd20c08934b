"""3D rotary position embedding over a (T, H, W) latent grid, laid out as Wan2.1 does it.

Wan splits the head dimension into a temporal part and two equal spatial parts: for ``head_dim`` D,
the height and width parts get ``2 * (D // 6)`` channels each and time gets the rest (44/42/42 at
D = 128). Each part rotates channel pairs ``(2i, 2i+1)`` by ``pos * theta**(-2i/d_part)``.
Tokens are ordered t-major, then h, then w (the order Wan's patchify produces).
"""

from __future__ import annotations

import torch

__all__ = ["rope_3d_freqs", "apply_rope", "split_dims"]


def split_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to (t, h, w) rotations."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return positions.to(torch.float64)[:, None] * inv[None, :]  # (P, dim/2)


def rope_3d_freqs(
    grid: tuple[int, int, int], head_dim: int, device: torch.device | str = "cpu", theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(N, D/2)`` (float32) for a t-major (T, H, W) grid."""
    t, h, w = grid
    dt, dh, dw = split_dims(head_dim)
    at = _axis_angles(torch.arange(t, device=device), dt, theta)
    ah = _axis_angles(torch.arange(h, device=device), dh, theta)
    aw = _axis_angles(torch.arange(w, device=device), dw, theta)
    ang = torch.cat(
        [
            at[:, None, None, :].expand(t, h, w, -1),
            ah[None, :, None, :].expand(t, h, w, -1),
            aw[None, None, :, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, head_dim // 2)
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` ``(B, H, N, D)`` by angles with ``cos/sin`` ``(N, D/2)``."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work).unflatten(-1, (-1, 2))
    cos, sin = cos.to(work), sin.to(work)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
