"""The interface every attention method implements, and the registry that names them.

Tensor layout at the boundary: ``q, k, v`` are ``(B, H, N, D)`` (batch, heads, tokens, head_dim);
tokens are the video latent in t-major order over the grid ``(T, H, W)`` carried by
:class:`AttnContext`. The output has the same shape and dtype as ``q``.

A method is an ``nn.Module`` (SALAD and the trained peers own parameters). It is built from a frozen
config dataclass by :func:`create_method`; after a call it can report what it actually did
(:meth:`AttentionMethod.report`): the density it used, measured from its block layout, and its
analytic FLOPs split by part. Methods know nothing of timing, files or plots.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from salad_bench.kernels import block_sparse_attention, gather_pair
from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.launch import needs_grad
from salad_bench.kernels.layout import BlockLayout, gather_tokens
from salad_bench.methods.registry import Registry

__all__ = [
    "AttentionMethod",
    "AttnContext",
    "BlockSparseConfig",
    "Family",
    "MethodConfig",
    "MethodReport",
    "METHODS",
    "ProjectionLoRA",
    "PROJECTIONS",
    "Unsupported",
    "check_choice",
    "check_count",
    "check_range",
    "check_sparse_knobs",
    "create_method",
    "dense_flops",
    "gather_tokens",
    "permuted_block_sparse",
]

Family = Literal["full", "training_free", "trained", "salad", "ablation"]
FAMILIES: tuple[str, ...] = ("full", "training_free", "trained", "salad", "ablation")


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ``ValueError`` naming the knob and its valid range when ``value`` falls outside it."""
    bad = (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi)
    if bad or (isinstance(value, float) and math.isnan(value)):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}={value!r} is out of range; valid range is {left}{lo}, {hi}{right}")


def check_count(name: str, value: Any, lo: int = 0, hi: int | None = None) -> None:
    """Raise ``ValueError`` naming the knob unless ``value`` is an int in ``[lo, hi]`` (``hi`` None: no cap)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}={value!r} is not valid; it must be an integer {bound}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def check_sparse_knobs(knobs: Any) -> None:
    """``sparse_knobs`` of a method built on another: ``(key, value)`` pairs of the inner method's knobs.
    ``sparsity`` and the shape are the outer method's, passed through, so they cannot be set here."""
    try:
        keys = [k for k, _ in knobs]
    except (TypeError, ValueError):
        raise ValueError(f"sparse_knobs={knobs!r} must be (key, value) pairs, e.g. (('block_q', 64),)") from None
    for key in keys:
        if key in ("sparsity", "num_heads", "head_dim"):
            raise ValueError(f"sparse_knobs sets {key!r}, which the method passes to its sparse branch itself; "
                             "drop it (the target sparsity is set with --sparsity)")  # fmt: skip


@dataclass(frozen=True)
class MethodConfig:
    """Knobs shared by every method. ``sparsity`` is the target fraction of tiles skipped."""

    sparsity: float = 0.0

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Backend = Literal["auto", "triton", "flex", "torch"]


@dataclass(frozen=True)
class BlockSparseConfig(MethodConfig):
    """Knobs of a block-sparse method: tile sizes and which kernel executes the layout.

    ``backend``: ``auto`` = our Triton kernel on CUDA, the torch reference on the CPU; ``flex`` =
    FlexAttention with the same block mask; ``torch`` = the chunked reference (slow, exact).
    Defaults: 128x64 tiles, the tile shape SLA benchmarks with and the kernel is tuned for.
    """

    block_q: int = 128
    block_k: int = 64
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("block_q", self.block_q, (16, 32, 64, 128))
        check_choice("block_k", self.block_k, (16, 32, 64, 128))
        check_choice("backend", self.backend, ("auto", "triton", "flex", "torch"))


