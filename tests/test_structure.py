"""Structural equality with the reference producers engines are tested against: for every (format,
flavor) pair that llm-compressor or ModelOpt produces, shardquant's conversion of the same tiny source
(dense Llama and Qwen3-MoE) has the same quantization config (keys and values, producer-only fields
aside) and the same tensor names, dtypes and shapes as the producer's checkpoint in tests/data
(rebuilt by tools/make_llmc_fixture.py, which names the producers' versions). Every difference is
asserted exactly: the legitimate ones with their reason (docs/formats.md), shardquant's bugs as strict
xfails. The block-fp8 flavor has no producer here and is compared with DeepSeek-V3's layout
(shared/LAYOUTS.md). The matrix comes from the registries (formats.FORMATS x flavors.FLAVORS through
testing.served()), so a newly registered pair is either given a reference or listed in NO_REFERENCE.

Runs without llm-compressor: the fixtures are committed. ModelOpt (test extras) is also run live once,
on the dense model, to check that the committed fixture is still what it writes."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from shardquant import flavors, formats, testing
from shardquant.convert import convert

DATA = Path(__file__).parent / "data"
CT = "compressed-tensors"


def _tool():
    """tools/make_llmc_fixture.py (not a package): the fixtures' sources, recipes and ignore list."""
    name = "make_llmc_fixture"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


TOOL = _tool()

# Which of our (format, flavor) pairs each producer recipe is the reference for.
REFERENCES: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    # docs/formats.md 4.2: channel weights [out, 1] + dynamic per-token inputs. fp8 spells the same scheme
    # with its per-quantizer scale repeated on every row (docs/formats.md "What shardquant 0.2.0 writes").
    ("llmc", "FP8_DYNAMIC"): (("fp8-channel", CT), ("fp8", CT)),
    ("llmc", "FP8_BLOCK"): (("fp8-block", CT),),  # docs/formats.md 5.3
    ("llmc", "NVFP4A16"): (("nvfp4", CT),),  # docs/formats.md 2.2
    ("llmc", "MXFP4A16"): (("mxfp4", CT),),  # docs/formats.md 7
    ("llmc", "MXFP4"): (("mxfp4", CT),),  # the W4A4 preset: the same tensors, activations differ (EXPECTED_CONFIG)
    ("llmc", "MXFP8"): (("mxfp8", CT),),  # docs/formats.md 6
    ("llmc", "MXFP8A16"): (("mxfp8", CT),),  # the weight-only preset: activations differ (EXPECTED_CONFIG)
    ("modelopt", "W4A16_NVFP4"): (("nvfp4", "modelopt"),),  # docs/formats.md 2.1
}
# Served pairs no producer of this set writes. block-fp8 is DeepSeek-V3's own spelling (docs/formats.md
# 1.3, 5.1): llm-compressor writes FP8_BLOCK as compressed-tensors and ModelOpt's FP8_PB_WO is another
# spelling (5.2); test_block_fp8_matches_deepseek_v3 compares it with the DeepSeek-V3 layout instead.
NO_REFERENCE = {("fp8-block", "block-fp8")}

# The fixtures: folder -> (tool, model, recipe), from tools/make_llmc_fixture.py.
FIXTURES = {name: (tool, model, recipe) for name, (tool, model, recipe, _) in TOOL.FIXTURES.items()}
DENSE = {"llama", "llama-tiled"}

ABSENT = "<absent>"  # diff()'s mark for a key one side lacks (after normalise: null or absent)
_MXFP4_ACT = {"dynamic": True, "group_size": 32, "num_bits": 4, "scale_dtype": "torch.uint8", "strategy": "group",
              "symmetric": True, "type": "float"}
