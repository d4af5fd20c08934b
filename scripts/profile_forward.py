"""One block-sparse forward (or cuDNN dense SDPA) at Wan 480p, warmed up, for a profiler.

The headline layout (top-k at density 0.10 with the diagonal kept, 128 x 64 tiles, bf16); only the last
call runs inside cudaProfilerStart/Stop, so ncu sees one launch:

    ncu --profile-from-start off --set full python3 scripts/profile_forward.py [ours|cudnn]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels` and `harness`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from salad_bench.harness.bench_kernels import random_layout  # noqa: E402
from salad_bench.kernels import block_sparse as bs  # noqa: E402

which = sys.argv[1] if len(sys.argv) > 1 else "ours"
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(1, 12, 32760, 128, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3))
lay = random_layout(1, 12, 32760, 128, 64, 0.1, dev, seed=100)


def call():
    if which == "cudnn":
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return bs.block_sparse_attention_triton(q, k, v, lay)


for _ in range(3):
    call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
