"""transformers (through compressed-tensors) loads every compressed-tensors output shardquant writes.

The matrix comes from the registries: every format whose declaration spells compressed-tensors
(shardquant.testing.served(), formats/base.py Format.spelling), plus mixed-precision cases
(--format-for), each converted from a tiny random Qwen3 (dense) and Qwen3-MoE built by transformers.
For each case:

- the conversion quantized exactly the linears it should, each in its intended format (manifest);
- transformers loads the output with `CompressedTensorsConfig(dequantize=True)` and gets the weights
  of a `reference` model (the source checkpoint with every quantized weight replaced by bf16 of
  shardquant's own dequantization: each quantizer's format's `dequantize_stored`, read from the
  manifest), within one bf16 step, and logits with cosine >= 0.999 to the reference's (bitwise equal
  when the weights are);
- the reference's logits are near the unquantized bf16 model's (LOGIT_REL below), so a layer loaded as
  garbage, or kept unquantized, cannot pass;
- each output also goes through compressed-tensors' model-free dequantizer (convert_checkpoint with
  CompressedTensorsDequantizer) and a plain transformers load, with the same checks: the path that
  serves the MoE and mixed cases transformers' direct load gets wrong.

Cases that fail because of an upstream bug are xfail(strict=True) with the library, version, file and
function in the reason (upstream_bug below: decided from the formats' declared spellings, so a new
format is classified too, and strict makes a wrong guess or a fix visible).

Sizes: fp8-block needs both dims of every quantized weight a multiple of 128 and the MX formats an
input dim that is a multiple of 32: hidden 128, 4 heads x 32 (q/k/v/o [128, 128]), intermediate 256,
moe_intermediate_size 256. The expert size is 256, not 128, on purpose: with 128 every expert weight
is a single 128x128 fp8-block tile, and a loader that multiplies codes by the [1, 1] tile-scale
tensor by plain broadcasting would pass by accident.

Tolerances (LOGIT_REL, WEIGHT_REL), from measured values: see the comment above them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loguru
import transformers
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer, convert_checkpoint
from transformers import (
    CompressedTensorsConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from shardquant import formats
from shardquant.convert import convert
from shardquant.flavors import FLAVORS
from shardquant.st import read_header, read_raw
from shardquant.testing import served
from test_clients import bf16_steps, load, logits, manifest, rel  # the same helpers (tests/test_clients.py)

transformers.logging.set_verbosity_error()
loguru.logger.disable("compressed_tensors")  # its per-file DEBUG lines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")

CT = "compressed-tensors"
FLAVOR = FLAVORS[CT]
BF16 = torch.bfloat16
MIN_COSINE = 0.999

# ---------------------------------------------------------------------------------------------
# the matrix

# case -> (--format, --format-for choices). Every single format the registry serves in this flavor...
CASES: dict[str, tuple[str, tuple[str, ...]]] = {f: (f, ()) for f, fl in served() if fl == CT}
# ...and mixed precision: two formats, and three (on the MoE the experts take mxfp4 and the attention
# fp8-block, so --format is unused there; on the dense model the MLP keeps --format).
CASES["nvfp4+attention=fp8-channel"] = ("nvfp4", ("attention=fp8-channel",))
CASES["nvfp4+experts=mxfp4+attention=fp8-block"] = ("nvfp4", ("experts=mxfp4", "attention=fp8-block"))

# The --format-for selectors (rules.py KINDS) as the source weights they pick in these two models; every
# linear of either model is of exactly one kind, and MODEL_KINDS says which kinds each model has.
KIND = {
    "attention": re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight"),
    "mlp": re.compile(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight"),
    "experts": re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"),
}
MODEL_KINDS = {"dense": ("attention", "mlp"), "moe": ("attention", "experts")}
LINEAR = re.compile(r"model\.layers\.\d+\..*_proj\.weight")

SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
             vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)


def _make_dense():
    return Qwen3ForCausalLM(Qwen3Config(intermediate_size=256, **SMALL))


def _make_moe():
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=256, num_experts=4,
                                              num_experts_per_tok=2, norm_topk_prob=True, **SMALL))


MODELS = {"dense": _make_dense, "moe": _make_moe}

# Tolerances against the unquantized bf16 model, as relative Frobenius errors |ours - bf16| / |bf16|:
# WEIGHT_REL of the quantized weights of one format (all of them together), LOGIT_REL of the logits
# (per case: the mixed cases measure well below their 4-bit parts alone, the attention's error
# dominating the logits here). Measured on these normal(0, 0.02) weights, seeds 0-3, dense and MoE:
#   case                                    weights          logits
#   nvfp4                                   0.0950-0.0952    0.182-0.199
#   fp8                                     0.0264-0.0265    0.050-0.074
#   fp8-channel                             0.0258-0.0259    0.048-0.075
#   fp8-block                               0.0264-0.0265    0.050-0.071
#   mxfp8                                   0.0266           0.051-0.074
#   mxfp4                                   0.1120-0.1123    0.208-0.247
#   nvfp4+attention=fp8-channel             (as above)       0.063-0.082
#   nvfp4+experts=mxfp4+attention=fp8-block (as above)       0.064-0.080
# Bounds: ~1.2x the weights' and ~1.3x the logits' largest. Zeroing one q_proj of layer 0 alone gives
# logits 0.43-0.49 and zeroing every linear 1.06-1.11, so a single layer lost or loaded as garbage fails
# every bound, and 4-bit weights in an 8-bit case fail its weight bound.
WEIGHT_REL = {"nvfp4": 0.11, "fp8": 0.032, "fp8-channel": 0.032, "fp8-block": 0.032, "mxfp8": 0.032, "mxfp4": 0.13}
LOGIT_REL = {"nvfp4": 0.26, "fp8": 0.10, "fp8-channel": 0.10, "fp8-block": 0.10, "mxfp8": 0.10, "mxfp4": 0.32,
             "nvfp4+attention=fp8-channel": 0.11, "nvfp4+experts=mxfp4+attention=fp8-block": 0.11}


def kind_format(case: str, kind: str) -> str:
    """The format a kind of linear should get: its --format-for choice, else --format."""
    fmt, choices = CASES[case]
    return dict(c.split("=", 1) for c in choices).get(kind, fmt)


def intended(case: str, name: str) -> str:
    (kind,) = [k for k, pat in KIND.items() if pat.fullmatch(name)]
    return kind_format(case, kind)


def upstream_bug(model: str, case: str) -> tuple[str, type[Exception]] | None:
    """Why transformers' direct `dequantize=True` load of this case is wrong because of an upstream bug
    (found in the installed source), and the exception the test then fails with; None if it loads.
    Decided from the formats' declared compressed-tensors spellings (formats/*.py FORMAT). transformers
    collects a conversion error and raises RuntimeError ("We encountered some issues during automatic
    conversion of the weights", utils/loading_report.py); wrong weights fail our AssertionError."""
    where = "transformers 5.24 integrations/compressed_tensors.py"
    dense = {kind_format(case, k) for k in MODEL_KINDS[model] if k != "experts"}
    spelled = {json.dumps(formats.declared(f).spelling(CT), sort_keys=True) for f in dense}
    if len(spelled) > 1:
        return (f"{where} get_dense_scheme, called by CompressedTensorsDequantize.convert for every non-expert "
                "module: it returns the first config group whose targets do not single out experts, for all of "
                "them, ignoring each group's targets, so a second dense group's weights go to the first group's "
                "compressor (here group_0 is nvfp4-pack-quantized and the attention's float-quantized weights reach "
                "compressed-tensors 0.20 NVFP4PackedCompressor.decompress: KeyError 'weight_packed', a CONVERSION "
                "error)"), RuntimeError
    if "experts" not in MODEL_KINDS[model]:
        return None
    ef = kind_format(case, "experts")
    declared = formats.declared(ef)
    weights = declared.spelling(CT)["weights"]
    if declared.global_scale:
        return (f"{where} CompressedTensorsDequantize.convert, packed MoE-expert path: its DummyModule holds "
                "weight_packed / weight_scale / weight_shape only and drops weight_global_scale, so compressed-"
                "tensors 0.20 NVFP4PackedCompressor.decompress dequantizes without it: NVFP4 experts come out "
                "code * block scale, 1/s2 times too large (~1900 bf16 steps off)"), AssertionError
    if weights["type"] == "float" and weights["num_bits"] == 8 and weights["strategy"] not in ("tensor", "channel"):
        note = ("; a single 128x128 tile ([1, 1]) would broadcast and pass by accident" if declared.block else
                "; E8M0 exponent bytes would be multiplied as integers even where they broadcast"
                if declared.scale_dtype == "U8" else "")
        return (f"{where} CompressedTensorsDequantize.convert, MoE-expert path: every 8-bit float scheme is taken "
                "for plain (fp8 weight, per-tensor/channel scale) pairs and dequantized as quant * scale by "
                f"broadcasting; {ef}'s {weights['strategy']} scales ({list(declared.scale_shape((256, 128)))} for a "
                "[256, 128] expert weight) do not broadcast: RuntimeError size mismatch, a CONVERSION error"
                + note), RuntimeError
    return None


def cases_of(model: str) -> list:
    out = []
    for case in CASES:
        bug = upstream_bug(model, case)
        marks = [pytest.mark.xfail(strict=True, reason=bug[0], raises=bug[1])] if bug else []
        out.append(pytest.param(case, marks=marks, id=case))
    return out


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """model -> a bf16 checkpoint written by transformers' save_pretrained (random weights, seed 0)."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        make().to(BF16).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """(model, case) -> shardquant's compressed-tensors output, converted once."""
    root = tmp_path_factory.mktemp("out")
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, case: str) -> Path:
        if (model, case) not in cache:
            fmt, choices = CASES[case]
            out = root / f"{model}-{case}"
            convert(str(sources[model]), out, fmt, format_for=choices, flavor=CT, device="cpu")
            cache[model, case] = out
        return cache[model, case]

    return get


