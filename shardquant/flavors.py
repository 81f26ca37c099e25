"""How a checkpoint announces its quantization to engines (FORMATS.md section 6): tensor names,
the per-quantizer scale's shape and convention, and the config files. One record per flavor,
registered in FLAVORS; the CLI's --flavor choices come from it.

- modelopt (vLLM, SGLang, TensorRT-LLM): `<m>.weight`, `<m>.weight_scale`, NVFP4's
  `<m>.weight_scale_2` = s2 (0-dim); `hf_quant_config.json` plus the same facts as
  `config.json["quantization_config"]` (older TensorRT-LLM reads only the former, vLLM the latter).
- compressed-tensors (vLLM, SGLang, transformers): NVFP4 as `nvfp4-pack-quantized` (`<m>.weight_packed`,
  `<m>.weight_scale`, `<m>.weight_global_scale` [1] = 1/s2), FP8 as `float-quantized` with the
  per-quantizer scale written per row (`<m>.weight`, `<m>.weight_scale` [out, 1]) and dynamic
  per-token activations, FP8 tiles as `float-quantized` `block` weights (`<m>.weight`, `<m>.weight_scale`
  [ceil(out/128), ceil(in/128)]) with dynamic group-128 activations. The same codes and block scales as modelopt.
- block-fp8 (vLLM, SGLang, TensorRT-LLM, transformers; the DeepSeek/Qwen-FP8 form, docs/formats.md 1.3 and
  5.1): `quant_method: "fp8"` with `weight_block_size: [128, 128]`, `<m>.weight` and `<m>.weight_scale_inv`
  [ceil(out/128), ceil(in/128)] (multiplied, despite the name); only fp8-block is spelled.
What each format writes, and its spelling in each flavor, is the format's declaration
(formats/base.py Format); a pair a format does not spell is refused with the format's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import __version__, formats
from .rules import TE_WEIGHT

if TYPE_CHECKING:
    import numpy as np

PRODUCER = {"name": "shardquant", "version": __version__}


@dataclass(frozen=True)
class Flavor:
    name: str
    packed_name: str  # what a packed (two codes a byte) weight is called: "weight" or "weight_packed"
    global_name: str  # the per-quantizer scale beside block scales: "weight_scale_2" or "weight_global_scale"
    scalar_shape: tuple[int, ...]  # shape of a per-quantizer fp32 scale: () or (1,)
    inverse_global: bool  # write 1/s2 instead of s2
    scale_name: str = "weight_scale"  # the block (or FP8 per-quantizer) scale's role: "weight_scale_inv" in block-fp8
    # Module names (last segment) that an engine of this flavor excludes in EVERY layer once one layer
    # excludes them: kept in one layer (DeepSeek's MTP layer), they must be kept in all.
    excluded_everywhere: tuple[str, ...] = ()

    def output_names(self, fmt: str, name: str) -> dict[str, str]:
        """Source tensor `m.weight` -> its output tensors by role (weight, scale, global_scale).
        TransformerEngine's grouped `m.weight{E}` keeps its index last: `m.weight_scale{E}`."""
        f = formats.declared(fmt)
        te = TE_WEIGHT.fullmatch(name)
        base, idx = (te["base"], te["idx"]) if te else (name.removesuffix(".weight"), "")
        names = {"weight": f"{base}.{self.weight_name(fmt)}{idx}", "scale": f"{base}.{self.scale_name}{idx}"}
        if f.global_scale:
            names["global_scale"] = f"{base}.{self.global_name}{idx}"
        return names

    def weight_name(self, fmt: str) -> str:
        """The stored weight's role name: packed formats are `weight_packed` in compressed-tensors."""
        return self.packed_name if formats.declared(fmt).elems_per_byte > 1 else "weight"

    def per_quantizer_name(self, fmt: str) -> str | None:
        """The role holding the per-quantizer fp32 scale: the global scale beside block scales, else
        the weight scale itself; None when the format has block scales only (fp8-block)."""
        f = formats.declared(fmt)
        if not f.quantizer_scale:
            return None
        return self.global_name if f.global_scale else self.scale_name

    def input_name(self, fmt: str) -> str:
        """The activation scale's role: compressed-tensors' NVFP4 W4A4 calls it input_global_scale."""
        return "input_global_scale" if self.inverse_global and formats.declared(fmt).global_scale else "input_scale"

    def inverted(self, fmt: str) -> bool:
        """Whether the stored per-quantizer scale is the inverse (compressed-tensors' global scale)."""
        return self.inverse_global and formats.declared(fmt).global_scale

    def tensor_scale_shape(self, fmt: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the per-quantizer scale as written for a member of source `shape`: a scalar, or
        (compressed-tensors `channel` spelling) the same value once per output row, [out, 1]."""
        f = formats.declared(fmt)
        spelled = f.spelling(self.name) or {}
        if not f.global_scale and spelled.get("tensor_scale") == "row" and len(shape) >= 1:
            return (shape[0], 1)
        return self.scalar_shape

    def scalar(self, fmt: str, gs: np.float32, shape: tuple[int, ...] = ()) -> np.ndarray:
        """The per-quantizer scale tensor as written: FP8's weight_scale, NVFP4's global scale."""
        import numpy as np  # here, not at the top: the CLI imports this module for --help (shardquant/cli.py)

        v = np.float32(gs)
        if self.inverted(fmt):
            v = np.float32(1.0) / v  # compressed-tensors: weight_global_scale = 1/s2, correctly rounded
        return np.full(self.tensor_scale_shape(fmt, shape), v, dtype=np.float32)


# docs/formats.md 1.1 "Exclusion matching": SGLang's ModelOpt loader excludes an MLA projection named in
# the exclude list from every layer (engine rule sglang:modelopt-mla-exclude-uniform).
MODELOPT = Flavor("modelopt", "weight", "weight_scale_2", (), False,
                  excluded_everywhere=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"))
COMPRESSED_TENSORS = Flavor("compressed-tensors", "weight_packed", "weight_global_scale", (1,), True)
# global_name and scalar_shape are never used: the flavor spells only fp8-block, which has no global scale.
BLOCK_FP8 = Flavor("block-fp8", "weight", "weight_scale_2", (), False, scale_name="weight_scale_inv")
FLAVORS: dict[str, Flavor] = {f.name: f for f in (MODELOPT, COMPRESSED_TENSORS, BLOCK_FP8)}


def refusal(flavor: str, fmt: str) -> str | None:
    """Why this (format, flavor) pair cannot be served data-free, or None when it can."""
    f = formats.declared(fmt)
    if f.spelling(flavor) is not None:
        return None
    return f.refused.get(flavor, f"format {fmt} has no {flavor} spelling")


def hf_quant_config(fmt: str, exclude_modules: list[str]) -> dict:
    spelled = formats.declared(fmt).modelopt
    q: dict = {"quant_algo": spelled["quant_algo"], "kv_cache_quant_algo": None}
    if spelled.get("group_size"):
        q["group_size"] = spelled["group_size"]
    q["exclude_modules"] = list(exclude_modules)
    return {"producer": dict(PRODUCER), "quantization": q}


def quantization_config(flavor: str, fmt: str, exclude_modules: list[str],
                        targets: dict[str, list[str]] | None = None) -> dict:
    """config.json's quantization_config, from the format's declared spelling in this flavor.
    targets (mixed precision, compressed-tensors only): format -> the `re:` module patterns that take
    it; one config group per format (docs/formats.md 1.2: targets are matched by exact name or
    `re:` before the class name, and an MoE layer's scheme is its expert 0's)."""
    if targets and len(targets) > 1:
        groups = {}
        for i, (name, pats) in enumerate(targets.items()):
            one = quantization_config(flavor, name, exclude_modules)
            group = dict(one["config_groups"]["group_0"])
            group["targets"] = list(pats)
            groups[f"group_{i}"] = group
        return {**one, "config_groups": groups, "format": "mixed-precision"}
    f = formats.declared(fmt)
    spelled = f.spelling(flavor)
    if flavor == "block-fp8":
        # docs/formats.md 1.3: vLLM reads ignored_layers (falling back to modules_to_not_convert), SGLang
        # both, TensorRT-LLM merges both, transformers modules_to_not_convert; weight_block_size always
        # explicit (a missing key is per-tensor to vLLM and SGLang, 128x128 to transformers).
        return {**{k: (list(v) if isinstance(v, list) else v) for k, v in spelled.items()},
                "ignored_layers": list(exclude_modules),
                "modules_to_not_convert": list(exclude_modules),
                "producer": dict(PRODUCER)}
    if flavor == "modelopt":
        weights: dict = {"dynamic": False, "num_bits": f.num_bits, "type": "float"}
        if spelled.get("group_size"):
            weights["group_size"] = spelled["group_size"]
        return {
            "config_groups": {"group_0": {"input_activations": None, "targets": ["Linear"], "weights": weights}},
            "ignore": list(exclude_modules),
            "kv_cache_scheme": None,
            "producer": dict(PRODUCER),
            "quant_algo": spelled["quant_algo"],
            "quant_method": "modelopt",
        }
    return {
        "config_groups": {"group_0": {"format": spelled["format"],
                                      "input_activations": dict(spelled["input_activations"])
                                      if spelled["input_activations"] else None,
                                      "output_activations": None, "targets": ["Linear"],
                                      "weights": dict(spelled["weights"])}},
        "format": spelled["format"],
        "ignore": list(exclude_modules),
        "kv_cache_scheme": None,
        "producer": dict(PRODUCER),
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def config_files(flavor: str, fmt: str, exclude_modules: list[str]) -> dict[str, dict]:
    """Extra JSON files a flavor writes beside config.json."""
    return {"hf_quant_config.json": hf_quant_config(fmt, exclude_modules)} if flavor == "modelopt" else {}
