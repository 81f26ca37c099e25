"""`shardquant verify`: our outputs pass; hand-broken copies of them fail, each naming the module and
the rule; one flipped bit in any file, a file missing, resized, replaced by a symlink or a directory,
or a file the manifest does not list fails, naming the file; --source measures SQNR in the band the
formats allow and finds a corrupted tensor; the checkpoints of llm-compressor (gate/up scales that
differ per expert) and ModelOpt are judged right."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import struct
import sys
import zlib
from collections import defaultdict
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from shardquant import formats, manifest, testing
from shardquant.cli import main
from shardquant.convert import convert
from shardquant.flavors import FLAVORS
from shardquant.rules import EXPERT_POLICIES
from shardquant.st import read_header
from shardquant.report import heatmap_layout, write_heatmap, write_png
from shardquant import verify as verify_mod
from shardquant.verify import excluded, load_schema, verify, verify_contract

DATA = Path(__file__).parent / "data"
LLMC = DATA / "llmc-qwen3-moe-nvfp4a16"  # tools/make_llmc_fixture.py
MODELOPT = DATA / "modelopt-qwen3-moe-w4a16-nvfp4"  # tools/make_llmc_fixture.py --tool modelopt
INDEX = "model.safetensors.index.json"
MODELS = {  # small shards, so that fused sets straddle shard boundaries
    "qwen3_moe": (testing.qwen3_moe, 20_000),
    "deepseek_v3": (testing.deepseek_v3, 14_000),
    "mixtral": (lambda: testing.mixtral(inter=64), 24_000),
    "te_grouped": (testing.te_grouped, 20_000),
    "llama": (testing.llama, 20_000),  # dense
}
CT = "compressed-tensors"
GLOBAL = {"modelopt": "weight_scale_2", CT: "weight_global_scale"}
O_PROJ = "model.layers.0.self_attn.o_proj"


def _tool():
    """tools/fuzz_verify.py (not a package): its `seal` recomputes a manifest's files table."""
    name = "fuzz_verify"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "tools" / "fuzz_verify.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


seal = _tool().seal


# ---------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    out = {name: testing.write_checkpoint(root / name, make(), shard_bytes=sb, seed=11)
           for name, (make, sb) in MODELS.items()}
    # formats with 2-D tiles (formats/base.py Format.block) get the same layouts in whole tiles
    out.update({f"{name}@tiled": testing.write_checkpoint(root / f"{name}-tiled", make(), shard_bytes=sb, seed=11)
                for name, make in testing.TILED.items() for sb in [MODELS[name][1]]})
    return out


def src_of(sources, model: str, fmt: str) -> Path:
    """The source a test of `fmt` converts: the tiled layout when the format has 2-D block scales."""
    return sources[f"{model}@tiled" if formats.declared(fmt).block else model]


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """(model, fmt, flavor, policy) -> output directory, converted once; never edit it in place."""
    root = tmp_path_factory.mktemp("out")
    cache: dict[tuple, Path] = {}

    def get(model: str, fmt: str, flavor: str | None = None, policy: str = "shared") -> Path:
        key = (model, fmt, flavor, policy)
        if key not in cache:
            out = root / "-".join(str(k) for k in key)
            convert(str(src_of(sources, model, fmt)), out, fmt, flavor=flavor, expert_policy=policy, device="cpu",
                    max_shard_size=30_000)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture
def broken(converted, tmp_path):
    """A fresh copy of a converted output, to break by hand."""

    def get(*key) -> Path:
        dst = tmp_path / "broken"
        shutil.copytree(converted(*key), dst)
        return dst

    return get


def rewrite(d: Path, changes: dict[str, torch.Tensor | None], near: str | None = None) -> None:
    """Replace (tensor), delete (None) or add (into the shard holding `near`) tensors, saving the
    shards with safetensors and keeping the index true (weight_map and total_size) and the
    manifest's files table too: these tests break the contract, not the files."""
    index = json.loads((d / INDEX).read_text())
    wm = index["weight_map"]
    by_file: dict[str, dict] = defaultdict(dict)
    for name, t in changes.items():
        by_file[wm.get(name) or wm[near]][name] = t
    for fname, ch in by_file.items():
        tensors = load_file(d / fname)
        for name, t in ch.items():
            if t is None:
                del tensors[name], wm[name]
            else:
                tensors[name], wm[name] = t, fname
        save_file(tensors, d / fname, metadata={"format": "pt"})
    index["metadata"]["total_size"] = sum(t.nbytes for f in set(wm.values()) for t in read_header(d / f).values())
    (d / INDEX).write_text(json.dumps(index, indent=2))
    seal(d)


def tensor(d: Path, name: str) -> torch.Tensor:
    wm = json.loads((d / INDEX).read_text())["weight_map"]
    return load_file(d / wm[name])[name]


def edit_json(path: Path, fn) -> None:
    """Edit a JSON file of an output, its manifest's files table kept true (see rewrite)."""
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=2))
    seal(path.parent)


def rules_of(violations) -> set[str]:
    return {v.rule for v in violations}


def names_of(violations, rule: str) -> list[str]:
    return [v.name for v in violations if v.rule == rule]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# our outputs pass

@pytest.mark.parametrize("fmt,flavor", testing.served())
@pytest.mark.parametrize("model", list(MODELS))
def test_our_outputs_pass(converted, model, fmt, flavor):
    out = converted(model, fmt, flavor)
    assert len(json.loads((out / INDEX).read_text())["weight_map"]) > 0
    assert len({p.name for p in out.glob("*.safetensors")}) > 1, "fixture should span several shards"
    assert verify_contract(out) == []
    rep = verify(out)
    man = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert (rep.flavor, rep.format, rep.modules) == (flavor, fmt, len(man["tensors"]))
    assert rep.producer.startswith("shardquant")
    # every file but the manifest is listed, and verify checked each
    assert set(man["files"]) == {p.name for p in out.iterdir()} - {manifest.MANIFEST_NAME}
    assert (rep.files_checked, rep.hashed, rep.warnings) == (len(man["files"]), True, [])
    r = cli("verify", out)
    assert r.exit_code == 0, r.output
    assert "OK: no violations" in r.output
    assert f"{len(man['files'])} files checked against the manifest (size and SHA-256)" in r.output


