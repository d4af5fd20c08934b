# Sourced by gpu_gate.sh and gpu_session.sh on a GPU machine, from the repository root: install the carried
# wheels in .whl/ once (into /tmp/site), put them and the repository on PYTHONPATH, and name the commit that
# runs (SHA, DIRTY; else git). A second source in the same environment installs nothing again.
if [ -z "$SALAD_DEVICE_ENV" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 SALAD_DEVICE_ENV=1
  export SALAD_GIT_SHA=${SHA:-$(git rev-parse HEAD 2>/dev/null)} SALAD_GIT_DIRTY=${DIRTY:-0}
fi
