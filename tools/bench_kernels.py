"""GPU kernel throughput of every format in the registry (shardquant.formats.FORMATS) against a
device-to-device copy of the same bytes, and pinned host-to-device bandwidth. Needs cupy and a CUDA device.

    python tools/bench_kernels.py [--mib 1024] [--reps 50] [--formats nvfp4,fp8-block] [--scale-search mse]

Input: bf16 [mib * 2^19 / 4096, 4096] (whole 128x128 tiles and 32-element blocks), normal values
times 0.02, three buffers in rotation so that repeated runs do not measure the 50 MB L2. Each format
runs its declared Device method (formats/base.py Format.kernel) with the global scale of the data's
amax. Figures per format: GB/s of input consumed; GB/s of input read plus outputs written (codes and
block scales, from the format's declared layout) and that over the copy's rate (the copy moves the
input size in and out). `method` is the call a conversion makes (for formats with their own scales
it includes reading back the NaN/Inf flag: one synchronization); `kernel` leaves that read-back out.
With --scale-search, each format that declares it is also timed searching (method; `search_over_rtn`
is its time over round to nearest's).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

_SCALE_BYTES = {"F32": 4, "U8": 1, "F8_E4M3": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="bf16 input size per buffer")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--formats", default="", help="comma-separated format names (default: every format with a kernel)")
    ap.add_argument("--scale-search", default="none", choices=("none", "mse"))
    args = ap.parse_args()

    import cupy as cp

    from shardquant import formats
    from shardquant.cuda import _THREADS, Device, _grid, _kernel

    dev = Device(0)
    n = args.mib * 2**20 // 2
    rows, cols = n // 4096, 4096
    rng = cp.random.default_rng(0)
    # bf16 bit patterns of normal values (fp32 truncated to its top 16 bits)
    xs = [((rng.standard_normal((rows, cols), dtype=cp.float32) * 0.02).view(cp.uint32) >> 16).astype(cp.uint16)
          for _ in range(3)]
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
    res: dict = {}
    t = timed(lambda x: dst.__setitem__(slice(None), x))
    res["d2d_copy"] = {"in_gbs": nb / t / 1e9, "inout_gbs": 2 * nb / t / 1e9}
    amax_buf = cp.zeros(1, cp.uint32)
    k_amax = _kernel(0, "amax_bits", "BF16")
    t = timed(lambda x: k_amax((min(4 * 132 * 8, _grid(x.size)[0]),), (_THREADS,), (x, np.int64(x.size), amax_buf),
                               stream=dev.stream))
    res["amax"] = {"in_gbs": nb / t / 1e9, "inout_gbs": nb / t / 1e9}
    amax = max(dev.amax(x, "BF16", "bench") for x in xs)

    names = [f for f in args.formats.split(",") if f] or [f for f in formats.FORMATS if formats.declared(f).kernel]
    for fmt in names:
        decl = formats.declared(fmt)
        gs = formats.get(fmt).global_scale(np.float32(amax))
        w_rows, w_cols = decl.weight_shape((rows, cols))
        s_shape = decl.scale_shape((rows, cols))  # () for a per-tensor scale, which the kernel does not write
        out_bytes = w_rows * w_cols + (int(np.prod(s_shape)) * _SCALE_BYTES[decl.scale_dtype] if s_shape else 0)
        method = getattr(dev, decl.kernel)
        t_method = timed(lambda x: method(x, "BF16", gs, name="bench"))
        saved = dev._refuse_nonfinite
        dev._refuse_nonfinite = lambda *a: None  # the launch alone
        try:
            t_kernel = timed(lambda x: method(x, "BF16", gs, name="bench"))
        finally:
            dev._refuse_nonfinite = saved
        res[fmt] = {"in_gbs": nb / t_method / 1e9, "inout_gbs": (nb + out_bytes) / t_method / 1e9,
                    "kernel_in_gbs": nb / t_kernel / 1e9, "kernel_inout_gbs": (nb + out_bytes) / t_kernel / 1e9,
                    "out_bytes": out_bytes}
        if args.scale_search in decl.scale_search:
            t_search = timed(lambda x: method(x, "BF16", gs, name="bench", search=args.scale_search))
            res[fmt].update(search_in_gbs=nb / t_search / 1e9, search_over_rtn=t_search / t_method)

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
    res["h2d_pinned"] = {"in_gbs": nb / statistics.median(times) / 1e9}
    props = cp.cuda.runtime.getDeviceProperties(0)
    copy = res["d2d_copy"]["inout_gbs"]
    out = {k: ({kk: (round(vv, 1) if isinstance(vv, float) else vv) for kk, vv in v.items()}) for k, v in res.items()}
    out.update(card=props["name"].decode(), mib=args.mib, reps=args.reps, shape=[rows, cols], dtype="BF16",
               cupy=cp.__version__)
    print(json.dumps(out))
    print("| kernel | input GB/s (method) | in+out GB/s (method) | / copy | input GB/s (kernel only) | / copy |")
    print("|---|---|---|---|---|---|")
    for k in ["d2d_copy", "amax"] + names:
        r = res[k]
        kin = r.get("kernel_in_gbs", r["in_gbs"])
        kio = r.get("kernel_inout_gbs", r["inout_gbs"])
        print(f"| {k} | {r['in_gbs']:.0f} | {r['inout_gbs']:.0f} | {r['inout_gbs'] / copy:.2f} | {kin:.0f} | {kio / copy:.2f} |")
        if "search_in_gbs" in r:
            print(f"| {k} --scale-search {args.scale_search} | {r['search_in_gbs']:.0f} | | "
                  f"{r['search_over_rtn']:.2f}x RTN's time | | |")
    print(f"| h2d_pinned | {res['h2d_pinned']['in_gbs']:.0f} | | | | |")


if __name__ == "__main__":
    main()
