"""``topk``: training-free dynamic block-sparse attention by pooled block scores.

The common core of SpargeAttn / SLA / MoBA-style selection (REFERENCE.md section 4): mean-pool Q and K
per block, score every (query block, key block) pair by the pooled dot product, keep the top
``ceil((1 - sparsity) * Mk)`` key blocks per query block, and always keep the key blocks covering the
query block's own tokens (``keep_diagonal``). Exact softmax attention over the kept tiles.

Knobs (defaults): ``sparsity`` 0 (the runner sets it); ``block_q`` 128 x ``block_k`` 64 (the tile of
the Triton kernel; SLA's benchmark uses 128x64); ``keep_diagonal`` True (a token always sees its
neighbourhood); ``backend`` auto; ``selector`` auto: on a CUDA device with Triton the same rule runs
as pool + score + one selection kernel (``kernels.select_triton``, 0.115 ms instead of 1.10 ms in torch
on the H200 at Wan 480p, tile-for-tile identical to torch there), elsewhere in torch; ``"torch"`` and
``"triton"`` force one (``"triton"`` raises off CUDA).
FLOPs: ``4 * kept token pairs * D`` for attention plus selection (pooling ``2*B*H*N*D``, block scores ``2*B*H*Mq*Mk*D``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from salad_bench.kernels import block_sparse_attention, cdiv, keep_count, resolve_backend, triton_available
from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout
from salad_bench.kernels.selection import block_scores, diagonal_blocks, topk_layout
from salad_bench.methods.base import METHODS, AttentionMethod, AttnContext, BlockSparseConfig, check_choice


@dataclass(frozen=True)
class TopKConfig(BlockSparseConfig):
    keep_diagonal: bool = True
    selector: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("selector", self.selector, ("auto", "torch", "triton"))


def selection_flops(b: int, h: int, n: int, d: int, mq: int, mk: int) -> float:
    """Pool Q and K (one add per element each) and score all block pairs."""
    return 2.0 * b * h * n * d + 2.0 * b * h * mq * mk * d


@METHODS.register("topk", family="training_free", traits=("headline",))
class TopK(AttentionMethod):
    """Top-k key blocks per query block by mean-pooled scores (diagonal always kept)."""

    Config = TopKConfig
    family = "training_free"
    config: TopKConfig
    fuses_residual = True  # the block-sparse kernel adds a residual in its epilogue
    runs_block_sparse = True

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout:
        c = self.config
        n = q.shape[2]
        if c.selector == "triton" and not triton_available(q.device):
            raise Unsupported("selector='triton' needs a CUDA device with Triton (or TRITON_INTERPRET=1); use selector='torch'")
        if c.selector == "triton" or (c.selector == "auto" and q.device.type == "cuda" and triton_available(q.device)):
            # Same rule on the GPU (pool, score, exact top-k by bisection), no N x N anywhere.
            from salad_bench.kernels.select_triton import select_topk_triton

            try:
                layout = select_topk_triton(q, k, keep_count(c.sparsity, cdiv(n, c.block_k)), c.block_q, c.block_k,
                                            keep_diagonal=c.keep_diagonal)
                self._selector = "triton"
                return layout
            except Unsupported:
                if c.selector == "triton":
                    raise
                # auto: a shape the Triton selector does not take (non-power-of-two block or D) selects in torch
        scores = block_scores(q, k, c.block_q, c.block_k)
        force = diagonal_blocks(n, c.block_q, c.block_k, q.device) if c.keep_diagonal else None
        self._selector = "torch"
        return topk_layout(scores, keep_count(c.sparsity, scores.shape[-1]), n, c.block_q, c.block_k, force)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        layout = self.select(q, k, ctx)
        backend = resolve_backend(self.config.backend, q.device)
        out = block_sparse_attention(q, k, v, layout, backend=backend, residual=residual)
        b, h, n, d = q.shape
        self._remember(layout, backend, path={"selector": getattr(self, "_selector", "")},
                       selection=selection_flops(b, h, n, d, layout.num_q_blocks, layout.num_k_blocks))
        return out
