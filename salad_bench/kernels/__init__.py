"""Attention kernels: plain tensors and block layouts in, tensors out. They know no method.

``block_sparse_attention`` is the one entry point methods call to execute a :class:`BlockLayout`;
``backend`` picks the implementation and an unavailable one raises :class:`Unsupported` (never a
silent fallback to dense).
"""

from __future__ import annotations

import functools

import torch

from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.launch import check_inference
from salad_bench.kernels.layout import BlockLayout, cdiv, keep_count
from salad_bench.kernels.reference import (
    block_sparse_attention_gather,
    block_sparse_attention_ref,
    linear_attention_ref,
)

__all__ = [
    "BlockLayout",
    "Unsupported",
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "cdiv",
    "execution_paths",
    "gather_pair",
    "keep_count",
    "linear_attention",
    "linear_attention_ref",
    "resolve_backend",
    "triton_available",
    "window_means",
]


def triton_available(device: torch.device) -> bool:
    """Whether our Triton kernels can run on ``device`` (CUDA, or the CPU interpreter)."""
    from salad_bench.kernels.launch import interpreting

    return _triton_importable(device.type, interpreting())


@functools.lru_cache(maxsize=8)
def _triton_importable(device_type: str, interpret: bool) -> bool:
    # Cached: resolve_backend asks on every attention call.
    if device_type != "cuda" and not interpret:
        return False
    try:
        import triton  # noqa: F401

        from salad_bench.kernels import block_sparse  # noqa: F401
    except ImportError:
        return False
    return True


def execution_paths(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    """Which implementation of each Triton kernel runs for inputs of this device, dtype and head dim, so a
    result row can say what ran (``kernel_path``): ``block_sparse`` (the online-softmax forward, its K/V
    through TMA descriptors on sm90+, through pointers before), ``linear`` (the Gluon forward passes on
    sm_90, the Triton ones elsewhere; the backward is Triton's) and ``select`` (the Triton selector, or
    torch where Triton cannot run). Which backend a method called is the row's ``backend``.

    Where a path also depends on a tensor's alignment (TMA wants 16-byte aligned bases and strides, the
    Gluon passes contiguous inputs), this names the path aligned contiguous inputs take."""
    device = torch.device(device)
    if not triton_available(device):
        return {"block_sparse": f"unavailable on {device.type}", "linear": f"unavailable on {device.type}",
                "select": "torch"}
    from salad_bench.kernels.block_sparse import SUPPORTED_HEAD_DIMS as SPARSE_DIMS
    from salad_bench.kernels.linear_attn import SUPPORTED_HEAD_DIMS as LINEAR_DIMS

    half = dtype in (torch.float16, torch.bfloat16)
    ok = dtype in (torch.float16, torch.bfloat16, torch.float32)
    if device.type != "cuda":  # the interpreter: TMA descriptors are emulated, Gluon does not run
        sparse, linear, select = "triton interpreter, online-softmax, TMA K/V loads", "triton interpreter", "triton interpreter"
    else:
        major = torch.cuda.get_device_capability(device)[0]
        sparse = "triton online-softmax, " + ("TMA K/V loads" if major >= 9 else "pointer K/V loads")
        linear, select = "triton", "triton"
        if major == 9 and half and head_dim in (64, 128):
            try:
                from salad_bench.kernels.linear_gluon import gluon_unsupported_on
            except ImportError:  # a Triton without Gluon
                pass
            else:
                if gluon_unsupported_on(device, dtype, head_dim) is None:
                    linear = "gluon sm90 forward, triton backward"
    if not ok or head_dim not in SPARSE_DIMS:
        sparse = f"unsupported ({str(dtype).replace('torch.', '')}, head_dim {head_dim})"
    if not ok or head_dim not in LINEAR_DIMS:
        linear = f"unsupported ({str(dtype).replace('torch.', '')}, head_dim {head_dim})"
    return {"block_sparse": sparse, "linear": linear, "select": select}


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> our Triton kernel on CUDA (FlexAttention if it is absent), the torch gather path on
    the CPU; an explicit choice is checked. The choice is recorded in each result row's ``backend``."""
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available(device) else "flex"
        return "torch"
    if backend == "triton" and not triton_available(device):
        raise Unsupported(
            f"the Triton block-sparse kernel needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); got {device}"
        )
    if backend not in ("triton", "flex", "torch"):
        raise ValueError(f"backend must be auto, triton, flex or torch; got {backend!r}")
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    backend: str = "auto",
    scale: float | None = None,
    residual: torch.Tensor | None = None,
    q_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention over the layout's kept tiles, ``(B, H, N, D)`` in and out (the Triton backend's
    output, and the compiled operator's on every backend, token-major: a view of a ``(B, N, H, D)`` buffer).

    ``residual`` (inference only): a ``(B, H, N, D)`` tensor of any strides added to the output; the
    result then has the residual's memory layout. The Triton kernel adds it in its epilogue (no extra
    pass over the output); the other backends add it after.

    ``q_index`` (inference only): a permutation of the N tokens for a layout built in another token
    order (e.g. tile-major): the layout's query position i is q's token ``q_index[i]``, and k, v are
    given in position order (``k = k_tokens[:, :, q_index]``); the output is in q's own token order. The
    Triton kernel reads q and writes the output through the index (no gathers of q or the output); the
    other backends gather and scatter around the attention.

    Under ``torch.compile`` this is the registered operator ``salad_bench::block_sparse_attention``
    (``..._inference`` with a residual or a query index; :mod:`salad_bench.kernels.ops`), so a compiled
    model traces around the kernel."""
    which = resolve_backend(backend, q.device)
    s = -1.0 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        if residual is not None or q_index is not None:
            check_inference(q, k, v, residual, q_index)  # at tracing: the kernel checks them again when it runs
            return torch.ops.salad_bench.block_sparse_attention_inference(
                q, k, v, layout.kv_idx, layout.kv_cnt, layout.block_q, layout.block_k, which, s, residual, q_index
            )
        return torch.ops.salad_bench.block_sparse_attention(
            q, k, v, layout.kv_idx, layout.kv_cnt, layout.block_q, layout.block_k, which, s
        )
    return _block_sparse_attention_impl(q, k, v, layout, which, scale, residual, q_index)


def _block_sparse_attention_impl(q, k, v, layout: BlockLayout, backend: str, scale: float | None,
                                 residual: torch.Tensor | None = None,
                                 q_index: torch.Tensor | None = None) -> torch.Tensor:
    which = resolve_backend(backend, q.device)
    if which == "triton":
        from salad_bench.kernels.block_sparse import block_sparse_attention_triton

        # checks the residual and the index
        return block_sparse_attention_triton(q, k, v, layout, scale=scale, residual=residual, q_index=q_index)
    check_inference(q, k, v, residual, q_index)
    q_index = None if q_index is None else q_index.long()  # index_copy_ takes int64 indices only
    qp = q if q_index is None else q.index_select(2, q_index)
    if which == "flex":
        from salad_bench.kernels.flex import flex_block_sparse_attention

        out = flex_block_sparse_attention(qp, k, v, layout, scale=scale)
    else:
        out = block_sparse_attention_gather(qp, k, v, layout, scale=scale)
    if q_index is not None:
        out = torch.empty_like(out).index_copy_(2, q_index, out)
    if residual is None:
        return out
    return torch.add(residual, out, out=torch.empty_like(residual))


def gather_pair(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(a[:, :, index], b[:, :, index])`` of two ``(B, H, N, D)`` tensors: k and v put into the token
    order a block layout is posed in (tile order, cube order) before :func:`block_sparse_attention` with
    ``q_index``. On the Triton backend, at inference, one launch gathers both when they are not
    token-major (:func:`kernels.gather.gather_pair`); a token-major pair, other backends and autograd take
    ``index_select`` per tensor (:func:`kernels.layout.gather_tokens`: a token-major tensor as whole
    ``H * D`` rows, which the launch only ties). A token-major input stays token-major. Under
    ``torch.compile`` the Triton path is the operator ``salad_bench::gather_pair``."""
    from salad_bench.kernels.launch import needs_grad
    from salad_bench.kernels.layout import gather_tokens, is_token_major

    if (resolve_backend(backend, a.device) != "triton" or needs_grad(a, b)
            or (is_token_major(a) and is_token_major(b))):
        return gather_tokens(a, index), gather_tokens(b, index)
    if torch.compiler.is_compiling():
        return torch.ops.salad_bench.gather_pair(a, b, index)
    from salad_bench.kernels.gather import gather_pair as _triton_gather_pair

    return _triton_gather_pair(a, b, index)


