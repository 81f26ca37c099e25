"""Quantized and fused sources (issue 14): the fixtures of shardquant/testing_sources.py in the real
layouts of ../shared/LAYOUTS.md, and the recognizer of shardquant/encoding.py.

- Every fixture is written with testing.write_checkpoint and read back with shardquant's own header
  reader (source.scan, st.read_raw): names, dtypes, shapes and bytes as built, several shards, and
  per-expert tensors of one layer in more than one shard.
- Names and shapes against the patterns LAYOUTS.md documents for each model (tables below, written
  from LAYOUTS.md, not from the builders).
- The recognizer classifies every tensor as the builder says it built it, and consumes every scale
  tensor exactly once.
- decode_weight (shardquant/decode.py's arithmetic) reproduces the fixture's float64 references bit for
  bit, -0.0 included; the planted edge cases are where the fixture says, and a lossless MXFP4 -> NVFP4
  cast (decode.mxfp4_to_nvfp4) re-quantizes exactly the planted out-of-range block.
- Bad inputs: SourceError, one line, naming the tensor.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from shardquant import decode, encoding
from shardquant.encoding import (BLOCK_FP8, FUSED_3D, HALVES, IN_OUT, INTERLEAVED, MXFP4, MXFP4_3D, OUT_IN, PAIRINGS,
                                 PLAIN, PLAIN_3D, SourceEncoding, describe, recognize)
from shardquant.errors import SourceError
from shardquant.source import scan
from shardquant.st import OutTensor, read_raw
from shardquant.testing_sources import SOURCES

PER_EXPERT = ("deepseek_v3", "deepseek_v4", "kimi_k3")  # one tensor per expert: they must straddle shards


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (fixture, Checkpoint): each fixture built and written once."""
    out = {}
    for name, build in SOURCES.items():
        fx = build()
        root = fx.write(tmp_path_factory.mktemp(name))
        out[name] = (fx, scan(root))
    return out


def headers(fx) -> dict[str, OutTensor]:
    return {n: OutTensor(n, d, s) for n, d, s in fx.model.specs}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# Writing and reading back


@pytest.mark.parametrize("name", SOURCES)
def test_fixture_writes_and_reads_back(written, name):
    fx, ck = written[name]
    assert [(t.name, t.dtype, t.shape) for t in ck.tensors.values()] == [(n, d, tuple(s)) for n, d, s in fx.model.specs]
    for t in ck.tensors.values():
        assert read_raw(t).tobytes() == fx.arrays[t.name].tobytes(), t.name
    assert json.loads((ck.root / "config.json").read_text()) == fx.config
    assert len(ck.shards) >= 2
    if name in PER_EXPERT:  # some layer's experts live in more than one shard, as in the real checkpoints
        files: dict[str, set] = {}
        for t in ck.tensors.values():
            m = re.fullmatch(r"(.*)\.experts\.\d+\..*", t.name)
            if m:
                files.setdefault(m[1], set()).add(t.file.name)
        assert files and max(len(f) for f in files.values()) >= 2


# ---------------------------------------------------------------------------------------------
# Names and shapes as ../shared/LAYOUTS.md documents them

ANY = "any"
FLOAT = ("BF16", "F16", "F32")


def _c(cfg: dict) -> dict:
    return {**cfg, **cfg.get("text_config", {})}


