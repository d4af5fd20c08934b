#!/usr/bin/env bash
# The fine-tuning budget (1,600 steps x batch 8, the same for every trainable method) at 90%
# sparsity on the committed mini-wan. Methods are dealt out to ranks (harness.quality.parallel runs
# torchrun ... evaluate --split methods: PER_GPU ranks on each visible GPU, one shared run directory). Repeat the
# same command to continue: methods already measured are skipped, an interrupted fine-tuning continues
# from its state in $OUT/finetuned/, and no new method starts after BUDGET seconds.
#
#   OUT=results/quality/<run> BUDGET=420 PER_GPU=3 bash scripts/quality_long.sh
#
# One method fine-tunes in about 2-4 minutes alone on an H200 (0.07-0.15 s/step). With PER_GPU > 1 the
# rows carry no latency (measured under contention it would mislead). Samples are kept (samples.npz,
# git-ignored) for VBench; per-video PSNR/SSIM/loss in the rows feed the bootstrap intervals
# (python -m salad_bench.harness.quality.stats). The study with seeds and the full_ft control: salad-bench quality study.
set -uo pipefail
OUT=${OUT:?set OUT to the run directory}
BUDGET=${BUDGET:-420}
METHODS=${METHODS:-full,salad,sparse_lora,salad_no_gate,vsa,sla,salad_static_gate,salad_no_rope,salad_separate_qkv,salad_drop20,salad_no_linear,topk,sta,sparge,xattention,svg,radial}
python3 -m salad_bench.harness.quality.parallel --methods "$METHODS" --out "$OUT" --gpus "${GPUS:-auto}" --per-gpu "${PER_GPU:-1}" -- \
    --checkpoint "${CKPT:-checkpoints/mini-wan-v2}" --sparsity 0.9 --steps "${STEPS:-1600}" --time-budget "$BUDGET" \
    --seed "${SEED:-0}" --save-samples
