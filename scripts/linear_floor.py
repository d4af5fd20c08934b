"""How fast can the linear branch's two passes stream at Wan 480p on this card? (a diagnostic)

Times, on (1, 12, 32760, 128) bf16 tensors, with the chunked grid and tiles the linear kernels use
(``kernels.linear_attn._chunks``; 32-token tiles, 4 warps, 3 stages): a Triton pass that only copies Q to
O (the Q pass's traffic), one that only reads K and V (the K/V pass's traffic; a per-program sum is
stored so the loads stay), the same two with 128-token programs over a large grid, and torch's own
copy. The gap between these floors and the real passes is the compute the kernels add.

    python3 scripts/linear_floor.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels`

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from salad_bench.kernels.linear_attn import _chunks  # noqa: E402


@triton.jit
def _copy(X, Y, N, CHUNK, D: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(1).to(tl.int64) * N * D
    start = tl.program_id(0) * CHUNK
    for s in range(start, tl.minimum(start + CHUNK, N), BLOCK):
        offs = s + tl.arange(0, BLOCK)
        ptr = offs[:, None] * D + tl.arange(0, D)[None, :]
        x = tl.load(X + base + ptr, mask=offs[:, None] < N, other=0.0)
        tl.store(Y + base + ptr, x, mask=offs[:, None] < N)


@triton.jit
def _read2(X, Z, P, N, CHUNK, D: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(1).to(tl.int64) * N * D
    start = tl.program_id(0) * CHUNK
    acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    for s in range(start, tl.minimum(start + CHUNK, N), BLOCK):
        offs = s + tl.arange(0, BLOCK)
        ptr = offs[:, None] * D + tl.arange(0, D)[None, :]
        acc += tl.load(X + base + ptr, mask=offs[:, None] < N, other=0.0).to(tl.float32)
        acc += tl.load(Z + base + ptr, mask=offs[:, None] < N, other=0.0).to(tl.float32)
    tl.store(P + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * D + tl.arange(0, D), tl.sum(acc, 0))


def _time_pair(q, k, v, o, nsplit, chunk, block, warps, stages) -> tuple[float, float]:
    b, h, n, d = q.shape
    part = torch.empty(b * h * nsplit * d, device="cuda", dtype=torch.float32)
    launch = {"D": d, "BLOCK": block, "num_warps": warps, "num_stages": stages}
    copy_ms = do_bench(lambda: _copy[(nsplit, b * h)](q, o, n, chunk, **launch), warmup=25, rep=200)
    read_ms = do_bench(lambda: _read2[(nsplit, b * h)](k, v, part, n, chunk, **launch), warmup=25, rep=200)
    return copy_ms, read_ms


def main() -> None:
    b, h, n, d = 1, 12, 32760, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    o = torch.empty_like(q)
    cards = torch.cuda.get_device_name()
    rows = []
    for label, (nsplit, chunk), warps, stages, block in (
        ("chunked grid (as the kernels)", _chunks(n, b * h, q.device), 4, 3, 32),
        ("chunked grid, 8 warps 64-token tiles", _chunks(n, b * h, q.device), 8, 3, 64),
        ("128-token programs", (triton.cdiv(n, 128), 128), 4, 3, 32),
        ("512-token programs", (triton.cdiv(n, 512), 512), 4, 3, 64),
    ):
        copy_ms, read_ms = _time_pair(q, k, v, o, nsplit, chunk, block, warps, stages)
        rows.append((label, nsplit * b * h, copy_ms, read_ms))
    torch_ms = do_bench(lambda: o.copy_(q), warmup=25, rep=200)
    mb = q.numel() * q.element_size() / 1e6
    print(f"card: {cards}; tensors {mb:.1f} MB each")
    print("| grid | programs | copy Q->O ms (TB/s) | read K,V ms (TB/s) |")
    print("|---|---|---|---|")
    for label, progs, c, r in rows:
        print(f"| {label} | {progs} | {c * 1e3:.1f} us ({2 * mb / c / 1e3:.2f}) | {r * 1e3:.1f} us ({2 * mb / r / 1e3:.2f}) |")
    print(f"| torch copy_ | - | {torch_ms * 1e3:.1f} us ({2 * mb / torch_ms / 1e3:.2f}) | - |")


if __name__ == "__main__":
    main()
