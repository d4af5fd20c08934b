"""Optional FlashAttention-4 (CuTe DSL, ``flash-attn-4``) backend: availability probe only.

flash-attn-4 has block-sparse support on Hopper/Blackwell, but its wheels and dependencies (~200 MB)
are not on the benchmark image (REFERENCE.md section 2), so nothing here has been run. Calls raise
:class:`Unsupported` with the reason, and the benchmark writes a ``skipped`` row; wiring the real call
belongs next to a machine that has the package.
"""

from __future__ import annotations

import importlib.util

import torch

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout

__all__ = ["fa4_available", "fa4_block_sparse_attention"]


def fa4_available() -> tuple[bool, str]:
    """(present, reason): whether ``flash_attn.cute`` imports here and a CUDA device exists."""
    try:
        spec = importlib.util.find_spec("flash_attn.cute")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return False, "flash-attn-4 (flash_attn.cute) is not installed"
    if not torch.cuda.is_available():
        return False, "flash-attn-4 needs a CUDA device"
    return True, ""


def fa4_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                               scale: float | None = None) -> torch.Tensor:
    """Not wired: raises :class:`Unsupported` naming why (package missing, or the call untested here)."""
    ok, why = fa4_available()
    if not ok:
        raise Unsupported(why)
    raise Unsupported("flash-attn-4 is installed but its block-sparse call is not wired in this harness (untested)")
