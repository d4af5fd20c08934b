"""Probe (CPU, a few minutes): how peaked each head of the base model's self-attention is.

For checkpoints/mini-wan-v2, on N_VIDEOS validation videos x t in (0.1, 0.5, 0.9) and ROWS query rows drawn
per call: per layer and head, the entropy of each row's softmax as a fraction of ln N (1 = uniform), the
logit range (max - min) and the max - mean, the mass of each row's best 10% of keys, and the head's share
of the RMS-normed q and k (qk-norm runs across heads, so a head can be made flat by shrinking its q, k).
Usage: python scripts/probe_head_entropy.py [N_VIDEOS] [OUT_JSON]. Written for docs/lab/2026-12-07-flat-heads.md."""

import json
import math
import sys

import torch
import torch.nn.functional as F

from salad_bench.harness.integrations.wan import install_attention, restore_attention
from salad_bench.harness.quality.data import ProceduralVideos
from salad_bench.harness.quality.model import load_checkpoint
from salad_bench.harness.quality.sampler import make_noise
from salad_bench.methods.base import AttentionMethod, MethodConfig

torch.set_num_threads(2)
ROWS, TS, SPARSITY = 512, (0.1, 0.5, 0.9), 0.9
model, card = load_checkpoint("checkpoints/mini-wan-v2")
model.eval()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
sums: dict[int, dict[str, list[torch.Tensor]]] = {}


class Probe(AttentionMethod):
    family = "full"

    def attend(self, q, k, v, ctx):
        rows = torch.randint(0, q.shape[2], (ROWS,), generator=torch.Generator().manual_seed(ctx.layer))
        s = q[:, :, rows].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, ROWS, N)
        p = s.softmax(-1)
        keep = math.ceil((1 - SPARSITY) * s.shape[-1])
        stats = {
            "entropy_frac": -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(s.shape[-1]),
            "logit_range": s.amax(-1) - s.amin(-1),
            "logit_max_minus_mean": s.amax(-1) - s.mean(-1),
            "row_top_mass": p.topk(keep, dim=-1).values.sum(-1),
            "q_rms": q[:, :, rows].float().square().mean(-1).sqrt(),
            "k_rms": k.float().square().mean(-1).sqrt().mean(-1, keepdim=True),  # (B, H, 1)
        }
        acc = sums.setdefault(ctx.layer, {})
        for key, val in stats.items():
            acc.setdefault(key, []).append(val.mean((0, 2)))  # (H,)
        return F.scaled_dot_product_attention(q, k, v)


spec = model.config.spec
vids, labels = ProceduralVideos("val", n, spec, model.config.num_classes).batch(list(range(n)), "cpu")
noise = make_noise(n, spec, 4321, "cpu")
install_attention(
    model.transformer, lambda **kw: Probe(MethodConfig(), num_heads=kw["num_heads"], head_dim=kw["head_dim"], name="p")
)
try:
    with torch.no_grad():
        for t in TS:
            for i in range(n):
                model((1 - t) * vids[i : i + 1] + t * noise[i : i + 1], torch.full((1,), t), labels[i : i + 1])
finally:
    restore_attention(model.transformer)
layers = {
    str(layer): {key: [round(x, 4) for x in torch.stack(vals).mean(0).tolist()] for key, vals in acc.items()}
    for layer, acc in sorted(sums.items())
}
out_path = sys.argv[2] if len(sys.argv) > 2 else "head_entropy_probe.json"
with open(out_path, "w") as f:
    json.dump({"checkpoint": "checkpoints/mini-wan-v2", "steps": card["steps_done"], "n_videos": n, "t": list(TS),
               "rows_per_call": ROWS, "sparsity": SPARSITY, "tokens": spec.tokens, "per_head": layers}, f, indent=1)  # fmt: skip
print("layer | per head: entropy/ln N, logit range (nats), best 10% of keys' mass, q rms")
for layer, d in layers.items():
    heads = zip(d["entropy_frac"], d["logit_range"], d["row_top_mass"], d["q_rms"], strict=True)
    print(layer, " | ".join(f"{e:.2f} {r:4.1f} {m:.2f} {qr:.2f}" for e, r, m, qr in heads))
