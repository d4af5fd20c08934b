"""``sla``: Sparse-Linear Attention, exact attention on critical tiles + linear attention on marginal ones.

Paper: "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention"
(arXiv 2509.24006); public code thu-ml/SLA (``sparse_linear_attention/``, branches ``main`` and
``SLA-1``), read for the details below. Layout ``(B, H, N, D)`` in and out (tokens in any order).

    O = O_sparse + Proj(O_linear)

* Classification (mask rule): mean-pool Q and K per block (``block_q`` x ``block_k``; the ragged last
  block is averaged over its tokens), with K first centred over the sequence (``smooth_k``, the repo's
  SageAttention trick); score block pairs ``softmax(Pq Pk^T / sqrt(D))`` per query block. Per
  (batch, head, query block), key blocks ranked by that score are *critical* (the top
  ``keep_count(sparsity, Mk) = ceil((1 - sparsity) * Mk)``, at least one), *negligible* (the bottom
  ``floor(negligible * Mk)``, never eating into the critical ones) or *marginal* (the rest). Softmax is
  monotone per row, so ranks come straight from the logits.
* ``O_sparse``: exact softmax attention over the critical tiles (:func:`kernels.block_sparse_attention`).
* ``O_linear``: linear attention of each query over the keys of its query block's *marginal* blocks
  only: ``phi(q_i)^T S / (phi(q_i)^T z + eps)`` with ``S = sum phi(k_j) v_j^T``, ``z = sum phi(k_j)``
  over those keys (:func:`marginal_linear_attention`; per-key-block states summed through the tile map,
  nothing N x N). A query block with no marginal block gets ``O_linear = 0``.
* ``Proj``: a learnable linear, zero-initialised (weight and bias), no gate, so the untrained method is
  exactly the sparse branch. ``proj="head"`` (default) is the repo's ``proj_l = nn.Linear(head_dim,
  head_dim)`` shared by all heads; ``proj="model"`` is a C x C linear over merged heads (C = H*D), the
  width SALAD's projection has (variant ``sla_proj_model``).

Knobs (defaults, provenance):
``sparsity`` 0.95, i.e. 5% critical (paper's ``k_h``; the repo's ``topk`` is ``1 - sparsity``);
``negligible`` 0.10 (paper's ``k_l``; the repo's kernels skip nothing, i.e. ``negligible=0``: every
non-critical block is linear on ``SLA-1``, and ``main`` runs the linear branch over all keys);
``feature_map`` "softmax" (repo default; "elu" = elu+1, "relu"); ``block_q`` x ``block_k`` 64 x 64
(repo default; its kernel accepts 128 x 64 too, variant ``sla_b128`` = our kernel's tile);
``smooth_k`` True (repo); ``proj`` "head" (repo); ``eps`` 1e-5 (repo's ``calc_linear``); ``backend`` auto.
Deviation: the repo keeps ``int(topk * Mk)`` critical blocks (can be 0); we keep ``ceil``, at least 1,
the harness-wide :func:`kernels.keep_count`.

``sparsity`` is the fraction of tiles *not* computed exactly, so ``density`` (measured from the
critical layout) is ``1 - sparsity`` up to rounding; the marginal and negligible fractions go in
``report().extra``. Reachable: any ``sparsity`` in [0, 1) down to one critical block per query block.

What trains (:meth:`SLA.trainable_parameters`): ``Proj`` (weight and bias). The paper fine-tunes the
whole DiT as well; those weights belong to the model.

FLOPs: sparse branch ``4 * kept token pairs * D`` (base report); ``selection`` = centring ``2*B*H*N*D``
+ pooling ``2*B*H*N*D`` + block scores ``2*B*H*Mq*Mk*D``; ``linear`` = feature maps ``6*B*H*N*D`` +
key-block states ``2*B*H*N*D*(D+1)`` + tile-map aggregation ``2*B*H*Mq*Mk*D*(D+1)`` + queries
``2*B*H*N*D*(D+1)`` + division ``B*H*N*D``; ``projection`` ``2*B*H*N*D^2`` (head) or ``2*B*N*C^2``
(model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from salad_bench.kernels import block_sparse_attention, keep_count, resolve_backend
from salad_bench.kernels.layout import BlockLayout, cdiv
from salad_bench.kernels.reference import feature_map
from salad_bench.kernels.selection import block_scores
from salad_bench.methods.base import (
    METHODS,
    AttentionMethod,
    AttnContext,
    BlockSparseConfig,
    MethodReport,
    check_choice,
    check_range,
)

__all__ = ["SLA", "SLAConfig", "classify_blocks", "marginal_linear_attention"]


@dataclass(frozen=True)
class SLAConfig(BlockSparseConfig):
    sparsity: float = 0.95
    block_q: int = 64
    block_k: int = 64
    negligible: float = 0.10
    feature_map: Literal["softmax", "elu", "relu"] = "softmax"
    proj: Literal["head", "model"] = "head"
    smooth_k: bool = True
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("negligible", self.negligible, 0.0, 1.0, hi_open=True)
        check_choice("feature_map", self.feature_map, ("softmax", "elu", "relu"))
        check_choice("proj", self.proj, ("head", "model"))
        check_range("eps", self.eps, 0.0, 1.0, lo_open=True)


def classify_blocks(q: torch.Tensor, k: torch.Tensor, cfg: SLAConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Critical key-block indices ``(B, H, Mq, n_crit)`` (ascending), the marginal tile map
    ``(B, H, Mq, Mk)`` (bool) and the number of negligible blocks per query block."""
    kk = k - k.mean(dim=2, keepdim=True) if cfg.smooth_k else k
    scores = block_scores(q, kk, cfg.block_q, cfg.block_k)  # softmax per row is monotone: rank logits
    mk = scores.shape[-1]
    n_crit = keep_count(cfg.sparsity, mk)
    n_neg = min(math.floor(cfg.negligible * mk + 1e-9), mk - n_crit)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    crit = torch.sort(order[..., :n_crit], dim=-1).values
    marginal = torch.ones_like(scores, dtype=torch.bool)
    marginal.scatter_(-1, order[..., :n_crit], False)
    if n_neg:
        marginal.scatter_(-1, order[..., mk - n_neg :], False)
    return crit, marginal, n_neg


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, N, E) -> (B, H, ceil(N/block), block, E)``, zero-padded at the end."""
    b, h, n, e = x.shape
    m = cdiv(n, block)
    return F.pad(x, (0, 0, 0, m * block - n)).reshape(b, h, m, block, e)


def marginal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    marginal: torch.Tensor,
    block_q: int,
    block_k: int,
    kind: str = "softmax",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Linear attention of every query over the keys of its query block's marginal key blocks.

    ``marginal``: bool ``(B, H, Mq, Mk)``. Per key block, the state ``S_j = phi(K_j)^T V_j`` (D x D)
    and normaliser ``z_j = sum phi(K_j)`` are formed once; each query block sums the states of its
    marginal blocks with one ``(Mq x Mk) @ (Mk x D*D)`` product. Memory ``O((Mq + Mk) * D^2)`` per
    (batch, head), never ``N x N``. Computed in fp32 (fp64 for fp64 inputs); output in ``q.dtype``.
    """
    b, h, n, d = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq = feature_map(q.to(work), kind)
    fk = feature_map(k.to(work), kind)  # padding comes after phi: padded keys contribute nothing
    fk_b, v_b = _blocks(fk, block_k), _blocks(v.to(work), block_k)
    states = torch.einsum("bhmtd,bhmte->bhmde", fk_b, v_b)  # (B, H, Mk, D, Dv)
    norms = fk_b.sum(dim=3)  # (B, H, Mk, D)
    tiles = marginal.to(work)
    s_q = torch.einsum("bhqk,bhkde->bhqde", tiles, states)
    z_q = torch.einsum("bhqk,bhkd->bhqd", tiles, norms)
    fq_b = _blocks(fq, block_q)
    num = torch.einsum("bhqtd,bhqde->bhqte", fq_b, s_q)
    den = torch.einsum("bhqtd,bhqd->bhqt", fq_b, z_q).unsqueeze(-1) + eps
    out = (num / den).reshape(b, h, -1, v.shape[-1])[:, :, :n]
    return out.to(q.dtype)


