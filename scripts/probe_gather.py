"""Probe (GPU): ways to put k and v into a token permutation (STA's tile order, VSA's cube order).

Since 809cc28 `sta` and `vsa` gather only k and v at inference; the gate run of that commit left `sta` 0.30 ms of
glue on heads-major inputs and 0.17 ms on the model's token-major layout (docs/lab/2026-12-07-q-index.md), where
moving 2 x 100 MB in and out takes about 0.13 ms. This times, at Wan 480p (B=1, H=12, N=32,760, D=128, bf16) with
`sta`'s own tile permutation, for heads-major and token-major inputs:

* `index_select`: what `methods.base.gather_tokens` does today (heads-major: `index_select` on the token dim;
  token-major: whole `H * D` rows);
* `advanced`: `x[:, :, perm]`;
* `triton_kv_rR`: one Triton launch that gathers k and v together, each program R rows of one (batch, head),
  output heads-major (contiguous), R in 32, 64, 128;
* `triton_kv_tokens_rR`: the same, output token-major (what the kernel's TMA descriptors read as well);
* `copy`: `k.clone(); v.clone()`, the bandwidth floor for the same bytes.

Each result is checked against `index_select`. Usage: python scripts/probe_gather.py OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch
import triton

import salad_bench.methods.base as mbase
from salad_bench.harness.timing import measure
from salad_bench.harness.workloads import get_workload, make_qkv
from salad_bench.kernels.gather import _gather_pair_kernel
from salad_bench.kernels.gather import gather_pair as kernel_gather_pair
from salad_bench.kernels.layout import gather_tokens, token_major
from salad_bench.methods import AttnContext, create_method


def gather_kv_triton(k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, tokens_out: bool, rows: int = 64):
    """The package's gather kernel (kernels.gather) at another row count and output layout."""
    b, h, n, d = k.shape
    if tokens_out:
        ko, vo = token_major(b, h, n, d, k.dtype, k.device), token_major(b, h, n, d, v.dtype, v.device)
    else:
        ko, vo = torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)
    _gather_pair_kernel[(triton.cdiv(n, rows), b * h)](
        k, v, ko, vo, perm, h, n, *k.stride()[:3], *v.stride()[:3], *ko.stride()[:3], d, DP=d, ROWS=rows, num_warps=4
    )
    return ko, vo


def ways(k, v, perm, perm64) -> dict:
    return {
        "index_select": lambda: (gather_tokens(k, perm64), gather_tokens(v, perm64)),
        "advanced": lambda: (k[:, :, perm64], v[:, :, perm64]),
        **{f"triton_kv_r{r}": (lambda r=r: gather_kv_triton(k, v, perm, tokens_out=False, rows=r)) for r in (32, 64, 128)},
        **{f"triton_kv_tokens_r{r}": (lambda r=r: gather_kv_triton(k, v, perm, tokens_out=True, rows=r))
           for r in (32, 64, 128)},
        "gather_pair": lambda: kernel_gather_pair(k, v, perm),
        "copy": lambda: (k.clone(), v.clone()),
    }


def main() -> int:
    out_path = sys.argv[1]
    wl = get_workload("wan2.1-1.3b-480p")
    b, h, n, d = 1, wl.heads, wl.n, wl.head_dim
    sta = create_method("sta", num_heads=h, head_dim=d, sparsity=0.9)
    perm = sta._permutation(tuple(wl.grid), n, "cuda:0")[0].to(torch.int32).contiguous()
    perm64 = perm.long()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for layout in ("heads", "tokens"):
        k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        if layout == "tokens":
            k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
        want_k, want_v = gather_tokens(k, perm64), gather_tokens(v, perm64)
        for name, fn in ways(k, v, perm, perm64).items():
            gk, gv = fn()
            ok = name == "copy" or (torch.equal(gk, want_k) and torch.equal(gv, want_v))
            t = measure(fn, torch.device("cuda"), warmup_ms=25, rep_ms=200)
            gb = 4 * k.numel() * k.element_size() / 1e9  # read and write k and v
            results.append({"input": layout, "way": name, "ms": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms,
                            "GB/s": gb / (t.median_ms / 1e3), "equal": ok})
            print(f"{layout:7} {name:22} {t.median_ms:7.3f} ms  {gb / (t.median_ms / 1e3):7.0f} GB/s  equal={ok}", flush=True)
    # the methods as called: k and v gathered by the package's dispatch (since f8d352a the launch for heads-major
    # pairs, index_select for token-major ones) against index_select throughout
    ctx = AttnContext(grid=wl.grid, num_layers=wl.layers)
    new = mbase.gather_pair
    old = lambda a, b, index, backend: (gather_tokens(a, index), gather_tokens(b, index))  # noqa: E731
    for kind in ("video", "wan"):
        q, k, v = make_qkv(wl, kind=kind, device="cuda", dtype=torch.bfloat16)
        for name in ("sta", "salad_sta", "vsa"):
            m = create_method(name, num_heads=h, head_dim=d, sparsity=0.9).cuda().to(torch.bfloat16).eval()
            outs = {}
            for _ in range(2):  # alternate, twice
                for way, fn in (("index_select", old), ("gather_pair", new)):
                    mbase.gather_pair = fn
                    with torch.no_grad():
                        outs[way] = m(q, k, v, ctx)
                        t = measure(lambda m=m, q=q, k=k, v=v: m(q, k, v, ctx), torch.device("cuda"), warmup_ms=25, rep_ms=200)
                    results.append({"input": kind, "method": name, "way": way, "ms": t.median_ms, "p20": t.p20_ms,
                                    "p80": t.p80_ms})
                    print(f"{kind:7} {name:10} {way:14} {t.median_ms:7.3f} ms", flush=True)
            mbase.gather_pair = new
            print(f"{kind:7} {name:10} outputs equal: {torch.equal(outs['index_select'], outs['gather_pair'])}", flush=True)
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "shape": [b, h, n, d], "grid": list(wl.grid)}
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
