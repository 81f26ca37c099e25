"""scale_manifest.json: what was grouped, why, and the scales each quantizer got.

Sorted keys, no timestamps, floats written as the shortest repr of their exact fp32 value: the same
command gives the same bytes every time.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__, formats
from .plan import Plan

SCHEMA_VERSION = 2
MANIFEST_NAME = "scale_manifest.json"


def build(plan: Plan, scales: dict[str, tuple[float, float]], backend: str,
          files: dict[str, dict], source_files: dict[str, dict], recipe: str | None = None) -> dict:
    """scales: quantizer key -> (amax, global scale); files: every other output file's
    {"sha256", "size"}; source_files: every source file's {"sha256", "size", "checked_against_hub"}."""
    ck = plan.checkpoint
    quantizers = {}
    tensors = {}
    for g in plan.groups:
        amax, gs = scales[g.key][:2]
        scaled = formats.declared(g.format).quantizer_scale  # block scales only: no per-quantizer scale
        quantizers[g.key] = {
            "amax": float(amax),
            "format": g.format,
            "global_scale": float(gs) if scaled else None,
            "members": [m.name for m in g.members],
            "rule": g.rule,
            "two_pass": g.two_pass,
        }
        if g.cast is not None:  # codes kept from the source (shardquant/pipeline.py cast_group)
            requantized = scales[g.key][2] if len(scales[g.key]) > 2 else 0
            quantizers[g.key]["cast"] = {"from": g.cast, "requantized_blocks": int(requantized)}
        for m in g.members:
            names = plan.outputs[m.name]
            tensors[m.name] = {
                "global_scale": names.get("global_scale", names["scale"]) if scaled else None,
                "quantizer": g.key,
                "scale": names["scale"],
                "weight": names["weight"],
            }
    return {
        "backend": backend,
        "excluded": plan.excluded,
        "expert_policy": plan.expert_policy,
        "flavor": plan.flavor,
        "format": plan.format,
        "quantizers": quantizers,
        "scale_rule": next((r for f in plan.formats if (r := formats.declared(f).scale_rule)), None),
        **({"scale_search": plan.scale_search} if plan.scale_search != "none" else {}),
        "schema_version": SCHEMA_VERSION,
        "source": {
            "path": None if ck.repo else str(ck.root),
            "repo": ck.repo,
            "revision": ck.revision,
            "files": _files(source_files),
        },
        "files": _files(files),
        "tensors": tensors,
        "tool": {"name": "shardquant", "version": __version__, **({"recipe": recipe} if recipe else {})},
    }


def _files(files: dict[str, dict]) -> dict[str, dict]:
    return {k: dict(v) for k, v in sorted(files.items())}


def with_files(doc: dict, files: dict[str, dict]) -> dict:
    """build()'s document with another files table (the card is made from it without one, the
    manifest with one: shardquant/convert.py _finish builds it once)."""
    return {**doc, "files": _files(files)}


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def load(path: Path) -> dict:
    from .source import _read_json

    return _read_json(path)
