#!/usr/bin/env python3
# Baseline for tools/bench.py: llm-compressor's model-free PTQ (llmcompressor 0.14.0.1,
# compressed-tensors 0.19.0) on the same synthetic checkpoint, timed in the same device call.
#
# The GPU machine cannot download anything and does not have llmcompressor, so its wheels travel in
# the ignored folder .whl/ (about 4.3 MiB; see the device README's note on carrying wheels). Built
# here with, for each NAME==VERSION below,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl NAME==VERSION
#   llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 datasets==5.2.0 dill==0.4.1
#   multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
#   typing-inspection==0.4.5 typing-extensions==4.16.0
# (auto-round, which llmcompressor lists, is only imported by its AutoRound modifier: not needed.)
#
# Device command (run(..., carry=[".whl"]), repo root; torch, transformers, accelerate, numpy,
# safetensors, pyarrow, pandas, xxhash, psutil, nvidia-ml-py come from the machine's image):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#   export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation -e . || exit;
#   python3 tools/bench.py --device cuda --size 2 --runs 3 --cold --keep --workdir /tmp/sqbench;
#   for s in NVFP4A16 FP8_DYNAMIC; do
#     python3 tools/bench_llmcompressor.py --size 2 --workdir /tmp/sqbench --out /tmp/lcout --scheme $s --device cuda:0 --cold --runs 3;
#   done
#   # gate/up global-scale mismatch, on random-normal weights (bench.py's fast_data saturates every
#   # tensor's amax near 2^-4, so its experts would show no mismatch):
#   python3 -c "from pathlib import Path; from shardquant.testing import qwen3_moe, write_checkpoint; write_checkpoint(Path('/tmp/tiny'), qwen3_moe(hidden=256, experts=16, inter=128))";
#   python3 tools/bench_llmcompressor.py --src /tmp/tiny --out /tmp/tiny-lc --scheme NVFP4A16 --device cuda:0 && python3 tools/bench_llmcompressor.py --check-gate-up /tmp/tiny-lc
"""Time llm-compressor's model-free PTQ (`model_free_ptq`) on a safetensors checkpoint.

Runs `llmcompressor.entrypoints.model_free.model_free_ptq(src, out, scheme=..., ignore=...,
max_workers=..., device=...)` in a child interpreter, so that importing torch and llmcompressor
and creating the CUDA context stay outside the timed region (as `shardquant.convert` times only its
own work). `seconds` is the call plus an fsync of its output files (shardquant fsyncs its shards);
`call_seconds` and `fsync_seconds` are the two parts, `wall` the whole child. One JSON line.

    python tools/bench_llmcompressor.py --src DIR --out DIR --scheme NVFP4A16 --device cuda:0 --cold
    python tools/bench_llmcompressor.py --size 2 --out DIR --scheme FP8_DYNAMIC   # bench.py's checkpoint
    python tools/bench_llmcompressor.py --check-gate-up OUT                       # gate/up global scales

By default it leaves unquantized what shardquant keeps (embedding, lm_head, MoE router; norms are
skipped by llm-compressor itself), so both tools quantize the same Linear weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent)]  # tools/bench.py, and shardquant without an install
from bench import build, drop_cache  # noqa: E402

# Modules left in bf16, as shardquant's rules (shardquant/rules.py) keep them: embeddings, output
# heads, MoE routers. Module names; "re:" patterns go through re.match (anchored at the start only).
DEFAULT_IGNORE = [r"re:(.*\.)?(embed_tokens|word_embeddings|wte|tok_embeddings)$",
                  r"re:(.*\.)?(lm_head|output_layer|shared_head\.head)$",
                  r"re:.*\.(mlp\.gate|block_sparse_moe\.gate|router|mlp\.router|feed_forward\.router)$"]

CHILD = r"""
import json, os, resource, sys, time
src, out, scheme, device, ignore, workers = sys.argv[1:7]
t = time.perf_counter()
import torch
import llmcompressor
from llmcompressor.entrypoints.model_free import model_free_ptq
import_s = time.perf_counter() - t
cuda = device.startswith("cuda")
if cuda:  # context and allocator up before the clock starts
    torch.zeros(1, device=device); torch.cuda.synchronize(device); torch.cuda.reset_peak_memory_stats(device)
t0 = time.perf_counter()
model_free_ptq(src, out, scheme=scheme, ignore=json.loads(ignore), max_workers=int(workers), device=device)
if cuda:
    torch.cuda.synchronize(device)
t1 = time.perf_counter()
for dirpath, _, files in os.walk(out):
    for f in files:
        fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
