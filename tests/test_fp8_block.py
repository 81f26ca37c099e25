"""fp8-block (formats/fp8_block.py): E4M3 codes and one fp32 scale per 128x128 tile, against independent
references (torch's and ml_dtypes' float8_e4m3fn casts of the per-tile quotient); whole conversions in
both flavors pass verify and `verify --source`; compressed-tensors' own decompressor and transformers'
FineGrainedFP8 loader read our output (docs/formats.md 1.3, 5.1, 5.3)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shardquant import flavors, formats, testing
from shardquant.convert import convert
from shardquant.formats import fp8_block
from shardquant.verify import verify, verify_contract

FMT = formats.declared("fp8-block")
INDEX = "model.safetensors.index.json"


def bf16_raw(w: torch.Tensor) -> np.ndarray:
    return w.to(torch.bfloat16).view(torch.uint16).numpy()


def ref_torch(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile amax / 448 in fp32 (zero or subnormal -> 1.0), W / scale, clamp, torch's E4M3 cast."""
    r, c = w.shape
    t = w.float().reshape(r // 128, 128, c // 128, 128)
    s = t.abs().amax(dim=(1, 3)) / torch.tensor(448.0)
    s = torch.where(s < torch.finfo(torch.float32).tiny, torch.ones_like(s), s)
    q = (t / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(r, c)
    return q.view(torch.uint8).numpy(), s.numpy()


def ref_ml_dtypes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same with NumPy tile loops and ml_dtypes' cast."""
    r, c = x.shape
    q = np.empty((r, c), np.uint8)
    s = np.empty((r // 128, c // 128), np.float32)
    for i in range(r // 128):
        for j in range(c // 128):
            tile = x[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].astype(np.float32)
            sc = np.float32(np.max(np.abs(tile))) / np.float32(448)
            sc = np.float32(1) if sc < np.finfo(np.float32).tiny else sc
            s[i, j] = sc
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = np.clip(tile / sc, -448, 448).astype(
                ml_dtypes.float8_e4m3fn).view(np.uint8)
    return q, s


def planted(seed: int = 0) -> torch.Tensor:
    """[384, 512] bf16 with a zero tile, -0.0, exact ties between E4M3 values, outliers and a tile
    whose one huge value crushes the rest to subnormal codes or zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(384, 512, generator=g) * 0.02
    w[0:128, 0:128] = 0.0  # a zero tile -> scale 1.0, all codes 0
    w[0, 0] = -0.0
    w[5, 7] = -0.0
    # tile (0, 1): amax 448 so scale 1.0 exactly; ties halfway between neighbouring E4M3 values
    w[0:128, 128:256] = 0.0
    w[0, 128] = 448.0
    ties = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 0.005859375, 2.0 ** -9 * 1.5, -3.25, -208.0 + 8.0])
    w[1, 128:128 + len(ties)] = ties
    w[200, 300] = 50.0  # an outlier in tile (1, 2)
    w[300, 400] = -1e4  # one huge value: the rest of tile (2, 3) underflows
    w[383, 511] = 3e-40  # a denormal-range value in bf16 (kept: bf16 has fp32's exponent)
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_codes_and_scales_match_references(seed):
    w = planted(seed)
    q, s = fp8_block.quantize(bf16_raw(w), "BF16")
    rq, rs = ref_torch(w)
    mq, ms = ref_ml_dtypes(w.float().numpy())
    assert q.shape == (384, 512) and s.shape == FMT.scale_shape((384, 512)) == (3, 4) and s.dtype == np.float32
    assert np.array_equal(q, rq) and np.array_equal(q, mq)
    assert np.array_equal(s.view(np.uint32), rs.view(np.uint32)) and np.array_equal(s, ms)
    # zero tile: scale 1.0, codes 0, and -0.0 keeps its sign (0x80, as torch's cast): the value is 0
    assert s[0, 0] == 1.0 and q[0, 0] == q[5, 7] == 0x80 and np.count_nonzero(q[:128, :128]) == 2
    assert s[0, 1] == 1.0  # amax 448


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_other_source_dtypes(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 384, generator=g) * torch.logspace(-3, 2, 384)
    tw = w.to(torch.float16 if dtype == "F16" else torch.float32)
    raw = tw.numpy()  # raw storage as shardquant.st reads it: float16 / float32 arrays
    q, s = fp8_block.quantize(raw, dtype)
    rq, rs = ref_torch(tw)
    assert np.array_equal(q, rq) and np.array_equal(s, rs)


def test_subnormal_tile_scale_is_one():
    w = torch.zeros(128, 128, dtype=torch.float32)
    w[3, 4] = 1e-40  # amax / 448 is subnormal (zero at this precision): scale 1.0, as formats/fp8.py
    q, s = fp8_block.quantize(w.numpy(), "F32")
    assert s.tolist() == [[1.0]] and not q.any()


def test_dequantize_stored_is_code_times_tile_scale():
    w = planted(5)
    q, s = fp8_block.quantize(bf16_raw(w), "BF16")
    deq = fp8_block.dequantize_stored(q, s)
    ref = torch.from_numpy(q).view(torch.float8_e4m3fn).float() * torch.from_numpy(s).repeat_interleave(
        128, 0).repeat_interleave(128, 1)
    assert np.array_equal(deq, ref.numpy())


def test_declaration_and_flavors():
    assert FMT.block == (128, 128) and FMT.granularity == "block" and not FMT.quantizer_scale
    assert not FMT.global_scale and FMT.activations == "dynamic-group" and FMT.kernel == "fp8_block"
    assert formats.default_flavor("fp8-block", flavors.FLAVORS) == "block-fp8"
    assert formats.default_flavor("nvfp4", flavors.FLAVORS) == "modelopt"
    assert formats.default_flavor("fp8", flavors.FLAVORS) == "compressed-tensors"
    assert flavors.refusal("modelopt", "fp8-block") and "block-fp8" in flavors.refusal("modelopt", "fp8-block")
    for f in formats.FORMATS:  # block-fp8 spells fp8-block only
        assert (flavors.refusal("block-fp8", f) is None) == (f == "fp8-block"), f
    assert flavors.FLAVORS["block-fp8"].output_names("fp8-block", "a.b.weight") == {
        "weight": "a.b.weight", "scale": "a.b.weight_scale_inv"}
    assert flavors.FLAVORS["compressed-tensors"].output_names("fp8-block", "a.b.weight") == {
        "weight": "a.b.weight", "scale": "a.b.weight_scale"}


def test_ct_spelling_matches_compressed_tensors_preset():
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme

    preset = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    ours = FMT.compressed_tensors
    for role in ("weights", "input_activations"):
        assert QuantizationArgs(**ours[role]) == getattr(preset, role), role


# ---------------------------------------------------------------------------------------------
# whole conversions

MOE = testing.qwen3_moe(hidden=128, inter=128, heads=2, kv_heads=1, head_dim=128, experts=4)


@pytest.fixture(scope="module")
def moe_src(tmp_path_factory):
    return testing.write_checkpoint(tmp_path_factory.mktemp("moe"), MOE, shard_bytes=100_000, seed=3)


@pytest.fixture(scope="module")
def moe_out(moe_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    out = {}
    for fl in ("block-fp8", "compressed-tensors"):
        out[fl] = root / fl
        convert(str(moe_src), out[fl], "fp8-block", flavor=fl, device="cpu", max_shard_size=200_000)
    return out


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for p in sorted(d.glob("*.safetensors")):
        t.update(load_file(p))
    return t


@pytest.mark.parametrize("flavor", ["block-fp8", "compressed-tensors"])
def test_moe_conversion_verifies(moe_src, moe_out, flavor):
    out = moe_out[flavor]
    assert verify_contract(out) == []
    rep = verify(out, str(moe_src))
    assert rep.ok, rep.violations
    assert (rep.flavor, rep.format) == (flavor, "fp8-block")
    assert rep.modules == len(rep.tensors) == 2 * (4 + 4 * 3)
    assert min(t.sqnr_db for t in rep.tensors) > FMT.min_sqnr
    man = json.loads((out / "scale_manifest.json").read_text())
    assert all(q["global_scale"] is None for q in man["quantizers"].values())
    t = load_dir(out)
    scale = flavors.FLAVORS[flavor].scale_name
    name = "model.layers.1.mlp.experts.2.down_proj"
    assert t[f"{name}.weight"].dtype == torch.float8_e4m3fn and t[f"{name}.{scale}"].dtype == torch.float32
    assert t[f"{name}.{scale}"].shape == (1, 1)
    assert t["model.layers.0.self_attn.q_proj.weight_scale" + ("_inv" if flavor == "block-fp8" else "")].shape == (2, 1)
    assert not any(k.endswith(("weight_scale_2", "weight_global_scale", "input_scale")) for k in t)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if flavor == "block-fp8":
        assert not (out / "hf_quant_config.json").exists()
        assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
        assert qc["activation_scheme"] == "dynamic" and qc["fmt"] == "e4m3"
        assert qc["ignored_layers"] == qc["modules_to_not_convert"]
        assert {"lm_head", "model.layers.0.mlp.gate"} <= set(qc["ignored_layers"])
    else:
        g = qc["config_groups"]["group_0"]
        assert g["weights"]["strategy"] == "block" and g["weights"]["block_structure"] == [128, 128]
        assert g["input_activations"]["strategy"] == "group" and g["input_activations"]["group_size"] == 128


def test_inspect_shows_no_global_scale(moe_out):
    from click.testing import CliRunner

    from shardquant.cli import main

    r = CliRunner().invoke(main, ["inspect", str(moe_out["block-fp8"])])
    assert r.exit_code == 0, r.output
    assert "format fp8-block (block-fp8 flavor)" in r.output and "malformed" not in r.output


def test_verify_finds_broken_block_fp8_config(moe_out, tmp_path):
    import shutil

    d = tmp_path / "o"
    shutil.copytree(moe_out["block-fp8"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(weight_block_size=[1, 128], activation_scheme="static")
    (d / "config.json").write_text(json.dumps(cfg))
    vs = verify_contract(d, hashes=False)
    details = " ".join(v.detail for v in vs if v.rule == "config")
    assert "weight_block_size" in details and "activation_scheme" in details


def test_compressed_tensors_decompressor_gives_our_dequantization(moe_out):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    out = moe_out["compressed-tensors"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    g = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=g["targets"], weights=g["weights"], input_activations=g["input_activations"])
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    t = load_dir(out)
    man = json.loads((out / "scale_manifest.json").read_text())
    assert len(man["tensors"]) == 32
    for src, e in man["tensors"].items():
        w, s = t[e["weight"]], t[e["scale"]]
        got = comp.decompress({"weight": w, "weight_scale": s}, scheme)["weight"]
        ours = fp8_block.dequantize_stored(w.view(torch.uint8).numpy(), s.numpy())
        assert torch.equal(got.float(), torch.from_numpy(ours)), src


def test_weight_not_in_whole_tiles_is_kept_with_a_warning(tmp_path):
    model = testing.llama(hidden=128, inter=128, heads=1, kv_heads=1)
    model.specs = [(n, d, (s[0], 130) if n.endswith("mlp.down_proj.weight") else s) for n, d, s in model.specs]
    model.specs = [(n, d, (130, s[1]) if n.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")) else s)
                   for n, d, s in model.specs]
    src = testing.write_checkpoint(tmp_path / "src", model, seed=1)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True):
        res = convert(str(src), out, "fp8-block", device="cpu")
    kept = {e["name"]: e["reason"] for e in json.loads((out / "scale_manifest.json").read_text())["excluded"]}
    down = "model.layers.0.mlp.down_proj.weight"
    assert down in kept and "128x128" in kept[down]
    assert any("128x128" in w for w in res.plan.warnings)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["ignored_layers"]
    assert verify_contract(out) == []


def test_transformers_loads_block_fp8_dense(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = testing.llama(hidden=128, inter=128, heads=1, kv_heads=1, vocab=256)
    src = testing.write_checkpoint(tmp_path / "src", model, seed=2)
    out = tmp_path / "out"
    convert(str(src), out, "fp8-block", device="cpu")
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(out)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"transformers' FineGrainedFP8 does not load on this CPU-only host: {type(e).__name__}: {e}")
    sd = {k: v for k, v in m.state_dict().items()}
    ref = load_dir(out)
    name = "model.layers.0.mlp.down_proj"
    deq = fp8_block.dequantize_stored(ref[f"{name}.weight"].view(torch.uint8).numpy(),
                                      ref[f"{name}.weight_scale_inv"].numpy())
    w = sd[f"{name}.weight"]
    if w.dtype == torch.float8_e4m3fn:  # kept quantized: codes and scales as stored
        assert torch.equal(w.view(torch.uint8), ref[f"{name}.weight"].view(torch.uint8))
        assert torch.equal(sd[f"{name}.weight_scale_inv"], ref[f"{name}.weight_scale_inv"])
    else:  # dequantized on load
        assert torch.allclose(w.float(), torch.from_numpy(deq), rtol=2 ** -7, atol=0)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = m(ids).logits
    assert torch.isfinite(logits).all()
