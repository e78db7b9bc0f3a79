#!/usr/bin/env bash
# The prepared accelerator run: versions, a smoke test of every optimizer, then the
# benchmarks under one time budget (about 5.5 minutes). Runs the checkout as it is, with
# the machine's own jax/optax/flax: nothing is installed. Results: $OUT/device_run.json
# (or benchmarks/results/device_run/ when OUT is unset) and the log beside it.
#
#   bash benchmarks/device_run.sh            # on the GPU machine
#   bash benchmarks/device_run.sh --quick    # the same code on CPU at tiny sizes
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Take GPU memory as needed rather than 75% up front: the copies, trees and compiled
# steps of one run fit either way, and the log then shows real use.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-benchmarks/results/device_run}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
"${PYTHON:-python3}" benchmarks/device_run.py --out "$out" "$@" 2>&1 | tee "$out/device_run.log"
