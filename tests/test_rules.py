"""The name-rule table, tested as a table: one case (or more) per row of BUILTIN_RULES, with real
tensor names from shared/LAYOUTS.md, under both expert policies."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from shardquant.errors import RuleError
from shardquant.rules import BUILTIN_RULES, KEEP, QUANTIZE, Rule, RuleSet, load_rules

DEEPSEEK_LAYERS = 61  # DeepSeek-V3 config num_hidden_layers: layer 61 is the MTP layer


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    rule: str
    action: str
    shared: str | None = None  # quantizer key under --expert-policy shared
    per_expert: str | None = None  # ... under per-expert
    reason: str = ""
    dtype: str = "BF16"

    @property
    def id(self) -> str:
        return self.name


def q(name: str, rule: str, shared: str, per_expert: str | None = None, shape=(64, 64)) -> Case:
    return Case(name, shape, rule, QUANTIZE, shared, per_expert or shared)


def k(name: str, rule: str, reason: str, shape=(64, 64), dtype="BF16") -> Case:
    return Case(name, shape, rule, KEEP, reason=reason, dtype=dtype)


QW = "model.layers.0"  # Qwen3-MoE
DS = "model.layers.3"  # DeepSeek-V3 MoE layer
L4 = "language_model.model.layers.0"  # Llama 4
TE = "decoder.layers.0"  # Megatron / TransformerEngine
P3 = "model.layers.0"  # Phi-3: q/k/v and gate/up stored pre-fused
V4 = "layers.2"  # DeepSeek-V4

CASES: list[Case] = [
    # Qwen3-MoE
    k("model.embed_tokens.weight", "embedding", "embedding", (256, 64)),
    k("lm_head.weight", "head", "output head", (256, 64)),
    k("model.norm.weight", "norm", "norm", (64,)),
    k(f"{QW}.input_layernorm.weight", "norm", "norm", (64,)),
    k(f"{QW}.post_attention_layernorm.weight", "norm", "norm", (64,)),
    k(f"{QW}.self_attn.q_norm.weight", "norm", "norm", (16,)),
    k(f"{QW}.self_attn.k_norm.weight", "norm", "norm", (16,)),
    q(f"{QW}.self_attn.q_proj.weight", "attn_qkv", f"{QW}.self_attn.qkv_proj"),
    q(f"{QW}.self_attn.k_proj.weight", "attn_qkv", f"{QW}.self_attn.qkv_proj", shape=(32, 64)),
    q(f"{QW}.self_attn.v_proj.weight", "attn_qkv", f"{QW}.self_attn.qkv_proj", shape=(32, 64)),
    q(f"{QW}.self_attn.o_proj.weight", "attn_other", f"{QW}.self_attn.o_proj"),
    k(f"{QW}.mlp.gate.weight", "router", "router", (128, 64)),
    q(f"{QW}.mlp.experts.5.gate_proj.weight", "experts_gate_up",
      f"{QW}.mlp.experts.*.gate_up_proj", f"{QW}.mlp.experts.5.gate_up_proj", (32, 64)),
    q(f"{QW}.mlp.experts.127.up_proj.weight", "experts_gate_up",
      f"{QW}.mlp.experts.*.gate_up_proj", f"{QW}.mlp.experts.127.gate_up_proj", (32, 64)),
    q(f"{QW}.mlp.experts.5.down_proj.weight", "experts_down",
      f"{QW}.mlp.experts.*.down_proj", f"{QW}.mlp.experts.5.down_proj", (64, 32)),
    # Mixtral
    k("model.layers.1.block_sparse_moe.gate.weight", "router", "router", (8, 64)),
    q("model.layers.1.block_sparse_moe.experts.3.w1.weight", "mixtral_w13",
      "model.layers.1.block_sparse_moe.experts.*.w13", "model.layers.1.block_sparse_moe.experts.3.w13"),
    q("model.layers.1.block_sparse_moe.experts.3.w3.weight", "mixtral_w13",
      "model.layers.1.block_sparse_moe.experts.*.w13", "model.layers.1.block_sparse_moe.experts.3.w13"),
    q("model.layers.1.block_sparse_moe.experts.3.w2.weight", "mixtral_w2",
      "model.layers.1.block_sparse_moe.experts.*.w2", "model.layers.1.block_sparse_moe.experts.3.w2"),
    # DeepSeek-V3: MLA, dense layers 0-2, MoE layers 3-60
    q(f"{DS}.self_attn.q_a_proj.weight", "mla_a", f"{DS}.self_attn.q_a_kv_a_proj", shape=(48, 64)),
    q(f"{DS}.self_attn.kv_a_proj_with_mqa.weight", "mla_a", f"{DS}.self_attn.q_a_kv_a_proj", shape=(48, 64)),
    k(f"{DS}.self_attn.q_a_layernorm.weight", "norm", "norm", (48,)),
    k(f"{DS}.self_attn.kv_a_layernorm.weight", "norm", "norm", (32,)),
    q(f"{DS}.self_attn.q_b_proj.weight", "attn_other", f"{DS}.self_attn.q_b_proj", shape=(64, 48)),
    q(f"{DS}.self_attn.kv_b_proj.weight", "attn_other", f"{DS}.self_attn.kv_b_proj", shape=(64, 32)),
    q(f"{DS}.self_attn.o_proj.weight", "attn_other", f"{DS}.self_attn.o_proj"),
    q("model.layers.0.mlp.gate_proj.weight", "mlp_gate_up", "model.layers.0.mlp.gate_up_proj", shape=(96, 64)),
    q("model.layers.0.mlp.up_proj.weight", "mlp_gate_up", "model.layers.0.mlp.gate_up_proj", shape=(96, 64)),
    q("model.layers.0.mlp.down_proj.weight", "mlp_down", "model.layers.0.mlp.down_proj", shape=(64, 96)),
    k(f"{DS}.mlp.gate.weight", "router", "router", (256, 64)),
    k(f"{DS}.mlp.gate.e_score_correction_bias", "router", "router", (256,), "F32"),  # router bias, 1-D F32
    q(f"{DS}.mlp.experts.255.gate_proj.weight", "experts_gate_up",
      f"{DS}.mlp.experts.*.gate_up_proj", f"{DS}.mlp.experts.255.gate_up_proj", (32, 64)),
    q(f"{DS}.mlp.experts.255.down_proj.weight", "experts_down",
      f"{DS}.mlp.experts.*.down_proj", f"{DS}.mlp.experts.255.down_proj", (64, 32)),
    q(f"{DS}.mlp.shared_experts.gate_proj.weight", "shared_expert_gate_up",
      f"{DS}.mlp.shared_experts.gate_up_proj", shape=(32, 64)),
    q(f"{DS}.mlp.shared_experts.up_proj.weight", "shared_expert_gate_up",
      f"{DS}.mlp.shared_experts.gate_up_proj", shape=(32, 64)),
    q(f"{DS}.mlp.shared_experts.down_proj.weight", "shared_expert_down",
      f"{DS}.mlp.shared_experts.down_proj", shape=(64, 32)),
    q("model.layers.60.mlp.experts.0.up_proj.weight", "experts_gate_up",  # last real layer: quantized
      "model.layers.60.mlp.experts.*.gate_up_proj", "model.layers.60.mlp.experts.0.gate_up_proj", (32, 64)),
    # DeepSeek-V3 MTP layer (index 61 == num_hidden_layers): keep rows first, everything else "mtp"
    k("model.layers.61.embed_tokens.weight", "embedding", "embedding", (256, 64)),
    k("model.layers.61.enorm.weight", "norm", "norm", (64,)),
    k("model.layers.61.hnorm.weight", "norm", "norm", (64,)),
    k("model.layers.61.eh_proj.weight", "mtp", "MTP layer (index >= num_hidden_layers)", (64, 128)),
    k("model.layers.61.shared_head.head.weight", "head", "output head", (256, 64)),
    k("model.layers.61.shared_head.norm.weight", "norm", "norm", (64,)),
    k("model.layers.61.self_attn.q_a_proj.weight", "mtp", "MTP layer (index >= num_hidden_layers)", (48, 64)),
    k("model.layers.61.mlp.experts.7.gate_proj.weight", "mtp", "MTP layer (index >= num_hidden_layers)", (32, 64)),
    k("model.layers.61.mlp.shared_experts.down_proj.weight", "mtp", "MTP layer (index >= num_hidden_layers)"),
    k("model.layers.61.mlp.gate.weight", "router", "router", (256, 64)),
    # MTP modules stored under their own prefix (Qwen3-Next, Megatron)
    k("mtp.layers.0.mlp.experts.0.gate_proj.weight", "mtp", "MTP layer", (32, 64)),
    k("mtp.fc.weight", "mtp", "MTP layer", (64, 128)),
    # Llama 4
    k("language_model.model.embed_tokens.weight", "embedding", "embedding", (256, 64)),
    k("language_model.lm_head.weight", "head", "output head", (256, 64)),
    q(f"{L4}.self_attn.q_proj.weight", "attn_qkv", f"{L4}.self_attn.qkv_proj"),
    q(f"{L4}.self_attn.o_proj.weight", "attn_other", f"{L4}.self_attn.o_proj"),
    k(f"{L4}.feed_forward.router.weight", "router", "router", (16, 64)),
    q(f"{L4}.feed_forward.shared_expert.gate_proj.weight", "shared_expert_gate_up",
      f"{L4}.feed_forward.shared_expert.gate_up_proj", shape=(128, 64)),
    q(f"{L4}.feed_forward.shared_expert.up_proj.weight", "shared_expert_gate_up",
      f"{L4}.feed_forward.shared_expert.gate_up_proj", shape=(128, 64)),
    q(f"{L4}.feed_forward.shared_expert.down_proj.weight", "shared_expert_down",
      f"{L4}.feed_forward.shared_expert.down_proj", shape=(64, 128)),
    q("language_model.model.layers.1.feed_forward.gate_proj.weight", "mlp_gate_up",  # Maverick's dense layers
      "language_model.model.layers.1.feed_forward.gate_up_proj", shape=(128, 64)),
    k("vision_model.model.layers.0.self_attn.q_proj.weight", "vision", "vision tower"),
    k("vision_model.patch_embedding.linear.weight", "vision", "vision tower", (64, 588)),
    k("vision_model.model.layers.0.mlp.fc1.bias", "vision", "vision tower", (256,)),
    k("multi_modal_projector.linear_1.weight", "vision", "vision tower", (64, 64)),
    # Megatron / TransformerEngine grouped experts
    k("embedding.word_embeddings.weight", "embedding", "embedding", (256, 64)),
    k("output_layer.weight", "head", "output head", (256, 64)),
    k("decoder.final_layernorm.weight", "norm", "norm", (64,)),
    k(f"{TE}.pre_mlp_layernorm.weight", "norm", "norm", (64,)),
    k(f"{TE}.self_attention.linear_qkv.layer_norm_weight", "not-a-weight", "1-D BF16 tensor", (64,)),
    q(f"{TE}.self_attention.linear_qkv.weight", "te_attn", f"{TE}.self_attention.linear_qkv", shape=(192, 64)),
    q(f"{TE}.self_attention.linear_proj.weight", "te_attn", f"{TE}.self_attention.linear_proj"),
    k(f"{TE}.mlp.router.weight", "router", "router", (4, 64)),
    q(f"{TE}.mlp.experts.linear_fc1.weight0", "te_experts",
      f"{TE}.mlp.experts.linear_fc1.weight*", f"{TE}.mlp.experts.linear_fc1.weight0", (64, 64)),
    q(f"{TE}.mlp.experts.linear_fc1.weight13", "te_experts",
      f"{TE}.mlp.experts.linear_fc1.weight*", f"{TE}.mlp.experts.linear_fc1.weight13", (64, 64)),
    q(f"{TE}.mlp.experts.linear_fc2.weight3", "te_experts",
      f"{TE}.mlp.experts.linear_fc2.weight*", f"{TE}.mlp.experts.linear_fc2.weight3", (64, 32)),
    q(f"{TE}.mlp.linear_fc1.weight", "te_mlp", f"{TE}.mlp.linear_fc1", shape=(128, 64)),  # dense layer
    q(f"{TE}.mlp.linear_fc2.weight", "te_mlp", f"{TE}.mlp.linear_fc2", shape=(64, 64)),
    # Phi-3 (and GPT-NeoX / MPT) pre-fused projections: each one quantizer of its own
    q(f"{P3}.self_attn.qkv_proj.weight", "attn_fused_qkv", f"{P3}.self_attn.qkv_proj", shape=(192, 64)),
    q(f"{P3}.self_attn.o_proj.weight", "attn_other", f"{P3}.self_attn.o_proj"),
    q(f"{P3}.mlp.gate_up_proj.weight", "mlp_fused_gate_up", f"{P3}.mlp.gate_up_proj", shape=(256, 64)),
    q(f"{P3}.mlp.down_proj.weight", "mlp_down", f"{P3}.mlp.down_proj", shape=(64, 128)),
    q("gpt_neox.layers.0.attention.query_key_value.weight", "attn_fused_qkv",
      "gpt_neox.layers.0.attention.query_key_value", shape=(192, 64)),
    q("transformer.blocks.0.attn.Wqkv.weight", "attn_fused_qkv", "transformer.blocks.0.attn.Wqkv", shape=(192, 64)),
    # Qwen2-MoE / transformers-5 shared expert and its gate
    q(f"{QW}.mlp.shared_expert.gate_proj.weight", "shared_expert_gate_up",
      f"{QW}.mlp.shared_expert.gate_up_proj", shape=(128, 64)),
    q(f"{QW}.mlp.shared_expert.up_proj.weight", "shared_expert_gate_up",
      f"{QW}.mlp.shared_expert.gate_up_proj", shape=(128, 64)),
    q(f"{QW}.mlp.shared_expert.down_proj.weight", "shared_expert_down",
      f"{QW}.mlp.shared_expert.down_proj", shape=(64, 128)),
    k(f"{QW}.mlp.shared_expert_gate.weight", "shared_expert_gate", "shared expert gate", (1, 64)),
    # gpt-oss router (with bias) and attention sinks; Qwen2 attention biases
    k(f"{QW}.mlp.router.weight", "router", "router", (32, 64)),
    k(f"{QW}.mlp.router.bias", "bias", "bias", (32,)),
    k(f"{QW}.mlp.experts.gate_up_proj_bias", "fused-expert-bias", "bias", (32, 256)),  # gpt-oss [E, 2I]
    k(f"{QW}.mlp.experts.down_proj_bias", "fused-expert-bias", "bias", (32, 64)),
    k(f"{QW}.self_attn.q_proj.bias", "bias", "bias", (64,)),
    k(f"{QW}.self_attn.sinks", "not-a-weight", "1-D BF16 tensor", (64,)),
    # DeepSeek-V4: flat names, no `model.` prefix (../shared/LAYOUTS.md "DeepSeek-V4")
    k("embed.weight", "embedding", "embedding", (256, 64)),
    k("head.weight", "head", "output head", (256, 64)),
    k(f"{V4}.ffn.gate.weight", "router", "router", (8, 64)),
    k(f"{V4}.attn.compressor.wkv.weight", "v4_attn_kept", "attention compressor / indexer weights"),
    k(f"{V4}.attn.indexer.weights_proj.weight", "v4_attn_kept", "attention compressor / indexer weights", (4, 64)),
    q(f"{V4}.attn.wq_a.weight", "v4_attn_a", f"{V4}.attn.wq_a_wkv", shape=(32, 64)),
    q(f"{V4}.attn.wkv.weight", "v4_attn_a", f"{V4}.attn.wq_a_wkv", shape=(32, 64)),
    q(f"{V4}.attn.wq_b.weight", "v4_attn_other", f"{V4}.attn.wq_b"),
    q(f"{V4}.attn.wo_a.weight", "v4_attn_other", f"{V4}.attn.wo_a"),
    q(f"{V4}.attn.indexer.wq_b.weight", "v4_attn_other", f"{V4}.attn.indexer.wq_b"),
    q(f"{V4}.ffn.experts.7.w1.weight", "mixtral_w13", f"{V4}.ffn.experts.*.w13", f"{V4}.ffn.experts.7.w13", (32, 64)),
    q(f"{V4}.ffn.experts.7.w3.weight", "mixtral_w13", f"{V4}.ffn.experts.*.w13", f"{V4}.ffn.experts.7.w13", (32, 64)),
    q(f"{V4}.ffn.experts.7.w2.weight", "mixtral_w2", f"{V4}.ffn.experts.*.w2", f"{V4}.ffn.experts.7.w2", (64, 32)),
    q(f"{V4}.ffn.shared_experts.w1.weight", "v4_shared_w13", f"{V4}.ffn.shared_experts.w13", shape=(32, 64)),
    q(f"{V4}.ffn.shared_experts.w3.weight", "v4_shared_w13", f"{V4}.ffn.shared_experts.w13", shape=(32, 64)),
    q(f"{V4}.ffn.shared_experts.w2.weight", "v4_shared_w2", f"{V4}.ffn.shared_experts.w2", shape=(64, 32)),
]


def _rules(policy: str, **kw) -> RuleSet:
    return RuleSet(expert_policy=policy, num_layers=DEEPSEEK_LAYERS, **kw)


@pytest.mark.parametrize("policy", ["shared", "per-expert"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_table(case: Case, policy: str):
    d = _rules(policy).classify(case.name, case.dtype, case.shape)
    assert (d.rule, d.action) == (case.rule, case.action)
    assert d.key == (case.shared if policy == "shared" else case.per_expert)
    assert d.reason == case.reason
    assert d.warn is False


def test_every_builtin_row_has_a_case():
    covered = {c.rule for c in CASES}
    missing = [r.name for r in BUILTIN_RULES if r.name not in covered]
    assert missing == [], f"rows of BUILTIN_RULES without a test case: {missing}"


def test_attn_other_does_not_list_q_proj():
    # q_proj belongs to the fused q/k/v set; attn_other never sees it (attn_qkv comes first)
    other = next(r for r in BUILTIN_RULES if r.name == "attn_other")
    for n in ("q_proj", "k_proj", "v_proj"):
        assert other.regex.fullmatch(f"{QW}.self_attn.{n}.weight") is None
    assert other.regex.fullmatch(f"{QW}.self_attn.o_proj.weight") is not None


def test_prefused_rows_are_single_member_quantizers():
    rs = _rules("shared")
    for name, rule, proj in [(f"{P3}.self_attn.qkv_proj.weight", "attn_fused_qkv", "qkv_proj"),
                             ("gpt_neox.layers.0.attention.query_key_value.weight", "attn_fused_qkv", "query_key_value"),
                             ("transformer.blocks.0.attn.Wqkv.weight", "attn_fused_qkv", "Wqkv"),
                             (f"{P3}.mlp.gate_up_proj.weight", "mlp_fused_gate_up", "gate_up_proj")]:
        d = rs.classify(name, "BF16", (192, 64))
        assert (d.action, d.rule, d.proj, d.expert, d.fuse) == (QUANTIZE, rule, proj, None, ()), name
        assert d.key == name.removesuffix(".weight")


def test_row_names_are_unique():
    names = [r.name for r in BUILTIN_RULES]
    assert len(names) == len(set(names))


def test_fused_rows_report_projection_and_expert():
    rs = _rules("shared")
    d = rs.classify(f"{QW}.mlp.experts.5.up_proj.weight", "BF16", (32, 64))
    assert (d.proj, d.expert, d.fuse) == ("up_proj", "5", ("gate_proj", "up_proj"))
    d = rs.classify(f"{DS}.self_attn.kv_a_proj_with_mqa.weight", "BF16", (48, 64))
    assert (d.proj, d.expert, d.fuse) == ("kv_a_proj_with_mqa", None, ("q_a_proj", "kv_a_proj_with_mqa"))
    d = rs.classify(f"{TE}.mlp.experts.linear_fc1.weight13", "BF16", (64, 64))
    assert (d.proj, d.expert, d.fuse) == ("linear_fc1", "13", ())


def test_mtp_layer_needs_num_layers():
    # Without num_hidden_layers, layer 61 is an ordinary layer: its experts are quantized.
    d = RuleSet().classify("model.layers.61.mlp.experts.7.gate_proj.weight", "BF16", (32, 64))
    assert (d.action, d.key) == (QUANTIZE, "model.layers.61.mlp.experts.*.gate_up_proj")
    d = RuleSet().classify("model.layers.61.eh_proj.weight", "BF16", (64, 128))
    assert (d.rule, d.warn) == ("unclaimed", True)


# --exclude / --include


@pytest.mark.parametrize("policy", ["shared", "per-expert"])
@pytest.mark.parametrize("pattern, name, shape, shared, per_expert", [
    (r"model\.layers\.0\.self_attn\.o_proj\.weight", f"{QW}.self_attn.o_proj.weight", (64, 64),  # tensor name
     f"{QW}.self_attn.o_proj", f"{QW}.self_attn.o_proj"),
    (r"model\.layers\.0\.self_attn\.o_proj", f"{QW}.self_attn.o_proj.weight", (64, 64),  # module name
     f"{QW}.self_attn.o_proj", f"{QW}.self_attn.o_proj"),
    (r".*\.k_proj", f"{QW}.self_attn.k_proj.weight", (32, 64),  # one member of a fused set
     f"{QW}.self_attn.qkv_proj", f"{QW}.self_attn.qkv_proj"),
    (r".*\.mlp\.experts\.\d+\.down_proj", f"{QW}.mlp.experts.5.down_proj.weight", (64, 32),
     f"{QW}.mlp.experts.*.down_proj", f"{QW}.mlp.experts.5.down_proj"),
    (r"lm_head", "lm_head.weight", (256, 64), None, None),  # beats a keep row too; no quantizer to name
    (r"decoder\.layers\.0\.mlp\.experts\.linear_fc2", f"{TE}.mlp.experts.linear_fc2.weight3", (64, 32),  # TE module
     f"{TE}.mlp.experts.linear_fc2.weight*", f"{TE}.mlp.experts.linear_fc2.weight3"),
    (r".*linear_fc2\.weight3", f"{TE}.mlp.experts.linear_fc2.weight3", (64, 32),  # TE tensor name
     f"{TE}.mlp.experts.linear_fc2.weight*", f"{TE}.mlp.experts.linear_fc2.weight3"),
    (r".*\.custom_proj", f"{QW}.mlp.custom_proj.weight", (64, 64), None, None),  # unclaimed: no key
    (r".*\.mlp\.gate", f"{QW}.mlp.gate.weight", (8, 64), None, None),  # keep row: no key
])
def test_exclude(pattern, name, shape, shared, per_expert, policy):
    d = RuleSet(exclude=(pattern,), expert_policy=policy).classify(name, "BF16", shape)
    assert (d.action, d.rule, d.warn) == (KEEP, "--exclude", False)
    assert d.reason == f"--exclude {pattern}"
    # the key is the quantizer the rules would have given (so the plan can keep its fused set with it)
    assert d.key == (shared if policy == "shared" else per_expert)
    assert d.key == RuleSet(expert_policy=policy).classify(name, "BF16", shape).key


def test_exclude_keeps_the_include_key():
    name = f"{QW}.mlp.custom_proj.weight"
    d = RuleSet(include=(r".*\.custom_proj",), exclude=(r".*custom_proj\.weight",)).classify(name, "BF16", (64, 64))
    assert (d.action, d.rule, d.key) == (KEEP, "--exclude", f"{QW}.mlp.custom_proj")


def test_exclude_of_mtp_or_3d_tensor_has_no_key():
    rs = RuleSet(exclude=(r".*",), num_layers=DEEPSEEK_LAYERS)
    for name, shape in [("model.layers.61.mlp.experts.7.gate_proj.weight", (32, 64)),  # MTP: kept anyway
                        (f"{QW}.mlp.experts.0.down_proj.weight", (4, 64, 32))]:  # 3-D: never quantized
        d = rs.classify(name, "BF16", shape)
        assert (d.action, d.rule, d.key) == (KEEP, "--exclude", None), name


@pytest.mark.parametrize("pattern", ["o_proj", r"self_attn\.o_proj", r"model\.layers\.1\.self_attn\.o_proj"])
def test_exclude_is_a_full_match(pattern):
    d = RuleSet(exclude=(pattern,)).classify(f"{QW}.self_attn.o_proj.weight", "BF16", (64, 64))
    assert (d.action, d.rule) == (QUANTIZE, "attn_other")


def test_include_unclaimed_weight_gets_its_own_quantizer():
    # a projection no built-in row knows
    name = f"{QW}.mlp.custom_proj.weight"
    d = RuleSet().classify(name, "BF16", (128, 64))
    assert (d.action, d.rule, d.warn) == (KEEP, "unclaimed", True)
    assert d.reason == "no rule claims this 2-D weight"
    for pattern in (r".*\.custom_proj", r".*\.custom_proj\.weight"):  # module name or tensor name
        d = RuleSet(include=(pattern,)).classify(name, "BF16", (128, 64))
        assert (d.action, d.rule, d.key, d.fuse, d.warn) == (QUANTIZE, "--include", f"{QW}.mlp.custom_proj", (), False)


def test_include_does_not_override_prefused_rows():
    d = RuleSet(include=(r".*",)).classify(f"{P3}.self_attn.qkv_proj.weight", "BF16", (192, 64))
    assert (d.action, d.rule, d.key) == (QUANTIZE, "attn_fused_qkv", f"{P3}.self_attn.qkv_proj")


def test_include_does_not_touch_non_weights_or_claimed_tensors():
    rs = RuleSet(include=(r".*",), num_layers=DEEPSEEK_LAYERS)
    d = rs.classify(f"{QW}.self_attn.sinks", "BF16", (64,))  # 1-D: stays kept
    assert (d.action, d.rule, d.warn) == (KEEP, "not-a-weight", False)
    d = rs.classify(f"{QW}.mlp.gate.weight", "BF16", (8, 64))  # router row wins
    assert (d.action, d.rule) == (KEEP, "router")
    d = rs.classify("model.layers.61.eh_proj.weight", "BF16", (64, 128))  # MTP wins
    assert (d.action, d.rule) == (KEEP, "mtp")
    d = rs.classify(f"{QW}.extra_proj.weight", "I32", (64, 64))  # not a float weight
    assert (d.action, d.rule) == (KEEP, "not-a-weight")
    assert d.reason == "2-D I32 tensor"


def test_unclaimed_2d_weight_warns():
    d = RuleSet().classify("model.layers.0.mlp.custom_proj.weight", "BF16", (256, 64))
    assert (d.action, d.rule, d.key, d.warn) == (KEEP, "unclaimed", None, True)
    assert d.reason == "no rule claims this 2-D weight"


@pytest.mark.parametrize("name", [f"{QW}.mlp.experts.0.down_proj.weight", f"{QW}.self_attn.o_proj.weight"])
def test_3d_tensor_claimed_by_quantize_rule_is_kept_with_warning(name):
    d = RuleSet().classify(name, "BF16", (4, 64, 32))
    assert (d.action, d.key, d.warn) == (KEEP, None, True)
    assert d.reason == "3-D tensor, not a 2-D weight"


def test_3d_tensor_claimed_by_user_rule_is_kept_with_warning():
    # Llama 4's fused experts [E, in, 2*I], claimed by a user row
    user = Rule("l4_experts", r"(?P<prefix>.*\.feed_forward\.experts)\.(?P<proj>gate_up_proj|down_proj)",
                QUANTIZE, "{prefix}.{proj}")
    d = RuleSet((user,)).classify(f"{L4}.feed_forward.experts.gate_up_proj", "BF16", (16, 64, 256))
    assert (d.action, d.rule, d.warn) == (KEEP, "l4_experts", True)


def test_1d_tensor_claimed_by_quantize_rule_is_kept_quietly():
    d = RuleSet().classify(f"{QW}.self_attn.o_proj.weight", "BF16", (64,))
    assert (d.action, d.rule, d.warn, d.reason) == (KEEP, "attn_other", False, "1-D tensor, not a 2-D weight")


@pytest.mark.parametrize("name, shape", [
    (f"{L4}.feed_forward.experts.gate_up_proj", (16, 64, 256)),  # Llama 4 [E, in, 2I]
    (f"{L4}.feed_forward.experts.down_proj", (16, 128, 64)),
    (f"{QW}.mlp.experts.gate_up_proj", (8, 64, 64)),  # transformers 5 [E, 2I, H]
    (f"{QW}.mlp.experts.down_proj", (8, 64, 32)),
])
def test_fused_3d_experts_stay_in_high_precision_with_warning(name, shape):
    for dtype in ("BF16", "F16", "F32"):
        d = RuleSet().classify(name, dtype, shape)
        assert (d.action, d.rule, d.key, d.warn) == (KEEP, "unclaimed", None, True)
        assert "3-D weight" in d.reason
        assert d.reason == "3-D weight: no rule quantizes it"


def test_unclaimed_4d_float_and_3d_int_tensors():
    d = RuleSet().classify(f"{QW}.mlp.experts.blob", "BF16", (2, 4, 64, 64))
    assert (d.rule, d.warn, d.reason) == ("unclaimed", True, "4-D weight: no rule quantizes it")
    d = RuleSet().classify(f"{QW}.mlp.experts.blob", "I32", (4, 64, 64))  # not a float: no warning
    assert (d.rule, d.warn, d.reason) == ("not-a-weight", False, "3-D I32 tensor")


def test_bad_policy_and_bad_patterns():
    with pytest.raises(RuleError, match="expert policy"):
        RuleSet(expert_policy="grouped")
    with pytest.raises(RuleError, match=r"--include '\(\[bad'"):
        RuleSet(include=("([bad",))
    with pytest.raises(RuleError, match="--exclude"):
        RuleSet(exclude=("*o_proj",))


# user rules files

TOML_RULES = r"""
[[rule]]
name = "keep-o"
pattern = '.*\.o_proj\.weight'
action = "keep"
reason = "o_proj stays in bf16"