def window_means(x: torch.Tensor, grid: tuple[int, int, int], window: tuple[int, int, int],
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """Each cell's fp32 mean of a ``(B, H, N, D)`` tensor's tokens over a ``(T, H, W)`` grid cut into
    ``window``-sized cells (ragged at the edges), in one Triton launch (:func:`kernels.pool.window_means`):
    ``(B, H, M, D)``, cells in raster order or in ``order``. Inference only (no autograd); raises
    :class:`Unsupported` where Triton cannot run. Under ``torch.compile`` it is the operator
    ``salad_bench::window_means``."""
    if not triton_available(x.device):
        raise Unsupported(f"window_means needs Triton on {x.device.type} (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    if torch.compiler.is_compiling():
        return torch.ops.salad_bench.window_means(x, list(grid), list(window), order)
    from salad_bench.kernels.pool import window_means as _triton_window_means

    return _triton_window_means(x, grid, window, order)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "relu",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """Non-causal linear attention with optional in-branch RoPE; ``(B, H, N, D)`` in and out (the
    Triton and Gluon kernels and the compiled operator write a view of a token-major buffer).

    ``auto`` uses the Triton kernel on CUDA when it is present, the torch reference otherwise. Under
    ``torch.compile`` this is the operator ``salad_bench::linear_attention``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.salad_bench.linear_attention(q, k, v, cos, sin, kind, float(eps), backend)
    return _linear_attention_impl(q, k, v, kind, cos, sin, eps, backend)


def _linear_attention_impl(q, k, v, kind: str, cos, sin, eps: float, backend: str) -> torch.Tensor:
    use_triton = backend == "triton" or (backend == "auto" and q.device.type == "cuda")
    if use_triton:
        try:
            from salad_bench.kernels.linear_attn import linear_attention_triton
        except ImportError as exc:
            if backend == "triton":
                raise Unsupported("the Triton linear-attention kernel is not available") from exc
        else:
            return linear_attention_triton(q, k, v, kind=kind, cos=cos, sin=sin, eps=eps)
    return linear_attention_ref(q, k, v, kind=kind, cos=cos, sin=sin, eps=eps)


from salad_bench.kernels import ops as _ops  # noqa: E402,F401  (registers the operators)
