"""FP8 (E4M3) weights with one fp32 scale per logical quantizer: q = e4m3_rne(W / (amax / 448)).

Rounds once, correctly (FORMATS.md section 3); ModelOpt rounds through bf16 and is one code off on
~3% of bytes, so this is never worse than it.
"""

from __future__ import annotations

import numpy as np

from .base import e4m3_dtype, e4m3_values, E4M3_MAX, Format, magnitude_bits, check_finite, map_rows, to_f32

# docs/formats.md, "fp8": engines serve FP8 weights data-free only with dynamic activations. The
# per-quantizer scale is written once per output row (compressed-tensors `channel` strategy, [out, 1]),
# the same value in every row: the numbers of a per-tensor scale, in the one spelling vLLM and SGLang
# load for dense and MoE layers alike. ModelOpt's `FP8` means static activation scales, which only
# calibration gives (without them vLLM and SGLang compute zeros): refused.
FORMAT = Format(
    name="fp8", element="E4M3", num_bits=8, weight_dtype="F8_E4M3", elems_per_byte=1, granularity="tensor",
    block_size=None, scale_dtype="F32", global_scale=False, activations="dynamic-token",
    modelopt=None,
    compressed_tensors={
        "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True},
        "tensor_scale": "row",
    },
    refused={"modelopt": "ModelOpt's FP8 needs calibrated static activation scales (without them vLLM and SGLang "
                         "compute zeros and TensorRT-LLM's MoE reads uninitialised memory; docs/formats.md); use "
                         "--flavor compressed-tensors (FP8 weights, dynamic per-token activations) or --format nvfp4",
             "block-fp8": "quant_method fp8 with one scale per tensor is not recognised by TensorRT-LLM and not "
                          "loaded by transformers (docs/formats.md 3.3); use --format fp8-block (128x128 tiles, "
                          "every engine) or --flavor compressed-tensors"},
    reads={"modelopt": ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"), "compressed-tensors": ("float-quantized", "naive-quantized")},
    min_sqnr=20.0,
    max_scaled=448.0,
    kernel="fp8",
)


def global_scale(amax: np.float32) -> np.float32:
    """scale = amax / 448 (correctly rounded fp32). amax == 0 gives 1.0 (all codes 0), and so does
    an amax whose scale would be subnormal (below 448 * 2^-126: zero at this precision)."""
    scale = np.float32(amax) / np.float32(E4M3_MAX)
    return np.float32(1.0) if scale < np.finfo(np.float32).tiny else scale


def scales_of(amax: np.ndarray) -> np.ndarray:
    """global_scale over an array of amaxes (fp8_block's tiles, fp8_channel's rows): amax / 448,
    correctly rounded fp32; 1.0 for a zero amax and for a scale that would be subnormal."""
    s = (np.asarray(amax).astype(np.float32) / np.float32(E4M3_MAX)).astype(np.float32)
    s[s < np.finfo(np.float32).tiny] = 1.0
    return s


def e4m3(x: np.ndarray) -> np.ndarray:
    """Round fp32 to E4M3 codes, nearest-even, clamped to +-448 first (a plain cast makes NaN)."""
    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(e4m3_dtype()).view(np.uint8)


class Quantizer:
    """FP8 state of one logical quantizer. 16-bit inputs go through a 65536-entry table of the
    correctly rounded code of every possible input value: one gather per element."""

    def __init__(self, scale: np.float32):
        self.scale = np.float32(scale)
        self._lut: dict[str, np.ndarray] = {}

    def _table(self, dtype: str) -> np.ndarray:
        if dtype not in self._lut:
            allv = np.arange(1 << 16, dtype=np.uint16)
            f = to_f32(allv if dtype == "BF16" else allv.view(np.float16), dtype)
            with np.errstate(all="ignore"):  # NaN/Inf inputs are refused before lookup
                self._lut[dtype] = e4m3(f / self.scale)
        return self._lut[dtype]

    def quantize(self, raw: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, None]:
        if raw.size:
            check_finite(magnitude_bits(raw, dtype).max(), dtype, name)
        out = np.empty(raw.shape, np.uint8)
        rows = raw.shape[0]
        if dtype in ("BF16", "F16"):
            lut, u16 = self._table(dtype), raw.view(np.uint16)

            def rows_fn(a: int, b: int) -> None:
                lut.take(u16[a:b], out=out[a:b])
        else:
            def rows_fn(a: int, b: int) -> None:
                out[a:b] = e4m3(raw[a:b] / self.scale)

        map_rows(rows_fn, rows, raw.strides[0] if rows else 0)
        return out, None


def quantize(raw: np.ndarray, dtype: str, scale: np.float32, name: str = "weight") -> np.ndarray:
    return Quantizer(scale).quantize(raw, dtype, name)[0]


def dequantize(q: np.ndarray, scale: np.float32) -> np.ndarray:
    return e4m3_values(q) * np.float32(scale)


def dequantize_stored(weight: np.ndarray, scale: np.ndarray, per_quantizer: np.float32 | None = None) -> np.ndarray:
    """fp32 weights from the stored tensors: codes times the stored weight_scale, one value ([] or
    [1]) or one per output row ([out] or [out, 1]); another producer's per-channel scales included."""
    if scale.size == 1:
        return dequantize(weight, scale.reshape(-1)[0])
    return dequantize(weight, np.float32(1)) * scale.reshape(-1, 1)
