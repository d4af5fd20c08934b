"""Host-side TMA (tensor memory accelerator) descriptors, for the block-sparse forward's K/V loads.

A descriptor covers a whole tensor; its block is ``rows`` consecutive rows of the second-to-last dim
(full last dim, ones elsewhere). Loads past the end of that dim read zeros and stores there are dropped,
per (batch, head) slice, so ragged lengths need no masks.
"""

from __future__ import annotations

import torch

__all__ = ["tma_desc", "tma_ok"]


def tma_desc(x: torch.Tensor, rows: int):
    """A descriptor over ``x`` (any rank >= 2) with blocks of ``rows`` rows of the last two dims."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1] * (x.dim() - 2) + [rows, x.shape[-1]])


def tma_ok(*xs: torch.Tensor) -> bool:
    """TMA descriptors need Hopper or newer (or the interpreter) and 16-byte aligned base and strides."""
    dev = xs[0].device
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] < 9:
        return False
    for x in xs:
        if x.data_ptr() % 16 or any((s * x.element_size()) % 16 for s in x.stride()[:-1]):
            return False
    return True