@pytest.mark.parametrize("flavor", ["modelopt", CT])
def test_per_expert_outputs_pass(converted, flavor):
    assert verify_contract(converted("qwen3_moe", "nvfp4", flavor, "per-expert")) == []


def test_not_a_quantized_checkpoint(sources):
    vs = verify_contract(sources["qwen3_moe"])
    assert rules_of(vs) == {"config"}
    assert cli("verify", sources["qwen3_moe"]).exit_code == 1


# ---------------------------------------------------------------------------------------------
# the manifest schema

@pytest.mark.parametrize("policy", EXPERT_POLICIES)
@pytest.mark.parametrize("fmt,flavor", testing.served())
def test_manifests_validate(converted, fmt, flavor, policy):
    man = json.loads((converted("deepseek_v3", fmt, flavor, policy) / manifest.MANIFEST_NAME).read_text())
    jsonschema.validate(man, load_schema(), cls=jsonschema.Draft202012Validator)


def test_schema_is_draft_2020_12_package_data_and_matches_the_registries():
    stored = json.loads((resources.files("shardquant") / "manifest.schema.json").read_text())
    schema = load_schema()
    assert "enum" not in stored["$defs"]["format"]  # filled from the registry, never kept by hand
    stored["$defs"]["format"]["enum"] = sorted(formats.FORMATS)
    assert schema == stored
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert props["schema_version"]["const"] == manifest.SCHEMA_VERSION
    assert props["format"] == {"$ref": "#/$defs/format"}
    assert schema["$defs"]["quantizer"]["properties"]["format"]["$ref"] == "#/$defs/format"
    assert schema["$defs"]["format"]["enum"] == sorted(formats.FORMATS)
    assert props["flavor"]["enum"] == sorted(FLAVORS)
    assert props["expert_policy"]["enum"] == sorted(EXPERT_POLICIES)


BREAK_MANIFEST = {
    "no tool": lambda m: m.pop("tool"),
    "schema_version 1": lambda m: m.update(schema_version=1),
    "schema_version 3": lambda m: m.update(schema_version=3),
    "no source files": lambda m: m["source"].pop("files"),
    "source file not checked_against_hub": lambda m: m["source"]["files"].update(x={"sha256": "0" * 64, "size": 1}),
    "unknown format": lambda m: m.update(format="int4"),
    "negative amax": lambda m: next(iter(m["quantizers"].values())).update(amax=-1.0),
    "zero global scale": lambda m: next(iter(m["quantizers"].values())).update(global_scale=0.0),
    "no members": lambda m: next(iter(m["quantizers"].values())).update(members=[]),
    "tensor without scale": lambda m: next(iter(m["tensors"].values())).pop("scale"),
    "excluded without reason": lambda m: m["excluded"][0].pop("reason"),
    "extra key": lambda m: m.update(timestamp="now"),
    "path is a number": lambda m: m["source"].update(path=3),
}


@pytest.mark.parametrize("how", list(BREAK_MANIFEST))
def test_broken_manifest_fails_schema_and_verify(broken, how):
    """The files table left intact: the schema alone fails."""
    d = broken("qwen3_moe", "nvfp4")
    man = json.loads((d / manifest.MANIFEST_NAME).read_text())
    jsonschema.validate(man, load_schema())  # the unbroken one passes
    BREAK_MANIFEST[how](man)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(man, load_schema())
    (d / manifest.MANIFEST_NAME).write_text(json.dumps(man))
    vs = verify_contract(d)
    assert rules_of(vs) == {"manifest"}
    assert all(v.detail.startswith("schema:") for v in vs)


# ---------------------------------------------------------------------------------------------
# hand-broken checkpoints: each names the rule and the module

def _scaled(d, name, factor):
    return {name: tensor(d, name) * factor}


FUSED_SETS = [
    ("qwen3_moe", "model.layers.1.mlp.experts.2.up_proj", "model.layers.1.mlp.experts.2.gate_up_proj"),
    ("qwen3_moe", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.qkv_proj"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3", "model.layers.1.block_sparse_moe.experts.3.w13"),
    ("deepseek_v3", "model.layers.2.self_attn.kv_a_proj_with_mqa", "model.layers.2.self_attn.q_a_kv_a_proj"),
    ("deepseek_v3", "model.layers.1.mlp.shared_experts.up_proj", "model.layers.1.mlp.shared_experts.gate_up_proj"),
]


# The modelopt flavor keeps DeepSeek's MLA projections in every layer (shardquant/flavors.py
# excluded_everywhere): its q_a/kv_a set is quantized in compressed-tensors only.
@pytest.mark.parametrize("model,member,fused,flavor", [
    (*row, fl) for row in FUSED_SETS for fl in ("modelopt", CT) if not (fl == "modelopt" and "kv_a_proj" in row[1])])
def test_fused_scales_differ(broken, model, member, fused, flavor):
    """One member's global scale changed: the fused set is named (and the manifest disagrees)."""
    d = broken(model, "nvfp4", flavor, "per-expert")
    rewrite(d, _scaled(d, f"{member}.{GLOBAL[flavor]}", 2))
    vs = verify_contract(d)
    assert rules_of(vs) == {"fused-scale", "manifest"}
    assert names_of(vs, "fused-scale") == [fused]
    assert "ratio 2" in next(v.detail for v in vs if v.rule == "fused-scale")


