"""How a checkpoint announces its quantization to engines (FORMATS.md section 6): tensor names,
the per-quantizer scale's shape and convention, and the config files. One record per flavor,
registered in FLAVORS; the CLI's --flavor choices come from it.

- modelopt (vLLM, SGLang, TensorRT-LLM): `<m>.weight`, `<m>.weight_scale`, NVFP4's
  `<m>.weight_scale_2` = s2 (0-dim); `hf_quant_config.json` plus the same facts as
  `config.json["quantization_config"]` (older TensorRT-LLM reads only the former, vLLM the latter).
- compressed-tensors (vLLM, transformers): NVFP4 as `nvfp4-pack-quantized` (`<m>.weight_packed`,
  `<m>.weight_scale`, `<m>.weight_global_scale` [1] = 1/s2), FP8 as `float-quantized`
  (`<m>.weight`, `<m>.weight_scale` [1]). The same codes and block scales as modelopt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import __version__, formats
from .rules import TE_WEIGHT

PRODUCER = {"name": "shardquant", "version": __version__}


@dataclass(frozen=True)
class Flavor:
    name: str
    packed_name: str  # what the NVFP4 weight is called: "weight" or "weight_packed"
    global_name: str  # NVFP4's per-quantizer scale: "weight_scale_2" or "weight_global_scale"
    scalar_shape: tuple[int, ...]  # shape of per-quantizer fp32 scales: () or (1,)
    inverse_global: bool  # write 1/s2 instead of s2

    def output_names(self, fmt: str, name: str) -> dict[str, str]:
        """Source tensor `m.weight` -> its output tensors by role (weight, scale, global_scale).
        TransformerEngine's grouped `m.weight{E}` keeps its index last: `m.weight_scale{E}`."""
        te = TE_WEIGHT.fullmatch(name)
        base, idx = (te["base"], te["idx"]) if te else (name.removesuffix(".weight"), "")
        nvfp4 = formats.get(fmt).LAYOUT.global_scale
        names = {"weight": f"{base}.{self.packed_name if nvfp4 else 'weight'}{idx}",
                 "scale": f"{base}.weight_scale{idx}"}
        if nvfp4:
            names["global_scale"] = f"{base}.{self.global_name}{idx}"
        return names

    def scalar(self, fmt: str, gs: np.float32) -> np.ndarray:
        """The per-quantizer scale tensor as written: FP8's weight_scale, NVFP4's global scale."""
        v = np.float32(gs)
        if self.inverse_global and formats.get(fmt).LAYOUT.global_scale:
            v = np.float32(1.0) / v  # compressed-tensors: weight_global_scale = 1/s2, correctly rounded
        return np.full(self.scalar_shape, v, dtype=np.float32)


MODELOPT = Flavor("modelopt", "weight", "weight_scale_2", (), False)
COMPRESSED_TENSORS = Flavor("compressed-tensors", "weight_packed", "weight_global_scale", (1,), True)
FLAVORS: dict[str, Flavor] = {f.name: f for f in (MODELOPT, COMPRESSED_TENSORS)}


def hf_quant_config(fmt: str, exclude_modules: list[str]) -> dict:
    layout = formats.get(fmt).LAYOUT
    q: dict = {"quant_algo": layout.quant_algo, "kv_cache_quant_algo": None}
    if layout.block_size:
        q["group_size"] = layout.block_size
    q["exclude_modules"] = list(exclude_modules)
    return {"producer": dict(PRODUCER), "quantization": q}


def quantization_config(flavor: str, fmt: str, exclude_modules: list[str]) -> dict:
    """config.json's quantization_config for a weight-only checkpoint of this flavor."""
    layout = formats.get(fmt).LAYOUT
    if flavor == "modelopt":
        # input_activations null; NVFP4 says W4A16_NVFP4 (an `NVFP4` checkpoint without input_scale
        # made older vLLM zero every expert).
        weights: dict = {"dynamic": False, "num_bits": layout.num_bits, "type": "float"}
        if layout.block_size:
            weights["group_size"] = layout.block_size
        return {
            "config_groups": {"group_0": {"input_activations": None, "targets": ["Linear"], "weights": weights}},
            "ignore": list(exclude_modules),
            "kv_cache_scheme": None,
            "producer": dict(PRODUCER),
            "quant_algo": layout.quant_algo,
            "quant_method": "modelopt",
        }
    if layout.global_scale:  # NVFP4A16: compressed-tensors' tensor_group strategy
        fmt_name = "nvfp4-pack-quantized"
        weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": layout.block_size,
                   "symmetric": True, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    else:  # FP8 weights, one scale per tensor
        fmt_name = "float-quantized"
        weights = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    return {
        "config_groups": {"group_0": {"format": fmt_name, "input_activations": None, "output_activations": None,
                                      "targets": ["Linear"], "weights": weights}},
        "format": fmt_name,
        "ignore": list(exclude_modules),
        "kv_cache_scheme": None,
        "producer": dict(PRODUCER),
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def config_files(flavor: str, fmt: str, exclude_modules: list[str]) -> dict[str, dict]:
    """Extra JSON files a flavor writes beside config.json."""
    return {"hf_quant_config.json": hf_quant_config(fmt, exclude_modules)} if flavor == "modelopt" else {}
