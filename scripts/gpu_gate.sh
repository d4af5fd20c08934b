#!/usr/bin/env bash
# The GPU gate on the device machine: install the carried wheels (diffusers for the `wan` input kind),
# name the commit that runs, then `salad-bench ci-gpu`. Usage, from the repository root:
#   SHA=$(git rev-parse HEAD) bash scripts/gpu_gate.sh OUT_DIR [ci-gpu options, e.g. --make-baseline FILE]
set -o pipefail
out=${1:?usage: gpu_gate.sh OUT_DIR [options]}; shift
. scripts/device_env.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv,noheader || true
mkdir -p "$out"
python3 -m salad_bench ci-gpu --out "$out" "$@" 2>&1 | tee "$out/gate.log"
