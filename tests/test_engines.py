"""`verify --engine`: the engines' loading contracts as data (shardquant/engine_rules/*.json, checked by
shardquant/engines.py; docs/formats.md "verify --engine").

- every rule of every table has a tiny checkpoint here that violates exactly it, and the walk over the
  table fails for a rule without one;
- what shardquant writes today passes every engine that serves its (format, flavor) pair, and the
  engines that cannot serve a pair (docs/formats.md section 9) say so, each by its own rule;
- the FP8 spellings of older releases, and the llm-compressor and ModelOpt reference checkpoints, are
  judged as the engines would judge them.
"""

from __future__ import annotations

import ast
import json
import shutil
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner

from shardquant import engines, formats, testing
from shardquant.cli import main
from shardquant.convert import convert
from shardquant.st import STORAGE, OutTensor, ShardWriter
from shardquant.verify import verify

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data"
LLMC = DATA / "llmc-qwen3-moe-nvfp4a16"
MODELOPT = DATA / "modelopt-qwen3-moe-w4a16-nvfp4"
CT = "compressed-tensors"
ENGINES = engines.engine_names()
L0 = "model.layers.0"


# ---------------------------------------------------------------------------------------------
# tiny checkpoints of any producer's spelling, written directly (config + one safetensors file)

