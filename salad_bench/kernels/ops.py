"""The kernels as registered PyTorch operators, so ``torch.compile`` traces a method *around* them.

Dynamo cannot trace into a Triton launcher with host-side caches (plans, cached launch sites, shape
keys); it can trace a call to an operator whose output it knows from a fake implementation. Under
``torch.compile`` (``torch.compiler.is_compiling()``) the public entry points of this package call
these operators; eager calls go straight to the implementations (no dispatcher cost on the host).

* ``salad_bench::block_sparse_attention(q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale)``
* ``salad_bench::block_sparse_attention_inference(..., residual?, q_index?)``: the same plus ``residual``
  (output in the residual's memory layout) and/or q read and the output written through ``q_index``
  (inference: no backward)
* ``salad_bench::gather_pair(a, b, index) -> (a[:, :, index], b[:, :, index])``: one Triton launch
  (inference: no backward)
* ``salad_bench::window_means(x, grid, window, order?) -> (B, H, M, D)`` fp32 means over a token grid's
  cells: one Triton launch (inference: no backward)
* ``salad_bench::linear_attention(q, k, v, cos?, sin?, kind, eps, backend)``: token-major output
* ``salad_bench::select_topk(q, k, keep, block_q, block_k, keep_diagonal) -> (kv_idx, kv_cnt)``

The two attention operators are differentiable: their backward operators recompute the forward with
autograd on and differentiate it (the Triton kernels' own backward runs there), so training through a
compiled block works at the cost of one extra forward per backward. An operator's implementation runs
below the dispatcher's autograd layer, where nothing is recorded even under ``enable_grad``; the
recompute therefore runs on a helper thread, whose dispatcher state is fresh, on the caller's stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from salad_bench.kernels.layout import is_token_major, token_major

__all__ = ["block_sparse_attention_inference_op", "block_sparse_attention_op", "gather_pair_op", "linear_attention_op", "select_topk_op",
           "window_means_op"]

_NO_SCALE = -1.0  # the operator schema takes a float; "None" (1/sqrt(D)) travels as this


def _vjp(fn: Callable[..., Tensor], grad: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    """Gradients of ``fn(*inputs)`` against ``grad``, recorded on a fresh thread (see the module docstring)."""
    box: dict = {}
    stream = torch.cuda.current_stream(grad.device) if grad.is_cuda else None

    def work() -> None:
        try:
            with torch.enable_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                leaves = [x.detach().requires_grad_(True) for x in inputs]
                box["grads"] = torch.autograd.grad(fn(*leaves), leaves, grad)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc

    t = threading.Thread(target=work, name="salad_bench-vjp")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return tuple(g.contiguous() for g in box["grads"])


def _as_token_major(out: Tensor) -> Tensor:
    """``out`` as the fakes declare every attention output: a token-major ``(B, H, N, D)`` view."""
    return out if is_token_major(out) else out.transpose(1, 2).contiguous().transpose(1, 2)


# -- block-sparse attention -----------------------------------------------------------------------
def _bsa_eager(q, k, v, kv_idx, kv_cnt, block_q: int, block_k: int, backend: str, scale: float,
              residual: Tensor | None = None, q_index: Tensor | None = None) -> Tensor:
    from salad_bench.kernels import _block_sparse_attention_impl
    from salad_bench.kernels.layout import BlockLayout

    layout = BlockLayout(kv_idx, kv_cnt, block_q, block_k, q.shape[2])
    scale = None if scale == _NO_SCALE else scale
    return _block_sparse_attention_impl(q, k, v, layout, backend, scale, residual, q_index)


@torch.library.custom_op("salad_bench::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_idx: Tensor, kv_cnt: Tensor, block_q: int,
                              block_k: int, backend: str, scale: float) -> Tensor:
    # token-major, as the Triton kernel writes it (the flex and gather backends' outputs are copied so)
    return _as_token_major(_bsa_eager(q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale))


@block_sparse_attention_op.register_fake
def _(q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale):
    return token_major(*q.shape, q.dtype, q.device)


@torch.library.custom_op("salad_bench::block_sparse_attention_inference", mutates_args=())
def block_sparse_attention_inference_op(q: Tensor, k: Tensor, v: Tensor, kv_idx: Tensor, kv_cnt: Tensor, block_q: int,
                                        block_k: int, backend: str, scale: float, residual: Tensor | None,
                                        q_index: Tensor | None) -> Tensor:
    out = _bsa_eager(q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale, residual, q_index)
    return out if residual is not None else _as_token_major(out)


@block_sparse_attention_inference_op.register_fake
def _(q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale, residual, q_index):
    if residual is not None:
        return torch.empty_like(residual)  # the implementations allocate it so: the residual's strides
    return token_major(*q.shape, q.dtype, q.device)


@torch.library.custom_op("salad_bench::block_sparse_attention_backward", mutates_args=())
def _bsa_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_idx: Tensor, kv_cnt: Tensor, block_q: int,
                     block_k: int, backend: str, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _vjp(lambda q, k, v: _bsa_eager(q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale), grad, q, k, v)


@_bsa_backward_op.register_fake
def _(grad, q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _bsa_setup(ctx, inputs, output):
    q, k, v, kv_idx, kv_cnt, block_q, block_k, backend, scale = inputs
    ctx.save_for_backward(q, k, v, kv_idx, kv_cnt)
    ctx.args = (block_q, block_k, backend, scale)


def _bsa_backward(ctx, grad):
    q, k, v, kv_idx, kv_cnt = ctx.saved_tensors
    dq, dk, dv = _bsa_backward_op(grad.contiguous(), q, k, v, kv_idx, kv_cnt, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


block_sparse_attention_op.register_autograd(_bsa_backward, setup_context=_bsa_setup)


# -- gather of k and v into a token order (Triton, inference) --------------------------------------
@torch.library.custom_op("salad_bench::gather_pair", mutates_args=())
def gather_pair_op(a: Tensor, b: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    from salad_bench.kernels.gather import gather_pair

    return gather_pair(a, b, index)


@gather_pair_op.register_fake
def _(a, b, index):
    from salad_bench.kernels.gather import _out_like

    return _out_like(a, index.shape[0]), _out_like(a, index.shape[0])


# -- means over a token grid's cells (Triton, inference) -------------------------------------------
@torch.library.custom_op("salad_bench::window_means", mutates_args=())
def window_means_op(x: Tensor, grid: list[int], window: list[int], order: Tensor | None) -> Tensor:
    from salad_bench.kernels.pool import window_means

    return window_means(x, tuple(grid), tuple(window), order)


@window_means_op.register_fake
def _(x, grid, window, order):
    from salad_bench.kernels.pool import cell_count

    return x.new_empty((x.shape[0], x.shape[1], cell_count(grid, window), x.shape[3]), dtype=torch.float32)


# -- linear attention ----------------------------------------------------------------------------
def _lin_eager(q, k, v, cos, sin, kind: str, eps: float, backend: str) -> Tensor:
    from salad_bench.kernels import _linear_attention_impl

    return _linear_attention_impl(q, k, v, kind, cos, sin, eps, backend)


@torch.library.custom_op("salad_bench::linear_attention", mutates_args=())
def linear_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Tensor | None, sin: Tensor | None, kind: str,
                        eps: float, backend: str) -> Tensor:
    # token-major, as the Triton and Gluon kernels write it (the reference's output is copied so)
    return _as_token_major(_lin_eager(q, k, v, cos, sin, kind, eps, backend))


@linear_attention_op.register_fake
def _(q, k, v, cos, sin, kind, eps, backend):
    return token_major(*q.shape, q.dtype, q.device)


@torch.library.custom_op("salad_bench::linear_attention_backward", mutates_args=())
def _lin_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Tensor | None, sin: Tensor | None, kind: str,
                     eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _vjp(lambda q, k, v: _lin_eager(q, k, v, cos, sin, kind, eps, backend), grad, q, k, v)


@_lin_backward_op.register_fake
def _(grad, q, k, v, cos, sin, kind, eps, backend):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _lin_setup(ctx, inputs, output):
    q, k, v, cos, sin, kind, eps, backend = inputs
    ctx.save_for_backward(q, k, v, cos, sin)
    ctx.args = (kind, eps, backend)


def _lin_backward(ctx, grad):
    q, k, v, cos, sin = ctx.saved_tensors
    dq, dk, dv = _lin_backward_op(grad.contiguous(), q, k, v, cos, sin, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


linear_attention_op.register_autograd(_lin_backward, setup_context=_lin_setup)


# -- top-k block selection (Triton) -----------------------------------------------------------------
@torch.library.custom_op("salad_bench::select_topk", mutates_args=())
def select_topk_op(q: Tensor, k: Tensor, keep: int, block_q: int, block_k: int, keep_diagonal: bool) -> tuple[Tensor, Tensor]:
    from salad_bench.kernels.select_triton import _select_topk_impl

    lay = _select_topk_impl(q, k, keep, block_q, block_k, keep_diagonal)
    return lay.kv_idx.contiguous(), lay.kv_cnt.contiguous()


@select_topk_op.register_fake
def _(q, k, keep, block_q, block_k, keep_diagonal):
    from salad_bench.kernels.layout import cdiv
    from salad_bench.kernels.select_triton import kept_width

    b, h, n, _ = q.shape
    mq, mk = cdiv(n, block_q), cdiv(n, block_k)
    width = kept_width(keep, keep_diagonal, n, block_q, block_k, mk)
    return (q.new_empty((b, h, mq, width), dtype=torch.int32), q.new_empty((b, h, mq), dtype=torch.int32))
