"""Build the shipped example checkpoint `examples/tiny-moe` (a scaled-down Qwen3-MoE in its real
layout, bf16, experts straddling shard boundaries). Deterministic: the same bytes every run.

    python tools/make_example.py [--out examples/tiny-moe]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from shardquant.testing import qwen3_moe, write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"))
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model = qwen3_moe(hidden=128, layers=2, experts=8, inter=64, vocab=512, heads=4, kv_heads=2, head_dim=32)
    readme = "# tiny-moe\n\nA scaled-down Qwen3-MoE checkpoint with random weights, made by tools/make_example.py.\n"
    write_checkpoint(out, model, shard_bytes=400_000, seed=1234, extra_files={"README.md": readme})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
