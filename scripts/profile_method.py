"""Where a method's time goes: the CUDA kernels of one call, from torch.profiler, on a GPU.

    python scripts/profile_method.py salad --sparsity 0.9 --qkv video [--workload wan2.1-1.3b-480p]

Prints the method's median latency (the harness's timer) and its kernels by total CUDA time per call.
"""

from __future__ import annotations

import argparse

import torch

from salad_bench.harness.timing import measure
from salad_bench.harness.workloads import get_workload, make_qkv
from salad_bench.methods import AttnContext, create_method


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", help="comma list")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--qkv", default="video")
    ap.add_argument("--workload", default="wan2.1-1.3b-480p")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    wl = get_workload(args.workload)
    q, k, v = make_qkv(wl, kind=args.qkv, device="cuda", dtype=torch.bfloat16)
    ctx = AttnContext(grid=wl.grid, num_layers=wl.layers)
    for name in args.methods.split(","):
        m = create_method(name, num_heads=wl.heads, head_dim=wl.head_dim, sparsity=args.sparsity).cuda().to(torch.bfloat16)
        m.eval()
        with torch.no_grad():
            t = measure(lambda m=m: m(q, k, v, ctx), torch.device("cuda"))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    m(q, k, v, ctx)
                torch.cuda.synchronize()
        print(f"\n== {name} s={args.sparsity} qkv={args.qkv}: median {t.median_ms:.3f} ms")
        rows = [(e.key, e.device_time_total / args.calls / 1e3, e.count // args.calls) for e in prof.key_averages()
                if e.device_time_total > 0]
        total = sum(r[1] for r in rows)
        for key, ms, n in sorted(rows, key=lambda r: -r[1])[:14]:
            print(f"{ms:8.3f} ms  x{n:<3} {key[:110]}")
        print(f"{total:8.3f} ms  kernels per call in all")


if __name__ == "__main__":
    main()
