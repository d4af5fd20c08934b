"""``xattention``: XAttention (Xu et al., arXiv 2503.16428; code: mit-han-lab/x-attention).

Block importance from strided antidiagonals. Tokens are grouped in runs of ``stride`` (S); for query
run ``r`` and key run ``c`` the antidiagonal score is
``A[r, c] = sum_i q[r*S + S-1-i] . k[c*S + i] / (sqrt(D) * S)``: one antidiagonal of the S x S
sub-block of Q K^T. As in the reference (``xattn_estimate``, ``select_mode="inverse"``) it is computed
without the N x N matrix by reshaping q and k into strided rows of width ``S * D`` (key runs
concatenated in order, query runs reversed) and multiplying those, chunked over query blocks, so
memory is ``O(chunk * N / S)``. Each strided row is softmaxed over all key runs, and the
probabilities are summed inside each (query block, key block) tile: the tile's attention mass.
Per query block, the key blocks are kept in decreasing mass until the kept mass reaches
``threshold`` (the reference's ``find_blocks_chunked``: keep while the mass before a block is below
``threshold`` x the row total); the diagonal blocks are always kept (``keep_diagonal``; the
reference's non-causal path does not force them, its causal path does).

Knobs (defaults, provenance):

* ``stride`` 8: the paper's stride for HunyuanVideo (its README: "a threshold of 0.9 or 0.95 and a
  stride of 8"); 16 in its LLM/VLM runs. Must divide ``block_q`` and ``block_k``.
* ``threshold`` None (tau): None selects by ``sparsity`` instead, keeping the
  ``ceil((1 - sparsity) * Mk)`` key blocks of largest mass per query block (so ``sparsity`` is met
  up to the forced diagonal); a value in (0, 1] uses the paper's cumulative rule and ignores
  ``sparsity`` (density then follows the inputs; the paper uses 0.9-0.95 on video).
* ``keep_diagonal`` True; ``chunk_q_blocks`` 16 query blocks per scoring chunk (memory only).
* ``score_precision`` "tf32": on CUDA the strided score matmul (``2 * B*H * (N/S)^2 * S*D`` FLOPs, 412
  GFLOP at Wan 480p) runs on TF32 tensor cores with fp32 accumulation and output; the reference scores
  on tensor cores in the input dtype. "fp32" keeps IEEE fp32 (about 8 ms of the 12 ms selection
  measured at Wan 480p on the H200 before this knob). The CPU always computes in fp32 (fp64 for fp64
  inputs).
* ``dense_first_layers`` / ``dense_first_steps`` 0 (the reference HunyuanVideo runner has
  ``attn_warmup_steps``, default 0). See ``methods/_warmup.py``.

Reachable sparsity (top-k mode): any, down to one block plus the diagonal per query block (at most
``ceil(block_q / block_k) + 1`` tiles per row). At sparsity 0 every tile is kept.

FLOPs: attention ``4 * kept token pairs * D``; selection ``2 * B*H * (N/S)^2 * S*D`` for the strided
scores plus ``4 * B*H * (N/S)^2`` for softmax and tile sums (the reference's estimate costs the same).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from salad_bench.kernels import block_sparse_attention, keep_count, resolve_backend
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.kernels.selection import diagonal_blocks, topk_layout, topp_layout
from salad_bench.methods._warmup import WarmupConfig, WarmupMethod
from salad_bench.methods.base import METHODS, AttnContext, check_choice, check_count, check_range


@dataclass(frozen=True)
class XAttentionConfig(WarmupConfig):
    stride: int = 8
    threshold: float | None = None
    keep_diagonal: bool = True
    chunk_q_blocks: int = 16
    score_precision: str = "tf32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("score_precision", self.score_precision, ("tf32", "fp32"))
        check_choice(
            "stride",
            self.stride,
            tuple(s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= min(self.block_q, self.block_k)),
        )
        if self.threshold is not None:
            check_range("threshold", self.threshold, 0.0, 1.0, lo_open=True)
        check_count("chunk_q_blocks", self.chunk_q_blocks, 1)


def _strided(q: torch.Tensor, k: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad N to a multiple of ``stride``; query runs reversed, key runs in order, ``(B, H, N/S, S*D)``."""
    b, h, n, d = q.shape
    pad = cdiv(n, stride) * stride - n
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(work), k.to(work)
    if pad:
        qf, kf = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qf, kf))
    runs = qf.shape[2] // stride
    q_r = qf.reshape(b, h, runs, stride, d).flip(3).reshape(b, h, runs, stride * d)
    return q_r, kf.reshape(b, h, runs, stride * d)