@pytest.fixture(scope="module")
def reference(sources, converted, tmp_path_factory):
    """(model, case) -> the source checkpoint with every quantized weight replaced by bf16 of OUR
    dequantization (everything else byte for byte the source's): the model the output should be."""
    root = tmp_path_factory.mktemp("ours")
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, case: str) -> Path:
        if (model, case) not in cache:
            out = root / f"{model}-{case}"
            shutil.copytree(sources[model], out)
            tensors = load_file(out / "model.safetensors")
            ours = our_weights(converted(model, case))
            assert set(ours) <= set(tensors)
            tensors.update({k: torch.from_numpy(w).to(BF16) for k, w in ours.items()})
            save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
            cache[model, case] = out
        return cache[model, case]

    return get


@pytest.fixture(scope="module")
def loaded(reference):
    """(model, case) -> (reference model, its logits), loaded once."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(model: str, case: str):
        if (model, case) not in cache:
            ref = load(reference(model, case))
            cache[model, case] = ref, logits(ref)
        return cache[model, case]

    return get


@pytest.fixture(scope="module")
def bf16_logits(sources):
    """model -> logits of the unquantized bf16 source model."""
    return {name: logits(load(path)) for name, path in sources.items()}


@pytest.fixture(scope="module")
def ct_dequantized(converted, tmp_path_factory):
    """(model, case) -> the output dequantized by compressed-tensors' model-free dequantizer."""
    root = tmp_path_factory.mktemp("ctdeq")

    def get(model: str, case: str) -> Path:
        src, dst = converted(model, case), root / f"{model}-{case}"
        if not dst.exists():
            # compressed-tensors 0.20 entrypoints/convert/converters/ct_dequantizer.py
            # CompressedTensorsDequantizer.get_dependencies asks every non-ignored `*.weight` of a
            # "Linear"-targeted group for its `*.weight_scale` when the format's first compression param
            # is `weight` (float-quantized, mxfp8-quantized), norms included; ignoring the norms (which
            # are never quantized) changes nothing else.
            converter = CompressedTensorsDequantizer(src, ignore=["re:.*norm$"])
            convert_checkpoint(src, dst, converter=converter, device="cpu")
        return dst

    return get


