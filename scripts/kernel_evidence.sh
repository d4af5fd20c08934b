#!/usr/bin/env bash
# One GPU call for the kernel targets (issue #3): the kernel benchmark at densities 0.1 and 1.0 with the
# execution variants (paired key blocks, unsplit linear state pass, bf16 RoPE tables, pooling alone,
# selection replayed from a CUDA graph), xattention's method sweep (TF32 scores), and the gpu tests.
# Usage on a GPU machine: OUT=/some/dir bash scripts/kernel_evidence.sh   (diffusers must be importable)
set -uo pipefail
OUT=${OUT:-runs/kernel-evidence}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout 330 python3 -m salad_bench.harness.bench_kernels --out "$OUT/kernels" --densities 0.1,1.0 --variant-densities 0.1 \
    --sections dense,sparse,selection,linear,variants,linear_variants,headline --rounds 9 > "$OUT/kernels.log" 2>&1
echo "kernel bench rc=$?"
timeout 90 python3 run_all.py --methods full,xattention --workloads wan2.1-1.3b-480p --out "$OUT/xattention" \
    > "$OUT/xattention.log" 2>&1
echo "xattention sweep rc=$?"
timeout 170 python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=6 > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -n 12 "$OUT/gpu_tests.log"
grep -E "^\| (triton_block_sparse|flex_block_sparse|select_|pool_|linear_triton|sdpa)" "$OUT/kernels.log" | cut -c1-150
grep -E "^target" "$OUT/kernels.log"
grep -E "^\| xattention " "$OUT/xattention/summary.md" | head -8
cat "$OUT"/*.log > "$OUT/all.log.txt"; rm -f "$OUT"/*.log "$OUT"/*/summary.md
