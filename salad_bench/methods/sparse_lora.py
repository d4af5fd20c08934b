"""``sparse_lora``: a registered sparse method plus LoRA on the attention projections, SALAD's LoRA baseline.

Paper: SALAD (arXiv 2601.16515) compares its linear branch against fine-tuning the sparse model with
LoRA instead (REFERENCE.md section 3: "LoRA at 77.4% sparsity still loses quality"); LoRA itself is
Hu et al., arXiv 2106.09685. Layout ``(B, H, N, D)`` in and out.

The attention call is exactly the sparse method (same mask rule, density and kernel). The LoRA lives on
the layer's projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` (diffusers' Wan names): this
method asks for them through :attr:`wants_projection_lora` (a :class:`~methods.base.ProjectionLoRA`)
and a model integration that has projections installs standard ``peft`` LoRA layers there (the Wan
integration does: ``harness.integrations.lora``), zero-initialised ``B`` and PEFT's default ``A``, so
the untrained model is exactly the plain sparse model, and hands their parameters back
(:meth:`attach_projection_lora`). The adapted q, k then also drive the sparse method's block
selection, as in any fine-tuned model. On bare Q/K/V workloads there are no projections: the method is
its sparse method and nothing else, and its report says where the LoRA would live.

Knobs (defaults, provenance): ``sparse`` "topk" (any registered method except the LoRA variants;
``sparse_knobs`` are passed to it; ``sparsity`` is passed through, so the mask rule, density and its
reachable range are the sub-method's); ``rank`` 16 (the brief; FastVideo's LoRA examples use 16-32),
at most C = heads * head_dim; ``alpha`` None = ``rank``, scale 1 (FastVideo's ``LoraConfig``:
"defaults to rank when omitted"); ``targets`` ("q", "k", "v", "out") (FastVideo's attention targets
``to_q/to_k/to_v/to_out``).

What trains (:meth:`SparseLoRA.trainable_parameters`): the LoRA factors the integration installed,
nothing else (the sub-method's own parameters, if it has any, stay frozen); none on bare Q/K/V.

FLOPs: the sparse method's own report, plus ``lora_projections`` where the adapters are installed:
``2*B*N*rank*(in + out)`` per adapted layer (two thin matmuls) + ``2*B*N*out`` (scale and add). They
run in the projections, outside the attention call the harness times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from salad_bench.kernels.layout import BlockLayout
from salad_bench.methods.base import (
    METHODS,
    PROJECTIONS,
    AttentionMethod,
    AttnContext,
    MethodConfig,
    MethodReport,
    ProjectionLoRA,
    check_count,
    check_range,
    check_sparse_knobs,
    create_method,
)

__all__ = ["SparseLoRA", "SparseLoRAConfig"]

LORA_METHODS = ("sparse_lora", "sparse_headlora")


@dataclass(frozen=True)
class SparseLoRAConfig(MethodConfig):
    """Knobs of the LoRA baselines (``sparse_lora``, and the per-head ablation ``sparse_headlora``)."""

    sparse: str = "topk"
    sparse_knobs: tuple[tuple[str, Any], ...] = ()
    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("rank", self.rank, 1)  # the upper bound depends on the shape: checked by each method
        check_sparse_knobs(self.sparse_knobs)
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0.0, 1e6, lo_open=True)
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets={self.targets!r} must be a non-empty subset of {PROJECTIONS} without repeats")
        if self.sparse.startswith(LORA_METHODS):
            raise ValueError(f"sparse={self.sparse!r}: the sparse method must be a plain sparse method, not {self.sparse}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


@METHODS.register("sparse_lora", family="trained", traits=("trainable", "headline"))
class SparseLoRA(AttentionMethod):
    """A sparse method fine-tuned with LoRA on the attention projections (SALAD's LoRA baseline)."""

    Config = SparseLoRAConfig
    family = "trained"
    config: SparseLoRAConfig

    def __init__(self, config: SparseLoRAConfig, **kw) -> None:
        super().__init__(config, **kw)
        c, h, d = config, self.num_heads, self.head_dim
        check_count("rank", c.rank, 1, h * d)  # at most the projections' width C = heads * head_dim
        self.sparse = create_method(c.sparse, num_heads=h, head_dim=d, sparsity=c.sparsity, **dict(c.sparse_knobs))
        self.sparse.requires_grad_(False)
        self.needs_grid = self.sparse.needs_grid  # instance attribute shadows the ClassVar

    @property
    def wants_projection_lora(self) -> ProjectionLoRA:  # type: ignore[override]
        c = self.config
        return ProjectionLoRA(rank=c.rank, alpha=c.lora_alpha, targets=tuple(c.targets))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What trains: the LoRA factors installed on the projections (none on bare Q/K/V)."""
        return [] if self._projection_lora is None else list(self._projection_lora[0])

    def select(self, q, k, ctx: AttnContext) -> BlockLayout | None:
        return self.sparse.select(q, k, ctx)

    def attend(self, q, k, v, ctx: AttnContext):
        return self.sparse(q, k, v, ctx)

    def report(self) -> MethodReport:
        rep = self.sparse.report()
        b, _, n, _ = self._shape  # type: ignore[misc]
        flops, extra = dict(rep.flops), dict(rep.extra)
        targets = ",".join(self.config.targets)
        if self._projection_lora is None:
            extra["lora"] = f"on the projections ({targets}); none installed here (bare Q/K/V has no projections)"
        else:
            r = self.config.rank
            features = self._projection_lora[1]
            flops["lora_projections"] = sum(2.0 * b * n * r * (i + o) + 2.0 * b * n * o for i, o in features)
            extra["lora"] = f"on the projections ({targets}), installed by the model integration"
        return MethodReport(density=rep.density, flops=flops, backend=rep.backend, extra=extra)
