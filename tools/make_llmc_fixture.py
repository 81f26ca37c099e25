#!/usr/bin/env python3
"""Rebuild the third-party checkpoints `shardquant verify` is tested on: a tiny random-weight
Qwen3-MoE (hidden 64, 2 layers, 4 experts) quantized to weight-only NVFP4 by another tool.

- llmc (default): llm-compressor 0.14.0.1's model-free PTQ, scheme NVFP4A16, compressed-tensors
  flavor -> tests/data/llmc-qwen3-moe-nvfp4a16 (4 shards + index + config.json, about 130 KB).
  llm-compressor gives each expert's gate_proj and up_proj their own weight_global_scale, which
  engines that fuse gate/up into one GEMM cannot honour; the verify tests expect those mismatches.
  Needs llm-compressor (not a shardquant dependency): run with the interpreter that has it,
      /tmp/lcvenv/bin/python tools/make_llmc_fixture.py
- modelopt: nvidia-modelopt 0.47 on the CPU, `mtq.quantize(model, W4A16_NVFP4_CFG)` of a
  transformers Qwen3MoeForCausalLM (bf16, random init, 4 calibration batches) and
  `export_hf_checkpoint` -> tests/data/modelopt-qwen3-moe-w4a16-nvfp4 (one file + configs, about
  125 KB). Run with the interpreter that has modelopt and transformers (the test extras):
      python tools/make_llmc_fixture.py --tool modelopt

shardquant is imported from this checkout (no install needed). Only the shards, the index and the
config files are kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # shardquant from this checkout

from shardquant import testing  # noqa: E402

OUT = {"llmc": ROOT / "tests" / "data" / "llmc-qwen3-moe-nvfp4a16",
       "modelopt": ROOT / "tests" / "data" / "modelopt-qwen3-moe-w4a16-nvfp4"}
# Left in bf16, as shardquant's rules keep them: embeddings, the output head, MoE routers.
# (llm-compressor matches "re:" patterns with re.match, anchored at the start only.)
IGNORE = ["re:.*embed_tokens$", "lm_head", r"re:.*mlp\.gate$"]
KEEP = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


def _keep(produced: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in sorted(produced.iterdir()):
        if p.name in KEEP or p.suffix == ".safetensors":
            shutil.copyfile(p, out / p.name)


def build_llmc(out: Path, seed: int = 3) -> Path:
    from llmcompressor.entrypoints.model_free import model_free_ptq

    with tempfile.TemporaryDirectory() as tmp:
        src = testing.write_checkpoint(Path(tmp) / "src", testing.qwen3_moe(hidden=64, layers=2, experts=4),
                                       shard_bytes=60_000, seed=seed)
        lc = Path(tmp) / "lc"
        model_free_ptq(str(src), str(lc), scheme="NVFP4A16", ignore=IGNORE, device="cpu")
        _keep(lc, out)
    return out


def build_modelopt(out: Path, seed: int = 3) -> Path:
    import copy
    import warnings

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(seed)
    c = testing.qwen3_moe(hidden=64, layers=2, experts=4).config
    cfg = Qwen3MoeConfig(**{k: v for k, v in c.items() if k not in ("torch_dtype", "model_type")})
    cfg.architectures = ["Qwen3MoeForCausalLM"]  # export_hf_checkpoint reads it
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()

    def calibrate(m) -> None:  # weight-only: the amax comes from the weights, any input will do
        with torch.no_grad():
            for _ in range(4):
                m(torch.randint(0, cfg.vocab_size, (2, 16)))

    mtq.quantize(model, copy.deepcopy(mtq.W4A16_NVFP4_CFG), forward_loop=calibrate)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf_checkpoint(model, export_dir=tmp)
        _keep(Path(tmp), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", choices=sorted(OUT), default="llmc")
    ap.add_argument("--out", type=Path, default=None, help="default: tests/data/<the tool's folder>")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    build = build_llmc if args.tool == "llmc" else build_modelopt
    out = build(args.out or OUT[args.tool], args.seed)
    files = sorted(out.iterdir())
    print(json.dumps({"out": str(out), "files": {p.name: p.stat().st_size for p in files},
                      "total_bytes": sum(p.stat().st_size for p in files)}, indent=2))


if __name__ == "__main__":
    main()
