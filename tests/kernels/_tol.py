"""Error measures shared by the kernel tests: ours vs torch's own error in the same dtype."""

from __future__ import annotations

import torch


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close_to_torch(ours: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor,
                          factor: float = 2.0, slack: float = 1e-6, what: str = "") -> None:
    """Relative L2 error of ``ours`` <= factor x torch's own error (same dtype vs fp64) + slack."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    ours_err = rel_l2(ours, ref64)
    torch_err = rel_l2(torch_same_dtype, ref64)
    assert ours_err <= factor * torch_err + slack, f"{what}: rel L2 {ours_err:.3e} vs torch's {torch_err:.3e}"
