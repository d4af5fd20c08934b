"""SALAD's two branches in one pass over the queries: block-sparse attention with the linear branch's
Q pass fused into its epilogue.

``sparse_linear_attention_triton(q, k, v, layout, kind, cos, sin)`` returns what
``block_sparse_attention_triton(q, k, v, layout)`` and ``linear_attention_triton(q, k, v, kind, cos, sin)``
return, from two launches instead of three: the linear branch's K/V pass (its state and normaliser,
:func:`kernels.linear_attn._state_pass`), then the sparse forward, which computes the linear output
for the rows it owns after its own epilogue (the state is read once per program; the queries come back
from L2). The backward is the two kernels' backwards, gradients summed.
"""

from __future__ import annotations

import math

import torch

from salad_bench.kernels import block_sparse as bs
from salad_bench.kernels import linear_attn as la
from salad_bench.kernels.errors import Unsupported
from salad_bench.kernels.layout import BlockLayout

__all__ = ["sparse_linear_attention_triton"]


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_idx, kv_cnt, block_q, block_k, scale, cos, sin, kind, rope, eps):
        layout = BlockLayout(kv_idx, kv_cnt, block_q, block_k, q.shape[2])
        state, _, _ = la._state_pass(k, v, kind, cos, sin, rope)
        out_l = torch.empty_like(q)
        lin = {"out": out_l, "state": state, "cos": cos, "sin": sin, "rope": rope, "kind": kind, "eps": eps,
               "modes": la._modes(q.dtype)}
        out, lse = bs._forward_with_options(q, k, v, layout, scale, lin=lin)
        ctx.save_for_backward(q, k, v, out, lse, kv_idx, kv_cnt, cos, sin, state)
        ctx.meta = (block_q, block_k, scale, kind, rope, eps)
        ctx.mark_non_differentiable(lse)
        return out, out_l, lse

    @staticmethod
    def backward(ctx, dout, dout_l, _dlse):
        q, k, v, out, lse, kv_idx, kv_cnt, cos, sin, state = ctx.saved_tensors
        block_q, block_k, scale, kind, rope, eps = ctx.meta
        layout = BlockLayout(kv_idx, kv_cnt, block_q, block_k, q.shape[2])
        parts = []
        if dout is not None:
            parts.append(bs._backward(dout, q, k, v, out, lse, layout, scale, order=bs.OPTIONS["bwd_order"],
                                      use_tma=bs.OPTIONS["bwd_tma"]))
        if dout_l is not None:
            parts.append(la._backward(dout_l, q, k, v, kind, cos, sin, rope, eps, state))
        grads = [sum(g) for g in zip(*parts, strict=True)] if parts else [None, None, None]
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def sparse_linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    kind: str = "relu",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: float | None = None,
    return_lse: bool = False,
):
    """``(out_sparse, out_linear)`` (and the sparse branch's log-sum-exp with ``return_lse``), each as the
    separate kernels give it; differentiable in q, k, v. Inputs as for
    :func:`kernels.block_sparse.block_sparse_attention_triton` and
    :func:`kernels.linear_attn.linear_attention_triton`; raises :class:`Unsupported` where either cannot
    run, and for the warp-specialised forward (``fwd_ws``), which has no linear epilogue."""
    if bs.OPTIONS["fwd_ws"]:
        raise Unsupported("the fused sparse + linear forward is not built for fwd_ws; turn fwd_ws off")
    bs._check(q, k, v, layout)
    q, k, v, cos_t, sin_t, rope, kind_id = la._prepare(q, k, v, kind, cos, sin)
    if la.OPTIONS.get("pairs"):
        raise Unsupported("the fused linear epilogue reads the half-layout state; turn linear_attn's pairs off")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, out_l, lse = _SparseLinear.apply(q, k, v, layout.kv_idx, layout.kv_cnt, layout.block_q, layout.block_k,
                                          scale, cos_t, sin_t, kind_id, rope, float(eps))
    return (out, out_l, lse) if return_lse else (out, out_l)
