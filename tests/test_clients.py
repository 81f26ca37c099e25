"""Real clients read our compressed-tensors (and ModelOpt) outputs, on the CPU.

- compressed-tensors 0.20's own decompressors (`nvfp4-pack-quantized`, `float-quantized`) give the
  weights our dequantization gives (FORMATS.md section 6), to a stated bound.
- transformers loads tiny random Qwen3 (dense) and Qwen3-MoE models converted by shardquant and
  computes the same logits as the source model with our own dequantized weights put in, and logits
  near the bf16 model's.
- compressed-tensors' ModelOpt NVFP4 converter turns our ModelOpt-flavor output into exactly our
  compressed-tensors-flavor tensors.

Tolerances, and why:
- NVFP4, per element: CT computes code * fl(scale / fl(1/s2)) in fp32, we code * fl(scale * s2).
  Not bit-identical (about a quarter of the elements differ by 1-2 fp32 ulps): five correctly
  rounded fp32 operations in all separate the two, so |CT - ours| <= 5 * 2^-24 * |ours| (to first
  order). CT's decompress rounds its fp32 result to bf16 once, so it is bf16(ours) unless a bf16
  rounding boundary lies between the two fp32 values, and then one bf16 step away (observed: never).
- FP8: both compute fl(e4m3 * scale) in fp32: bit-identical.
- Logits of two models whose weights are bitwise equal: bitwise equal (same code, same CPU).
- Logits near the bf16 model: relative Frobenius error of the weights is ~0.095 for NVFP4 and
  ~0.026 for FP8 on these normal(0, 0.02) weights (seeds 0-5: 0.0948-0.0956 and 0.0264-0.0265);
  through two layers the logits' relative error is about 1.5x that (NVFP4 0.12-0.15, FP8
  0.036-0.039). Bounds: weights 0.11 / 0.032, logits 0.25 / 0.07. Zeroing every quantized linear
  gives 0.78, and NVFP4-quality weights would fail the FP8 bound.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loguru
import transformers
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.entrypoints.convert import (
    CompressedTensorsDequantizer, ModelOptNvfp4Converter, convert_checkpoint,
)
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from transformers import (
    AutoModelForCausalLM, CompressedTensorsConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from shardquant.convert import convert
from shardquant.formats import fp8, nvfp4

transformers.logging.set_verbosity_error()
loguru.logger.disable("compressed_tensors")  # its per-file DEBUG lines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")

FORMATS = ("nvfp4", "fp8")
CT_FORMAT = {"nvfp4": "nvfp4-pack-quantized", "fp8": "float-quantized"}
BF16 = torch.bfloat16
U32 = 2.0**-24  # fp32 unit roundoff
# Fixed input ids: 3 sequences of 16 tokens spread over the 256-token vocabulary.
IDS = (torch.arange(48).reshape(3, 16) * 37 + 5) % 256
# |weights - bf16 weights| / |bf16 weights| and the same for logits (module docstring).
WEIGHT_REL = {"nvfp4": 0.11, "fp8": 0.032}
LOGIT_REL = {"nvfp4": 0.25, "fp8": 0.07}
QPARAMS = (".weight_scale", ".weight_global_scale")
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers

def _make_dense():
    return Qwen3ForCausalLM(Qwen3Config(intermediate_size=128, **SMALL))


def _make_moe():
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                              num_experts_per_tok=2, norm_topk_prob=True, **SMALL))


MODELS = {"dense": _make_dense, "moe": _make_moe}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """model -> a bf16 checkpoint written by transformers' save_pretrained (random weights, seed 0)."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().to(BF16)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """(model, fmt, flavor) -> shardquant output directory, converted once."""
    root = tmp_path_factory.mktemp("out")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(model: str, fmt: str, flavor: str = "compressed-tensors") -> Path:
        key = (model, fmt, flavor)
        if key not in cache:
            out = root / "-".join(key)
            convert(str(sources[model]), out, fmt, flavor=flavor, device="cpu")
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(sources, converted, tmp_path_factory):
    """(model, fmt) -> the source checkpoint with every quantized weight replaced by bf16 of OUR
    dequantization (everything else byte for byte the source's): the model the output should be."""
    root = tmp_path_factory.mktemp("ours")
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, fmt: str) -> Path:
        if (model, fmt) not in cache:
            out = root / f"{model}-{fmt}"
            shutil.copytree(sources[model], out)
            tensors = load_file(out / "model.safetensors")
            ours = our_weights(converted(model, fmt), fmt)
            assert set(ours) <= set(tensors)
            tensors.update({k: w.to(BF16) for k, w in ours.items()})
            save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
            cache[model, fmt] = out
        return cache[model, fmt]

    return get


