"""Quantized sources converted (issue 14): a block-FP8 checkpoint (DeepSeek-V3 layout,
shardquant/testing_sources.py) is decoded tile by tile as it is read (shardquant/encoding.py
DecodedTensor) and converted to every format of the registry. The reference is independent: the
checkpoint dequantized to a BF16 copy with torch, as DeepSeek's own cast does it (E4M3 code times its
tile's F32 scale in fp32, rounded once to BF16), written to disk and converted by the same command.

- Every output tensor equals, byte for byte, the one converted from the BF16 copy (the same names, so
  no source scale tensor reaches the output; the scales, the kept tensors, the shapes); the
  output's config.json is the copy's (the source's quantization_config replaced).
- The bytes read are the stored ones (FP8 codes and scales, once), every source file is hashed.
- verify --source passes, measuring SQNR against the decoded source.
- Encodings not converted yet are refused before anything is written: one line naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

from shardquant import convert as conv
from shardquant import formats
from shardquant.errors import SourceError
from shardquant.source import scan
from shardquant.st import read_raw
from shardquant.testing import Model, write_checkpoint
from shardquant.testing_sources import deepseek_v3_fp8, gpt_oss, kimi_k3
from shardquant.verify import verify


def _bf16_copy(fx, root: Path) -> Path:
    """The fixture dequantized to BF16 with torch: scale tensors dropped, quantization_config removed."""
    specs, arrays = [], {}
    names = {n for n, _, _ in fx.model.specs}
    for name, dtype, shape in fx.model.specs:
        if name.endswith(".weight_scale_inv"):
            continue
        a = fx.arrays[name]
        if dtype == "F8_E4M3":
            codes = torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
            scale = torch.from_numpy(fx.arrays[name + "_scale_inv"].astype(np.float32))
            assert name + "_scale_inv" in names
            tiles = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
            a = (codes.float() * tiles).to(torch.bfloat16).view(torch.uint16).numpy()
            dtype = "BF16"
        specs.append((name, dtype, shape))
        arrays[name] = a
    cfg = {k: v for k, v in fx.config.items() if k != "quantization_config"}
    return write_checkpoint(root, Model(specs, cfg), shard_bytes=fx.shard_bytes(),
                            data=lambda spec, rng: arrays[spec[0]])


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    fx = deepseek_v3_fp8()
    root = tmp_path_factory.mktemp("v3")
    return fx, fx.write(root / "fp8"), _bf16_copy(fx, root / "bf16")


def _tensors(out: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, bytes) of every tensor of an output, from the files as written."""
    return {n: (t.dtype, t.shape, read_raw(t).tobytes()) for n, t in scan(out).tensors.items()}


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_block_fp8_source_converts_to_the_bytes_of_its_bf16_copy(v3, fmt, tmp_path):
    fx, fp8, bf16 = v3
    r = conv.convert(str(fp8), tmp_path / "from-fp8", fmt, device="cpu")
    ref = conv.convert(str(bf16), tmp_path / "from-bf16", fmt, device="cpu")
    got, want = _tensors(tmp_path / "from-fp8"), _tensors(tmp_path / "from-bf16")
    assert got.keys() == want.keys()
    assert [k for k in got if got[k] != want[k]] == []
    assert json.loads((tmp_path / "from-fp8" / "config.json").read_text()) == \
        json.loads((tmp_path / "from-bf16" / "config.json").read_text())
    man = json.loads((tmp_path / "from-fp8" / "scale_manifest.json").read_text())
    ref_man = json.loads((tmp_path / "from-bf16" / "scale_manifest.json").read_text())
    assert man["quantizers"] == ref_man["quantizers"]
    # what was read: the stored bytes, each once (FP8 codes and their scales), not the decoded BF16;
    # every source file hashed from them
    assert r.bytes_read == sum(t.nbytes for t in scan(fp8).tensors.values()) < ref.bytes_read
    files = man["source"]["files"]
    assert {p.name for p in fp8.iterdir()} <= set(files)
    assert all(files[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() for p in fp8.iterdir())


def test_verify_measures_against_the_decoded_source(v3, tmp_path):
    fx, fp8, _ = v3
    conv.convert(str(fp8), tmp_path / "out", "nvfp4", device="cpu")
    rep = verify(tmp_path / "out", str(fp8), device="cpu")
    assert rep.ok, rep.violations[:3]
    fp8_weights = {n for n, d, _ in fx.model.specs if d == "F8_E4M3"}
    measured = {t.name for t in rep.tensors}
    assert len(measured) == rep.modules and measured <= fp8_weights  # each against its decoded source
    assert all(t.sqnr_db > 15 for t in rep.tensors if t.signal > 0)


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_gpt_oss_mxfp4_experts_are_refused_naming_the_tensor_and_the_engines(fmt, tmp_path):
    """No engine's gpt-oss loader takes its experts in another encoding than the source's MXFP4
    (docs/formats.md "gpt-oss: what the engines load"): every format is refused, nothing written."""
    src = gpt_oss().write(tmp_path / "src")
    with pytest.raises(SourceError, match=r"^tensor '.+experts\.gate_up_proj_blocks' \(.+\.safetensors\): source holds "
                                          r"fused 3-D MXFP4 experts .*engines' gpt-oss loaders .*'gpt-oss: what the engines load'"):
        conv.convert(str(src), tmp_path / "out", fmt, device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_gpt_oss_bf16_experts_stay_whole_and_are_excluded_for_the_engines(fmt, tmp_path):
    """gpt-oss with BF16 experts: attention is converted; the 3-D experts are written whole, byte for byte
    (a per-expert name would be skipped by the engines' gpt-oss loaders), and their module is excluded so
    the engines build an unquantized MoE for them; verify (with the engine rules) passes."""
    from shardquant.testing_sources import gpt_oss_bf16

    fx = gpt_oss_bf16()
    src = fx.write(tmp_path / "src")
    conv.convert(str(src), tmp_path / "out", fmt, device="cpu")
    rep = verify(tmp_path / "out", str(src), device="cpu")
    assert rep.ok, rep.violations[:3]
    got = _tensors(tmp_path / "out")
    assert not any(re.search(r"experts\.\d+\.", n) for n in got)
    experts = [n for n, _, _ in fx.model.specs if re.fullmatch(r".*\.experts\.(gate_up|down)_proj(_bias)?", n)]
    assert len(experts) == 4 * fx.config["num_hidden_layers"]
    assert all(got[n][2] == fx.arrays[n].tobytes() for n in experts)
    assert set(got) - set(fx.arrays)  # something was quantized: its scales are new tensors
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    hq = tmp_path / "out" / "hf_quant_config.json"
    qc = json.loads(hq.read_text())["quantization"] if hq.exists() else cfg["quantization_config"]
    excluded = json.dumps(qc)
    for L in range(fx.config["num_hidden_layers"]):
        assert f"model.layers.{L}.mlp.experts" in excluded


def test_plan_says_gpt_oss_experts_are_kept_whole(tmp_path):
    from click.testing import CliRunner

    from shardquant.cli import main
    from shardquant.testing_sources import gpt_oss_bf16

    src = gpt_oss_bf16().write(tmp_path / "src")
    r = CliRunner().invoke(main, ["plan", str(src), "--format", "nvfp4"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("source stores")]
    assert len(lines) == 2 and all("kept whole in high precision" in x for x in lines), lines
    assert "experts.0." not in r.output


def test_bf16_rounding_matches_ml_dtypes_on_edges_and_random_values():
    import ml_dtypes

    from shardquant.encoding import f32_to_bf16

    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38,
                      1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], np.float32)  # ties to even both ways
    bits = np.concatenate([edges.view(np.uint32), rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)])
    x = bits.view(np.float32)
    got = f32_to_bf16(x)
    with np.errstate(invalid="ignore"):  # NaN inputs
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(got[finite], want[finite])
    assert np.isnan((got[~finite].astype(np.uint32) << 16).view(np.float32)).all()  # NaN stays NaN