def test_fused_fp8_scales_differ(broken):
    d = broken("qwen3_moe", "fp8", CT)
    rewrite(d, _scaled(d, "model.layers.1.self_attn.v_proj.weight_scale", 1.5))
    vs = verify_contract(d)
    assert names_of(vs, "fused-scale") == ["model.layers.1.self_attn.qkv_proj"]


@pytest.mark.parametrize("flavor", ["modelopt", CT])
def test_missing_global_scale(broken, flavor):
    d = broken("qwen3_moe", "nvfp4", flavor)
    rewrite(d, {f"{O_PROJ}.{GLOBAL[flavor]}": None})
    vs = verify_contract(d)
    assert rules_of(vs) == {"tensors", "manifest"}
    [v] = [v for v in vs if v.rule == "tensors"]
    assert v.name == O_PROJ and GLOBAL[flavor] in v.detail and "missing" in v.detail
    r = cli("verify", d)
    assert r.exit_code == 1 and "FAIL tensors" in r.output and O_PROJ in r.output


def test_excluded_module_with_scales(broken):
    d = broken("qwen3_moe", "nvfp4")
    rewrite(d, {"model.layers.1.mlp.gate.weight_scale_2": torch.tensor(1.0)}, near="model.layers.1.mlp.gate.weight")
    vs = verify_contract(d)
    assert rules_of(vs) == {"excluded-with-scales"}
    assert names_of(vs, "excluded-with-scales") == ["model.layers.1.mlp.gate"]


@pytest.mark.parametrize("flavor", ["modelopt", CT])
def test_nan_block_scale(broken, flavor):
    d = broken("qwen3_moe", "nvfp4", flavor)
    name = "model.layers.0.mlp.experts.5.down_proj.weight_scale"
    s = tensor(d, name).view(torch.uint8).clone()
    s[3, 1], s[7, 0] = 0x7F, 0xFF  # both E4M3 NaN codes
    rewrite(d, {name: s.view(torch.float8_e4m3fn)})
    vs = verify_contract(d)
    assert rules_of(vs) == {"block-scale"}
    [v] = vs
    assert v.name == "model.layers.0.mlp.experts.5.down_proj" and v.detail.startswith("2 of ")


@pytest.mark.parametrize("value", [math.nan, 0.0, math.inf, -1.0])
@pytest.mark.parametrize("fmt,flavor", testing.served())
def test_bad_global_scale(broken, flavor, fmt, value):
    d = broken("qwen3_moe", fmt, flavor)
    f = formats.declared(fmt)
    if f.scale_dtype == "U8":  # E8M0 bytes (MX): no Inf or negatives; 255 is NaN and one vLLM path reads
        # byte 0 as 0.0 (docs/formats.md section 8): break o_proj's block scales with those
        name = f"{O_PROJ}.{FLAVORS[flavor].scale_name}"
        rewrite(d, {name: torch.full_like(tensor(d, name), 0 if value == 0.0 else 255)})
        vs = verify_contract(d)
        assert rules_of(vs) == {"block-scale"}
        assert names_of(vs, "block-scale") == [O_PROJ]
        return
    if not f.quantizer_scale:  # block scales only (fp8-block): break every tile scale of o_proj instead
        name = f"{O_PROJ}.{FLAVORS[flavor].scale_name}"
        rewrite(d, {name: torch.full_like(tensor(d, name), value)})
        vs = verify_contract(d)
        assert rules_of(vs) == {"block-scale"}
        assert names_of(vs, "block-scale") == [O_PROJ]
        return
    name = f"{O_PROJ}.{FLAVORS[flavor].per_quantizer_name(fmt)}"
    rewrite(d, {name: torch.full_like(tensor(d, name), value)})
    vs = verify_contract(d)
    assert rules_of(vs) == {"global-scale", "manifest"}
    assert names_of(vs, "global-scale") == [O_PROJ]


@pytest.mark.parametrize("shape", [(64, 33), (65, 32)])  # packed input dim and rows, each one off
def test_weight_shape_off_by_one(broken, shape):
    d = broken("qwen3_moe", "nvfp4")
    rewrite(d, {f"{O_PROJ}.weight": torch.zeros(shape, dtype=torch.uint8)})
    vs = verify_contract(d)
    assert rules_of(vs) == {"dtype-shape"}
    assert names_of(vs, "dtype-shape") == [O_PROJ]


def test_weight_dtype_wrong(broken):
    d = broken("qwen3_moe", "fp8", CT)
    rewrite(d, {f"{O_PROJ}.weight": tensor(d, f"{O_PROJ}.weight").view(torch.uint8)})
    [v] = verify_contract(d)
    assert (v.rule, v.name) == ("dtype-shape", O_PROJ) and "weight is U8, expected F8_E4M3" in v.detail


@pytest.mark.parametrize("flavor", ["modelopt", CT])
def test_high_precision_linear_not_excluded(broken, flavor):
    d = broken("deepseek_v3", "nvfp4", flavor)
    drop = {"lm_head", "model.layers.3.self_attn.o_proj", "model.layers.2.mlp.gate"}

    def fix(cfg):
        q = cfg.get("quantization", cfg.get("quantization_config"))
        key = "exclude_modules" if "exclude_modules" in q else "ignore"
        q[key] = [m for m in q[key] if m not in drop]

    edit_json(d / "config.json", fix)
    if flavor == "modelopt":
        edit_json(d / "hf_quant_config.json", fix)
    vs = verify_contract(d)
    assert rules_of(vs) == {"unlisted-high-precision"}
    assert set(names_of(vs, "unlisted-high-precision")) == drop  # head, MTP-layer linear, router


