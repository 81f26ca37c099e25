"""Synthetic checkpoints in real layouts (shared/LAYOUTS.md, scaled down) for tests, examples and
benchmarks. Written shard by shard through the streaming writer, so any size fits in memory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .source import INDEX_NAME
from .st import OutTensor, ShardWriter, encode_header

Spec = tuple[str, str, tuple[int, ...]]  # (name, dtype, shape)


@dataclass
class Model:
    specs: list[Spec]
    config: dict


def qwen3_moe(hidden=64, layers=2, experts=8, inter=32, vocab=256, heads=4, kv_heads=2, head_dim=16) -> Model:
    s: list[Spec] = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for L in range(layers):
        p = f"model.layers.{L}"
        s += [(f"{p}.input_layernorm.weight", "BF16", (hidden,)),
              (f"{p}.self_attn.q_proj.weight", "BF16", (heads * head_dim, hidden)),
              (f"{p}.self_attn.k_proj.weight", "BF16", (kv_heads * head_dim, hidden)),
              (f"{p}.self_attn.v_proj.weight", "BF16", (kv_heads * head_dim, hidden)),
              (f"{p}.self_attn.o_proj.weight", "BF16", (hidden, heads * head_dim)),
              (f"{p}.self_attn.q_norm.weight", "BF16", (head_dim,)),
              (f"{p}.self_attn.k_norm.weight", "BF16", (head_dim,)),
              (f"{p}.post_attention_layernorm.weight", "BF16", (hidden,)),
              (f"{p}.mlp.gate.weight", "BF16", (experts, hidden))]
        for E in range(experts):
            e = f"{p}.mlp.experts.{E}"
            s += [(f"{e}.gate_proj.weight", "BF16", (inter, hidden)),
                  (f"{e}.up_proj.weight", "BF16", (inter, hidden)),
                  (f"{e}.down_proj.weight", "BF16", (hidden, inter))]
    s += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_experts": experts, "num_experts_per_tok": 2,
        "moe_intermediate_size": inter, "intermediate_size": inter * 4, "vocab_size": vocab,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True,
    }
    return Model(s, cfg)


def llama(hidden=64, layers=2, inter=128, vocab=256, heads=4, kv_heads=2) -> Model:
    hd = hidden // heads
    s: list[Spec] = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for L in range(layers):
        p = f"model.layers.{L}"
        s += [(f"{p}.input_layernorm.weight", "BF16", (hidden,)),
              (f"{p}.self_attn.q_proj.weight", "BF16", (heads * hd, hidden)),
              (f"{p}.self_attn.k_proj.weight", "BF16", (kv_heads * hd, hidden)),
              (f"{p}.self_attn.v_proj.weight", "BF16", (kv_heads * hd, hidden)),
              (f"{p}.self_attn.o_proj.weight", "BF16", (hidden, heads * hd)),
              (f"{p}.post_attention_layernorm.weight", "BF16", (hidden,)),
              (f"{p}.mlp.gate_proj.weight", "BF16", (inter, hidden)),
              (f"{p}.mlp.up_proj.weight", "BF16", (inter, hidden)),
              (f"{p}.mlp.down_proj.weight", "BF16", (hidden, inter))]
    s += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "num_hidden_layers": layers, "intermediate_size": inter, "vocab_size": vocab,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "torch_dtype": "bfloat16"}
    return Model(s, cfg)


def mixtral(hidden=64, layers=2, experts=4, inter=128, vocab=256, heads=4, kv_heads=2) -> Model:
    base = llama(hidden, layers, inter, vocab, heads, kv_heads)
    s: list[Spec] = []
    for name, dt, shape in base.specs:
        if ".mlp." not in name:
            s.append((name, dt, shape))
        elif name.endswith("mlp.gate_proj.weight"):
            p = name[: -len(".mlp.gate_proj.weight")] + ".block_sparse_moe"
            s.append((f"{p}.gate.weight", "BF16", (experts, hidden)))
            for E in range(experts):
                s += [(f"{p}.experts.{E}.w1.weight", "BF16", (inter, hidden)),
                      (f"{p}.experts.{E}.w2.weight", "BF16", (hidden, inter)),
                      (f"{p}.experts.{E}.w3.weight", "BF16", (inter, hidden))]
    cfg = dict(base.config, architectures=["MixtralForCausalLM"], model_type="mixtral",
               num_local_experts=experts, num_experts_per_tok=2)
    return Model(s, cfg)


def deepseek_v3(hidden=64, layers=3, dense_layers=1, experts=4, inter=32, dense_inter=96, vocab=256,
                q_lora=48, kv_lora=32, rope=16, nope=16, v_dim=16, heads=2, mtp=1) -> Model:
    s: list[Spec] = [("model.embed_tokens.weight", "BF16", (vocab, hidden))]

    def layer(L: int, moe: bool) -> list[Spec]:
        p = f"model.layers.{L}"
        out: list[Spec] = [
            (f"{p}.input_layernorm.weight", "BF16", (hidden,)),
            (f"{p}.self_attn.q_a_proj.weight", "BF16", (q_lora, hidden)),
            (f"{p}.self_attn.q_a_layernorm.weight", "BF16", (q_lora,)),
            (f"{p}.self_attn.q_b_proj.weight", "BF16", (heads * (nope + rope), q_lora)),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", "BF16", (kv_lora + rope, hidden)),
            (f"{p}.self_attn.kv_a_layernorm.weight", "BF16", (kv_lora,)),
            (f"{p}.self_attn.kv_b_proj.weight", "BF16", (heads * (nope + v_dim), kv_lora)),
            (f"{p}.self_attn.o_proj.weight", "BF16", (hidden, heads * v_dim)),
            (f"{p}.post_attention_layernorm.weight", "BF16", (hidden,)),
        ]
        if not moe:
            return out + [(f"{p}.mlp.gate_proj.weight", "BF16", (dense_inter, hidden)),
                          (f"{p}.mlp.up_proj.weight", "BF16", (dense_inter, hidden)),
                          (f"{p}.mlp.down_proj.weight", "BF16", (hidden, dense_inter))]
        out += [(f"{p}.mlp.gate.weight", "BF16", (experts, hidden)),
                (f"{p}.mlp.gate.e_score_correction_bias", "F32", (experts,))]
        for E in range(experts):
            e = f"{p}.mlp.experts.{E}"
            out += [(f"{e}.gate_proj.weight", "BF16", (inter, hidden)),
                    (f"{e}.up_proj.weight", "BF16", (inter, hidden)),
                    (f"{e}.down_proj.weight", "BF16", (hidden, inter))]
        return out + [(f"{p}.mlp.shared_experts.gate_proj.weight", "BF16", (inter, hidden)),
                      (f"{p}.mlp.shared_experts.up_proj.weight", "BF16", (inter, hidden)),
                      (f"{p}.mlp.shared_experts.down_proj.weight", "BF16", (hidden, inter))]

    for L in range(layers):
        s += layer(L, L >= dense_layers)
    for L in range(layers, layers + mtp):
        p = f"model.layers.{L}"
        s += [(f"{p}.embed_tokens.weight", "BF16", (vocab, hidden)), (f"{p}.enorm.weight", "BF16", (hidden,)),
              (f"{p}.hnorm.weight", "BF16", (hidden,)), (f"{p}.eh_proj.weight", "BF16", (hidden, 2 * hidden)),
              (f"{p}.shared_head.head.weight", "BF16", (vocab, hidden)),
              (f"{p}.shared_head.norm.weight", "BF16", (hidden,))]
        s += layer(L, True)
    s += [("model.norm.weight", "BF16", (hidden,)), ("lm_head.weight", "BF16", (vocab, hidden))]
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
           "num_hidden_layers": layers, "first_k_dense_replace": dense_layers, "n_routed_experts": experts,
           "moe_intermediate_size": inter, "intermediate_size": dense_inter, "q_lora_rank": q_lora,
           "kv_lora_rank": kv_lora, "num_nextn_predict_layers": mtp, "vocab_size": vocab,
           "torch_dtype": "bfloat16"}
    return Model(s, cfg)


def te_grouped(hidden=64, layers=2, experts=4, inter=32, vocab=256) -> Model:
    s: list[Spec] = [("embedding.word_embeddings.weight", "BF16", (vocab, hidden))]
    for L in range(layers):
        p = f"decoder.layers.{L}"
        s += [(f"{p}.self_attention.linear_qkv.layer_norm_weight", "BF16", (hidden,)),
              (f"{p}.self_attention.linear_qkv.weight", "BF16", (3 * hidden, hidden)),
              (f"{p}.self_attention.linear_proj.weight", "BF16", (hidden, hidden)),
              (f"{p}.pre_mlp_layernorm.weight", "BF16", (hidden,)),
              (f"{p}.mlp.router.weight", "BF16", (experts, hidden))]
        s += [(f"{p}.mlp.experts.linear_fc1.weight{E}", "BF16", (2 * inter, hidden)) for E in range(experts)]
        s += [(f"{p}.mlp.experts.linear_fc2.weight{E}", "BF16", (hidden, inter)) for E in range(experts)]
    s += [("decoder.final_layernorm.weight", "BF16", (hidden,)), ("output_layer.weight", "BF16", (vocab, hidden))]
    return Model(s, {"model_type": "megatron_te", "num_hidden_layers": layers, "hidden_size": hidden})


def random_data(spec: Spec, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Raw storage for a spec: normal values (bf16 by truncation-free rounding of fp32)."""
    name, dtype, shape = spec
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16)
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # fp32 -> bf16, RNE