_MXFP8_ACT = dict(_MXFP4_ACT, num_bits=8)
# Legitimate config differences, exactly: (recipe, format) -> {path: (ours, the producer's)}.
EXPECTED_CONFIG = {
    # formats/mxfp4.py writes weight-only MXFP4 (MXFP4A16's config): vLLM recognizes MXFP4 from the weights
    # alone and TensorRT-LLM takes only the weight-only group-32 spelling (docs/formats.md 1.2, 7).
    ("MXFP4", "mxfp4"): {"config_groups.0.input_activations": (ABSENT, _MXFP4_ACT)},
    # formats/mxfp8.py writes the MXFP8 preset's dynamic MXFP8 activations (vLLM quantizes them dynamically
    # whatever input_activations says, docs/formats.md 6); MXFP8A16 says weight-only.
    ("MXFP8A16", "mxfp8"): {"config_groups.0.input_activations": (_MXFP8_ACT, ABSENT)},
}
# Legitimate tensor differences: recipe -> the dtype the producer stores `weight_scale` in, where ours is
# F32. llm-compressor's FP8 presets leave scale_dtype null, so it keeps the scale in the source weight's
# dtype (bf16 here); shardquant writes fp32, the dtype vLLM and SGLang allocate the parameter in
# (docs/engine_rules.json ct-fp8-channel-scale-2d, fp8-block-scale-shape; docs/formats.md 4.2, 5.1, 5.3),
# which the bf16 values are copied into. Same shapes; ours is not rounded to bf16.
SCALE_DTYPE = {"FP8_DYNAMIC": "BF16", "FP8_BLOCK": "BF16"}
# shardquant bugs the comparison finds: (fixture, format, flavor) -> reason. Each is a strict xfail.
BUGS: dict[tuple[str, str, str], str] = {}

# Fields of quantization_config left out of the comparison, and why (docs/formats.md section 1 lists the
# keys each engine reads; none of these is one):
PRODUCER_ONLY = {
    "producer",  # shardquant's and ModelOpt's name and version
    "version",  # the compressed-tensors version llm-compressor ran with
    "global_compression_ratio",  # a statistic llm-compressor writes (null here); no engine reads it
}
# Keys where null and absent mean the same to every reader (each is read with a default of None):
NULL_OR_ABSENT = {
    "kv_cache_scheme",  # docs/formats.md 1.1, 1.2: a dict means KV-cache quantization; null or absent: none
    "sparsity_config",  # docs/formats.md 1.2: vLLM raises only for a non-empty one
    "moe_sparsity_config",  # compressed-tensors 0.20 writes it null; 0.19 (llm-compressor's pin) not at all
    "input_activations",  # docs/formats.md 1.1 (ModelOpt: absent in config.json), 2.2 (null: weight-only)
    "output_activations",
}
# Keys where an empty dict and absent are the same: docs/formats.md 1.2, vLLM applies transforms only when
# transform_config names some; llm-compressor writes {}.
EMPTY_OR_ABSENT = {"transform_config"}


# ---------------------------------------------------------------------------------------------
# reading checkpoints: the producer's folder (shards or a structure.json) or ours


