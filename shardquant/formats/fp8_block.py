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
    scale_search=("mse",),
)
BLOCK = FORMAT.block
# --scale-search mse: tile scales tried, RTN's times these (exact binary fractions; the product one
# fp32 rounding), in order of preference (a tie keeps the earlier: RTN's own first)
SEARCH_FACTORS = (1.0, 15 / 16, 17 / 16, 7 / 8, 9 / 8)


def tile_sse(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Squared reconstruction error of each 128x128 tile of fp32 `x` [rows, cols] (whole tiles) under
    tile scales `s`: codes e4m3(x / scale) dequantized as dequantize does, squared differences in
    float64 summed along each tile row, element 0 to 127 in turn, then over its rows in turn (a fixed
    order every backend can follow)."""
    rows, cols = x.shape
    br, bc = BLOCK
    full = _expand(s, rows, cols)
    with np.errstate(over="ignore", invalid="ignore"):
        deq = e4m3_values(e4m3(x / full)) * full
    e = (x.astype(np.float64) - deq.astype(np.float64)) ** 2
    e = e.reshape(rows // br, br, cols // bc, bc)
    per_row = e[..., 0].copy()
    for j in range(1, bc):
        per_row += e[..., j]
    total = per_row[:, 0, :].copy()
    for i in range(1, br):
        total += per_row[:, i, :]
    return total


def search_tile_scales(x: np.ndarray, rtn: np.ndarray) -> np.ndarray:
    """Per tile, the scale among RTN's times SEARCH_FACTORS with the least squared error over the
    tile's own values (finite normal scales only); ties keep the earlier candidate."""
    best = rtn.copy()
    err = tile_sse(x, rtn)
    for f in SEARCH_FACTORS[1:]:
        c = (rtn * np.float32(f)).astype(np.float32)
        ok = np.isfinite(c) & (c >= np.finfo(np.float32).tiny)
        e = tile_sse(x, np.where(ok, c, rtn))
        better = ok & (e < err)
        best[better] = c[better]
        err[better] = e[better]
    return best


global_scale = no_global_scale


def tile_scales(tamax: np.ndarray) -> np.ndarray:
    """fp32 tile scales: amax / 448, correctly rounded; 1.0 for a zero tile and for a scale that
    would be subnormal (as formats/fp8.py global_scale)."""
    return scales_of(tamax)


def _expand(s: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Per-tile values repeated over the elements of each tile, cropped to [rows, cols]."""
    return np.repeat(np.repeat(s, BLOCK[0], axis=0), BLOCK[1], axis=1)[:rows, :cols]


class Quantizer:
    """fp8-block has no state shared by a quantizer's members: each tile carries its own scale.
    search "mse": each tile's scale is search_tile_scales' choice (--scale-search)."""

    def __init__(self, scale: np.float32 | None = None, search: str = "none"):
        if search not in ("none",) + FORMAT.scale_search:
            raise ValueError(f"fp8-block has no scale search {search!r}")
        self.search = search

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
        # a tensor of whole tiles only (conversion quantizes no other: Format.fits), whatever the row chunks
        search = self.search == "mse" and rows % br == 0 and cols % bc == 0

        def tiles_fn(a: int, b: int) -> None:  # tile rows a..b
            r0, r1 = a * br, min(rows, b * br)
            x = to_f32(raw[r0:r1], dtype)
            amax = np.maximum.reduceat(np.abs(x), col_starts, axis=1)
            amax = np.maximum.reduceat(amax, np.arange(0, r1 - r0, br), axis=0)
            s = tile_scales(amax)
            if search:
                s = search_tile_scales(x, s)
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
