#!/usr/bin/env bash
# The issue's fine-tuning budget (1,600 steps x batch 8, the same for every trainable method) at 90%
# sparsity on the committed mini-wan, spread over several GPU calls. Each call continues the same run:
# methods already measured are skipped (--resume), an interrupted fine-tuning continues from its state,
# and no new method starts after BUDGET seconds (those get a `skipped` row that a later call replaces).
#
#   OUT=results/quality/<run> BUDGET=480 bash scripts/quality_long.sh      # repeat until every row is ok
#
# One method takes about 2-4 minutes on an H200 (0.07-0.15 s/step). Samples are kept (samples.npz,
# git-ignored) for VBench and paired bootstrap CIs; per-method checkpoints go to $OUT/finetuned/.
set -uo pipefail
OUT=${OUT:?set OUT to the run directory}
BUDGET=${BUDGET:-480}
METHODS=${METHODS:-full,salad,sparse_lora,salad_no_gate,vsa,sla,salad_static_gate,salad_no_rope,salad_separate_qkv,salad_drop20,salad_no_linear,topk,sta,sparge,xattention,svg,radial}
export PYTHONUNBUFFERED=1
resume=()
[ -s "$OUT/rows.jsonl" ] && resume=(--resume)
mkdir -p "$OUT"
python3 -m harness.quality.evaluate --checkpoint "${CKPT:-checkpoints/mini-wan}" --methods "$METHODS" \
    --sparsity 0.9 --steps 1600 --time-budget "$BUDGET" --save-samples --out "$OUT" "${resume[@]}" \
    2>&1 | tee -a "$OUT/log.txt" | grep -E " (ok|error|skipped) |reference:"
python3 - "$OUT" <<'PY'
import json, sys
from harness.results import latest_per_cell, load_rows
df = latest_per_cell(load_rows(sys.argv[1]))
left = df[df["status"] != "ok"]["method"].tolist()
print(f"{(df['status'] == 'ok').sum()} methods done; still to run: {', '.join(left) or 'none'}")
PY