def test_fused_set_mixing_precisions(broken):
    """k_proj kept in bf16 (and listed as excluded) while q_proj and v_proj are NVFP4."""
    d = broken("qwen3_moe", "nvfp4")
    k = "model.layers.1.self_attn.k_proj"
    rewrite(d, {f"{k}.weight": torch.zeros(32, 64, dtype=torch.bfloat16), f"{k}.weight_scale": None,
                f"{k}.weight_scale_2": None})
    edit_json(d / "config.json", lambda c: c["quantization_config"]["ignore"].append(k))
    edit_json(d / "hf_quant_config.json", lambda c: c["quantization"]["exclude_modules"].append(k))
    vs = verify_contract(d)
    assert rules_of(vs) == {"fused-precision", "manifest"}
    assert names_of(vs, "fused-precision") == ["model.layers.1.self_attn.qkv_proj"]


def test_w4a4_algo_needs_input_scales(broken):
    d = broken("mixtral", "nvfp4")
    edit_json(d / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo="NVFP4"))
    edit_json(d / "config.json", lambda c: c["quantization_config"].update(quant_algo="NVFP4"))
    vs = verify_contract(d)
    assert rules_of(vs) == {"tensors"}
    assert len(vs) == 32 and all("missing input_scale" in v.detail for v in vs)


def test_index_names_a_tensor_its_shard_lacks(broken):
    d = broken("qwen3_moe", "nvfp4")
    other = sorted({p.name for p in d.glob("*.safetensors")})
    name = f"{O_PROJ}.weight_scale"

    def move(ix):
        ix["weight_map"][name] = next(f for f in other if f != ix["weight_map"][name])

    edit_json(d / INDEX, move)
    vs = verify_contract(d)
    assert "index" in rules_of(vs)
    details = [v.detail for v in vs if v.rule == "index" and v.name == name]
    assert any("does not hold it" in x for x in details) and any("but mapped to" in x for x in details)


def test_shard_tensor_missing_from_index(broken):
    d = broken("qwen3_moe", "nvfp4")
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    edit_json(d / INDEX, lambda ix: ix["weight_map"].pop(name))
    vs = verify_contract(d)
    assert [v.detail.endswith("missing from the index") for v in vs if v.rule == "index"] == [True]
    assert names_of(vs, "index") == [name]


def test_index_total_size_wrong(broken):
    d = broken("qwen3_moe", "fp8")
    edit_json(d / INDEX, lambda ix: ix["metadata"].update(total_size=ix["metadata"]["total_size"] + 1))
    [v] = verify_contract(d)
    assert v.rule == "index" and "total_size" in v.detail


def test_index_names_a_missing_shard(broken):
    d = broken("qwen3_moe", "nvfp4")
    victim = sorted(d.glob("*.safetensors"))[-1]
    victim.unlink()
    vs = verify_contract(d)
    assert victim.name in names_of(vs, "index")


@pytest.mark.parametrize("flavor", ["modelopt", CT])
def test_manifest_disagrees_with_a_tensor(broken, flavor):
    """o_proj stands alone: only the manifest can tell its global scale is wrong. compressed-tensors
    stores 1/s2, so the manifest's s2 is compared with fl32(1/tensor)."""
    d = broken("qwen3_moe", "nvfp4", flavor)
    rewrite(d, _scaled(d, f"{O_PROJ}.{GLOBAL[flavor]}", 1.0001))
    vs = verify_contract(d)
    assert rules_of(vs) == {"manifest"}
    assert names_of(vs, "manifest") == [f"{O_PROJ}.weight"]


def test_manifest_quantizer_not_matching_its_amax(broken):
    d = broken("te_grouped", "fp8")

    def fix(m):
        q = m["quantizers"]["decoder.layers.0.self_attention.linear_proj"]
        q["amax"] = q["amax"] * 2

    edit_json(d / manifest.MANIFEST_NAME, fix)
    vs = verify_contract(d)
    assert names_of(vs, "manifest") == ["decoder.layers.0.self_attention.linear_proj"]


# ---------------------------------------------------------------------------------------------
# files against the manifest: one flipped bit anywhere names its file

def _data_byte(shard: Path) -> int:
    """Offset of a byte in the middle of a packed weight's data (not a scale: the contract cannot
    see a change there, only the hash can)."""
    hdr = read_header(shard)
    t = next(t for t in hdr.values() if t.name.endswith((".weight", ".weight_packed")) and t.dtype in ("U8", "F8_E4M3"))
    return t.offset + t.nbytes // 2


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what", ["shard data", "config.json", "hf_quant_config.json", INDEX])
def test_one_flipped_bit_names_the_file(broken, what):
    d = broken("qwen3_moe", "nvfp4")
    if what == "shard data":
        path = sorted(d.glob("*.safetensors"))[1]
        offset = _data_byte(path)
    else:
        path = d / what
        offset = path.read_bytes().index(b"\n  ") + 4  # the first letter of the first key
    _flip(path, offset, bit=1)  # a letter stays a letter: the JSON stays valid
    vs = verify_contract(d)
    assert [(v.rule, v.name, v.detail) for v in vs if v.rule.startswith("file-")] == [
        ("file-integrity", path.name, "sha256 differs from the manifest")]
    if what == "shard data":
        assert len(vs) == 1  # packed codes: nothing else can tell
        assert verify_contract(d, hashes=False) == []  # same size: only the hash sees it
    r = cli("verify", d)
    assert r.exit_code == 1 and "FAIL file-integrity: 1 x" in r.output and f"  {path.name}: sha256 differs" in r.output


def test_hashing_in_small_chunks_reads_every_byte(broken, monkeypatch):
    """The hash loop over many chunks (the last one short) gives the same digest as one read."""
    d = broken("qwen3_moe", "fp8")
    monkeypatch.setattr(verify_mod, "HASH_CHUNK", 1000)
    assert verify_contract(d) == []
    last = sorted(d.glob("*.safetensors"))[-1]
    _flip(last, last.stat().st_size - 1, bit=7)
    assert [(v.rule, v.name) for v in verify_contract(d) if v.rule.startswith("file-")] == [
        ("file-integrity", last.name)]


