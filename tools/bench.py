"""Throughput and peak memory of `shardquant convert` on a synthetic Qwen3-MoE-shaped checkpoint.

Builds (once, cached under --workdir) a bf16 checkpoint with Qwen3-30B-A3B's tensor shapes
(hidden 2048, 128 experts of 768, q 4096 / kv 512) and enough layers for --size GB, then in one run:
  * reads the same shard files end to end (the read baseline, page cache as it stands),
  * converts them with `shardquant convert` in a child process, per format, --runs times,
and prints medians: input MB/s, the ratio to the read rate, and the child's peak RSS.

    python tools/bench.py --size 2 --formats nvfp4,fp8 --runs 3
    python tools/bench.py --size 1 --size 2          # peak RSS at two model sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shardquant.testing import Model, Spec, fast_data, write_checkpoint

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
    vocab = VOCAB // 16
    s: list[Spec] = [("model.embed_tokens.weight", "BF16", (vocab, HIDDEN))]
    for L in range(layers):
        p = f"model.layers.{L}"
        s += [(f"{p}.input_layernorm.weight", "BF16", (HIDDEN,)),
              (f"{p}.self_attn.q_proj.weight", "BF16", (HEADS * HD, HIDDEN)),
              (f"{p}.self_attn.k_proj.weight", "BF16", (KV * HD, HIDDEN)),
              (f"{p}.self_attn.v_proj.weight", "BF16", (KV * HD, HIDDEN)),
              (f"{p}.self_attn.o_proj.weight", "BF16", (HIDDEN, HEADS * HD)),
              (f"{p}.self_attn.q_norm.weight", "BF16", (HD,)),
              (f"{p}.self_attn.k_norm.weight", "BF16", (HD,)),
              (f"{p}.post_attention_layernorm.weight", "BF16", (HIDDEN,)),
              (f"{p}.mlp.gate.weight", "BF16", (experts, HIDDEN))]
        for E in range(experts):
            e = f"{p}.mlp.experts.{E}"
            s += [(f"{e}.gate_proj.weight", "BF16", (INTER, HIDDEN)),
                  (f"{e}.up_proj.weight", "BF16", (INTER, HIDDEN)),
                  (f"{e}.down_proj.weight", "BF16", (HIDDEN, INTER))]
    s += [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (vocab, HIDDEN))]
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
           "num_hidden_layers": layers, "num_experts": experts, "moe_intermediate_size": INTER,
           "vocab_size": vocab, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD}
    return Model(s, cfg)


def build(workdir: Path, size_gb: float) -> Path:
    src = workdir / f"qwen3-moe-{size_gb:g}gb"
    if (src / "model.safetensors.index.json").exists():
        return src
    t0 = time.perf_counter()
    write_checkpoint(src, qwen3_30b_shaped(size_gb), shard_bytes=4 * 10**9 if size_gb > 8 else 10**9,
                     data=fast_data)
    print(f"# built {src} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return src


def read_all(src: Path) -> tuple[float, int]:
    """Seconds to read every shard once, 16 MiB at a time, and the bytes read."""
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(mv):
                n += k
    return time.perf_counter() - t0, n


def convert_once(src: Path, out: Path, fmt: str, device: str, extra: list[str]) -> tuple[float, int, dict]:
    """Run one conversion in a child process: (seconds, peak RSS bytes, its result line)."""
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import json,sys,time;from shardquant.convert import convert;"
        "r=convert(sys.argv[1],sys.argv[2],sys.argv[3],device=sys.argv[4]);"
        "print(json.dumps({'seconds':r.seconds,'bytes_read':r.bytes_read,'source_bytes':r.plan.source_bytes,"
        "'output_bytes':r.plan.output_bytes,'peak_estimate':r.plan.peak_bytes,'backend':r.backend}))"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out), fmt, device, *extra],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"conversion failed:\n{p.stderr}")
    # ru_maxrss of children is the max over all waited-for children: run one per measurement.
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    info = json.loads(p.stdout.strip().splitlines()[-1])
    info["wall"] = wall
    return wall, rss if rss > before * 1024 else rss, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, action="append", help="checkpoint size in GB (repeatable)")
    ap.add_argument("--formats", default="nvfp4,fp8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=os.environ.get("SHARDQUANT_BENCH_DIR", "/tmp/shardquant-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoints for the next run")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.size or [2.0]:
        src = build(work, size)
        for fmt in args.formats.split(","):
            rows = []
            for _ in range(args.runs):
                rt, nread = read_all(src)
                # each child is measured alone: a fresh interpreter for the RSS figure
                wall, _, info = convert_once(src, work / "out", fmt, args.device, [])
                rss = _child_rss(src, work / "out", fmt, args.device) if not rows else rows[0]["rss"]
                rows.append({"read_s": rt, "read_bytes": nread, "conv_s": info["seconds"], "wall_s": wall,
                             "rss": rss, **info})
            src_b = rows[0]["source_bytes"]
            med_conv = statistics.median(r["conv_s"] for r in rows)
            med_wall = statistics.median(r["wall_s"] for r in rows)
            med_read = statistics.median(r["read_s"] for r in rows)
            res = {
                "size_gb": size, "format": fmt, "device": args.device, "runs": args.runs,
                "source_mb": src_b / 1e6,
                "convert_mb_s": src_b / med_conv / 1e6,
                "wall_mb_s": src_b / med_wall / 1e6,
                "read_mb_s": rows[0]["read_bytes"] / med_read / 1e6,
                "convert_over_read": (src_b / med_conv) / (rows[0]["read_bytes"] / med_read),
                "peak_rss_mib": rows[0]["rss"] / 2**20,
                "peak_estimate_mib": rows[0]["peak_estimate"] / 2**20,
                "bytes_read_over_source": rows[0]["bytes_read"] / src_b,
                "backend": rows[0]["backend"],
            }
            results.append(res)
            print(json.dumps(res), flush=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    print(f"# {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}", file=sys.stderr)
    print("| size GB | format | device | input MB/s (median) | wall MB/s | read MB/s | ratio | peak RSS MiB | plan bound MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size_gb']:g} | {r['format']} | {r['device']} | {r['convert_mb_s']:.0f} | {r['wall_mb_s']:.0f} | "
              f"{r['read_mb_s']:.0f} | {r['convert_over_read']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_estimate_mib']:.0f} |")


def _child_rss(src: Path, out: Path, fmt: str, device: str) -> int:
    """Peak RSS of one conversion, measured in a grandchild so that no earlier child counts."""
    code = (
        "import resource,subprocess,sys;"
        "subprocess.run([sys.executable,'-c','from shardquant.convert import convert;import sys;"
        "convert(sys.argv[1],sys.argv[2],sys.argv[3],device=sys.argv[4],force=True)',*sys.argv[1:]],check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024)"
    )
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([sys.executable, "-c", code, str(src), str(out), fmt, device],
                       capture_output=True, text=True, check=True)
    return int(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
