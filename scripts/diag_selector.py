"""Stage-by-stage check of the Triton block selector against the torch rule on a GPU.

python scripts/diag_selector.py   (prints one line per stage; the first failing stage localises a fault)

``_dbg_kernel`` is the selector's top-k bisection alone, run with 1 to 16 query-block rows per program:
on the H200 with Triton 3.6 (2026-11-28) every configuration with more than one row computed the right
threshold only for the first row(s) of each program at Mk = 512, which is why the selector now runs one
row per program (docs/lab/kernels-notes.md, run 4).
"""
import math
import sys

import torch

sys.path.insert(0, ".")
from salad_bench.harness.workloads import get_workload, make_qkv  # noqa: E402
from salad_bench.kernels import keep_count  # noqa: E402
from salad_bench.kernels import select_triton as st  # noqa: E402
from salad_bench.kernels.selection import block_scores, diagonal_blocks, pool_blocks, topk_layout, topp_layout  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def frac(a, b):
    return (a ^ b).float().mean().item()


def dump(name, ref, lay_o, lay_r):
    valid = torch.arange(lay_o.kv_idx.shape[-1], device=lay_o.kv_idx.device) < lay_o.kv_cnt.unsqueeze(-1)
    oob = valid & ((lay_o.kv_idx < 0) | (lay_o.kv_idx >= lay_o.num_k_blocks))
    if oob.any():
        r = oob.any(-1).nonzero()
        b, h, m = r[0].tolist()
        print(f"  {name}: {oob.sum().item()} out-of-range indices in {r.shape[0]} rows; first b={b} h={h} m={m}"
              f" cnt={lay_o.kv_cnt[b, h, m].item()} idx={lay_o.kv_idx[b, h, m, :32].tolist()}")
        print("   ref idx", lay_r.kv_idx[b, h, m, :32].tolist())
        return
    ours = lay_o.to_dense()
    bad = (ours ^ ref).any(-1).nonzero()
    print(f"  {name}: {bad.shape[0]} bad rows of {ref[..., 0].numel()}")
    if bad.shape[0]:
        b, h, m = bad[0].tolist()
        print(f"  first bad row b={b} h={h} m={m} cnt ours={lay_o.kv_cnt[b, h, m].item()} ref={lay_r.kv_cnt[b, h, m].item()}")
        print("   ours idx", lay_o.kv_idx[b, h, m, :24].tolist())
        print("   ref  idx", lay_r.kv_idx[b, h, m, :24].tolist())
        print("   ours only", (ours[b, h, m] & ~ref[b, h, m]).nonzero().flatten()[:16].tolist())
        print("   ref only", (ref[b, h, m] & ~ours[b, h, m]).nonzero().flatten()[:16].tolist())


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _dbg_kernel(S, OUT, keep, MK, COLS: tl.constexpr, ROWS: tl.constexpr, SUMF: tl.constexpr):
    m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    valid = cols[None, :] < MK
    s = tl.load(S + m[:, None] * MK + cols[None, :], mask=valid, other=0.0)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(valid, key, -2147483648)
    lo = tl.full([ROWS], -2147483648, tl.int32)
    hi = tl.full([ROWS], 2147483647, tl.int32)
    mid0 = (lo | hi) - ((lo ^ hi) >> 1)
    for _ in range(32):
        mid = (lo | hi) - ((lo ^ hi) >> 1)
        if SUMF:
            n_ge = tl.sum((key >= mid[:, None]).to(tl.float32), 1).to(tl.int32)
        else:
            n_ge = tl.sum((key >= mid[:, None]).to(tl.int32), 1)
        ok = n_ge >= keep
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    gt = key > lo[:, None]
    n_gt = tl.sum(gt.to(tl.int32), 1)
    eq = (key == lo[:, None]) & valid
    rank = tl.cumsum(eq.to(tl.int32), 1)
    sel = gt | (eq & (rank <= (keep - n_gt)[:, None]))
    tl.store(OUT + m * 6 + 0, lo)
    tl.store(OUT + m * 6 + 1, hi)
    tl.store(OUT + m * 6 + 2, n_gt)
    tl.store(OUT + m * 6 + 3, tl.sum(sel.to(tl.int32), 1))
    tl.store(OUT + m * 6 + 4, mid0)
    tl.store(OUT + m * 6 + 5, tl.sum(eq.to(tl.int32), 1))


