"""How fast the conversion's reads can go on this disk: the plan's read order (per tensor, as
shardquant/pipeline.py reads it) against file order, larger coalesced reads, more threads, and one
sequential reader; and how fast one thread hashes (shardquant/provenance.py). Cold page cache,
medians of --runs, alternating variants, each against the sequential read measured in the same run.
    python tools/bench_reads.py --size 4 --runs 2 --workdir /tmp/sqb
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: the same checkpoint builder and cache eviction)

from shardquant.plan import make_plan  # noqa: E402
from shardquant.rules import RuleSet  # noqa: E402
from shardquant.source import open_checkpoint  # noqa: E402


def spans_of(plan, order: str, coalesce: int) -> list[tuple[Path, int, int]]:
    """(file, offset, nbytes) reads: per tensor in the plan's order or file order, with `coalesce`
    > 0 merging neighbours (adjacent in the file and in the order) into reads of up to that size."""
    seq = [(m.file, m.offset, m.nbytes) for u in plan.units for m in (u.group.members if u.group else [u.kept])]
    if order == "file":
        seq.sort(key=lambda s: (str(s[0]), s[1]))
    if not coalesce:
        return seq
    out: list[list] = []
    for f, off, n in seq:
        last = out[-1] if out else None
        if last is not None and last[0] == f and last[1] + last[2] == off and last[2] + n <= coalesce:
            last[2] += n
        else:
            out.append([f, off, n])
    return [tuple(s) for s in out]


def pread(span) -> int:
    f, off, n = span
    buf = np.empty(n, np.uint8)
    mv = memoryview(buf)
    with open(f, "rb", buffering=0) as fh:
        fh.seek(off)
        got = 0
        while got < n:
            k = fh.readinto(mv[got:])
            if not k:
                break
            got += k
    return got


def timed_reads(spans, threads: int, files: list[Path], inflight_bytes: int = 512 << 20) -> float:
    """Seconds to read `spans` on `threads` threads, at most `inflight_bytes` submitted and unread."""
    bench.drop_cache(files)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        pending, held = [], 0
        for s in spans:
            while pending and held + s[2] > inflight_bytes:
                held -= pending.pop(0).result()
            pending.append(pool.submit(pread, s))
            held += s[2]
        for p in pending:
            p.result()
    return time.perf_counter() - t0


def hash_rate(nbytes: int = 1 << 30) -> float:
    buf = np.random.default_rng(0).integers(0, 255, nbytes, np.uint8)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for a in range(0, nbytes, 16 << 20):
        h.update(memoryview(buf[a:a + (16 << 20)]))
    return nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--policy", default="shared")
    ap.add_argument("--workdir", default="/tmp/shardquant-bench")
    args = ap.parse_args()
    src = bench.build(Path(args.workdir), args.size)
    ck = open_checkpoint(str(src))
    plan = make_plan(ck, "nvfp4", RuleSet(expert_policy=args.policy))
    files = sorted(src.glob("*.safetensors"))
    total = sum(s[2] for s in spans_of(plan, "plan", 0))
    variants = {
        "plan order, per tensor, 4 threads (today)": (spans_of(plan, "plan", 0), 4),
        "plan order, per tensor, 8 threads": (spans_of(plan, "plan", 0), 8),
        "plan order, per tensor, 16 threads": (spans_of(plan, "plan", 0), 16),
        "plan order, coalesced to 32 MiB, 4 threads": (spans_of(plan, "plan", 32 << 20), 4),
        "plan order, coalesced to 32 MiB, 8 threads": (spans_of(plan, "plan", 32 << 20), 8),
        "file order, per tensor, 4 threads": (spans_of(plan, "file", 0), 4),
        "file order, coalesced to 32 MiB, 4 threads": (spans_of(plan, "file", 32 << 20), 4),
    }
    rows: dict[str, list[float]] = {"sequential 16 MiB, 1 thread (bench.read_all)": []}
    for _ in range(args.runs):
        rows["sequential 16 MiB, 1 thread (bench.read_all)"].append(bench.read_all(src, True)[0])
        for name, (spans, threads) in variants.items():
            rows.setdefault(name, []).append(timed_reads(spans, threads, files))
    base = statistics.median(rows["sequential 16 MiB, 1 thread (bench.read_all)"])
    print(f"# {os.cpu_count()} cores, {total / 1e9:.2f} GB of tensors, policy {args.policy}, "
          f"{len(spans_of(plan, 'plan', 0))} tensors, {len(spans_of(plan, 'plan', 32 << 20))} coalesced plan-order "
          f"reads, cold page cache, medians of {args.runs}")
    print("| reads | s | GB/s | / sequential |\n|---|---|---|---|")
    for name, ts in rows.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {total / t / 1e9:.2f} | {base / t:.2f} |")
    print(f"| SHA-256, one thread, in memory | | {hash_rate():.2f} | |")
    print(json.dumps({k: statistics.median(v) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
