"""Probe (CPU, about 25 min): the attention mass topk keeps at 90% on raster and on tile-major token orders.

For checkpoints/mini-wan-v2, on 4 validation videos x t in (0.3, 0.5, 0.7): per layer and head, the mass
of the registered topk's tiles, of the oracle with its block counts, and of each row's best 10% of keys
(what any pattern could keep), with q and k permuted tile-major (cubes of the latent grid) or not.
Usage: python scripts/probe_token_order.py [N_VIDEOS] [OUT_JSON]. Written for docs/lab/2026-12-07-cfg-base.md."""

import json
import sys
import time

import torch
import torch.nn.functional as F

from salad_bench.harness.integrations.wan import install_attention, restore_attention
from salad_bench.harness.quality.base_bar import attention_masses
from salad_bench.harness.quality.data import ProceduralVideos
from salad_bench.harness.quality.model import load_checkpoint
from salad_bench.harness.quality.sampler import make_noise
from salad_bench.methods.base import AttentionMethod, MethodConfig

torch.set_num_threads(2)
model, card = load_checkpoint("checkpoints/mini-wan-v2")
model.eval()
spec = model.config.spec
grid = model.config.grid
print("grid", grid, "steps", card["steps_done"], flush=True)


def tile_perm(grid, tile):
    f, h, w = grid
    a, b, c = tile
    idx = torch.arange(f * h * w).view(f // a, a, h // b, b, w // c, c)
    return idx.permute(0, 2, 4, 1, 3, 5).reshape(-1)


ORDERS = {
    "raster": None,
    "tile4x4x4": tile_perm(grid, (4, 4, 4)),
    "tile2x4x8": tile_perm(grid, (2, 4, 8)),
    "tile1x8x8": tile_perm(grid, (1, 8, 8)),
}
sums = {}


class Probe(AttentionMethod):
    family = "full"

    def attend(self, q, k, v, ctx):
        for name, perm in ORDERS.items():
            qq, kk = (q, k) if perm is None else (q[:, :, perm], k[:, :, perm])
            m = attention_masses(qq, kk, ctx, 0.9)
            for key in ("topk", "oracle", "row_top"):
                acc = sums.setdefault((ctx.layer, name, key), [])
                acc.append(m[key].float().mean(0).tolist())  # per head
        return F.scaled_dot_product_attention(q, k, v)


n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
ts = [0.3, 0.5, 0.7]
vids, labels = ProceduralVideos("val", n, spec, model.config.num_classes).batch(list(range(n)), "cpu")
noise = make_noise(n, spec, 4321, "cpu")
install_attention(
    model.transformer, lambda **kw: Probe(MethodConfig(), num_heads=kw["num_heads"], head_dim=kw["head_dim"], name="p")
)
t0 = time.time()
with torch.no_grad():
    for t in ts:
        for i in range(n):
            xt = (1 - t) * vids[i : i + 1] + t * noise[i : i + 1]
            model(xt, torch.full((1,), t), labels[i : i + 1])
            print(f"t={t} video {i} {time.time() - t0:.0f}s", flush=True)
restore_attention(model.transformer)
out = {}
for (layer, name, key), v in sums.items():
    t = torch.tensor(v)  # (samples, heads)
    out.setdefault(str(layer), {}).setdefault(name, {})[key] = {
        "mean": round(float(t.mean()), 4),
        "per_head": [round(x, 4) for x in t.mean(0).tolist()],
    }
out_path = sys.argv[2] if len(sys.argv) > 2 else "token_order_probe.json"
json.dump(
    {
        "checkpoint": "checkpoints/mini-wan-v2",
        "steps": card["steps_done"],
        "n_videos": n,
        "t": ts,
        "sparsity": 0.9,
        "layers": out,
    },
    open(out_path, "w"),
    indent=1,
)
print("layer | " + " | ".join(f"{o} topk/oracle" for o in ORDERS) + " | row_top")
for layer in sorted(out, key=int):
    d = out[layer]
    print(
        layer,
        " | ".join(f"{d[o]['topk']['mean']:.3f}/{d[o]['oracle']['mean']:.3f}" for o in ORDERS),
        "|",
        d["raster"]["row_top"]["mean"],
    )
