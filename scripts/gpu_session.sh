#!/usr/bin/env bash
# The GPU checklist in one command, for a machine lent for minutes: each step in STEPS runs in turn, capped by
# the seconds left of BUDGET, with its log under OUT (a step cut short leaves what it wrote). Steps:
#   tests   pytest $TESTS_ARGS on CUDA (default: the `gpu`-marked tests of the kernels and methods)
#   probe   $PROBE, a command of your own (e.g. "python3 scripts/probe_gather.py $OUT/gather.json")
#   gate    scripts/gpu_gate.sh $OUT/gate: the gate's sweep, gated against the committed baseline of the card
#   train   the quality base: train_base --until-plateau --compile in CKPT (an exact resume where its state is,
#           --from-checkpoint otherwise), leaving BAR_S seconds for the bar
#   bar     the base's bar card into $OUT/bar
# Usage, from the repository root (wheels in .whl/ are installed first: scripts/device_env.sh):
#   SHA=$(git rev-parse HEAD) OUT=/tmp/out BUDGET=560 STEPS=tests,gate,train,bar bash scripts/gpu_session.sh
set -o pipefail
OUT=${OUT:?set OUT}; BUDGET=${BUDGET:-560}; STEPS=${STEPS:-gate}; BAR_S=${BAR_S:-110}
CKPT=${CKPT:-checkpoints/mini-wan-v2}; CLASSIFIER=${CLASSIFIER:-checkpoints/video-classifier}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
mkdir -p "$OUT"
. scripts/device_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader || true
if has tests; then
  # shellcheck disable=SC2086
  timeout $(( $(left) > 240 ? 240 : $(left) )) python3 -m pytest -q -p no:cacheprovider ${TESTS_ARGS:--m gpu tests/kernels tests/methods} \
    > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/tests.log"
fi
if has probe && [ -n "$PROBE" ]; then
  timeout $(( $(left) - 30 )) bash -c "$PROBE" > "$OUT/probe.log" 2>&1
  echo "probe rc=$?"; tail -25 "$OUT/probe.log"
fi
if has gate; then
  timeout $(( $(left) - 20 )) bash scripts/gpu_gate.sh "$OUT/gate" > "$OUT/gate_stdout.log" 2>&1
  echo "gate rc=$?"; tail -14 "$OUT/gate/gate.log"
fi
if has train; then
  reserve=0; has bar && reserve=$BAR_S
  b=$(( $(left) - reserve - 60 ))
  if [ "$b" -gt 60 ]; then
    from="--from-checkpoint"; [ -f "$CKPT/resume/state.pt" ] && from=""
    timeout $(( b + 50 )) python3 -m salad_bench.harness.quality.train_base --out "$CKPT" --until-plateau --compile \
      --time-budget "$b" $from > "$OUT/train.log" 2>&1
    echo "train rc=$?"; tail -3 "$OUT/train.log"
  else
    echo "train: skipped, ${b}s left for it"
  fi
fi
if has bar; then
  mkdir -p "$OUT/bar"
  timeout $(( $(left) - 5 )) python3 -m salad_bench.harness.quality.base_bar --checkpoint "$CKPT" \
    --classifier "$CLASSIFIER" --out "$OUT/bar" > "$OUT/bar.log" 2>&1
  echo "bar rc=$?"; tail -8 "$OUT/bar.log"
fi