[[rule]]
name = "qkv-apart"
pattern = '(?P<prefix>.*\.self_attn)\.(?P<proj>q_proj|k_proj|v_proj)\.weight'
action = "quantize"
key = "{prefix}.{proj}"

[[rule]]
pattern = '(?P<prefix>.*\.mlp\.experts\.(?P<expert>\d+))\.(?P<proj>gate_proj|up_proj)\.weight'
action = "quantize"
key = "{prefix}.w13"
fuse = ["gate_proj", "up_proj"]
"""


def _check_user_rules(rules, fname: str):
    assert [r.name for r in rules] == ["keep-o", "qkv-apart", f"{fname}:2"]
    assert [r.reason for r in rules] == ["o_proj stays in bf16", "user rule", "user rule"]
    assert rules[2].fuse == ("gate_proj", "up_proj")
    rs = RuleSet(rules)
    assert rs.rules[:3] == rules and rs.rules[3:] == BUILTIN_RULES
    d = rs.classify(f"{QW}.self_attn.o_proj.weight", "BF16", (64, 64))
    assert (d.action, d.rule, d.reason) == (KEEP, "keep-o", "o_proj stays in bf16")
    d = rs.classify(f"{QW}.self_attn.k_proj.weight", "BF16", (32, 64))
    assert (d.action, d.rule, d.key, d.fuse) == (QUANTIZE, "qkv-apart", f"{QW}.self_attn.k_proj", ())
    # {expert} inside another group is not replaced: the user asked for per-expert keys
    d = rs.classify(f"{QW}.mlp.experts.5.up_proj.weight", "BF16", (32, 64))
    assert (d.rule, d.key, d.expert) == (f"{fname}:2", f"{QW}.mlp.experts.5.w13", "5")
    # rows the user does not override still apply
    d = rs.classify(f"{QW}.mlp.experts.5.down_proj.weight", "BF16", (64, 32))
    assert (d.rule, d.key) == ("experts_down", f"{QW}.mlp.experts.*.down_proj")


def test_load_rules_toml(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text(TOML_RULES)
    _check_user_rules(load_rules(p), "rules.toml")


def _json_rows() -> list[dict]:
    return [
        {"name": "keep-o", "pattern": r".*\.o_proj\.weight", "action": "keep", "reason": "o_proj stays in bf16"},
        {"name": "qkv-apart", "pattern": r"(?P<prefix>.*\.self_attn)\.(?P<proj>q_proj|k_proj|v_proj)\.weight",
         "action": "quantize", "key": "{prefix}.{proj}"},
        {"pattern": r"(?P<prefix>.*\.mlp\.experts\.(?P<expert>\d+))\.(?P<proj>gate_proj|up_proj)\.weight",
         "action": "quantize", "key": "{prefix}.w13", "fuse": ["gate_proj", "up_proj"]},
    ]


@pytest.mark.parametrize("wrap", [lambda rows: {"rules": rows}, lambda rows: rows], ids=["object", "list"])
def test_load_rules_json(tmp_path, wrap):
    p = tmp_path / "rules.json"
    p.write_text(json.dumps(wrap(_json_rows())))
    _check_user_rules(load_rules(p), "rules.json")


def _toml_row(**fields) -> str:
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    return f"[[rule]]\n{body}\n"


_Q = r"(?P<prefix>.*\.self_attn)\.(?P<proj>q_proj|k_proj)\.weight"
BAD_FILES = {
    "bad-regex": ("toml", _toml_row(pattern="(?P<prefix>.*\\.self_attn", action="keep"), "bad regex"),
    "quantize-without-key": ("toml", _toml_row(pattern=_Q, action="quantize"), "needs a key template"),
    "key-field-not-in-pattern": ("toml", _toml_row(pattern=_Q, action="quantize", key="{prefix}.{expert}"),
                                 r"key uses \['expert'\] not named in the pattern"),
    "unclosed-key-template": ("toml", _toml_row(pattern=_Q, action="quantize", key="{prefix"), "bad key template"),
    "bad-key-conversion": ("toml", _toml_row(pattern=_Q, action="quantize", key="{prefix!x}"), "bad key template"),
    "fuse-without-proj": ("toml", _toml_row(pattern=r"(?P<prefix>.*)\.w[13]\.weight", action="quantize",
                                            key="{prefix}.w13", fuse=["w1", "w3"]), "fuse needs a named group 'proj'"),
    "unknown-field": ("toml", _toml_row(pattern=_Q, action="keep", regex=".*"), r"unknown fields \['regex'\]"),
    "no-pattern": ("toml", _toml_row(action="keep"), "needs pattern and action"),
    "bad-action": ("toml", _toml_row(pattern=_Q, action="skip"), "action must be 'quantize' or 'keep'"),
    "fuse-not-a-list": ("toml", _toml_row(pattern=_Q, action="quantize", key="{prefix}", fuse="q_proj"),
                        "fuse must be a list of strings"),
    "invalid-toml": ("toml", "[[rule]\npattern = 'x'\n", "not valid TOML"),
    "invalid-json": ("json", '{"rules": [', "not valid JSON"),
    "no-rule-list": ("json", '{"rule": {"pattern": "x", "action": "keep"}}', "expected a list of rules"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_rules_file(tmp_path, case):
    ext, text, message = BAD_FILES[case]
    p = tmp_path / f"{case}.{ext}"
    p.write_text(text)
    with pytest.raises(RuleError, match=message) as e:
        load_rules(p)
    assert str(e.value).startswith(f"{p}: ")


def test_missing_rules_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(RuleError, match="cannot read rules file") as e:
        load_rules(p)
    assert str(p) in str(e.value)


def _fixture_names() -> set[str]:
    """Every tensor name of the test models and the source fixtures (real layouts, scaled down)."""
    from shardquant import testing
    from shardquant.testing_sources import SOURCES

    names = set()
    for make in (testing.qwen3_moe, testing.llama, testing.mixtral, testing.deepseek_v3, testing.te_grouped):
        names |= {n for n, _, _ in make().specs}
    for make in SOURCES.values():
        names |= {n for n, _, _ in make().model.specs}
    return names


def _first_row(name: str) -> int:
    return next((i for i, r in enumerate(BUILTIN_RULES) if r.regex.fullmatch(name)), -1)


def test_the_first_builtin_row_does_not_depend_on_a_dot_delimited_number():
    """shardquant/rules.py finds the first matching built-in row once per name shape (dot-delimited
    numbers made 0): every fixture name, its numbers changed to others, matches the same first row;
    and a RuleSet decides each name as the row-by-row search does."""
    import re

    names = _fixture_names()
    assert len(names) > 300
    for name in sorted(names):
        want = _first_row(name)
        for k in ("0", "7", "12", "255", "1000"):
            assert _first_row(re.sub(r"(?<=\.)[0-9]+(?=\.)", k, name)) == want, (name, k)
    rs = RuleSet(expert_policy="per-expert")
    for name in sorted(names):
        d = rs.classify(name, "BF16", (256, 128))
        i = _first_row(name)
        if i >= 0 and BUILTIN_RULES[i].action == KEEP:
            assert (d.action, d.rule) == (KEEP, BUILTIN_RULES[i].name), name
        elif i >= 0:  # the groups are this name's own (its expert index), not the first name of its shape
            groups = BUILTIN_RULES[i].regex.fullmatch(name).groupdict()
            assert (d.rule, d.expert, d.proj) == (BUILTIN_RULES[i].name, groups.get("expert"), groups.get("proj")), name
        else:
            assert d.rule == "unclaimed", name
