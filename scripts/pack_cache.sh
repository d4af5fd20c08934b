#!/usr/bin/env bash
# On the GPU machine, at the end of a call: Triton's compile cache (scripts/device_env.sh) into DEST as
# triton.tgz.aa, .ab, ... (15 MiB parts, at most MAX_PARTS, the device's file limits). Copy them back into
# .compile-cache/ and carry that folder on the next call: a cold machine then skips the compiles.
# Usage: bash scripts/pack_cache.sh DEST [MAX_PARTS=2]
dest=${1:?usage: pack_cache.sh DEST [MAX_PARTS]}; max=${2:-2}
dir=${TRITON_CACHE_DIR:-/tmp/salad-triton-cache}
[ -d "$dir" ] || { echo "compile cache: none at $dir"; exit 0; }
mkdir -p "$dest"; rm -f "$dest"/triton.tgz.*
tar czf - -C "$dir" . | split -b 15m - "$dest/triton.tgz."
n=$(ls "$dest"/triton.tgz.* | wc -l)
if [ "$n" -gt "$max" ]; then
  rm -f "$dest"/triton.tgz.*
  echo "compile cache: $(du -sh "$dir" | cut -f1) packs into $n parts (> $max), not brought back"
else
  echo "compile cache: $(find "$dir" -name '__grp__*' | wc -l) kernels in $n part(s) under $dest"
fi
