"""MXFP4 and MXFP8 (shardquant/formats/mxfp4.py, mxfp8.py) against compressed-tensors 0.20's own
quantizer and compressor, code for code, with an ml_dtypes computation as a second reference.

compressed-tensors' path, as llm-compressor drives it: per-group min/max -> `calculate_qparams`
(`generate_mx_scales`, then 2^(byte - 127) as the float scale) -> the format's compressor
(`MXFP4PackedCompressor`, `MXFP8QuantizationCompressor`) turning weight and scale into stored
codes and E8M0 bytes. Our bytes differ from it only where the module docstrings say, and where
docs/formats.md section 8 asks for it (bytes kept in 1..254):
- a block whose amax rounds to zero (all zeros, or subnormal amax) gets byte 1, compressed-tensors 0;
- an amax of 1.75 x 2^127 or more gets its exact exponent, where compressed-tensors' rounded power of
  two overflows to Inf (and the byte it stores is not meaningful).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import loguru
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import MXFP4A16, MXFP8
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from shardquant import flavors, testing
from shardquant.formats import mxfp4, mxfp8

loguru.logger.disable("compressed_tensors")

MODULES = {"mxfp4": mxfp4, "mxfp8": mxfp8}
PRESET = {"mxfp4": MXFP4A16, "mxfp8": MXFP8}
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
ELEM = {"mxfp4": (ml_dtypes.float4_e2m1fn, 6.0, 2), "mxfp8": (ml_dtypes.float8_e4m3fn, 448.0, 8)}


def scheme(fmt: str) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], **PRESET[fmt])


def ct_quantize(w: torch.Tensor, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' (stored weight as uint8, E8M0 bytes) of a 2-D weight."""
    sch = scheme(fmt)
    g = w.reshape(w.shape[0], -1, 32)
    s, zp = calculate_qparams(g.amin(-1), g.amax(-1), sch.weights)
    comp = BaseCompressor.get_value_from_registry(mxfp4.FORMAT.compressed_tensors["format"] if fmt == "mxfp4"
                                                  else mxfp8.FORMAT.compressed_tensors["format"])
    out = comp.compress({"weight": w, "weight_scale": s, "weight_zero_point": zp}, sch)
    q = out["weight_packed"] if fmt == "mxfp4" else out["weight"].view(torch.uint8)
    assert out["weight_scale"].dtype == torch.uint8
    return q.numpy(), out["weight_scale"].numpy()


