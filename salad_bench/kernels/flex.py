"""FlexAttention execution of a :class:`BlockLayout` (the comparison point for our Triton kernel)."""

from __future__ import annotations

import functools
import math

import torch

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout

__all__ = ["flex_block_mask", "flex_block_sparse_attention", "flex_dense_attention"]


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _require_cuda(q: torch.Tensor) -> None:
    """Flex runs compiled on CUDA only. Eager flex (the CPU) materialises all N^2 scores and applies
    ``mask_mod`` alone, which for a block mask built from kv blocks keeps every key: dense attention."""
    if q.device.type != "cuda":
        raise Unsupported(f"FlexAttention runs compiled on CUDA only; eager flex on {q.device.type} materialises "
                          "all N^2 scores and ignores a block mask (dense attention), not a fair or sparse "
                          "baseline; use backend='torch' or 'triton' there")  # fmt: skip


def flex_block_mask(layout: BlockLayout):
    """A FlexAttention ``BlockMask`` with exactly the layout's kept tiles (ragged N handled by flex)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as exc:  # pragma: no cover - old torch
        raise Unsupported(f"FlexAttention is not available in torch {torch.__version__}") from exc
    mk = layout.num_k_blocks
    idx = layout.kv_idx
    if idx.shape[-1] < mk:
        pad = torch.zeros(*idx.shape[:-1], mk - idx.shape[-1], dtype=idx.dtype, device=idx.device)
        idx = torch.cat([idx, pad], dim=-1)
    return BlockMask.from_kv_blocks(
        layout.kv_cnt.contiguous(),
        idx.contiguous(),
        BLOCK_SIZE=(layout.block_q, layout.block_k),
        seq_lengths=(layout.seq_len, layout.seq_len),
    )


def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, block_mask=None, scale: float | None = None
) -> torch.Tensor:
    """Block-sparse attention through FlexAttention (CUDA; the compiled kernel visits only the mask's
    blocks); pass a prebuilt ``block_mask`` to time the kernel alone."""
    _require_cuda(q)
    bm = flex_block_mask(layout) if block_mask is None else block_mask
    return _compiled_flex()(q, k, v, block_mask=bm, scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


def flex_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention through compiled FlexAttention with no mask (CUDA)."""
    _require_cuda(q)
    return _compiled_flex()(q, k, v)
