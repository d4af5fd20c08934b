"""How much does the forward's last, partial wave cost? (a diagnostic for ``OPTIONS["fwd_split"]``)

At Wan 480p (B=1, H=12, N=32,760, 128 x 64 tiles) the forward runs 3,072 programs of equal work (a
top-k layout keeps the same count in every row); an H200 holds 264 of them at once (132 SMs x 2), so
11 whole waves leave a tail of 168 tiles. This times, in interleaved rounds on one layout at density
0.10: the forward with only the first ``11 * slots + t`` tiles given keys (the rest empty, a few
microseconds) for several tails ``t``, and the whole layout with the tail split (``fwd_split``). If a
partial wave took its share of a wave's time, the time would grow linearly in ``t``; the curve shows
what a tail really costs on this card.

    python3 scripts/wave_tail.py [--rounds 5] [--out DIR]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `kernels` and `harness`

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from salad_bench.harness.bench_kernels import random_layout  # noqa: E402
from salad_bench.kernels import block_sparse as bs  # noqa: E402
from salad_bench.kernels.layout import BlockLayout  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="directory for wave_tail.json")
    args = p.parse_args()
    dev = torch.device("cuda")
    b, h, n, d = 1, 12, 32760, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    lay = random_layout(b, h, n, 128, 64, 0.1, dev, seed=100)
    tiles = lay.kv_cnt.numel()
    slots = bs._sm_count(dev) * 2
    main_tiles = tiles - tiles % slots
    cases = {}
    for tail in sorted({0, slots // 8, slots // 4, slots // 2, tiles - main_tiles, (3 * slots) // 4, slots}):
        cnt = lay.kv_cnt.clone().view(-1)
        cnt[main_tiles + tail:] = 0
        cases[f"tiles={main_tiles + tail}"] = (BlockLayout(lay.kv_idx, cnt.view_as(lay.kv_cnt), 128, 64, n), 0)
    cases["all, split (2 per SM)"] = (lay, 2)
    cases["all, split (3 per SM)"] = (lay, 3)
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (layout, split) in cases.items():
            bs.OPTIONS["fwd_split"] = split
            times[name].append(do_bench(lambda layout=layout: bs.block_sparse_attention_triton(q, k, v, layout),
                                        warmup=25, rep=200))
    bs.OPTIONS["fwd_split"] = 0
    plan = bs._split_plan(tiles, slots)
    summary = {name: statistics.median(ts) for name, ts in times.items()}
    report = {"card": torch.cuda.get_device_name(dev), "tiles": tiles, "slots": slots, "split_plan": plan,
              "times_ms": times, "median_ms": summary}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "wave_tail.json").write_text(json.dumps(report, indent=1))
    print(f"{report['card']}: {tiles} tiles, {slots} slots, split plan (parts, whole tiles) = {plan}")
    for name, ms in summary.items():
        print(f"  {name:<24} {ms:.4f} ms  [{min(times[name]):.4f}-{max(times[name]):.4f}]")


if __name__ == "__main__":
    main()