@dataclass
class Ckpt:
    tensors: dict[str, tuple[str, tuple[int, ...], object]]  # name -> (dtype, shape, fill value or array)
    qc: dict | None  # config.json quantization_config
    hf: dict | None = None  # hf_quant_config.json
    extra: dict = field(default_factory=dict)  # other config.json keys

    def module(self, name: str) -> dict[str, tuple]:
        return {k: v for k, v in self.tensors.items() if k.startswith(name + ".")}

    def set(self, name: str, dtype: str | None = None, shape: tuple | None = None, fill: object = None) -> None:
        d, s, f = self.tensors[name]
        self.tensors[name] = (dtype or d, tuple(shape) if shape is not None else s, f if fill is None else fill)

    def rename(self, old: str, new: str) -> None:
        self.tensors = {(new if k == old else k): v for k, v in self.tensors.items()}

    def drop(self, suffix: str) -> None:
        self.tensors = {k: v for k, v in self.tensors.items() if not k.endswith(suffix)}

    def configs(self) -> list[dict]:
        """The quantization dicts an edit should change in both spellings (flat and nested)."""
        return [d for d in (self.qc, (self.hf or {}).get("quantization")) if d is not None]

    def write(self, d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        outs = [OutTensor(n, dt, tuple(sh)) for n, (dt, sh, _) in self.tensors.items()]
        w = ShardWriter(d / "model.safetensors", outs, {"format": "pt"})
        for n, (dt, sh, fill) in self.tensors.items():
            a = np.asarray(fill).astype(STORAGE[dt]) if isinstance(fill, (list, np.ndarray)) else \
                np.full(sh, fill, dtype=STORAGE[dt])
            w.write(n, a.reshape(sh))
        w.close(sync=False)
        cfg = {"architectures": ["TinyForCausalLM"], "model_type": "tiny", **self.extra}
        if self.qc is not None:
            cfg["quantization_config"] = self.qc
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        if self.hf is not None:
            (d / "hf_quant_config.json").write_text(json.dumps(self.hf, indent=1))
        return d


F32_ONE = float(np.float32(1.0))
E4M3_ONE = 0x38  # 1.0 as float8_e4m3fn
E8M0_ONE = 127  # 2^0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def linear_tensors(kind: str, name: str, out: int, inn: int) -> dict[str, tuple]:
    """The tensors of one quantized linear in a producer's spelling (docs/formats.md sections 2-7)."""
    f8, blk = ("F8_E4M3", (out, inn), 0), ("F32", (cdiv(out, 128), cdiv(inn, 128)), F32_ONE)
    t = {
        "mo-nvfp4a16": {"weight": ("U8", (out, inn // 2), 0), "weight_scale": ("F8_E4M3", (out, inn // 16), E4M3_ONE),
                        "weight_scale_2": ("F32", (), F32_ONE)},
        "mo-nvfp4": {"weight": ("U8", (out, inn // 2), 0), "weight_scale": ("F8_E4M3", (out, inn // 16), E4M3_ONE),
                     "weight_scale_2": ("F32", (), F32_ONE), "input_scale": ("F32", (), F32_ONE)},
        "mo-fp8": {"weight": f8, "weight_scale": ("F32", (), F32_ONE), "input_scale": ("F32", (), F32_ONE)},
        "mo-pcpt": {"weight": f8, "weight_scale": ("F32", (out,), F32_ONE)},
        "mo-pbwo": {"weight": f8, "weight_scale": ("F32", (cdiv(out, 128), 1, inn // 128, 1), F32_ONE)},
        "mo-mxfp8": {"weight": f8, "weight_scale": ("U8", (out, inn // 32), E8M0_ONE)},
        "ct-nvfp4a16": {"weight_packed": ("U8", (out, inn // 2), 0),
                        "weight_scale": ("F8_E4M3", (out, inn // 16), E4M3_ONE),
                        "weight_global_scale": ("F32", (1,), F32_ONE), "weight_shape": ("I64", (2,), [out, inn])},
        "ct-nvfp4": {"weight_packed": ("U8", (out, inn // 2), 0), "weight_scale": ("F8_E4M3", (out, inn // 16), E4M3_ONE),
                     "weight_global_scale": ("F32", (1,), F32_ONE), "input_global_scale": ("F32", (1,), F32_ONE),
                     "weight_shape": ("I64", (2,), [out, inn])},
        "ct-fp8-tensor": {"weight": f8, "weight_scale": ("F32", (1,), F32_ONE), "input_scale": ("F32", (1,), F32_ONE)},
        "ct-fp8-channel": {"weight": f8, "weight_scale": ("F32", (out, 1), F32_ONE)},
        "ct-fp8-block": {"weight": f8, "weight_scale": blk},
        "ct-mxfp8": {"weight": f8, "weight_scale": ("U8", (out, inn // 32), E8M0_ONE)},
        "ct-mxfp4": {"weight_packed": ("U8", (out, inn // 2), 0), "weight_scale": ("U8", (out, inn // 32), E8M0_ONE)},
        "block-fp8": {"weight": f8, "weight_scale_inv": blk},
    }[kind]
    return {f"{name}.{role}": v for role, v in t.items()}


def layout(moe: bool, mla: bool = False, layers: int = 1, q_out: int = 128, v_out: int = 128,
           inter: int = 128, hidden: int = 128) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """(linear name -> (out, in), kept tensors) of a tiny decoder."""
    lin: dict[str, tuple[int, int]] = {}
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for L in range(layers):
        p = f"model.layers.{L}"
        if mla:
            lin.update({f"{p}.self_attn.q_a_proj": (128, hidden), f"{p}.self_attn.q_b_proj": (128, 128),
                        f"{p}.self_attn.kv_a_proj_with_mqa": (128, hidden), f"{p}.self_attn.kv_b_proj": (128, 128),
                        f"{p}.self_attn.o_proj": (hidden, 128)})
        else:
            lin.update({f"{p}.self_attn.q_proj": (q_out, hidden), f"{p}.self_attn.k_proj": (128, hidden),
                        f"{p}.self_attn.v_proj": (v_out, hidden), f"{p}.self_attn.o_proj": (hidden, q_out)})
        if moe:
            kept.append(f"{p}.mlp.gate.weight")
            for e in range(2):
                lin.update({f"{p}.mlp.experts.{e}.gate_proj": (inter, hidden), f"{p}.mlp.experts.{e}.up_proj": (inter, hidden),
                            f"{p}.mlp.experts.{e}.down_proj": (hidden, inter)})
        else:
            lin.update({f"{p}.mlp.gate_proj": (inter, hidden), f"{p}.mlp.up_proj": (inter, hidden),
                        f"{p}.mlp.down_proj": (hidden, inter)})
        kept.append(f"{p}.input_layernorm.weight")
    return lin, kept


def _excluded(kept: list[str]) -> list[str]:
    return [k.removesuffix(".weight") for k in kept if "norm" not in k]


# The spellings: (tensor kind, config writer)
def _modelopt(algo: str, group_size: int | None = None, w4a4: bool = False):
    def configs(exclude: list[str]) -> tuple[dict, dict]:
        weights = {"dynamic": False, "num_bits": 4 if "NVFP4" in algo else 8, "type": "float"}
        if group_size:
            weights["group_size"] = group_size
        act = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16} if w4a4 else None
        flat = {"quant_method": "modelopt", "quant_algo": algo, "ignore": list(exclude), "kv_cache_scheme": None,
                "config_groups": {"group_0": {"weights": weights, "input_activations": act, "targets": ["Linear"]}},
                "producer": {"name": "modelopt", "version": "0.47.0"}}
        nested = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": list(exclude)}
        if group_size:
            nested["group_size"] = group_size
        return flat, {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": nested}
    return configs


def _ct(weights: dict, act: dict | None, fmt: str):
    def configs(exclude: list[str]) -> tuple[dict, None]:
        return {"quant_method": CT, "format": fmt, "quantization_status": "compressed", "kv_cache_scheme": None,
                "ignore": list(exclude),
                "config_groups": {"group_0": {"format": fmt, "targets": ["Linear"], "weights": dict(weights),
                                              "input_activations": dict(act) if act else None}}}, None
    return configs


def _block_fp8(exclude: list[str]) -> tuple[dict, None]:
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
            "ignored_layers": list(exclude), "modules_to_not_convert": list(exclude)}, None


W8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
SCHEMES = {
    "mo-nvfp4a16": ("mo-nvfp4a16", _modelopt("W4A16_NVFP4", 16)),
    "mo-nvfp4": ("mo-nvfp4", _modelopt("NVFP4", 16, w4a4=True)),
    "mo-fp8": ("mo-fp8", _modelopt("FP8")),
    "mo-pcpt": ("mo-pcpt", _modelopt("FP8_PER_CHANNEL_PER_TOKEN")),
    "mo-pbwo": ("mo-pbwo", _modelopt("FP8_PB_WO", 128)),
    "mo-mxfp8": ("mo-mxfp8", _modelopt("MXFP8", 32)),
    "ct-nvfp4a16": ("ct-nvfp4a16", _ct({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                        "symmetric": True, "dynamic": False}, None, "nvfp4-pack-quantized")),
    "ct-nvfp4": ("ct-nvfp4", _ct({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                  "symmetric": True, "dynamic": False},
                                 {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                  "symmetric": True, "dynamic": "local"}, "nvfp4-pack-quantized")),
    "ct-fp8-dynamic": ("ct-fp8-channel", _ct({**W8, "strategy": "channel"}, TOKEN, "float-quantized")),
    "ct-fp8-tensor-static": ("ct-fp8-tensor", _ct({**W8, "strategy": "tensor"},
                                                  {**TOKEN, "strategy": "tensor", "dynamic": False}, "float-quantized")),
    "ct-fp8-block": ("ct-fp8-block", _ct({**W8, "strategy": "block", "block_structure": [128, 128]},
                                         {**TOKEN, "strategy": "group", "group_size": 128}, "float-quantized")),
    "ct-mxfp8": ("ct-mxfp8", _ct({**W8, "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"},
                                 {**TOKEN, "strategy": "group", "group_size": 32}, "mxfp8-quantized")),
    "ct-mxfp4": ("ct-mxfp4", _ct({"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32,
                                  "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8"}, None,
                                 "mxfp4-pack-quantized")),
    "block-fp8": ("block-fp8", _block_fp8),
}


def make(scheme: str, moe: bool = False, bf16: tuple[str, ...] = (), **dims) -> Ckpt:
    """A checkpoint of one spelling: every linear quantized (those in `bf16` kept and excluded)."""
    kind, configs = SCHEMES[scheme]
    lin, kept = layout(moe, **dims)
    tensors: dict[str, tuple] = {}
    for name in kept:
        tensors[name] = ("BF16", (256, 128) if "embed" in name or "lm_head" in name else
                         (2, 128) if name.endswith("mlp.gate.weight") else (128,), 0)
    for name, (out, inn) in lin.items():
        tensors.update({f"{name}.weight": ("BF16", (out, inn), 0)} if name in bf16 else linear_tensors(kind, name, out, inn))
    qc, hf = configs(_excluded(kept) + list(bf16))
    return Ckpt(tensors, qc, hf)


def mixed(algos: dict[str, str], moe: bool = False) -> Ckpt:
    """ModelOpt MIXED_PRECISION: each linear's algorithm (FP8 or W4A16_NVFP4) in quantized_layers."""
    lin, kept = layout(moe)
    ck = make("mo-fp8", moe)
    layers = {}
    for name, (out, inn) in lin.items():
        algo = algos.get(name.rsplit(".", 1)[-1], "W4A16_NVFP4")
        kind = {"FP8": "mo-fp8", "W4A16_NVFP4": "mo-nvfp4a16"}[algo]
        ck.tensors = {k: v for k, v in ck.tensors.items() if not k.startswith(name + ".")}
        ck.tensors.update(linear_tensors(kind, name, out, inn))
        layers[name] = {"quant_algo": algo, **({"group_size": 16} if algo == "W4A16_NVFP4" else {})}
    for d in ck.configs():
        d["quant_algo"] = "MIXED_PRECISION"
        d["quantized_layers"] = json.loads(json.dumps(layers))
    return ck


# ---------------------------------------------------------------------------------------------
# one case per rule: (the spelling it starts from, the edit that breaks exactly that rule, other rules
# of the same engine the edit necessarily breaks too). The starting spelling passes the rule.

def _set_algo(algo: str):
    def edit(ck: Ckpt) -> None:
        for d in ck.configs():
            d["quant_algo"] = algo
    return edit


def _group(ck: Ckpt) -> dict:
    return ck.qc["config_groups"]["group_0"]


def _ignore(*names: str):
    def edit(ck: Ckpt) -> None:
        for d in ck.configs():
            d["ignore" if "ignore" in d else "exclude_modules"] = d.get("ignore", d.get("exclude_modules")) + list(names)
    return edit


def _no_inline(ck: Ckpt) -> None:
    ck.qc = None


def _both(*edits):
    def edit(ck: Ckpt) -> None:
        for e in edits:
            e(ck)
    return edit


def _rebuild(*args, **kw):
    """An edit that swaps the whole checkpoint for another spelling."""
    def edit(ck: Ckpt) -> Ckpt:
        return make(*args, **kw)
    return edit


def _to_pcpt(ck: Ckpt) -> None:
    _set_algo("FP8_PER_CHANNEL_PER_TOKEN")(ck)
    ck.drop(".input_scale")
    for n, (dt, sh, f) in list(ck.tensors.items()):
        if n.endswith(".weight_scale"):
            out = ck.tensors[n.replace("weight_scale", "weight")][1][0]
            ck.set(n, shape=(out,))


def _w4a16(ck: Ckpt) -> None:
    _set_algo("W4A16_NVFP4")(ck)
    _group(ck)["input_activations"] = None
    ck.drop(".input_scale")


def _rename_role(old: str, new: str, only: str = ""):
    def edit(ck: Ckpt) -> None:
        for n in [n for n in ck.tensors if n.endswith("." + old) and only in n]:
            ck.rename(n, n[: -len(old)] + new)
    return edit


O = f"{L0}.self_attn.o_proj"
E1 = f"{L0}.mlp.experts.1"

CASES: dict[tuple[str, str], tuple] = {
    # vLLM
    ("vllm", "modelopt-algo-known"): (lambda: make("mo-fp8"), _set_algo("INT4_AWQ")),
    ("vllm", "modelopt-exclude-is-list"): (lambda: make("mo-fp8"), lambda ck: ck.qc.update(ignore=None)),
    ("vllm", "modelopt-nvfp4-required-keys"): (lambda: make("mo-nvfp4a16"),
                                               _both(_no_inline, lambda ck: ck.hf["quantization"].pop("group_size"))),
    ("vllm", "modelopt-mxfp8-required-keys"): (lambda: make("mo-mxfp8"),
                                               _both(_no_inline, lambda ck: ck.hf["quantization"].pop("kv_cache_quant_algo"))),
    ("vllm", "modelopt-exclude-no-substring"): (lambda: make("mo-nvfp4a16"), _ignore(f"{L0}.mlp.gate")),
    ("vllm", "modelopt-fused-same-exclusion"): (lambda: make("mo-nvfp4a16"),
                                                _rebuild("mo-nvfp4a16", bf16=(f"{L0}.self_attn.q_proj",))),
    ("vllm", "modelopt-fp8-needs-input-scale"): (lambda: make("mo-fp8"), lambda ck: ck.drop("o_proj.input_scale")),
    ("vllm", "modelopt-fp8-moe-needs-input-scale"): (lambda: make("mo-fp8", moe=True),
                                                     lambda ck: ck.drop("experts.1.down_proj.input_scale")),
    ("vllm", "modelopt-fp8-moe-scalar-weight-scale"): (lambda: make("mo-fp8", moe=True),
                                                       lambda ck: ck.set(f"{E1}.down_proj.weight_scale", shape=(128,))),
    ("vllm", "modelopt-pcpt-scale-1d"): (lambda: make("mo-pcpt"), lambda ck: ck.set(f"{O}.weight_scale", shape=(128, 1))),
    ("vllm", "modelopt-pbwo-shape"): (lambda: make("mo-pbwo"), lambda ck: ck.set(f"{O}.weight_scale", shape=(1, 1))),
    ("vllm", "modelopt-nvfp4-shapes"): (lambda: make("mo-nvfp4a16"), lambda ck: ck.set(f"{O}.weight_scale", shape=(128, 4))),
    ("vllm", "modelopt-nvfp4-fused-global-scale"): (lambda: make("mo-nvfp4a16"),
                                                    lambda ck: ck.set(f"{L0}.self_attn.k_proj.weight_scale_2", fill=2.0)),
    ("vllm", "modelopt-nvfp4-moe-gate-up-scale"): (lambda: make("mo-nvfp4a16", moe=True),
                                                   lambda ck: ck.set(f"{E1}.up_proj.weight_scale_2", fill=2.0)),
    ("vllm", "modelopt-mxfp8-shapes"): (lambda: make("mo-mxfp8"), lambda ck: ck.set(f"{O}.weight_scale", shape=(128, 8))),
    ("vllm", "modelopt-mixed-quantized-layers"): (lambda: mixed({"q_proj": "FP8", "k_proj": "FP8", "v_proj": "FP8"}),
                                                  lambda ck: [d["quantized_layers"].pop(O) for d in ck.configs()]),
    ("vllm", "ct-moe-fp8-needs-activations"): (lambda: make("ct-fp8-block", moe=True),
                                               lambda ck: _group(ck).update(input_activations=None)),
    ("vllm", "ct-moe-fp8-strategy-pair"): (lambda: make("ct-fp8-tensor-static", moe=True),
                                           _both(lambda ck: _group(ck).update(input_activations=dict(TOKEN)),
                                                 lambda ck: ck.drop(".input_scale"))),
    ("vllm", "ct-fp8-channel-scale-2d"): (lambda: make("ct-fp8-dynamic"), lambda ck: ck.set(f"{O}.weight_scale", shape=(128,))),
    ("vllm", "ct-fp8-static-input-scale"): (lambda: make("ct-fp8-tensor-static"), lambda ck: ck.drop("o_proj.input_scale")),
    ("vllm", "ct-format-activation"): (lambda: make("ct-fp8-dynamic"),
                                       lambda ck: [d.update(format="pack-quantized") for d in (ck.qc, _group(ck))]),
    ("vllm", "ct-mxfp8-scale-dtype"): (lambda: make("ct-mxfp8"),
                                       lambda ck: _group(ck)["weights"].update(scale_dtype="torch.float32")),
    ("vllm", "ct-mxfp4-shapes"): (lambda: make("ct-mxfp4"), lambda ck: ck.set(f"{O}.weight_scale", shape=(128, 8))),
    ("vllm", "ct-moe-expert0-scheme"): (lambda: make("ct-fp8-dynamic", moe=True),
                                        _rebuild("ct-fp8-dynamic", moe=True, bf16=(f"{L0}.mlp.experts.0.down_proj",))),
    ("vllm", "ct-ignore-unquantizes"): (lambda: make("ct-fp8-dynamic"), _ignore("re:.*o_proj$")),
    ("vllm", "ct-nvfp4-moe-gate-up-scale"): (lambda: make("ct-nvfp4a16", moe=True),
                                             lambda ck: ck.set(f"{E1}.up_proj.weight_global_scale", fill=2.0)),
    ("vllm", "fp8-block-activation-dynamic"): (lambda: make("block-fp8"), lambda ck: ck.qc.update(activation_scheme="static")),
    ("vllm", "fp8-block-merged-divisible"): (lambda: make("block-fp8"), _rebuild("block-fp8", q_out=64)),
    ("vllm", "fp8-block-moe-divisible"): (lambda: make("block-fp8", moe=True), _rebuild("block-fp8", moe=True, inter=64)),
    ("vllm", "fp8-block-scale-shape"): (lambda: make("block-fp8"), lambda ck: ck.set(f"{O}.weight_scale_inv", shape=(2, 1))),
    # SGLang
    ("sglang", "modelopt-fp8-only-fp8"): (lambda: make("mo-fp8"), _to_pcpt),
    ("sglang", "modelopt-fp8-needs-input-scale"): (lambda: make("mo-fp8"), lambda ck: ck.drop("o_proj.input_scale")),
    ("sglang", "modelopt-fp4-group-and-exclude"): (lambda: make("mo-nvfp4a16"), lambda ck: ck.qc.pop("config_groups")),
    ("sglang", "modelopt-w4a16-moe-activation"): (lambda: make("mo-nvfp4", moe=True), _w4a16),
    ("sglang", "modelopt-mixed-needs-nvfp4"): (lambda: mixed({}), lambda ck: mixed({p: "FP8" for p in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")})),
    ("sglang", "modelopt-mla-exclude-uniform"): (lambda: make("mo-nvfp4a16", mla=True, layers=2),
                                                 _rebuild("mo-nvfp4a16", mla=True, layers=2,
                                                          bf16=("model.layers.1.self_attn.kv_b_proj",))),
    ("sglang", "modelopt-mxfp8-blackwell"): (lambda: _named(make("mo-mxfp8"), "weight_scale", "weight_scale_inv"),
                                             _rename_role("weight_scale_inv", "weight_scale")),
    ("sglang", "modelopt-exclude-unquantizes"): (lambda: make("mo-nvfp4a16"), _ignore("o_proj")),
    ("sglang", "ct-moe-fp8-strategy-pair"): (lambda: make("ct-fp8-block", moe=True),
                                             lambda ck: _group(ck).update(input_activations=None)),
    ("sglang", "ct-no-mx"): (lambda: make("ct-fp8-dynamic"),
                             lambda ck: [d.update(format="mxfp8-quantized") for d in (ck.qc, _group(ck))]),
    ("sglang", "fp8-block-keys"): (lambda: make("block-fp8"), lambda ck: ck.qc.pop("activation_scheme")),
    ("sglang", "fp8-block-scale-shape"): (lambda: make("block-fp8"), lambda ck: ck.set(f"{O}.weight_scale_inv", shape=(1, 2))),
    # TensorRT-LLM
    ("trtllm", "modelopt-file-authoritative"): (lambda: make("mo-nvfp4a16"), lambda ck: ck.qc.update(ignore=["lm_head"])),
    ("trtllm", "modelopt-algo-enum"): (lambda: make("mo-fp8"), _set_algo("fp8")),
    ("trtllm", "nvfp4-fused-equal-scales"): (lambda: make("mo-nvfp4"),
                                             lambda ck: ck.set(f"{L0}.self_attn.k_proj.input_scale", fill=2.0)),
    ("trtllm", "nvfp4-moe-gate-up-scale"): (lambda: make("mo-nvfp4a16", moe=True),
                                            lambda ck: ck.set(f"{E1}.up_proj.weight_scale_2", fill=2.0)),
    ("trtllm", "fp8-qdq-moe-needs-input-scale"): (lambda: make("mo-fp8", moe=True),
                                                  lambda ck: ck.drop("experts.0.up_proj.input_scale")),
    ("trtllm", "fp8-qdq-scalar-scales"): (lambda: make("mo-fp8"), lambda ck: ck.set(f"{O}.weight_scale", shape=(128,))),
    ("trtllm", "fp8-rowwise-dense-only"): (lambda: make("mo-pcpt"), _rebuild("mo-pcpt", moe=True)),
    ("trtllm", "fp8-rowwise-scale-1d"): (lambda: make("mo-pcpt"), lambda ck: ck.set(f"{O}.weight_scale", shape=(128, 1))),
    ("trtllm", "fp8-block-128"): (lambda: make("block-fp8"), lambda ck: ck.qc.update(weight_block_size=[64, 64])),
    ("trtllm", "fp8-block-fused-offsets"): (lambda: make("block-fp8"), _rebuild("block-fp8", v_out=64)),
    ("trtllm", "fp8-block-moe-scale-name"): (lambda: make("block-fp8", moe=True),
                                             _rename_role("weight_scale_inv", "weight_scale", only=".experts.")),
    ("trtllm", "ct-supported-groups"): (lambda: make("ct-nvfp4"), lambda ck: _group(ck).update(input_activations=None)),
    # transformers
    ("transformers", "no-modelopt"): (lambda: make("ct-nvfp4a16"), _rebuild("mo-nvfp4a16")),
    ("transformers", "fp8-block-size-explicit"): (lambda: make("block-fp8"), lambda ck: ck.qc.pop("weight_block_size")),
    ("transformers", "fp8-block-scale-name"): (lambda: make("block-fp8"), _rename_role("weight_scale_inv", "weight_scale",
                                                                                       only="o_proj")),
    ("transformers", "fp8-block-dequant-divisible"): (lambda: make("block-fp8"), _rebuild("block-fp8", q_out=129)),
    ("transformers", "mx-scale-decoding"): (lambda: make("ct-mxfp8"), lambda ck: ck.set(f"{O}.weight_scale", fill=255)),
    # the same per-expert NVFP4 MoE checkpoint, announced as gpt-oss: its loaders take fused experts only
    **{(e, "gpt-oss-experts-fused-only"): (lambda: make("mo-nvfp4", moe=True), lambda ck: ck.extra.update(model_type="gpt_oss"))
       for e in ("vllm", "sglang", "trtllm")},
}
# Rules an edit cannot help breaking too (same engine), named so that each case stays exact.
ALSO: dict[tuple[str, str], set[str]] = {}


def _named(ck: Ckpt, old: str, new: str) -> Ckpt:
    _rename_role(old, new)(ck)
    return ck


def findings(d: Path, engine: str) -> list[engines.Finding]:
    [v] = engines.check(d, [engine]).verdicts
    return v.findings


def ids(d: Path, engine: str) -> set[str]:
    return {f.rule.id for f in findings(d, engine)}


def build(case: tuple[str, str], tmp_path: Path, broken: bool) -> Path:
    base, edit = CASES[case]
    ck = base()
    if broken:
        swapped = edit(ck)
        ck = swapped if isinstance(swapped, Ckpt) else ck
    return ck.write(tmp_path / ("broken" if broken else "base"))


RULE_IDS = [r.qualified for r in engines.all_rules()]


@pytest.mark.parametrize("qualified", RULE_IDS)
def test_every_rule_has_a_case_that_violates_exactly_it(qualified, tmp_path):
    """Walks the whole table: a rule without a case here fails. The starting checkpoint passes the
    rule; the edit makes that engine report it, and nothing else but the rules listed in ALSO."""
    engine, rid = qualified.split(":", 1)
    assert (engine, rid) in CASES, f"no violating case for {qualified}: add one to CASES"
    assert rid not in ids(build((engine, rid), tmp_path, broken=False), engine)
    d = build((engine, rid), tmp_path, broken=True)
    found = findings(d, engine)
    assert {f.rule.id for f in found} == {rid} | ALSO.get((engine, rid), set()), [f.detail for f in found]
    f = next(f for f in found if f.rule.id == rid)
    assert f.rule.source in f.detail and f.detail.endswith(f"({f.rule.source})")
    rep = verify(d, engines=[engine])
    mine = [v for v in rep.violations if v.rule == qualified]
    [verdict] = rep.engines.verdicts
    if f.rule.when is None:  # a finding of a named engine fails verify ...
        assert mine and not rep.ok
        assert verdict.served == (f.rule.kind == "degraded")
    else:  # ... unless it only holds on some deployments (a caveat): the engine still serves it
        assert not mine and verdict.served


def test_module_checks_name_each_odd_expert_among_alike_ones(tmp_path):
    """Modules alike in everything a check reads are judged once (shardquant/engines.py
    check_module_spec, View.select): an expert unlike its siblings in one scale's shape, or in a
    second role's dtype, is still found, by name, and its alike siblings are not."""
    ck = make("mo-nvfp4a16", moe=True)
    ck.set(f"{E1}.down_proj.weight_scale", shape=(128, 4))
    ck.set(f"{L0}.mlp.experts.0.up_proj.weight_scale_2", dtype="BF16")
    found = [f for f in findings(ck.write(tmp_path / "odd"), "vllm") if f.rule.id == "modelopt-nvfp4-shapes"]
    assert sorted(f.name for f in found) == [f"{L0}.mlp.experts.0.up_proj", f"{E1}.down_proj"], [f.what for f in found]
    assert "weight_scale [128, 4]" in next(f.what for f in found if f.name.startswith(E1))
    assert "weight_scale_2 is BF16" in next(f.what for f in found if f.name.endswith("experts.0.up_proj"))


def test_cases_name_only_rules_of_the_table():
    assert set(CASES) == {tuple(q.split(":", 1)) for q in RULE_IDS}


# ---------------------------------------------------------------------------------------------
# the tables

def test_tables_are_well_formed():
    assert engines.problems() == []
    assert ENGINES and len(set(ENGINES)) == len(ENGINES)
    for r in engines.all_rules():
        assert r.kind in ("refuse", "garbage", "degraded") and r.source.split(" ", 1)[0].count("/") == 1


def test_docs_table_is_generated_from_the_package_data():
    assert (ROOT / "docs" / "engine_rules.json").read_text(encoding="utf-8") == engines.docs_table()
    rows = json.loads(engines.docs_table())
    assert [(r["engine"], r["id"]) for r in rows] == [(r.engine, r.id) for r in engines.all_rules()]


def test_tables_are_package_data():
    pattern = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["shardquant"]
    assert "engine_rules/*.json" in pattern
    files = {p.name for p in (resources.files("shardquant") / "engine_rules").iterdir() if p.name.endswith(".json")}
    assert files == {f"{e}.json" for e in ENGINES}


def test_no_code_branches_on_an_engine_name():
    """The engine is a column of the table: engines.py never spells one."""
    tree = ast.parse((ROOT / "shardquant" / "engines.py").read_text(encoding="utf-8"))
    literals = {n.value.lower() for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = {e.lower() for e in ENGINES} | {"vllm", "sglang", "trtllm", "tensorrt-llm", "transformers"}
    assert not literals & names
    assert not any("engine == " in line or ".name == " in line for line in
                   (ROOT / "shardquant" / "engines.py").read_text(encoding="utf-8").splitlines())


# ---------------------------------------------------------------------------------------------
# what each engine reads

def test_which_config_file_each_engine_reads(tmp_path):
    """vLLM and SGLang take config.json's quantization_config, TensorRT-LLM hf_quant_config.json;
    vLLM falls through to the file for a MIXED_PRECISION config.json without quantized_layers."""
    ck = make("mo-fp8")
    ck.hf["quantization"]["quant_algo"] = "FP8_PB_WO"
    d = ck.write(tmp_path / "a")
    seen = {e: engines.View(engines.tables()[e], engines.Checkpoint.read(d)) for e in ENGINES}
    assert {e: (v.source, v.algo) for e, v in seen.items()} == {
        "vllm": ("config.json", "FP8"), "sglang": ("config.json", "FP8"),
        "trtllm": ("hf_quant_config.json", "FP8_BLOCK_SCALES"), "transformers": ("config.json", "FP8")}
    ck = mixed({})
    ck.qc.pop("quantized_layers")
    v = engines.View(engines.tables()["vllm"], engines.Checkpoint.read(ck.write(tmp_path / "b")))
    assert (v.source, v.algo) == ("hf_quant_config.json", "MIXED_PRECISION")


def test_vllm_reads_a_weight_only_nvfp4_config_as_w4a16(tmp_path):
    ck = make("mo-nvfp4a16")
    _set_algo("NVFP4")(ck)
    v = engines.View(engines.tables()["vllm"], engines.Checkpoint.read(ck.write(tmp_path / "a")))
    assert v.algo == "W4A16_NVFP4"


def _mod(name: str, moe_layer: str | None = None, prefix: str | None = None) -> engines.Mod:
    return engines.Mod(None, name, name.rsplit(".", 1)[-1], True, moe_layer=moe_layer, prefix=prefix or moe_layer or name)


@pytest.mark.parametrize("mode,module,prefix,entry,want", [
    ("substring-fnmatch", "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.gate_up_proj", "model.layers.3.mlp.gate", True),
    ("substring-fnmatch", "model.layers.3.mlp.experts.0.gate_proj", None, "model.layers.3.mlp.gate", False),
    ("substring-fnmatch", "model.layers.7.self_attn.o_proj", None, "model.layers.*.self_attn.o_proj", True),
    ("substring-fnmatch", "model.language_model.layers.0.mlp.down_proj", None, "layers.0.mlp.down_proj", True),
    ("regex-parts", "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.gate_up_proj", "model.layers.3.mlp.gate", False),
    ("regex-parts", "model.layers.3.self_attn.o_proj", None, "o_proj", True),
    ("regex-parts", "model.layers.3.self_attn.o_proj", None, "layers.*.o_proj", False),  # full match, from the start
    ("regex-parts", "model.layers.3.self_attn.o_proj", None, "model.layers.*.self_attn.o_proj", True),
    ("exact-or-re", "model.layers.0.mlp.gate", None, "re:.*mlp\\.gate$", True),
    ("exact-or-re", "model.layers.0.mlp.gate_proj", None, "re:.*mlp\\.gate$", False),
    ("exact-or-re", "model.layers.0.mlp.gate", None, "mlp.gate", False),
    ("exact-or-re", "model.layers.0.mlp.gate", None, "re:mlp", False),  # re.match: anchored at the start
    ("exact-re-suffix", "model.layers.0.mlp.gate", None, "mlp.gate", True),
    ("exact-re-suffix", "model.layers.0.mlp.gate_proj", None, "mlp.gate", False),
])
def test_exclude_matching_per_engine(mode, module, prefix, entry, want):
    mod = _mod(module, moe_layer=module.rsplit(".", 2)[0] if ".experts." in module else None, prefix=prefix)
    assert (engines.MATCHERS[mode](mod, (entry,)) == entry) is want


def _first_substring_fnmatch(mod, entries):
    """The substring-fnmatch rule as docs/formats.md states it, entry by entry (the reference for
    the compiled search in shardquant/engines.py)."""
    import fnmatch
    plain = mod.prefix.replace("language_model.", "")
    for e in entries:
        if (not mod.moe_layer and e == mod.name) or e == mod.prefix:
            return e
    for e in entries:
        if e and (e in mod.prefix or e in plain) or fnmatch.fnmatchcase(mod.prefix, e):
            return e
    return None


def _first_fnmatch(mod, entries):
    import fnmatch
    return next((e for e in entries if e == mod.name or fnmatch.fnmatchcase(mod.name, e)
                 or fnmatch.fnmatchcase(mod.prefix, e)), None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    "lm_head", "model.layers.3.mlp.gate", "model.layers.*.self_attn.o_proj", "layers.0.mlp.down_proj", "",
    "model.layers.1[0].mlp.gate", "*experts.1*", "model.layers.?.mlp.experts.2.up_proj", "o_proj", "re:.*gate$",
    "model.layers.3.mlp.experts", "[!m]*", "model.layers.10.mlp.gate", "model.layers.0.mlp.down_proj",
    "mm.layers.0"]),
    max_size=6, unique=True),
    st.sampled_from(["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.experts.1.up_proj",
                     "model.layers.7.self_attn.o_proj", "model.language_model.layers.0.mlp.down_proj",
                     "model.layers.10.mlp.gate", "lm_head", "model.layers.1[0].mlp.gate",
                     "mm.language_model.layers.0.mlp.down_proj"]),
    st.sampled_from([None, "gate_up_proj"]))
def test_exclude_matching_finds_the_first_entry_of_many(entries, module, fused):
    """Many entries at once: the compiled any-entry search returns what checking each entry in
    order returns (which entry, or none), wildcards, brackets, substrings and empty entries included."""
    moe = module.rsplit(".", 2)[0] if ".experts." in module else None
    prefix = module.rsplit(".", 1)[0] + "." + fused if fused and not moe else None
    mod = _mod(module, moe_layer=moe, prefix=prefix)
    entries = tuple(entries)
    assert engines.MATCHERS["substring-fnmatch"](mod, entries) == _first_substring_fnmatch(mod, entries)
    assert engines.MATCHERS["fnmatch"](mod, entries) == _first_fnmatch(mod, entries)


def test_compressed_tensors_groups_resolve_by_name_regex_then_class(tmp_path):
    """Several config groups: an exact target beats a regex, a regex beats the class name Linear;
    ignored modules have no group."""
    ck = make("ct-fp8-dynamic")
    g0 = _group(ck)
    ck.qc["config_groups"] = {"by_class": dict(g0, targets=["Linear"]),
                              "by_regex": dict(g0, targets=["re:.*self_attn\\..*"]),
                              "by_name": dict(g0, targets=[O])}
    ck.qc["ignore"].append("re:.*down_proj$")
    ck.tensors = {k: v for k, v in ck.tensors.items() if "down_proj" not in k}
    ck.tensors[f"{L0}.mlp.down_proj.weight"] = ("BF16", (128, 128), 0)
    v = engines.View(engines.tables()["vllm"], engines.Checkpoint.read(ck.write(tmp_path / "a")))
    got = {m.name.rsplit(".", 1)[-1]: m.group for m in v.mods.values() if m.name.startswith(L0) and m.dims()}
    assert got == {"q_proj": "by_regex", "k_proj": "by_regex", "v_proj": "by_regex", "o_proj": "by_name",
                   "gate_proj": "by_class", "up_proj": "by_class", "down_proj": None}


def test_moe_scheme_is_expert_zeros_in_vllm_and_sglang(tmp_path):
    """Two config groups, one naming expert 1 by a regex: vLLM and SGLang give every expert expert 0's
    scheme (and flag the layer), TensorRT-LLM matches each module on its own."""
    ck = make("ct-fp8-dynamic", moe=True)
    g0 = _group(ck)
    ck.qc["config_groups"]["by_regex"] = dict(g0, targets=["re:.*experts\\.1\\..*"])
    d = ck.write(tmp_path / "a")
    for e, want in (("vllm", "group_0"), ("sglang", "group_0"), ("trtllm", None)):
        v = engines.View(engines.tables()[e], engines.Checkpoint.read(d))
        got = {m.group for m in v.mods.values() if m.expert == "1"}
        assert got == {want or "by_regex"}, e
    assert ids(d, "vllm") == set()  # expert 0 itself resolves consistently


def test_vllm_merged_block_rule_spares_the_last_member(tmp_path):
    """A v_proj of 64 rows: the last member of q/k/v, which vLLM's block check exempts and
    TensorRT-LLM's fused scale placement does not."""
    d = make("block-fp8", v_out=64).write(tmp_path / "a")
    assert ids(d, "vllm") == set() and ids(d, "trtllm") == {"fp8-block-fused-offsets"}


def test_bf16_channel_scales_are_copied_into_fp32(tmp_path):
    """llm-compressor's FP8_DYNAMIC stores [out, 1] scales as bf16; vLLM copies them into its fp32
    parameter. A 1-D scale still does not fit."""
    ck = make("ct-fp8-dynamic")
    for n in [n for n in ck.tensors if n.endswith(".weight_scale")]:
        ck.set(n, dtype="BF16", fill=0x3F80)
    assert ids(ck.write(tmp_path / "a"), "vllm") == set()
    ck.set(f"{O}.weight_scale", shape=(128,))
    assert ids(ck.write(tmp_path / "b"), "vllm") == {"ct-fp8-channel-scale-2d"}


def test_quant_algo_spelling_per_engine(tmp_path):
    """vLLM upper-cases quant_algo, TensorRT-LLM wants the enum's exact name."""
    ck = make("mo-fp8")
    _set_algo("fp8")(ck)
    d = ck.write(tmp_path / "a")
    assert ids(d, "vllm") == set() and ids(d, "trtllm") == {"modelopt-algo-enum"}


def test_several_compressed_tensors_groups_are_mixed_precision_in_trtllm(tmp_path):
    ck = make("ct-nvfp4")
    ck.qc["config_groups"]["attn"] = dict(_group(ck), targets=["re:.*self_attn.*"])
    v = engines.View(engines.tables()["trtllm"], engines.Checkpoint.read(ck.write(tmp_path / "a")))
    assert v.algo == "MIXED_PRECISION"
    assert engines.View(engines.tables()["vllm"], v.ck).algo is None  # vLLM has no algorithm names for CT


@pytest.mark.parametrize("mess", [
    lambda c: c.update(quantization_config=["not", "a", "dict"]),
    lambda c: c["quantization_config"].update(config_groups="group_0"),
    lambda c: c["quantization_config"].update(config_groups={"g": {"targets": None, "weights": 3}}),
    lambda c: c["quantization_config"].update(ignore=[1, None, "re:(", {"a": 1}]),
    lambda c: c["quantization_config"].update(quant_method=["compressed-tensors"]),
    lambda c: c["quantization_config"].update(quant_method="modelopt", quant_algo=7, quantized_layers=[1]),
    lambda c: c["quantization_config"].update(quant_method="modelopt", quant_algo="MIXED_PRECISION",
                                              quantized_layers={"x": 1, "y": {"quant_algo": None}}),
    lambda c: c["quantization_config"].update(quant_method="fp8", weight_block_size=[0, "a"], ignored_layers="x"),
])
def test_malformed_configs_are_findings_never_exceptions(tmp_path, mess):
    d = make("ct-fp8-dynamic", moe=True).write(tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    mess(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": null, "exclude_modules": 5}}')
    result = engines.check(d, ENGINES)
    assert len(result.verdicts) == len(ENGINES)
    verify(d)  # and through verify, in both modes
    verify(d, engines=ENGINES)


# ---------------------------------------------------------------------------------------------
# what shardquant writes today (docs/formats.md section 9 and "What shardquant writes")

# (format, flavor) -> {engine: rule ids} for a MoE model and for a dense one; engines not named serve it.
# nvfp4/modelopt: transformers has no modelopt quantizer (1.1). CT weight-only NVFP4 and MXFP8 are not
# TensorRT-LLM groups (1.2); CT channel FP8 becomes its FP8_PER_CHANNEL_PER_TOKEN, which has no MoE
# method and a 1-D scale parameter (4.2); CT FP8_BLOCK experts are named weight_scale, its MoE loader
# reads weight_scale_inv (5.3); SGLang has no compressed-tensors MX scheme (6, 7).
SERVED = {
    ("nvfp4", "modelopt"): ({"transformers": {"no-modelopt"}}, {"transformers": {"no-modelopt"}}),
    ("nvfp4", CT): ({"trtllm": {"ct-supported-groups"}}, {"trtllm": {"ct-supported-groups"}}),
    ("fp8", CT): ({"trtllm": {"fp8-rowwise-dense-only", "fp8-rowwise-scale-1d"}}, {"trtllm": {"fp8-rowwise-scale-1d"}}),
    ("fp8-channel", CT): ({"trtllm": {"fp8-rowwise-dense-only", "fp8-rowwise-scale-1d"}},
                          {"trtllm": {"fp8-rowwise-scale-1d"}}),
    ("fp8-block", "block-fp8"): ({}, {}),
    ("fp8-block", CT): ({"trtllm": {"fp8-block-moe-scale-name"}}, {}),
    ("mxfp8", CT): ({"sglang": {"ct-no-mx"}, "trtllm": {"ct-supported-groups"}},
                    {"sglang": {"ct-no-mx"}, "trtllm": {"ct-supported-groups"}}),
    ("mxfp4", CT): ({"sglang": {"ct-no-mx"}}, {"sglang": {"ct-no-mx"}}),
}
# Caveats (rules with a runtime `when`): reported, never failing.
CAVEATS = {("nvfp4", "modelopt"): {"sglang": {"modelopt-w4a16-moe-activation"}}}


def test_every_served_pair_has_an_expectation():
    assert set(SERVED) == set(testing.served())


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    root = tmp_path_factory.mktemp("ours")
    cache: dict = {}

    def get(fmt: str, flavor: str, model: str) -> Path:
        if (fmt, flavor, model) not in cache:
            make_model = testing.sized_for(fmt, model, getattr(testing, model))
            src = root / f"src-{model}-{bool(formats.declared(fmt).block)}"
            if not src.exists():
                testing.write_checkpoint(src, make_model(), seed=3)
            out = root / f"{fmt}-{flavor}-{model}"
            convert(str(src), out, fmt, flavor=flavor, device="cpu")
            cache[(fmt, flavor, model)] = out
        return cache[(fmt, flavor, model)]

    return get


@pytest.mark.parametrize("model", ["qwen3_moe", "llama"])
@pytest.mark.parametrize("fmt,flavor", testing.served())
def test_our_outputs_against_each_engine(ours, fmt, flavor, model):
    out = ours(fmt, flavor, model)
    want = SERVED[(fmt, flavor)][0 if model == "qwen3_moe" else 1]
    flagged = {}
    for e in ENGINES:
        rep = verify(out, engines=[e])
        rules = {v.rule.split(":", 1)[1] for v in rep.violations if v.rule.startswith(e + ":")}
        if rules:
            flagged[e] = rules
        assert rep.ok == (e not in want), rep.violations
    assert flagged == want
    caveats = {v.engine.name: {f.rule.id for f in v.findings if f.rule.when}
               for v in engines.check(out).verdicts if any(f.rule.when for f in v.findings)}
    assert caveats == (CAVEATS.get((fmt, flavor), {}) if model == "qwen3_moe" else {})
    # by default every engine is checked, and a pair some engine serves passes
    rep = verify(out)
    assert rep.ok, rep.violations
    assert {v.engine.name: v.served for v in rep.engines.verdicts} == {e: e not in want for e in ENGINES}


def _verdicts(vs) -> list:
    return [(v.engine.name, v.flavor, v.status, [(f.rule.qualified, f.name, f.what) for f in v.findings]) for v in vs]


@pytest.mark.parametrize("model", ["qwen3_moe", "llama"])
@pytest.mark.parametrize("fmt,flavor", testing.served())
def test_card_verdicts_judged_while_writing_equal_the_finished_files(ours, fmt, flavor, model):
    """The card's engine verdicts are judged from the planned configs and headers while the shards
    are written (shardquant/convert.py _judge_planned, card.Judging): the same verdicts, finding for
    finding, as judging the finished files; the planned header bytes are the files' own."""
    from shardquant import card
    from shardquant.convert import _as_planned, _judge_planned, prepare
    from shardquant.st import read_header

    out = ours(fmt, flavor, model)
    plan = prepare(str(out.parent / f"src-{model}-{bool(formats.declared(fmt).block)}"), fmt, flavor=flavor)
    judged, headers = _judge_planned(plan, out)
    assert _as_planned(out, headers) and not _as_planned(out, {n: h[:-1] + b"!" for n, h in headers.items()})
    tensors = {t.name: t for f in sorted(out.glob("*.safetensors")) for t in read_header(f).values()}
    assert _verdicts(judged.verdicts()) == _verdicts(card.engine_verdicts(out, tensors))


def test_card_verdicts_read_the_values_from_the_finished_shards(ours, tmp_path):
    """The rules that read values (fused sets' global scales) are judged from the written files, at
    the end: a shard whose gate and up scales differ is found both ways."""
    from shardquant import card
    from shardquant.convert import _judge_planned, prepare
    from shardquant.st import read_header

    src = ours("nvfp4", "modelopt", "qwen3_moe")
    out = tmp_path / "o"
    shutil.copytree(src, out)
    block = bool(formats.declared("nvfp4").block)
    plan = prepare(str(src.parent / f"src-qwen3_moe-{block}"), "nvfp4", flavor="modelopt")
    judged, _ = _judge_planned(plan, out)
    tensors = {t.name: t for f in sorted(out.glob("*.safetensors")) for t in read_header(f).values()}
    t = tensors["model.layers.0.mlp.experts.1.up_proj.weight_scale_2"]
    with open(t.file, "r+b") as f:
        f.seek(t.offset)
        f.write(np.float32(123.0).tobytes())
    got = _verdicts(judged.verdicts())
    assert got == _verdicts(card.engine_verdicts(out, tensors))
    assert any("weight_scale_2 differs" in what for _, _, _, fs in got for _, _, what in fs)


def test_default_output_summarises_every_engine(ours):
    out = ours("fp8", CT, "qwen3_moe")
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[-1] == "OK: no violations"
    assert any(ln.startswith("engines (every engine") for ln in lines)
    status = {ln.split()[0]: " ".join(ln.split()[1:]) for ln in lines if ln.startswith("  ") and not ln.startswith("    ")}
    assert status == {"vllm": "serves it", "sglang": "serves it", "trtllm": "REFUSES it", "transformers": "serves it"}
    assert "trtllm:fp8-rowwise-dense-only" in r.output
    r = CliRunner().invoke(main, ["verify", str(out), "--engine", "trtllm", "--engine", "vllm"])
    assert r.exit_code == 1 and "FAIL trtllm:fp8-rowwise-scale-1d:" in r.output
    assert "FAIL vllm:" not in r.output
    assert "linear.py@00bbf71e FP8RowwiseLinearMethod" in r.output


def test_json_report_has_the_engines(ours, tmp_path):
    out = ours("mxfp4", CT, "llama")
    js = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["verify", str(out), "--engine", "sglang", "--json", str(js)])
    assert r.exit_code == 1
    rep = json.loads(js.read_text())
    [v] = rep["engines"]["verdicts"]
    assert (v["engine"], v["served"], rep["engines"]["strict"]) == ("sglang", False, True)
    assert {f["rule"] for f in v["findings"]} == {"sglang:ct-no-mx"}
    assert rep["violations"]["sglang:ct-no-mx"]["count"] == 1


def test_unknown_engine_is_a_usage_error(ours):
    r = CliRunner().invoke(main, ["verify", str(ours("fp8", CT, "llama")), "--engine", "tgi"])
    assert r.exit_code == 2 and "tgi" in r.output
    with pytest.raises(ValueError, match="unknown engine"):
        engines.check(ours("fp8", CT, "llama"), ["tgi"])


def test_deepseek_mtp_exclusions_kept_uniform_for_sglang(tmp_path):
    """DeepSeek's MTP layer is kept, so its MLA projections are named in the ModelOpt exclude list;
    SGLang excludes those names in every layer (rule modelopt-mla-exclude-uniform), so the plan keeps
    the MLA projections of every layer (shardquant/flavors.py excluded_everywhere) and every engine but
    transformers serves the output. The compressed-tensors flavor, matched by exact names, keeps none."""
    src = testing.write_checkpoint(tmp_path / "src", testing.deepseek_v3(), seed=1)
    out = tmp_path / "out"
    r = convert(str(src), out, "nvfp4", flavor="modelopt", device="cpu")
    assert any("kept in high precision in every layer" in w for w in r.plan.warnings)
    mla = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
    assert not any(m.name.split(".")[-2] in mla for g in r.plan.groups for m in g.members)
    for L in range(4):
        assert f"model.layers.{L}.self_attn.kv_b_proj" in r.plan.exclude_modules
    rep = verify(out, engines=["sglang"])
    assert rep.ok, rep.violations
    ct = convert(str(src), tmp_path / "ct", "nvfp4", flavor="compressed-tensors", device="cpu")
    assert any(m.name.endswith("layers.0.self_attn.kv_b_proj.weight") for g in ct.plan.groups for m in g.members)


# ---------------------------------------------------------------------------------------------
# the FP8 spellings older releases wrote

def _modelopt_fp8_without_input_scale() -> Ckpt:
    """0.1.0's ModelOpt FP8: quant_algo FP8 (static activation scales), per-tensor weight scales, no
    input_scale; hf_quant_config.json with quant_algo and exclude_modules only."""
    ck = make("mo-fp8", moe=True)
    ck.drop(".input_scale")
    exclude = ck.qc["ignore"]
    ck.qc = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": exclude,
             "producer": {"name": "shardquant", "version": "0.1.0"}}
    ck.hf = {"producer": {"name": "shardquant", "version": "0.1.0"},
             "quantization": {"quant_algo": "FP8", "exclude_modules": exclude}}
    return ck


def test_modelopt_fp8_without_input_scale_is_rejected(tmp_path):
    d = _modelopt_fp8_without_input_scale().write(tmp_path / "a")
    assert {e: ids(d, e) for e in ENGINES} == {
        "vllm": {"modelopt-fp8-needs-input-scale", "modelopt-fp8-moe-needs-input-scale"},
        "sglang": {"modelopt-fp8-needs-input-scale"},
        "trtllm": {"fp8-qdq-moe-needs-input-scale"},
        "transformers": {"no-modelopt"}}
    rep = verify(d)  # no engine computes right numbers with it: failing by default too
    assert "engines" in {v.rule for v in rep.violations}
    r = CliRunner().invoke(main, ["verify", str(d), "--engine", "vllm"])
    assert r.exit_code == 1
    assert "FAIL vllm:modelopt-fp8-needs-input-scale:" in r.output
    assert "vLLM loads it but computes garbage (zeros) (vllm-project/vllm " \
           "vllm/model_executor/layers/quantization/modelopt.py@v0.33.0 KFp8StaticTensor" in r.output


def test_compressed_tensors_weight_only_fp8_moe_is_rejected(tmp_path):
    """0.1.0's compressed-tensors FP8: per-tensor [1] weight scales, no activation quantization."""
    ck = make("ct-fp8-tensor-static", moe=True)
    ck.drop(".input_scale")
    _group(ck)["input_activations"] = None
    d = ck.write(tmp_path / "a")
    assert ids(d, "vllm") == {"ct-moe-fp8-needs-activations", "ct-moe-fp8-strategy-pair"}
    rep = verify(d, engines=["vllm"])
    [v] = [v for v in rep.violations if v.rule == "vllm:ct-moe-fp8-needs-activations"]
    assert v.name == f"{L0}.mlp.experts" and "Unsupported FusedMoe scheme" in v.detail and "refuses to load it" in v.detail
    assert ids(d, "sglang") == {"ct-moe-fp8-strategy-pair"}
    dense = make("ct-fp8-tensor-static")
    dense.drop(".input_scale")
    _group(dense)["input_activations"] = None
    assert ids(dense.write(tmp_path / "dense"), "vllm") == set()  # dense weight-only FP8 loads (W8A16)


# ---------------------------------------------------------------------------------------------
# other producers' checkpoints

def test_llm_compressor_gate_up_mismatch(tmp_path):
    """llm-compressor's NVFP4A16 MoE: each expert's gate and up have their own global scale, which
    vLLM warns about (and takes the gate's) and TensorRT-LLM's NVFP4 MoE loader also resolves by
    taking the larger; TensorRT-LLM does not take a weight-only NVFP4 group at all."""
    want = {f"model.layers.{L}.mlp.experts.{E}.gate_up_proj" for L in range(2) for E in range(4)}
    got = findings(LLMC, "vllm")
    assert {f.rule.id for f in got} == {"ct-nvfp4-moe-gate-up-scale"} and {f.name for f in got} == want
    got = findings(LLMC, "trtllm")
    assert {f.rule.id for f in got} == {"nvfp4-moe-gate-up-scale", "ct-supported-groups"}
    assert {f.name for f in got if f.rule.id == "nvfp4-moe-gate-up-scale"} == want
    assert ids(LLMC, "sglang") == ids(LLMC, "transformers") == set()
    rep = verify(LLMC, engines=["vllm"])
    assert {v.rule for v in rep.violations} == {"fused-scale", "vllm:ct-nvfp4-moe-gate-up-scale"}
    # the same checkpoint with each expert's up scale set to its gate's is clean for both
    d = tmp_path / "llmc"
    shutil.copytree(LLMC, d)
    from safetensors.torch import load_file, save_file
    shards = {p: load_file(p) for p in sorted(d.glob("*.safetensors"))}
    every = {n: v for t in shards.values() for n, v in t.items()}
    for p, t in shards.items():
        for n in [n for n in t if n.endswith("up_proj.weight_global_scale")]:
            t[n] = every[n.replace("up_proj", "gate_proj")].clone()
        save_file(t, p, metadata={"format": "pt"})
    assert ids(d, "vllm") == set() and ids(d, "trtllm") == {"ct-supported-groups"}


# Other producers' checkpoints of the spellings we write (tools/make_llmc_fixture.py): each engine judges
# them as it judges ours (SERVED), rule for rule.
PRODUCED = {"fp8-dynamic": ("fp8-channel", CT), "mxfp4a16": ("mxfp4", CT), "mxfp8": ("mxfp8", CT),
            "nvfp4a16": ("nvfp4", CT), "w4a16-nvfp4": ("nvfp4", "modelopt")}


@pytest.mark.parametrize("fixture", sorted(p.name for p in DATA.iterdir() if p.is_dir() and p != LLMC))
def test_other_producers_are_judged_like_ours(fixture):
    d = DATA / fixture
    pair = next((v for k, v in PRODUCED.items() if fixture.endswith("-" + k)), None)
    if pair is None or not (d / "config.json").exists() or not any(d.glob("*.safetensors")):
        pytest.skip("no weights, or a spelling shardquant does not write")
    want = SERVED[pair][0 if "-moe-" in fixture else 1]
    got = {v.engine.name: {f.rule.id for f in v.findings if not f.rule.when} for v in engines.check(d, ENGINES).verdicts}
    assert {e: r for e, r in got.items() if r} == want


def test_modelopt_reference_checkpoint():
    assert {e: ids(MODELOPT, e) for e in ENGINES} == {
        "vllm": set(), "sglang": {"modelopt-w4a16-moe-activation"}, "trtllm": set(), "transformers": {"no-modelopt"}}
    rep = verify(MODELOPT, engines=["vllm", "sglang", "trtllm"])
    assert rep.ok, rep.violations  # the SGLang finding is a caveat (SM100+ non-Marlin MoE backends only)
    assert not verify(MODELOPT, engines=["transformers"]).ok


def test_prefetched_scalars_equal_each_read(ours):
    """Checkpoint.prefetch reads the small fp32 tensors a rule will ask for, one open per file: the
    values scalar() then returns equal reading each tensor on its own; a tensor too large or not
    fp32 is left to scalar(), which says None."""
    from shardquant.st import read_header, read_raw

    out = ours("nvfp4", "modelopt", "qwen3_moe")
    tensors = {t.name: t for f in sorted(out.glob("*.safetensors")) for t in read_header(f).values()}
    ck = engines.Checkpoint.read(out, tensors)
    ck.prefetch(tensors.values())
    small = [t for t in tensors.values() if t.dtype == "F32" and t.numel <= 4096]
    assert small and set(ck.values) == {t.name for t in small}
    for t in small:
        assert ck.scalar(t).tobytes() == read_raw(t).reshape(-1).tobytes() and ck.scalar(t).dtype == np.float32
    big = next(t for t in tensors.values() if t.dtype != "F32")
    assert ck.scalar(big) is None and big.name not in ck.values