def test_plan_says_how_the_source_is_stored_and_what_happens_to_it(v3):
    from click.testing import CliRunner

    from shardquant.cli import main

    fx, fp8, _ = v3
    r = CliRunner().invoke(main, ["plan", str(fp8), "--format", "nvfp4"])
    assert r.exit_code == 0, r.output
    n = sum(1 for _, d, _ in fx.model.specs if d == "F8_E4M3")
    stored = sum(fx.arrays[k].nbytes for k, d, _ in fx.model.specs if d == "F8_E4M3" or k.endswith("_scale_inv"))
    line = next(x for x in r.output.splitlines() if x.startswith("source stored quantized"))
    assert f"{n} weights block-FP8 128x128, F32 scales ({stored / 1e6:.2f} MB)" in line
    assert f"their {n} scale tensors are not copied" in line


def test_a_refused_source_is_one_line_at_the_command_line(tmp_path):
    import subprocess
    import sys

    src = gpt_oss().write(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "shardquant", "convert", str(src), "-o", str(tmp_path / "out"),
                        "--format", "nvfp4"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: tensor ") and "MXFP4" in line
    assert not (tmp_path / "out").exists()


def test_decoding_in_bands_gives_the_bf16_copy(v3, monkeypatch):
    """A weight is decoded a band of tile rows at a time (DECODE_BAND_ELEMENTS); bands of one tile
    row give every decoded weight's bytes exactly as the BF16 copy holds them."""
    from shardquant import encoding
    from shardquant.source import open_checkpoint, with_decoded

    _, fp8, bf16 = v3
    monkeypatch.setattr(encoding, "DECODE_BAND_ELEMENTS", 1)
    ck, ref = with_decoded(open_checkpoint(str(fp8))), scan(bf16)
    decoded = [t for t in ck.tensors.values() if getattr(t, "parts", None)]
    assert decoded and any(t.shape[0] > 128 for t in decoded)
    for t in decoded:
        assert read_raw(t).tobytes() == read_raw(ref.tensors[t.name]).tobytes(), t.name


# ---------------------------------------------------------------------------------------------
# MXFP4 sources (Kimi-K3 layout: compressed-tensors weight_packed + E8M0 weight_scale)


@pytest.fixture(scope="module")
def k3(tmp_path_factory):
    fx = kimi_k3()
    return fx, fx.write(tmp_path_factory.mktemp("k3") / "src")


def test_mxfp4_source_casts_to_nvfp4_keeping_every_code(k3, tmp_path):
    """Every in-range block keeps the source's packed bytes, and its E4M3 scale times the global scale
    is exactly the source block's 2^(b - 127) (ml_dtypes decodes the E4M3 codes); the one planted block
    20 binades below its group's largest is re-quantized, counted in the manifest; verify passes."""
    import ml_dtypes

    fx, src = k3
    conv.convert(str(src), tmp_path / "out", "nvfp4", device="cpu")
    out = scan(tmp_path / "out").tensors
    man = json.loads((tmp_path / "out" / "scale_manifest.json").read_text())
    planted = {(name, row, block) for name, _, row, block in fx.planted["out_of_range"]}
    cast = {m: q for q in man["quantizers"].values() if "cast" in q for m in q["members"]}
    packed = [n for n, d, _ in fx.model.specs if n.endswith(".weight_packed")]
    assert packed and set(cast) == {n.replace("_packed", "") for n in packed}
    kept_blocks = 0
    for n in packed:
        name = n.replace("_packed", "")
        src_codes, src_e8m0 = fx.arrays[n].view(np.uint8), fx.arrays[name + "_scale"].view(np.uint8)
        codes, e4m3 = read_raw(out[name]).view(np.uint8), read_raw(out[name + "_scale"]).view(np.uint8)
        s2 = read_raw(out[name + "_scale_2"]).reshape(-1)[0]
        assert s2 == np.float32(cast[name]["global_scale"]) and np.log2(s2) == np.round(np.log2(s2))
        scale = e4m3.view(ml_dtypes.float8_e4m3fn).astype(np.float64) * np.float64(s2)  # [out, in/16]
        rows, nb = src_e8m0.shape
        for r in range(rows):
            for b in range(nb):
                same = np.array_equal(codes[r, 16 * b:16 * b + 16], src_codes[r, 16 * b:16 * b + 16])
                exact = (scale[r, 2 * b] == scale[r, 2 * b + 1] == np.ldexp(1.0, int(src_e8m0[r, b]) - 127))
                if (name, r, b) in planted:
                    assert not (same and exact), (name, r, b)
                else:
                    live = (src_codes[r, 16 * b:16 * b + 16] & 0x77).any()
                    assert same and (exact or not live), (name, r, b)
                    kept_blocks += 1
    assert kept_blocks > 1000
    assert sum(q["cast"]["requantized_blocks"] for q in man["quantizers"].values() if "cast" in q) == len(planted)
    rep = verify(tmp_path / "out", str(src), device="cpu")
    assert rep.ok, rep.violations[:3]


def test_mxfp4_source_into_a_format_without_a_cast_is_decoded_exactly(k3, tmp_path):
    """fp8: the MXFP4 weights decoded (E2M1 x 2^(b - 127), exact in BF16) and re-quantized; the same
    bytes as converting a BF16 copy decoded by testing_sources.mx_reference; the plan says so."""
    import ml_dtypes

    from shardquant.testing_sources import mx_reference

    fx, src = k3
    specs, arrays = [], {}
    for name, dtype, shape in fx.model.specs:
        if name.endswith(".weight_scale") and name.replace("_scale", "_packed") in fx.arrays:
            continue
        a = fx.arrays[name]
        if name.endswith(".weight_packed"):
            ref = mx_reference(a, fx.arrays[name.replace("_packed", "_scale")])
            a = ref.astype(ml_dtypes.bfloat16).view(np.uint16)
            name, dtype, shape = name.replace("_packed", ""), "BF16", ref.shape
        specs.append((name, dtype, shape))
        arrays[name] = a
    qc_free = {k: v for k, v in fx.config.items() if k != "quantization_config"}
    qc_free["text_config"] = {k: v for k, v in qc_free["text_config"].items() if k != "quantization_config"}
    copy = write_checkpoint(tmp_path / "bf16", Model(specs, qc_free), shard_bytes=fx.shard_bytes(),
                            data=lambda spec, rng: arrays[spec[0]])
    r = conv.convert(str(src), tmp_path / "a", "fp8", device="cpu")
    conv.convert(str(copy), tmp_path / "b", "fp8", device="cpu")
    assert _tensors(tmp_path / "a") == _tensors(tmp_path / "b")
    assert any("mxfp4 decoded and re-quantized to fp8" in w for w in r.plan.warnings)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "quantization_config" not in cfg["text_config"]


@pytest.mark.parametrize("count", [20, 30])  # before and after the quantizer whose cast re-quantizes a block
def test_killed_cast_resumes_byte_identical(k3, tmp_path, count):
    """A conversion from an MXFP4 source killed between shards resumes to the same bytes, the cast's
    re-quantized block count of finished quantizers included (kept in the journal)."""
    from test_resume import files, kill_at  # the same child and kill points (tests/test_resume.py)

    _, src = k3
    clean = tmp_path / "clean"
    conv.convert(str(src), clean, "nvfp4", device="cpu", max_shard_size=40_000)
    man = json.loads((clean / "scale_manifest.json").read_text())
    assert sum(q["cast"]["requantized_blocks"] for q in man["quantizers"].values() if "cast" in q) == 1
    out = tmp_path / "out"
    kill_at(src, out, "after-shard", "SHARD", count)
    r = conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert r.resumed >= count
    assert files(out) == files(clean)


# ---------------------------------------------------------------------------------------------
# Every fixture that converts, into every format of the registry


CONVERTED = ("deepseek_v3", "deepseek_v4", "kimi_k3")


def _decoded_copy(fx, root: Path) -> Path:
    """The fixture as a BF16 checkpoint from its float64 references (testing_sources.py): each quantized
    weight under its logical name, its scale tensors gone, no quantization_config anywhere."""
    import ml_dtypes

    quantized = {n: e for n, e in fx.expected.items() if e.scales}
    drop = {t for e in quantized.values() for t in e.data + e.scales}
    first = {e.data[0]: n for n, e in quantized.items()}
    specs, arrays = [], {}
    for name, dtype, shape in fx.model.specs:
        if name in first:
            logical = first[name]
            ref = fx.reference[logical]
            specs.append((logical, "BF16", ref.shape))
            arrays[logical] = ref.astype(ml_dtypes.bfloat16).view(np.uint16)
        elif name not in drop:
            specs.append((name, dtype, shape))
            arrays[name] = fx.arrays[name]
    cfg = {k: v for k, v in fx.config.items() if k != "quantization_config"}
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k != "quantization_config"}
    return write_checkpoint(root, Model(specs, cfg), shard_bytes=fx.shard_bytes(), data=lambda spec, rng: arrays[spec[0]])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from shardquant.testing_sources import SOURCES

    out = {}
    for name in CONVERTED:
        fx = SOURCES[name]()
        root = tmp_path_factory.mktemp(name)
        out[name] = (fx, fx.write(root / "src"), _decoded_copy(fx, root / "bf16"))
    return out


