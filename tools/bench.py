"""Throughput and peak memory of `shardquant convert` on a synthetic Qwen3-MoE-shaped checkpoint.

Builds (once, cached under --workdir) a bf16 checkpoint with Qwen3-30B-A3B's tensor shapes
(hidden 2048, 128 experts of 768, q 4096 / kv 512) and enough layers for --size GB, then in one run:
  * reads the same shard files end to end (the read baseline, page cache as it stands),
  * converts them with `shardquant convert` in a child process, per format, --runs times,
and prints medians: input MB/s, the ratio to the read rate, and the child's peak RSS.

    python tools/bench.py --size 2 --formats nvfp4,fp8 --runs 3
    python tools/bench.py --size 1 --size 2          # peak RSS at two model sizes
    python tools/bench.py --device cuda --formats nvfp4,mxfp4 --scale-search mse   # searched vs RTN, alternating
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shardquant import trace
import numpy as np

from shardquant.testing import Model, fast_data, qwen3_moe, write_checkpoint

HIDDEN, INTER, EXPERTS, HEADS, KV, HD, VOCAB = 2048, 768, 128, 32, 4, 128, 151936


def qwen3_30b_shaped(size_gb: float) -> Model:
    """Qwen3-30B-A3B shapes; layers (and, under one layer, experts) chosen for ~size_gb of bf16.
    Embedding and head use a reduced vocabulary so that experts dominate, as in the real model."""
    per_expert = 3 * INTER * HIDDEN * 2
    attn = (HEADS * HD * HIDDEN * 2 + 2 * KV * HD * HIDDEN + HIDDEN * HEADS * HD) * 2
    per_layer = EXPERTS * per_expert + attn
    target = size_gb * 1e9
    layers = max(1, round(target / per_layer))
    experts = EXPERTS if target >= per_layer else max(2, int(target / per_expert))
    return qwen3_moe(hidden=HIDDEN, layers=layers, experts=experts, inter=INTER, vocab=VOCAB // 16,
                     heads=HEADS, kv_heads=KV, head_dim=HD)


# Source encodings a benchmark checkpoint can be stored in (shardquant/encoding.py reads them):
# bf16; block-fp8 (DeepSeek-V3's `weight` F8_E4M3 + `weight_scale_inv` F32 per 128x128 tile, every
# linear); mxfp4 (Kimi-K3's compressed-tensors `weight_packed` + E8M0 `weight_scale` per 32, routed
# experts; the rest bf16).
ENCODINGS = ("bf16", "block-fp8", "mxfp4")


def encoded(model: Model, encoding: str) -> Model:
    """The model's specs and config as stored in `encoding` (same logical weights)."""
    if encoding == "bf16":
        return model
    specs, linear = [], (".self_attn.", ".mlp.experts.") if encoding == "block-fp8" else (".mlp.experts.",)
    for name, dtype, shape in model.specs:
        if not (len(shape) == 2 and name.endswith("_proj.weight") and any(k in name for k in linear)):
            specs.append((name, dtype, shape))
        elif encoding == "block-fp8":
            specs += [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", (-(-shape[0] // 128), -(-shape[1] // 128)))]
        else:
            stem = name[: -len(".weight")]
            specs += [(stem + ".weight_packed", "U8", (shape[0], shape[1] // 2)),
                      (stem + ".weight_scale", "U8", (shape[0], shape[1] // 32))]
    cfg = dict(model.config)
    cfg["quantization_config"] = (
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if encoding == "block-fp8" else
        {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "group_size": 32,
                                                                           "strategy": "group", "symmetric": True}}}})
    return Model(specs, cfg)


def encoded_data(spec, rng: np.random.Generator) -> np.ndarray:
    """fast_data for float tensors; E4M3 codes without NaN, packed E2M1 bytes, tile scales near 2^-10,
    E8M0 bytes 2^-12..2^-5 (a spread of 8 binades: every block fits a cast)."""
    name, dtype, shape = spec
    if dtype == "F8_E4M3":  # random bytes, the NaN pattern (S.1111.111) made the largest finite code
        b = rng.integers(0, 256, size=shape, dtype=np.uint8)
        b -= ((b & 0x7F) == 0x7F).view(np.uint8)
        return b
    if name.endswith("_scale_inv"):
        return np.full(shape, 2.0**-10, np.float32) * (1 + rng.random(shape, dtype=np.float32))
    if name.endswith(".weight_packed"):
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if name.endswith(".weight_scale"):
        return rng.integers(127 - 12, 127 - 4, size=shape, dtype=np.uint8)
    return fast_data(spec, rng)


def build(workdir: Path, size_gb: float, encoding: str = "bf16") -> Path:
    src = workdir / (f"qwen3-moe-{size_gb:g}gb" + ("" if encoding == "bf16" else f"-{encoding}"))
    if (src / "model.safetensors.index.json").exists():
        return src
    t0 = time.perf_counter()
    write_checkpoint(src, encoded(qwen3_30b_shaped(size_gb), encoding),
                     shard_bytes=4 * 10**9 if size_gb > 8 else 10**9, data=encoded_data)
    print(f"# built {src} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return src


def drop_cache(paths: list[Path]) -> None:
    """Evict these files from the page cache (POSIX_FADV_DONTNEED on clean pages; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(src: Path | list[Path], cold: bool) -> tuple[float, int]:
    """Seconds to read every shard of a directory (or of several) once, 16 MiB at a time, and the bytes read."""
    files = [f for d in (src if isinstance(src, list) else [src]) for f in sorted(d.glob("*.safetensors"))]
    if cold:
        drop_cache(files)
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(mv):
                n += k
    return time.perf_counter() - t0, n


def write_baseline(where: Path, nbytes: int) -> float:
    """Seconds to write nbytes (16 MiB writes) and fsync: the output side of the disk limit."""
    path = where / "write-baseline.bin"
    buf = os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(buf[: min(left, len(buf))])
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    drop_cache([path])
    path.unlink()
    return dt


def read_and_write(src: Path, where: Path, nbytes: int, cold: bool) -> float:
    """Seconds to read every shard of `src` and, at the same time on another thread, write and fsync
    nbytes: the disk's limit for a conversion, whose reads and writes overlap (a disk that serves both
    at once is not limited by their sum)."""
    import threading

    t = threading.Thread(target=write_baseline, args=(where, nbytes))
    t0 = time.perf_counter()
    t.start()
    read_all(src, cold)
    t.join()
    return time.perf_counter() - t0


CHILD = """
import json, resource, sys
from shardquant import trace
trace.mark("python-ready")
try:  # as `shardquant convert` does before its imports (shardquant/cli.py); --vs: a release without it
    from shardquant.startup import early_warm_start, gpu_start
    early_warm_start(sys.argv[1], ahead=True)
    gpu_start(sys.argv[4])
except ImportError:
    pass
from shardquant.convert import convert
searched = {"scale_search": sys.argv[6]} if sys.argv[6] != "none" else {}  # --vs: a release without it
r = convert(sys.argv[1], sys.argv[2], sys.argv[3], device=sys.argv[4], expert_policy=sys.argv[5], **searched)
print(json.dumps({"seconds": r.seconds, "bytes_read": r.bytes_read, "source_bytes": r.plan.source_bytes,
                  "output_bytes": r.plan.output_bytes, "peak_estimate": r.plan.peak_bytes,
                  "backend": r.backend, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


VERIFY_CHILD = """
import json, sys, time
from shardquant import trace
trace.mark("python-ready")
from shardquant.verify import verify
rep = verify(sys.argv[1], sys.argv[2], device=sys.argv[3])
assert rep.ok, rep.violations[:3]
print(json.dumps({"seconds": rep.seconds, "tensors": len(rep.tensors)}))
"""


def verify_once(src: Path, out: Path, cold: bool, device: str = "auto") -> dict:
    """`verify OUT --source SRC` in a fresh interpreter (cold: both evicted first): in-run and whole-process seconds."""
    if cold:
        drop_cache(sorted(src.glob("*.safetensors")) + sorted(out.glob("*.safetensors")))
    log = out.parent / "verify-trace.jsonl"
    log.unlink(missing_ok=True)
    spawned = time.time()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", VERIFY_CHILD, str(out), str(src), device], capture_output=True, text=True,
                       env=dict(os.environ, SHARDQUANT_TRACE=str(log)))
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"verify failed:\n{p.stderr}")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    info["wall"] = wall
    info["marks"] = {k: round(t - spawned, 3) for k, t in read_trace(log).items() if k not in PIPELINE_FIELDS}
    return info


def convert_once(src: Path, out: Path, fmt: str, device: str, cold: bool, pythonpath: str | None = None,
                 policy: str = "shared", scale_search: str = "none", env_extra: dict | None = None) -> dict:
    """One conversion in a fresh interpreter: its own timing, bytes read and peak RSS, and its
    milestones (shardquant/trace.py) in seconds after the interpreter was started. With
    `pythonpath`, the shardquant package found there runs (an earlier release, for --vs); with
    `env_extra`, under those environment settings (--vs-env)."""
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        drop_cache(sorted(src.glob("*.safetensors")))
    log = out.parent / "trace.jsonl"
    log.unlink(missing_ok=True)
    env = dict(os.environ, SHARDQUANT_TRACE=str(log), **({"PYTHONPATH": pythonpath} if pythonpath else {}),
               **(env_extra or {}))
    spawned = time.time()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), fmt, device, policy, scale_search],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"conversion failed:\n{p.stderr}")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    info["wall"] = wall
    marks = read_trace(log)
    info.update({(k if k in PIPELINE_FIELDS else f"at_{k.replace('-', '_')}"): (t if k in PIPELINE_FIELDS else t - spawned)
                 for k, t in marks.items()})
    return info


# the pipeline's own accounts (shardquant/pipeline.py run, trace mark "pipeline")
PIPELINE_FIELDS = ("reader_wait_s", "writer_idle_s", "writer_sync_s", "writer_write_s", "writer_writeback_s",
                   "writer_hash_wait_s", "device_busy_s", "device_put_wait_s", "device_hold_wait_s",
                   "lane_load_amax_s", "lane_quantizer_s", "lane_quantize_s", "lane_put_s", "lane_cast_s",
                   "hash_busy_s", "hash_finish_s", "hash_extra_bytes")


def read_trace(path: Path) -> dict[str, float]:
    """{milestone: wall-clock time} of a child's SHARDQUANT_TRACE file, and the pipeline's waits
    (fields ending in _s, seconds)."""
    out: dict[str, float] = {}
    for event, e in trace.read(path).items():
        out[event] = e["t"]
        out.update({k: v for k, v in e.items() if k.endswith("_s") or k == "hash_extra_bytes"})
    return out


def summarize(args, size: float, fmt: str, policy: str, rows: list[dict], results: list[dict]) -> None:
    """Medians of one format and policy's runs, printed as JSON and added to `results`."""
    alone = rows[0]["read_s"] is not None  # --baselines all: the source read alone, the output written alone
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("read_s", "write_s", "both_s", "seconds", "wall", "rss") if alone or k not in ("read_s", "write_s")}
    src_b, out_b = rows[0]["source_bytes"], rows[0]["output_bytes"]
    res = {
        "size_gb": size, "encoding": args.encoding, "format": fmt, "policy": policy, "device": args.device, "backend": rows[0]["backend"],
        "runs": args.runs, "cold": args.cold, "source_gb": src_b / 1e9, "output_gb": out_b / 1e9,
        "convert_gb_s": src_b / med["seconds"] / 1e9,
        "wall_gb_s": src_b / med["wall"] / 1e9,
        # the limit with reads and writes running at once, measured in the same run: the headline
        "concurrent_limit_gb_s": src_b / med["both_s"] / 1e9,
        "convert_over_concurrent_limit": med["both_s"] / med["seconds"],
        "wall_over_concurrent_limit": med["both_s"] / med["wall"],
        "bytes_read_over_source": max(r["bytes_read"] for r in rows) / src_b,
        "peak_rss_mib": med["rss"] / 2**20,
        "peak_bound_mib": rows[0]["peak_estimate"] / 2**20,
    }
    if alone:
        disk_s = med["read_s"] + med["write_s"]
        res.update({"read_gb_s": rows[0]["read_bytes"] / med["read_s"] / 1e9, "write_gb_s": out_b / med["write_s"] / 1e9,
                    "disk_limit_gb_s": src_b / disk_s / 1e9, "convert_over_disk_limit": disk_s / med["seconds"],
                    "convert_over_read": med["read_s"] / med["seconds"]})
    # start-up and finish, seconds after the interpreter was started (medians; shardquant/trace.py)
    for k in sorted({k for r in rows for k in r if k.startswith("at_") or k in PIPELINE_FIELDS}):
        res[k] = statistics.median(r[k] for r in rows if k in r)
    if "at_finished" in res:
        res["after_finish_s"] = med["wall"] - res["at_finished"]
    if args.verify:
        vmed = {k: statistics.median(r[k] for r in rows) for k in ("vread_s", "verify_s", "verify_wall")}
        res["verify_gb_s"] = rows[0]["vread_bytes"] / vmed["verify_s"] / 1e9
        res["verify_wall_gb_s"] = rows[0]["vread_bytes"] / vmed["verify_wall"] / 1e9
        res["verify_read_gb_s"] = rows[0]["vread_bytes"] / vmed["vread_s"] / 1e9
        res["verify_over_read"] = vmed["vread_s"] / vmed["verify_s"]
    if args.vs or args.vs_env:  # pairwise ratios (this / --vs, --vs-env), each pair run back to back
        for k in ("ratio_seconds", "ratio_wall", "vs_seconds", "vs_wall"):
            res[k] = statistics.median(r[k] for r in rows)
    if args.scale_search != "none":  # medians of each, and searched over RTN (ratio of the medians)
        for k in ("search_seconds", "search_wall"):
            res[k] = statistics.median(r[k] for r in rows)
        res["search_over_rtn_seconds"] = res["search_seconds"] / med["seconds"]
        res["search_over_rtn_wall"] = res["search_wall"] / med["wall"]
        print(f"# {fmt} --scale-search {args.scale_search} on {res['backend']}: {res['search_seconds']:.2f} s "
              f"vs RTN {med['seconds']:.2f} s in run ({res['search_over_rtn_seconds']:.2f}x), whole process "
              f"{res['search_wall']:.2f} s vs {med['wall']:.2f} s ({res['search_over_rtn_wall']:.2f}x), "
              f"medians of {args.runs}", flush=True)
    results.append(res)
    print(json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, action="append", help="checkpoint size in GB of bf16 (repeatable)")
    ap.add_argument("--encoding", default="bf16", choices=ENCODINGS,
                    help="how the source stores its weights (a quantized source is smaller than --size)")
    ap.add_argument("--formats", default="nvfp4,fp8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policies", default="shared", help="expert policies, comma-separated: shared,per-expert")
    ap.add_argument("--verify-device", default="auto", help="verify --device for --verify")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baselines", default="all", choices=("all", "concurrent"),
                    help="all: before each conversion the source read alone, after it the output written alone and "
                         "both at once; concurrent: only both at once, once a run per format (the headline's limit; "
                         "the policies of that run share it)")
    ap.add_argument("--cold", action="store_true", help="evict the source from the page cache before each read")
    ap.add_argument("--workdir", default=os.environ.get("SHARDQUANT_BENCH_DIR", "/tmp/shardquant-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoints for the next run")
    ap.add_argument("--verify", action="store_true",
                    help="also time `verify --source` on each output, against reading source and output once")
    ap.add_argument("--vs", metavar="PYTHONPATH", default=None,
                    help="also run the shardquant package found under this path (e.g. an earlier release "
                         "unpacked with `git archive`), alternating with this one; report the time ratio")
    ap.add_argument("--vs-env", metavar="KEY=VALUE", action="append", default=[],
                    help="run the --vs baseline (this package when --vs is not given) with this environment "
                         "setting, e.g. SHARDQUANT_DEVICE_LANES=1 (repeatable)")
    ap.add_argument("--scale-search", default="none", choices=("none", "mse"),
                    help="also convert with this --scale-search, alternating with round to nearest on the same "
                         "files; report both medians and their ratio (issue 12: mse at most 1.5x RTN on an H200)")
    args = ap.parse_args()
    vs_env = dict(kv.split("=", 1) for kv in args.vs_env if "=" in kv)
    if len(vs_env) != len(args.vs_env):
        ap.error("--vs-env takes KEY=VALUE")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.device != "cpu":  # compiled kernels are cached across runs (shardquant/cuda): a fresh machine
        # compiles once, on its first conversion; not what any later conversion pays, so not timed here
        tiny = Path(__file__).resolve().parent.parent / "examples" / "tiny-moe"
        for fmt in args.formats.split(","):
            convert_once(tiny, work / "warm-up", fmt, args.device, cold=False, scale_search=args.scale_search)
        shutil.rmtree(work / "warm-up", ignore_errors=True)
    results = []
    for size in args.size or [2.0]:
        src = build(work, size, args.encoding)
        policies = args.policies.split(",")
        for fmt in args.formats.split(","):
            rows_of: dict[str, list[dict]] = {p: [] for p in policies}
            for _ in range(args.runs):  # baselines and conversions alternate, same files
                both = None  # the concurrent limit: measured once a run, after its first conversion
                for policy in policies:
                    if args.baselines == "all" or both is None:
                        rt, nread = read_all(src, args.cold) if args.baselines == "all" else (None, None)
                    info = convert_once(src, work / "out", fmt, args.device, args.cold, policy=policy)
                    wt = write_baseline(work, info["output_bytes"]) if args.baselines == "all" else None
                    if args.baselines == "all" or both is None:
                        both = read_and_write(src, work, info["output_bytes"], args.cold)
                    info["both_s"] = both
                    if args.vs or vs_env:
                        base = convert_once(src, work / "out", fmt, args.device, args.cold, args.vs, policy,
                                            env_extra=vs_env)
                        info["vs_seconds"], info["vs_wall"] = base["seconds"], base["wall"]
                        info["ratio_seconds"], info["ratio_wall"] = info["seconds"] / base["seconds"], info["wall"] / base["wall"]
                    if args.scale_search != "none":  # the same conversion with searched scales, right after RTN's
                        sr = convert_once(src, work / "out", fmt, args.device, args.cold, policy=policy,
                                          scale_search=args.scale_search)
                        info["search_seconds"], info["search_wall"] = sr["seconds"], sr["wall"]
                    if args.verify:  # reading source + output once, then verify over the same files
                        info["vread_s"], info["vread_bytes"] = read_all([src, work / "out"], args.cold)
                        v = verify_once(src, work / "out", args.cold, args.verify_device)
                        info["verify_s"], info["verify_wall"] = v["seconds"], v["wall"]
                        print("# verify marks (s after spawn):", json.dumps(v["marks"]), flush=True)
                    rows_of[policy].append({"read_s": rt, "read_bytes": nread, "write_s": wt, **info})
                    print(f"# {size:g} {args.encoding} {fmt} {policy} run {len(rows_of[policy])}: in run "
                          f"{info['seconds']:.2f} s, whole process {info['wall']:.2f} s, read+write at once "
                          f"{both:.2f} s" + (f"; baseline (--vs, --vs-env) in run {info['vs_seconds']:.2f} s, whole "
                                             f"process {info['vs_wall']:.2f} s" if "vs_seconds" in info else ""),
                          file=sys.stderr, flush=True)
            for policy in policies:
                summarize(args, size, fmt, policy, rows_of[policy], results)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    print(f"# {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{'cold' if args.cold else 'warm'} page cache, medians of {args.runs}")
    print("| size GB (bf16), source encoding | format | policy | backend | convert MB/s of bf16 (in run) | whole process MB/s | read+write at once MB/s | "
          "whole process / that limit | in run / that limit | read MB/s | write MB/s | bytes read/source | "
          "peak RSS MiB | bound MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size_gb']:g} {r['encoding']} | {r['format']} | {r['policy']} | {r['backend']} | {r['convert_gb_s'] * 1e3:.0f} | "
              f"{r['wall_gb_s'] * 1e3:.0f} | {r['concurrent_limit_gb_s'] * 1e3:.0f} | "
              f"{r['wall_over_concurrent_limit']:.2f} | {r['convert_over_concurrent_limit']:.2f} | "
              + " | ".join(f"{r[k] * 1e3:.0f}" if k in r else "-" for k in ("read_gb_s", "write_gb_s"))
              + f" | {r['bytes_read_over_source']:.3f} | "
              f"{r['peak_rss_mib']:.0f} | {r['peak_bound_mib']:.0f} |")
    # warm start: the disk is asked to read ahead while the GPU starts (shardquant/pipeline.py warm_start)
    # the trace's milestones between (shardquant/convert.py): output claimed; the pipeline's end; the card written
    print("\n| size GB | format | policy | python ready s | disk reads from (warm start) s | plan and device ready s | "
          "output claimed s | first pipeline read s | pipeline done s | card written s | finished s | after finish s | "
          "whole process s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        hints = [r[k] for k in ("at_early_warm_start", "at_warm_start") if k in r]  # the first read-ahead asked
        at = [r.get("at_python_ready"), min(hints, default=None)] + [
            r.get(k) for k in ("at_planned", "at_claimed", "at_first_read", "at_pipeline", "at_card_written",
                               "at_finished", "after_finish_s")]
        print(f"| {r['size_gb']:g} {r['encoding']} | {r['format']} | {r['policy']} | "
              + " | ".join("-" if v is None else f"{v:.2f}" for v in at)
              + f" | {r['source_gb'] / r['wall_gb_s']:.2f} |")


if __name__ == "__main__":
    main()
