"""MXFP4 weights: E2M1 elements in 32-element blocks along the input dim and one E8M0 scale byte per
block (value = element x 2^(byte - 127)); no per-quantizer scale.

Bytes are compressed-tensors 0.20's own (`generate_mx_scales`, docs/formats.md section 8): the block's
amax rounded to a power of two (up iff its mantissa is >= 1.75), floor(log2), minus emax (2 for
E2M1), biased by 127, computed on the exponent bits, so exactly. Two deliberate differences, both
keeping every byte in 1..254 (byte 255 is NaN and one vLLM path reads byte 0 as 0.0, docs/formats.md
section 8): a block whose amax rounds to zero (all zeros, or fp32 subnormals) gets byte 1 where
compressed-tensors writes 0 (its codes are 0 either way), and an amax of 1.75 x 2^127 or more, whose
rounded power of two overflows to Inf there (the byte it then stores is meaningless), gets
its exact exponent. Elements: x / scale
(exact: a power of two), clamped to +-6, rounded to E2M1 with compressed-tensors' `cast_to_fp4` ties,
which are formats/nvfp4.py's (_BOUNDS, _TIE_UP).
"""

from __future__ import annotations

import numpy as np

from .base import Format, block_scales_of, map_rows, no_global_scale, to_f32
from .nvfp4 import _SIGNED, PAIR_VALUES, fp4_codes

# docs/formats.md section 7: compressed-tensors `mxfp4-pack-quantized`, weights as its MXFP4A16 preset
# (group 32, uint8 scale_dtype), weight-only (vLLM recognizes the scheme from the weights alone).
# ModelOpt has no MXFP4 quant_algo that vLLM or SGLang accept.
FORMAT = Format(
    name="mxfp4", element="E2M1", num_bits=4, weight_dtype="U8", elems_per_byte=2, granularity="group",
    block_size=32, scale_dtype="U8", global_scale=False, activations="none",
    modelopt=None,
    compressed_tensors={
        "format": "mxfp4-pack-quantized",
        "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
                    "dynamic": False, "scale_dtype": "torch.uint8"},
        "input_activations": None,
        "tensor_scale": "none",
    },
    refused={"modelopt": "ModelOpt has no MXFP4 quant_algo that vLLM or SGLang load (docs/formats.md section 7); "
                         "use --flavor compressed-tensors (mxfp4-pack-quantized) or --format nvfp4",
             "block-fp8": "the block-fp8 flavor (quant_method fp8) spells 128x128 fp32 block scales, not MX "
                          "E8M0 bytes per 32; use --flavor compressed-tensors (mxfp4-pack-quantized)"},
    reads={"compressed-tensors": ("mxfp4-pack-quantized",)},
    min_sqnr=10.0,
    max_scaled=0.0,  # no per-quantizer scale
    kernel="mxfp4",
    quantizer_scale=False,
    scale_rule="ct-round-pow2",
    scale_search=("mse",),
)
BLOCK = 32
EMAX = 2  # floor(log2(6)), compressed-tensors' _MX_ELEM_OFFSET for 4 bits
ROUND_UP = np.uint32(1 << 21)  # fp32 bits: 2^(23 - 1 - 1), adds 0.25 to the mantissa (E2M1's 1 mantissa bit)


def e8m0_bytes(bamax: np.ndarray, emax: int) -> np.ndarray:
    """Scale bytes of fp32 block amaxes: the exponent of amax rounded to a power of two (mantissa
    >= 1.75 goes up), minus emax, biased, clamped to 1..254. The rounded biased exponent is
    (bits + 2^21) >> 23 (0 when amax rounds to zero, 255 when it rounds past fp32's largest)."""
    r = (bamax.astype(np.float32).view(np.uint32) + ROUND_UP) >> np.uint32(23)
    return np.clip(r.astype(np.int32) - emax, 1, 254).astype(np.uint8)


def inverse_scales(scales: np.ndarray) -> np.ndarray:
    """2^(127 - byte) as fp32, exactly (bytes 1..253: a normal fp32)."""
    return ((np.int32(254) - scales.astype(np.int32)).astype(np.uint32) << np.uint32(23)).view(np.float32)


def scale_values(scales: np.ndarray) -> np.ndarray:
    """2^(byte - 127) as fp32, every consumer's decoding (docs/formats.md section 8): byte 0 is 2^-127
    (a subnormal), byte 255 NaN."""
    out = np.ldexp(np.float32(1), scales.astype(np.int32) - 127).astype(np.float32)
    out[scales == 255] = np.nan
    return out


def block_amax_bytes(raw: np.ndarray, dtype: str, name: str, emax: int) -> np.ndarray:
    """E8M0 scale bytes [rows, cols/32] of a raw 2-D tensor, refusing NaN/Inf."""
    return block_scales_of(raw, dtype, name, BLOCK, lambda bamax: e8m0_bytes(bamax, emax))


def scaled_rows(raw: np.ndarray, dtype: str, scales: np.ndarray, a: int, b: int) -> np.ndarray:
    """Rows a..b of x / 2^(byte - 127) in fp32, blocked [b - a, nb, 32]: exact (a power of two; a
    result below fp32's normal range is far below every rounding bound of E2M1 and E4M3)."""
    nb = scales.shape[1]
    return to_f32(raw[a:b], dtype).reshape(b - a, nb, BLOCK) * inverse_scales(scales[a:b])[:, :, None]


