#!/usr/bin/env bash
# The GPU run-book on a bare device machine: the wheels `make gpu-bundle` put in .gpu/wheels are
# installed offline into a folder of their own (no dependencies: the device's torch, with its
# CUDA, is the one used, never a CPU build), then bench/gpu.py runs with that folder on the path.
# Arguments go to bench/gpu.py (parts to run). Results: bench/RESULTS.md, logs in bench/out/.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-.gpu}
SITE=${GPU_SITE:-/tmp/gpu-site}
PYTHON=${PYTHON:-python3}
if ! ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
    echo "no wheels in $BUNDLE/wheels: run 'make gpu-bundle' where pip works, and carry $BUNDLE" >&2
    exit 2
fi
started=$SECONDS
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$BUNDLE"/wheels/*.whl || exit 3
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -f "$BUNDLE/models/tiny.en.int8.pt" ] && export BENCH_GPU_WEIGHTS="$BUNDLE/models/tiny.en.int8.pt"
echo "wheels installed in $((SECONDS - started)) s"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
exec timeout "${BENCH_GPU_TIMEOUT:-460}" "$PYTHON" -m bench.gpu "$@"
