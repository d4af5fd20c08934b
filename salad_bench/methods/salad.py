"""``salad``: sparse attention + a parallel linear-attention branch + an input-dependent gate.

Paper: "SALAD" (arXiv 2601.16515); no public code, so every detail below that the paper leaves open is
a knob with a documented default (REFERENCE.md section 3).

    O = O_sparse + G(x) * Proj(O_linear)        (then the layer's usual output projection)

* Sparse branch (``sparse``, default ``topk``): any registered block-sparse method; ``sta`` gives the
  paper's ST-SWA variant. ``sparsity`` is passed through to it. It sees the model's q, k (rotated by the
  model's RoPE in a DiT).
* Linear branch: feature map ``feature_map`` (paper: ReLU) on the *shared* Q/K (``shared_qkv``), with
  3D RoPE applied inside the branch (``rope``; the paper's ablation says it helps). RoPE is applied
  once: in a DiT the branch takes q, k from *before* the model's RoPE (``AttnContext.q_unrotated``,
  which the Wan integration hands over because this method sets ``wants_unrotated_qk``) and rotates
  them itself, so ``rope=False`` (``salad_no_rope``) is a branch with no RoPE at all. On bare Q/K/V
  (no model RoPE) the branch rotates the q, k it is given. The normaliser uses the un-rotated features
  (our reading; see :func:`kernels.reference.linear_attention_ref`).
* ``Proj``: a full-width C x C linear layer (C = heads * head_dim), zero-initialised
  (``proj_init="zero"``) so the untrained model is exactly the pure-sparse model. One such layer per
  block is the +4.99% parameters the paper reports for Wan2.1-1.3B.
* Gate ``G`` (``gate``) multiplies the projected branch, bias included: ``dynamic`` = sigmoid(Linear(x));
  ``static`` = one learned scalar per layer; ``static_dynamic`` = a learned per-layer scalar times
  learned per-head scales times the dynamic gate (our reading of v2's "multi-level static-dynamic
  scaling"); ``none`` = 1.
* ``gate_granularity`` (the dynamic gate's shape; REFERENCE.md: "input pooling and granularity
  unconfirmed"): ``sample`` (default: the paper's "input-dependent scalar" read as one scalar per sample
  and layer, from the token mean of x: Linear(C, 1)); ``head`` (one per sample and head from the same
  pooled x: Linear(C, H)); ``token`` (one per token: sigmoid(Linear(C, 1)) of each token's x) and
  ``token_head`` (one per token and head: Linear(C, H)). ``sample`` and ``head`` gates fold into the
  projection's rows and bias (one GEMM with the sparse output as its accumulator); token gates do not
  fold, so the projected branch is scaled after the GEMM (one more pass over (B, N, C)).
* ``x`` is the layer input from ``AttnContext.hidden_states`` when the caller has it (the DiT path);
  on bare Q/K/V workloads the gate reads the merged queries instead, and ``shared_qkv=False`` gives the
  branch its own per-head D x D maps of q, k, v (identity-initialised) rather than C x C maps of x.

Ablations are registered variants at the bottom of this file.
FLOPs: sparse branch as reported by it; linear branch ``4*B*H*N*D^2`` (+ normaliser and RoPE);
projection ``2*B*N*C^2``; gate: pooling ``B*N*C`` + ``2*B*C*k`` (k = 1 or H) + the fold ``B*C*(C+1)``
for pooled gates, ``2*B*N*C*k`` + the scaling ``B*N*C`` for token gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from salad_bench.kernels import linear_attention
from salad_bench.kernels.layout import BlockLayout
from salad_bench.kernels.rope import rope_3d_freqs
from salad_bench.methods.base import (
    METHODS,
    AttentionMethod,
    AttnContext,
    MethodConfig,
    MethodReport,
    check_choice,
    check_range,
    check_sparse_knobs,
    create_method,
)

GateKind = Literal["dynamic", "static", "static_dynamic", "none"]
GateGranularity = Literal["sample", "head", "token", "token_head"]
GATE_GRANULARITIES: tuple[str, ...] = ("sample", "head", "token", "token_head")


@dataclass(frozen=True)
class SaladConfig(MethodConfig):
    sparse: str = "topk"
    sparse_knobs: tuple[tuple[str, Any], ...] = ()
    linear: bool = True
    feature_map: Literal["relu", "elu", "softmax"] = "relu"
    rope: bool = True
    gate: GateKind = "dynamic"
    gate_granularity: GateGranularity = "sample"
    shared_qkv: bool = True
    proj_init: Literal["zero", "random"] = "zero"
    drop_fraction: float = 0.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("feature_map", self.feature_map, ("relu", "elu", "softmax"))
        check_choice("gate", self.gate, ("dynamic", "static", "static_dynamic", "none"))
        check_choice("gate_granularity", self.gate_granularity, GATE_GRANULARITIES)
        if self.gate_granularity != "sample" and self.gate not in ("dynamic", "static_dynamic"):
            raise ValueError(
                f"gate_granularity={self.gate_granularity!r} shapes the dynamic gate, but gate={self.gate!r} has none; "
                "use gate='dynamic' or 'static_dynamic', or gate_granularity='sample'"
            )
        check_choice("proj_init", self.proj_init, ("zero", "random"))
        check_sparse_knobs(self.sparse_knobs)
        check_range("drop_fraction", self.drop_fraction, 0.0, 1.0, hi_open=True)
        check_range("eps", self.eps, 0.0, 1.0, lo_open=True)
        if self.sparse.startswith("salad"):
            raise ValueError(f"sparse={self.sparse!r}: the sparse branch must be a plain sparse method, not SALAD")


@METHODS.register("salad", family="salad", traits=("trainable", "headline"))
class Salad(AttentionMethod):
    """Sparse branch + gated, projected linear-attention branch (arXiv 2601.16515)."""

    Config = SaladConfig
    family = "salad"
    config: SaladConfig

    def __init__(self, config: SaladConfig, **kw) -> None:
        super().__init__(config, **kw)
        c, h, d = config, self.num_heads, self.head_dim
        width = h * d
        self.sparse = create_method(c.sparse, num_heads=h, head_dim=d, sparsity=c.sparsity, **dict(c.sparse_knobs))
        self.proj = nn.Linear(width, width)
        if c.proj_init == "zero":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        if c.gate in ("dynamic", "static_dynamic"):
            per_head = c.gate_granularity in ("head", "token_head")
            self.gate_proj = nn.Linear(width, h if per_head else 1)
            nn.init.zeros_(self.gate_proj.weight)
            nn.init.zeros_(self.gate_proj.bias)  # sigmoid(0) = 0.5 at the start
        if c.gate in ("static", "static_dynamic"):
            self.layer_scale = nn.Parameter(torch.ones(()))
        if c.gate == "static_dynamic":
            self.head_scale = nn.Parameter(torch.ones(h))
        if not c.shared_qkv:
            eye = torch.eye(d).expand(3, h, d, d).clone()
            self.qkv_maps = nn.Parameter(eye)  # (3, H, D, D): the branch's own q, k, v maps
        self.linear_enabled = c.linear
        self.register_buffer("gate_mean", torch.zeros(()), persistent=True)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- pieces ---------------------------------------------------------------------------------
    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout | None:
        return self.sparse.select(q, k, ctx)

    def _rope(self, grid: tuple[int, int, int] | None, device: torch.device, order: torch.Tensor | None = None):
        """The branch's 3D RoPE tables ``(N, D/2)`` for ``grid``, rows in the tokens' order (``order``:
        ``AttnContext.token_order``, the sparse branch's own order, or None for raster)."""
        if not self.config.rope or grid is None:
            return None, None

        def tables():
            cos, sin = rope_3d_freqs(grid, self.head_dim, device)
            return (cos, sin) if order is None else (cos.index_select(0, order), sin.index_select(0, order))

        if torch.compiler.is_compiling():  # in the graph: a cache lookup there would be a guard, and a recompile
            return tables()
        key = (grid, device, order is not None)  # only the sparse branch's one order is ever passed
        if key not in self._rope_cache:
            self._rope_cache[key] = tables()
        return self._rope_cache[key]

    def token_order(self, grid, n: int, device) -> torch.Tensor | None:
        """The sparse branch's order (``salad_sta``: STA's tiles). The linear branch follows it (its RoPE
        tables permuted alike; the linear attention itself sums over every key), the gate pools over
        tokens or is per token, and the projection is per token."""
        return self.sparse.token_order(grid, n, device)

    @property
    def wants_unrotated_qk(self) -> bool:  # type: ignore[override]
        """The linear branch applies its own RoPE (or none) to q, k from before the model's RoPE."""
        return self.linear_enabled

    def gate_value(self, q: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """The gate: ``(B, H)`` per (sample, head) for pooled gates, ``(B, N, H)`` per token for
        ``gate_granularity`` ``token``/``token_head`` (float32, float64 for float64 inputs)."""
        b, h, n, _ = q.shape
        c = self.config
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        g = torch.ones(b, h, device=q.device, dtype=work)
        if c.gate in ("dynamic", "static_dynamic"):
            x = ctx.hidden_states
            wdt = self.gate_proj.weight.dtype
            if c.gate_granularity in ("token", "token_head"):
                x = x if x is not None else q.transpose(1, 2).reshape(b, n, -1)
                g = torch.sigmoid(self.gate_proj(x.to(wdt)).to(work)).expand(b, n, h)  # (B, N, 1 or H)
            else:
                # mean in `work` precision without a converted copy of the (B, N, C) input
                pooled = x.mean(dim=1, dtype=work) if x is not None else q.mean(dim=2, dtype=work).reshape(b, -1)
                g = torch.sigmoid(self.gate_proj(pooled.to(wdt)).to(work)).expand(b, h)  # (B, 1 or H)
        if c.gate in ("static", "static_dynamic"):
            g = g * self.layer_scale.to(work)
        if c.gate == "static_dynamic":
            g = g * self.head_scale.to(work)
        return g

    def linear_branch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """The branch's output ``(B, H, N, D)`` before ``Proj``. RoPE once: on the model's q, k from before
        its own RoPE when the caller has them, else on the q, k given (bare Q/K/V carry no RoPE)."""
        q = ctx.q_unrotated if ctx.q_unrotated is not None else q
        k = ctx.k_unrotated if ctx.k_unrotated is not None else k
        if not self.config.shared_qkv:
            m = self.qkv_maps.to(q.dtype)
            q = torch.einsum("bhnd,hde->bhne", q, m[0])
            k = torch.einsum("bhnd,hde->bhne", k, m[1])
            v = torch.einsum("bhnd,hde->bhne", v, m[2])
        cos, sin = self._rope(ctx.grid, q.device, ctx.token_order)
        return linear_attention(q, k, v, kind=self.config.feature_map, cos=cos, sin=sin, eps=self.config.eps)

    # -- forward --------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if not self.linear_enabled:
            return self.sparse(q, k, v, ctx)
        out_l = self.linear_branch(q, k, v, ctx)
        g = self.gate_value(q, ctx)  # (B, H) or (B, N, H)
        if not self.training:  # in place: a new tensor would change the buffer a compiled graph guards on
            self.gate_mean.copy_(g.detach().mean())
        # out_s + g * Proj(out_l): the sparse branch adds the gated projection in its kernel's epilogue where
        # it can (inference), after otherwise
        return self.sparse(q, k, v, ctx, residual=self.project(out_l, g))

    def own_work(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor | None:
        """The gated, projected linear branch, as :meth:`attend` computes it before the sparse kernel adds it."""
        return self.project(self.linear_branch(q, k, v, ctx), self.gate_value(q, ctx)) if self.linear_enabled else None

    def project(self, out_l: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g * Proj(out_l)``, the gate on each output head, bias included: ``(B, H, N, D)``, a view of a
        token-major ``(B, N, H, D)`` buffer (the layout the model's output projection reads)."""
        b, h, n, d = out_l.shape
        c = h * d
        w, bias = self.proj.weight, self.proj.bias
        merged = out_l.transpose(1, 2).reshape(b, n, c)
        if g.dim() == 3 or w.dtype != out_l.dtype:
            # Token gates do not fold into the weight, and a method kept in another precision than its
            # inputs (mixed-precision training) projects in its own: scale the projected branch after the GEMM.
            projected = nn.functional.linear(merged.to(w.dtype), w, bias).view(b, n, h, d)
            gate = (g[..., None] if g.dim() == 3 else g[:, None, :, None]).to(w.dtype)
            return (projected * gate).to(out_l.dtype).transpose(1, 2)
        # A per-(sample, head) gate on the projection's output folds into the weight's rows and the bias:
        # g * (W o + b) = (g W) o + g b, one GEMM with the gated bias as its epilogue.
        rows = g.to(w.dtype).repeat_interleave(d, dim=1)  # (B, C_out): each output channel's head gate
        wg = w[None] * rows[:, :, None]  # (B, C_out, C_in)
        bg = bias[None] * rows  # (B, C_out)
        if b == 1:
            projected = torch.addmm(bg, merged[0], wg[0].t())[None]
        else:
            projected = torch.baddbmm(bg[:, None, :], merged, wg.transpose(1, 2))
        return projected.view(b, n, h, d).transpose(1, 2)

    def report(self) -> MethodReport:
        rep = self.sparse.report()
        b, h, n, d = self._shape  # type: ignore[misc]
        flops = dict(rep.flops)
        cfg = self.config
        if self.linear_enabled:
            c = h * d
            flops["linear"] = 4.0 * b * h * n * d * d + 2.0 * b * h * n * d + (12.0 * b * h * n * d if cfg.rope else 0.0)
            flops["projection"] = 2.0 * b * n * c * c
            if cfg.gate in ("dynamic", "static_dynamic"):
                k = h if cfg.gate_granularity in ("head", "token_head") else 1
                if cfg.gate_granularity in ("token", "token_head"):
                    flops["gate"] = 2.0 * b * n * c * k + b * n * c
                else:
                    flops["gate"] = b * n * c + 2.0 * b * c * k + b * c * (c + 1)
            if not cfg.shared_qkv:
                flops["linear_qkv"] = 3 * 2.0 * b * h * n * d * d
        extra = {**rep.extra, "linear": self.linear_enabled, "sparse_branch": cfg.sparse,
                 "gate_granularity": cfg.gate_granularity}
        return MethodReport(density=rep.density, flops=flops, backend=rep.backend, extra=extra)

    def extra_parameters(self) -> int:
        """Parameters SALAD adds on top of the sparse branch (the paper's +4.99% on Wan2.1-1.3B)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("sparse."))


def drop_weakest_linear_branches(modules: list[Salad], fraction: float) -> list[int]:
    """After training, switch off the linear branch of the ``fraction`` of layers with the smallest
    recorded mean gate (the paper drops ~20%). Returns the indices dropped."""
    check_range("fraction", fraction, 0.0, 1.0)
    order = sorted(range(len(modules)), key=lambda i: float(modules[i].gate_mean))
    dropped = order[: int(round(fraction * len(modules)))]
    for i in dropped:
        modules[i].linear_enabled = False
    return sorted(dropped)


METHODS.register_variant("salad_sta", "salad", sparse="sta", description="SALAD on the paper's ST-SWA sliding window")
METHODS.register_variant("salad_no_gate", "salad", traits=("trainable",), family="ablation", gate="none", description="ablation: gate fixed at 1")
METHODS.register_variant("salad_no_linear", "salad", traits=("trainable",), family="ablation", linear=False, description="ablation: sparse branch only")
METHODS.register_variant("salad_no_rope", "salad", traits=("trainable",), family="ablation", rope=False, description="ablation: no RoPE in the linear branch")
METHODS.register_variant(
    "salad_separate_qkv", "salad", traits=("trainable",), family="ablation", shared_qkv=False, description="ablation: linear branch has its own Q/K/V maps"
)
METHODS.register_variant("salad_static_gate", "salad", traits=("trainable",), family="ablation", gate="static", description="ablation: learned static scale, no input dependence")
METHODS.register_variant("salad_v2", "salad", traits=("trainable",), gate="static_dynamic", description="v2-style static x dynamic scaling")
METHODS.register_variant(
    "salad_head_gate", "salad", traits=("trainable",), family="ablation", gate_granularity="head", description="ablation: one gate per sample and head"
)
METHODS.register_variant(
    "salad_token_gate", "salad", traits=("trainable",), family="ablation", gate_granularity="token", description="ablation: one gate per token"
)
METHODS.register_variant(
    "salad_drop20", "salad", traits=("trainable",), family="ablation", drop_fraction=0.2, description="after training, drop 20% of linear branches (smallest gates)"
)
