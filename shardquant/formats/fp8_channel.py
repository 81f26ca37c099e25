"""FP8 (E4M3) weights with one fp32 scale per output row: scale[r] = amax(row r) / 448 (correctly
rounded fp32; 1.0 for a zero row, as formats/fp8.py global_scale), q = e4m3_rne(clip(W[r] / scale[r])).
The rounding is formats/fp8.py's, per row.

No per-quantizer scale: rows are independent, so members of a fused set and the experts of a layer
need nothing shared (the manifest records a null global scale; docs/formats.md section 4).
"""

from __future__ import annotations

import numpy as np

from .base import Format, check_finite, magnitude_bits, map_rows, mag_to_f32, no_global_scale, nonfinite, to_f32
from . import fp8
from .fp8 import dequantize as _dequantize_tensor
from .fp8 import e4m3

# docs/formats.md 4.2: compressed-tensors `channel` weights ([out, 1] fp32) with dynamic per-token
# activations (llm-compressor's FP8_DYNAMIC) load dense and MoE in vLLM and SGLang and through the
# compressed-tensors library in transformers. ModelOpt's FP8_PER_CHANNEL_PER_TOKEN is refused by
# SGLang and has no MoE path in vLLM or TensorRT-LLM (4.1): refused.
FORMAT = Format(
    name="fp8-channel", element="E4M3", num_bits=8, weight_dtype="F8_E4M3", elems_per_byte=1, granularity="row",
    block_size=None, scale_dtype="F32", global_scale=False, activations="dynamic-token",
    modelopt=None,
    # the same spelling as --format fp8 (per-row [out, 1] scales either way): verify tells them apart by the manifest
    compressed_tensors=fp8.FORMAT.compressed_tensors,
    refused={"modelopt": "ModelOpt's FP8_PER_CHANNEL_PER_TOKEN is refused by SGLang and has no MoE path in vLLM "
                         "or TensorRT-LLM (docs/formats.md 4.1); use --flavor compressed-tensors (channel weights, "
                         "dynamic per-token activations) or --format nvfp4",
             "block-fp8": "the block-fp8 flavor (quant_method fp8) spells 128x128 tile scales, not one scale per "
                          "row; use --flavor compressed-tensors or --format fp8-block"},
    reads={"compressed-tensors": ("float-quantized", "naive-quantized")},
    min_sqnr=25.0,
    max_scaled=448.0,
    kernel="fp8_channel",
    quantizer_scale=False,
    default_flavor="compressed-tensors",
)


global_scale = no_global_scale


def row_scales(row_amax: np.ndarray) -> np.ndarray:
    """fp32 [rows, 1]: each row's amax / 448, correctly rounded; 1.0 for a zero row and for a scale
    that would be subnormal (formats/fp8.py global_scale, row by row)."""
    return fp8.scales_of(row_amax).reshape(-1, 1)


class Quantizer:
    """fp8-channel has no state shared by a quantizer's members: each row carries its own scale."""

    def __init__(self, scale: np.float32 | None = None):
        pass

    def quantize(self, raw: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(E4M3 codes uint8 [out, in], fp32 row scales [out, 1])."""
        rows = raw.shape[0]
        out = np.empty(raw.shape, np.uint8)
        scales = np.ones((rows, 1), np.float32)
        if raw.size == 0:
            return out, scales
        worst = np.zeros(rows, np.uint64)
        mags = magnitude_bits(raw, dtype)

        def rows_fn(a: int, b: int) -> None:
            m = mags[a:b].max(axis=1)
            worst[a:b] = m
            if nonfinite(m, dtype):
                return  # refused below, naming the tensor
            s = row_scales(mag_to_f32(m, dtype))
            scales[a:b] = s
            out[a:b] = e4m3(to_f32(raw[a:b], dtype) / s)

        map_rows(rows_fn, rows, raw.strides[0])
        check_finite(worst, dtype, name)
        return out, scales


def quantize(raw: np.ndarray, dtype: str, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    return Quantizer().quantize(raw, dtype, name)


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return _dequantize_tensor(q, np.float32(1)) * np.asarray(scales, np.float32).reshape(-1, 1)


def dequantize_stored(weight: np.ndarray, scale: np.ndarray, per_quantizer: np.float32 | None = None) -> np.ndarray:
    """fp32 weights from the stored codes and row scales ([out, 1] or [out]; one value also accepted)."""
    if scale.size == 1:
        return _dequantize_tensor(weight, scale.reshape(-1)[0])
    return dequantize(weight, scale)
