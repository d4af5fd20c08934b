"""A seeded Euler sampler for the flow-matching mini Wan.

Flow matching as Wan trains it: ``x_t = (1 - t) x0 + t * noise`` and the network predicts the velocity
``noise - x0``. Sampling integrates ``dx/dt = v(x_t, t)`` from ``t = 1`` (pure noise) to ``t = 0`` with
Euler steps on a uniform grid (no timestep shift). Classifier-free guidance as Wan2.1 samples: with
``guidance`` g != 1 each step runs one forward on the batch twice over (the class labels, then the null
class of a model trained with label dropout) and uses ``v_null + g * (v_cond - v_null)``; g = 1 is one
plain conditional forward. Noise comes from a CPU generator, so the same seed gives the same starting
noise on every device and for every method: that is what makes "the full model's video from the
same noise and class" a fair reference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from salad_bench.harness.quality.data import VideoSpec

__all__ = ["autocast", "euler_sample", "make_noise", "timesteps"]


def make_noise(
    n: int, spec: VideoSpec, seed: int, device: torch.device | str = "cpu", *, offset: int = 0
) -> torch.Tensor:
    """``(n, 3, T, H, W)`` standard normal noise; video ``j`` uses generator seed ``seed * 1_000_003 + offset + j``
    so any subset of videos can be regenerated alone."""
    out = torch.empty(n, *spec.shape)
    for j in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + offset + j)
        out[j] = torch.randn(*spec.shape, generator=g)
    return out.to(device)


def timesteps(num_steps: int) -> torch.Tensor:
    """The Euler grid ``1 = t_0 > t_1 > ... > t_n = 0``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1)


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay in fp32)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def euler_sample(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int = 20,
    on_step: Callable[[int], None] | None = None,
    bf16: bool = True,
    guidance: float = 1.0,
    null_label: int | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (t=1) to a video (t=0); returns ``(B, 3, T, H, W)`` float32 clamped to [-1, 1].

    ``on_step(i)`` is called before step ``i`` (the Wan integration's ``set_step``), so methods that keep
    the first steps dense know where they are. ``guidance`` != 1: classifier-free guidance against the
    class ``null_label`` (:attr:`~harness.quality.model.MiniWan.null_label`), one forward of ``2 B`` videos
    per step (the conditional half first); the guided velocity is combined in fp32.
    """
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number; got {guidance}")
    guided = guidance != 1.0
    if guided and null_label is None:
        raise ValueError(
            f"guidance {guidance:g} needs null_label (the model's null class, MiniWan.null_label); "
            "a model trained without one samples with guidance 1"
        )
    ts = timesteps(num_steps)
    x = noise.float()
    both = torch.cat([labels, torch.full_like(labels, int(null_label))]) if guided else labels
    for i in range(num_steps):
        if on_step is not None:
            on_step(i)
        xin = torch.cat([x, x]) if guided else x
        with autocast(x.device, bf16):
            v = model(xin, ts[i].expand(xin.shape[0]).to(x.device), both).float()
        if guided:
            v_cond, v_null = v.chunk(2)
            v = v_null + guidance * (v_cond - v_null)
        x = x + (ts[i + 1] - ts[i]).item() * v
    return x.clamp(-1, 1)
