"""``sparse_headlora`` (ablation): a sparse method plus per-head low-rank updates inside the attention call.

Not LoRA as the peers and SALAD's ablation use it (that is ``sparse_lora``: LoRA on the projections
``to_q/to_k/to_v/to_out``). This variant needs no projections, so it runs on bare Q/K/V too: it adapts
what the attention call receives (in a DiT: q and k after the model's RoPE) and what it returns, per
head, and it is kept as a cheap ablation of where the adapters sit. Layout ``(B, H, N, D)``.

    q' = q + s * B_q A_q q,   k' = k + s * B_k A_k k,   v' = v + s * B_v A_v v
    O  = o + s * B_o A_o o,   o = sparse(q', k', v')

with ``A`` ``(rank, D)`` and ``B`` ``(D, rank)`` per head and target, ``s = alpha / rank``. ``A`` is
drawn like PEFT's default (kaiming-uniform with ``a = sqrt(5)``, i.e. U(-1/sqrt(D), 1/sqrt(D))) and
``B`` is zero, so the untrained method is exactly the plain sparse method. The adapted q and k also
drive the sparse method's block selection.

Knobs: those of ``sparse_lora`` (:class:`~methods.sparse_lora.SparseLoRAConfig`), with ``rank`` at most
``head_dim``. What trains (:meth:`SparseHeadLoRA.trainable_parameters`): the factors ``A`` and ``B`` of
every target. FLOPs: the sparse method's report plus ``lora`` = ``4*B*H*N*D*rank`` per target (two thin
matmuls) + ``B*H*N*D`` per target for the add.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from salad_bench.kernels.layout import BlockLayout
from salad_bench.methods.base import METHODS, AttentionMethod, AttnContext, MethodReport, check_count, create_method
from salad_bench.methods.sparse_lora import SparseLoRAConfig

__all__ = ["HeadLoRA", "SparseHeadLoRA"]


class HeadLoRA(nn.Module):
    """Per-head low-rank residual update of a ``(B, H, N, D)`` tensor: ``x + s * B_h A_h x``."""

    def __init__(self, num_heads: int, dim: int, rank: int, scale: float) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)  # kaiming-uniform(a=sqrt(5)) with fan_in = D, per head
        self.a = nn.Parameter(torch.empty(num_heads, rank, dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(num_heads, dim, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        low = torch.einsum("bhnd,hrd->bhnr", x, a)
        return x + torch.einsum("bhnr,hdr->bhnd", low, b) * self.scale


@METHODS.register("sparse_headlora", family="ablation", traits=("trainable",))
class SparseHeadLoRA(AttentionMethod):
    """A sparse method with per-head low-rank updates of q, k, v and its output (ablation of sparse_lora)."""

    Config = SparseLoRAConfig
    family = "ablation"
    config: SparseLoRAConfig

    def __init__(self, config: SparseLoRAConfig, **kw) -> None:
        super().__init__(config, **kw)
        c, h, d = config, self.num_heads, self.head_dim
        check_count("rank", c.rank, 1, d)  # per head: at most head_dim
        self.sparse = create_method(c.sparse, num_heads=h, head_dim=d, sparsity=c.sparsity, **dict(c.sparse_knobs))
        self.sparse.requires_grad_(False)
        self.needs_grid = self.sparse.needs_grid  # instance attribute shadows the ClassVar
        self.lora = nn.ModuleDict({t: HeadLoRA(h, d, c.rank, c.scale) for t in c.targets})

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What trains: the LoRA factors of every target (``A`` and ``B``)."""
        return [p for m in self.lora.values() for p in (m.a, m.b)]

    def _adapt(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora[name](x) if name in self.lora else x

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout | None:
        return self.sparse.select(self._adapt("q", q), self._adapt("k", k), ctx)

    def own_work(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> list[torch.Tensor]:
        """The low-rank updates of v and of the output (on a tensor of the output's shape); those of q and k
        are inside :meth:`select`, and so in its time."""
        return [self._adapt("v", v), self._adapt("out", v)]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        out = self.sparse(self._adapt("q", q), self._adapt("k", k), self._adapt("v", v), ctx)
        return self._adapt("out", out)

    def report(self) -> MethodReport:
        rep = self.sparse.report()
        b, h, n, d = self._shape  # type: ignore[misc]
        flops = dict(rep.flops)
        flops["lora"] = len(self.lora) * (4.0 * b * h * n * d * self.config.rank + 1.0 * b * h * n * d)
        return MethodReport(density=rep.density, flops=flops, backend=rep.backend, extra=dict(rep.extra))