@dataclass(frozen=True)
class AttnContext:
    """What a method may know besides q, k, v.

    ``grid``: latent ``(T, H, W)`` with ``T*H*W == N`` (None when the tokens are not a video).
    ``hidden_states``: the layer input ``(B, N, C)`` when the caller has it (the DiT integration does);
    SALAD's gate pools it. ``layer``/``step`` let methods keep early layers or steps dense.
    ``dense``: the caller's answer of :meth:`AttentionMethod.dense_at` for this call, when it decided it
    beforehand. A model integration does so for compiled models, where it passes ``layer``/``step`` as
    None: an integer read inside a compiled region would give every layer and step its own graph.
    ``token_order``: where the caller already put the tokens into the order the method asked for
    (:meth:`AttentionMethod.token_order`; position i holds raster token ``token_order[i]``), that order;
    q, k, v, ``hidden_states`` and the output are then all in it. None: raster order. A model integration
    that permutes the sequence once per forward (the Wan integration) sets it, and only to the order the
    installed method itself returned, so the method skips its per-call gathers.
    ``q_unrotated``/``k_unrotated``: ``(B, H, N, D)`` q and k *before* the model's rotary embedding, given
    only to a method that asks (:attr:`AttentionMethod.wants_unrotated_qk`) when the caller rotated q and
    k itself (the Wan integration: references to tensors it already has, no copy). None otherwise: the
    q, k handed over are then the only ones (bare Q/K/V workloads carry no RoPE).
    """

    grid: tuple[int, int, int] | None = None
    layer: int | None = 0
    num_layers: int = 1
    step: int | None = 0
    num_steps: int = 1
    dense: bool | None = None
    hidden_states: torch.Tensor | None = field(default=None, compare=False, repr=False)
    q_unrotated: torch.Tensor | None = field(default=None, compare=False, repr=False)
    k_unrotated: torch.Tensor | None = field(default=None, compare=False, repr=False)
    token_order: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def check(self, n: int) -> None:
        if self.grid is not None and math.prod(self.grid) != n:
            raise ValueError(f"grid {self.grid} has {math.prod(self.grid)} tokens but q has N={n}")


# The attention projections a method may ask LoRA on, by role: a model integration maps each role to
# its own module (diffusers' Wan: to_q, to_k, to_v, to_out.0).
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "out")


@dataclass(frozen=True)
class ProjectionLoRA:
    """A method's request for LoRA adapters on the attention projections of the model it sits in.

    ``targets``: roles from :data:`PROJECTIONS`; ``alpha``: LoRA's alpha (scale ``alpha / rank``).
    A model integration that has projections installs the adapters (zero-initialised ``B``, so the
    model is unchanged until they train) and hands their parameters back through
    :meth:`AttentionMethod.attach_projection_lora`; on bare Q/K/V nothing is installed.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = PROJECTIONS


@dataclass
class MethodReport:
    """What the last call did: measured tile density and analytic FLOPs by part."""

    density: float
    flops: dict[str, float]
    backend: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flops_total(self) -> float:
        return float(sum(self.flops.values()))


def dense_flops(b: int, h: int, n_q: int, n_k: int, d: int) -> float:
    """Forward FLOPs of dense softmax attention: ``4 * B * H * Nq * Nk * D`` (two matmuls)."""
    return 4.0 * b * h * n_q * n_k * d


def permuted_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                          perm: torch.Tensor | None, inverse: torch.Tensor | None, backend: str,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention whose ``layout`` is posed in the token order ``perm`` (``inverse`` its inverse;
    STA's tiles, VSA's cubes), output plus ``residual`` in the tokens' own order. At inference k and v are
    gathered and the kernel reads q and writes the output through ``perm`` (``q_index``); under autograd q,
    k, v are gathered and the output gathered back (the inverse permutation: no scatter). ``perm`` None:
    the tokens are already in the layout's order (``AttnContext.token_order``), nothing is gathered. The
    residual is added in the kernel's epilogue at inference, after the attention under autograd."""
    if not needs_grad(q, k, v, residual):
        if perm is None:
            return block_sparse_attention(q, k, v, layout, backend=backend, residual=residual)
        k, v = gather_pair(k, v, perm, backend)
        return block_sparse_attention(q, k, v, layout, backend=backend, residual=residual, q_index=perm)
    if perm is None:
        out = block_sparse_attention(q, k, v, layout, backend=backend)
    else:
        k, v = gather_tokens(k, perm), gather_tokens(v, perm)
        out = gather_tokens(block_sparse_attention(gather_tokens(q, perm), k, v, layout, backend=backend), inverse)
    return out if residual is None else residual + out


