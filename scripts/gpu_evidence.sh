#!/usr/bin/env bash
# The GPU evidence run behind results/<date>-<card>-*: every method at 0.5/0.75/0.9/0.95 on Wan2.1-1.3B
# 480p attention, the whole Wan2.1-1.3B transformer at 90%, and a recheck run for the speedup gate.
# Usage on a GPU machine: OUT=/some/dir bash scripts/gpu_evidence.sh   (diffusers must be importable)
set -uo pipefail
OUT=${OUT:-runs/evidence}
export PYTHONUNBUFFERED=1
timeout 120 python3 scripts/diag_selector.py 2>&1 | grep -v Assertion > "$OUT/diag_selector.log"
echo "selector diagnostic rc=$?"; grep -E "bad rows|out-of-range" "$OUT/diag_selector.log" | sort | uniq -c | head -5
METHODS='full,topk,sta,svg,radial,xattention,sparge,vsa,sla,sla_b128,sparse_lora,salad,salad_sta,salad_v2,salad_no_gate,salad_no_linear,salad_no_rope,salad_separate_qkv,salad_static_gate,salad_drop20'
python3 run_all.py --methods "$METHODS" --workloads wan2.1-1.3b-480p --out "$OUT/methods" > "$OUT/methods.log" 2>&1
echo "methods sweep rc=$?"
python3 run_all.py --methods full,salad,topk,salad_sta --sparsity 0.9 --workloads dit:wan2.1-1.3b-480p --out "$OUT/dit" > "$OUT/dit.log" 2>&1
echo "dit rc=$?"
python3 run_all.py --methods full,topk,salad --sparsity 0.5,0.9 --workloads wan2.1-1.3b-480p --out "$OUT/recheck" > "$OUT/recheck.log" 2>&1
echo "recheck rc=$?"
timeout 150 python3 -m salad_bench.harness.bench_kernels --out "$OUT/kernels" --sections dense,sparse,selection,linear > "$OUT/kernels.log" 2>&1
echo "kernel bench rc=$?"
timeout 150 python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=8 > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -n 14 "$OUT/gpu_tests.log"
tail -n 25 "$OUT/kernels.log"
grep -E "^\| (topk|salad|sparse_lora|sla|vsa|sta) " "$OUT/methods/summary.md" | head -40; cat "$OUT/dit/summary.md" 2>/dev/null | head -5
python3 -c "
import json
for l in open('$OUT/dit/rows.jsonl'):
    r = json.loads(l); print(r['method'], r.get('sparsity_target'), r.get('status'), r.get('ms'), r.get('attn_ms'), r.get('attn_share'), r.get('speedup'), r.get('baseline_backend'), (r.get('reason') or '')[:120])
"
# Keep what comes back small: rows are the record; summaries are regenerated from them.
cat "$OUT"/*.log > "$OUT/all.log.txt"; rm -f "$OUT"/*.log "$OUT"/*/summary.md