def _header(path: Path) -> dict:
    """A safetensors header without shardquant's parser: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _tensors(headers: dict[str, dict]) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for h in headers.values():
        for name, e in h.items():
            if name != "__metadata__":
                assert name not in out, f"{name} in two shards"
                out[name] = (e["dtype"], tuple(e["shape"]))
    return out


def read(d: Path) -> dict:
    """{config, hf_quant (or None), tensors: name -> (dtype, shape)} of a checkpoint folder."""
    if (d / "structure.json").exists():
        doc = json.loads((d / "structure.json").read_text())
        return {"config": doc["config.json"], "hf_quant": doc.get("hf_quant_config.json"),
                "tensors": _tensors(doc["headers"])}
    hq = d / "hf_quant_config.json"
    return {"config": json.loads((d / "config.json").read_text()),
            "hf_quant": json.loads(hq.read_text()) if hq.exists() else None,
            "tensors": _tensors({p.name: _header(p) for p in sorted(d.glob("*.safetensors"))})}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {key: TOOL.source(key, root / key, TOOL.SEED) for key in TOOL.MODELS}


@pytest.fixture(scope="module")
def ours(sources, tmp_path_factory):
    """shardquant's conversion of a source, once per (model, format, flavor). No include/exclude: its
    default rules keep exactly what the fixtures' ignore list names (embeddings, lm_head, routers; norms
    are 1-D), which test_ignore_lists_select_the_same_modules checks."""
    root = tmp_path_factory.mktemp("ours")
    done: dict[tuple[str, str, str], dict] = {}

    def get(model: str, fmt: str, flavor: str) -> dict:
        key = (model, fmt, flavor)
        if key not in done:
            out = root / "-".join(key)
            convert(str(sources[model]), out, fmt, flavor=flavor, device="cpu")
            done[key] = read(out) | {"dir": out}
        return done[key]

    return get


# ---------------------------------------------------------------------------------------------
# normalising quantization configs


def _args(a):
    """QuantizationArgs without its null / {} fields: those are compressed-tensors' defaults, which
    compressed-tensors 0.20 (the version docs/formats.md reads) leaves out when it writes a config."""
    if not isinstance(a, dict):
        return a
    return {k: v for k, v in a.items() if v is not None and v != {}}


def _group(g: dict) -> dict:
    g = {k: v for k, v in g.items() if not (k in NULL_OR_ABSENT and v is None)}
    for k in ("weights", "input_activations", "output_activations"):
        if k in g:
            g[k] = _args(g[k])
    return g


def normalise(q: dict) -> dict:
    """quantization_config as engines read it. config_groups becomes a list sorted by content: engines
    iterate the groups' values and never read their names (docs/formats.md 1.2; llm-compressor names the
    group after its preset, shardquant and ModelOpt "group_0"). `ignore` is compared by what it selects
    (test_ignore_lists_select_the_same_modules) and dropped here."""
    q = {k: v for k, v in q.items() if k not in PRODUCER_ONLY and k != "ignore"}
    q = {k: v for k, v in q.items() if not (k in NULL_OR_ABSENT and v is None)
         and not (k in EMPTY_OR_ABSENT and v == {})}
    if "config_groups" in q:
        q["config_groups"] = sorted((_group(g) for g in q["config_groups"].values()),
                                    key=lambda g: json.dumps(g, sort_keys=True))
    return q


def diff(a, b, path: str = "") -> dict[str, tuple]:
    """{dotted path: (a's value, b's value)} at the first level where they differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple] = {}
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            out.update(diff(a[k], b[k], p) if k in a and k in b else {p: (a.get(k, ABSENT), b.get(k, ABSENT))})
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a and isinstance(a[0], dict):
        out = {}
        for i, (x, y) in enumerate(zip(a, b)):
            out.update(diff(x, y, f"{path}.{i}"))
        return out
    return {} if a == b else {path: (a, b)}


def modules(tensors: dict) -> set[str]:
    """Linear-shaped modules of a source checkpoint: the owners of its 2-D `.weight` tensors."""
    return {n.removesuffix(".weight") for n, (_, shape) in tensors.items() if n.endswith(".weight") and len(shape) == 2}


def ct_ignored(entries: list[str], names: set[str]) -> set[str]:
    """What a compressed-tensors `ignore` list selects in vLLM: an entry equal to the name, or `re:` and
    re.match (anchored at the start only) — docs/formats.md 1.2."""
    return {m for m in names for e in entries if m == e or (e.startswith("re:") and re.match(e[3:], m))}


# ---------------------------------------------------------------------------------------------
# the matrix


def _pairs() -> list:
    """(fixture, format, flavor) for every served pair with a reference, from the registries."""
    return [pytest.param(fx, fmt, fl, id=f"{fx}->{fmt}/{fl}",
                         marks=[pytest.mark.xfail(strict=True, reason=BUGS[(fx, fmt, fl)])]
                         if (fx, fmt, fl) in BUGS else [])
            for fmt, fl in testing.served()
            for fx, (tool, _, recipe) in FIXTURES.items() if (fmt, fl) in REFERENCES[(tool, recipe)]]


