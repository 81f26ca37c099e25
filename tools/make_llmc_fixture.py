#!/usr/bin/env python3
"""Rebuild tests/data/llmc-qwen3-moe-nvfp4a16: a tiny random-weight Qwen3-MoE (hidden 64, 2 layers,
4 experts) quantized by llm-compressor's model-free PTQ (NVFP4A16), kept as test data for
`shardquant verify` on a checkpoint that shardquant did not write.

llm-compressor 0.14 gives each expert's gate_proj and up_proj their own weight_global_scale, which
engines that fuse gate/up into one GEMM cannot honour; the verify tests expect those mismatches.

Needs llm-compressor 0.14.0.1 (not a shardquant dependency); run it with the interpreter that has it:

    /tmp/lcvenv/bin/python tools/make_llmc_fixture.py [--out tests/data/llmc-qwen3-moe-nvfp4a16]

shardquant is imported from this checkout (no install needed). Only the shards, the index and
config.json are kept (about 90 KB).
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

OUT = ROOT / "tests" / "data" / "llmc-qwen3-moe-nvfp4a16"
# Left in bf16, as shardquant's rules keep them: embeddings, the output head, MoE routers.
# (llm-compressor matches "re:" patterns with re.match, anchored at the start only.)
IGNORE = ["re:.*embed_tokens$", "lm_head", r"re:.*mlp\.gate$"]
KEEP = ("config.json", "model.safetensors.index.json")


def build(out: Path, seed: int = 3) -> Path:
    from llmcompressor.entrypoints.model_free import model_free_ptq

    with tempfile.TemporaryDirectory() as tmp:
        src = testing.write_checkpoint(Path(tmp) / "src", testing.qwen3_moe(hidden=64, layers=2, experts=4),
                                       shard_bytes=60_000, seed=seed)
        lc = Path(tmp) / "lc"
        model_free_ptq(str(src), str(lc), scheme="NVFP4A16", ignore=IGNORE, device="cpu")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for p in sorted(lc.iterdir()):
            if p.name in KEEP or p.suffix == ".safetensors":
                shutil.copyfile(p, out / p.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    out = build(args.out, args.seed)
    files = sorted(out.iterdir())
    print(json.dumps({"out": str(out), "files": {p.name: p.stat().st_size for p in files},
                      "total_bytes": sum(p.stat().st_size for p in files)}, indent=2))


if __name__ == "__main__":
    main()
