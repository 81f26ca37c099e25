"""How a checkpoint announces its quantization to engines (FORMATS.md section 6).

ModelOpt flavor: `hf_quant_config.json` (older TensorRT-LLM reads only this) and the same facts as
`config.json["quantization_config"]` (vLLM and SGLang read this first).
"""

from __future__ import annotations

from . import __version__, formats

FLAVORS = ("modelopt",)
PRODUCER = {"name": "shardquant", "version": __version__}


def hf_quant_config(fmt: str, exclude_modules: list[str]) -> dict:
    layout = formats.get(fmt).LAYOUT
    q: dict = {"quant_algo": layout.quant_algo, "kv_cache_quant_algo": None}
    if layout.block_size:
        q["group_size"] = layout.block_size
    q["exclude_modules"] = list(exclude_modules)
    return {"producer": dict(PRODUCER), "quantization": q}


def quantization_config(fmt: str, exclude_modules: list[str]) -> dict:
    """config.json's quantization_config. Weight-only: input_activations is null, and NVFP4 says
    W4A16_NVFP4 (an `NVFP4` checkpoint without input_scale made older vLLM zero every expert)."""
    layout = formats.get(fmt).LAYOUT
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