@METHODS.register("sla", family="trained", traits=("trainable", "headline"))
class SLA(AttentionMethod):
    """Sparse-linear attention: critical tiles exact, marginal tiles linear, Proj zero-init (arXiv 2509.24006)."""

    Config = SLAConfig
    family = "trained"
    config: SLAConfig

    def __init__(self, config: SLAConfig, **kw) -> None:
        super().__init__(config, **kw)
        width = self.head_dim if config.proj == "head" else self.num_heads * self.head_dim
        self.proj = nn.Linear(width, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self._fractions: dict[str, float] = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What SLA itself adds and trains: ``Proj`` (weight and bias)."""
        return list(self.proj.parameters())

    def _critical_layout(self, crit: torch.Tensor, n: int) -> BlockLayout:
        cnt = torch.full(crit.shape[:3], crit.shape[-1], dtype=torch.int32, device=crit.device)
        return BlockLayout(crit.to(torch.int32).contiguous(), cnt, self.config.block_q, self.config.block_k, n)

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout:
        """The critical tiles (the exact sparse part)."""
        crit, _, _ = classify_blocks(q.detach(), k.detach(), self.config)
        return self._critical_layout(crit, q.shape[2])

    def project(self, out_l: torch.Tensor) -> torch.Tensor:
        b, h, n, d = out_l.shape
        w = self.proj.weight.dtype
        if self.config.proj == "head":
            return self.proj(out_l.to(w))
        merged = out_l.transpose(1, 2).reshape(b, n, h * d)
        return self.proj(merged.to(w)).view(b, n, h, d).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        c = self.config
        b, h, n, d = q.shape
        crit, marginal, n_neg = classify_blocks(q.detach(), k.detach(), c)
        layout = self._critical_layout(crit, n)
        backend = resolve_backend(c.backend, q.device)
        out_s = block_sparse_attention(q, k, v, layout, backend=backend)
        out_l = marginal_linear_attention(q, k, v, marginal, c.block_q, c.block_k, c.feature_map, c.eps)
        out = out_s + self.project(out_l).to(q.dtype)
        mq, mk = layout.num_q_blocks, layout.num_k_blocks
        self._fractions = {"marginal_fraction": (mk - crit.shape[-1] - n_neg) / mk, "negligible_fraction": n_neg / mk}
        width = h * d
        self._remember(
            layout,
            backend,
            selection=4.0 * b * h * n * d + 2.0 * b * h * mq * mk * d,
            linear=6.0 * b * h * n * d + 2.0 * b * h * (2 * n + mq * mk) * d * (d + 1) + 1.0 * b * h * n * d,
            projection=2.0 * b * h * n * d * d if c.proj == "head" else 2.0 * b * n * width * width,
        )
        return out

    def report(self) -> MethodReport:
        rep = super().report()
        rep.extra.update(self._fractions)
        return rep


METHODS.register_variant(
    "sla_b128", "sla", traits=("trainable",), block_q=128, block_k=64, description="SLA with 128x64 tiles (the repo's benchmark tile)"
)
METHODS.register_variant(
    "sla_proj_model",
    "sla", traits=("trainable",),
    family="ablation",
    proj="model",
    description="ablation: C x C Proj over merged heads (SALAD's width)",
)
METHODS.register_variant(
    "sla_no_negligible",
    "sla", traits=("trainable",),
    family="ablation",
    negligible=0.0,
    description="every non-critical block linear (thu-ml/SLA SLA-1 kernel)",
)
