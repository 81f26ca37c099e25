"""A device lane's work per quantizer without the rest of the pipeline (shardquant/pipeline.py
quantize_group): the first --groups quantizers of a checkpoint read into memory first (the pipeline's
own reader), then uploaded (decoded), reduced, quantized and copied back by the backend's lanes, on 1, 2
and 3 threads at once, and again with a thread that holds the interpreter lock in pure Python 1 ms out of
every 2 (what the card's, the journal's and the queues' Python work is to a lane). Prints milliseconds of
lane time per quantizer and per member, and MB/s of source through the lanes.

Where a lane takes far longer per quantizer inside a conversion (the trace's lane_* fields,
tools/bench.py) than here, the difference is contention, not the device's work.

    python tools/lane_probe.py /tmp/shardquant-bench/qwen3-moe-42.4gb-block-fp8 --device cuda --policy per-expert
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np

from shardquant import formats
from shardquant.backend import get_backend
from shardquant.pipeline import _Counter, _Reader
from shardquant.plan import prepare


def lane_work(backend, fmt: str, group, data) -> None:
    """One quantizer as a lane does it (shardquant/pipeline.py quantize_group, single pass)."""
    handles = [backend.load(raw) for raw in data]
    amax = max(backend.amaxes((h, m.dtype, m.name) for h, m in zip(handles, group.members)))
    q = backend.quantizer(fmt, formats.get(fmt).global_scale(np.float32(amax)))
    for h, m in zip(handles, group.members):
        q.quantize(h, m.dtype, m.name)


def pinned_copies(work):
    """The same data in page-locked host memory (cupy's pinned pool): uploads become asynchronous DMA
    instead of the driver's staged copies; and downloads into pinned buffers (Device.to_host patched)."""
    import cupy as cp
    from shardquant import cuda
    from shardquant.encoding import Encoded

    def pin(a: np.ndarray) -> np.ndarray:
        out = np.frombuffer(cp.cuda.alloc_pinned_memory(max(1, a.nbytes)), a.dtype, a.size).reshape(a.shape)
        out[...] = a
        return out

    def to_host(self, *xs):
        with self.device, self.stream:
            out = []
            for x in xs:
                h = np.frombuffer(cp.cuda.alloc_pinned_memory(max(1, x.nbytes)), x.dtype, x.size).reshape(x.shape)
                x.get(stream=self.stream, out=h)
                out.append(h)
            self.stream.synchronize()
        return out

    cuda.Device.to_host = to_host
    return [(g, [Encoded(r.info, tuple(pin(p) for p in r.raws)) if isinstance(r, Encoded) else pin(r) for r in data])
            for g, data in work]


def hog(stop: threading.Event) -> None:
    """Pure Python for ~1 ms, then sleep ~1 ms: holds the interpreter lock half the time."""
    while not stop.is_set():
        t = time.perf_counter() + 0.001
        while time.perf_counter() < t:
            pass
        time.sleep(0.001)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--policy", default="per-expert")
    ap.add_argument("--groups", type=int, default=600, help="quantizers to take, in plan order")
    ap.add_argument("--threads", default="1,2,3")
    ap.add_argument("--pinned", action="store_true", help="read data and downloads in pinned host memory (GPU)")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval, seconds")
    a = ap.parse_args()
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    most = max(int(t) for t in a.threads.split(","))
    os.environ["SHARDQUANT_DEVICE_LANES"] = str(most)  # one lane per thread (shardquant/plan.py device_lanes)
    backend = get_backend(a.device, None)
    lanes = backend.lanes()
    lanes += [backend] * (most - len(lanes))  # the CPU's one lane, shared: NumPy threads each kernel itself
    plan = prepare(a.src, a.format, expert_policy=a.policy)
    reader = _Reader(plan.units, _Counter(), getattr(backend, "decodes", ()))
    work = []
    for u, data in reader:
        if u.group is None or data is None:
            continue
        work.append((u.group, data))
        reader.release(sum(m.nbytes for m in u.group.members))
        if len(work) == a.groups:
            break
    reader.close()
    if a.pinned:
        work = pinned_copies(work)
    members = sum(len(g.members) for g, _ in work)
    nbytes = sum(m.nbytes for g, _ in work for m in g.members)
    for g, data in work[:4]:  # warm: kernels loaded, the memory pool grown
        lane_work(lanes[0], a.format, g, data)
    print(f"# {a.src} {a.format} {a.policy} on {a.device}: {len(work)} quantizers, {members} members, "
          f"{nbytes / 1e9:.2f} GB as the lanes get it{', pinned' if a.pinned else ''}; switch interval {sys.getswitchinterval() * 1e3:g} ms")
    print("| threads | python hog | wall s | lane ms per quantizer | lane ms per member | MB/s |\n|---|---|---|---|---|---|")
    for hogging in (False, True):
        for n in (int(t) for t in a.threads.split(",")):
            stop = threading.Event()
            h = threading.Thread(target=hog, args=(stop,), daemon=True)
            if hogging:
                h.start()
            busy = [0.0] * n

            def run(i: int) -> None:
                t0 = time.perf_counter()
                for g, data in work[i::n]:
                    lane_work(lanes[i], a.format, g, data)
                busy[i] = time.perf_counter() - t0

            t0 = time.perf_counter()
            ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            wall = time.perf_counter() - t0
            stop.set()
            print(f"| {n} | {'yes' if hogging else 'no'} | {wall:.2f} | {sum(busy) / len(work) * 1e3:.2f} | "
                  f"{sum(busy) / members * 1e3:.3f} | {nbytes / wall / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