t2 = time.perf_counter()
print("LLMC_RESULT " + json.dumps({
    "version": llmcompressor.__version__, "torch": torch.__version__, "import_s": import_s,
    "call_seconds": t1 - t0, "fsync_seconds": t2 - t1, "seconds": t2 - t0,
    "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "gpu_peak": torch.cuda.max_memory_allocated(device) if cuda else 0,
    "gpu_name": torch.cuda.get_device_name(device) if cuda else "",
}), flush=True)
"""


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file, from its header (shardquant's source_bytes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def run_once(src: Path, out: Path, scheme: str, device: str, ignore: list[str], workers: int, cold: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        drop_cache(sorted(src.glob("*.safetensors")))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), scheme, device, json.dumps(ignore),
                        str(workers)], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", **os.environ})  # local paths only; the device is offline
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("LLMC_RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"model_free_ptq failed (rc {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    info = json.loads(lines[-1].split(" ", 1)[1])
    info["wall"] = wall
    return info


def check_gate_up(out: Path) -> dict:
    """Per expert: do gate_proj (w1) and up_proj (w3) carry the same NVFP4 weight_global_scale?
    A fused gate/up GEMM needs one scale for both; different ones force a requantization or a loss."""
    from safetensors.numpy import safe_open

    scales: dict[str, float] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                if k.endswith(".weight_global_scale"):
                    scales[k[: -len(".weight_global_scale")]] = float(st.get_tensor(k).reshape(-1)[0])
    pairs = {"expert": [], "other": []}  # other: dense MLPs and shared experts
    for mod, g in scales.items():
        base, _, leaf = mod.rpartition(".")
        partner = {"gate_proj": "up_proj", "w1": "w3"}.get(leaf)
        if partner is None or f"{base}.{partner}" not in scales:
            continue
        kind = "expert" if ".experts." in mod else "other"
        pairs[kind].append((mod, g, scales[f"{base}.{partner}"]))
    if not any(pairs.values()):
        sys.exit(f"{out}: no gate/up weight_global_scale pairs (not an NVFP4 output of model_free_ptq?)")
    res = {"tool": "llmcompressor", "check": "gate_up_global_scale", "out": str(out)}
    for kind, rows in pairs.items():
        differ = [r for r in rows if r[1] != r[2]]
        res[f"{kind}_pairs"] = len(rows)
        res[f"{kind}_differ"] = len(differ)
        res[f"{kind}_fraction_differ"] = len(differ) / len(rows) if rows else None
        res[f"{kind}_max_ratio"] = max((max(g, u) / min(g, u) for _, g, u in rows), default=None)
        if differ:
            res[f"{kind}_example"] = {"module": differ[0][0], "gate": differ[0][1], "up": differ[0][2]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="source checkpoint directory")
    ap.add_argument("--size", type=float, help="instead of --src: bench.py's synthetic checkpoint of SIZE GB "
                    "(built under --workdir if not there)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("SHARDQUANT_BENCH_DIR", "/tmp/shardquant-bench")))
    ap.add_argument("--out", type=Path, help="output directory (deleted and rewritten each run)")
    ap.add_argument("--scheme", choices=["NVFP4A16", "FP8_DYNAMIC"], default="NVFP4A16")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--max-workers", type=int, default=1, help="model_free_ptq's max_workers (its default: 1)")
    ap.add_argument("--ignore", action="append", metavar="NAME",
                    help="module name or re: pattern to leave unquantized (repeatable; replaces the default, "
                    "which keeps what shardquant keeps)")
    ap.add_argument("--runs", type=int, default=1, help="report the median of this many runs")
    ap.add_argument("--cold", action="store_true", help="evict the source shards from the page cache before each run")
    ap.add_argument("--check-gate-up", type=Path, metavar="OUT",
                    help="only report how many experts' gate_proj/up_proj global scales differ in OUT")
    args = ap.parse_args()

    if args.check_gate_up:
        print(json.dumps(check_gate_up(args.check_gate_up)))
        return
    if (args.src is None) == (args.size is None) or args.out is None:
        ap.error("give --out and one of --src, --size (or --check-gate-up OUT)")
    src = args.src if args.src is not None else build(args.workdir, args.size)
    src, out = src.resolve(), args.out.resolve()
    if out == src or out in src.parents or src in out.parents:
        ap.error("--out must lie outside the source (it is deleted before each run, and model_free_ptq "
                 "copies every file under the source)")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        sys.exit(f"{src}: no *.safetensors files")
    source_bytes = sum(tensor_bytes(p) for p in shards)
    ignore = args.ignore if args.ignore is not None else DEFAULT_IGNORE
    rows = [run_once(src, out, args.scheme, args.device, ignore, args.max_workers, args.cold) for _ in range(args.runs)]
    med = {k: statistics.median(r[k] for r in rows) for k in ("seconds", "call_seconds", "fsync_seconds", "wall", "rss", "gpu_peak")}
    output_bytes = sum(tensor_bytes(p) for p in out.glob("*.safetensors"))
    print(json.dumps({
        "tool": "llmcompressor", "version": rows[0]["version"], "scheme": args.scheme, "device": args.device,
        "gpu": rows[0]["gpu_name"], "torch": rows[0]["torch"], "max_workers": args.max_workers,
        "cold": args.cold, "runs": args.runs, "src": str(src),
        "seconds": med["seconds"], "call_seconds": med["call_seconds"], "fsync_seconds": med["fsync_seconds"],
        "wall": med["wall"], "import_s": rows[0]["import_s"], "runs_seconds": [r["seconds"] for r in rows],
        "source_bytes": source_bytes, "output_bytes": output_bytes,
        "input_gb_s": source_bytes / med["seconds"] / 1e9,
        "wall_gb_s": source_bytes / med["wall"] / 1e9,
        "peak_rss_mib": med["rss"] / 2**20, "gpu_peak_mib": med["gpu_peak"] / 2**20,
    }))


if __name__ == "__main__":
    main()
