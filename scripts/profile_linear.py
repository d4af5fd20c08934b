"""One linear-branch forward at Wan 480p (relu + 3D RoPE, bf16), warmed up, for a profiler:

    ncu --kernel-name "regex:(state|out)_kernel" --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python3 scripts/profile_linear.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels`

import torch  # noqa: E402

from salad_bench.kernels import linear_attn as la  # noqa: E402
from salad_bench.kernels.rope import rope_3d_freqs  # noqa: E402

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 12, 32760, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
cos, sin = rope_3d_freqs((21, 30, 52), 128, "cuda")
for _ in range(3):
    la.linear_attention_triton(q, k, v, "relu", cos, sin)
torch.cuda.synchronize()