# ---------------------------------------------------------------------------------------------
# helpers

def load_dequantized(path: Path):
    return load(path, quantization_config=CompressedTensorsConfig(dequantize=True))


def headers(path: Path) -> dict:
    infos = {}
    for f in sorted(path.glob("*.safetensors")):
        infos.update(read_header(f))
    return infos


def format_of(man: dict, entry: dict) -> str:
    return man["quantizers"][entry["quantizer"]].get("format", man["format"])


def our_weights(path: Path) -> dict[str, np.ndarray]:
    """Source weight name -> fp32 weights from shardquant's own dequantization of the output: the
    quantizer's format's `dequantize_stored` on the stored weight and scale, with the per-quantizer
    scale the manifest records (ModelOpt's convention, s2, where compressed-tensors stores 1/s2), as
    shardquant/verify.py _compare (measure) does. The stored per-quantizer tensor is checked against the
    manifest on the way (flavors.py Flavor.scalar: what this flavor writes for it)."""
    man, infos = manifest(path), headers(path)
    out = {}
    for src, e in man["tensors"].items():
        fmt = format_of(man, e)
        g = man["quantizers"][e["quantizer"]]["global_scale"]
        per_quantizer = None if g is None else np.float32(g)
        weight, scale = read_raw(infos[e["weight"]]), read_raw(infos[e["scale"]])
        if per_quantizer is not None:
            role = FLAVOR.per_quantizer_name(fmt)
            stored = read_raw(infos[src.removesuffix(".weight") + "." + role])
            want = FLAVOR.scalar(fmt, per_quantizer, tuple(infos[e["weight"]].shape))
            assert stored.tobytes() == want.tobytes(), f"{src}: {role} is not the manifest's global scale"
        out[src] = formats.get(fmt).dequantize_stored(weight, scale, per_quantizer)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))


