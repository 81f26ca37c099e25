"""FP8 (E4M3) weights with one fp32 scale per 128x128 tile: scale = tile amax / 448 (correctly rounded
fp32), q = e4m3_rne(clip(W / scale)) within the tile. The rounding is formats/fp8.py's, per tile.

No per-quantizer scale: the tiles are the only scales, so members of a fused set need nothing shared
(the manifest records a null global scale; docs/formats.md section 5).
"""

from __future__ import annotations

import numpy as np

from .base import e4m3_values, Format, check_finite, magnitude_bits, map_rows, no_global_scale, to_f32
from .fp8 import e4m3, scales_of

# docs/formats.md section 5 and "9. FP8 spellings that serve without calibration": `quant_method: "fp8"`
# with `weight_block_size: [128, 128]` and dynamic activations (tensors `weight`, `weight_scale_inv`)
# is the one FP8 spelling that loads for dense and MoE in vLLM, SGLang, TensorRT-LLM and transformers;
# compressed-tensors' FP8_BLOCK (5.3) is the same numbers as `weight_scale`. ModelOpt's FP8_PB_WO is
# not served for MoE outside MIXED_PRECISION (5.2): refused.
FORMAT = Format(
    name="fp8-block", element="E4M3", num_bits=8, weight_dtype="F8_E4M3", elems_per_byte=1, granularity="block",
    block_size=None, scale_dtype="F32", global_scale=False, activations="dynamic-group",
    modelopt=None,
    compressed_tensors={
        "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128],
                    "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                              "symmetric": True, "dynamic": True},
    },
    block_fp8={"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]},
    refused={"modelopt": "ModelOpt's FP8_PB_WO is refused at top level by SGLang and served for MoE by vLLM only "
                         "inside MIXED_PRECISION (docs/formats.md 5.2); use --flavor block-fp8 (quant_method fp8, "
                         "every engine) or --flavor compressed-tensors (FP8_BLOCK)"},
    reads={"compressed-tensors": ("float-quantized",), "block-fp8": ("fp8",)},
    min_sqnr=25.0,
    max_scaled=448.0,
    kernel="fp8_block",
    block=(128, 128),
    quantizer_scale=False,
    default_flavor="block-fp8",
)
BLOCK = FORMAT.block


global_scale = no_global_scale


def tile_scales(tamax: np.ndarray) -> np.ndarray:
    """fp32 tile scales: amax / 448, correctly rounded; 1.0 for a zero tile and for a scale that
    would be subnormal (as formats/fp8.py global_scale)."""
    return scales_of(tamax)


def _expand(s: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Per-tile values repeated over the elements of each tile, cropped to [rows, cols]."""
    return np.repeat(np.repeat(s, BLOCK[0], axis=0), BLOCK[1], axis=1)[:rows, :cols]


class Quantizer:
    """fp8-block has no state shared by a quantizer's members: each tile carries its own scale."""

    def __init__(self, scale: np.float32 | None = None):
        pass

    def quantize(self, raw: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(E4M3 codes uint8 [out, in], fp32 tile scales [ceil(out/128), ceil(in/128)])."""
        rows, cols = raw.shape
        br, bc = BLOCK
        if raw.size:
            check_finite(magnitude_bits(raw, dtype).max(), dtype, name)
        out = np.empty(raw.shape, np.uint8)
        scales = np.empty((-(-rows // br), -(-cols // bc)), np.float32)
        if raw.size == 0:
            return out, scales
        col_starts = np.arange(0, cols, bc)

        def tiles_fn(a: int, b: int) -> None:  # tile rows a..b
            r0, r1 = a * br, min(rows, b * br)
            x = to_f32(raw[r0:r1], dtype)
            amax = np.maximum.reduceat(np.abs(x), col_starts, axis=1)
            amax = np.maximum.reduceat(amax, np.arange(0, r1 - r0, br), axis=0)
            s = tile_scales(amax)
            scales[a:b] = s
            out[r0:r1] = e4m3(x / _expand(s, r1 - r0, cols))

        map_rows(tiles_fn, scales.shape[0], raw.strides[0] * br)
        return out, scales


def quantize(raw: np.ndarray, dtype: str, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    return Quantizer().quantize(raw, dtype, name)


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    rows, cols = q.shape
    return e4m3_values(q) * _expand(np.asarray(scales, np.float32), rows, cols)


def dequantize_stored(weight: np.ndarray, scale: np.ndarray, per_quantizer: np.float32 | None = None) -> np.ndarray:
    """fp32 weights from the stored codes and tile scales (`weight_scale_inv` or compressed-tensors'
    `weight_scale`, [ceil(out/128), ceil(in/128)]: despite the name, the code is multiplied by it)."""
    return dequantize(weight, scale.reshape(-(-weight.shape[0] // BLOCK[0]), -(-weight.shape[1] // BLOCK[1])))
