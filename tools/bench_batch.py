"""A zoo through `shardquant batch` against the same models converted one after another, and against
the disk's limit measured in the same run (reads of every source and writes of every output at once).

    python tools/bench_batch.py --models 4 --size 5 --format nvfp4 --device cuda --runs 1 --workers 1,2

Each run, in turn and with every source evicted from the page cache first (tools/bench.py drop_cache):
- "singles": `shardquant convert` once per model, whole processes one after another (their sum);
- "batch wN": `shardquant batch zoo.toml --device D --workers N --verify none` (N workers share the
  device; with N > 1 one job's start-up and reads overlap another's last writes);
- "limit": tools/bench.py read_and_write over all sources with the outputs' total bytes written at once.
Prints medians and ratios: batch / singles (time), batch GB/s / limit GB/s. Figures go in
docs/benchmarks/README.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: the same synthetic checkpoints and disk measurements)


def sources_of(workdir: Path, models: int, size_gb: float) -> list[Path]:
    """`models` copies of one synthetic checkpoint (tools/bench.py build), each its own directory."""
    first = bench.build(workdir, size_gb)
    out = [first]
    for i in range(1, models):
        d = workdir / f"{first.name}-copy{i}"
        if not (d / "model.safetensors.index.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(first, d)
        out.append(d)
    return out


def shards(dirs: list[Path]) -> list[Path]:
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return dt


def singles(srcs: list[Path], outdir: Path, fmt: str, device: str) -> float:
    shutil.rmtree(outdir, ignore_errors=True)
    bench.drop_cache(shards(srcs))
    return sum(timed([sys.executable, "-m", "shardquant", "convert", str(s), "-o", str(outdir / s.name),
                      "--format", fmt, "--device", device, "-q"]) for s in srcs)


def batch(srcs: list[Path], outdir: Path, fmt: str, device: str, workers: int) -> float:
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    zoo = outdir / "zoo.toml"
    zoo.write_text(f'[defaults]\nformats = ["{fmt}"]\noutput = "out/{{name}}"\n\n'
                   + "".join(f'[[model]]\nsource = "{s}"\nname = "{s.name}"\n\n' for s in srcs))
    bench.drop_cache(shards(srcs))
    return timed([sys.executable, "-m", "shardquant", "batch", str(zoo), "--device", device, "--workers",
                  str(workers), "--verify", "none", "-q"])


def out_bytes(outdir: Path) -> int:
    return sum(f.stat().st_size for f in outdir.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--size", type=float, default=5.0, help="GB of bf16 per model")
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", default="1,2", help="batch worker counts to time, comma-separated")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/shardquant-bench"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    srcs = sources_of(args.workdir, args.models, args.size)
    src_bytes = sum(f.stat().st_size for f in shards(srcs))
    workers = [int(w) for w in args.workers.split(",")]
    times: dict[str, list[float]] = {}
    written = 0
    for run in range(args.runs):
        times.setdefault("singles", []).append(singles(srcs, args.workdir / "zoo-singles", args.format, args.device))
        written = out_bytes(args.workdir / "zoo-singles")
        shutil.rmtree(args.workdir / "zoo-singles", ignore_errors=True)
        for w in workers:
            d = args.workdir / f"zoo-batch-w{w}"
            times.setdefault(f"batch w{w}", []).append(batch(srcs, d, args.format, args.device, w))
            shutil.rmtree(d, ignore_errors=True)
        times.setdefault("limit", []).append(bench.read_and_write(srcs, args.workdir, written, cold=True))
        print(json.dumps({"run": run, **{k: round(v[-1], 2) for k, v in times.items()}}), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gbs = {k: src_bytes / 1e9 / v for k, v in med.items()}
    print(f"# {args.models} models x {src_bytes / args.models / 1e9:.2f} GB bf16 -> {args.format} on {args.device}, "
          f"{written / 1e9:.2f} GB written, cold page cache, medians of {args.runs}, {os.cpu_count()} cores")
    print("| variant | seconds | source GB/s | / singles (time) | / concurrent limit (GB/s) |")
    print("|---|---|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k]:.2f} | {gbs[k]:.3f} | {med[k] / med['singles']:.2f} | {gbs[k] / gbs['limit']:.2f} |")


if __name__ == "__main__":
    main()
