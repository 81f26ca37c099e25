"""MXFP8 weights: E4M3 elements with one E8M0 scale byte per 32 elements along the input dim
(value = element x 2^(byte - 127)); no per-quantizer scale.

Scale bytes as compressed-tensors 0.20 writes them (`generate_mx_scales`, docs/formats.md section 8:
the block amax rounded to a power of two with E2M1's mantissa width, i.e. up iff its mantissa is
>= 1.75, floor(log2), minus emax 8), kept in 1..254 exactly as formats/mxfp4.py (e8m0_bytes) does.
Elements: x / scale (exact), plus its zero point 0.0, clamped to +-448, cast to E4M3 nearest-even
(formats/fp8.py e4m3): compressed-tensors' `_quantize` and `round_to_quantized_type_args` for 8 bits.
"""

from __future__ import annotations

import numpy as np

from .base import e4m3_values, Format, map_rows, no_global_scale
from .fp8 import e4m3
from .mxfp4 import BLOCK, block_scales, scale_values, scaled_rows

# docs/formats.md section 6: compressed-tensors `mxfp8-quantized`, weights and activations as its MXFP8
# preset (group 32, uint8 scale_dtype; vLLM quantizes activations dynamically to MXFP8 whatever
# input_activations says, dense and MoE). ModelOpt's MXFP8 is served by vLLM, and by SGLang only on
# SM100+ under the name weight_scale_inv it does not rename: refused here, one spelling per format.
FORMAT = Format(
    name="mxfp8", element="E4M3", num_bits=8, weight_dtype="F8_E4M3", elems_per_byte=1, granularity="group",
    block_size=32, scale_dtype="U8", global_scale=False, activations="dynamic-group",
    modelopt=None,
    compressed_tensors={
        "format": "mxfp8-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
                    "dynamic": False, "scale_dtype": "torch.uint8"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32,
                              "symmetric": True, "dynamic": True, "scale_dtype": "torch.uint8"},
        "tensor_scale": "none",
    },
    refused={"modelopt": "ModelOpt MXFP8 loads in vLLM but not in SGLang (it expects weight_scale_inv, SM100+ "
                         "only) nor TensorRT-LLM (no MXFP8 linear method; docs/formats.md section 6); use "
                         "--flavor compressed-tensors (mxfp8-quantized) or --format fp8",
             "block-fp8": "the block-fp8 flavor (quant_method fp8) spells 128x128 fp32 block scales, not MX "
                          "E8M0 bytes per 32; use --flavor compressed-tensors (mxfp8-quantized)"},
    reads={"compressed-tensors": ("mxfp8-quantized",)},
    min_sqnr=20.0,
    max_scaled=0.0,  # no per-quantizer scale
    kernel="mxfp8",
    quantizer_scale=False,
    scale_rule="ct-round-pow2",
    scale_search=("mse",),
)
EMAX = 8  # floor(log2(448)), compressed-tensors' _MX_ELEM_OFFSET for 8 bits


global_scale = no_global_scale


def _elements(x: np.ndarray) -> np.ndarray:
    """E4M3 codes of scaled values, as quantize writes them (+ 0.0: -0.0 gives code 0x00)."""
    return e4m3(x + np.float32(0))


class Quantizer:
    """MXFP8 has no per-quantizer state: gs is ignored. search "mse": each block's byte is the
    least-squared-error one among the rule's and its neighbours (formats/mxfp4.py search_scales)."""

    def __init__(self, gs: np.float32 = np.float32(1.0), search: str = "none"):
        if search not in ("none",) + FORMAT.scale_search:
            raise ValueError(f"mxfp8 has no scale search {search!r}")
        self.gs = np.float32(gs)
        self.search = search

    def quantize(self, raw: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(E4M3 codes uint8 [out, in], E8M0 scale bytes uint8 [out, in/32])."""
        rows, cols = raw.shape
        scales = block_scales(raw, dtype, name, EMAX, self.search, _elements, e4m3_values)
        out = np.empty((rows, cols), np.uint8)

        def code_rows(a: int, b: int) -> None:
            # + 0.0: -0.0 gives code 0x00, as compressed-tensors adds its (zero) zero point before the cast;
            # a negative value that rounds to zero stays 0x80
            out[a:b] = e4m3(scaled_rows(raw, dtype, scales, a, b) + np.float32(0)).reshape(b - a, cols)

        map_rows(code_rows, rows, raw.strides[0] if rows else 0)
        return out, scales


def quantize(raw: np.ndarray, dtype: str, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    return Quantizer().quantize(raw, dtype, name)


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fp32 weights back: E4M3 value x 2^(byte - 127)."""
    vals = e4m3_values(q)
    with np.errstate(over="ignore", invalid="ignore"):
        return (vals.reshape(*scales.shape, BLOCK) * scale_values(scales)[..., None]).reshape(q.shape)


def dequantize_stored(weight: np.ndarray, scale: np.ndarray, per_quantizer: np.float32 | None = None) -> np.ndarray:
    """fp32 weights from the stored tensors (E4M3 codes, E8M0 scale bytes); no per-quantizer scale."""
    return dequantize(weight, scale)