def test_every_served_pair_has_a_reference_or_is_listed():
    """A newly registered format or flavor gets a reference fixture here, or is listed as having none."""
    served = {(f, fl) for f in formats.FORMATS for fl in flavors.FLAVORS if flavors.refusal(fl, f) is None}
    assert served == set(testing.served())
    covered = {p for pairs in REFERENCES.values() for p in pairs}
    assert covered <= served, f"references for pairs shardquant refuses: {sorted(covered - served)}"
    assert served - covered == NO_REFERENCE, "served pairs with no reference producer"
    assert NO_REFERENCE == {("fp8-block", "block-fp8")}
    for fmt, fl in sorted(covered):  # each referenced pair has a dense and an MoE fixture
        models = {model for tool, model, recipe in FIXTURES.values() if (fmt, fl) in REFERENCES[(tool, recipe)]}
        assert models & DENSE and models - DENSE, (fmt, fl, models)
    folders = {p.name for p in DATA.iterdir() if p.is_dir() and p.name.startswith(("llmc-", "modelopt-"))}
    assert set(FIXTURES) == folders, "a producer's fixture folder without a recipe, or a recipe without one"
    assert {(t, r) for t, _, r in FIXTURES.values()} == set(REFERENCES)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fixture_is_small_and_of_its_source(fixture):
    """Each fixture is under ~200 KB, and its config (and tensors left in bf16) are those of the source
    tools/make_llmc_fixture.py says it was made from: the comparison is with the right checkpoint."""
    d = DATA / fixture
    assert sum(p.stat().st_size for p in d.iterdir()) < 200_000
    ref = read(d)
    src = TOOL.model(FIXTURES[fixture][1])
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "intermediate_size", "moe_intermediate_size"):
        assert ref["config"].get(k) == src.config.get(k), k
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (ModelOpt's export)
    experts = ref["config"].get("num_experts", ref["config"].get("num_local_experts"))
    assert experts == src.config.get("num_experts")
    spec = {n: (dt, shape) for n, dt, shape in src.specs}
    kept = {n: v for n, v in ref["tensors"].items() if n in spec}
    assert kept, "no source tensor survives in the fixture"
    assert all(spec[n] == v for n, v in kept.items() if v[0] == "BF16")


@pytest.mark.parametrize("fixture,fmt,flavor", _pairs())
def test_structure_matches_reference(fixture, fmt, flavor, ours):
    """Same tensor names, dtypes and shapes; the same quantization config as engines read it; the same
    config files."""
    tool, model, recipe = FIXTURES[fixture]
    ref = read(DATA / fixture)
    us = ours(model, fmt, flavor)
    # tensors: names (set equality), dtype and shape each
    only_ref = sorted(set(ref["tensors"]) - set(us["tensors"]))
    only_us = sorted(set(us["tensors"]) - set(ref["tensors"]))
    assert (only_ref, only_us) == ([], []), "tensor names differ"
    mismatched = {n: (us["tensors"][n], ref["tensors"][n]) for n in ref["tensors"]
                  if us["tensors"][n] != ref["tensors"][n]}
    expected = {}
    if recipe in SCALE_DTYPE:  # the one legitimate difference: F32 scales where the producer stores bf16
        expected = {n: (("F32", shape), (SCALE_DTYPE[recipe], shape))
                    for n, (_, shape) in ref["tensors"].items() if n.endswith(".weight_scale")}
        assert expected
    assert mismatched == expected, "dtype/shape differ (ours, theirs)"
    # quantization_config, normalised: the exact remaining differences are the documented ones
    q_us, q_ref = us["config"]["quantization_config"], ref["config"]["quantization_config"]
    assert diff(normalise(q_us), normalise(q_ref)) == EXPECTED_CONFIG.get((recipe, fmt), {})
    # the fields left out hold what the normalisation assumes
    assert q_ref.get("global_compression_ratio") is None and q_ref.get("transform_config", {}) == {}
    assert q_us["producer"]["name"] == "shardquant"
    # hf_quant_config.json: written by ModelOpt and by our modelopt flavor, the same apart from the producer
    assert (us["hf_quant"] is None) == (ref["hf_quant"] is None)
    if ref["hf_quant"] is not None:
        assert us["hf_quant"]["quantization"] == ref["hf_quant"]["quantization"]
        assert {k for k in ref["hf_quant"] if k != "quantization"} == {"producer"} == \
               {k for k in us["hf_quant"] if k != "quantization"}


@pytest.mark.parametrize("fixture,fmt,flavor", _pairs())
def test_ignore_lists_select_the_same_modules(fixture, fmt, flavor, ours, sources):
    """The exclusion lists differ in spelling, not in what they select. llm-compressor's is the pattern
    list it was given (tools/make_llmc_fixture.py IGNORE: `re:` regexes); shardquant writes exact module
    names, sorted (plan.py exclude_modules), which select the same modules under vLLM's rule (docs/formats.md
    1.2). ModelOpt writes exact names too, sorted: there the lists are equal as written."""
    tool, model, recipe = FIXTURES[fixture]
    ref = read(DATA / fixture)["config"]["quantization_config"]["ignore"]
    us = ours(model, fmt, flavor)["config"]["quantization_config"]["ignore"]
    src = modules(read(sources[model])["tensors"])
    assert us == sorted(us) and all(not e.startswith("re:") for e in us) and set(us) <= src
    if tool == "llmc":
        assert ref == TOOL.IGNORE
        assert set(us) == ct_ignored(ref, src)
    else:
        assert us == ref
    # and the kept modules are exactly the ignored ones, in both checkpoints (bf16 weight, no scales)
    for t in (read(DATA / fixture)["tensors"], ours(model, fmt, flavor)["tensors"]):
        kept = {m for m in src if t.get(f"{m}.weight", ("", ()))[0] == "BF16"}
        assert kept == set(us)


def _scales(d: Path) -> dict[str, np.ndarray]:
    """Every `weight_scale` of a checkpoint folder, as fp32 NumPy arrays."""
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update({n: t.float().numpy() for n, t in load_file(p).items() if n.endswith(".weight_scale")})
    return out


@pytest.mark.parametrize("model", ["llama", "qwen3-moe"])
def test_fp8_scale_per_row_is_the_quantizers(model, ours):
    """fp8 and fp8-channel have FP8_DYNAMIC's tensors; the values differ where designed: FP8_DYNAMIC's
    weight_scale [out, 1] holds each row's own scale, and so does fp8-channel's; fp8's holds the logical
    quantizer's one value on every row (formats/fp8.py: fused q/k/v and gate/up share it)."""
    theirs = _scales(DATA / f"llmc-{model}-fp8-dynamic")
    mine = {fmt: _scales(ours(model, fmt, CT)["dir"]) for fmt in ("fp8", "fp8-channel")}
    assert theirs and set(theirs) == set(mine["fp8"]) == set(mine["fp8-channel"])
    for n, t in theirs.items():
        assert t.shape == mine["fp8"][n].shape == mine["fp8-channel"][n].shape == (t.shape[0], 1)
        assert np.unique(t).size > 1 and np.unique(mine["fp8-channel"][n]).size > 1, n  # one per row
        assert np.unique(mine["fp8"][n]).size == 1, n  # one value, repeated
    def shared(*names: str) -> bool:
        return len({float(mine["fp8"][f"model.layers.0.{n}.weight_scale"][0, 0]) for n in names}) == 1

    assert shared("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp = "mlp" if model == "llama" else "mlp.experts.0"
    assert shared(f"{mlp}.gate_proj", f"{mlp}.up_proj")


# shardquant verify on the producers' own checkpoints (those with weights). llmc-qwen3-moe-nvfp4a16 has
# its expected violations (gate/up global scales per expert) in tests/test_verify.py.
VERIFY_BUGS: dict[str, str] = {}  # fixture -> reason, each a strict xfail: none left


@pytest.mark.parametrize("fixture", [
    pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=VERIFY_BUGS[n])] if n in VERIFY_BUGS else [])
    for n in sorted(FIXTURES)
    if not (DATA / n / "structure.json").exists() and n != "llmc-qwen3-moe-nvfp4a16"])