def ours(w: torch.Tensor, fmt: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    raw = w.view(torch.uint16).numpy() if dtype == "BF16" else w.numpy()  # storage as shardquant reads it
    return MODULES[fmt].quantize(raw, dtype, "w")


def codes_of(q: np.ndarray, fmt: str) -> np.ndarray:
    """One code per element (MXFP4 unpacked, low nibble first)."""
    if fmt == "mxfp8":
        return q
    out = np.empty((q.shape[0], q.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = q & 15, q >> 4
    return out


def ml_reference(w: torch.Tensor, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """The rule written independently in float64 with frexp and ml_dtypes casts: amax = m x 2^e
    (0.5 <= m < 1), exponent e - 1, plus 1 when 2m >= 1.75, minus emax, biased, clamped to 1..254;
    elements x / 2^(byte - 127) (+0.0: -0.0 is code 0), clamped to the type's max, cast."""
    etype, emaxval, emax = ELEM[fmt]
    x = w.double().numpy().reshape(w.shape[0], -1, 32)
    amax = np.abs(x).max(-1)
    m, e = np.frexp(amax)
    exp = np.where(amax > 0, e - 1 + (2 * m >= 1.75), -1000)
    byte = np.clip(127 + exp - emax, 1, 254).astype(np.uint8)
    y = np.ldexp(x, 127 - byte.astype(np.int64)[..., None]) + 0.0
    codes = np.clip(y, -emaxval, emaxval).astype(np.float32).astype(etype).view(np.uint8)
    return codes.reshape(w.shape[0], -1), byte


def planted(dtype: str, seed: int = 0) -> torch.Tensor:
    """[64, 256] normal(0, 0.02) weights with edge-case blocks (32 along the input dim) in the first rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g, dtype=torch.float32) * 0.02
    t = TORCH[dtype]
    tiny = {"BF16": 2.0**-130, "F16": 2.0**-20, "F32": 2.0**-140}[dtype]  # subnormal in each type
    blocks = [
        torch.zeros(32),  # zero block
        -torch.zeros(32),  # -0.0
        2.0 ** torch.arange(-8, 24, dtype=torch.float32).clamp(max=15),  # exact powers of two
        torch.full((32,), 1.5),  # amax mantissa exactly 1.5
        torch.full((32,), 1.75),  # exactly 1.75: rounds up
        torch.full((32,), 1.75) * (1 - 2.0**-7),  # just under 1.75 (bf16 step)
        torch.arange(32, dtype=torch.float32) * 0.25 - 4,  # E2M1 ties at every bound, both signs
        torch.arange(32, dtype=torch.float32) * 0.125 * 16,  # E4M3 values and ties around 448 after scaling
        torch.full((32,), tiny) * torch.arange(-16, 16),  # subnormal inputs
        torch.cat([torch.full((1,), 3e4 if dtype == "F16" else 1e30), torch.randn(31, generator=g) * 0.01]),
        torch.cat([torch.full((1,), -1.0), torch.full((31,), -1e-9)]),  # negatives that round to zero
        torch.linspace(-6.5, 6.5, 32) * 2.0**-20,  # values past the element max after scaling
    ]
    for i, b in enumerate(blocks):
        w[i, :32] = b
        w[i, 32:64] = -b.flip(0)
    return w.to(t)


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_code_for_code_with_compressed_tensors(fmt, dtype, seed):
    w = planted(dtype, seed)
    q_ct, s_ct = ct_quantize(w, fmt)
    q, s = ours(w, fmt, dtype)
    assert q.shape == q_ct.shape and s.shape == s_ct.shape == (64, 8)
    zero = s_ct == 0  # amax rounds to zero: compressed-tensors writes byte 0, we write 1
    assert zero.any() and not (s_ct == 255).any()
    assert np.array_equal(s[~zero], s_ct[~zero]) and (s[zero] == 1).all()
    assert ((s >= 1) & (s <= 254)).all()
    c, c_ct = codes_of(q, fmt), codes_of(q_ct, fmt)
    keep = ~np.repeat(zero, 32, axis=1)
    assert np.array_equal(c[keep], c_ct[keep]), f"{int((c[keep] != c_ct[keep]).sum())} codes differ"
    # blocks that are all zeros (+-0.0) are all code 0 in both
    allzero = np.repeat((w.float().reshape(64, 8, 32) == 0).all(-1).numpy(), 32, axis=1)
    assert (c[allzero] == 0).all() and (c_ct[allzero] == 0).all()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_code_for_code_with_ml_dtypes(fmt, dtype):
    w = planted(dtype, 2)
    q, s = ours(w, fmt, dtype)
    codes, byte = ml_reference(w, fmt)
    assert np.array_equal(s, byte)
    assert np.array_equal(codes_of(q, fmt), codes)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_scale_rule_at_mantissa_boundaries(fmt):
    """compressed-tensors' rule (docs/formats.md section 8): E - emax, or E + 1 - emax from m >= 1.75;
    m = 1.5 .. 1.75 stays (ModelOpt's MXFP4 rule would go up above 1.5)."""
    emax = ELEM[fmt][2]
    f32 = np.float32
    ms = [1.0, 1.5, np.nextafter(f32(1.5), f32(2)), np.nextafter(f32(1.75), f32(1)), 1.75, 1.99]
    for e in (-100, -3, 0, 7, 100):
        for m in ms:
            amax = f32(np.ldexp(f32(m), e))
            w = np.zeros((1, 32), np.float32)
            w[0, 5] = -amax
            _, s = MODULES[fmt].quantize(w, "F32", "w")
            want = 127 + e + (1 if m >= 1.75 else 0) - emax
            assert int(s[0, 0]) == want, (m, e)
            _, s_ct = ct_quantize(torch.from_numpy(w), fmt)
            assert int(s_ct[0, 0]) == want, (m, e)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_bytes_stay_in_1_254(fmt):
    """The largest bf16 (amax mantissa >= 1.75 at 2^127): compressed-tensors' rounded power of two is
    Inf, its byte 255 becomes an Inf float scale and the stored byte is Inf cast to int32 plus 127
    (127 on this CPU: scale 1.0, every element clamped); we write the exact exponent. Zeros and the
    smallest bf16 subnormal: byte 1 (compressed-tensors 0)."""
    emax = ELEM[fmt][2]
    w = torch.zeros(3, 32, dtype=torch.bfloat16)
    w[0, 0] = torch.finfo(torch.bfloat16).max
    w[2, 3] = torch.tensor(2.0**-133, dtype=torch.bfloat16)
    q, s = ours(w, fmt, "BF16")
    assert s[:, 0].tolist() == [127 + 128 - emax, 1, 1]
    _, s_ct = ct_quantize(w, fmt)
    assert s_ct[1:, 0].tolist() == [0, 0] and s_ct[0, 0] != s[0, 0]
    assert (codes_of(q, fmt)[1] == 0).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_nan_inf_refused(fmt):
    w = np.zeros((2, 64), np.float32)
    w[1, 40] = np.inf
    with pytest.raises(Exception, match="NaN or Inf"):
        MODULES[fmt].quantize(w, "F32", "w")


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_dequantize_equals_ct_decompressor(fmt):
    w = planted("BF16", 3)
    q, s = ours(w, fmt, "BF16")
    mine = MODULES[fmt].dequantize_stored(q, s, None)
    comp = BaseCompressor.get_value_from_registry(MODULES[fmt].FORMAT.compressed_tensors["format"])
    name = "weight_packed" if fmt == "mxfp4" else "weight"
    weight = torch.from_numpy(q) if fmt == "mxfp4" else torch.from_numpy(q).view(torch.float8_e4m3fn)
    state = {name: weight, "weight_scale": torch.from_numpy(s)}
    if fmt == "mxfp4":
        state["weight_shape"] = torch.tensor(w.shape)
    got = comp.decompress(state, scheme(fmt))["weight"].float().numpy()
    # element x 2^(byte - 127) is exact in bf16 and fp32 for bytes 1..254 and these magnitudes
    assert np.array_equal(got, mine)
    # and the decoding every engine uses (docs/formats.md section 8)
    vals = codes_of(q, fmt)
    etype = ELEM[fmt][0]
    ref = vals.view(etype).astype(np.float64) * np.ldexp(1.0, np.repeat(s.astype(np.int64), 32, axis=1) - 127)
    assert np.array_equal(mine.astype(np.float64), ref)


def test_declarations():
    for fmt, mod in MODULES.items():
        f = mod.FORMAT
        assert (f.block_size, f.scale_dtype, f.global_scale, f.quantizer_scale, f.kernel, f.scale_rule) == \
            (32, "U8", False, False, fmt, "ct-round-pow2")  # the Device method of shardquant/cuda
        spelled = f.compressed_tensors
        weights = {k: v for k, v in spelled["weights"].items()}
        preset = PRESET[fmt]["weights"].model_dump(exclude_none=True)
        assert {k: preset[k] for k in weights} == {**weights, "type": "float"}, fmt
        assert f.modelopt is None and "modelopt" in f.refused
    assert mxfp4.FORMAT.compressed_tensors["input_activations"] is None  # weight-only (MXFP4A16)
    acts = mxfp8.FORMAT.compressed_tensors["input_activations"]  # the MXFP8 preset's dynamic group-32 inputs
    assert {k: MXFP8["input_activations"].model_dump(exclude_none=True)[k] for k in acts} == acts


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("model", ["qwen3_moe", "llama"])
def test_whole_conversion_verifies(tmp_path, fmt, model):
    from shardquant.convert import convert
    from shardquant.verify import verify, verify_contract

    src = testing.write_checkpoint(tmp_path / "src", getattr(testing, model)(), seed=5)
    out = tmp_path / "out"
    convert(str(src), out, fmt, flavor="compressed-tensors", device="cpu")
    import json
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == MODULES[fmt].FORMAT.compressed_tensors["format"]
    man = json.loads((out / "scale_manifest.json").read_text())
    assert all(q["global_scale"] is None for q in man["quantizers"].values())
    assert man["scale_rule"] == MODULES[fmt].FORMAT.scale_rule == "ct-round-pow2"
    assert verify_contract(out) == []
    rep = verify(out, source=str(src))
    assert rep.violations == [], rep.violations
    # SQNR: E2M1 with power-of-two scales ~17-19 dB, E4M3 ~31 dB on Gaussian weights
    lo, hi = {"mxfp4": (15.0, 21.0), "mxfp8": (29.0, 33.0)}[fmt]
    assert lo <= rep.overall().sqnr_db <= hi, rep.overall().sqnr_db
    assert math.isfinite(rep.overall().sqnr_db)
    # output names as the compressed-tensors flavor spells them
    names = flavors.FLAVORS["compressed-tensors"].output_names(fmt, "model.layers.0.self_attn.q_proj.weight")
    assert set(names) == {"weight", "scale"}