global_scale = no_global_scale

# --scale-search mse: E8M0 bytes tried around the rule's, in order of preference (a tie keeps the earlier)
SEARCH_STEPS = (0, -1, 1)


def _e2m1(x: np.ndarray) -> np.ndarray:
    return fp4_codes(np.ascontiguousarray(x))


def _e2m1_values(codes: np.ndarray) -> np.ndarray:
    return _SIGNED[codes]


def block_sse(x: np.ndarray, scales: np.ndarray, encode=_e2m1, values=_e2m1_values) -> np.ndarray:
    """Squared reconstruction error of each 32-element block of fp32 `x` [rows, nb, 32] under E8M0
    `scales` [rows, nb]: the element codes `encode` gives x / 2^(byte - 127) (exact), dequantized by
    `values` times the scale (exact), summed in float64 element 0 to 31 in turn (a fixed order every
    backend can follow). E2M1 elements by default; formats/mxfp8.py passes E4M3's."""
    q = encode(x * inverse_scales(scales)[..., None])
    deq = values(q).astype(np.float64) * scale_values(scales).astype(np.float64)[..., None]
    e = x.astype(np.float64) - deq
    e *= e
    total = e[..., 0].copy()
    for j in range(1, BLOCK):
        total += e[..., j]
    return total


def search_scales(x: np.ndarray, rule: np.ndarray, encode=_e2m1, values=_e2m1_values) -> np.ndarray:
    """Per block, the E8M0 byte among the rule's and its neighbours (SEARCH_STEPS, within 1..254) with
    the least squared error over the block's own values; ties keep the earlier candidate."""
    best = rule.copy()
    err = block_sse(x, rule, encode, values)
    wide = rule.astype(np.int16)
    for step in SEARCH_STEPS[1:]:
        cand = wide + step
        ok = (cand >= 1) & (cand <= 254)
        c = np.clip(cand, 1, 254).astype(np.uint8)
        with np.errstate(over="ignore", invalid="ignore"):
            e = block_sse(x, c, encode, values)
        better = ok & (e < err)
        best[better] = c[better]
        err[better] = e[better]
    return best


def block_scales(raw: np.ndarray, dtype: str, name: str, emax: int, search: str, encode=_e2m1,
                 values=_e2m1_values) -> np.ndarray:
    """E8M0 bytes per 32-element block of an MX format whose largest element has exponent `emax`: the
    rule's (block_amax_bytes), or with search "mse" search_scales' choice under that format's element
    encoding (`encode`, `values`); rows are searched in bands (map_rows). MXFP4's and MXFP8's."""
    scales = block_amax_bytes(raw, dtype, name, emax)
    if search == "mse":
        rows, cols = raw.shape
        nb = cols // BLOCK

        def search_rows(a: int, b: int) -> None:
            x = to_f32(raw[a:b], dtype).reshape(b - a, nb, BLOCK)
            scales[a:b] = search_scales(x, scales[a:b], encode, values)

        map_rows(search_rows, rows, raw.strides[0] if rows else 0)
    return scales


class Quantizer:
    """MXFP4 has no per-quantizer state: gs is ignored. search "mse": each block's byte is
    search_scales' choice instead of the rule's (--scale-search)."""

    def __init__(self, gs: np.float32 = np.float32(1.0), search: str = "none"):
        if search not in ("none",) + FORMAT.scale_search:
            raise ValueError(f"mxfp4 has no scale search {search!r}")
        self.gs = np.float32(gs)
        self.search = search

    def quantize(self, raw: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(packed uint8 [out, in/2], low nibble first; E8M0 scale bytes uint8 [out, in/32])."""
        rows, cols = raw.shape
        scales = block_scales(raw, dtype, name, EMAX, self.search)
        packed = np.empty((rows, cols // 2), np.uint8)

        def code_rows(a: int, b: int) -> None:
            x = scaled_rows(raw, dtype, scales, a, b)
            codes = fp4_codes(np.ascontiguousarray(x)).reshape(b - a, cols)  # |x| > 5 saturates to 6
            packed[a:b] = codes[:, 0::2] | (codes[:, 1::2] << 4)

        map_rows(code_rows, rows, raw.strides[0] if rows else 0)
        return packed, scales


def quantize(raw: np.ndarray, dtype: str, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    return Quantizer().quantize(raw, dtype, name)


def dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fp32 weights back: E2M1 value x 2^(byte - 127)."""
    vals = PAIR_VALUES.view(np.uint64)[:, 0].take(packed).view(np.float32)  # one 8-byte gather per byte
    with np.errstate(over="ignore", invalid="ignore"):
        return (vals.reshape(*scales.shape, BLOCK) * scale_values(scales)[..., None]).reshape(
            packed.shape[0], packed.shape[1] * 2)


def dequantize_stored(weight: np.ndarray, scale: np.ndarray, per_quantizer: np.float32 | None = None) -> np.ndarray:
    """fp32 weights from the stored tensors (packed codes, E8M0 scale bytes); no per-quantizer scale."""
    return dequantize(weight, scale)