class AttentionMethod(nn.Module):
    """Base class: subclass, set ``Config`` and ``family``, implement :meth:`attend`.

    Subclasses that pick a block layout override :meth:`select` (so the harness can time selection
    on its own) and call :meth:`_remember` with the layout they used.
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    family: ClassVar[str] = "training_free"
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    needs_grid: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""
    # Asks a model integration for q, k before the model's RoPE (AttnContext.q_unrotated/k_unrotated).
    wants_unrotated_qk: ClassVar[bool] = False
    # Asks a model integration for LoRA on the attention projections (None: no).
    wants_projection_lora: ClassVar[ProjectionLoRA | None] = None
    # attend() takes residual= and its kernel adds it to the output in place of a separate pass (inference)
    fuses_residual: ClassVar[bool] = False
    # attend() is select(), then the package's block-sparse kernel on that layout (see splits_into_kernel)
    runs_block_sparse: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, *, num_heads: int, head_dim: int, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.name = name or self.registry_name
        self._layout: BlockLayout | None = None
        self._shape: tuple[int, int, int, int] | None = None
        self._extra_flops: dict[str, float] = {}
        self._backend = ""
        self._path: dict[str, Any] = {}  # which execution path ran (selector, kernel, ...), for the report
        # LoRA an integration installed on the projections for this method: (parameters, (in, out) per layer)
        self._projection_lora: tuple[list[nn.Parameter], list[tuple[int, int]]] | None = None

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext | None = None, *,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention ``(B, H, N, D)``; with ``residual`` (q's shape and dtype, any strides), attention plus
        the residual. A method with :attr:`fuses_residual` adds it inside its kernel when nothing needs a
        gradient (the result then has the residual's memory layout); otherwise it is added after."""
        ctx = ctx or AttnContext()
        self.validate(q, k, v, ctx)
        self._shape = tuple(q.shape)  # type: ignore[assignment]
        if residual is None:
            return self.attend(q, k, v, ctx)
        if residual.shape != q.shape or residual.dtype != q.dtype:
            raise ValueError(f"residual is {tuple(residual.shape)} {residual.dtype}; q is {tuple(q.shape)} {q.dtype}")
        grads = needs_grad(q, k, v, residual)
        if self.fuses_residual and not grads and residual.stride(-1) == 1:
            return self.attend(q, k, v, ctx, residual=residual)  # type: ignore[call-arg]
        return residual + self.attend(q, k, v, ctx)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        raise NotImplementedError

    def dense_at(self, layer: int, step: int) -> bool:
        """Whether this method runs full attention at ``layer`` and sampling ``step`` (a dense warm-up).
        None of its own here; a method built on others (SALAD's sparse branch) is dense where any of them is.
        A model integration asks this outside any compiled region and hands the answer over as
        ``AttnContext.dense``."""
        return any(m.dense_at(layer, step) for m in self.children() if isinstance(m, AttentionMethod))

    def token_order(self, grid: tuple[int, int, int], n: int, device: torch.device | str) -> torch.Tensor | None:
        """The token order this method poses its whole problem in, for a video of ``grid`` (``N`` tokens):
        int64 ``(N,)``, position i holding raster token ``order[i]``; None (the default) for raster order.

        A method that returns an order must compute the same attention when called with q, k, v (and
        ``hidden_states``) already in that order and ``AttnContext.token_order`` set to it, with nothing
        position-dependent of its own left in raster order. A model integration may then permute the
        sequence once per forward instead of the method gathering k and v in every layer (STA's tiles:
        FastVideo tiles the latent once per forward too). Methods whose every part allows it override
        this: ``sta``, ``vsa``, and SALAD with its sparse branch's order (``salad_sta``; its linear
        branch permutes its RoPE tables alike)."""
        return None

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> BlockLayout | None:
        """The block layout this method would use for these inputs; None for methods without one."""
        return None

    def splits_into_kernel(self) -> bool:
        """Whether this method's work is :meth:`select`, the block-sparse kernel on its layout and
        :meth:`own_work`, and nothing else but glue (copies, casts, permutations, adds): true for a method
        with :attr:`runs_block_sparse`, and for a method built on exactly one other that does (SALAD, the
        LoRA variants). A harness times the parts apart and reports the rest as the method's glue."""
        subs = [m for m in self.children() if isinstance(m, AttentionMethod)]
        return self.runs_block_sparse or (len(subs) == 1 and subs[0].splits_into_kernel())

    def own_work(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> Any:
        """What this method computes besides selecting its layout and running its sparse kernel, run alone
        on these inputs (SALAD: the linear branch, the gate and the projection); None when there is none."""
        return None

    # -- checks ---------------------------------------------------------------------------------
    def validate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> None:
        """Shape, dtype and head-count checks; cheap (no device sync)."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"{name} must be (B, H, N, D); got shape {tuple(t.shape)}")
        if not (q.shape == k.shape and k.shape[:3] == v.shape[:3]):
            raise ValueError(f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v dtypes disagree: {q.dtype}, {k.dtype}, {v.dtype}")
        if q.dtype not in self.supported_dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.supported_dtypes)
            raise Unsupported(f"{self.name} does not support dtype {str(q.dtype).replace('torch.', '')}; use one of {names}")
        if q.shape[1] != self.num_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"{self.name} was built for {self.num_heads} heads x head_dim {self.head_dim}; "
                f"got {q.shape[1]} x {q.shape[3]}"
            )
        ctx.check(q.shape[2])
        for name, t in (("q_unrotated", ctx.q_unrotated), ("k_unrotated", ctx.k_unrotated)):
            if t is not None and (t.shape != q.shape or t.dtype != q.dtype):
                raise ValueError(f"AttnContext.{name} is {tuple(t.shape)} {t.dtype}; q is {tuple(q.shape)} {q.dtype}")
        if self.needs_grid and ctx.grid is None:
            raise ValueError(f"{self.name} needs the video grid (T, H, W) in AttnContext.grid")

    # -- reporting ------------------------------------------------------------------------------
    def _remember(self, layout: BlockLayout | None, backend: str = "", *, path: dict[str, Any] | None = None,
                  **extra_flops: float) -> None:
        """Record the last call: its layout, the kernel backend, the execution path taken (e.g. which
        selector ran) and FLOPs beyond attention on the kept tiles."""
        self._layout = layout
        self._backend = backend
        self._path = dict(path or {})
        self._extra_flops = dict(extra_flops)

    def attach_projection_lora(self, params: list[nn.Parameter] | None, features: list[tuple[int, int]] = ()) -> None:
        """Called by a model integration that honoured :attr:`wants_projection_lora`: the adapters'
        parameters (they live on the model's projections, not on this module) and each adapted layer's
        ``(in_features, out_features)``. ``None`` detaches them (the integration removed the adapters)."""
        self._projection_lora = None if params is None else (list(params), [tuple(f) for f in features])

    @property
    def layout(self) -> BlockLayout | None:
        return self._layout

    def report(self) -> MethodReport:
        """Density and FLOPs of the last call (synchronises with the device)."""
        if self._shape is None:
            raise RuntimeError(f"{self.name}.report() called before the method ran")
        b, h, n, d = self._shape
        if self._layout is None:
            flops = {"attention": dense_flops(b, h, n, n, d)}
            density = 1.0
        else:
            flops = {"attention": 4.0 * self._layout.kept_token_pairs() * d}
            density = self._layout.density()
        flops.update(self._extra_flops)
        return MethodReport(density=density, flops=flops, backend=self._backend, extra=dict(self._path))

    def knobs(self) -> dict[str, Any]:
        return self.config.as_dict()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.knobs().items())


METHODS: Registry[AttentionMethod] = Registry("method", AttentionMethod, FAMILIES)

# Traits a harness may ask of a registry entry (METHODS.with_trait), so it never names a method:
# "dense": exact dense attention, measured once (no sparsity sweep); "reference": the dense method a
# whole-model run uses as its baseline (fastest backend on the card); "dense_baseline": a lossless
# dense backend timed as a candidate speedup baseline; "fa2": the FlashAttention-2 reference
# (speedup_vs_fa2); "lossy": dense but approximate, never a baseline; "trainable": the method is meant
# to be fine-tuned (the quality study fine-tunes it; without the trait it is evaluated as is);
# "headline": one of the methods the quality study sweeps over every sparsity.
TRAITS = ("dense", "reference", "dense_baseline", "fa2", "lossy", "trainable", "headline")


def create_method(name: str, *, num_heads: int, head_dim: int, **knobs: Any) -> AttentionMethod:
    """Build the registered method ``name``; ``knobs`` override the variant's config defaults.

    Unknown knobs and out-of-range values raise ``ValueError`` naming the knob.
    """
    entry = METHODS.get(name)
    cls = entry.cls
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no knob {', '.join(map(repr, unknown))}; its knobs: {', '.join(sorted(fields))}")
    cfg = cls.Config(**{**entry.defaults, **knobs})
    return cls(cfg, num_heads=num_heads, head_dim=head_dim, name=name)