def compare(model, ref_model, ref_logits: torch.Tensor, bf16: torch.Tensor, bound: float, what: str) -> dict:
    """Same parameters (quantized ones within one bf16 step of ours), logits with cosine >= 0.999 to
    the reference's, bitwise equal when every weight is, and within `bound` (LOGIT_REL) of the bf16
    model's. Returns the measured figures."""
    got, want = model.state_dict(), ref_model.state_dict()
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    steps = {k: bf16_steps(got[k], want[k]) for k in want if got[k].shape == want[k].shape}
    assert len(steps) == len(want), f"{what}: shapes differ: " \
                                    f"{[k for k in want if got[k].shape != want[k].shape]}"
    worst = {k: int(s.max()) for k, s in steps.items() if s.numel()}
    off = {k: s for k, s in worst.items() if s}
    differ = sum(int((s > 0).sum()) for s in steps.values())
    got_l = logits(model)
    stats = {"cosine": cosine(got_l, ref_logits), "elements_off": differ, "max_steps": max(worst.values()),
             "logit_rel": rel(got_l, ref_logits), "vs_bf16": rel(got_l, bf16)}
    print(f"\n{what}: {stats}")
    assert not off or max(off.values()) <= 1, f"{what}: weights more than one bf16 step from ours: {off}"
    assert stats["cosine"] >= MIN_COSINE, f"{what}: {stats}"
    if not off:
        assert torch.equal(got_l, ref_logits), f"{what}: same weights, different logits {stats}"
    assert stats["vs_bf16"] <= bound, f"{what}: {stats}"
    return stats


# ---------------------------------------------------------------------------------------------
# 1. the conversion quantized what it should, and our dequantization is near the bf16 model

@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", CASES)
def test_quantized_as_intended(sources, converted, loaded, bf16_logits, model, case):
    path = converted(model, case)
    man = manifest(path)
    assert len(man["quantizers"]) > 0
    src = load_file(sources[model] / "model.safetensors")
    linears = {k for k in src if LINEAR.fullmatch(k)}
    kinds = {k for k, pat in KIND.items() if any(pat.fullmatch(n) for n in linears)}
    assert kinds == set(MODEL_KINDS[model]), kinds
    assert set(man["tensors"]) == linears, sorted(set(man["tensors"]) ^ linears)
    got = {k: format_of(man, e) for k, e in man["tensors"].items()}
    want = {k: intended(case, k) for k in linears}
    assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}
    # config.json announces one group per format used, in the format's declared spelling
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    spelled = sorted(g["format"] for g in qc["config_groups"].values())
    assert spelled == sorted(formats.declared(f).spelling(CT)["format"] for f in set(want.values())), spelled
    # the reference (our dequantization) against the unquantized model, weights and logits
    ours = our_weights(path)
    for fmt in set(want.values()):
        names = [k for k in ours if want[k] == fmt]
        w0 = [src[k].float() for k in names]
        werr = float(sum((torch.from_numpy(ours[k]) - w).square().sum() for k, w in zip(names, w0))
                     / sum(w.square().sum() for w in w0)) ** 0.5
        print(f"\n{model} {case} {fmt}: weight rel err {werr:.4f}")
        assert 0 < werr <= WEIGHT_REL[fmt], (fmt, werr)
    _, ref_logits = loaded(model, case)
    lrel = rel(ref_logits, bf16_logits[model])
    print(f"{model} {case}: logits rel err vs bf16 {lrel:.4f}")
    assert 0 < lrel <= LOGIT_REL[case], lrel


# ---------------------------------------------------------------------------------------------
# 2. transformers loads the output directly (dequantize=True)

@pytest.mark.parametrize("case", cases_of("dense"))
def test_transformers_dense(converted, loaded, bf16_logits, case):
    ref, ref_logits = loaded("dense", case)
    compare(load_dequantized(converted("dense", case)), ref, ref_logits, bf16_logits["dense"], LOGIT_REL[case],
            f"dense {case}")


@pytest.mark.parametrize("case", cases_of("moe"))
def test_transformers_moe(converted, loaded, bf16_logits, case):
    ref, ref_logits = loaded("moe", case)
    compare(load_dequantized(converted("moe", case)), ref, ref_logits, bf16_logits["moe"], LOGIT_REL[case],
            f"moe {case}")


# ---------------------------------------------------------------------------------------------
# 3. compressed-tensors' model-free dequantizer, then a plain transformers load (the MoE path
#    tests/test_clients.py takes; dense too, where it covers the mixed cases the direct load cannot)

@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", CASES)
def test_ct_dequantizer(reference, ct_dequantized, loaded, bf16_logits, model, case):
    dst = ct_dequantized(model, case)
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    # The files themselves: every tensor within one bf16 step of ours.
    got, want = {}, load_file(reference(model, case) / "model.safetensors")
    for f in sorted(dst.glob("*.safetensors")):
        got.update(load_file(f))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and int(bf16_steps(got[k], want[k]).max()) <= 1, k
    ref, ref_logits = loaded(model, case)
    compare(load(dst), ref, ref_logits, bf16_logits[model], LOGIT_REL[case], f"{model} {case} via CT dequantizer")
