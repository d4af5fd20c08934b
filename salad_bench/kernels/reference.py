"""Plain-torch references for the kernels: the ground truth in tests and the CPU execution path.

Layout ``(B, H, N, D)`` throughout. Computation is done in float32 (or float64 if the inputs are
float64) and the output is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch

from salad_bench.kernels.layout import BlockLayout

__all__ = ["block_sparse_attention_gather", "block_sparse_attention_ref", "token_mask_from_layout", "feature_map", "linear_attention_ref"]


def token_mask_from_layout(layout: BlockLayout, q_rows: slice | None = None) -> torch.Tensor:
    """Bool ``(B, H, Nq, N)`` token mask of the layout (rows restricted to ``q_rows``)."""
    tiles = layout.to_dense()  # (B, H, Mq, Mk)
    n = layout.seq_len
    qb = torch.arange(n, device=tiles.device) // layout.block_q
    kb = torch.arange(n, device=tiles.device) // layout.block_k
    if q_rows is not None:
        qb = qb[q_rows]
    return tiles[:, :, qb][:, :, :, kb]


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    return_lse: bool = False,
    chunk_rows: int = 2048,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to the layout's kept tiles.

    Query rows whose block keeps no key block give zeros and a log-sum-exp of ``-inf``.
    Rows are processed in chunks so memory stays ``O(chunk_rows * N)`` per (batch, head).
    Differentiable through autograd (used as the gradient reference).
    """
    b, h, n, d = q.shape
    if layout.seq_len != n or layout.kv_cnt.shape[:2] != (b, h):
        raise ValueError(f"layout is for N={layout.seq_len}, B,H={tuple(layout.kv_cnt.shape[:2])}; q is {tuple(q.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(work), k.to(work), v.to(work)
    outs, lses = [], []
    step = max(layout.block_q, (chunk_rows // layout.block_q) * layout.block_q)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        mask = token_mask_from_layout(layout, rows)
        s = torch.einsum("bhqd,bhkd->bhqk", qf[:, :, rows], kf) * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(s - safe.unsqueeze(-1)) * mask
        outs.append(torch.einsum("bhqk,bhkd->bhqd", p, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=2).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=2)
    return out


FeatureMap = str  # "relu" | "elu" | "softmax"


def feature_map(x: torch.Tensor, kind: FeatureMap) -> torch.Tensor:
    """Positive feature maps for linear attention (applied over the head dim)."""
    if kind == "relu":
        return torch.relu(x)
    if kind == "elu":
        return torch.nn.functional.elu(x) + 1.0
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    raise ValueError(f"feature_map must be one of relu, elu, softmax; got {kind!r}")


def linear_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: FeatureMap = "relu",
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Non-causal linear attention with an optional rotary embedding inside the branch.

    ``O[i] = (R_i f(q_i))^T S / (f(q_i)^T z + eps)`` with ``S = sum_j (R_j f(k_j)) v_j^T`` (D x D per
    head) and ``z = sum_j f(k_j)``: the rotation acts on the numerator only and the normaliser keeps
    the un-rotated features, so it stays positive. ``(B, H, N, D)`` in, same out.
    """
    from salad_bench.kernels.rope import apply_rope

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq, fk = feature_map(q.to(work), kind), feature_map(k.to(work), kind)
    z = fk.sum(dim=2)  # (B, H, D)
    den = torch.einsum("bhnd,bhd->bhn", fq, z).unsqueeze(-1) + eps
    if cos is not None:
        fq, fk = apply_rope(fq, cos, sin), apply_rope(fk, cos, sin)
    state = torch.einsum("bhnd,bhne->bhde", fk, v.to(work))
    num = torch.einsum("bhnd,bhde->bhne", fq, state)
    return (num / den).to(q.dtype)


def block_sparse_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    return_lse: bool = False,
    max_chunk_elems: int = 1 << 25,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The torch execution path: gathers only the kept key blocks of each query block.

    Work and memory scale with the kept tiles (not N^2), so this is the CPU backend; results equal
    :func:`block_sparse_attention_ref`. Differentiable through autograd.
    """
    b, h, n, d = q.shape
    if layout.seq_len != n or layout.kv_cnt.shape[:2] != (b, h):
        raise ValueError(f"layout is for N={layout.seq_len}, B,H={tuple(layout.kv_cnt.shape[:2])}; q is {tuple(q.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bq, bk = layout.block_q, layout.block_k
    mq, mk = layout.num_q_blocks, layout.num_k_blocks
    kmax = layout.kv_idx.shape[-1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    pad_q, pad_k = mq * bq - n, mk * bk - n
    qf = torch.nn.functional.pad(q.to(work), (0, 0, 0, pad_q)).reshape(b, h, mq, bq, d)
    kf = torch.nn.functional.pad(k.to(work), (0, 0, 0, pad_k)).reshape(b, h, mk, bk, d)
    vf = torch.nn.functional.pad(v.to(work), (0, 0, 0, pad_k)).reshape(b, h, mk, bk, d)
    slot_ok = torch.arange(kmax, device=q.device) < layout.kv_cnt.unsqueeze(-1)  # (B, H, Mq, Kmax)
    idx = torch.where(slot_ok, layout.kv_idx.long(), 0)
    key_pos = idx.unsqueeze(-1) * bk + torch.arange(bk, device=q.device)  # (B, H, Mq, Kmax, bk)
    key_ok = slot_ok.unsqueeze(-1) & (key_pos < n)
    rows = max(1, max_chunk_elems // max(1, b * h * bq * kmax * bk))
    outs, lses = [], []
    for s in range(0, mq, rows):
        e = min(mq, s + rows)
        gi = idx[:, :, s:e].reshape(b, h, -1)  # (B, H, C*Kmax)
        kg = torch.gather(kf, 2, gi[..., None, None].expand(-1, -1, -1, bk, d)).view(b, h, e - s, kmax * bk, d)
        vg = torch.gather(vf, 2, gi[..., None, None].expand(-1, -1, -1, bk, d)).view(b, h, e - s, kmax * bk, d)
        sc = torch.einsum("bhmqd,bhmkd->bhmqk", qf[:, :, s:e], kg) * scale
        ok = key_ok[:, :, s:e].reshape(b, h, e - s, 1, kmax * bk)
        sc = sc.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(sc, dim=-1)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(sc - safe.unsqueeze(-1)) * ok
        outs.append(torch.einsum("bhmqk,bhmkd->bhmqd", p, vg))
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(b, h, mq * bq, d)[:, :, :n].to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=2).reshape(b, h, mq * bq)[:, :, :n]
    return out