@pytest.mark.parametrize("fmt", formats.FORMATS)
@pytest.mark.parametrize("name", CONVERTED)
def test_every_quantized_source_into_every_format(sources, name, fmt, tmp_path):
    """verify --source passes (SQNR against the decoded source, a cast's record); quantizers that are
    not a cast hold exactly the bytes converting the decoded BF16 copy gives (exact where the source
    decodes exactly: E8M0 scales, MXFP4; V3's F32 scales round once, as its copy does)."""
    fx, src, copy = sources[name]
    r = conv.convert(str(src), tmp_path / "a", fmt, device="cpu")
    conv.convert(str(copy), tmp_path / "b", fmt, device="cpu")
    rep = verify(tmp_path / "a", str(src), device="cpu")
    assert rep.ok, rep.violations[:3]
    got, want = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert got.keys() == want.keys()
    man = json.loads((tmp_path / "a" / "scale_manifest.json").read_text())
    cast = {t for q in man["quantizers"].values() if "cast" in q for m in q["members"]
            for t in man["tensors"][m].values() if t}
    assert bool(cast) == any(g.cast for g in r.plan.groups)
    assert [k for k in got if k not in cast and got[k] != want[k]] == []


# ---------------------------------------------------------------------------------------------
# Fused 3-D experts stored [E, out, in] (transformers-5 layout): one 2-D slice per expert