def fast_data(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """Cheap bf16-looking data for large benchmark checkpoints: random sign, exponent and mantissa
    within [2^-12, 2^-4), generated as integers (an order of magnitude faster than normals)."""
    _, dtype, shape = spec
    u = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    u = (u & np.uint16(0x807F)) | ((np.uint16(0x3980) + ((u >> 7) & np.uint16(0x7)) * np.uint16(0x80)))
    if dtype != "BF16":
        return (u.astype(np.uint32) << 16).view(np.float32).astype(np.float16 if dtype == "F16" else np.float32)
    return u


def write_checkpoint(
    root: Path,
    model: Model,
    *,
    shard_bytes: int = 1 << 20,
    seed: int = 0,
    data=None,
    extra_files: dict[str, str] | None = None,
    single_file: bool = False,
    sparse: bool = False,
) -> Path:
    """Write `model` as a sharded (or single-file) bf16 checkpoint with index, config and tokenizer
    files. `data(spec, rng)` makes each tensor's raw storage (default: `random_data`). `sparse`: real
    headers, the data left as holes (a file of full size that takes no disk: full-size layouts to plan)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = data or random_data
    outs = [OutTensor(n, d, sh) for n, d, sh in model.specs]
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in outs:
        if not single_file and shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    specs = {s[0]: s for s in model.specs}
    weight_map = {}
    for i, ts in enumerate(shards):
        fname = "model.safetensors" if single_file else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if sparse:
            header = encode_header(ts, {"format": "pt"})
            with open(root / fname, "wb") as f:
                f.write(header)
                f.truncate(len(header) + sum(t.nbytes for t in ts))
            weight_map.update({t.name: fname for t in ts})
            continue
        w = ShardWriter(root / fname, ts, {"format": "pt"})
        for t in ts:
            w.write(t.name, data(specs[t.name], rng))
            weight_map[t.name] = fname
        w.close(sync=False)
    if not single_file:
        index = {"metadata": {"total_size": sum(t.nbytes for t in outs)}, "weight_map": weight_map}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (root / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    files = {
        "generation_config.json": json.dumps({"do_sample": False, "eos_token_id": 1}, indent=2) + "\n",
        "tokenizer_config.json": json.dumps({"model_max_length": 512}, indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"eos_token": "</s>"}, indent=2) + "\n",
        "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}\n",
    }
    files.update(extra_files or {})
    for k, v in files.items():
        (root / k).write_text(v)
    return root


def served() -> list[tuple[str, str]]:
    """Every (format, flavor) pair the CLI accepts, from the registries: test matrices use it, so a
    new format or flavor is covered by adding it."""
    from . import flavors, formats

    return [(f, fl) for f in formats.FORMATS for fl in flavors.FLAVORS if flavors.refusal(fl, f) is None]


def refused() -> list[tuple[str, str]]:
    """Every (format, flavor) pair refused with a reason (formats/base.py Format.refused)."""
    from . import flavors, formats

    return [(f, fl) for f in formats.FORMATS for fl in flavors.FLAVORS if flavors.refusal(fl, f) is not None]


# The same layouts with every quantized weight a whole number of 128x128 tiles, for formats with 2-D
# block scales (formats/base.py Format.block): with the small defaults above they would keep everything.
TILED = {
    "qwen3_moe": lambda: qwen3_moe(hidden=128, inter=128, heads=2, kv_heads=1, head_dim=128),
    "llama": lambda: llama(hidden=128, inter=128, heads=1, kv_heads=1),
    "mixtral": lambda: mixtral(hidden=128, inter=128, heads=1, kv_heads=1),
    "deepseek_v3": lambda: deepseek_v3(hidden=128, inter=128, dense_inter=128, q_lora=128, kv_lora=128, rope=128,
                                       nope=128, v_dim=128, heads=1),
    "te_grouped": lambda: te_grouped(hidden=128, inter=128),
}


def sized_for(fmt: str, name: str, default):
    """The model constructor a test of format `fmt` should use for layout `name`: `default` unless the
    format tiles weights in 2-D blocks (then TILED's)."""
    from . import formats

    return TILED[name] if formats.declared(fmt).block else default