def test_size_checked_without_hashes(broken):
    d = broken("mixtral", "fp8", CT)
    with open(d / "tokenizer_config.json", "ab") as f:
        f.write(b" ")
    size = (d / "tokenizer_config.json").stat().st_size
    for hashes in (True, False):
        assert [(v.rule, v.name, v.detail) for v in verify_contract(d, hashes=hashes)] == [
            ("file-integrity", "tokenizer_config.json", f"size {size}, manifest says {size - 1}")]


@pytest.mark.parametrize("how,detail", [
    ("delete", "missing"),
    ("symlink", "is a symlink, not a file"),
    ("directory", "is a directory, not a file"),
    ("fifo", "is not a regular file"),
])
def test_listed_file_not_a_regular_file(broken, tmp_path, how, detail):
    d = broken("qwen3_moe", "fp8")
    victim = d / "special_tokens_map.json"
    data = victim.read_bytes()
    victim.unlink()
    if how == "symlink":  # to a file of the very same bytes: the link itself is the fault
        (tmp_path / "elsewhere.json").write_bytes(data)
        victim.symlink_to(tmp_path / "elsewhere.json")
    elif how == "directory":
        victim.mkdir()
    elif how == "fifo":
        os.mkfifo(victim)
    for hashes in (True, False):
        assert [(v.rule, v.name, v.detail) for v in verify_contract(d, hashes=hashes)] == [
            ("file-integrity", "special_tokens_map.json", detail)]


def test_a_symlinked_shard_is_named(broken, tmp_path):
    d = broken("qwen3_moe", "nvfp4", CT)
    shard = sorted(d.glob("*.safetensors"))[0]
    shutil.move(shard, tmp_path / shard.name)
    shard.symlink_to(tmp_path / shard.name)
    vs = verify_contract(d)
    assert [(v.name, v.detail) for v in vs if v.rule == "file-integrity"] == [(shard.name, "is a symlink, not a file")]
    assert any("leaving the source directory" in v.detail for v in vs if v.rule == "index")  # not read either


def test_unlisted_files_are_violations(broken):
    d = broken("qwen3_moe", "nvfp4")
    (d / ".hidden").write_text("x")
    (d / "notes.txt").write_text("x")
    (d / "sub").mkdir()
    (d / "sub" / "x.json").write_text("{}")
    (d / "link.json").symlink_to("config.json")
    vs = verify_contract(d, hashes=False)
    assert rules_of(vs) == {"file-unlisted"}
    assert {v.name: v.detail for v in vs} == {
        ".hidden": "a file the manifest does not list", "notes.txt": "a file the manifest does not list",
        "sub": "a directory the manifest does not list", "link.json": "a symlink the manifest does not list"}


def test_a_hub_local_dir_download_cache_is_not_part_of_the_checkpoint(broken, tmp_path):
    """`hf download --local-dir` leaves .cache/huggingface/ (huggingface_hub/_local_folder.py): no engine
    reads it, so it is not unlisted; anything else in .cache, or a .cache that is a link, still is."""
    d = broken("qwen3_moe", "nvfp4")
    meta = d / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text("abc\n0\n")
    (d / ".cache" / "huggingface" / ".gitignore").write_text("*")
    assert verify_contract(d, hashes=False) == []
    (d / ".cache" / "other.bin").write_text("x")
    assert [(v.rule, v.name) for v in verify_contract(d, hashes=False)] == [("file-unlisted", ".cache")]
    shutil.rmtree(d / ".cache")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "huggingface").mkdir()
    (d / ".cache").symlink_to(tmp_path / "hub")
    assert [(v.rule, v.name) for v in verify_contract(d, hashes=False)] == [("file-unlisted", ".cache")]


def test_files_in_subdirectories_are_checked(broken):
    """A listed `sub/x.json` is checked like any file; an unlisted one beside it is named."""
    d = broken("qwen3_moe", "fp8")
    (d / "sub").mkdir()
    (d / "sub" / "x.json").write_text("{}")
    seal(d)
    assert verify_contract(d) == []
    (d / "sub" / "x.json").write_text("[]")
    (d / "sub" / "y.json").write_text("{}")
    assert [(v.rule, v.name) for v in verify_contract(d)] == [("file-integrity", "sub/x.json"),
                                                             ("file-unlisted", "sub/y.json")]


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "a//b", "./config.json", "a\\b",
                                  manifest.MANIFEST_NAME])
def test_manifest_listing_a_path_outside_or_itself(broken, name):
    d = broken("qwen3_moe", "fp8")
    man = json.loads((d / manifest.MANIFEST_NAME).read_text())
    man["files"][name] = {"sha256": "0" * 64, "size": 0}
    (d / manifest.MANIFEST_NAME).write_text(json.dumps(man))
    vs = verify_contract(d)
    assert [v.rule for v in vs] == ["file-integrity"]
    assert "plain relative path" in vs[0].detail or "lists itself" in vs[0].detail


def test_manifest_file_entry_malformed_is_not_silently_skipped(broken):
    d = broken("qwen3_moe", "fp8")
    man = json.loads((d / manifest.MANIFEST_NAME).read_text())
    man["files"]["config.json"]["size"] = "12"
    (d / manifest.MANIFEST_NAME).write_text(json.dumps(man))
    vs = verify_contract(d)
    assert rules_of(vs) == {"file-integrity", "manifest"}
    assert names_of(vs, "file-integrity") == ["config.json"]


def test_integral_float_size_is_an_integer(broken):
    """JSON Schema counts 5.0 as an integer; so does the file check (the size is still compared)."""
    d = broken("qwen3_moe", "fp8")
    man = json.loads((d / manifest.MANIFEST_NAME).read_text())
    size = man["files"]["config.json"]["size"]
    man["files"]["config.json"]["size"] = float(size)
    (d / manifest.MANIFEST_NAME).write_text(json.dumps(man))
    assert verify_contract(d) == []
    man["files"]["config.json"]["size"] = float(size + 1)
    (d / manifest.MANIFEST_NAME).write_text(json.dumps(man))
    assert [(v.rule, v.name) for v in verify_contract(d)] == [("file-integrity", "config.json")]


