"""Probe (GPU, about 90 s): which SDPA backend trains the base model fastest, eager and compiled.

For the ``bar`` preset of ``train_base`` (8 layers, 4 heads x 64, batch 16 x 9,216 tokens, bf16 autocast):
the self-attention call alone (forward + backward at the model's shape), then whole training steps (forward,
backward, clipping, AdamW) under each ``--sdpa-first`` choice, eager and with the blocks compiled as
``--compile`` does, one fresh model per arm, arms alternated over ROUNDS rounds (default 2); the attention
kernels that ran are read from a profiled step. Usage: python scripts/probe_train_sdpa.py OUT_JSON [ARMS [ROUNDS]]. Written for
docs/lab/2026-12-07-flat-heads.md."""

import json
import sys
import time

import torch
import torch.nn.functional as F

from salad_bench.harness.quality.data import ProceduralVideos
from salad_bench.harness.quality.metrics import flow_matching_mse
from salad_bench.harness.quality.model import MiniWan
from salad_bench.harness.quality.train import compile_blocks, sdpa_preference
from salad_bench.harness.quality.train_base import BAR
from salad_bench.harness.results import provenance

out = sys.argv[1]
arms = (sys.argv[2] if len(sys.argv) > 2 else "default,cudnn").split(",")
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
dev = torch.device("cuda")
B, H, N, D = 16, BAR.num_heads, BAR.spec.tokens, BAR.head_dim
rows = []


def cuda_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def attention_call(arm):
    """The self-attention call alone, forward and forward + backward (3.5x the forward's FLOPs)."""
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16)
    with sdpa_preference(arm):
        fwd = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v), 10)
        both = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v).backward(g), 10)
    flops = 4 * B * H * N * N * D
    return {"what": "self-attention call", "arm": arm, "fwd_ms": fwd, "fwd_bwd_ms": both,
            "fwd_tflops": flops / fwd / 1e9, "fwd_bwd_tflops": 3.5 * flops / both / 1e9}  # fmt: skip


# 1. the attention call alone
for arm in arms:
    rows.append(attention_call(arm))
    print(rows[-1], flush=True)

# 2. whole training steps, one fresh model per arm, eager then compiled, two rounds alternated
data = ProceduralVideos("train", None, BAR.spec, BAR.num_classes)
x0, labels = data.batch(list(range(B)), dev)
gen = torch.Generator().manual_seed(0)
t = torch.sigmoid(torch.randn(B, generator=gen)).to(dev)
noise = torch.randn(x0.shape, generator=gen).to(dev)


def arm_steps(arm, compiled, reps=10):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MiniWan(BAR).to(dev)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4)
    if compiled:
        compile_blocks(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_matching_mse(model, x0, labels, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    with sdpa_preference(arm):
        c0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - c0
        ms = cuda_ms(step, reps)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    names = {}
    for ev in prof.key_averages():
        n = ev.key.lower()
        if any(w in n for w in ("flash", "fmha", "cudnn", "attention", "sdpa", "mha")):
            names[ev.key[:90]] = round(ev.device_time_total / 1e3, 2)  # ms in the profiled step
    return {"what": "train step", "arm": arm, "compiled": compiled, "step_ms": ms, "first_step_s": first_s,
            "attention_kernels_ms": dict(sorted(names.items(), key=lambda kv: -kv[1])[:6])}  # fmt: skip


for rnd in range(rounds):
    for compiled in (False, True):
        for arm in arms if rnd == 0 else arms[::-1]:
            r = {**arm_steps(arm, compiled), "round": rnd}
            torch.cuda.empty_cache()
            rows.append(r)
            print({k: r[k] for k in ("arm", "compiled", "round", "step_ms", "first_step_s")}, flush=True)

prov = provenance(str(dev))
with open(out, "w") as f:
    json.dump({"provenance": prov, "shape": {"B": B, "H": H, "N": N, "D": D}, "rows": rows}, f, indent=1)
print(f"\n{'arm':8} {'compiled':8} {'step ms (rounds)':>22}")
for arm in arms:
    for compiled in (False, True):
        ms = [
            r["step_ms"]
            for r in rows
            if r.get("what") == "train step" and r["arm"] == arm and r["compiled"] == compiled
        ]
        print(f"{arm:8} {compiled!s:8} {' / '.join(f'{m:.1f}' for m in ms):>22}")
