"""Where the linear branch's forward time goes at Wan 480p (relu + 3D RoPE, bf16): a diagnostic.

For each option set it prints: the benchmark's timing (``do_bench``: an L2 flush, then one call between
CUDA events), the host time of one call (no synchronisation), the same call replayed from a CUDA graph
(no host work), and the sum of its kernels' device times (torch.profiler). When the first exceeds the
graph replay, the difference is host time the card waits for.

    python3 scripts/linear_host.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels`

import torch  # noqa: E402

from salad_bench.harness.bench_kernels import _updated  # noqa: E402
from salad_bench.kernels import linear_attn as la  # noqa: E402
from salad_bench.kernels.rope import rope_3d_freqs  # noqa: E402
from scripts.linear_probe import device  # noqa: E402

VARIANTS = {
    "default": {},
    "tma": {"tma": True},
    "tma_out_b64w4s2": {"tma": True, "out": {"BLOCK": 64, "num_warps": 4, "num_stages": 2}},
    "out_b64w4s2": {"out": {"BLOCK": 64, "num_warps": 4, "num_stages": 2}},
}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 32760, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    cos, sin = rope_3d_freqs((21, 30, 52), 128, "cuda")
    rows = {}
    for name, opts in VARIANTS.items():
        try:
            with _updated(la.OPTIONS, opts):
                rows[name] = r = device(lambda: la.linear_attention_triton(q, k, v, "relu", cos, sin))
            print(f"{name:<18} do_bench {r['do_bench_us']:6.1f} us  graph {r['graph_us']:6.1f} us  host/call "
                  f"{r['host_us']:6.1f} us  kernels {r['kernel_sum_us']:6.1f} us", flush=True)
        except Exception as exc:  # a diagnostic: report and go on
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
