"""Accuracy of a method's output against ``full`` on the same inputs."""

from __future__ import annotations

import torch

__all__ = ["compare", "reference_attention", "rel_l2"]


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32."""
    o, r = out.float(), ref.float()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 error, mean cosine similarity over rows, and max absolute error (in fp32)."""
    o, r = out.float(), ref.float()
    diff = o - r
    rel = rel_l2(o, r)
    cos = torch.nn.functional.cosine_similarity(o.flatten(0, -2), r.flatten(0, -2), dim=-1).mean().item()
    return {"rel_l2": rel, "cos_sim": cos, "max_abs_err": diff.abs().max().item()}


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention in fp32 (fp64 on the CPU for small inputs): the ground truth for ``rel_l2``."""
    if q.device.type == "cpu" and q.shape[2] <= 4096:
        q, k, v = q.double(), k.double(), v.double()
    else:
        q, k, v = q.float(), k.float(), v.float()
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