def _tiles(shape) -> tuple[int, int]:
    return (-(-shape[0] // 128), -(-shape[1] // 128))


def _moe(c, m):
    return int(m["L"]) >= c.get("first_k_dense_replace", 0) and int(m["E"]) < c.get("n_routed_experts", c.get("num_experts", 0))


_V3L = r"model\.layers\.(?P<L>\d+)\."
# LAYOUTS.md "DeepSeek-V3 / R1": every tensor of the checkpoint.
V3_DOC = [
    (r"model\.embed_tokens\.weight|lm_head\.weight", "BF16", lambda c, m, t: (c["vocab_size"], c["hidden_size"])),
    (r"model\.norm\.weight", "BF16", lambda c, m, t: (c["hidden_size"],)),
    (_V3L + r"(?:input_layernorm|post_attention_layernorm)\.weight", "BF16", lambda c, m, t: (c["hidden_size"],)),
    (_V3L + r"self_attn\.q_a_proj\.weight", "F8_E4M3", lambda c, m, t: (c["q_lora_rank"], c["hidden_size"])),
    (_V3L + r"self_attn\.q_a_layernorm\.weight", "BF16", lambda c, m, t: (c["q_lora_rank"],)),
    (_V3L + r"self_attn\.q_b_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]), c["q_lora_rank"])),
    (_V3L + r"self_attn\.kv_a_proj_with_mqa\.weight", "F8_E4M3",
     lambda c, m, t: (c["kv_lora_rank"] + c["qk_rope_head_dim"], c["hidden_size"])),
    (_V3L + r"self_attn\.kv_a_layernorm\.weight", "BF16", lambda c, m, t: (c["kv_lora_rank"],)),
    (_V3L + r"self_attn\.kv_b_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])),
    (_V3L + r"self_attn\.o_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["hidden_size"], c["num_attention_heads"] * c["v_head_dim"])),
    (_V3L + r"mlp\.(?:gate|up)_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["intermediate_size"], c["hidden_size"]) if int(m["L"]) < c["first_k_dense_replace"] else None),
    (_V3L + r"mlp\.down_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["hidden_size"], c["intermediate_size"]) if int(m["L"]) < c["first_k_dense_replace"] else None),
    (_V3L + r"mlp\.gate\.weight", "BF16",
     lambda c, m, t: (c["n_routed_experts"], c["hidden_size"]) if int(m["L"]) >= c["first_k_dense_replace"] else None),
    (_V3L + r"mlp\.gate\.e_score_correction_bias", "F32",
     lambda c, m, t: (c["n_routed_experts"],) if int(m["L"]) >= c["first_k_dense_replace"] else None),
    (_V3L + r"mlp\.experts\.(?P<E>\d+)\.(?:gate|up)_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["moe_intermediate_size"], c["hidden_size"]) if _moe(c, m) else None),
    (_V3L + r"mlp\.experts\.(?P<E>\d+)\.down_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["hidden_size"], c["moe_intermediate_size"]) if _moe(c, m) else None),
    (_V3L + r"mlp\.shared_experts\.(?:gate|up)_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["moe_intermediate_size"] * c["n_shared_experts"], c["hidden_size"])),
    (_V3L + r"mlp\.shared_experts\.down_proj\.weight", "F8_E4M3",
     lambda c, m, t: (c["hidden_size"], c["moe_intermediate_size"] * c["n_shared_experts"])),
    # the MTP layer, index num_hidden_layers
    (_V3L + r"(?:embed_tokens|shared_head\.head)\.weight", "BF16",
     lambda c, m, t: (c["vocab_size"], c["hidden_size"]) if int(m["L"]) == c["num_hidden_layers"] else None),
    (_V3L + r"(?:enorm|hnorm|shared_head\.norm)\.weight", "BF16",
     lambda c, m, t: (c["hidden_size"],) if int(m["L"]) == c["num_hidden_layers"] else None),
    (_V3L + r"eh_proj\.weight", "BF16",
     lambda c, m, t: (c["hidden_size"], 2 * c["hidden_size"]) if int(m["L"]) == c["num_hidden_layers"] else None),
    (r"(?P<w>.+\.weight)_scale_inv", "F32", lambda c, m, t: _tiles(t[m["w"]])),
]

_V4B = r"(?:layers\.(?P<L>\d+)|mtp\.(?P<M>\d+))\."


def _v4_ratio(c, m) -> int:
    i = int(m["L"]) if m["L"] is not None else c["num_hidden_layers"] + int(m["M"])
    return c["compress_ratios"][i]


def _v4_hash(c, m) -> bool:
    return m["L"] is not None and int(m["L"]) < c["num_hash_layers"]


# LAYOUTS.md "DeepSeek-V4": every tensor of the checkpoint (shapes of the high-precision extras, which
# LAYOUTS.md does not give, are not checked).
V4_DOC = [
    (r"embed\.weight|head\.weight", "BF16", lambda c, m, t: (c["vocab_size"], c["hidden_size"])),
    (r"norm\.weight", "BF16", lambda c, m, t: (c["hidden_size"],)),
    (r"(?:mtp\.\d+\.)?hc_head_(?:fn|base|scale)", "F32", ANY),
    (_V4B + r"ffn\.experts\.(?P<E>\d+)\.w[13]\.weight", "I8",
     lambda c, m, t: (c["moe_intermediate_size"], c["hidden_size"] // 2)),
    (_V4B + r"ffn\.experts\.(?P<E>\d+)\.w2\.weight", "I8",
     lambda c, m, t: (c["hidden_size"], c["moe_intermediate_size"] // 2)),
    (_V4B + r"ffn\.experts\.(?P<E>\d+)\.w[13]\.scale", "F8_E8M0",
     lambda c, m, t: (c["moe_intermediate_size"], c["hidden_size"] // 32)),
    (_V4B + r"ffn\.experts\.(?P<E>\d+)\.w2\.scale", "F8_E8M0",
     lambda c, m, t: (c["hidden_size"], c["moe_intermediate_size"] // 32)),
    (_V4B + r"attn\.wq_a\.weight", "F8_E4M3", lambda c, m, t: (c["q_lora_rank"], c["hidden_size"])),
    (_V4B + r"attn\.wq_b\.weight", "F8_E4M3", lambda c, m, t: (c["num_attention_heads"] * c["head_dim"], c["q_lora_rank"])),
    (_V4B + r"attn\.wkv\.weight", "F8_E4M3", lambda c, m, t: (c["head_dim"], c["hidden_size"])),
    (_V4B + r"attn\.wo_a\.weight", "F8_E4M3", lambda c, m, t: (
        c["o_groups"] * c["o_lora_rank"], c["num_attention_heads"] * c["head_dim"] // c["o_groups"])),
    (_V4B + r"attn\.wo_b\.weight", "F8_E4M3", lambda c, m, t: (c["hidden_size"], c["o_groups"] * c["o_lora_rank"])),
    (_V4B + r"attn\.indexer\.wq_b\.weight", "F8_E4M3", lambda c, m, t: (
        c["index_n_heads"] * c["index_head_dim"], c["q_lora_rank"]) if _v4_ratio(c, m) == 4 else None),
    (_V4B + r"ffn\.shared_experts\.w[13]\.weight", "F8_E4M3", lambda c, m, t: (c["moe_intermediate_size"], c["hidden_size"])),
    (_V4B + r"ffn\.shared_experts\.w2\.weight", "F8_E4M3", lambda c, m, t: (c["hidden_size"], c["moe_intermediate_size"])),
    (r"mtp\.\d+\.(?:e_proj|h_proj)\.weight", "F8_E4M3", lambda c, m, t: (c["hidden_size"], c["hidden_size"])),
    (r"(?P<w>.+)\.scale", "F8_E8M0", lambda c, m, t: _tiles(t[m["w"] + ".weight"])),
    (_V4B + r"ffn\.gate\.weight", "BF16", lambda c, m, t: (c["n_routed_experts"], c["hidden_size"])),
    (_V4B + r"ffn\.gate\.bias", "F32", lambda c, m, t: None if _v4_hash(c, m) else (c["n_routed_experts"],)),
    (_V4B + r"ffn\.gate\.tid2eid", "I64",
     lambda c, m, t: (c["vocab_size"], c["num_experts_per_tok"]) if _v4_hash(c, m) else None),
    (_V4B + r"attn\.attn_sink", "F32", lambda c, m, t: (c["num_attention_heads"],)),
    (_V4B + r"attn\.compressor\.(?:ape|wkv\.weight|wgate\.weight|norm\.weight)", FLOAT,
     lambda c, m, t: ANY if _v4_ratio(c, m) in (4, 128) else None),
    (_V4B + r"attn\.indexer\.(?:weights_proj\.weight|compressor\..+)", FLOAT,
     lambda c, m, t: ANY if _v4_ratio(c, m) == 4 else None),
    (_V4B + r"(?:attn_norm|ffn_norm|attn\.q_norm|attn\.kv_norm)\.weight", "BF16", ANY),
    (_V4B + r"hc_(?:attn|ffn)_(?:fn|base|scale)", "F32", ANY),
    (r"mtp\.\d+\.(?:enorm|hnorm|norm)\.weight", "BF16", lambda c, m, t: (c["hidden_size"],)),
]

_KE = r"language_model\.model\.layers\.(?P<L>\d+)\.block_sparse_moe\.experts\.(?P<E>\d+)\."
# LAYOUTS.md "Kimi-K3": the routed experts; everything else high precision.
KIMI_DOC = [
    (_KE + r"w[13]\.weight_packed", "U8",
     lambda c, m, t: (c["moe_intermediate_size"], c["routed_expert_hidden_size"] // 2) if _moe(c, m) else None),
    (_KE + r"w2\.weight_packed", "U8",
     lambda c, m, t: (c["routed_expert_hidden_size"], c["moe_intermediate_size"] // 2) if _moe(c, m) else None),
    (r"(?P<w>.+)\.weight_scale", "U8", lambda c, m, t: (t[m["w"] + ".weight_packed"][0],
                                                        t[m["w"] + ".weight_packed"][1] * 2 // 32)),
]

_GM = r"model\.layers\.(?P<L>\d+)\.mlp\."
# LAYOUTS.md "gpt-oss"
GPT_OSS_DOC = [
    (_GM + r"experts\.gate_up_proj_blocks", "U8", lambda c, m, t: (
        c["num_local_experts"], 2 * c["intermediate_size"], c["hidden_size"] // 32, 16)),
    (_GM + r"experts\.gate_up_proj_scales", "U8", lambda c, m, t: (
        c["num_local_experts"], 2 * c["intermediate_size"], c["hidden_size"] // 32)),
    (_GM + r"experts\.gate_up_proj_bias", "BF16", lambda c, m, t: (c["num_local_experts"], 2 * c["intermediate_size"])),
    (_GM + r"experts\.down_proj_blocks", "U8", lambda c, m, t: (
        c["num_local_experts"], c["hidden_size"], c["intermediate_size"] // 32, 16)),
    (_GM + r"experts\.down_proj_scales", "U8", lambda c, m, t: (
        c["num_local_experts"], c["hidden_size"], c["intermediate_size"] // 32)),
    (_GM + r"experts\.down_proj_bias", "BF16", lambda c, m, t: (c["num_local_experts"], c["hidden_size"])),
    (_GM + r"router\.weight", "BF16", lambda c, m, t: (c["num_local_experts"], c["hidden_size"])),
    (_GM + r"router\.bias", "BF16", lambda c, m, t: (c["num_local_experts"],)),
    (r"model\.layers\.\d+\.self_attn\.sinks", "BF16", lambda c, m, t: (c["num_attention_heads"],)),
    (r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.(?:weight|bias)", "BF16", ANY),
]
# gpt-oss with its experts dequantized (docs/formats.md "gpt-oss layout": the model's [E, in, out] parameters)
GPT_OSS_BF16_DOC = [
    (_GM + r"experts\.gate_up_proj", "BF16", lambda c, m, t: (
        c["num_local_experts"], c["hidden_size"], 2 * c["intermediate_size"])),
    (_GM + r"experts\.down_proj", "BF16", lambda c, m, t: (
        c["num_local_experts"], c["intermediate_size"], c["hidden_size"])),
] + [row for row in GPT_OSS_DOC if "_blocks" not in row[0] and "_scales" not in row[0]]

_LF = r"language_model\.model\.layers\.(?P<L>\d+)\.feed_forward\."
# LAYOUTS.md "Llama 4"
LLAMA4_DOC = [
    (_LF + r"experts\.gate_up_proj", "BF16", lambda c, m, t: (
        c["num_local_experts"], c["hidden_size"], 2 * c["intermediate_size"])),
    (_LF + r"experts\.down_proj", "BF16", lambda c, m, t: (
        c["num_local_experts"], c["intermediate_size"], c["hidden_size"])),
    (_LF + r"router\.weight", "BF16", lambda c, m, t: (c["num_local_experts"], c["hidden_size"])),
    (_LF + r"shared_expert\.(?:gate|up)_proj\.weight", "BF16", lambda c, m, t: (c["intermediate_size"], c["hidden_size"])),
    (_LF + r"shared_expert\.down_proj\.weight", "BF16", lambda c, m, t: (c["hidden_size"], c["intermediate_size"])),
    (r"(?:vision_model|multi_modal_projector)\..+", FLOAT, ANY),
]

_QM = r"model\.layers\.(?P<L>\d+)\.mlp\."
# LAYOUTS.md "transformers-5 style fused experts"
FUSED_DOC = [
    (_QM + r"experts\.gate_up_proj", "BF16", lambda c, m, t: (
        c["num_experts"], 2 * c["moe_intermediate_size"], c["hidden_size"])),
    (_QM + r"experts\.down_proj", "BF16", lambda c, m, t: (
        c["num_experts"], c["hidden_size"], c["moe_intermediate_size"])),
    (_QM + r"shared_expert\.(?:gate|up|down)_proj\.weight", "BF16", ANY),
    (_QM + r"shared_expert_gate\.weight", "BF16", lambda c, m, t: (1, c["hidden_size"])),
]

# name -> (table, whether it lists every tensor; where not, the rest must be high precision)
DOCUMENTED = {
    "deepseek_v3": (V3_DOC, True), "deepseek_v4": (V4_DOC, True), "kimi_k3": (KIMI_DOC, False),
    "gpt_oss": (GPT_OSS_DOC, False), "gpt_oss_bf16": (GPT_OSS_BF16_DOC, False), "llama4": (LLAMA4_DOC, False), "fused_experts": (FUSED_DOC, False),
}


@pytest.mark.parametrize("name", SOURCES)
def test_names_and_shapes_as_documented(written, name):
    fx, ck = written[name]
    table, complete = DOCUMENTED[name]
    c = _c(fx.config)
    shapes = {n: t.shape for n, t in ck.tensors.items()}
    used = Counter()
    for n, t in ck.tensors.items():
        row = next(((i, m) for i, (rx, *_) in enumerate(table) if (m := re.fullmatch(rx, n))), None)
        if row is None:
            assert not complete, f"{n} is not a documented {name} tensor"
            assert t.dtype in FLOAT + ("I64",), f"{n}: {t.dtype} outside the documented quantized tensors"
            continue
        i, m = row
        used[i] += 1
        _, dtypes, shape = table[i]
        assert t.dtype in ((dtypes,) if isinstance(dtypes, str) else dtypes), n
        want = shape if shape == ANY else shape(c, m, shapes)
        assert want is not None, f"{n} is not documented at this layer"
        if want != ANY:
            assert t.shape == tuple(want), (n, t.shape, want)
    assert sorted(used) == list(range(len(table))), "a documented tensor kind is missing from the fixture"


# ---------------------------------------------------------------------------------------------
# Recognizing


@pytest.mark.parametrize("name", SOURCES)
def test_recognizer_classifies_every_tensor(written, name):
    fx, ck = written[name]
    layout = recognize(ck.tensors, fx.config)
    assert list(layout.encodings) == list(fx.expected)  # every logical weight, in source order
    for logical, want in fx.expected.items():
        got = layout.encodings[logical]
        assert (got.name, got.kind, got.data, got.scales, got.shape, got.experts, got.orientation, got.gate_up) == \
            (logical, want.kind, want.data, want.scales, want.shape, want.experts, want.orientation, want.gate_up)
    # every tensor is read by exactly one encoding; every scale consumed once and never as data
    reads = Counter(t for e in layout.encodings.values() for t in e.tensors)
    assert set(reads) == set(ck.tensors) and set(reads.values()) == {1}
    scales = {s for w in fx.expected.values() for s in w.scales}
    assert layout.scales == scales
    assert all(layout.of(s).scales == (s,) for s in scales)
    assert not scales & {d for e in layout.encodings.values() for d in e.data}


@pytest.mark.parametrize("name", SOURCES)
def test_decoding_reproduces_the_reference(written, name):
    fx, ck = written[name]
    layout = recognize(ck.tensors, fx.config)
    cache: dict[str, np.ndarray] = {}

    def read(n):
        if n not in cache:
            cache[n] = read_raw(ck.tensors[n])
        return cache[n]

    checked = 0
    for logical, ref in fx.reference.items():
        enc = layout.encodings[logical]
        if enc.experts is None:
            assert same_bits(encoding.decode_weight(enc, read), ref), logical
        else:
            for e in range(enc.experts):
                assert same_bits(encoding.decode_weight(enc, read, e), ref[e]), (logical, e)
        checked += 1
    assert checked == sum(1 for e in layout.encodings.values() if e.dtype != "I64")


@pytest.mark.parametrize("name", SOURCES)
def test_planted_edge_cases(written, name):
    fx, ck = written[name]
    layout = recognize(ck.tensors, fx.config)
    p = fx.planted
    assert "neg_zero" in p and "dead_expert" in p and (name in ("llama4", "fused_experts", "gpt_oss_bf16") or "zero_block" in p)
    for logical, expert, r, c in p["neg_zero"]:
        v = fx.reference[logical] if expert is None else fx.reference[logical][expert]
        assert v[r, c] == 0 and np.signbit(v[r, c]), (logical, r, c)
    for logical, expert, r, b in p.get("zero_block", []):
        enc = layout.encodings[logical]
        w = enc.block[1] if enc.kind == BLOCK_FP8 else 32
        rows = slice(0, 128) if enc.kind == BLOCK_FP8 else slice(r, r + 1)
        v = fx.reference[logical] if expert is None else fx.reference[logical][expert]
        assert not np.any(v[rows, b * w:(b + 1) * w]), logical
    for dead in p["dead_expert"]:
        logical, expert = (dead, None) if isinstance(dead, str) else dead
        v = fx.reference[logical] if expert is None else fx.reference[logical][expert]
        assert not np.any(v), dead
    mx = [e for e in layout.encodings.values() if e.kind in (MXFP4, MXFP4_3D)]
    if not mx:
        assert "out_of_range" not in p
        return
    assert len(p["out_of_range"]) == 1
    # a lossless cast per gate/up group re-quantizes exactly the planted block, nothing else
    requant = []
    for enc in mx:
        for member_groups in _mx_groups(layout, enc, ck):
            top = decode.e8m0_group_max([s for _, s, _ in member_groups])
            for packed, e8m0, where in member_groups:
                n = decode.mxfp4_to_nvfp4(packed, e8m0, top)[3]
                d = e8m0.astype(int) - (127 + decode.mx_global_exponent(top))
                rows, blocks = np.nonzero(d < decode.E4M3_KMIN)
                live = [(*where, int(rr), int(bb)) for rr, bb in zip(rows, blocks)
                        if np.any(packed[rr, bb * 16:(bb + 1) * 16] & 0x77)]  # a non-zero magnitude
                assert n == len(live)
                requant += live
    assert requant == [tuple(p["out_of_range"][0])]


def _mx_groups(layout, enc: SourceEncoding, ck):
    """The logical quantizers of an MXFP4 weight, each [(packed, e8m0, (logical name, expert))]: 2-D
    experts: w1 with its w3 (w2 alone); gpt-oss: one expert's gate_up, whose interleaved rows are gate
    and up together (rows numbered as stored)."""
    data, scales = read_raw(ck.tensors[enc.data[0]]).view(np.uint8), read_raw(ck.tensors[enc.scales[0]]).view(np.uint8)
    if enc.kind == MXFP4:
        if ".w3." in enc.name:
            return []
        if ".w1." not in enc.name:
            return [[(data, scales, (enc.name, None))]]
        up = layout.encodings[enc.name.replace(".w1.", ".w3.")]
        u = read_raw(ck.tensors[up.data[0]]).view(np.uint8), read_raw(ck.tensors[up.scales[0]]).view(np.uint8)
        return [[(data, scales, (enc.name, None)), (*u, (up.name, None))]]
    groups = []
    for e in range(enc.experts):
        packed, e8m0 = decode.gpt_oss_expert(data, scales, e)
        if enc.gate_up is None:
            groups.append([(packed, e8m0, (enc.name, e))])
            continue
        assert enc.interleaved
        (gp, up), (gs, us) = encoding.split_gate_up(enc, packed), encoding.split_gate_up(enc, e8m0)
        assert np.array_equal(np.stack([gp, up], 1).reshape(packed.shape), packed)
        assert decode.e8m0_group_max([gs, us]) == decode.e8m0_group_max([e8m0])
        groups.append([(packed, e8m0, (enc.name, e))])
    return groups


def test_describe():
    def enc(**kw):
        base = dict(name="x", kind=PLAIN, dtype="BF16", data=("x",))
        return SourceEncoding(**{**base, **kw})

    assert describe(enc(kind=BLOCK_FP8, dtype="F8_E4M3", scale_dtype="F32", block=(128, 128))) == \
        "block-FP8 128x128, F32 scales"
    assert describe(enc(kind=BLOCK_FP8, dtype="F8_E4M3", scale_dtype="E8M0", block=(128, 128))) == \
        "block-FP8 128x128, E8M0 scales"
    assert describe(enc(kind=MXFP4, dtype="U8", scale_dtype="E8M0", block=(1, 32))) == "MXFP4, E8M0 scales per 32"
    assert describe(enc(kind=MXFP4_3D, dtype="U8", experts=32, orientation=OUT_IN, gate_up=INTERLEAVED)) == \
        "MXFP4 3-D, 32 experts [E, out, in], gate/up interleaved, E8M0 scales per 32"
    assert describe(enc(kind=PLAIN_3D, experts=16, orientation=IN_OUT, gate_up=HALVES)) == \
        "plain BF16 3-D, 16 experts [E, in, out], gate/up halves"
    assert describe(enc()) == "plain BF16"


# ---------------------------------------------------------------------------------------------
# The tables, one case per row


def _t(*specs) -> dict[str, OutTensor]:
    return {n: OutTensor(n, d, tuple(s)) for n, d, s in specs}


# (headers, config, logical name, kind, rule, shape, scale dtype or orientation/gate_up)
PAIRING_CASES = [
    (_t(("a.weight", "F8_E4M3", (300, 130)), ("a.weight_scale_inv", "F32", (3, 2))), None,
     "a.weight", BLOCK_FP8, "fp8-scale-inv", (300, 130), "F32"),
    (_t(("a.weight", "F8_E4M3", (256, 128)), ("a.scale", "F8_E8M0", (2, 1))), None,
     "a.weight", BLOCK_FP8, "fp8-scale", (256, 128), "E8M0"),
    (_t(("a.weight", "I8", (4, 32)), ("a.scale", "F8_E8M0", (4, 2))), None,
     "a.weight", MXFP4, "fp4-scale", (4, 64), "E8M0"),
    (_t(("a.weight_scale", "U8", (4, 1)), ("a.weight_packed", "U8", (4, 16))), None,  # scale first: order-free
     "a.weight", MXFP4, "ct-mxfp4", (4, 32), "E8M0"),
    (_t(("m.mlp.experts.down_proj_blocks", "U8", (2, 8, 3, 16)), ("m.mlp.experts.down_proj_scales", "U8", (2, 8, 3))),
     {"model_type": "gpt_oss"}, "m.mlp.experts.down_proj", MXFP4_3D, "gpt-oss-mxfp4, gpt-oss-mxfp4", (8, 96), "E8M0"),
    # weight_block_size from config.json
    (_t(("a.weight", "F8_E4M3", (128, 128)), ("a.weight_scale_inv", "F32", (2, 2))),
     {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
     "a.weight", BLOCK_FP8, "fp8-scale-inv", (128, 128), "F32"),
]


@pytest.mark.parametrize("case", PAIRING_CASES, ids=lambda c: c[4])
def test_pairing_rows(case):
    tensors, config, logical, kind, rule, shape, sdt = case
    layout = recognize(tensors, config)
    e = layout.encodings[logical]
    assert (e.kind, e.rule, e.shape, e.scale_dtype) == (kind, rule, shape, sdt)
    assert layout.scales == frozenset(e.scales) and len(layout.encodings) == 1


def test_pairing_cases_cover_every_row():
    assert {c[4].split(",")[0] for c in PAIRING_CASES} == {p.name for p in PAIRINGS}


FUSED_CASES = [
    ("gpt-oss-mxfp4", {"model_type": "gpt_oss"},
     _t(("l.mlp.experts.gate_up_proj_blocks", "U8", (2, 12, 2, 16)), ("l.mlp.experts.gate_up_proj_scales", "U8", (2, 12, 2)),
        ("l.mlp.experts.gate_up_proj_bias", "BF16", (2, 12))),
     "l.mlp.experts.gate_up_proj", (12, 64), OUT_IN, INTERLEAVED, "l.mlp.experts.gate_up_proj_bias"),
    ("gpt-oss-bf16", {"model_type": "gpt_oss"}, _t(("l.mlp.experts.gate_up_proj", "BF16", (2, 64, 12))),
     "l.mlp.experts.gate_up_proj", (12, 64), IN_OUT, INTERLEAVED, None),
    ("llama4", {"model_type": "llama4", "text_config": {"model_type": "llama4_text"}},
     _t(("t.feed_forward.experts.down_proj", "BF16", (2, 6, 64))), "t.feed_forward.experts.down_proj", (64, 6), IN_OUT,
     None, None),
    ("transformers-5", {"model_type": "qwen3_5_moe"}, _t(("l.mlp.experts.gate_up_proj", "F16", (2, 12, 64))),
     "l.mlp.experts.gate_up_proj", (12, 64), OUT_IN, HALVES, None),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c[0])
def test_fused_3d_rows(case):
    row, config, tensors, logical, shape, orientation, gate_up, bias = case
    e = recognize(tensors, config).encodings[logical]
    assert e.rule.split(", ")[-1] == row
    assert (e.shape, e.experts, e.orientation, e.gate_up, e.bias) == (shape, 2, orientation, gate_up, bias)
    assert e.members[0][1] == ((shape[0] // 2, shape[1]) if gate_up else shape)


def test_fused_cases_cover_every_row():
    assert {c[0] for c in FUSED_CASES} == {f.name for f in FUSED_3D}


def test_split_gate_up():
    x = np.arange(8)
    halves = recognize(_t(("l.mlp.experts.gate_up_proj", "BF16", (1, 8, 4))), {}).encodings["l.mlp.experts.gate_up_proj"]
    inter = recognize(_t(("l.mlp.experts.gate_up_proj", "BF16", (1, 4, 8))), {"model_type": "gpt_oss"}
                      ).encodings["l.mlp.experts.gate_up_proj"]
    assert [v.tolist() for v in encoding.split_gate_up(halves, x)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [v.tolist() for v in encoding.split_gate_up(inter, x)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="not a fused gate_up"):
        encoding.split_gate_up(SourceEncoding("x", PLAIN, "BF16", ("x",)), x)


def test_plain_tensors_of_other_ranks_stay_plain():
    """A 3-D or 4-D float tensor that is not a fused expert (Kimi-K3's pos_emb, conv1d, patch_embed) is plain."""
    t = _t(("v.patch_embed.pos_emb.weight", "BF16", (4, 4, 32)), ("v.patch_embed.proj.weight", "BF16", (32, 3, 14, 14)),
           ("s.q_conv1d.weight", "F32", (64, 1, 4)), ("g.tid2eid", "I64", (10, 2)), ("n.scale", "F32", (8,)))
    layout = recognize(t, {"model_type": "kimi_k3"})
    assert {e.kind for e in layout.encodings.values()} == {PLAIN} and not layout.scales


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _edit(source: str, **changes):
    """The headers of a fixture with tensors changed ({name: (dtype, shape)}), removed (None) or added,
    and its config (`config=` patches it)."""
    fx = SOURCES[source]()
    cfg = dict(fx.config, **changes.pop("config", {}))
    tensors = headers(fx)
    for n, v in changes.items():
        n = n.replace("__", ".")
        if v is None:
            del tensors[n]
        else:
            tensors[n] = OutTensor(n, *v)
    return tensors, cfg


_V3Q = "model__layers__0__self_attn__kv_a_proj_with_mqa__weight"
_V3E = "model__layers__1__mlp__experts__0__gate_proj__weight"
_V4E = "layers__1__ffn__experts__2__w1"
_K3E = "language_model__model__layers__1__block_sparse_moe__experts__0__w2"
_GO = "model__layers__0__mlp__experts__gate_up_proj"
BAD = [
    ("scale missing", "deepseek_v3", {_V3Q + "_scale_inv": None},
     ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "F8_E4M3", "no scale", "weight_scale_inv"]),
    ("scale shape", "deepseek_v3", {_V3Q + "_scale_inv": ("F32", (1, 2))},
     ["kv_a_proj_with_mqa.weight_scale_inv", "[1, 2]", "needs [2, 2]", "128x128"]),
    ("scale dtype", "deepseek_v3", {_V3E + "_scale_inv": ("BF16", (1, 2))},
     ["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv", "BF16"]),
    ("orphan scale", "deepseek_v3", {_V3E: None},
     ["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv", "no data tensor"]),
    ("scale of a float weight", "deepseek_v3", {_V3E: ("BF16", (128, 256))},
     ["gate_proj.weight_scale_inv", "gate_proj.weight", "BF16", "not quantized"]),
    ("fp8 e5m2", "deepseek_v3", {_V3E: ("F8_E5M2", (128, 256))}, ["gate_proj.weight", "F8_E5M2", "no pairing takes"]),
    ("lone fp8", "deepseek_v3", {"model__norm__weight": ("F8_E4M3", (256,))}, ["model.norm.weight", "no scale"]),
    ("fp4 scale missing", "deepseek_v4", {_V4E + "__scale": None}, ["layers.1.ffn.experts.2.w1.weight", "I8", "no scale"]),
    ("fp4 scale shape", "deepseek_v4", {_V4E + "__scale": ("F8_E8M0", (128, 16))},
     ["layers.1.ffn.experts.2.w1.scale", "needs [128, 8]", "per 32"]),
    ("fp4 scale dtype", "deepseek_v4", {_V4E + "__scale": ("F32", (128, 8))}, ["layers.1.ffn.experts.2.w1.scale", "F32"]),
    ("e8m0 orphan", "deepseek_v4", {"layers__0__attn__wkv__weight": None}, ["layers.0.attn.wkv.scale", "no data tensor"]),
    ("fp4 odd packing", "deepseek_v4", {_V4E + "__weight": ("I8", (128, 120))}, ["w1.weight", "240 E2M1 codes"]),
    ("ct nvfp4 scale", "kimi_k3", {_K3E + "__weight_scale": ("F8_E4M3", (128, 4))},
     ["experts.0.w2.weight_scale", "F8_E4M3"]),
    ("ct scale shape", "kimi_k3", {_K3E + "__weight_scale": ("U8", (128, 4))}, ["experts.0.w2.weight_scale", "[128, 2]"]),
    ("ct packed alone", "kimi_k3", {_K3E + "__weight_scale": None}, ["experts.0.w2.weight_packed", "no scale"]),
    ("gpt-oss scales missing", "gpt_oss", {_GO + "_scales": None}, ["gate_up_proj_blocks", "U8", "no scale"]),
    ("gpt-oss block bytes", "gpt_oss", {_GO + "_blocks": ("U8", (4, 128, 8, 8))}, ["gate_up_proj_blocks", "16 bytes"]),
    ("gpt-oss scale shape", "gpt_oss", {_GO + "_scales": ("U8", (4, 128, 8))}, ["gate_up_proj_scales", "[4, 128, 4]"]),
    ("gpt-oss unknown model", "gpt_oss", {"config": {"model_type": "mystery"}},
     ["gate_up_proj_blocks", "no rule", "mystery"]),
    ("llama4 unknown model", "llama4", {"config": {"model_type": "mystery", "text_config": {}}},
     ["feed_forward.experts.gate_up_proj", "no rule"]),
    ("fused wrong orientation", "fused_experts", {"model__layers__0__mlp__experts__down_proj": ("BF16", (4, 48, 64))},
     ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj", "disagree"]),
    ("fused odd gate_up", "fused_experts", {"model__layers__1__mlp__experts__gate_up_proj": ("BF16", (4, 95, 64))},
     ["model.layers.1.mlp.experts.gate_up_proj", "odd"]),
    ("bad block size", "deepseek_v3", {"config": {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}},
     ["weight_block_size"]),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_sources(case):
    _, source, changes, says = case
    tensors, cfg = _edit(source, **changes)
    with pytest.raises(SourceError) as e:
        recognize(tensors, cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for s in says:
        assert s in msg, (s, msg)


def test_fixtures_are_recognized_from_headers_alone():
    """recognize() needs only dtype and shape: the same answer from the builder's specs as from disk."""
    for name, build in SOURCES.items():
        fx = build()
        got = recognize(headers(fx), fx.config)
        assert {n: e.kind for n, e in got.encodings.items()} == {n: w.kind for n, w in fx.expected.items()}, name
