"""Block selection in plain torch (runs on CPU and GPU; nothing of size N x N is built).

Mean-pool Q and K per block, score block pairs by the pooled dot product, keep the best key blocks
per query block either by count (top-k) or by cumulative softmax mass (top-p). The blocks that cover
a query block's own tokens (the "diagonal") can be forced in.
"""

from __future__ import annotations

import functools
import math

import torch

from salad_bench.kernels.layout import BlockLayout, cdiv

__all__ = ["pool_blocks", "pooled_logits", "block_scores", "diagonal_blocks", "diagonal_width", "topk_layout", "topp_layout"]


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` tokens: ``(B, H, N, D) -> (B, H, ceil(N/block), D)`` (fp32).

    The ragged last block is averaged over the tokens it has.
    """
    b, h, n, d = x.shape
    m = cdiv(n, block)
    pad = m * block - n
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.reshape(b, h, m, block, d).sum(3)
    counts = torch.full((m,), float(block), device=x.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def pooled_logits(pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """``pq @ pk^T`` of fp32 pooled blocks, in fp32 even inside an autocast region (a model's bf16 forward
    would otherwise round the scores, and the selection with them)."""
    if torch.is_autocast_enabled(pq.device.type):  # the context only where needed: the selector is host-bound
        with torch.autocast(pq.device.type, enabled=False):
            return torch.matmul(pq, pk.transpose(-1, -2))
    return torch.matmul(pq, pk.transpose(-1, -2))


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Pooled attention logits ``(B, H, Mq, Mk)`` in fp32, scaled by ``1/sqrt(D)``."""
    pq, pk = pool_blocks(q, block_q), pool_blocks(k, block_k)
    return pooled_logits(pq, pk) / math.sqrt(q.shape[-1])


@functools.lru_cache(maxsize=32)
def diagonal_blocks(n: int, block_q: int, block_k: int, device) -> torch.Tensor:
    """Bool ``(Mq, Mk)``: key blocks that overlap each query block's own token range (cached)."""
    mq, mk = cdiv(n, block_q), cdiv(n, block_k)
    qs = torch.arange(mq, device=device) * block_q
    qe = torch.clamp(qs + block_q, max=n) - 1
    ks = torch.arange(mk, device=device) * block_k
    ke = torch.clamp(ks + block_k, max=n) - 1
    return (ks[None, :] <= qe[:, None]) & (ke[None, :] >= qs[:, None])


def topk_layout(
    scores: torch.Tensor,
    keep: int,
    n: int,
    block_q: int,
    block_k: int,
    force: torch.Tensor | None = None,
    force_width: int | None = None,
) -> BlockLayout:
    """Keep the ``keep`` best key blocks per query block, plus every block ``force`` marks.

    ``force_width`` is the most forced blocks in any row; it defaults to the diagonal's width, which
    is what ``force`` is unless the caller says otherwise.
    """
    s = scores
    if force is not None:
        s = s.masked_fill(force, float("inf"))
        keep = max(keep, diagonal_width(n, block_q, block_k) if force_width is None else force_width)
    keep = min(keep, s.shape[-1])
    idx = torch.topk(s, keep, dim=-1, sorted=False).indices
    idx = torch.sort(idx, dim=-1).values.to(torch.int32)
    cnt = torch.full(s.shape[:3], keep, dtype=torch.int32, device=s.device)
    return BlockLayout(idx.contiguous(), cnt, block_q, block_k, n)


@functools.lru_cache(maxsize=256)
def diagonal_width(n: int, block_q: int, block_k: int) -> int:
    """Most key blocks any query block's diagonal covers (plain ints: no device sync)."""
    widest = 0
    for qs in range(0, n, block_q):
        qe = min(n, qs + block_q) - 1
        widest = max(widest, qe // block_k - qs // block_k + 1)
    return widest


def topp_layout(
    scores: torch.Tensor, mass: float, n: int, block_q: int, block_k: int, force: torch.Tensor | None = None
) -> BlockLayout:
    """Keep, per query block, the fewest key blocks whose softmax mass reaches ``mass``."""
    probs = torch.softmax(scores, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep_sorted = before < mass  # always keeps the first
    tiles = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if force is not None:
        tiles = tiles | force
    return BlockLayout.from_dense(tiles, block_q, block_k, n)
