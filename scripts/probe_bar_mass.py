"""Probe (CPU, about 10 minutes a checkpoint): the bar's attention-mass criterion alone, without sampling.

``base_bar.layer_attention_mass`` as ``run_bar`` calls it (the first N_VIDEOS validation videos, the bar's
t grid, topk at 90%), for each checkpoint given, so that two steps of one base compare on one machine and
in one precision (fp32 here; the bar card on a GPU runs under bf16 autocast).
Usage: python scripts/probe_bar_mass.py OUT_JSON N_VIDEOS CHECKPOINT [CHECKPOINT ...]."""

import json
import sys
import time

import torch

from salad_bench.harness.quality.base_bar import BarSettings, layer_attention_mass
from salad_bench.harness.quality.data import ProceduralVideos
from salad_bench.harness.quality.model import load_checkpoint

torch.set_num_threads(2)
out_path, n, checkpoints = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
t_grid = BarSettings().mass_t
result = {"n_videos": n, "t": list(t_grid), "sparsity": 0.9, "checkpoints": {}}
for path in checkpoints:
    t0 = time.time()
    model, card = load_checkpoint(path)
    model.eval()
    spec = model.config.spec
    videos, labels = ProceduralVideos("val", n, spec, model.config.num_classes).batch(list(range(n)), "cpu")
    layers = layer_attention_mass(model, videos, labels, t_grid, sparsity=0.9, batch=1)
    result["checkpoints"][path] = {"steps": card["steps_done"], "git_sha": card.get("git_sha"), "layers": layers}
    print(f"{path} (step {card['steps_done']}, {time.time() - t0:.0f} s): topk / oracle / best keys per row")
    for r in layers:
        print(f"  L{r['layer']} {r['topk_mass']:.3f} / {r['oracle_mass']:.3f} / {r['row_top_mass']:.3f}", flush=True)
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
