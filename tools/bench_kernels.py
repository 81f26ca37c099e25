"""GPU kernel throughput against a device-to-device copy of the same bytes, and pinned
host-to-device bandwidth. Needs cupy and a CUDA device.

    python tools/bench_kernels.py [--mib 1024] [--reps 50]

Bytes counted per kernel: input read plus output written (NVFP4: 2 B in, 0.5625 B out per bf16
element; FP8: 2 B in, 1 B out; amax: 2 B in); the copy moves the input size in and out.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="bf16 input size per buffer")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()

    import cupy as cp

    from shardquant.cuda import Device

    dev = Device(0)
    n = args.mib * 2**20 // 2
    rows, cols = n // 4096, 4096
    rng = cp.random.default_rng(0)
    # rotate among 3 inputs so that repeated runs do not measure the 50 MB L2
    xs = [(rng.standard_normal((rows, cols), dtype=cp.float32) * 0.02).astype(cp.float16).view(cp.uint16) for _ in range(3)]
    xs = [((x.astype(cp.uint32) & 0x7FFF) | 0x3C00).astype(cp.uint16) for x in xs]  # bf16 bit patterns
    dst = cp.empty_like(xs[0])

    def timed(fn) -> float:
        """Median seconds of fn, with events on the stream the kernels run on (the device's own)."""
        for i in range(3):
            fn(xs[i % 3])
        cp.cuda.Device().synchronize()
        times = []
        with dev.stream:
            for i in range(args.reps):
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record(dev.stream)
                fn(xs[i % 3])
                b.record(dev.stream)
                b.synchronize()
                times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
        return statistics.median(times)

    nb = xs[0].nbytes
    res = {}
    t = timed(lambda x: dst.__setitem__(slice(None), x))
    res["d2d_copy"] = 2 * nb / t / 1e9
    from shardquant.cuda import _kernel, _grid, _THREADS
    amax_buf = cp.zeros(1, cp.uint32)
    k_amax = _kernel(0, "amax_bits", "BF16")
    t = timed(lambda x: k_amax((min(4 * 132 * 8, _grid(x.size)[0]),), (_THREADS,), (x, np.int64(x.size), amax_buf),
                               stream=dev.stream))
    res["amax"] = nb / t / 1e9
    t = timed(lambda x: dev.nvfp4(x, "BF16", np.float32(1e-4)))
    res["nvfp4"] = (nb + nb // 4 + nb // 32) / t / 1e9
    t = timed(lambda x: dev.fp8(x, "BF16", np.float32(1e-3)))
    res["fp8"] = (nb + nb // 2) / t / 1e9
    host = cp.cuda.alloc_pinned_memory(nb)
    hview = np.frombuffer(host, np.uint16, nb // 2)
    hview[:] = 1
    times = []
    for _ in range(10):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        dst.set(hview.reshape(dst.shape))
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    res["h2d_pinned"] = nb / statistics.median(times) / 1e9
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    res = {k: round(v, 1) for k, v in res.items()}
    res.update(card=name, mib=args.mib, reps=args.reps)
    print(json.dumps(res))
    print("| kernel | GB/s | / copy |\n|---|---|---|")
    for k in ("d2d_copy", "amax", "nvfp4", "fp8", "h2d_pinned"):
        print(f"| {k} | {res[k]:.0f} | {res[k] / res['d2d_copy']:.2f} |")


if __name__ == "__main__":
    main()