@pytest.fixture(scope="module")
def bf16_logits(sources):
    """model -> logits of the unquantized bf16 source model."""
    return {name: logits(load(path)) for name, path in sources.items()}


def load(path: Path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=BF16, **kw)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def read(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def manifest(path: Path) -> dict:
    return json.loads((path / "scale_manifest.json").read_text())


def our_weights(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Source weight name -> fp32 weights from shardquant's own dequantization of the output, with
    the quantizer's s2 (NVFP4) or scale (FP8) from the manifest."""
    man, tensors = manifest(path), read(path)
    out = {}
    for src, t in man["tensors"].items():
        s = np.float32(man["quantizers"][t["quantizer"]]["global_scale"])
        if fmt == "nvfp4":
            w = nvfp4.dequantize(tensors[t["weight"]].numpy(), u8(tensors[t["scale"]]), s)
        else:
            w = fp8.dequantize(u8(tensors[t["weight"]]), s)
        out[src] = torch.from_numpy(w)
    assert out, f"{path}: nothing quantized"
    return out


def u8(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


def scheme_of(path: Path):
    """The QuantizationScheme of our single config group, validated by compressed-tensors."""
    qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    (scheme,) = qc.config_groups.values()
    return qc, scheme


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values apart a and b are (both bf16; +0 and -0 are the same)."""
    def key(x):
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (key(a) - key(b)).abs()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def ct_load_config(dequantize: bool) -> CompressedTensorsConfig:
    """transformers 5 says `dequantize=True`; 4.x said `run_compressed=False`."""
    if "dequantize" in inspect.signature(CompressedTensorsConfig.__init__).parameters:
        return CompressedTensorsConfig(dequantize=dequantize)
    return CompressedTensorsConfig(run_compressed=not dequantize)


def assert_same_model(model, ref_model, what: str) -> None:
    """Same parameters (quantized ones within one bf16 step, observed: identical), and logits
    bitwise equal when the weights are; within 2^-6 relative if a weight is one bf16 step off."""
    got, want = model.state_dict(), ref_model.state_dict()
    extra = set(got) - set(want)  # a compressed-mode model keeps its scales after decompressing
    assert set(want) <= set(got) and all(k.endswith(QPARAMS) for k in extra), (what, sorted(extra))
    steps = {k: int(bf16_steps(got[k], want[k]).max()) for k in want}
    off = {k: s for k, s in steps.items() if s}
    assert all(s <= 1 for s in off.values()), f"{what}: weights more than one bf16 step from ours: {off}"
    got_l, want_l = logits(model), logits(ref_model)
    if not off:
        assert torch.equal(got_l, want_l), f"{what}: same weights, different logits " \
                                           f"(max diff {float((got_l - want_l).abs().max())})"
    else:
        assert rel(got_l, want_l) <= 2.0**-6, f"{what}: {off}"


def assert_near_bf16(ref_dir: Path, source: Path, ref_logits: torch.Tensor, bf16: torch.Tensor, fmt: str) -> None:
    w, w0 = load_file(ref_dir / "model.safetensors"), load_file(source / "model.safetensors")
    changed = [k for k in w0 if not torch.equal(w[k], w0[k])]
    werr = float(sum((w[k].float() - w0[k].float()).square().sum() for k in changed)
                 / sum(w0[k].float().square().sum() for k in changed)) ** 0.5
    assert 0 < werr <= WEIGHT_REL[fmt], werr
    assert rel(ref_logits, bf16) <= LOGIT_REL[fmt], rel(ref_logits, bf16)


# ---------------------------------------------------------------------------------------------
# 1. compressed-tensors' decompressors against our dequantization, tensor by tensor

@pytest.mark.parametrize("model", MODELS)
def test_ct_decompress_nvfp4(converted, model):
    path = converted(model, "nvfp4")
    qc, scheme = scheme_of(path)
    assert qc.format == CT_FORMAT["nvfp4"] and scheme.weights.strategy == "tensor_group"
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    assert compressor.__name__ == "NVFP4PackedCompressor"
    man, tensors, ours = manifest(path), read(path), our_weights(path, "nvfp4")
    fp32_differ = 0
    for src, t in man["tensors"].items():
        s2 = np.float32(man["quantizers"][t["quantizer"]]["global_scale"])
        base = src.removesuffix(".weight")
        state = {k: tensors[f"{base}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        # On disk: CT's convention, the inverse of s2, correctly rounded, shape [1].
        gs = state["weight_global_scale"]
        assert gs.dtype == torch.float32 and gs.shape == (1,) and float(gs) == float(np.float32(1) / s2), src
        w_ct = compressor.decompress(state, scheme)["weight"]
        want = ours[src]
        assert w_ct.shape == want.shape, src
        # CT's own arithmetic kept in fp32 (decompress does the same on bf16 codes and scales, both
        # exact, then rounds its fp32 product to bf16): within five roundings of ours.
        packed = state["weight_packed"]
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        w32 = ct_dequantize(x_q=codes, scale=state["weight_scale"].float(), args=scheme.weights,
                            global_scale=gs, dtype=torch.float32)
        assert torch.all((w32 - want).abs() <= 5 * U32 * want.abs()), src
        fp32_differ += int((w32 != want).sum())
        # What a client gets: bf16, at most one bf16 step from bf16(ours).
        steps = bf16_steps(w_ct.to(BF16), want.to(BF16))
        assert int(steps.max()) <= 1, f"{src}: {int((steps > 0).sum())} elements off"
    assert fp32_differ > 0  # the two conventions do differ in fp32 (else say so in the docstring)


@pytest.mark.parametrize("model", MODELS)
def test_ct_decompress_fp8(converted, model):
    path = converted(model, "fp8")
    qc, scheme = scheme_of(path)
    # formats/fp8.py: channel weights (the quantizer's one scale on every row), dynamic per-token activations
    assert qc.format == CT_FORMAT["fp8"] and scheme.weights.strategy == "channel"
    assert scheme.input_activations.dynamic is True and scheme.input_activations.strategy == "token"
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    assert compressor.__name__ == "FloatQuantizationCompressor"
    man, tensors, ours = manifest(path), read(path), our_weights(path, "fp8")
    for src, t in man["tensors"].items():
        scale = np.float32(man["quantizers"][t["quantizer"]]["global_scale"])
        base = src.removesuffix(".weight")
        state = {k: tensors[f"{base}.{k}"] for k in ("weight", "weight_scale")}
        assert state["weight"].dtype == torch.float8_e4m3fn, src
        rows = state["weight"].shape[0]
        assert state["weight_scale"].shape == (rows, 1), src
        assert torch.equal(state["weight_scale"], torch.full((rows, 1), float(scale))), src
        w_ct = compressor.decompress(state, scheme)["weight"]
        # Both compute fl32(e4m3 value * scale): bit-identical.
        assert w_ct.dtype == torch.float32 and torch.equal(w_ct, ours[src]), src


# ---------------------------------------------------------------------------------------------
# 2a. transformers loads the dense Qwen3 output directly

@pytest.mark.parametrize("fmt", FORMATS)
def test_transformers_dense_dequantize(sources, converted, reference, bf16_logits, fmt):
    """Dequantized while loading (`dequantize=True`, formerly `run_compressed=False`): CT's
    decompress, cast to bf16, into a plain model."""
    ref = load(reference("dense", fmt))
    model = load(converted("dense", fmt), quantization_config=ct_load_config(dequantize=True))
    assert_same_model(model, ref, f"dense {fmt}")
    assert_near_bf16(reference("dense", fmt), sources["dense"], logits(ref), bf16_logits["dense"], fmt)


def test_transformers_dense_compressed_nvfp4(converted, reference):
    """The default load keeps weight_packed / weight_scale (e4m3) / weight_global_scale (fp32) as
    loaded, and compressed-tensors decompresses them on the first forward pass."""
    model = load(converted("dense", "nvfp4"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_packed.dtype == torch.uint8 and q.weight_scale.dtype == torch.float8_e4m3fn
    ref = load(reference("dense", "nvfp4"))
    got = logits(model)  # decompresses
    assert torch.equal(got, logits(ref))
    assert_same_model(model, ref, "dense nvfp4, compressed load")


def test_transformers_dense_compressed_fp8(converted, reference):
    """The default load of FP8 makes `weight_scale` a parameter of the model dtype (bf16), so the
    fp32 scale is rounded to bf16 (relative 2^-8) before decompression: weights are
    bf16(q * bf16(s)), within 3 * 2^-8 of bf16(q * s) (three bf16 roundings), not identical. The
    checkpoint asks for dynamic per-token FP8 activations (formats/fp8.py), which this load applies:
    logits move by the activations' own E4M3 rounding (relative 2^-4 at most per element)."""
    model = load(converted("dense", "fp8"))
    ref = load(reference("dense", "fp8"))
    got_l, want_l = logits(model), logits(ref)
    got, want = model.state_dict(), ref.state_dict()
    assert set(want) <= set(got)
    for k, w in want.items():
        assert torch.all((got[k].float() - w.float()).abs() <= 3 * 2.0**-8 * w.float().abs()), k
    assert rel(got_l, want_l) <= 2.0**-4


# ---------------------------------------------------------------------------------------------
# 2b. Qwen3-MoE: through compressed-tensors' model-free dequantizer, then transformers

@pytest.fixture(scope="module")
def ct_dequantized(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("ctdeq")

    def get(fmt: str) -> Path:
        src, dst = converted("moe", fmt), root / fmt
        if not dst.exists():
            # CT 0.20's CompressedTensorsDequantizer.get_dependencies asks every non-ignored `*.weight`
            # for a `*.weight_scale` partner when the format's first param is `weight` (float-quantized),
            # norms included (process() skips modules named *norm, get_dependencies does not), so FP8
            # needs the norms ignored; NVFP4's first param is weight_packed and needs nothing.
            ignore = ["re:.*norm$"] if fmt == "fp8" else []
            convert_checkpoint(src, dst, converter=CompressedTensorsDequantizer(src, ignore=ignore), device="cpu")
        return dst

    return get


@pytest.mark.parametrize("fmt", FORMATS)
def test_moe_ct_dequantizer(sources, reference, ct_dequantized, bf16_logits, fmt):
    dst = ct_dequantized(fmt)
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    ref_dir = reference("moe", fmt)
    # The files themselves: every tensor within one bf16 step of ours (observed: identical).
    got, want = read(dst), load_file(ref_dir / "model.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and int(bf16_steps(got[k], want[k]).max()) <= 1, k
    ref = load(ref_dir)
    assert_same_model(load(dst), ref, f"moe {fmt} via CT dequantizer")
    assert_near_bf16(ref_dir, sources["moe"], logits(ref), bf16_logits["moe"], fmt)


def test_moe_transformers_direct_fp8(converted, reference):
    """FP8 experts load directly: transformers folds each expert's fp32 scale into its weight in
    fp32 (quant * scale, then bf16), as we do."""
    model = load(converted("moe", "fp8"), quantization_config=ct_load_config(dequantize=True))
    assert_same_model(model, load(reference("moe", "fp8")), "moe fp8, direct load")


@pytest.mark.xfail(strict=True, reason=(
    "transformers 5.24 integrations/compressed_tensors.py CompressedTensorsDequantize.convert: the "
    "MoE expert path builds a DummyModule of weight_packed / weight_scale / weight_shape only and "
    "never passes weight_global_scale, so NVFP4 experts come out as code * block scale (up to 2688), "
    "1/s2 times too large"))
def test_moe_transformers_direct_nvfp4(converted, reference):
    model = load(converted("moe", "nvfp4"), quantization_config=ct_load_config(dequantize=True))
    assert_same_model(model, load(reference("moe", "nvfp4")), "moe nvfp4, direct load")


# ---------------------------------------------------------------------------------------------
# 3. our ModelOpt-flavor output through compressed-tensors' ModelOpt NVFP4 converter

def test_modelopt_nvfp4_converter(converted, tmp_path):
    mo, ct = converted("dense", "nvfp4", "modelopt"), converted("dense", "nvfp4")
    exclude = json.loads((mo / "config.json").read_text())["quantization_config"]["ignore"]
    dst = tmp_path / "mo2ct"
    convert_checkpoint(mo, dst, converter=ModelOptNvfp4Converter(ignore=exclude, targets=["Linear"]), device="cpu")
    got, want = read(dst), read(ct)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        if k.endswith("weight_global_scale"):
            # torch's 1 / weight_scale_2 is the same correctly rounded fp32 inverse we write, but
            # 0-dim where CT's own layout (and ours) is [1].
            assert g.shape == () and w.shape == (1,), k
            g = g.reshape(1)
        assert g.dtype == w.dtype and torch.equal(g.view(torch.uint8), w.view(torch.uint8)), k
    # The converter declares its NVFP4 preset, W4A4 (dynamic fp4 activations), for our W4A16 weights.
    qc, scheme = scheme_of(dst)
    assert qc.format == CT_FORMAT["nvfp4"] and scheme.input_activations is not None
    # Decompressed as converted: the 0-dim fp32 global scale does not promote bf16 scales to fp32,
    # so CT computes scale / global_scale and code * that in bf16 (two bf16 roundings, 2^-8 each).
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    ours = our_weights(ct, "nvfp4")
    for src, w in ours.items():
        base = src.removesuffix(".weight")
        state = {k: got[f"{base}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        w_ct = compressor.decompress(state, scheme)["weight"].float()
        assert torch.all((w_ct - w).abs() <= 2.0**-7 * w.abs()), src
