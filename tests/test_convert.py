"""End to end: tiny checkpoints in real layouts through `convert()` and the CLI, every output checked
against the source, ModelOpt 0.47 (NVFP4, CPU) and torch's E4M3 cast (FP8), code for code."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from shardquant import formats
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import shardquant
from shardquant import testing
from shardquant.cli import main
from shardquant.convert import convert

with warnings.catch_warnings():  # modelopt warns at import that transformers is absent
    warnings.simplefilter("ignore")
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

INDEX = "model.safetensors.index.json"
MANIFEST = "scale_manifest.json"
COPIED = ["tokenizer_config.json", "chat_template.jinja", "generation_config.json", "special_tokens_map.json"]
README = "# tiny\n\nrandom weights\n"
QUANT_ALGO = {"nvfp4": "W4A16_NVFP4"}
# Source shards small enough that fused sets (experts included) straddle shard boundaries.
MODELS = {
    "qwen3_moe": (testing.qwen3_moe, 20_000),
    "mixtral": (lambda: testing.mixtral(inter=64), 24_000),
    "deepseek_v3": (testing.deepseek_v3, 14_000),
    "te_grouped": (testing.te_grouped, 20_000),
}
# Expert index of a member name: `experts.{E}.` (HF) or `.weight{E}` (TransformerEngine grouped).
_EXPERT = re.compile(r".*\.experts\.(?:(\d+)\..*|linear_fc\d\.weight(\d+))")
_GATE = re.compile(r"(?P<p>.*\.experts\.\d+\.)(?P<g>gate_proj|w1)\.weight")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> source directory, each written once per module."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name, (make, shard_bytes) in MODELS.items():
        out[name] = testing.write_checkpoint(root / name, make(), shard_bytes=shard_bytes, seed=7,
                                             extra_files={"README.md": README})
        # the same layout in whole 128x128 tiles, for formats with 2-D block scales (Format.block);
        # shards of ~3 tensors, so that fused sets still straddle them
        out[f"{name}@tiled"] = testing.write_checkpoint(root / f"{name}-tiled", testing.TILED[name](),
                                                        shard_bytes=shard_bytes * 4, seed=7,
                                                        extra_files={"README.md": README})
    return out


def src_of(sources, model: str, fmt: str) -> Path:
    return sources[f"{model}@tiled" if formats.declared(fmt).block else model]


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """(model, fmt, policy) -> output directory, converted once through `convert()`."""
    root = tmp_path_factory.mktemp("out")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(model: str, fmt: str, policy: str) -> Path:
        key = (model, fmt, policy)
        if key not in cache:
            out = root / "-".join(key)
            res = convert(str(src_of(sources, model, fmt)), out, fmt, expert_policy=policy)
            assert res.output == out
            cache[key] = out
        return cache[key]

    return get


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def shard_files(d: Path) -> dict[str, list[str]]:
    """file name -> tensor names, for every .safetensors file in d."""
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            out[p.name] = list(f.keys())
    return out


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for p in sorted(d.glob("*.safetensors")):
        part = load_file(p)
        assert not set(part) & set(tensors), f"{p.name} repeats a tensor"
        tensors.update(part)
    return tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def expert_of(name: str) -> str | None:
    m = _EXPERT.fullmatch(name)
    return (m.group(1) or m.group(2)) if m else None


def file_digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def fp32_amax(ws: list[torch.Tensor]) -> torch.Tensor:
    """max |W| over every member, exact in fp32 (0-dim float32 tensor)."""
    return torch.stack([w.float().abs().max() for w in ws]).max()


def check_output(src: Path, out: Path, fmt: str, policy: str) -> dict:
    """Everything an output must satisfy; returns the manifest."""
    src_t, out_t = load_dir(src), load_dir(out)
    man = json.loads((out / MANIFEST).read_text())

    # --- manifest: provenance and coverage
    assert man["schema_version"] == 2
    assert {k: v for k, v in man["tool"].items() if k != "recipe"} == {"name": "shardquant",
                                                                     "version": shardquant.__version__}
    assert len(man["tool"]["recipe"]) == 64
    source_files = man["source"].pop("files")
    assert man["source"] == {"path": str(src.resolve()), "repo": None, "revision": None}
    # provenance: every source file, hashed while streamed, equals an independent hash of it
    assert source_files == {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                     "size": p.stat().st_size, "checked_against_hub": False}
                            for p in src.iterdir() if p.is_file()}
    # every output file but the manifest is listed with its size and SHA-256, and nothing else is there
    on_disk = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
               for p in out.iterdir() if p.name != MANIFEST}
    assert man["files"] == on_disk
    # the default flavor is the format's declared one, else the first that serves it (formats/base.py Format)
    decl = formats.declared(fmt)
    default = decl.default_flavor or next(fl for f, fl in testing.served() if f == fmt)
    assert (man["format"], man["flavor"], man["expert_policy"]) == (fmt, default, policy)
    quantized, kept = set(man["tensors"]), {e["name"] for e in man["excluded"]}
    assert len(kept) == len(man["excluded"])
    assert all(isinstance(e["reason"], str) and e["reason"] for e in man["excluded"])
    assert not quantized & kept
    assert quantized | kept == set(src_t)
    assert quantized, "nothing was quantized"
    members = [n for q in man["quantizers"].values() for n in q["members"]]
    assert sorted(members) == sorted(quantized)
    expected_out = set(kept)
    for n, e in man["tensors"].items():
        assert n in man["quantizers"][e["quantizer"]]["members"]
        assert e["weight"] == shardquant.flavors.FLAVORS[default].output_names(fmt, n)["weight"]  # weight_packed in CT
        assert e["weight"] in out_t and e["scale"] in out_t
        if decl.quantizer_scale:
            assert e["global_scale"] in out_t
        else:  # block scales only: the manifest records no per-quantizer scale
            assert e["global_scale"] is None and man["quantizers"][e["quantizer"]]["global_scale"] is None
        expected_out |= {e["weight"], e["scale"]} | ({e["global_scale"]} if decl.quantizer_scale else set())
    assert set(out_t) == expected_out

    # --- kept tensors: byte for byte
    for n in kept:
        assert out_t[n].dtype == src_t[n].dtype and out_t[n].shape == src_t[n].shape, n
        assert raw_bytes(out_t[n]) == raw_bytes(src_t[n]), n

    # --- quantized tensors, code for code
    for key, q in man["quantizers"].items():
        ws = [src_t[n] for n in q["members"]]
        amax = fp32_amax(ws)
        assert q["amax"] == amax.item(), key
        if fmt == "nvfp4":
            s2 = amax / torch.tensor(2688.0, dtype=torch.float32)  # one correctly rounded fp32 division
            ref_s2 = NVFP4QTensor.get_weights_scaling_factor_2(torch.cat([w.reshape(-1) for w in ws]))
            assert torch.equal(s2, ref_s2), key
            assert q["global_scale"] == s2.item(), key
            for n, w in zip(q["members"], ws):
                e = man["tensors"][n]
                qt, sc, _ = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=s2)
                ow, osc, ogs = out_t[e["weight"]], out_t[e["scale"]], out_t[e["global_scale"]]
                assert ow.dtype == torch.uint8 and ow.shape == (w.shape[0], w.shape[1] // 2), n
                assert osc.dtype == torch.float8_e4m3fn and osc.shape == (w.shape[0], w.shape[1] // 16), n
                assert ogs.dtype == torch.float32 and ogs.shape == (), n
                assert torch.equal(ow, qt._quantized_data), f"packed FP4 codes differ from ModelOpt: {n}"
                assert torch.equal(osc.view(torch.uint8), sc.view(torch.uint8)), f"block scales differ: {n}"
                assert torch.equal(ogs, s2), n
        elif decl.block:  # fp8-block: one fp32 scale per 128x128 tile, from the tile's own amax
            br, bc = decl.block
            for n, w in zip(q["members"], ws):
                e = man["tensors"][n]
                ow, osc = out_t[e["weight"]], out_t[e["scale"]]
                r, c = w.shape
                assert ow.dtype == torch.float8_e4m3fn and ow.shape == w.shape, n
                assert osc.dtype == torch.float32 and osc.shape == (r // br, c // bc), n
                tiles = w.float().reshape(r // br, br, c // bc, bc)
                ts = tiles.abs().amax(dim=(1, 3)) / torch.tensor(448.0)
                ts = torch.where(ts < torch.finfo(torch.float32).tiny, torch.ones_like(ts), ts)
                assert torch.equal(osc, ts), n
                ref = (tiles / ts[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(r, c)
                assert torch.equal(ow.view(torch.uint8), ref.view(torch.uint8)), f"FP8 codes differ: {n}"
        elif decl.granularity == "row":  # fp8-channel: one fp32 scale per output row, from the row's own amax
            assert q["global_scale"] is None, key
            for n, w in zip(q["members"], ws):
                e = man["tensors"][n]
                assert e["global_scale"] is None, n
                ow, osc = out_t[e["weight"]], out_t[e["scale"]]
                assert ow.dtype == torch.float8_e4m3fn and ow.shape == w.shape, n
                assert osc.dtype == torch.float32 and osc.shape == (w.shape[0], 1), n
                rs = w.float().abs().amax(dim=1, keepdim=True) / torch.tensor(448.0)
                rs = torch.where(rs < torch.finfo(torch.float32).tiny, torch.ones_like(rs), rs)
                assert torch.equal(osc, rs), n
                ref = (w.float() / rs).clamp(-448, 448).to(torch.float8_e4m3fn)
                assert torch.equal(ow.view(torch.uint8), ref.view(torch.uint8)), f"FP8 codes differ: {n}"
        elif decl.scale_rule == "ct-round-pow2":  # MX: E8M0 bytes per 32, compressed-tensors' own (tests/test_mx.py)
            from test_mx import codes_of, ct_quantize

            for n, w in zip(q["members"], ws):
                e = man["tensors"][n]
                ow, osc = out_t[e["weight"]], out_t[e["scale"]]
                assert osc.dtype == torch.uint8 and osc.shape == (w.shape[0], w.shape[1] // 32), n
                assert ow.shape == (w.shape[0], w.shape[1] // decl.elems_per_byte), n
                want_q, want_s = ct_quantize(w, fmt)
                zero = want_s == 0  # amax rounds to zero: compressed-tensors 0, ours 1 (formats/mxfp4.py)
                assert np.array_equal(osc.numpy(), np.where(zero, 1, want_s)), f"E8M0 scales differ: {n}"
                keep = ~np.repeat(zero, 32, axis=1)
                got = codes_of(ow.view(torch.uint8).numpy(), fmt)
                assert np.array_equal(got[keep], codes_of(want_q, fmt)[keep]), f"MX codes differ: {n}"
        else:
            scale = amax / torch.tensor(448.0, dtype=torch.float32)
            assert q["global_scale"] == scale.item(), key
            for n, w in zip(q["members"], ws):
                e = man["tensors"][n]
                assert e["global_scale"] == e["scale"]
                ow, osc = out_t[e["weight"]], out_t[e["scale"]]
                assert ow.dtype == torch.float8_e4m3fn and ow.shape == w.shape, n
                # compressed-tensors `channel` spelling: the quantizer's one scale, once per output row
                assert osc.dtype == torch.float32 and osc.shape == (w.shape[0], 1), n
                assert torch.equal(osc, scale.expand(w.shape[0], 1)), n
                ref = (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                assert torch.equal(ow.view(torch.uint8), ref.view(torch.uint8)), f"FP8 codes differ: {n}"
            assert not any(k.endswith("weight_scale_2") for k in out_t)
        # one global scale per quantizer, identical in every member's output
        if not decl.quantizer_scale:
            continue
        gs = {v for n in q["members"] for v in out_t[man["tensors"][n]["global_scale"]].reshape(-1).tolist()}
        assert len(gs) == 1, key

    # --- gate and up of every expert share one global scale (both policies)
    pairs = 0
    for n in quantized:
        m = _GATE.fullmatch(n)
        if m:
            up = m["p"] + {"gate_proj": "up_proj", "w1": "w3"}[m["g"]] + ".weight"
            a, b = man["tensors"][n], man["tensors"][up]
            assert a["quantizer"] == b["quantizer"], n
            if decl.quantizer_scale:
                assert torch.equal(out_t[a["global_scale"]], out_t[b["global_scale"]]), n
            pairs += 1
    # --- expert policy: shared -> one quantizer spans every expert of a layer; per-expert -> one expert
    for key, q in man["quantizers"].items():
        experts = {expert_of(n) for n in q["members"]}
        if experts == {None}:
            continue
        assert None not in experts, key
        if policy == "per-expert":
            assert len(experts) == 1, key
        else:
            assert len(experts) > 1, key
    # --- index
    files = shard_files(out)
    idx = json.loads((out / INDEX).read_text())
    assert idx["weight_map"] == {t: f for f, ts in files.items() for t in ts}
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out_t.values())
    n_shards = len(files)
    assert sorted(files) == [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    assert not list(out.glob("*.partial"))

    # --- configs
    src_cfg = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == src_cfg
    if default == "block-fp8":  # formats/fp8_block.py, docs/formats.md 1.3 and 5.1
        assert not (out / "hf_quant_config.json").exists()
        excl = qc.pop("ignored_layers")
        assert qc.pop("modules_to_not_convert") == excl
        producer = qc.pop("producer")
        assert qc == {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                      "weight_block_size": [128, 128]}
        qc = {"ignore": excl, "producer": producer}
    elif default == "modelopt":
        hf = json.loads((out / "hf_quant_config.json").read_text())
        assert hf["quantization"]["quant_algo"] == QUANT_ALGO[fmt]
        assert hf["quantization"]["exclude_modules"] == qc["ignore"]
        assert hf["quantization"].get("group_size") == (16 if fmt == "nvfp4" else None)
        ref = convert_hf_quant_config_format(copy.deepcopy(hf))
        for k in ("quant_algo", "ignore", "quant_method", "producer"):
            assert ref[k] == qc[k], k
        assert ref["config_groups"]["group_0"]["weights"] == qc["config_groups"]["group_0"]["weights"]
        assert ref["config_groups"]["group_0"]["targets"] == qc["config_groups"]["group_0"]["targets"]
        assert qc["config_groups"]["group_0"]["input_activations"] is None  # weight-only, by design
    elif fmt == "fp8":  # FP8 in compressed-tensors: channel weights, dynamic per-token activations (formats/fp8.py)
        assert not (out / "hf_quant_config.json").exists()
        g = qc["config_groups"]["group_0"]
        assert (qc["quant_method"], qc["format"], g["format"]) == ("compressed-tensors", "float-quantized",
                                                                    "float-quantized")
        assert g["weights"]["strategy"] == "channel" and g["weights"]["dynamic"] is False
        assert g["input_activations"] == {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                          "dynamic": True}
    else:  # another format in compressed-tensors (MX): exactly its declared spelling (formats/mxfp4.py, mxfp8.py)
        assert not (out / "hf_quant_config.json").exists()
        g, spelled = qc["config_groups"]["group_0"], decl.compressed_tensors
        assert (qc["quant_method"], qc["format"], g["format"]) == ("compressed-tensors", spelled["format"],
                                                                    spelled["format"])
        assert (g["weights"], g["input_activations"]) == (spelled["weights"], spelled["input_activations"])
    assert qc["producer"] == {"name": "shardquant", "version": shardquant.__version__}
    # every module left in high precision is listed and carries no scales; no quantized one is
    ignore = set(qc["ignore"])
    for n in kept:
        t = src_t[n]
        if t.dim() == 2 and t.is_floating_point() and n.endswith(".weight"):
            assert n.removesuffix(".weight") in ignore, n
    for m in ignore:
        assert not any(k.startswith(m + ".weight_scale") for k in out_t), m
    assert not {n.removesuffix(".weight") for n in quantized} & ignore

    # --- non-weight files copied as they are
    for f in COPIED:
        if (src / f).exists():
            assert (out / f).read_bytes() == (src / f).read_bytes(), f
    # README.md is the model card (shardquant/card.py), the source's card below it
    assert (out / "README.md").read_text().endswith("\n## Original model card\n\n" + README)
    return man


# ---------------------------------------------------------------------------------------------
# the matrix: 4 layouts x 2 formats x 2 expert policies

@pytest.mark.parametrize("policy", ["shared", "per-expert"])
@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("model", list(MODELS))
def test_convert_matches_reference(sources, converted, model, fmt, policy):
    out = converted(model, fmt, policy)
    man = check_output(src_of(sources, model, fmt), out, fmt, policy)
    assert all((out / f).exists() for f in COPIED)
    # the fixture really has fused sets straddling source shards
    wm = json.loads((src_of(sources, model, fmt) / INDEX).read_text())["weight_map"]
    assert len(set(wm.values())) >= 4
    straddling = [k for k, q in man["quantizers"].items() if len({wm[n] for n in q["members"]}) > 1]
    if model == "te_grouped" and policy == "per-expert":  # one tensor per quantizer: nothing to straddle
        assert all(len(q["members"]) == 1 for q in man["quantizers"].values())
    else:
        assert straddling, "no quantizer spans two source shards: the fixture tests less than it claims"


def test_expected_groups_qwen3(converted):
    man = json.loads((converted("qwen3_moe", "nvfp4", "shared") / MANIFEST).read_text())
    q = man["quantizers"]
    assert q["model.layers.0.self_attn.qkv_proj"]["members"] == [
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    assert len(q["model.layers.1.mlp.experts.*.gate_up_proj"]["members"]) == 16
    assert len(q["model.layers.1.mlp.experts.*.down_proj"]["members"]) == 8
    pe = json.loads((converted("qwen3_moe", "nvfp4", "per-expert") / MANIFEST).read_text())["quantizers"]
    assert sorted(pe["model.layers.1.mlp.experts.5.gate_up_proj"]["members"]) == [
        "model.layers.1.mlp.experts.5.gate_proj.weight", "model.layers.1.mlp.experts.5.up_proj.weight"]
    ign = json.loads((converted("qwen3_moe", "nvfp4", "shared") / "config.json").read_text())[
        "quantization_config"]["ignore"]
    assert {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(ign)


def test_deepseek_fused_mla_and_mtp_kept(sources, converted):
    out = converted("deepseek_v3", "nvfp4", "per-expert")
    man = json.loads((out / MANIFEST).read_text())
    # modelopt: the MTP layer's MLA projections are excluded by name, which SGLang applies to every layer,
    # so every layer keeps them (shardquant/flavors.py excluded_everywhere); o_proj is quantized
    assert not any("q_a_kv_a_proj" in k or "kv_b_proj" in k for k in man["quantizers"])
    assert "model.layers.1.self_attn.o_proj" in man["quantizers"]
    n_layers = json.loads((sources["deepseek_v3"] / "config.json").read_text())["num_hidden_layers"]
    mtp = f"model.layers.{n_layers}."
    src_names = set(load_dir(sources["deepseek_v3"]))
    mtp_names = {n for n in src_names if n.startswith(mtp)}
    assert len(mtp_names) > 20
    reasons = {e["name"]: e["reason"] for e in man["excluded"]}
    assert mtp_names <= set(reasons)
    assert not any(n.startswith(mtp) for n in man["tensors"])
    assert "MTP" in reasons[f"{mtp}self_attn.q_a_proj.weight"]
    assert "kept in some layer" in reasons["model.layers.1.self_attn.q_a_proj.weight"]
    assert "MTP" in reasons[f"{mtp}mlp.experts.0.gate_proj.weight"]
    ignore = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    for m in ("self_attn.q_a_proj", "self_attn.kv_b_proj", "mlp.experts.0.gate_proj", "mlp.experts.3.down_proj",
              "mlp.shared_experts.up_proj", "eh_proj", "shared_head.head"):
        assert mtp + m in ignore, m
    out_t = load_dir(out)
    assert not any(k.startswith(mtp) and "weight_scale" in k for k in out_t)


def test_te_grouped_names(converted):
    out = converted("te_grouped", "nvfp4", "shared")
    man = json.loads((out / MANIFEST).read_text())
    fc1 = man["quantizers"]["decoder.layers.0.mlp.experts.linear_fc1.weight*"]
    assert fc1["members"] == [f"decoder.layers.0.mlp.experts.linear_fc1.weight{e}" for e in range(4)]
    e = man["tensors"]["decoder.layers.0.mlp.experts.linear_fc1.weight2"]
    assert e["scale"] == "decoder.layers.0.mlp.experts.linear_fc1.weight_scale2"
    assert "output_layer" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]


# ---------------------------------------------------------------------------------------------
# determinism, and the CLI as a mirror of convert()

def test_deterministic_and_cli_mirrors_api(sources, converted, tmp_path):
    src = sources["qwen3_moe"]
    first = converted("qwen3_moe", "nvfp4", "shared")
    again = tmp_path / "again"
    convert(str(src), again, "nvfp4", expert_policy="shared")
    via_cli = tmp_path / "cli"
    r = cli("convert", src, "--format", "nvfp4", "-o", via_cli, "-q")
    assert r.exit_code == 0, r.output
    assert r.output == ""  # -q: nothing at all
    ref = file_digests(first)
    assert {"config.json", "hf_quant_config.json", INDEX, MANIFEST} <= set(ref)
    assert file_digests(again) == ref
    assert file_digests(via_cli) == ref  # same source path: the manifest too


def test_cli_per_expert_fp8_matches_api(sources, converted, tmp_path):
    out = tmp_path / "o"
    r = cli("convert", sources["mixtral"], "--format", "fp8", "--expert-policy", "per-expert", "-o", out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.stderr
    assert file_digests(out) == file_digests(converted("mixtral", "fp8", "per-expert"))


def test_two_pass_gives_identical_bytes(sources, converted, tmp_path):
    out = tmp_path / "o"
    res = convert(str(sources["deepseek_v3"]), out, "nvfp4", expert_policy="shared", memory_budget=10_000)
    assert any(g.two_pass for g in res.plan.groups) and not all(g.two_pass for g in res.plan.groups)
    man = json.loads((out / MANIFEST).read_text())
    assert any(q["two_pass"] for q in man["quantizers"].values())
    ref = converted("deepseek_v3", "nvfp4", "shared")
    for f in file_digests(ref):
        if f != MANIFEST:
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------
# input variants

@pytest.mark.parametrize("dtype", ["F16", "F32"])
@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_single_file_f16_f32(tmp_path, dtype, fmt):
    model = (testing.TILED["qwen3_moe"] if formats.declared(fmt).block else testing.qwen3_moe)()
    model.specs = [s for s in model.specs if not s[0].startswith("model.layers.1.")]
    model.config["num_hidden_layers"] = 1
    model.specs = [(n, dtype if d == "BF16" else d, s) for n, d, s in model.specs]
    src = testing.write_checkpoint(tmp_path / "src", model, single_file=True, seed=3,
                                   extra_files={"README.md": README})
    assert sorted(p.name for p in src.glob("*.safetensors")) == ["model.safetensors"]
    assert not (src / INDEX).exists()
    out = tmp_path / "out"
    r = cli("convert", src, "--format", fmt, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    check_output(src, out, fmt, "shared")
    assert load_dir(out)["model.layers.0.input_layernorm.weight"].dtype == getattr(
        torch, {"F16": "float16", "F32": "float32"}[dtype])


def test_max_shard_size(sources, converted, tmp_path):
    out = tmp_path / "o"
    limit = 30_000
    r = cli("convert", sources["qwen3_moe"], "--format", "nvfp4", "-o", out, "--max-shard-size", "30KB", "-q")
    assert r.exit_code == 0, r.output
    files = shard_files(out)
    assert len(files) >= 4
    tensors = load_dir(out)
    oversized = 0
    for f, names in files.items():
        data = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        if len(names) == 1 and data > limit:
            oversized += 1  # one tensor larger than the limit gets a shard of its own
        else:
            assert data <= limit, f
    assert oversized >= 1  # embed_tokens / lm_head (256 x 64 bf16 = 32 KiB) exceed 30 KB
    check_output(sources["qwen3_moe"], out, "nvfp4", "shared")
    # same tensors, same bytes as with one big shard
    ref = load_dir(converted("qwen3_moe", "nvfp4", "shared"))
    assert set(ref) == set(tensors)
    assert all(raw_bytes(ref[k]) == raw_bytes(tensors[k]) for k in ref)


# ---------------------------------------------------------------------------------------------
# dry run, plan, inspect

def test_dry_run_writes_nothing(sources, tmp_path):
    out = tmp_path / "never"
    r = cli("convert", sources["deepseek_v3"], "--format", "nvfp4", "-o", out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert not out.exists()
    assert "estimated peak memory" in r.stdout
    assert "model.layers.1.self_attn.o_proj" in r.stdout
    assert "kept in high precision in every layer" in r.output  # the MLA projections (modelopt)


def test_plan_prints_table_and_totals(sources, converted):
    r = cli("plan", sources["qwen3_moe"], "--format", "nvfp4", "--verbose")
    assert r.exit_code == 0, r.output
    man = json.loads((converted("qwen3_moe", "nvfp4", "shared") / MANIFEST).read_text())
    lines = r.stdout.splitlines()
    assert lines[0] == "modelopt flavor; format nvfp4"
    assert lines[1].split()[:3] == ["quantizer", "format", "members"]
    end = next(i for i, ln in enumerate(lines) if ln.startswith("total:"))
    rows = {ln.split()[0]: (ln.split()[1], int(ln.split()[2])) for ln in lines[2:end]}
    assert "source bytes read: 1.00x the source (CPU conversion)" in lines
    assert rows == {k: (q["format"], len(q["members"])) for k, q in man["quantizers"].items()}
    total = next(ln for ln in lines if ln.startswith("total:"))
    assert f"total: {len(man['quantizers'])} quantizers, {len(man['tensors'])} tensors quantized, " \
           f"{len(man['excluded'])} kept" in total
    assert any(re.fullmatch(r"estimated peak memory: \d+ MB", ln) for ln in lines)  # decimal units, as every message


def test_inspect_summarises(converted):
    out = converted("mixtral", "fp8", "shared")
    man = json.loads((out / MANIFEST).read_text())
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    assert "format fp8 (compressed-tensors flavor), expert policy shared" in r.stdout
    assert f"{len(man['quantizers'])} quantizers over {len(man['tensors'])} tensors; " \
           f"{len(man['excluded'])} tensors kept" in r.stdout
    assert "model.layers.0.block_sparse_moe.experts.*.w13" in r.stdout
    assert re.search(r"kept: +\d+  router", r.stdout)


# ---------------------------------------------------------------------------------------------
# hub sources (in a subprocess: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import)

def _hub_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def _run_cli(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardquant.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_hub_offline_empty_cache_is_one_clean_line(tmp_path):
    home = tmp_path / "hf"
    home.mkdir()
    p = _run_cli(["convert", "org/name", "--format", "nvfp4", "-o", tmp_path / "out"], tmp_path, _hub_env(home))
    assert p.returncode != 0
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1, p.stdout + p.stderr
    assert lines[0].startswith("error: org/name")
    assert "offline" in lines[0].lower() and "cache" in lines[0].lower()
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_hub_cache_snapshot_records_repo_and_revision(sources, converted, tmp_path):
    """A hub cache laid out as huggingface_hub writes it: blobs, symlinked snapshot files, refs/main."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--name"
    commit = hashlib.sha1(b"tiny").hexdigest()
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(sources["mixtral"].iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (blobs / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    out = tmp_path / "out"
    p = _run_cli(["convert", "org/name", "--format", "fp8", "--expert-policy", "per-expert", "-o", out, "-q"],
                 tmp_path, _hub_env(home))
    assert p.returncode == 0, p.stdout + p.stderr
    man = json.loads((out / MANIFEST).read_text())
    hub_files = man["source"].pop("files")
    assert man["source"] == {"path": None, "repo": "org/name", "revision": commit}
    # each source file's hash was checked against the hub's own (the blob name is its LFS oid)
    assert hub_files == {f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size,
                                  "checked_against_hub": True} for f in sorted(sources["mixtral"].iterdir())}
    ref = converted("mixtral", "fp8", "per-expert")
    assert set(file_digests(ref)) == set(file_digests(out))
    for f in file_digests(ref):
        if f not in (MANIFEST, "README.md"):  # they name the source; the rest is the same bytes
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert "base_model:\n- org/name\n" in (out / "README.md").read_text()
    assert not any((out / f).is_symlink() for f in file_digests(out))


def test_one_options_record_is_what_convert_plan_and_a_zoo_job_take(tmp_path):
    """plan.py Options: convert and prepare take it whole or its fields by name (same bytes either
    way); a misspelt choice is a TypeError before anything is written; a zoo job's choices are one."""
    import dataclasses

    from shardquant import batch
    from shardquant.convert import convert
    from shardquant.plan import Options, prepare

    src = testing.write_checkpoint(tmp_path / "src", testing.qwen3_moe(hidden=64, layers=1, experts=4, inter=32))
    opts = Options(format="fp8", expert_policy="per-expert", max_shard_size=50_000)
    convert(str(src), tmp_path / "a", options=opts, device="cpu")
    convert(str(src), tmp_path / "b", "fp8", expert_policy="per-expert", max_shard_size=50_000, device="cpu")
    convert(str(src), tmp_path / "c", "nvfp4", options=opts, device="cpu")  # fmt over the record's format
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b") != files(tmp_path / "c")
    assert len([n for n in files(tmp_path / "a") if n.endswith(".safetensors")]) > 1  # max_shard_size reached it
    p = prepare(str(src), options=opts)
    assert (p.format, p.expert_policy) == ("fp8", "per-expert")
    with pytest.raises(TypeError, match="expert_polciy"):
        convert(str(src), tmp_path / "d", "fp8", expert_polciy="per-expert", device="cpu")
    assert not (tmp_path / "d").exists()
    job = batch.Job("m", str(src), "mxfp4", str(tmp_path / "e"), flavor="compressed-tensors", scale_search="mse")
    assert dataclasses.asdict(job.options) == dataclasses.asdict(Options(
        format="mxfp4", flavor="compressed-tensors", scale_search="mse"))
