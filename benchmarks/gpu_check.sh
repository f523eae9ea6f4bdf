#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): run it once on a machine with a CUDA GPU and
# paste the summary it prints at the end into the README. `--dry-run` runs it all on the CPU.
#   bash benchmarks/gpu_check.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
LOG="${GPU_CHECK_LOG:-runs/gpu_check.log}"
mkdir -p "$(dirname "$LOG")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$LOG"
