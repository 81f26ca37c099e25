#!/usr/bin/env python3
"""Rebuild the third-party checkpoints shardquant is tested against: tiny random-weight models quantized
by the reference producers engines are tested with. `shardquant verify` reads two of them
(tests/test_verify.py); tests/test_structure.py compares shardquant's output with every one (config
keys and values, tensor names, dtypes and shapes).

Sources (shardquant.testing builders, seed 3, the same ones tests/test_structure.py rebuilds):
  llama            testing.llama(hidden=64, layers=2)                       dense, inter 128
  qwen3-moe        testing.qwen3_moe(hidden=64, layers=2, experts=4)        MoE, expert inter 32
  llama-tiled      testing.llama(hidden=128, layers=2, inter=128, heads=1, kv_heads=1)   (= testing.TILED)
  qwen3-moe-tiled  testing.qwen3_moe(hidden=128, layers=2, experts=4, inter=128, heads=2, kv_heads=1,
                   head_dim=128)   every quantized weight whole 128x128 tiles, for FP8_BLOCK
The ignore list given to llm-compressor is shardquant's default exclusions as patterns: embeddings,
the output head, MoE routers ("re:" patterns are re.match'ed, anchored at the start only).

Producers and versions (recorded 2026-12):
- llm-compressor 0.14.0.1 with compressed-tensors 0.19.0 (the version it pins), torch 2.13.0+cpu,
  transformers 5.17.0: the model-free PTQ entry point
  `llmcompressor.entrypoints.model_free.model_free_ptq(src, out, scheme=..., ignore=..., device="cpu")`,
  which reads the safetensors directly (no transformers model, no calibration data), one preset
  scheme per fixture -> tests/data/llmc-<model>-<scheme>:
      FP8_DYNAMIC  llama 154 KB, qwen3-moe 165 KB      (fp8-channel and fp8, compressed-tensors)
      NVFP4A16     llama 123 KB, qwen3-moe 137 KB      (nvfp4, compressed-tensors)
      MXFP4A16     llama 117 KB, qwen3-moe 128 KB      (mxfp4, compressed-tensors)
      MXFP8        llama 154 KB, qwen3-moe 164 KB      (mxfp8, compressed-tensors)
      FP8_BLOCK    llama-tiled, qwen3-moe-tiled: structure only, 11 and 19 KB (the weights: 370 and 740 KB)
      MXFP4, MXFP8A16  llama, qwen3-moe: structure only (their tensors are MXFP4A16's and MXFP8's byte
                   for byte: the A16/A4-A8 difference is the activations, quantized at run time)
  Rerun with compressed-tensors 0.20.0 (the version docs/formats.md reads; `pip install --no-deps`), every
  fixture has the same tensors (names, dtypes, shapes) and the same config but for what 0.20 leaves out
  (null QuantizationArgs fields) or adds (`moe_sparsity_config: null`); tests/test_structure.py treats
  both as equal. llm-compressor's other entry point, `oneshot` on a transformers model, was not needed.
  A rerun reproduces every committed fixture byte for byte (checked 2026-12, both tools).
  qwen3-moe NVFP4A16 (tests/data/llmc-qwen3-moe-nvfp4a16, 4 shards) is the fixture tests/test_verify.py
  reads: llm-compressor gives each expert's gate_proj and up_proj their own weight_global_scale, which
  engines that fuse gate/up into one GEMM cannot honour; the verify tests expect those mismatches.
  Needs llm-compressor (not a shardquant dependency): make a venv and run with its interpreter,
      python3.11 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
      /tmp/lcvenv/bin/python tools/make_llmc_fixture.py --tool llmc [--fixture NAME ...]
- ModelOpt (nvidia-modelopt 0.47.0, torch 2.13.0+cpu, transformers 5.24.0) on the CPU:
  `mtq.quantize(model, W4A16_NVFP4_CFG)` of a transformers LlamaForCausalLM / Qwen3MoeForCausalLM built
  from the same config (bf16, random init, 4 calibration batches; weight-only, so the amax comes from
  the weights) and `export_hf_checkpoint` -> tests/data/modelopt-<model>-w4a16-nvfp4 (one file +
  config.json + hf_quant_config.json; llama 119 KB, qwen3-moe 127 KB). Run with the interpreter that has
  modelopt and transformers (the test extras):
      python tools/make_llmc_fixture.py --tool modelopt

A fixture is the producer's shards, index and config files; a "structure only" fixture is one
structure.json instead: {"config.json": ..., "headers": {shard file: its safetensors header JSON}} (the
tensor names, dtypes and shapes, which is all tests/test_structure.py reads). shardquant is imported from
this checkout (no install needed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # shardquant from this checkout

from shardquant import testing  # noqa: E402

DATA = ROOT / "tests" / "data"
SEED = 3
# model key -> (shardquant.testing builder, its arguments, shard size of the source checkpoint)
MODELS = {
    "llama": ("llama", {"hidden": 64, "layers": 2}, 60_000),
    "qwen3-moe": ("qwen3_moe", {"hidden": 64, "layers": 2, "experts": 4}, 60_000),
    "llama-tiled": ("llama", {"hidden": 128, "layers": 2, "inter": 128, "heads": 1, "kv_heads": 1}, 200_000),
    "qwen3-moe-tiled": ("qwen3_moe", {"hidden": 128, "layers": 2, "experts": 4, "inter": 128, "heads": 2,
                                      "kv_heads": 1, "head_dim": 128}, 200_000),
}
# fixture folder -> (tool, model key, recipe, structure only); tests/test_structure.py reads this table.
FIXTURES = {
    "llmc-llama-fp8-dynamic": ("llmc", "llama", "FP8_DYNAMIC", False),
    "llmc-qwen3-moe-fp8-dynamic": ("llmc", "qwen3-moe", "FP8_DYNAMIC", False),
    "llmc-llama-fp8-block": ("llmc", "llama-tiled", "FP8_BLOCK", True),
    "llmc-qwen3-moe-fp8-block": ("llmc", "qwen3-moe-tiled", "FP8_BLOCK", True),
    "llmc-llama-nvfp4a16": ("llmc", "llama", "NVFP4A16", False),
    "llmc-qwen3-moe-nvfp4a16": ("llmc", "qwen3-moe", "NVFP4A16", False),
    "llmc-llama-mxfp4a16": ("llmc", "llama", "MXFP4A16", False),
    "llmc-qwen3-moe-mxfp4a16": ("llmc", "qwen3-moe", "MXFP4A16", False),
    "llmc-llama-mxfp4": ("llmc", "llama", "MXFP4", True),
    "llmc-qwen3-moe-mxfp4": ("llmc", "qwen3-moe", "MXFP4", True),
    "llmc-llama-mxfp8": ("llmc", "llama", "MXFP8", False),
    "llmc-qwen3-moe-mxfp8": ("llmc", "qwen3-moe", "MXFP8", False),
    "llmc-llama-mxfp8a16": ("llmc", "llama", "MXFP8A16", True),
    "llmc-qwen3-moe-mxfp8a16": ("llmc", "qwen3-moe", "MXFP8A16", True),
    "modelopt-llama-w4a16-nvfp4": ("modelopt", "llama", "W4A16_NVFP4", False),
    "modelopt-qwen3-moe-w4a16-nvfp4": ("modelopt", "qwen3-moe", "W4A16_NVFP4", False),
}
# Left in bf16, as shardquant's rules keep them: embeddings, the output head, MoE routers.
# (llm-compressor matches "re:" patterns with re.match, anchored at the start only.)
IGNORE = ["re:.*embed_tokens$", "lm_head", r"re:.*mlp\.gate$"]
KEEP = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


def model(key: str) -> testing.Model:
    builder, kwargs, _ = MODELS[key]
    return getattr(testing, builder)(**kwargs)


def source(key: str, root: Path, seed: int) -> Path:
    return testing.write_checkpoint(root, model(key), shard_bytes=MODELS[key][2], seed=seed)


def header(path: Path) -> dict:
    """A safetensors file's header JSON (8-byte little-endian length, then the JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _keep(produced: Path, out: Path, structure_only: bool = False) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if structure_only:
        doc = {name: json.loads((produced / name).read_text()) for name in KEEP[:2] if (produced / name).exists()}
        doc["headers"] = {p.name: header(p) for p in sorted(produced.glob("*.safetensors"))}
        (out / "structure.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        return
    for p in sorted(produced.iterdir()):
        if p.name in KEEP or p.suffix == ".safetensors":
            shutil.copyfile(p, out / p.name)


def build_llmc(out: Path, model_key: str, scheme: str, structure_only: bool, seed: int = SEED) -> Path:
    """llm-compressor's model-free PTQ of the source with one preset scheme."""
    from llmcompressor.entrypoints.model_free import model_free_ptq

    with tempfile.TemporaryDirectory() as tmp:
        src = source(model_key, Path(tmp) / "src", seed)
        lc = Path(tmp) / "lc"
        model_free_ptq(str(src), str(lc), scheme=scheme, ignore=IGNORE, device="cpu")
        _keep(lc, out, structure_only)
    return out


def build_modelopt(out: Path, model_key: str, recipe: str, structure_only: bool, seed: int = SEED) -> Path:
    """ModelOpt's W4A16_NVFP4 of a transformers model built from the source's config, exported."""
    import copy
    import warnings

    import torch
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(seed)
    c = model(model_key).config
    arch = c["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = config_cls(**{k: v for k, v in c.items() if k not in ("torch_dtype", "model_type")})
    cfg.architectures = [arch]  # export_hf_checkpoint reads it
    net = getattr(transformers, arch)(cfg).to(torch.bfloat16).eval()

    def calibrate(m) -> None:  # weight-only: the amax comes from the weights, any input will do
        with torch.no_grad():
            for _ in range(4):
                m(torch.randint(0, cfg.vocab_size, (2, 16)))

    mtq.quantize(net, copy.deepcopy(getattr(mtq, f"{recipe}_CFG")), forward_loop=calibrate)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf_checkpoint(net, export_dir=tmp)
        _keep(Path(tmp), out, structure_only)
    return out


BUILD = {"llmc": build_llmc, "modelopt": build_modelopt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", choices=sorted(BUILD), default="llmc", help="build every fixture of this tool")
    ap.add_argument("--fixture", choices=sorted(FIXTURES), action="append", default=None,
                    help="build only these (repeatable; each with its own tool)")
    ap.add_argument("--out", type=Path, default=DATA, help="parent folder of the fixtures (default tests/data)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    names = args.fixture or [n for n, (tool, *_) in FIXTURES.items() if tool == args.tool]
    report = {}
    for name in names:
        tool, model_key, recipe, structure_only = FIXTURES[name]
        out = BUILD[tool](args.out / name, model_key, recipe, structure_only, args.seed)
        files = sorted(out.iterdir())
        report[name] = {"files": {p.name: p.stat().st_size for p in files},
                        "total_bytes": sum(p.stat().st_size for p in files)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
