"""``sparse_lora``: a registered sparse method plus LoRA adapters, the LoRA baseline of SALAD's ablations.

Paper: SALAD (arXiv 2601.16515) compares its linear branch against fine-tuning the sparse model with
LoRA instead (REFERENCE.md section 3: "LoRA at 77.4% sparsity still loses quality"); LoRA itself is
Hu et al., arXiv 2106.09685. Layout ``(B, H, N, D)`` in and out.

In a DiT, LoRA adapts the attention projections ``to_q``, ``to_k``, ``to_v`` and ``to_out``
(:func:`lora_targets`); the DiT integration wraps those ``nn.Linear`` layers with
:func:`add_lora_to_linear`. The bare-QKV harness has no projection to adapt, so this method applies
the same low-rank updates per head to what the projections would have produced:

    q' = q + s * B_q A_q q,   k' = k + s * B_k A_k k,   v' = v + s * B_v A_v v
    O  = o + s * B_o A_o o,   o = sparse(q', k', v')

with ``A`` ``(rank, D)`` and ``B`` ``(D, rank)`` per head and target, ``s = alpha / rank``. ``A`` is
drawn like PEFT's default (kaiming-uniform with ``a = sqrt(5)``, i.e. U(-1/sqrt(D), 1/sqrt(D))) and
``B`` is zero, so the untrained method is exactly the plain sparse method. The adapted q and k also
drive the sparse method's block selection, as they would in the DiT.

Knobs (defaults, provenance): ``sparse`` "topk" (any registered method except ``sparse_lora*``;
``sparse_knobs`` are passed to it; ``sparsity`` is passed through, so the mask rule, density and its
reachable range are the sub-method's); ``rank`` 16 (the brief; FastVideo's LoRA examples use 16-32);
``alpha`` None = ``rank``, scale 1 (FastVideo's ``LoraConfig``: "defaults to rank when omitted");
``targets`` ("q", "k", "v", "out") (FastVideo's attention targets ``to_q/to_k/to_v/to_out``).

What trains (:meth:`SparseLoRA.trainable_parameters`): the LoRA factors ``A`` and ``B`` of every
target, nothing else (the sub-method's own parameters, if it has any, stay frozen).

FLOPs: the sparse method's own report, plus ``lora`` = ``4 * B*H*N*D*rank`` per target (two thin
matmuls each) + ``B*H*N*D`` per target for the add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from salad_bench.kernels.layout import BlockLayout
from salad_bench.methods.base import (
    METHODS,
    AttentionMethod,
    AttnContext,
    MethodConfig,
    MethodReport,
    check_count,
    check_range,
    create_method,
)

__all__ = ["HeadLoRA", "LoRALinear", "SparseLoRA", "SparseLoRAConfig", "add_lora_to_linear", "lora_targets"]

TARGETS = ("q", "k", "v", "out")


def lora_targets() -> tuple[str, ...]:
    """Module names the DiT integration adapts (diffusers ``WanAttention``: ``attn1.to_q`` ...).

    ``to_out.0`` is the output linear inside diffusers' ``to_out`` ModuleList (index 1 is dropout).
    This bare-QKV method adapts q, k, v and the attention output per head instead (module docstring).
    """
    return ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class SparseLoRAConfig(MethodConfig):
    sparse: str = "topk"
    sparse_knobs: tuple[tuple[str, Any], ...] = ()
    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("rank", self.rank, 1, 1024)
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0.0, 1e6, lo_open=True)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets={self.targets!r} must be a non-empty subset of {TARGETS} without repeats")
        if self.sparse.startswith("sparse_lora"):
            raise ValueError(f"sparse={self.sparse!r}: the sparse method must not itself be sparse_lora")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with ``base`` frozen, ``A`` kaiming-uniform, ``B`` zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        check_range("rank", rank, 1, min(base.in_features, base.out_features))
        self.base = base
        base.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # PEFT's default for A
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_a, self.lora_b]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"


def add_lora_to_linear(linear: nn.Linear, rank: int, alpha: float | None = None) -> LoRALinear:
    """Wrap ``linear`` (frozen) with a zero-initialised LoRA update; the result is a drop-in module.

    ``alpha`` None means ``alpha = rank`` (scale 1). The output equals ``linear(x)`` until ``B`` trains.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"add_lora_to_linear takes an nn.Linear, got {type(linear).__name__}")
    return LoRALinear(linear, rank, alpha)


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


@METHODS.register("sparse_lora", family="trained")
class SparseLoRA(AttentionMethod):
    """A sparse method fine-tuned with LoRA on q, k, v and the output (SALAD's LoRA baseline)."""

    Config = SparseLoRAConfig
    family = "trained"
    config: SparseLoRAConfig

    def __init__(self, config: SparseLoRAConfig, **kw) -> None:
        super().__init__(config, **kw)
        c, h, d = config, self.num_heads, self.head_dim
        if c.rank > d:
            raise ValueError(f"rank={c.rank} is out of range; valid range is [1, {d}] (head_dim)")
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        out = self.sparse(self._adapt("q", q), self._adapt("k", k), self._adapt("v", v), ctx)
        return self._adapt("out", out)

    def report(self) -> MethodReport:
        rep = self.sparse.report()
        b, h, n, d = self._shape  # type: ignore[misc]
        flops = dict(rep.flops)
        flops["lora"] = len(self.lora) * (4.0 * b * h * n * d * self.config.rank + 1.0 * b * h * n * d)
        return MethodReport(density=rep.density, flops=flops, backend=rep.backend, extra=dict(rep.extra))
