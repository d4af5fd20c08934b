"""The one block-sparsity format every sparse method produces and every kernel consumes.

A layout says, for each (batch, head, query block), which key blocks are computed:

* ``kv_idx``: int32 ``(B, H, Mq, Kmax)``: key-block indices; only the first ``kv_cnt`` entries of a
  row are meaningful (the rest are padding and are never read).
* ``kv_cnt``: int32 ``(B, H, Mq)``: how many key blocks each query block attends to (0 is legal:
  that query block's output is zero and its log-sum-exp is ``-inf``).

``Mq = ceil(N / block_q)``, ``Mk = ceil(N / block_k)``; the last block of each is ragged when ``N`` is
not a multiple of the block size. Density is counted in tiles: kept (q-block, k-block) pairs over all
``B * H * Mq * Mk`` pairs, the convention REFERENCE.md section 4 normalises every method to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BlockLayout", "cdiv", "gather_tokens", "is_token_major", "keep_count", "token_major"]


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


@dataclass(frozen=True)
class BlockLayout:
    """Key-block index lists per (batch, head, query block); see the module docstring."""

    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    block_q: int
    block_k: int
    seq_len: int

    def __post_init__(self) -> None:
        if self.kv_idx.dim() != 4 or self.kv_cnt.dim() != 3:
            raise ValueError(
                f"kv_idx must be (B, H, Mq, Kmax) and kv_cnt (B, H, Mq); got {tuple(self.kv_idx.shape)} "
                f"and {tuple(self.kv_cnt.shape)}"
            )
        if self.kv_idx.shape[:3] != self.kv_cnt.shape:
            raise ValueError("kv_idx and kv_cnt disagree on (B, H, Mq)")
        if self.kv_idx.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"layout has {self.kv_idx.shape[2]} query blocks but N={self.seq_len} with "
                f"block_q={self.block_q} needs {self.num_q_blocks}"
            )
        if self.block_q <= 0 or self.block_k <= 0:
            raise ValueError("block sizes must be positive")

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.seq_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return cdiv(self.seq_len, self.block_k)

    @property
    def shape(self) -> tuple[int, int, int]:
        b, h, mq = self.kv_cnt.shape
        return b, h, mq

    def density(self) -> float:
        """Fraction of (q-block, k-block) tiles computed (synchronises with the device)."""
        b, h, mq = self.kv_cnt.shape
        return float(self.kv_cnt.sum().item()) / float(b * h * mq * self.num_k_blocks)

    def kept_token_pairs(self) -> int:
        """Exact number of (query, key) token pairs inside kept tiles, ragged edges included.

        This is what a block-sparse kernel actually computes, so executed FLOPs use it.
        """
        mq, mk = self.num_q_blocks, self.num_k_blocks
        q_sizes = torch.full((mq,), self.block_q, dtype=torch.int64, device=self.kv_cnt.device)
        q_sizes[-1] = self.seq_len - (mq - 1) * self.block_q
        k_sizes = torch.full((mk,), self.block_k, dtype=torch.int64, device=self.kv_cnt.device)
        k_sizes[-1] = self.seq_len - (mk - 1) * self.block_k
        kmax = self.kv_idx.shape[-1]
        valid = torch.arange(kmax, device=self.kv_cnt.device) < self.kv_cnt.unsqueeze(-1)
        ks = k_sizes[self.kv_idx.long().clamp(0, mk - 1)] * valid
        per_row = ks.sum(-1)  # (B, H, Mq) keys per query block
        return int((per_row * q_sizes).sum().item())

    def to_dense(self) -> torch.Tensor:
        """Bool ``(B, H, Mq, Mk)`` tile map (small: blocks, not tokens)."""
        b, h, mq = self.kv_cnt.shape
        kmax = self.kv_idx.shape[-1]
        valid = torch.arange(kmax, device=self.kv_cnt.device) < self.kv_cnt.unsqueeze(-1)
        dense = torch.zeros(b, h, mq, self.num_k_blocks + 1, dtype=torch.bool, device=self.kv_cnt.device)
        idx = torch.where(valid, self.kv_idx.long(), torch.full_like(self.kv_idx.long(), self.num_k_blocks))
        dense.scatter_(-1, idx, True)
        return dense[..., : self.num_k_blocks]

    @classmethod
    def from_dense(cls, tiles: torch.Tensor, block_q: int, block_k: int, seq_len: int) -> BlockLayout:
        """Build a layout from a bool ``(B, H, Mq, Mk)`` tile map; indices come out sorted ascending."""
        if tiles.dtype != torch.bool or tiles.dim() != 4:
            raise ValueError("tiles must be a bool tensor of shape (B, H, Mq, Mk)")
        mk = tiles.shape[-1]
        if mk != cdiv(seq_len, block_k):
            raise ValueError(f"tile map has {mk} key blocks, N={seq_len}/block_k={block_k} needs {cdiv(seq_len, block_k)}")
        cnt = tiles.sum(-1, dtype=torch.int32)
        kmax = max(int(cnt.max().item()) if cnt.numel() else 0, 1)
        # Sort kept blocks first, keeping ascending order among them (stable sort on ~tiles).
        order = torch.sort((~tiles).to(torch.int8), dim=-1, stable=True).indices[..., :kmax]
        return cls(order.to(torch.int32).contiguous(), cnt.contiguous(), block_q, block_k, seq_len)

    @classmethod
    def full(cls, b: int, h: int, seq_len: int, block_q: int, block_k: int, device: torch.device | str) -> BlockLayout:
        """Every tile kept: density 1."""
        mq, mk = cdiv(seq_len, block_q), cdiv(seq_len, block_k)
        idx = torch.arange(mk, dtype=torch.int32, device=device).expand(b, h, mq, mk).contiguous()
        cnt = torch.full((b, h, mq), mk, dtype=torch.int32, device=device)
        return cls(idx, cnt, block_q, block_k, seq_len)


def keep_count(sparsity: float, num_blocks: int) -> int:
    """Blocks to keep out of ``num_blocks`` for a target sparsity (at least one)."""
    return max(1, min(num_blocks, math.ceil((1.0 - sparsity) * num_blocks - 1e-9)))


def token_major(b: int, h: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``(B, H, N, D)`` view of a token-major ``(B, N, H, D)`` buffer: the layout a model's
    projections read and write, so ``x.transpose(1, 2).reshape(B, N, H * D)`` is a view, not a copy."""
    return torch.empty((b, n, h, d), dtype=dtype, device=device).transpose(1, 2)


def is_token_major(x: torch.Tensor) -> bool:
    """Whether a ``(B, H, N, D)`` tensor is a view of a dense token-major ``(B, N, H, D)`` buffer."""
    return x.transpose(1, 2).is_contiguous()


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, :, index]`` of a ``(B, H, N, D)`` tensor, the cheap way for its layout. A token-major ``x``
    (the model's q, k, v; every block-sparse and linear-attention output) is gathered as whole ``H * D``
    rows and stays token-major; any other layout goes through ``index_select`` on the token dim."""
    if not is_token_major(x):
        return x.index_select(2, index)
    b, h, n, d = x.shape
    rows = x.transpose(1, 2).reshape(b, n, h * d).index_select(1, index)
    return rows.view(b, index.numel(), h, d).transpose(1, 2)
