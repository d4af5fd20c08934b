"""The linear branch's feature maps ``f`` as Triton functions, shared by its Triton passes
(:mod:`kernels.linear_attn`) and its Gluon passes (:mod:`kernels.linear_gluon`, which call them on their
own layouts). ``KIND``: 0 relu, 1 elu (elu + 1), 2 softmax over the head dim (as
:func:`kernels.reference.feature_map`)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["feature", "feature_bwd"]


@triton.jit
def feature(x, KIND: tl.constexpr):
    """``f(x)`` of an fp32 ``rows x D`` tile."""
    if KIND == 0:
        return tl.maximum(x, 0.0)
    elif KIND == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        m = tl.max(x, 1)
        e = tl.exp(x - m[:, None])
        return e / tl.sum(e, 1)[:, None]


@triton.jit
def feature_bwd(x, a, da, KIND: tl.constexpr):
    """The gradient through ``a = f(x)`` given ``da``."""
    if KIND == 0:
        return tl.where(x > 0, da, 0.0)
    elif KIND == 1:
        return tl.where(x > 0, da, da * a)
    else:
        return a * (da - tl.sum(da * a, 1)[:, None])
