#!/usr/bin/env bash
# Here, after a device call of gpu_session.sh with RETURN=$OUT: put what came back where the next step needs it.
#   triton.tgz.*        -> .compile-cache/ (carry it next call; the previous parts are replaced)
#   model-*.safetensors -> CKPT, with run.tgz's ckpt/ files (card, curve, bar)
#   run.tgz             -> DEST (the logs, the gate's run directory, the bar's card)
# Usage, from the repository root: bash scripts/take_back.sh FILES_AT DEST [CKPT=checkpoints/mini-wan-v2]
set -e
src=${1:?usage: take_back.sh FILES_AT DEST [CKPT]}; dest=${2:?usage: take_back.sh FILES_AT DEST [CKPT]}
ckpt=${3:-checkpoints/mini-wan-v2}
if ls "$src"/triton.tgz.* >/dev/null 2>&1; then
  mkdir -p .compile-cache && rm -f .compile-cache/triton.tgz.* && cp "$src"/triton.tgz.* .compile-cache/
  echo "compile cache: $(ls .compile-cache/triton.tgz.* | wc -l) part(s) in .compile-cache/"
fi
mkdir -p "$dest"
[ -f "$src/run.tgz" ] && tar xzf "$src/run.tgz" -C "$dest" && echo "run: $dest"
if ls "$src"/model-*.safetensors >/dev/null 2>&1; then
  [ -d "$dest/ckpt" ] || { echo "shards came back without run.tgz's ckpt/ (card, curve): $ckpt left as it was" >&2; exit 2; }
  rm -f "$ckpt"/model-*.safetensors
  cp "$src"/model-*.safetensors "$dest"/ckpt/* "$ckpt/"
  echo "checkpoint: $ckpt ($(ls "$ckpt"/model-*.safetensors | wc -l) shards)"
fi
