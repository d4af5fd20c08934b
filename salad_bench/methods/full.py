"""``full``: dense softmax attention, the baseline every speedup is measured against.

Backends (knob ``backend``):

* ``cudnn``, ``flash`` (FlashAttention-2 inside SDPA), ``efficient``, ``math``: SDPA with that backend
  forced; a backend that cannot run these inputs raises :class:`Unsupported`.
* ``flex``: FlexAttention with no mask (compiled on CUDA).
* ``flash_attn``: the ``flash_attn`` package (FA3 via ``flash_attn_interface`` on Hopper, else FA2).
* ``fa4``: the ``flash-attn-4`` package (CuTe DSL), when importable.
* ``sage``: SageAttention (the ``sageattention`` package: INT8 Q/K in Triton). Lossy, so never the
  speedup baseline and never picked by ``auto``: ``full_sage`` is reported beside the headline with its
  error against fp32 attention.
* ``auto``: on CUDA, time every SDPA/package backend that runs these inputs once per shape and use
  the fastest (which one ran is reported); on the CPU, SDPA's default choice.

Registered variants ``full_cudnn``, ``full_flash``, ... pin one backend each, so a sweep can report
every dense backend side by side. FLOPs: ``4*B*H*N^2*D``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from salad_bench.methods.base import METHODS, AttentionMethod, AttnContext, MethodConfig, Unsupported, check_choice

DenseBackend = Literal["auto", "cudnn", "flash", "efficient", "math", "flex", "flash_attn", "fa4", "sage"]
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
_AUTO_CANDIDATES = ("cudnn", "flash_attn", "fa4", "flash", "efficient")


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    backend: DenseBackend = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("backend", self.backend, ("auto", *SDPA_BACKENDS, "flex", "flash_attn", "fa4", "sage"))


def _sdpa_ctx(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enum = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([enum])


def _flash_attn_fn() -> tuple[str, Callable]:
    try:
        import flash_attn_interface  # FA3 (Hopper)

        return "flash_attn3", lambda q, k, v: flash_attn_interface.flash_attn_func(q, k, v)[0]
    except ImportError:
        pass
    try:
        import flash_attn

        return "flash_attn2", lambda q, k, v: flash_attn.flash_attn_func(q, k, v)
    except ImportError as exc:
        raise Unsupported("the flash_attn package is not installed (pip install flash-attn; it builds from source)") from exc


def _fa4_fn() -> Callable:
    try:
        from flash_attn.cute import flash_attn_func  # flash-attn-4
    except ImportError as exc:
        raise Unsupported("flash-attn-4 is not installed (pip install flash-attn-4; needs a Hopper/Blackwell GPU)") from exc
    return lambda q, k, v: flash_attn_func(q, k, v)[0]


def run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention with one named backend; raises :class:`Unsupported` if it cannot run here.

    ``default`` (used by ``auto`` on the CPU) lets SDPA choose.
    """
    if name == "default":
        return F.scaled_dot_product_attention(q, k, v)
    if name in SDPA_BACKENDS:
        if name == "cudnn" and q.device.type != "cuda":
            raise Unsupported("SDPA's cuDNN backend needs a CUDA device")
        try:
            with _sdpa_ctx(name):
                return F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as exc:
            msg = str(exc)
            if "No available kernel" in msg or "No viable backend" in msg or "not supported" in msg.lower():
                raise Unsupported(f"SDPA backend {name!r} cannot run {q.dtype} head_dim={q.shape[-1]} on {q.device}: {str(exc)[:200]}") from exc
            raise
    if name == "flex":
        from salad_bench.kernels.flex import flex_dense_attention  # CUDA only: it refuses elsewhere

        return flex_dense_attention(q, k, v)
    if q.device.type != "cuda":
        raise Unsupported(f"backend {name!r} needs a CUDA device")
    if name == "sage":
        try:
            from sageattention import sageattn
        except ImportError as exc:
            raise Unsupported("SageAttention is not installed (pip install sageattention)") from exc
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise Unsupported(f"SageAttention takes fp16/bf16, not {q.dtype}")
        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    if name == "flash_attn":
        _, fn = _flash_attn_fn()
    elif name == "fa4":
        fn = _fa4_fn()
    else:
        raise ValueError(f"unknown dense backend {name!r}")
    # the flash_attn packages take (B, N, H, D)
    return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@METHODS.register("full", family="full", traits=("dense", "reference"))
class Full(AttentionMethod):
    """Dense softmax attention with a selectable backend (the baseline)."""

    Config = FullConfig
    family = "full"
    config: FullConfig

    def __init__(self, config: FullConfig, **kw) -> None:
        super().__init__(config, **kw)
        self._auto_choice: dict[tuple, str] = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        name = self.config.backend
        if name == "auto":
            name = self._pick(q, k, v)
        out = run_backend(name, q, k, v)
        self._remember(None, backend=name)
        return out

    def _pick(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
        if q.device.type != "cuda":
            return "math" if q.dtype == torch.float64 else "default"
        key = (tuple(q.shape), q.dtype, q.device.index)
        if key not in self._auto_choice:
            self._auto_choice[key] = fastest_backend(q, k, v)
        return self._auto_choice[key]


def fastest_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, candidates=_AUTO_CANDIDATES) -> str:
    """Time each candidate that runs these inputs (a few CUDA-event-timed calls) and name the fastest."""
    best, best_ms = None, float("inf")
    for name in candidates:
        try:
            run_backend(name, q, k, v)
        except Unsupported:
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            run_backend(name, q, k, v)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 5
        if ms < best_ms:
            best, best_ms = name, ms
    if best is None:
        raise Unsupported("no dense attention backend runs these inputs")
    return best


for _b in ("cudnn", "flash", "efficient", "math", "flex", "flash_attn", "fa4"):
    METHODS.register_variant(f"full_{_b}", "full", backend=_b, description=f"dense attention, {_b} backend only",
                             traits=("dense", "dense_baseline", *(("fa2",) if _b == "flash" else ())))
# lossy: a method beside the headline (with its error), never one of the dense baselines
METHODS.register_variant("full_sage", "full", backend="sage", traits=("dense", "lossy"),
                         description="SageAttention: INT8 Q/K dense attention (lossy; reported with its error)")

