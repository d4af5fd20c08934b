# Sourced by gpu_gate.sh and gpu_session.sh on a GPU machine, from the repository root: install the carried
# wheels in .whl/ once (into /tmp/site), put them and the repository on PYTHONPATH, and name the commit that
# runs (SHA, DIRTY; else git). Triton's compiled kernels go to a fixed TRITON_CACHE_DIR (its entries name
# their files by absolute path), restored from .compile-cache/triton.tgz.* where a call carried one in (written by
# scripts/pack_cache.sh on an earlier machine), so a cold machine does not compile them again; entries are keyed
# by source, options, Triton version and architecture, never by a timing. A second source installs nothing again.
if [ -z "$SALAD_DEVICE_ENV" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 SALAD_DEVICE_ENV=1
  export SALAD_GIT_SHA=${SHA:-$(git rev-parse HEAD 2>/dev/null)} SALAD_GIT_DIRTY=${DIRTY:-0}
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/salad-triton-cache}
  mkdir -p "$TRITON_CACHE_DIR"
  if ls .compile-cache/triton.tgz.* >/dev/null 2>&1 && [ -z "$(ls -A "$TRITON_CACHE_DIR")" ]; then
    if cat .compile-cache/triton.tgz.* | tar xzf - -C "$TRITON_CACHE_DIR"; then
      echo "compile cache: $(find "$TRITON_CACHE_DIR" -name '__grp__*' | wc -l) kernels restored"
    else  # a half-restored entry could hold a cut binary: start empty
      rm -rf "${TRITON_CACHE_DIR:?}"/*
      echo "compile cache: not restored (damaged parts in .compile-cache/); kernels compile afresh" >&2
    fi
  fi
fi