def dbg(scores, keep, n, mk):
    s = scores[0, 0].float().contiguous()
    mq = s.shape[0]
    s = torch.nn.functional.pad(s, (0, 0, 0, -(-mq // 16) * 16 - mq)).contiguous()
    bits = s.view(torch.int32)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    kth = key.sort(-1, descending=True).values[:, keep - 1]
    for rows, warps, sumf in [(16, 8, 0), (16, 4, 0), (16, 1, 0), (16, 8, 1), (8, 4, 0), (4, 4, 0), (2, 4, 0),
                              (1, 4, 0), (1, 1, 0), (1, 8, 0)]:
        out = torch.zeros(s.shape[0], 6, dtype=torch.int32, device=s.device)
        try:
            _dbg_kernel[(s.shape[0] // rows,)](s, out, keep, mk, COLS=triton.next_power_of_2(mk), ROWS=rows,
                                               SUMF=sumf, num_warps=warps)
            wrong = (out[:mq, 0] != kth[:mq]).nonzero().flatten()
            print(f"  dbg rows={rows} warps={warps} sumf={sumf}: lo wrong in {wrong.numel()} of {mq} rows,"
                  f" n_sel != keep in {(out[:mq, 3] != keep).sum().item()}; first wrong {wrong[:8].tolist()}")
        except Exception as e:  # noqa: BLE001
            print(f"  dbg rows={rows} warps={warps} failed: {type(e).__name__}: {str(e)[:200]}")


def run(n, dtype, sparsity):
    wl = get_workload("wan2.1-1.3b-480p")
    torch.manual_seed(0)
    if n == wl.n:
        q, k, _ = make_qkv(wl, device=DEV, dtype=dtype)
    else:
        q = torch.randn(1, 2, n, 128, device=DEV, dtype=dtype)
        k = torch.randn(1, 2, n, 128, device=DEV, dtype=dtype)
    mk = -(-n // 64)
    keep = keep_count(sparsity, mk)
    print(f"== N={n} {dtype} sparsity={sparsity} keep={keep} Mk={mk}")
    scale = 1 / math.sqrt(q.shape[-1])
    pq_ref, pk_ref = pool_blocks(q, 128) * scale, pool_blocks(k, 64)
    pq, pk = st._pool(q, k, 128, 64, scale)
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"  pool q maxdiff {(pq - pq_ref).abs().max().item():.3e}  pool k maxdiff {(pk - pk_ref).abs().max().item():.3e}")
    ref_scores = block_scores(q, k, 128, 64)
    sc = st.block_scores_triton(q, k, 128, 64)
    print(f"  scores maxdiff {(sc - ref_scores).abs().max().item():.3e} (scale {ref_scores.abs().max().item():.3e})")
    diag = diagonal_blocks(n, 128, 64, q.device)
    dbg(ref_scores, keep, n, mk)
    lr = topk_layout(ref_scores, keep, n, 128, 64, diag)
    ref = lr.to_dense()
    lo = st.topk_layout_triton(ref_scores, keep, n, 128, 64, "diagonal")
    dump("topk scores_given", ref, lo, lr)
    lf = st.select_topk_triton(q, k, keep, 128, 64, keep_diagonal=True)
    dump("topk from q, k", ref, lf, lr)
    lpr = topp_layout(ref_scores, 0.9, n, 128, 64, diag)
    lpo = st.topp_layout_triton(ref_scores, 0.9, n, 128, 64, "diagonal")
    dump("topp scores_given", lpr.to_dense(), lpo, lpr)
    lpf = st.select_topp_triton(q, k, 0.9, 128, 64, keep_diagonal=True)
    dump("topp from q, k", lpr.to_dense(), lpf, lpr)


if __name__ == "__main__":
    for n, dt, sp in [(1000, torch.float32, 0.5), (32760, torch.bfloat16, 0.9), (32760, torch.bfloat16, 0.5)]:
        try:
            run(n, dt, sp)
        except Exception as e:  # noqa: BLE001
            print(f"  FAILED {type(e).__name__}: {e}")
