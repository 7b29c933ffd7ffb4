#!/usr/bin/env bash
# The GPU check (issue: "The GPU worker, measured"), for a GPU machine that has CUDA, JAX and PyTorch but no
# TensorFlow and no network. Prepare on a connected machine with `make gpu-check-bundle` (wheels for Python 3.12
# in .whl/, the four MNIST IDX files in .mnist/), bring the repository with those two folders, then:
#
#   bash bench/gpu_check.sh                                  # jax and torch × float32, mixed_bfloat16, mixed_float16, 15 epochs
#   bash bench/gpu_check.sh --epochs 1 --train-limit 3000    # the same path, quickly (how it is checked on a CPU)
#
# Prints one JSON object on stdout (progress on stderr). Wheels are installed into a target directory, and only
# when the machine's Python lacks keras or pydantic: nothing of the machine's own installation changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TARGET=${GPU_CHECK_TARGET:-/tmp/gpu-check-site}

if ! "$PYTHON" -c "import keras, pydantic" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PYTHON lacks keras or pydantic and no wheels are in .whl/: run 'make gpu-check-bundle' where there is a network" >&2
    exit 1
  fi
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$TARGET" .whl/*.whl
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$PYTHON" bench/gpu_check.py "$@"