def antidiagonal_scores(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """Raw antidiagonal sums ``(B, H, ceil(N/S), ceil(N/S))`` (unscaled; for tests and small inputs)."""
    q_r, k_r = _strided(q, k, stride)
    return q_r @ k_r.transpose(-1, -2)


@contextlib.contextmanager
def _matmul_precision(tf32: bool):
    """TF32 tensor cores for CUDA fp32 matmuls inside the block (restored after); a no-op elsewhere."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def tile_mass(
    q: torch.Tensor, k: torch.Tensor, stride: int, block_q: int, block_k: int, chunk_q_blocks: int = 16,
    tf32: bool = False,
) -> torch.Tensor:
    """Softmaxed antidiagonal mass summed per tile, ``(B, H, Mq, Mk)`` (chunked over query blocks;
    ``tf32``: the score matmul on CUDA TF32 tensor cores)."""
    b, h, n, d = q.shape
    q_r, k_r = _strided(q, k, stride)
    runs = k_r.shape[2]
    mq, mk = cdiv(n, block_q), cdiv(n, block_k)
    rq, rk = block_q // stride, block_k // stride  # strided rows per block
    scale = 1.0 / (math.sqrt(d) * stride)
    out = torch.empty(b, h, mq, mk, dtype=q_r.dtype, device=q.device)
    for i0 in range(0, mq, chunk_q_blocks):
        i1 = min(mq, i0 + chunk_q_blocks)
        rows = q_r[:, :, i0 * rq : min(runs, i1 * rq)]
        with _matmul_precision(tf32):
            logits = rows @ k_r.transpose(-1, -2)
        p = torch.softmax(logits * scale, dim=-1)
        p = torch.nn.functional.pad(p, (0, mk * rk - runs, 0, (i1 - i0) * rq - p.shape[2]))
        out[:, :, i0:i1] = p.view(b, h, i1 - i0, rq, mk, rk).sum(dim=(3, 5))
    return out


@METHODS.register("xattention", family="training_free")
class XAttention(WarmupMethod):
    """Tiles ranked by strided antidiagonal mass; cumulative threshold or top-k (arXiv 2503.16428)."""

    Config = XAttentionConfig
    family = "training_free"
    config: XAttentionConfig

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout:
        if self.is_dense_call(ctx):
            return self.full_layout(q)
        c = self.config
        n = q.shape[2]
        mass = tile_mass(q, k, c.stride, c.block_q, c.block_k, c.chunk_q_blocks, tf32=c.score_precision == "tf32")
        force = diagonal_blocks(n, c.block_q, c.block_k, q.device) if c.keep_diagonal else None
        if c.threshold is None:
            return topk_layout(mass, keep_count(c.sparsity, mass.shape[-1]), n, c.block_q, c.block_k, force)
        # topp_layout softmaxes its scores: log(mass) makes that the mass normalised per row.
        return topp_layout(torch.log(mass), c.threshold, n, c.block_q, c.block_k, force)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        dense = self.is_dense_call(ctx)
        layout = self.select(q, k, ctx)
        backend = resolve_backend(self.config.backend, q.device)
        out = block_sparse_attention(q, k, v, layout, backend=backend)
        b, h, n, d = q.shape
        runs = cdiv(n, self.config.stride)
        sel = 0.0 if dense else 2.0 * b * h * runs * runs * self.config.stride * d + 4.0 * b * h * runs * runs
        self._report_extra = {} if dense else {"mode": "threshold" if self.config.threshold is not None else "topk"}
        self._record(layout, backend, ctx, dense, selection=sel)
        return out
