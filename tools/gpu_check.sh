#!/usr/bin/env bash
# On the GPU machine: install, run the GPU tests, the kernel benchmark and the end-to-end benchmark.
#   bash tools/gpu_check.sh [SIZE_GB] [RUNS]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
df -h /tmp | tail -1; nproc; free -g | head -2
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python3 tools/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log"
if [ "${1:-0}" != "0" ]; then
  python3 tools/bench.py --device cuda --size "$1" --runs "${2:-1}" --cold --workdir /tmp/sqbench 2>&1 | tee "$OUT/bench_e2e.log"
fi