def test_no_manifest_is_not_hash_checked_and_says_so(broken):
    rep = verify(MODELOPT)
    assert rep.ok and rep.files_checked is None
    assert any("no scale_manifest.json" in w and "not checked" in w for w in rep.warnings)
    r = cli("verify", MODELOPT)
    assert r.exit_code == 0 and "warning: no scale_manifest.json" in r.output
    # ours always has one: without it, the config's producer gives it away
    d = broken("qwen3_moe", "nvfp4")
    (d / manifest.MANIFEST_NAME).unlink()
    assert [(v.rule, v.name) for v in verify_contract(d)] == [("manifest", manifest.MANIFEST_NAME)]


def test_cli_no_hashes(broken):
    d = broken("qwen3_moe", "nvfp4", CT)
    shard = sorted(d.glob("*.safetensors"))[1]  # [0] holds only the embedding
    _flip(shard, _data_byte(shard))
    r = cli("verify", d, "--no-hashes")
    assert r.exit_code == 0, r.output
    assert "checked against the manifest (size only)" in r.output and "SHA-256 not" in r.output
    r = cli("verify", d)
    assert r.exit_code == 1 and shard.name in r.output


# ---------------------------------------------------------------------------------------------
# --source: dequantize and compare

# Gaussian weights: NVFP4 (E2M1 elements, 16-element blocks with E4M3 scales) measures 20.4-20.7 dB
# per tensor here, FP8 (E4M3, 3 mantissa bits: ~31 dB for any well-scaled data) 31.2-31.8 dB; the
# bands leave room for other seeds and shapes, and neither band reaches the other format.
BANDS = {"nvfp4": (19.0, 21.5), "fp8": (30.0, 33.0), "fp8-channel": (30.0, 33.5), "fp8-block": (30.0, 33.0), "mxfp4": (15.0, 21.0), "mxfp8": (29.0, 33.0)}


@pytest.mark.parametrize("fmt,flavor", testing.served())
def test_sqnr_band(converted, sources, fmt, flavor):
    out = converted("qwen3_moe", fmt, flavor)
    rep = verify(out, str(src_of(sources, "qwen3_moe", fmt)))
    assert rep.ok, rep.violations
    lo, hi = BANDS[fmt]
    assert lo <= rep.overall().sqnr_db <= hi
    assert all(lo <= t.sqnr_db <= hi for t in rep.tensors)
    assert len(rep.tensors) == rep.modules == 56
    assert math.isclose(rep.overall().rel_rms, 10 ** (-rep.overall().sqnr_db / 20))
    layers = {(L, p) for L, p, _ in rep.layers()}
    assert (1, "mlp.experts.*.gate_proj") in layers and len(layers) == 2 * 7


