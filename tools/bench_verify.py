"""`verify --source` on the GPU in one process, variants alternating with a cold read of source +
output in the same run: reader threads (shardquant/verify.py GPU_THREADS) and whether the engines'
rules run beside the comparison or after it.

    python tools/bench_verify.py --size 4 --runs 2 --variants t4-bg,t8-bg,t4-after,t16-after
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

import shardquant.verify as V  # noqa: E402
from shardquant import trace  # noqa: E402
from shardquant.background import in_background  # noqa: E402

VARIANTS = {"t4-bg": (4, False), "t8-bg": (8, False), "t4-after": (4, True), "t8-after": (8, True),
            "t16-after": (16, True)}


class _Later:
    """A future computed when its result is asked for: the engines' rules after the comparison."""

    def __init__(self, fn):
        self.fn = fn

    def result(self):
        return self.fn()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--variants", default="t4-bg,t8-bg,t4-after,t16-after")
    ap.add_argument("--workdir", default="/tmp/shardquant-bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = bench.build(work, args.size)
    out = work / f"verify-out-{args.size:g}gb"
    if not (out / "model.safetensors.index.json").exists():
        bench.convert_once(src, out, "nvfp4", "cuda", cold=False)
    tiny = Path(__file__).resolve().parent.parent / "examples" / "tiny-moe"
    bench.convert_once(tiny, work / "tiny-out", "nvfp4", "cuda", cold=False)
    V.verify(str(work / "tiny-out"), str(tiny), device="cuda")  # CUDA and the kernels, not timed
    ratios: dict[str, list[float]] = {}
    for _ in range(args.runs):
        for name in args.variants.split(","):
            threads, after = VARIANTS[name]
            rt, n = bench.read_all([src, out], True)
            V.GPU_THREADS = threads
            V.in_background = (lambda fn, name="": _Later(fn)) if after else in_background
            bench.drop_cache(sorted(src.glob("*.safetensors")) + sorted(out.glob("*.safetensors")))
            log = Path(tempfile.mktemp(suffix=".jsonl"))
            os.environ["SHARDQUANT_TRACE"] = str(log)
            trace._seen.clear()
            t0 = time.time()
            rep = V.verify(str(out), str(src), device="cuda")
            if not rep.ok:
                sys.exit(f"verify failed: {rep.violations[:3]}")
            marks = {k: round(e["t"] - t0, 2) for k, e in trace.read(log).items()}
            log.unlink(missing_ok=True)
            ratios.setdefault(name, []).append(rt / rep.seconds)
            print(name, f"read {n / rt / 1e9:.2f} GB/s verify {rep.seconds:.2f}s over_read {rt / rep.seconds:.2f}",
                  marks, flush=True)
    for k, v in ratios.items():
        print("MEDIAN", k, f"{statistics.median(v):.2f}")


if __name__ == "__main__":
    main()