def _split_copy(fx, root: Path) -> Path:
    """The fixture with every fused [E, out, in] expert tensor written as per-expert 2-D tensors
    (gate rows then up rows of gate_up_proj), split with NumPy from the stored bytes."""
    specs, arrays = [], {}
    for name, dtype, shape in fx.model.specs:
        a = fx.arrays[name]
        if len(shape) == 3 and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            base, proj = name.rsplit(".", 1)
            for e in range(shape[0]):
                if proj == "gate_up_proj":
                    half = shape[1] // 2
                    for k, member in enumerate(("gate_proj", "up_proj")):
                        n = f"{base}.{e}.{member}.weight"
                        specs.append((n, dtype, (half, shape[2])))
                        arrays[n] = np.ascontiguousarray(a[e, k * half:(k + 1) * half])
                else:
                    n = f"{base}.{e}.{proj}.weight"
                    specs.append((n, dtype, tuple(shape[1:])))
                    arrays[n] = np.ascontiguousarray(a[e])
            continue
        specs.append((name, dtype, shape))
        arrays[name] = a
    return write_checkpoint(root, Model(specs, dict(fx.config)), shard_bytes=fx.shard_bytes(),
                            data=lambda spec, rng: arrays[spec[0]])


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    from shardquant.testing_sources import fused_experts

    fx = fused_experts()
    root = tmp_path_factory.mktemp("fused")
    return fx, fx.write(root / "src"), _split_copy(fx, root / "split")


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_fused_experts_convert_per_expert_as_their_split_copy(fused, fmt, tmp_path):
    """Each expert of `mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] is planned and
    written as `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj`, the names vLLM's expert mapping
    loads: the output is byte for byte the conversion of the per-expert copy, every source byte is
    read once and hashed, and verify --source passes."""
    from shardquant.errors import PlanError

    fx, src, split = fused
    try:
        r = conv.convert(str(src), tmp_path / "a", fmt, device="cpu")
    except PlanError as e:  # fp8-block: these small experts are not whole 128x128 tiles
        with pytest.raises(PlanError) as same:
            conv.convert(str(split), tmp_path / "b", fmt, device="cpu")
        assert str(same.value) == str(e) and "128x128" in str(e)
        return
    conv.convert(str(split), tmp_path / "b", fmt, device="cpu")
    assert _tensors(tmp_path / "a") == _tensors(tmp_path / "b")
    assert any(".experts.*.gate_up_proj" in g.key and len(g.members) == 2 * fx.config["num_experts"]
               for g in r.plan.groups)
    assert r.bytes_read == sum(t.nbytes for t in scan(src).tensors.values())
    files = json.loads((tmp_path / "a" / "scale_manifest.json").read_text())["source"]["files"]
    assert all(files[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir())
    rep = verify(tmp_path / "a", str(src), device="cpu")
    assert rep.ok, rep.violations[:3]


def _split_in_out_copy(fx, root: Path) -> Path:
    """Llama 4's [E, in, out] experts as per-expert [out, in] tensors (gate = the first half of the
    output features), transposed with NumPy from the stored bytes."""
    specs, arrays = [], {}
    for name, dtype, shape in fx.model.specs:
        a = fx.arrays[name]
        if len(shape) == 3 and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            base, proj = name.rsplit(".", 1)
            out = shape[2]
            members = (("gate_proj", 0, out // 2), ("up_proj", out // 2, out)) if proj == "gate_up_proj" else ((proj, 0, out),)
            for e in range(shape[0]):
                for member, lo, hi in members:
                    n = f"{base}.{e}.{member}.weight"
                    specs.append((n, dtype, (hi - lo, shape[1])))
                    arrays[n] = np.ascontiguousarray(a[e][:, lo:hi].T)
            continue
        specs.append((name, dtype, shape))
        arrays[name] = a
    return write_checkpoint(root, Model(specs, dict(fx.config)), shard_bytes=fx.shard_bytes(),
                            data=lambda spec, rng: arrays[spec[0]])


@pytest.mark.parametrize("budget", [None, 1])  # a group held whole; every group read twice (over the budget)
def test_llama4_experts_convert_per_expert_as_their_transposed_copy(budget, tmp_path):
    """Llama 4's `feed_forward.experts.gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H] become
    per-expert [out, in] weights under `experts.{e}.gate_proj` / `up_proj` / `down_proj` (vLLM's Llama 4
    loader maps these names: docs/formats.md): the bytes of converting the transposed copy. Gate and up
    view one slice of each expert, read once per pass (a group over the memory budget: twice)."""
    from shardquant.testing_sources import llama4

    fx = llama4()
    src, split = fx.write(tmp_path / "src"), _split_in_out_copy(fx, tmp_path / "split")
    kw = {} if budget is None else {"memory_budget": budget}
    r = conv.convert(str(src), tmp_path / "a", "nvfp4", device="cpu", **kw)
    conv.convert(str(split), tmp_path / "b", "nvfp4", device="cpu")
    assert _tensors(tmp_path / "a") == _tensors(tmp_path / "b")
    assert (budget is not None) == all(g.two_pass for g in r.plan.groups)
    stored = sum(t.nbytes for t in scan(src).tensors.values())
    assert r.bytes_read - r.reread_bytes == stored
    assert r.reread_bytes == (0 if budget is None else sum(g.source_bytes for g in r.plan.groups))
    rep = verify(tmp_path / "a", str(src), device="cpu")
    assert rep.ok, rep.violations[:3]


def test_plan_says_what_becomes_of_fused_experts(fused):
    from click.testing import CliRunner

    from shardquant.cli import main

    fx, src, _ = fused
    r = CliRunner().invoke(main, ["plan", str(src), "--format", "nvfp4"])
    assert r.exit_code == 0, r.output
    E, L = fx.config["num_experts"], fx.config["num_hidden_layers"]
    assert (f"source stores {L} fused 3-D expert tensors (plain BF16 3-D, {E} experts [E, out, in], gate/up halves): "
            f"planned and written as {2 * E * L} per-expert weights") in r.output


def test_verify_proves_a_cast_kept_every_code(k3, tmp_path):
    """verify --source compares a cast's codes with the source's block by block: the count that
    differ must be the manifest's re-quantized blocks. One code byte changed in an in-range block of
    the output is found and named."""
    fx, src = k3
    out = tmp_path / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu")
    assert verify(out, str(src), device="cpu").ok
    man = json.loads((out / "scale_manifest.json").read_text())
    key, q = next((k, q) for k, q in man["quantizers"].items() if "cast" in q and q["cast"]["requantized_blocks"] == 0)
    w = scan(out).tensors[q["members"][0]]
    with open(w.file, "r+b") as f:  # a live block's first byte, nibbles swapped
        raw = read_raw(w).view(np.uint8).reshape(-1)
        i = int(np.flatnonzero((raw & 0x77) != ((raw >> 4) & 0x77))[0])
        f.seek(w.offset + i)
        f.write(bytes([((raw[i] & 0xF) << 4) | (raw[i] >> 4)]))
    rep = verify(out, str(src), device="cpu")
    said = [v for v in rep.violations if v.rule == "manifest" and v.name == key]
    assert said and "1 block(s) of codes differ from the source's, the manifest says 0" in said[0].detail


def test_inspect_says_what_a_cast_kept(k3, tmp_path):
    from click.testing import CliRunner

    from shardquant.cli import main

    fx, src = k3
    conv.convert(str(src), tmp_path / "out", "nvfp4", device="cpu")
    man = json.loads((tmp_path / "out" / "scale_manifest.json").read_text())
    n = sum("cast" in q for q in man["quantizers"].values())
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (f"cast: {n} quantizers kept the source's mxfp4 codes; {len(fx.planted['out_of_range'])} block out of "
            "the scale range re-quantized") in r.output


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_block_fp8_groups_over_the_memory_budget_are_read_once(v3, fmt, tmp_path):
    """A block-FP8 quantizer larger than --memory-budget takes its amax from the tile scales and the
    tiles they point to (decode.block_fp8_amax): the same bytes as holding it whole, every source byte
    read once (none a second time), and the plan says so."""
    fx, fp8, _ = v3
    whole = conv.convert(str(fp8), tmp_path / "a", fmt, device="cpu")
    r = conv.convert(str(fp8), tmp_path / "b", fmt, device="cpu", memory_budget=1)
    assert all(g.two_pass and g.amax_from_scales for g in r.plan.groups)
    assert r.plan.read_factor == 1.0 and r.reread_bytes == 0
    assert r.bytes_read == whole.bytes_read == sum(t.nbytes for t in scan(fp8).tensors.values())
    assert _tensors(tmp_path / "a") == _tensors(tmp_path / "b")
    assert any("its amax from the source's block scales" in w for w in r.plan.warnings)
    a = json.loads((tmp_path / "a" / "scale_manifest.json").read_text())["quantizers"]
    b = json.loads((tmp_path / "b" / "scale_manifest.json").read_text())["quantizers"]
    assert {k: q["amax"] for k, q in a.items()} == {k: q["amax"] for k, q in b.items()}


def test_mx_source_requantize_decodes_instead_of_casting(sources, tmp_path):
    """--mx-source requantize: MXFP4 weights decoded exactly and re-quantized by round to nearest, the
    bytes of converting the decoded BF16 copy, no cast record; the plan says why."""
    fx, src, copy = sources["kimi_k3"]
    r = conv.convert(str(src), tmp_path / "a", "nvfp4", device="cpu", mx_source="requantize")
    conv.convert(str(copy), tmp_path / "b", "nvfp4", device="cpu")
    assert not any(g.cast for g in r.plan.groups)
    assert any("--mx-source requantize" in w for w in r.plan.warnings)
    assert _tensors(tmp_path / "a") == _tensors(tmp_path / "b")
    man = json.loads((tmp_path / "a" / "scale_manifest.json").read_text())
    assert not any("cast" in q for q in man["quantizers"].values())
    assert verify(tmp_path / "a", str(src), device="cpu").ok
    from shardquant.errors import PlanError

    with pytest.raises(PlanError, match="--mx-source must be one of cast, requantize"):
        conv.convert(str(src), tmp_path / "c", "nvfp4", device="cpu", mx_source="rtn")


# ---------------------------------------------------------------------------------------------
# plan --tensors and inspect on a source: each weight's encoding and what becomes of it


def _table(output: str, head: str) -> dict[str, str]:
    """{first column: the rest} of the rows after the line starting with `head` (rows of one name, then text)."""
    lines = output.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(head)) + 1
    return {x.split(None, 1)[0]: x.split(None, 1)[1] for x in lines[start:] if x.strip() and not x.startswith(("plain ", "what "))}


def test_plan_tensors_shows_each_weights_encoding_and_fate(k3, v3):
    from click.testing import CliRunner

    from shardquant.cli import main

    fx, src = k3
    r = CliRunner().invoke(main, ["plan", str(src), "--format", "nvfp4", "--tensors"])
    assert r.exit_code == 0, r.output
    rows = _table(r.output, "tensor ")
    mx = [n for n, d, _ in fx.model.specs if n.endswith(".weight_packed")]
    assert mx and all(rows[n.replace("weight_packed", "weight")].startswith("MXFP4, E8M0 scales per 32") for n in mx)
    cast = {n: x for n, x in rows.items() if "cast into nvfp4, codes kept" in x}
    assert len(cast) == len(mx)
    per = [re.search(r"\((\d+) of (\d+) blocks", x).groups() for x in cast.values()]
    summary = re.search(r"cast into nvfp4 code for code; (\d+) of (\d+) blocks", r.output).groups()
    assert [sum(int(p[i]) for p in per) for i in (0, 1)] == [int(summary[0]), int(summary[1])]
    assert int(summary[0]) > 0  # the fixture plants out-of-range blocks
    assert all(x.startswith(("BF16", "F32")) for n, x in rows.items() if n not in cast)
    assert any("kept: router" in x for x in rows.values())

    fx3, fp8, _ = v3
    r = CliRunner().invoke(main, ["plan", str(fp8), "--format", "fp8", "--tensors"])
    assert r.exit_code == 0, r.output
    rows = _table(r.output, "tensor ")
    blocks = [n for n, d, _ in fx3.model.specs if d == "F8_E4M3"]
    decoded = [n for n in blocks if "(decoded to BF16 as read)" in rows[n]]
    assert blocks and all(rows[n].startswith("block-FP8 128x128, F32 scales") for n in blocks)
    assert decoded and all(re.search(r"(fp8 in \S+ \(decoded|kept: )", rows[n]) for n in blocks)
    assert not any(n.endswith("_scale_inv") for n in rows)  # scale tensors are not weights of the plan


def test_inspect_on_a_source_lists_how_its_weights_are_stored(tmp_path):
    import subprocess
    import sys

    fx = gpt_oss()
    src = fx.write(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "shardquant", "inspect", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = _table(r.stdout, "weight ")
    fused = {n: w for n, w in fx.expected.items() if w.experts}
    assert fused and set(rows) == set(fused)  # every fused 3-D weight, nothing else
    for name, want in fused.items():
        assert f"x{want.experts}  MXFP4 3-D, {want.experts} experts" in rows[name]
        assert ("gate/up interleaved" in rows[name]) == name.endswith("gate_up_proj")
        assert f"({name.rsplit('.', 1)[1]}_blocks + {name.rsplit('.', 1)[1]}_scales)" in rows[name]
    n_plain = len(fx.expected) - len(fused)
    assert f"plain BF16: {n_plain} tensors" in r.stdout
    r = subprocess.run([sys.executable, "-m", "shardquant", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no safetensors checkpoint" in r.stderr


def test_a_cast_over_the_memory_budget_is_streamed_member_by_member(k3, tmp_path):
    """A cast group within the memory budget is read ahead whole by the reader; one over it is cast
    member by member, its scales first (plan.Group.streamed): the same bytes, every source byte read
    once either way, and `plan` says which."""
    from click.testing import CliRunner

    from shardquant.cli import main

    fx, src = k3
    whole = conv.convert(str(src), tmp_path / "a", "nvfp4", device="cpu")
    r = conv.convert(str(src), tmp_path / "b", "nvfp4", device="cpu", memory_budget=1)
    casts = [g for g in r.plan.groups if g.cast]
    assert casts and all(g.streamed for g in casts) and not any(g.streamed for g in whole.plan.groups)
    assert _tensors(tmp_path / "a") == _tensors(tmp_path / "b")
    stored = sum(t.nbytes for t in scan(src).tensors.values())
    assert whole.bytes_read == stored and whole.reread_bytes == 0
    # the other quantizers, over the budget too, are read twice; a cast reads each byte once
    assert r.bytes_read - r.reread_bytes == stored
    assert r.reread_bytes == sum(g.source_bytes for g in r.plan.groups if g.two_pass)
    a = json.loads((tmp_path / "a" / "scale_manifest.json").read_text())["quantizers"]
    b = json.loads((tmp_path / "b" / "scale_manifest.json").read_text())["quantizers"]
    assert {k: {f: v for f, v in q.items() if f != "two_pass"} for k, q in a.items()} == \
        {k: {f: v for f, v in q.items() if f != "two_pass"} for k, q in b.items()}
    assert any("cast" in q for q in b.values())
    out = CliRunner().invoke(main, ["plan", str(src), "--format", "nvfp4", "--memory-budget", "1", "--verbose"])
    assert out.exit_code == 0, out.output
    assert "(cast member by member)" in out.output


def _template_regex(template: str) -> re.Pattern:
    """The reference: `{base}` as any non-empty run of characters but a line break, the rest literal."""
    return re.compile(re.escape(template).replace(re.escape("{base}"), "(?P<base>.+)"))


_PIECES = hst.sampled_from(["a", ".", "\n", "_", "weight", "scale", "_inv", "_packed", "_blocks", "_scales", "0"])


@settings(max_examples=300, deadline=None)
@given(hst.lists(_PIECES, max_size=8).map("".join))
def test_pairing_templates_match_as_their_regex(name):
    """shardquant/encoding.py reads a pairing's `{base}` by a suffix test (_bases): the rows, in order,
    and the bases the templates' full-match regexes give, for names built from the templates' own pieces."""
    from shardquant.encoding import _DATA_RESTS, _SCALE_RESTS, PAIRINGS, _bases

    for side, rests in (("data", _DATA_RESTS), ("scale", _SCALE_RESTS)):
        want = [(p.name, m["base"]) for p in PAIRINGS if (m := _template_regex(getattr(p, side)).fullmatch(name))]
        assert [(p.name, base) for p, base in _bases(name, rests)] == want, (side, name)
