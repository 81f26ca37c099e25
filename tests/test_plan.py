"""The planner, on tiny checkpoints in real layouts (shardquant.testing), headers only."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from shardquant import formats

from shardquant import testing
from shardquant.errors import PlanError, RuleError
from shardquant.plan import CARD_BYTES_PER_TENSOR, FIXED_OVERHEAD, HASH_HOLD_BYTES, JOB_BYTES, PREFETCH_BYTES, WRITE_AHEAD_BYTES, make_plan, module_name
from shardquant.writer import HASH_BEHIND_BYTES
from shardquant.rules import QUANTIZE, Rule, RuleSet
from shardquant.source import scan
from shardquant.st import STORAGE
from shardquant.testing import Model

SHARD = 16 * 1024  # small shards: a layer's experts straddle several


def zeros(spec, rng):  # planning reads no data; zeros keep the fixtures fast and any dtype valid
    _, dtype, shape = spec
    return np.zeros(shape, STORAGE[dtype])


def ckpt(tmp_path, model: Model, name: str = "ck"):
    return scan(testing.write_checkpoint(tmp_path / name, model, shard_bytes=SHARD, data=zeros))


def plan(ck, fmt="nvfp4", policy="shared", **kw):
    rules = RuleSet(expert_policy=policy, num_layers=(ck.config or {}).get("num_hidden_layers"))
    return make_plan(ck, fmt, rules, **kw)


def groups(p) -> dict[str, set[str]]:
    return {g.key: {m.name for m in g.members} for g in p.groups}


def without(model: Model, *names: str) -> Model:
    specs = [s for s in model.specs if s[0] not in names]
    assert len(specs) == len(model.specs) - len(names)
    return Model(specs, model.config)


def retyped(model: Model, name: str, dtype: str) -> Model:
    return Model([(n, dtype if n == name else d, sh) for n, d, sh in model.specs], model.config)


def excluded(p) -> dict[str, str]:
    return {e["name"]: e["reason"] for e in p.excluded}


# groups


def test_qwen3_moe_shared_policy_groups(tmp_path):
    E = 8
    p = plan(ckpt(tmp_path, testing.qwen3_moe(experts=E)))
    gs = groups(p)
    for L in range(2):
        a, x = f"model.layers.{L}.self_attn", f"model.layers.{L}.mlp.experts"
        assert gs[f"{a}.qkv_proj"] == {f"{a}.{n}_proj.weight" for n in "qkv"}
        assert gs[f"{a}.o_proj"] == {f"{a}.o_proj.weight"}
        assert gs[f"{x}.*.gate_up_proj"] == {f"{x}.{e}.{n}.weight" for e in range(E) for n in ("gate_proj", "up_proj")}
        assert gs[f"{x}.*.down_proj"] == {f"{x}.{e}.down_proj.weight" for e in range(E)}
    assert len(gs) == 2 * 4
    # the fixture is what we meant: one layer's experts straddle shard files
    gate_up = next(g for g in p.groups if g.key == "model.layers.0.mlp.experts.*.gate_up_proj")
    assert len(gate_up.members) == 2 * E
    assert len({m.file for m in gate_up.members}) > 1


def test_qwen3_moe_per_expert_groups(tmp_path):
    E = 8
    gs = groups(plan(ckpt(tmp_path, testing.qwen3_moe(experts=E)), policy="per-expert"))
    for L in range(2):
        x = f"model.layers.{L}.mlp.experts"
        for e in range(E):
            assert gs[f"{x}.{e}.gate_up_proj"] == {f"{x}.{e}.gate_proj.weight", f"{x}.{e}.up_proj.weight"}
            assert gs[f"{x}.{e}.down_proj"] == {f"{x}.{e}.down_proj.weight"}
        assert f"{x}.*.gate_up_proj" not in gs
    assert len(gs) == 2 * (2 + 2 * E)


def test_llama_qkv_and_gate_up(tmp_path):
    gs = groups(plan(ckpt(tmp_path, testing.llama())))
    a, m = "model.layers.1.self_attn", "model.layers.1.mlp"
    assert gs[f"{a}.qkv_proj"] == {f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"}
    assert gs[f"{m}.gate_up_proj"] == {f"{m}.gate_proj.weight", f"{m}.up_proj.weight"}
    assert gs[f"{m}.down_proj"] == {f"{m}.down_proj.weight"}
    assert len(gs) == 2 * 4


def phi3(hidden=64, layers=2, inter=128, vocab=256, heads=4, kv_heads=2) -> Model:
    """Phi-3 layout: q/k/v pre-fused into self_attn.qkv_proj, gate/up into mlp.gate_up_proj."""
    hd = hidden // heads
    s = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for L in range(layers):
        p = f"model.layers.{L}"
        s += [(f"{p}.input_layernorm.weight", "BF16", (hidden,)),
              (f"{p}.self_attn.qkv_proj.weight", "BF16", ((heads + 2 * kv_heads) * hd, hidden)),
              (f"{p}.self_attn.o_proj.weight", "BF16", (hidden, heads * hd)),
              (f"{p}.post_attention_layernorm.weight", "BF16", (hidden,)),
              (f"{p}.mlp.gate_up_proj.weight", "BF16", (2 * inter, hidden)),
              (f"{p}.mlp.down_proj.weight", "BF16", (hidden, inter))]
    s += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    return Model(s, {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": hidden,
                     "num_hidden_layers": layers, "intermediate_size": inter, "vocab_size": vocab})


def test_phi3_prefused_projections_are_single_member_quantizers(tmp_path):
    p = plan(ckpt(tmp_path, phi3()), strict=True)  # nothing unclaimed
    gs = groups(p)
    rule = {g.key: g.rule for g in p.groups}
    for L in range(2):
        a, m = f"model.layers.{L}.self_attn", f"model.layers.{L}.mlp"
        assert gs[f"{a}.qkv_proj"] == {f"{a}.qkv_proj.weight"} and rule[f"{a}.qkv_proj"] == "attn_fused_qkv"
        assert gs[f"{m}.gate_up_proj"] == {f"{m}.gate_up_proj.weight"} and rule[f"{m}.gate_up_proj"] == "mlp_fused_gate_up"
        assert gs[f"{a}.o_proj"] == {f"{a}.o_proj.weight"} and gs[f"{m}.down_proj"] == {f"{m}.down_proj.weight"}
    assert len(gs) == 2 * 4
    assert p.outputs["model.layers.0.self_attn.qkv_proj.weight"]["scale"] == "model.layers.0.self_attn.qkv_proj.weight_scale"
    assert p.warnings == []
    assert p.exclude_modules == ["lm_head", "model.embed_tokens"]


def test_mixtral_w13_groups(tmp_path):
    E = 4
    gs = groups(plan(ckpt(tmp_path, testing.mixtral(experts=E))))
    x = "model.layers.0.block_sparse_moe.experts"
    assert gs[f"{x}.*.w13"] == {f"{x}.{e}.{w}.weight" for e in range(E) for w in ("w1", "w3")}
    assert gs[f"{x}.*.w2"] == {f"{x}.{e}.w2.weight" for e in range(E)}


def test_deepseek_v3_mla_and_mtp(tmp_path):
    ck = ckpt(tmp_path, testing.deepseek_v3(layers=3, dense_layers=1, experts=4, mtp=1))
    assert ck.config["num_hidden_layers"] == 3
    # the MTP layer's eh_proj is no unclaimed weight; compressed-tensors: MLA quantized in layers 0-2
    p = plan(ck, strict=True, flavor="compressed-tensors")
    gs = groups(p)
    for L in range(3):
        a = f"model.layers.{L}.self_attn"
        assert gs[f"{a}.q_a_kv_a_proj"] == {f"{a}.q_a_proj.weight", f"{a}.kv_a_proj_with_mqa.weight"}
        for n in ("q_b_proj", "kv_b_proj", "o_proj"):
            assert gs[f"{a}.{n}"] == {f"{a}.{n}.weight"}
    assert gs["model.layers.0.mlp.gate_up_proj"] == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    s = "model.layers.2.mlp.shared_experts"
    assert gs[f"{s}.gate_up_proj"] == {f"{s}.gate_proj.weight", f"{s}.up_proj.weight"}
    assert len(gs["model.layers.2.mlp.experts.*.gate_up_proj"]) == 8
    # layer 3 (== num_hidden_layers) is the MTP layer: every tensor kept, none quantized
    mtp = [n for n in ck.tensors if n.startswith("model.layers.3.")]
    assert len(mtp) > 20
    ex = excluded(p)
    assert all(n in ex and n not in p.outputs for n in mtp)
    assert ex["model.layers.3.eh_proj.weight"] == "MTP layer (index >= num_hidden_layers)"
    assert ex["model.layers.3.mlp.experts.0.gate_proj.weight"] == "MTP layer (index >= num_hidden_layers)"
    assert not any(k.startswith("model.layers.3.") for k in gs)
    assert ex["model.layers.2.mlp.gate.e_score_correction_bias"] == "router"  # DeepSeek's router bias
    assert p.warnings == []
    # modelopt: SGLang excludes an MLA projection named in the exclude list in every layer, and the MTP
    # layer's are named there, so the MLA projections stay in high precision in every layer
    mo = plan(ck, strict=True, flavor="modelopt")
    assert set(groups(mo)) == set(gs) - {f"model.layers.{L}.self_attn.{n}" for L in range(3)
                                         for n in ("q_a_kv_a_proj", "q_b_proj", "kv_b_proj")}
    assert excluded(mo)["model.layers.0.self_attn.q_a_proj.weight"].startswith("kv_a_proj_with_mqa, kv_b_proj, "
                                                                                 "q_a_proj, q_b_proj kept in some layer")
    assert len(mo.warnings) == 1 and "in every layer" in mo.warnings[0]


def test_deepseek_v3_without_num_layers_quantizes_the_mtp_layer(tmp_path):
    ck = ckpt(tmp_path, testing.deepseek_v3(layers=3, mtp=1))
    p = make_plan(ck, "nvfp4", RuleSet())
    assert "model.layers.3.mlp.experts.*.gate_up_proj" in groups(p)
    assert "model.layers.3.eh_proj.weight: kept in high precision (no rule claims this 2-D weight)" in p.warnings


@pytest.mark.parametrize("policy, fc1_groups", [("shared", 1), ("per-expert", 4)])
def test_te_grouped_experts(tmp_path, policy, fc1_groups):
    E = 4
    p = plan(ckpt(tmp_path, testing.te_grouped(experts=E)), policy=policy)
    gs = groups(p)
    x = "decoder.layers.0.mlp.experts"
    fc1 = {k: v for k, v in gs.items() if k.startswith(f"{x}.linear_fc1")}
    assert len(fc1) == fc1_groups
    assert set().union(*fc1.values()) == {f"{x}.linear_fc1.weight{e}" for e in range(E)}
    if policy == "shared":
        assert gs[f"{x}.linear_fc1.weight*"] == {f"{x}.linear_fc1.weight{e}" for e in range(E)}
        assert gs[f"{x}.linear_fc2.weight*"] == {f"{x}.linear_fc2.weight{e}" for e in range(E)}
    else:
        assert gs[f"{x}.linear_fc2.weight3"] == {f"{x}.linear_fc2.weight3"}
    assert gs["decoder.layers.0.self_attention.linear_qkv"] == {"decoder.layers.0.self_attention.linear_qkv.weight"}
    # output names keep the expert index last
    assert p.outputs[f"{x}.linear_fc1.weight3"] == {
        "weight": f"{x}.linear_fc1.weight3",
        "scale": f"{x}.linear_fc1.weight_scale3",
        "global_scale": f"{x}.linear_fc1.weight_scale_23",
    }
    t = p.out_tensors[f"{x}.linear_fc2.weight_scale3"]
    assert (t.dtype, t.shape) == ("F8_E4M3", (64, 32 // 16))
    assert {"embedding.word_embeddings", "output_layer", "decoder.layers.0.mlp.router"} <= set(p.exclude_modules)
    assert not any(m.startswith(f"{x}.") for m in p.exclude_modules)


def test_te_exclude_by_module_name(tmp_path):
    ck = ckpt(tmp_path, testing.te_grouped(experts=4))
    rules = RuleSet(exclude=(r"decoder\.layers\.0\.mlp\.experts\.linear_fc2",))
    p = make_plan(ck, "nvfp4", rules)
    assert "decoder.layers.0.mlp.experts.linear_fc2.weight*" not in groups(p)
    assert "decoder.layers.1.mlp.experts.linear_fc2.weight*" in groups(p)
    assert "decoder.layers.0.mlp.experts.linear_fc2" in p.exclude_modules


# incomplete fused sets


@pytest.mark.parametrize("policy, key", [
    ("shared", "model.layers.0.mlp.experts.*.gate_up_proj expert 5"),
    ("per-expert", "model.layers.0.mlp.experts.5.gate_up_proj expert 5"),
])
def test_missing_expert_projection(tmp_path, policy, key):
    model = without(testing.qwen3_moe(), "model.layers.0.mlp.experts.5.up_proj.weight")
    ck = ckpt(tmp_path, model)
    with pytest.raises(RuleError) as e:
        plan(ck, policy=policy)
    assert str(e.value) == f"quantizer {key}: missing up_proj (has gate_proj)"


@pytest.mark.parametrize("factory, drop, key, missing", [
    (testing.qwen3_moe, "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.qkv_proj", "k_proj"),
    (testing.llama, "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.qkv_proj", "v_proj"),
    (testing.llama, "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.gate_up_proj", "gate_proj"),
    (testing.deepseek_v3, "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
     "model.layers.1.self_attn.q_a_kv_a_proj", "kv_a_proj_with_mqa"),
    (testing.mixtral, "model.layers.1.block_sparse_moe.experts.2.w3.weight",
     "model.layers.1.block_sparse_moe.experts.*.w13 expert 2", "w3"),
])
def test_missing_fused_member(tmp_path, factory, drop, key, missing):
    ck = ckpt(tmp_path, without(factory(), drop))
    with pytest.raises(RuleError, match=re.escape(f"quantizer {key}: missing {missing} (has ")):
        plan(ck)


# divisibility


def test_input_dim_not_multiple_of_16_keeps_whole_fused_set(tmp_path):
    ck = ckpt(tmp_path, testing.qwen3_moe(hidden=40, experts=4))
    p = plan(ck, "nvfp4")
    gs, ex = groups(p), excluded(p)
    a, x = "model.layers.0.self_attn", "model.layers.0.mlp.experts"
    # q/k/v and gate/up read the 40-wide hidden state: kept, every member
    for n in [f"{a}.{w}_proj.weight" for w in "qkv"] + [f"{x}.{e}.{w}.weight" for e in range(4) for w in ("gate_proj", "up_proj")]:
        assert ex[n].startswith("fused set not quantizable: input dim 40 of "), n
        assert n not in p.outputs
    assert f"{a}.qkv_proj" not in gs and f"{x}.*.gate_up_proj" not in gs
    # o_proj (in 64) and down_proj (in 32) are fine
    assert f"{a}.o_proj" in gs and f"{x}.*.down_proj" in gs
    assert (f"quantizer {a}.qkv_proj kept in high precision as a whole: "
            f"input dim 40 of {a}.q_proj.weight is not a multiple of 16") in p.warnings
    assert f"{a}.k_proj" in p.exclude_modules and f"{x}.3.up_proj" in p.exclude_modules
    # FP8 has no blocks: the same checkpoint quantizes every projection
    p8 = plan(ck, "fp8")
    assert f"{a}.qkv_proj" in groups(p8) and f"{x}.*.gate_up_proj" in groups(p8)
    assert not any("kept in high precision" in w for w in p8.warnings)


# output tensors and shards


def test_nvfp4_output_tensors(tmp_path):
    ck = ckpt(tmp_path, testing.llama(hidden=64, inter=128))
    p = plan(ck, "nvfp4")
    w = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert p.outputs[f"{w}.weight"] == {"weight": f"{w}.weight", "scale": f"{w}.weight_scale",
                                        "global_scale": f"{w}.weight_scale_2"}
    t = p.out_tensors
    assert (t[f"{w}.weight"].dtype, t[f"{w}.weight"].shape) == ("U8", (64, 64))
    assert (t[f"{w}.weight_scale"].dtype, t[f"{w}.weight_scale"].shape) == ("F8_E4M3", (64, 8))
    assert (t[f"{w}.weight_scale_2"].dtype, t[f"{w}.weight_scale_2"].shape) == ("F32", ())
    k = "model.layers.0.self_attn.k_proj"  # [32, 64]
    assert t[f"{k}.weight"].shape == (32, 32) and t[f"{k}.weight_scale"].shape == (32, 4)
    assert (t["lm_head.weight"].dtype, t["lm_head.weight"].shape) == ("BF16", (256, 64))
    assert (t["model.norm.weight"].dtype, t["model.norm.weight"].shape) == ("BF16", (64,))
    # 7 linears per layer, 3 outputs each, plus the kept tensors as they are
    n_kept = len(p.excluded)
    assert len(t) == 2 * 7 * 3 + n_kept
    assert p.output_bytes == sum(x.nbytes for x in t.values())


def test_fp8_output_tensors(tmp_path):
    p = plan(ckpt(tmp_path, testing.llama(hidden=64, inter=128)), "fp8")
    w = "model.layers.1.mlp.down_proj"
    assert p.outputs[f"{w}.weight"] == {"weight": f"{w}.weight", "scale": f"{w}.weight_scale"}
    t = p.out_tensors
    assert (t[f"{w}.weight"].dtype, t[f"{w}.weight"].shape) == ("F8_E4M3", (64, 128))
    assert p.flavor == "compressed-tensors"  # fp8's own flavor: the quantizer's scale once per row
    assert (t[f"{w}.weight_scale"].dtype, t[f"{w}.weight_scale"].shape) == ("F32", (64, 1))
    assert not any(n.endswith("weight_scale_2") for n in t)


@pytest.mark.parametrize("max_size", [4000, 20_000, 10**9])
def test_shards_respect_max_size_and_are_named(tmp_path, max_size):
    p = plan(ckpt(tmp_path, testing.qwen3_moe()), "nvfp4", max_shard_size=max_size)
    n = len(p.shards)
    assert [name for name, _ in p.shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for _, ts in p.shards:
        size = sum(t.nbytes for t in ts)
        assert size <= max_size or len(ts) == 1
    flat = [t.name for _, ts in p.shards for t in ts]
    assert sorted(flat) == sorted(p.out_tensors) and len(flat) == len(set(flat))
    if max_size == 10**9:
        assert n == 1
    else:
        assert n > 1
        # greedy: a shard is closed only when the next tensor would not fit
        for (_, a), (_, b) in zip(p.shards, p.shards[1:]):
            assert sum(t.nbytes for t in a) + b[0].nbytes > max_size


LAYOUTS = {
    "qwen3_moe": testing.qwen3_moe, "llama": testing.llama, "mixtral": testing.mixtral,
    "deepseek_v3": testing.deepseek_v3, "te_grouped": testing.te_grouped,
}


@pytest.fixture(scope="module")
def layout_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {k: ckpt(root, f(), k) for k, f in LAYOUTS.items()}
    # formats with 2-D tiles (formats/base.py Format.block) plan the same layouts in whole tiles
    out.update({f"{k}@tiled": ckpt(root, f(), f"{k}-tiled") for k, f in testing.TILED.items()})
    return out


@pytest.mark.parametrize("policy", ["shared", "per-expert"])
@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_tensor_quantized_or_excluded_once(layout_ckpts, layout, fmt, policy):
    ck = layout_ckpts[f"{layout}@tiled" if formats.declared(fmt).block else layout]
    p = plan(ck, fmt, policy)
    ex = [e["name"] for e in p.excluded]
    assert len(ex) == len(set(ex))
    assert set(p.outputs).isdisjoint(ex)
    assert sorted(list(p.outputs) + ex) == sorted(ck.tensors)
    assert set(p.outputs) == {m.name for g in p.groups for m in g.members}
    assert len(p.outputs) > 0
    assert p.source_bytes == ck.total_bytes
    # exclude_modules: never a quantized module; always the heads, routers and embeddings
    quantized = {module_name(n) for n in p.outputs}
    assert quantized.isdisjoint(p.exclude_modules)
    head = {"te_grouped": "output_layer"}.get(layout, "lm_head")
    emb = {"te_grouped": "embedding.word_embeddings"}.get(layout, "model.embed_tokens")
    assert {head, emb} <= set(p.exclude_modules)
    routers = {module_name(n) for n in ck.tensors if re.fullmatch(r".*\.(mlp\.gate|block_sparse_moe\.gate|mlp\.router)\.weight", n)}
    assert routers <= set(p.exclude_modules)
    assert (len(routers) > 0) == (layout not in ("llama",))
    assert not any("norm" in m for m in p.exclude_modules)  # 1-D tensors are no modules to exclude


def test_exclude_modules_qwen3(tmp_path):
    p = plan(ckpt(tmp_path, testing.qwen3_moe()), "nvfp4")
    assert p.exclude_modules == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def fused_3d_experts(model: Model) -> Model:
    """Qwen3-MoE with each layer's experts stored transformers-5 style: [E, 2I, H] and [E, H, I]."""
    specs = []
    for n, dt, sh in model.specs:
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight", n)
        if m is None:
            specs.append((n, dt, sh))
        elif m[2] == "0" and m[3] == "gate_proj":
            E = model.config["num_experts"]
            inter, hidden = sh
            specs += [(f"{m[1]}.gate_up_proj", dt, (E, 2 * inter, hidden)), (f"{m[1]}.down_proj", dt, (E, hidden, inter))]
    return Model(specs, model.config)


