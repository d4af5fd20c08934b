#!/usr/bin/env bash
# The GPU checklist in one command, for a machine lent for minutes: each step in STEPS runs in turn, capped by
# the seconds left of BUDGET, with its log under OUT (a step cut short leaves what it wrote). Steps:
#   tests   pytest $TESTS_ARGS on CUDA (default: the `gpu`-marked tests of the kernels and methods)
#   probe   $PROBE, a command of your own (e.g. "python3 scripts/probe_gather.py $OUT/gather.json")
#   gate    scripts/gpu_gate.sh $OUT/gate: the gate's sweep, gated against the committed baseline of the card
#   train   the quality base: train_base --until-plateau --compile in CKPT (an exact resume where its state is,
#           --from-checkpoint otherwise), leaving BAR_S seconds for the bar
#   cooldown  the same with --cooldown $COOLDOWN (default 1600 steps) in place of --until-plateau
#   bar     the base's bar card in CKPT (beside the weights it judged), copied to $OUT/bar
# With RETURN (the device call's $OUT), last: OUT as RETURN/run.tgz (with CKPT's card, curve and bar files in
# ckpt/ when train or cooldown ran), CKPT's shards beside it (its resume state stays: over 16 MiB) and Triton's
# compile cache as RETURN/triton.tgz.* (scripts/pack_cache.sh). Here, scripts/take_back.sh puts them in place
# (the cache in .compile-cache/: carry that folder next time, so a cold machine skips the compiles).
# Usage, from the repository root (wheels in .whl/ are installed first: scripts/device_env.sh):
#   SHA=$(git rev-parse HEAD) RETURN=$OUT OUT=/tmp/s BUDGET=560 STEPS=tests,gate,train,bar bash scripts/gpu_session.sh
# (RETURN first: the assignments expand in order, so RETURN=$OUT after OUT=/tmp/s would be /tmp/s, and nothing
# would come back; the script refuses that.)
set -o pipefail
OUT=${OUT:?set OUT}; BUDGET=${BUDGET:-560}; STEPS=${STEPS:-gate}; BAR_S=${BAR_S:-110}; COOLDOWN=${COOLDOWN:-1600}
CKPT=${CKPT:-checkpoints/mini-wan-v2}; CLASSIFIER=${CLASSIFIER:-checkpoints/video-classifier}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
mkdir -p "$OUT"
if [ -n "$RETURN" ] && [ "$(cd "$OUT" && pwd -P)" = "$(mkdir -p "$RETURN" && cd "$RETURN" && pwd -P)" ]; then
  echo "error: RETURN is OUT ($OUT): give RETURN the device call's \$OUT and OUT a scratch folder (RETURN=\$OUT OUT=/tmp/s ...)" >&2
  exit 2
fi
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
train() {  # $1: the step's name, then train_base's mode options
  local step=$1 reserve=0 b from; shift
  has bar && reserve=$BAR_S
  b=$(( $(left) - reserve - 60 ))
  if [ "$b" -gt 60 ]; then
    from="--from-checkpoint"; [ -f "$CKPT/resume/state.pt" ] && from=""
    timeout $(( b + 50 )) python3 -m salad_bench.harness.quality.train_base --out "$CKPT" "$@" --compile \
      --time-budget "$b" $from > "$OUT/$step.log" 2>&1
    echo "$step rc=$?"; tail -3 "$OUT/$step.log"
  else
    echo "$step: skipped, ${b}s left for it"
  fi
}
has train && train train --until-plateau
has cooldown && train cooldown --cooldown "$COOLDOWN" --check-every 100000  # one piece: no second compile
if has bar; then
  mkdir -p "$OUT/bar"
  timeout $(( $(left) - 15 )) python3 -m salad_bench.harness.quality.base_bar --checkpoint "$CKPT" \
    --classifier "$CLASSIFIER" > "$OUT/bar.log" 2>&1
  echo "bar rc=$?"; tail -8 "$OUT/bar.log"
  cp "$CKPT"/bar.json "$CKPT"/BAR.md "$CKPT"/samples.png "$OUT/bar/" 2>/dev/null
fi
if [ -n "$RETURN" ]; then  # within the device's limits on what comes back (8 files, 16 MiB each)
  if has train || has cooldown; then
    mkdir -p "$OUT/ckpt"
    find "$CKPT" -maxdepth 1 -type f ! -name 'model-*' ! -name train.pid -exec cp {} "$OUT/ckpt/" \;
    cp "$CKPT"/model-*.safetensors "$RETURN/"
  fi
  bash scripts/pack_cache.sh "$RETURN"
  tar czf "$RETURN/run.tgz" -C "$OUT" .
fi