def test_verify_accepts_the_reference(fixture):
    from shardquant.verify import verify

    tool, model, recipe = FIXTURES[fixture]
    rep = verify(DATA / fixture)
    fmts = [fmt for fmt, fl in REFERENCES[(tool, recipe)]]
    assert rep.format in fmts
    assert [(v.rule, v.name, v.detail) for v in rep.violations] == []
    assert rep.ok


def test_block_fp8_matches_deepseek_v3(tmp_path):
    """block-fp8 against DeepSeek-V3's shipped layout (shared/LAYOUTS.md "DeepSeek-V3 / R1"): every
    linear `W.weight` F8_E4M3 [out, in] with `W.weight_scale_inv` F32 [ceil(out/128), ceil(in/128)];
    embeddings, head, norms, routers and the router bias as in the source; quantization_config with the
    real config's keys and values {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
    weight_block_size: [128, 128]}. Documented additions: `ignored_layers` and `modules_to_not_convert`
    (the same list, docs/formats.md 1.3: vLLM reads the first, transformers the second, SGLang and
    TensorRT-LLM both) and `producer`. The MTP layer is kept in bf16 and listed there (LAYOUTS.md: engines
    expect it excluded or kept as shipped; shardquant's rules exclude it)."""
    src_model = testing.TILED["deepseek_v3"]()
    src = testing.write_checkpoint(tmp_path / "src", src_model, seed=3)
    out = tmp_path / "out"
    convert(str(src), out, "fp8-block", flavor="block-fp8", device="cpu")
    got = read(out)
    q = got["config"]["quantization_config"]
    deepseek_v3 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128]}
    assert {k: q[k] for k in deepseek_v3 if k in q} == deepseek_v3
    assert set(q) - set(deepseek_v3) == {"ignored_layers", "modules_to_not_convert", "producer"}
    assert q["ignored_layers"] == q["modules_to_not_convert"]
    assert got["hf_quant"] is None

    spec = {n: (dt, tuple(shape)) for n, dt, shape in src_model.specs}
    layers, nextn = src_model.config["num_hidden_layers"], src_model.config["num_nextn_predict_layers"]
    mtp = re.compile(rf"model\.layers\.({'|'.join(str(L) for L in range(layers, layers + nextn))})\.")
    linear = re.compile(r"(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
    expected = {}
    for n, (dt, shape) in spec.items():
        m = n.removesuffix(".weight")
        if linear.search(n) and not mtp.match(n):  # LAYOUTS.md: shipped as block FP8
            expected[n] = ("F8_E4M3", shape)
            expected[f"{m}.weight_scale_inv"] = ("F32", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))
        else:  # embeddings, lm_head, norms, mlp.gate (+ e_score_correction_bias), the MTP layer: as shipped
            expected[n] = (dt, shape)
    assert got["tensors"] == expected
    kept_linears = {n.removesuffix(".weight") for n, (dt, shape) in expected.items()
                    if dt == "BF16" and len(shape) == 2}
    assert set(q["ignored_layers"]) == kept_linears
    assert not any(n.endswith((".weight_scale", ".input_scale")) for n in got["tensors"])


def test_modelopt_live_matches_committed_fixture(tmp_path):
    """ModelOpt (the test extras) run now on the dense source writes what the committed fixture holds:
    the fixtures are still the producer's current output (the llm-compressor ones are checked the same
    way by rerunning tools/make_llmc_fixture.py, which reproduces them byte for byte)."""
    pytest.importorskip("modelopt")
    pytest.importorskip("transformers")
    name = "modelopt-llama-w4a16-nvfp4"
    tool, model, recipe = FIXTURES[name]
    out = TOOL.build_modelopt(tmp_path / name, model, recipe, False)
    live, committed = read(out), read(DATA / name)
    assert live["tensors"] == committed["tensors"]
    assert live["hf_quant"] == committed["hf_quant"]
    assert live["config"]["quantization_config"] == committed["config"]["quantization_config"]