def test_unclaimed_3d_experts_kept_with_warning_and_listed_as_module(tmp_path):
    ck = ckpt(tmp_path, fused_3d_experts(testing.qwen3_moe(experts=4)))
    p = plan(ck)
    ex = excluded(p)
    fused = [f"model.layers.{L}.mlp.experts.{n}" for L in range(2) for n in ("gate_up_proj", "down_proj")]
    for n in fused:
        assert ex[n] == "3-D weight: no rule quantizes it" and n not in p.outputs
        assert f"{n}: kept in high precision (3-D weight: no rule quantizes it)" in p.warnings
    assert len(p.warnings) == 4
    assert not any(".experts." in k for k in groups(p))
    assert p.exclude_modules == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.experts", "model.layers.0.mlp.gate",
                                 "model.layers.1.mlp.experts", "model.layers.1.mlp.gate"]
    assert module_name("model.layers.0.mlp.experts.gate_up_proj") == "model.layers.0.mlp.experts"
    # ... and under --strict they are refused
    with pytest.raises(PlanError, match=r"--strict: no rule claims 4 weight tensor\(s\): model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        plan(ck, strict=True)


def test_exclude_flag_in_plan(tmp_path):
    ck = ckpt(tmp_path, testing.qwen3_moe())
    p = make_plan(ck, "nvfp4", RuleSet(exclude=(r"model\.layers\.1\.self_attn\.o_proj",)))
    assert excluded(p)["model.layers.1.self_attn.o_proj.weight"] == r"--exclude model\.layers\.1\.self_attn\.o_proj"
    assert "model.layers.1.self_attn.o_proj" in p.exclude_modules
    assert "model.layers.0.self_attn.o_proj.weight" in p.outputs


# --exclude of one member of a fused set


def test_exclude_one_member_keeps_the_whole_fused_set(tmp_path):
    ck = ckpt(tmp_path, testing.llama())
    p = make_plan(ck, "nvfp4", RuleSet(exclude=(r".*k_proj",)))  # no RuleError for the incomplete q/k/v set
    gs, ex = groups(p), excluded(p)
    for L in range(2):
        a = f"model.layers.{L}.self_attn"
        assert f"{a}.qkv_proj" not in gs
        assert ex[f"{a}.k_proj.weight"] == r"--exclude .*k_proj"
        for n in ("q_proj", "v_proj"):
            assert f"{a}.{n}.weight" in ex and f"{a}.{n}.weight" not in p.outputs
            assert f"{a}.k_proj.weight" in ex[f"{a}.{n}.weight"] and "--exclude" in ex[f"{a}.{n}.weight"]
            assert f"{a}.{n}" in p.exclude_modules
        assert gs[f"{a}.o_proj"] == {f"{a}.o_proj.weight"}  # other quantizers unaffected
        assert f"model.layers.{L}.mlp.gate_up_proj" in gs and f"model.layers.{L}.mlp.down_proj" in gs
        assert any(w.startswith(f"quantizer {a}.qkv_proj kept in high precision as a whole") and f"{a}.k_proj.weight" in w
                   for w in p.warnings)
    assert len(p.warnings) == 2
    assert len(gs) == 2 * 3


@pytest.mark.parametrize("policy", ["shared", "per-expert"])
def test_exclude_one_expert(tmp_path, policy):
    E = 4
    ck = ckpt(tmp_path, testing.qwen3_moe(experts=E))
    rules = RuleSet(exclude=(r"model\.layers\.0\.mlp\.experts\.2\.down_proj",), expert_policy=policy)
    p = make_plan(ck, "nvfp4", rules)
    gs, ex = groups(p), excluded(p)
    x = "model.layers.0.mlp.experts"
    down = {f"{x}.{e}.down_proj.weight" for e in range(E)}
    assert ex[f"{x}.2.down_proj.weight"] == r"--exclude model\.layers\.0\.mlp\.experts\.2\.down_proj"
    if policy == "shared":  # the layer's shared down quantizer is kept as a whole
        assert f"{x}.*.down_proj" not in gs
        assert down <= set(ex) and down.isdisjoint(p.outputs)
        for n in down - {f"{x}.2.down_proj.weight"}:
            assert f"{x}.2.down_proj.weight" in ex[n] and "--exclude" in ex[n]
        assert [w for w in p.warnings if "kept in high precision as a whole" in w] == [
            f"quantizer {x}.*.down_proj kept in high precision as a whole: fused with {x}.2.down_proj.weight, which --exclude keeps"]
        assert "model.layers.1.mlp.experts.*.down_proj" in gs and f"{x}.*.gate_up_proj" in gs
    else:  # only that expert's down_proj
        assert f"{x}.2.down_proj" not in gs
        assert {n for n in ex if n.startswith(f"{x}.")} == {f"{x}.2.down_proj.weight"}
        for e in (0, 1, 3):
            assert gs[f"{x}.{e}.down_proj"] == {f"{x}.{e}.down_proj.weight"}
        assert gs[f"{x}.2.gate_up_proj"] == {f"{x}.2.gate_proj.weight", f"{x}.2.up_proj.weight"}
        assert p.warnings == []


# errors


def test_strict_refuses_unclaimed_weight(tmp_path):
    m = "model.layers.0.mlp"  # a projection no rule knows
    model = testing.llama()
    model.specs.insert(9, (f"{m}.custom_proj.weight", "BF16", (64, 64)))
    ck = ckpt(tmp_path, model)
    with pytest.raises(PlanError, match=r"--strict: no rule claims 1 weight tensor\(s\): model\.layers\.0\.mlp\.custom_proj\.weight"):
        plan(ck, strict=True)
    p = plan(ck)  # without --strict: kept, with a warning
    assert excluded(p)[f"{m}.custom_proj.weight"] == "no rule claims this 2-D weight"
    assert p.warnings == [f"{m}.custom_proj.weight: kept in high precision (no rule claims this 2-D weight)"]
    # --include takes it as its own quantizer
    p = make_plan(ck, "nvfp4", RuleSet(include=(r".*\.custom_proj",)), strict=True)
    assert groups(p)[f"{m}.custom_proj"] == {f"{m}.custom_proj.weight"}


def test_quantizer_key_claimed_by_two_rules(tmp_path):
    ck = ckpt(tmp_path, testing.llama(), "llama")
    # a user row whose key collides with the built-in q/k/v quantizer
    user = Rule("o-as-qkv", r"(?P<prefix>.*\.self_attn)\.o_proj\.weight", QUANTIZE, "{prefix}.qkv_proj")
    with pytest.raises(RuleError) as e:
        make_plan(ck, "nvfp4", RuleSet((user,)))
    assert str(e.value) == ("quantizer model.layers.0.self_attn.qkv_proj is claimed by rules attn_qkv, o-as-qkv; "
                            "give them distinct keys")
    # --include of an unclaimed tensor whose module name is a built-in key
    model = testing.llama()
    model.specs.insert(2, ("model.layers.0.self_attn.qkv_proj", "BF16", (64, 64)))  # no .weight: no row claims it
    ck = ckpt(tmp_path, model, "include")
    with pytest.raises(RuleError, match=r"quantizer model\.layers\.0\.self_attn\.qkv_proj is claimed by rules "
                                        r"--include, attn_qkv"):
        make_plan(ck, "nvfp4", RuleSet(include=(r".*\.qkv_proj",)))


@pytest.mark.parametrize("dtype", ["F8_E4M3", "I32"])
def test_unsupported_dtype(tmp_path, dtype):
    name = "model.layers.1.self_attn.q_proj.weight"
    ck = ckpt(tmp_path, retyped(testing.llama(), name, dtype))
    with pytest.raises(PlanError, match=re.escape(f"tensor {name!r} (model-0000")) as e:
        plan(ck)
    assert f"unsupported dtype {dtype}" in str(e.value)


# memory bound


def test_memory_budget_smaller_than_a_group(tmp_path):
    ck = ckpt(tmp_path, testing.qwen3_moe(hidden=64, experts=8, inter=32, vocab=64))
    big = plan(ck, memory_budget=10**9)
    assert not any(g.two_pass for g in big.groups)
    small = plan(ck, memory_budget=10_000)
    two = {g.key for g in small.groups if g.two_pass}
    # gate_up 16 x 4096 B, down 8 x 4096 B, qkv 16384 B exceed 10000 B; o_proj (8192 B) does not
    assert two == {f"model.layers.{L}.{k}" for L in range(2)
                   for k in ("self_attn.qkv_proj", "mlp.experts.*.gate_up_proj", "mlp.experts.*.down_proj")}
    assert sum("exceeds the memory budget: read twice" in w for w in small.warnings) == 6
    # nvfp4 outputs of the largest member, q_proj [64, 64]: 64*32 + 64*4 + 4 bytes
    out = 64 * 32 + 64 * 4 + 4
    # on the CPU (one lane): one member's outputs being written, one being made, two groups' outputs
    # waiting (shardquant/pipeline.py _Job); the output not yet hashed (shardquant/writer.py)
    fixed = (PREFETCH_BYTES + WRITE_AHEAD_BYTES + HASH_BEHIND_BYTES + 2 * out + 2 * JOB_BYTES + FIXED_OVERHEAD
             + HASH_HOLD_BYTES)
    card = CARD_BYTES_PER_TENSOR * len(big.out_tensors)  # the card's verdicts (shardquant/card.py Judging)
    assert len(small.out_tensors) == len(big.out_tensors) > 0
    assert big.peak_bytes == 2 * 8 * 32 * 64 * 2 + fixed + card  # the whole gate_up group
    # two-pass groups hold one member at a time; the largest then is q_proj, o_proj or the embedding (8192 B)
    assert small.peak_bytes == 8192 + fixed + card


def test_peak_does_not_grow_with_layers(tmp_path):
    """Data held does not grow with the model; only the card's per-tensor records do."""
    a = plan(ckpt(tmp_path, testing.qwen3_moe(layers=2), "two"))
    b = plan(ckpt(tmp_path, testing.qwen3_moe(layers=4), "four"))
    assert len(b.groups) == 2 * len(a.groups) and b.source_bytes > a.source_bytes
    assert len(b.out_tensors) > len(a.out_tensors)
    assert b.peak_bytes - a.peak_bytes == CARD_BYTES_PER_TENSOR * (len(b.out_tensors) - len(a.out_tensors))


def test_units_follow_source_order(tmp_path):
    ck = ckpt(tmp_path, testing.qwen3_moe())
    p = plan(ck)
    pos = {n: i for i, n in enumerate(ck.tensors)}
    first = [pos[u.group.members[0].name] if u.group else pos[u.kept.name] for u in p.units]
    assert first == sorted(first)
    assert Counter(u.group is None for u in p.units)[False] == len(p.groups)


def test_full_size_deepseek_v3_reads_each_byte_once_on_a_gpu(tmp_path, monkeypatch):
    """DeepSeek-V3's real shapes (shared/LAYOUTS.md; 1.3 TB of bf16 as sparse files: real headers,
    data as holes). Shared policy, default 8 GiB host budget: each layer's expert gate/up group
    (256 experts x 2 x 2048 x 7168 bf16 = 15 GB) is read twice on the CPU, and held on the GPU (read
    once) when the GPU has room."""
    import time

    from shardquant.convert import prepare

    monkeypatch.delenv("SHARDQUANT_DEVICE_LANES", raising=False)
    model = testing.deepseek_v3(hidden=7168, layers=61, dense_layers=3, experts=256, inter=2048,
                                dense_inter=18432, vocab=129280, q_lora=1536, kv_lora=512, rope=64, nope=128,
                                v_dim=128, heads=128, mtp=1)
    src = testing.write_checkpoint(tmp_path / "ds", model, shard_bytes=5 * 10**9, sparse=True)
    t0 = time.perf_counter()
    cpu = prepare(str(src), "nvfp4")
    gpu = prepare(str(src), "nvfp4", device_memory=110 * 2**30)
    assert time.perf_counter() - t0 < 60
    assert cpu.source_bytes > 1.2e12
    big = [g for g in cpu.groups if g.source_bytes > cpu.memory_budget]
    assert len(big) == 58 and all(g.two_pass for g in big)  # gate/up of the 58 MoE layers
    assert 1.6 < cpu.read_factor < 1.7
    assert gpu.read_factor == 1.0 and not any(g.two_pass for g in gpu.groups)
    assert {g.key for g in gpu.groups if g.on_device} == {g.key for g in big}
    # held member by member: the host bound is the CPU plan's (the largest group under the budget,
    # here a layer's expert down_proj set, 7.5 GB, plus fixed overheads), not 15 GB more; only one
    # member's outputs more, and two groups' waiting outputs, per further device lane (plan.device_lanes)
    from shardquant.plan import DEVICE_LANES

    out = max(cpu.member_out_bytes(m) for g in cpu.groups for m in g.members)
    assert gpu.peak_bytes == cpu.peak_bytes + (DEVICE_LANES - 1) * (out + 2 * max(JOB_BYTES, out))
    assert cpu.peak_bytes < gpu.peak_bytes < cpu.memory_budget + 3 * 2**30


def test_device_lanes_from_the_environment(tmp_path, monkeypatch):
    """SHARDQUANT_DEVICE_LANES sets a GPU's lanes (plan.device_lanes): each lane adds one member's
    outputs and two groups' waiting outputs to a GPU plan's memory bound (not a CPU plan's); a value
    that is not a whole number of at least 1 is a clear error naming the variable."""
    from shardquant.errors import ShardquantError
    from shardquant.plan import DEVICE_LANES, device_lanes

    ck = ckpt(tmp_path, testing.qwen3_moe(hidden=64, experts=8, inter=32, vocab=64))
    monkeypatch.delenv("SHARDQUANT_DEVICE_LANES", raising=False)
    assert device_lanes() == DEVICE_LANES
    gpu, cpu = plan(ck), plan(ck)
    gpu.device_memory = 1 << 30
    out = max(gpu.member_out_bytes(m) for g in gpu.groups for m in g.members)
    lane = out + 2 * max(JOB_BYTES, out)
    two = gpu.peak_bytes
    assert two == cpu.peak_bytes + (DEVICE_LANES - 1) * lane
    monkeypatch.setenv("SHARDQUANT_DEVICE_LANES", "5")
    assert device_lanes() == 5 and gpu.peak_bytes == two + (5 - DEVICE_LANES) * lane
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("SHARDQUANT_DEVICE_LANES", bad)
        with pytest.raises(ShardquantError, match=f"SHARDQUANT_DEVICE_LANES must be a whole number of at least 1, not '{re.escape(bad)}'"):
            device_lanes()
