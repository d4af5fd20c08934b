"""``sparge``: SpargeAttn's block selection (Zhang et al., arXiv 2502.18137; code: thu-ml/SpargeAttn).

Stage one of SpargeAttn, as in the reference ``get_block_map_meansim``:

1. Pool: mean of q over each query block and of k over each key block; score every tile by the
   pooled dot product ``/ sqrt(D)``, softmax over key blocks.
2. Self-similarity guard: a block is *self-similar* when the mean pairwise cosine similarity of its
   tokens, ``mean_ij cos(x_i, x_j) = ||mean_i x_i/|x_i| ||^2`` (the reference's Gram-matrix mean,
   computed here in O(block * D)), exceeds ``sim_threshold``. Pooling is only trusted for
   self-similar blocks: a non-self-similar key block gets zero pooled mass and its column is always
   kept; a non-self-similar query block keeps its whole row. With ``smooth_k`` the guard sees
   ``k - mean_N(k)`` (the reference's smoothing; the pooled softmax is unchanged by it).
3. Keep, per query block, key blocks by pooled mass: CDF mode keeps the fewest blocks whose
   cumulative mass reaches ``cdf_threshold`` (via ``kernels.selection.topp_layout``, which keeps the
   block that crosses the threshold; the reference's ``searchsorted`` stops one block earlier, so
   this is at least as dense); top-k mode keeps ``ceil((1 - sparsity) * Mk)`` (the reference floors
   ``topk * Mk``). Guard-forced blocks come on top; ``attention_sink`` forces key block 0.

Stage two of SpargeAttn (skipping P.V of a kept tile whose row maximum is far below the running
maximum, ``pvthreshd``) happens inside its kernel, after the tile map is fixed; it is not a tile
decision and is not modelled here. Per-head tuned hyper-parameters (the reference's autotuner) are
not modelled either: one value for all heads.

Knobs (defaults, provenance):

* ``cdf_threshold`` None: None means top-k mode driven by ``sparsity`` (SpargeAttn's ``topk`` is a
  kept fraction: ``topk = 1 - sparsity``); a value uses CDF mode and ignores ``sparsity``. The
  reference CDF entry point defaults to 0.98.
* ``sim_threshold`` None: the default of the reference entry point for the mode, 0.6 in CDF mode
  (``spas_sage2_attn_meansim_cuda``) and -0.1 in top-k mode (``..._topk_cuda``), where -0.1 turns the
  guard off (similarities of unit vectors' means are >= 0). Set it to use the guard in top-k mode.
* ``smooth_k`` True, ``attention_sink`` False (reference defaults); blocks 128 x 64 (reference
  ``BLKQ=128, BLKK=64``, our defaults).

Reachable sparsity: top-k mode meets any target exactly when the guard forces nothing; forced blocks
only add density (``extra["forced_fraction"]`` reports their share). At sparsity 0 every tile is
kept. No dense warm-up: the reference does not use one.

FLOPs: attention ``4 * kept token pairs * D``; selection ``2*B*H*N*D`` (pooling) ``+ 6*B*H*N*D``
(normalise, average and square for the guard) ``+ 2*B*H*Mq*Mk*D`` (pooled scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salad_bench.kernels import block_sparse_attention, keep_count, resolve_backend
from salad_bench.kernels.layout import BlockLayout
from salad_bench.kernels.selection import block_scores, pool_blocks, topp_layout
from salad_bench.methods._warmup import WarmupMethod
from salad_bench.methods.base import METHODS, AttnContext, BlockSparseConfig, check_range

# The reference marks excluded key blocks with -inf before its softmax; a finite stand-in keeps rows
# whose key blocks are all excluded (they are all forced anyway) free of NaN.
_EXCLUDED = -1e30


@dataclass(frozen=True)
class SpargeConfig(BlockSparseConfig):
    cdf_threshold: float | None = None
    sim_threshold: float | None = None
    smooth_k: bool = True
    attention_sink: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cdf_threshold is not None:
            check_range("cdf_threshold", self.cdf_threshold, 0.0, 1.0, lo_open=True)
        if self.sim_threshold is not None:
            check_range("sim_threshold", self.sim_threshold, -1.0, 1.0)

    @property
    def resolved_sim_threshold(self) -> float:
        if self.sim_threshold is not None:
            return self.sim_threshold
        return 0.6 if self.cdf_threshold is not None else -0.1


def self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the tokens of each block, ``(B, H, ceil(N/block))`` fp32."""
    unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return pool_blocks(unit, block).pow(2).sum(-1)


@METHODS.register("sparge", family="training_free")
class Sparge(WarmupMethod):
    """Pooled block scores, self-similarity guard, top-k or CDF selection (arXiv 2502.18137)."""

    Config = SpargeConfig
    family = "training_free"
    config: SpargeConfig

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout:
        c = self.config
        n = q.shape[2]
        theta = c.resolved_sim_threshold
        ks = k - k.mean(dim=2, keepdim=True) if c.smooth_k else k
        sim_q = self_similarity(q, c.block_q) > theta  # (B, H, Mq)
        sim_k = self_similarity(ks, c.block_k) > theta  # (B, H, Mk)
        scores = block_scores(q, k, c.block_q, c.block_k).masked_fill(~sim_k[:, :, None, :], _EXCLUDED)
        force = ~sim_k[:, :, None, :] | ~sim_q[:, :, :, None]
        if c.attention_sink:
            force = force.clone()
            force[..., 0] = True
        self._report_extra = {
            "mode": "cdf" if c.cdf_threshold is not None else "topk",
            "sim_threshold": theta,
            "forced_fraction": float(force.float().mean().item()),
        }
        if c.cdf_threshold is not None:
            return topp_layout(scores, c.cdf_threshold, n, c.block_q, c.block_k, force)
        keep = keep_count(c.sparsity, scores.shape[-1])
        idx = torch.topk(scores, keep, dim=-1, sorted=False).indices
        tiles = torch.zeros_like(force).scatter_(-1, idx, True) | force
        return BlockLayout.from_dense(tiles, c.block_q, c.block_k, n)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        layout = self.select(q, k, ctx)
        backend = resolve_backend(self.config.backend, q.device)
        out = block_sparse_attention(q, k, v, layout, backend=backend)
        b, h, n, d = q.shape
        sel = 8.0 * b * h * n * d + 2.0 * b * h * layout.num_q_blocks * layout.num_k_blocks * d
        self._record(layout, backend, ctx, False, selection=sel)
        return out