def test_corrupted_weight_is_worst(converted, sources, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(converted("qwen3_moe", "nvfp4", CT), d)
    victim = "model.layers.1.mlp.experts.6.up_proj"
    w = tensor(d, f"{victim}.weight_packed")
    rewrite(d, {f"{victim}.weight_packed": torch.randint(0, 256, w.shape, dtype=torch.uint8,
                                                          generator=torch.Generator().manual_seed(0))})
    assert verify_contract(d) == []  # well-formed: only the numbers are wrong
    rep = verify(d, str(sources["qwen3_moe"]))
    worst = rep.worst(2)
    assert worst[0].name == f"{victim}.weight" and worst[0].sqnr_db < 5
    assert worst[1].sqnr_db > BANDS["nvfp4"][0]
    assert [(v.rule, v.name) for v in rep.violations] == [("sqnr", f"{victim}.weight")]

    js, png = tmp_path / "r.json", tmp_path / "r.png"
    r = cli("verify", d, "--source", sources["qwen3_moe"], "--json", js, "--plot", png, "--top", 3)
    assert r.exit_code == 1 and "FAIL sqnr" in r.output and victim in r.output
    report = json.loads(js.read_text())
    assert report["ok"] is False and report["worst"][0] == f"{victim}.weight"
    assert report["violations"]["sqnr"]["count"] == 1 and len(report["tensors"]) == 56

    # PNG: 2 layers x 7 projections of 16-px cells (labels around them: tests/test_ux.py); only the
    # corrupted cell is red (below the floor)
    w_px, h_px, rgb = read_png(png)
    lay = heatmap_layout(rep)
    assert (w_px, h_px) == (lay.width, lay.height) and lay.cell == 16
    col = [p for L, p, _ in rep.layers() if L == 1].index("mlp.experts.*.up_proj")
    cells = rgb[lay.grid_y + 8:lay.grid_y + 2 * 16:16, lay.grid_x + 8:lay.grid_x + 7 * 16:16]  # cell middles
    assert cells.shape == (2, 7, 3)
    assert tuple(cells[1, col]) == (220, 40, 40)
    assert sum(tuple(c) == (220, 40, 40) for c in cells.reshape(-1, 3)) == 1
    assert write_heatmap(tmp_path / "api.png", rep, cell=4, labels=False) == (7 * 4, 2 * 4)  # the bare grid
    assert read_png(tmp_path / "api.png")[2][1 * 4, col * 4].tolist() == [220, 40, 40]


def test_min_sqnr_floor(converted, sources):
    out = converted("mixtral", "fp8")
    assert verify(out, str(sources["mixtral"])).ok
    rep = verify(out, str(sources["mixtral"]), min_sqnr=40.0)  # above what FP8 can reach
    assert rules_of(rep.violations) == {"sqnr"} and len(rep.violations) == rep.modules


def test_kept_tensor_changed_is_found_with_source(broken, sources):
    d = broken("qwen3_moe", "nvfp4")
    rewrite(d, {"lm_head.weight": tensor(d, "lm_head.weight") * 2})
    assert verify_contract(d) == []  # headers and scales cannot see it
    rep = verify(d, str(sources["qwen3_moe"]))
    assert [(v.rule, v.name) for v in rep.violations] == [("source", "lm_head.weight")]


@pytest.mark.parametrize("flavor", ["modelopt", CT])
def test_scale_checks_with_source_find_what_the_contract_finds(broken, sources, flavor):
    """verify --source checks each module's scale values as it reads the module for its comparison
    (shardquant/verify.py _finish_data): the same findings, in the same order, as the contract alone;
    a module whose scales are malformed gets no SQNR (its numbers would mean nothing)."""
    d = broken("qwen3_moe", "nvfp4", flavor, "per-expert")
    nan = "model.layers.0.mlp.experts.5.down_proj"
    s = tensor(d, f"{nan}.weight_scale").view(torch.uint8).clone()
    s[3, 1] = 0x7F
    rewrite(d, {f"{nan}.weight_scale": s.view(torch.float8_e4m3fn),
                **_scaled(d, f"model.layers.1.mlp.experts.2.up_proj.{GLOBAL[flavor]}", 2),
                f"{O_PROJ}.{GLOBAL[flavor]}": torch.full_like(tensor(d, f"{O_PROJ}.{GLOBAL[flavor]}"), math.nan)})
    alone = [(v.rule, v.name, v.detail) for v in verify(d).violations]
    assert {r for r, _, _ in alone} == {"block-scale", "global-scale", "fused-scale", "manifest"}
    rep = verify(d, str(sources["qwen3_moe"]), device="cpu")
    found = [(v.rule, v.name, v.detail) for v in rep.violations]
    assert [f for f in found if f[0] != "sqnr"] == alone
    compared = {t.name for t in rep.tensors}
    assert f"{nan}.weight" not in compared and f"{O_PROJ}.weight" not in compared
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in compared  # well-formed: compared, and far off
    assert ("sqnr", "model.layers.1.mlp.experts.2.up_proj.weight") in {f[:2] for f in found}


def test_manifest_amax_checked_against_source(broken, sources):
    """amax, global scale and weight_scale_2 of o_proj all agreeing, with an amax 0.01% off: the
    contract cannot see it (and NVFP4's error hides it), the source can."""
    d = broken("qwen3_moe", "nvfp4")
    man = json.loads((d / manifest.MANIFEST_NAME).read_text())
    q = man["quantizers"][O_PROJ]
    amax = np.float32(q["amax"]) * np.float32(1.0001)
    gs = formats.get("nvfp4").global_scale(amax)
    q.update(amax=float(amax), global_scale=float(gs))
    (d / manifest.MANIFEST_NAME).write_text(json.dumps(man))
    rewrite(d, {f"{O_PROJ}.weight_scale_2": torch.tensor(float(gs), dtype=torch.float32)})
    assert verify_contract(d) == []
    rep = verify(d, str(sources["qwen3_moe"]))
    assert [(v.rule, v.name) for v in rep.violations] == [("manifest", O_PROJ)]


def test_wrong_source(sources, converted, tmp_path):
    """Checked against another model's source: tensors of the same shape fall below the SQNR floor,
    tensors of another shape or name are named as not fitting the source."""
    out = converted("mixtral", "nvfp4")
    # Same attention shapes; the same seed gives layer 0 the same attention data in both models (its
    # tensors come first), layer 1 other data. No w1/w2/w3 in the source.
    rep = verify(out, str(sources["qwen3_moe"]))
    by = {r: names_of(rep.violations, r) for r in rules_of(rep.violations)}
    assert set(by) == {"sqnr", "source"}
    assert len(rep.tensors) == 8
    assert sorted(by["sqnr"]) == sorted(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo")
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in by["source"]

    other = testing.write_checkpoint(tmp_path / "mixtral-32", testing.mixtral(inter=32), seed=11)
    rep = verify(out, str(other))
    [v] = [v for v in rep.violations if v.name == "model.layers.0.block_sparse_moe.experts.0.w1"]
    assert v.rule == "source" and "does not fit source BF16[32, 64]" in v.detail


def read_png(path: Path) -> tuple[int, int, np.ndarray]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, ctype, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype) == (8, 2)
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return w, h, rows[:, 1:].reshape(h, w, 3)


def test_png_writer_round_trips(tmp_path):
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13
    write_png(tmp_path / "x.png", img)
    w, h, rgb = read_png(tmp_path / "x.png")
    assert (w, h) == (3, 2) and np.array_equal(rgb, img)


def test_plot_needs_source(converted, tmp_path):
    r = cli("verify", converted("qwen3_moe", "fp8"), "--plot", tmp_path / "x.png")
    assert r.exit_code == 2 and not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# checkpoints made by other tools

def test_llm_compressor_gate_up_mismatch_is_reported():
    """llm-compressor 0.14 model_free_ptq (NVFP4A16) gives each expert's gate_proj and up_proj their
    own global scale; q/k/v it does fuse. Everything else about its checkpoint is right."""
    assert sum(p.stat().st_size for p in LLMC.iterdir()) < 300_000
    rep = verify(LLMC)
    assert (rep.flavor, rep.format, rep.modules) == (CT, "nvfp4", 32)
    assert rep.producer.startswith("compressed-tensors")
    assert rules_of(rep.violations) == {"fused-scale"}
    assert sorted(names_of(rep.violations, "fused-scale")) == [
        f"model.layers.{L}.mlp.experts.{E}.gate_up_proj" for L in range(2) for E in range(4)]
    r = cli("verify", LLMC)
    assert r.exit_code == 1
    assert "FAIL fused-scale: 8 x" in r.output and "model.layers.0.mlp.experts.0.gate_up_proj: gate_proj" in r.output


def test_modelopt_checkpoint_passes():
    """ModelOpt 0.47 (mtq.quantize W4A16_NVFP4_CFG + export_hf_checkpoint, CPU): single file, no
    manifest; gate/up and q/k/v share their weight_scale_2, the router and lm_head are excluded."""
    assert sum(p.stat().st_size for p in MODELOPT.iterdir()) < 300_000
    rep = verify(MODELOPT)
    assert rep.ok, rep.violations
    assert (rep.flavor, rep.format, rep.modules, rep.producer) == ("modelopt", "nvfp4", 32, "modelopt 0.47.0")


def test_modelopt_checkpoint_broken_copy_fails(tmp_path):
    d = tmp_path / "mo"
    shutil.copytree(MODELOPT, d)
    name = "model.layers.1.mlp.experts.3.gate_proj.weight_scale_2"
    tensors = load_file(d / "model.safetensors")
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    assert [(v.rule, v.name) for v in verify_contract(d)] == [
        ("fused-scale", "model.layers.1.mlp.experts.3.gate_up_proj")]


# ---------------------------------------------------------------------------------------------
# exclude-list semantics

@pytest.mark.parametrize("module,patterns,flavor,want", [
    ("lm_head", ("lm_head",), CT, True),
    ("model.layers.0.mlp.gate", ("re:.*mlp\\.gate$",), CT, True),
    ("model.layers.0.mlp.gate_proj", ("re:.*mlp\\.gate$",), CT, False),
    ("model.layers.0.mlp.gate", ("mlp.gate",), CT, False),  # compressed-tensors: exact names only
    ("model.layers.0.mlp.gate", ("mlp.gate",), "modelopt", True),  # modelopt: a dotted part
    ("model.layers.0.mlp.gate_proj", ("mlp.gate",), "modelopt", False),
    ("model.layers.7.mlp.gate", ("model.layers.*.mlp.gate",), "modelopt", True),
    ("model.layers.7.mlp.gate_proj", ("*mlp.gate",), "modelopt", False),
    ("model.visual.blocks.0.attn.qkv", ("model.visual",), "modelopt", True),
])
def test_exclude_semantics(module, patterns, flavor, want):
    assert excluded(module, patterns, flavor) is want


# ---------------------------------------------------------------------------------------------
# FP8 the engines serve (formats/fp8.py; docs/formats.md): the spellings 0.1.0 wrote are rejected

def _as_ct_weight_only_tensor_fp8(d: Path) -> None:
    """0.1.0's compressed-tensors FP8: per-tensor [1] scales, no activation quantization."""
    scales = {n: tensor(d, n)[:1, 0].clone() for n in json.loads((d / INDEX).read_text())["weight_map"]
              if n.endswith(".weight_scale")}
    rewrite(d, scales)

    def fix(c):
        g = c["quantization_config"]["config_groups"]["group_0"]
        g["weights"]["strategy"], g["input_activations"] = "tensor", None
    edit_json(d / "config.json", fix)
    seal(d)


def test_weight_only_fp8_moe_in_compressed_tensors_is_rejected(broken):
    d = broken("qwen3_moe", "fp8", CT)
    assert verify_contract(d) == []
    _as_ct_weight_only_tensor_fp8(d)
    vs = verify_contract(d)
    assert rules_of(vs) == {"engine-moe-fp8"}
    assert "weights tensor with no activation quantization" in vs[0].detail and "vLLM and SGLang" in vs[0].detail


def test_weight_only_fp8_dense_in_compressed_tensors_passes(broken):
    d = broken("llama", "fp8", CT)
    _as_ct_weight_only_tensor_fp8(d)
    assert verify_contract(d) == []  # dense FP8 weight-only loads (vLLM W8A16); only fused MoE refuses it


def test_modelopt_fp8_without_input_scale_is_rejected(broken):
    """0.1.0's ModelOpt FP8: quant_algo FP8 (static activation scales) with no input_scale, which
    vLLM and SGLang serve as zeros."""
    d = broken("llama", "fp8", CT)
    names = json.loads((d / INDEX).read_text())["weight_map"]
    rewrite(d, {n: tensor(d, n)[0, 0].clone() for n in names if n.endswith(".weight_scale")})

    def to_modelopt(c):
        ignore = c["quantization_config"]["ignore"]
        c["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ignore,
                                    "producer": {"name": "shardquant", "version": "0.1.0"}}
    edit_json(d / "config.json", to_modelopt)
    ignore = json.loads((d / "config.json").read_text())["quantization_config"]["ignore"]
    (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "shardquant", "version": "0.1.0"},
                                                        "quantization": {"quant_algo": "FP8", "exclude_modules": ignore}}))
    man = json.loads((d / manifest.MANIFEST_NAME).read_text())
    man["flavor"] = "modelopt"
    (d / manifest.MANIFEST_NAME).write_text(json.dumps(man))
    seal(d)
    vs = verify_contract(d)
    assert "tensors" in rules_of(vs)
    quantized = [v for v in vs if v.rule == "tensors"]
    assert quantized and all("missing input_scale" in v.detail for v in quantized)


@pytest.mark.parametrize("fmt,flavor", testing.refused())
def test_refused_pairs_are_one_line_with_the_alternatives(sources, tmp_path, fmt, flavor):
    r = cli("convert", sources["qwen3_moe"], "--format", fmt, "--flavor", flavor, "-o", tmp_path / "o",
            "--device", "cpu")
    assert r.exit_code == 1 and "Traceback" not in r.output
    [line] = r.output.strip().splitlines()
    assert line.startswith(f"error: --format {fmt} --flavor {flavor} is refused: ") and "use --" in line
    assert not (tmp_path / "o").exists()
