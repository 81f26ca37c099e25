"""Throughput of the output writer alone (shardquant/writer.py NewFile: write calls, SHA-256, write-back)
on one shard of a per-expert conversion's outputs: each member an NVFP4 weight, its block scales and its
global scale, Qwen3-30B-A3B's expert shape [768, 2048] by default (every tensor below 1 MiB).

    python tools/bench_writer.py --dir /dev/shm --members 1000       # the writer's own CPU cost
    /usr/bin/time -v python tools/bench_writer.py    # whole process; alternate with an older tree's run

Prints one line: seconds and GB/s from the first write to the committed file (hash included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from shardquant import writer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/dev/shm", help="where the file goes (tmpfs: the writer's CPU cost alone)")
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=2048)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    weight = rng.integers(0, 256, (args.rows, args.cols // 2), dtype=np.uint8)
    scales = rng.integers(0, 256, (args.rows, args.cols // 16), dtype=np.uint8)
    gs = np.ones(1, np.float32)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        od = writer.OutputDir.open(Path(d))
        f = od.create("model-00001-of-00001.safetensors")
        t0 = time.perf_counter()
        for _ in range(args.members):
            f.write(weight.data)
            f.write(scales.data)
            f.write(gs.data)
        info = f.commit()
        dt = time.perf_counter() - t0
        od.close()
    print(f"{args.members} members, {info['size'] / 1e9:.2f} GB in {dt:.3f} s: {info['size'] / 1e9 / dt:.2f} GB/s")


if __name__ == "__main__":
    main()
