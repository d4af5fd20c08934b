"""Probe (CPU, about 10 minutes): what the base model's nearly uniform heads do, by replacing them.

For checkpoints/mini-wan-v2, the flow-matching loss on N_VIDEOS validation videos x t in (0.1, 0.5, 0.9)
(one fixed noise per video) under five arms of the self-attention, per head:
  full           every head exact;
  flat=mean      the flat heads (entropy >= FLAT of ln N in the entropy probe's JSON) output the plain mean
                 of v over every key, the others exact;
  topk           the registered ``topk`` at 90% in every head (what the bar's mass criterion scores);
  topk+flat=mean ``topk`` in the sharp heads, the flat heads the mean of v;
  topk+flat=full ``topk`` in the sharp heads, the flat heads exact.
Each arm's loss is reported beside full's (relative excess, per t and overall, with the per-video range).
In the full arm, per layer and head: ``topk``'s kept softmax mass and the best 10% of keys per row (the bar's
measures, ``base_bar.attention_masses``) and the relative L2 error of ``topk``'s output against exact attention.
Usage: python scripts/probe_flat_heads.py ENTROPY_PROBE_JSON [N_VIDEOS] [OUT_JSON].
Written for docs/lab/2026-12-07-flat-heads.md."""

import json
import sys
import time

import torch
import torch.nn.functional as F

from salad_bench.harness.integrations.wan import install_attention, restore_attention
from salad_bench.harness.quality.base_bar import attention_masses
from salad_bench.harness.quality.data import ProceduralVideos
from salad_bench.harness.quality.metrics import flow_matching_mse
from salad_bench.harness.quality.model import load_checkpoint
from salad_bench.harness.quality.sampler import make_noise
from salad_bench.methods import create_method
from salad_bench.methods.base import AttentionMethod, MethodConfig

torch.set_num_threads(2)
TS, SPARSITY, FLAT = (0.1, 0.5, 0.9), 0.9, 0.9
ARMS = {  # arm -> (what the sharp heads run, what the flat heads run)
    "full": ("full", "full"),
    "flat=mean": ("full", "mean"),
    "topk": ("topk", "topk"),
    "topk+flat=mean": ("topk", "mean"),
    "topk+flat=full": ("topk", "full"),
}
probe = json.load(open(sys.argv[1]))
flat = {int(layer): [e >= FLAT for e in d["entropy_frac"]] for layer, d in probe["per_head"].items()}
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
model, card = load_checkpoint("checkpoints/mini-wan-v2")
model.eval()


class Mix(AttentionMethod):
    family = "full"
    arm = ARMS["full"]  # set per arm below

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.topk = create_method("topk", num_heads=self.num_heads, head_dim=self.head_dim, sparsity=SPARSITY)

    def attend(self, q, k, v, ctx):
        outs = {"full": lambda: F.scaled_dot_product_attention(q, k, v),
                "topk": lambda: self.topk.attend(q, k, v, ctx),
                "mean": lambda: v.mean(2, keepdim=True).expand_as(v)}  # fmt: skip
        sharp, flats = self.arm
        o_sharp = outs[sharp]()
        if self.arm == ARMS["full"]:  # the per-head measures, once per call of the full arm
            m = attention_masses(q, k, ctx, SPARSITY)
            o_topk = outs["topk"]().float()
            err = (o_topk - o_sharp.float()).square().sum((-1, -2)).sqrt() / o_sharp.float().square().sum((-1, -2)).sqrt()
            for key, val in (("topk_mass", m["topk"]), ("row_top_mass", m["row_top"]), ("topk_rel_l2", err)):
                per_head.setdefault(ctx.layer, {}).setdefault(key, []).append(val.mean(0))
        if sharp == flats:
            return o_sharp
        is_flat = torch.tensor(flat[ctx.layer], device=q.device).view(1, -1, 1, 1)
        return torch.where(is_flat, outs[flats]().to(o_sharp.dtype), o_sharp)


spec = model.config.spec
vids, labels = ProceduralVideos("val", n, spec, model.config.num_classes).batch(list(range(n)), "cpu")
noise = make_noise(n, spec, 4321, "cpu")
install_attention(
    model.transformer, lambda **kw: Mix(MethodConfig(), num_heads=kw["num_heads"], head_dim=kw["head_dim"], name="mix")
)
loss: dict[str, list[list[float]]] = {}  # arm -> [t][video]
per_head: dict[int, dict[str, list[torch.Tensor]]] = {}  # layer -> measure -> [(H,) per call]
t0 = time.time()
try:
    with torch.no_grad():
        for name, arm in ARMS.items():
            Mix.arm = arm
            loss[name] = [
                [float(flow_matching_mse(model, vids[i : i + 1], labels[i : i + 1], torch.full((1,), t), noise[i : i + 1]))
                 for i in range(n)]  # fmt: skip
                for t in TS
            ]
            print(f"{name}: {sum(map(sum, loss[name])) / (n * len(TS)):.5f} ({time.time() - t0:.0f} s)", flush=True)
finally:
    restore_attention(model.transformer)


def excess(name: str) -> dict:
    per_t = {}
    for j, t in enumerate(TS):
        rel = [a / b - 1 for a, b in zip(loss[name][j], loss["full"][j], strict=True)]
        per_t[str(t)] = {"mean": round(sum(rel) / n, 4), "min": round(min(rel), 4), "max": round(max(rel), 4)}
    tot = sum(map(sum, loss[name])) / sum(map(sum, loss["full"])) - 1
    return {"overall": round(tot, 4), "per_t": per_t}


result = {"checkpoint": "checkpoints/mini-wan-v2", "steps": card["steps_done"], "n_videos": n, "t": list(TS),
          "sparsity": SPARSITY, "flat_threshold": FLAT, "entropy_probe": sys.argv[1],
          "flat_heads": {str(k): [h for h, f in enumerate(v) if f] for k, v in flat.items()},
          "per_head": {str(layer): {key: [round(x, 4) for x in torch.stack(v).mean(0).tolist()] for key, v in d.items()}
                       for layer, d in sorted(per_head.items())},
          "loss": loss, "excess_over_full": {a: excess(a) for a in ARMS if a != "full"}}  # fmt: skip
out_path = sys.argv[3] if len(sys.argv) > 3 else "flat_heads_probe.json"
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
print("layer | per head: topk kept mass / best 10% of keys / topk rel L2 (* flat)")
for layer, d in result["per_head"].items():
    print(layer, " | ".join(f"{'*' if flat[int(layer)][h] else ' '}{a:.2f} {b:.2f} {c:.3f}"
                            for h, (a, b, c) in enumerate(zip(d["topk_mass"], d["row_top_mass"], d["topk_rel_l2"], strict=True))))
print("arm | loss excess over full: overall, then per t (mean over videos)")
for a, e in result["excess_over_full"].items():
    print(f"{a:16s} {100 * e['overall']:+7.2f}%  " + "  ".join(f"t={t}: {100 * v['mean']:+7.2f}%" for t, v in e["per_t"].items()))
