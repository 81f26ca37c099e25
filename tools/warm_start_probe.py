"""How the warm start's read-ahead behaves on this machine's disk (shardquant/startup.py hint,
shardquant/convert.py): for a local checkpoint and a policy, the page cache emptied before each variant,

  whole     the plan's first WARM_START_BYTES asked as ranges, one POSIX_FADV_WILLNEED call each
  stepped   the same ranges in steps of the disk's read window (startup.read_window), the output
            claimed (opened, locked, claimed) 0.2 s after the hint starts
  claimed   stepped, the output claimed before the hint starts (what convert() does)

and for each: seconds from the hint's start to the claim's end, to the hint's last call returning,
and to the end of then reading those bytes (what a read-ahead left uncached is read from disk then).

    python tools/warm_start_probe.py /tmp/shardquant-bench/qwen3-moe-21.2gb --policy shared --runs 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import drop_cache  # noqa: E402

from shardquant import pipeline, startup  # noqa: E402
from shardquant.lock import Lock  # noqa: E402
from shardquant.output import claim_output  # noqa: E402
from shardquant.plan import prepare  # noqa: E402
from shardquant.writer import OutputDir  # noqa: E402


def planned_ranges(plan) -> list[tuple[Path, int, int]]:
    """The ranges convert()'s warm start asks for (shardquant/pipeline.py warm_start), as asked."""
    got: list = []
    real = pipeline.hint
    pipeline.hint = lambda ranges, hub, mark: got.append(ranges)
    try:
        pipeline.warm_start(plan)
    finally:
        pipeline.hint = real
    return got[0]


def one(plan, ranges, variant: str, out: Path) -> tuple[float, float, float]:
    asked = ranges if variant == "whole" else list(startup.in_steps(ranges))
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(sorted({f for f, _, _ in ranges}))
    marks: dict[str, float] = {}

    def hint() -> None:
        fds: dict[Path, int] = {}
        for f, o, n in asked:
            if f not in fds:
                fds[f] = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fds[f], o, n, os.POSIX_FADV_WILLNEED)
        for fd in fds.values():
            os.close(fd)
        marks["hinted"] = time.perf_counter()

    def claim() -> None:
        od = OutputDir.open(out)
        try:
            with Lock(od) as lock:
                claim_output(od, plan, False, lock.previous_tokens)
        finally:
            od.close()
        marks["claimed"] = time.perf_counter()

    t0 = time.perf_counter()
    if variant == "claimed":
        claim()
        t0 = time.perf_counter()  # the hint starts once the claim is done: 0 s to claimed
        marks["claimed"] = t0
    th = threading.Thread(target=hint)
    th.start()
    if variant != "claimed":
        time.sleep(0.2)  # the plan is done and the device starts: convert() claims when it is ready
        claim()
    th.join()
    buf = bytearray(16 << 20)
    for f, o, n in ranges:  # what the pipeline reads first
        with open(f, "rb", buffering=0) as fh:
            fh.seek(o)
            left = n
            while left > 0:
                left -= fh.readinto(memoryview(buf)[: min(left, len(buf))])
    end = time.perf_counter()
    return marks["claimed"] - t0, marks["hinted"] - t0, end - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("--policy", default="shared")
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    plan = prepare(a.src, "nvfp4", expert_policy=a.policy)
    ranges = planned_ranges(plan)
    window = startup.read_window(ranges[0][0])
    print(f"# {a.src}, {a.policy}: {len(ranges)} ranges, {sum(n for *_, n in ranges) / 2**30:.2f} GiB, "
          f"read window {window >> 10} KiB")
    print("| variant | run | claimed s | hint returned s | first bytes read s |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=Path(a.src).parent) as tmp:
        for run in range(1, a.runs + 1):
            for variant in ("whole", "stepped", "claimed"):
                c, h, r = one(plan, ranges, variant, Path(tmp) / "out")
                print(f"| {variant} | {run} | {c:.3f} | {h:.3f} | {r:.3f} |", flush=True)


if __name__ == "__main__":
    main()
