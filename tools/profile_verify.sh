#!/usr/bin/env bash
# Where verify --source spends its time (docs/benchmarks): builds a Qwen3-MoE-shaped checkpoint with
# tools/bench.py, converts it once, then times a cold read of source + output against verify in
# several modes (cold and warm page cache, with and without file hashes, one thread).
# Usage: tools/profile_verify.sh SIZE_GB FORMAT DEVICE WORKDIR
set -euo pipefail
size=${1:-4}; fmt=${2:-nvfp4}; dev=${3:-cuda}; work=${4:-/tmp/sqpv}
python - "$size" "$fmt" "$dev" "$work" <<'PY'
import sys, time, os, subprocess, statistics
from pathlib import Path
sys.path.insert(0, "tools")
import bench
size, fmt, dev, work = float(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
work.mkdir(parents=True, exist_ok=True)
src = bench.build(work, size)
out = work / "out"
bench.convert_once(src, out, fmt, dev, cold=False)
files = sorted(src.glob("*.safetensors")) + sorted(out.glob("*.safetensors"))
def child(args, env=None, cold=True):
    if cold:
        bench.drop_cache(files)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "shardquant.cli", "verify", str(out), *args], check=True,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
    return time.perf_counter() - t0
nbytes = sum(p.stat().st_size for p in files)
rows = {}
for _ in range(2):
    for name, fn in {
        "cold read src+out": lambda: bench.read_all([src, out], True)[0],
        "verify --source cold": lambda: child(["--source", str(src)]),
        "verify --source cold --no-hashes": lambda: child(["--source", str(src), "--no-hashes"]),
        "verify --source warm": lambda: child(["--source", str(src)], cold=False),
        "verify --source warm 1 thread": lambda: child(["--source", str(src)], {"SHARDQUANT_THREADS": "1"}, cold=False),
        "verify (no source) cold": lambda: child([]),
    }.items():
        rows.setdefault(name, []).append(fn())
print(f"# {os.cpu_count()} cores, {nbytes / 1e9:.2f} GB source+output, format {fmt}, medians of 2, whole processes")
for name, ts in rows.items():
    t = statistics.median(ts)
    print(f"{name:36s} {t:7.2f} s  {nbytes / t / 1e9:6.2f} GB/s")
PY
