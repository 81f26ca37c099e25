"""What every format shares: its layout record, raw-storage decoding and the row-parallel helper."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import functools

import numpy as np

from ..errors import NumericError
from ..text import show

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
E2M1_MAX = 6.0  # largest FP4 (E2M1) magnitude
E4M3_MIN_SCALE = 2.0**-9  # smallest E4M3 subnormal: block scales are clamped to [2^-9, 448]

# Magnitude bit patterns at or above which a value is Inf or NaN, per raw storage width.
_NONFINITE = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000}
_MAG_MASK = {"BF16": np.uint16(0x7FFF), "F16": np.uint16(0x7FFF), "F32": np.uint32(0x7FFFFFFF)}
_UINT = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}


@dataclass(frozen=True)
class Format:
    """One number format, declared: what it writes and how each flavor spells it. Plan, flavors,
    pipeline, manifest and verify read this record; none of them branches on a format's name.
    The format's module holds the record (FORMAT) and its arithmetic (Quantizer, global_scale,
    dequantize). docs/formats.md states each spelling's contract with the engines."""

    name: str
    element: str  # "E2M1" | "E4M3"
    num_bits: int
    weight_dtype: str  # safetensors dtype of the stored weight
    elems_per_byte: int  # 2 for packed FP4
    granularity: str  # "tensor" | "row" (one scale per output row) | "group" (1-D blocks along the input dim) | "block" (2-D tiles)
    block_size: int | None  # elements per block scale along the input dim (granularity "group")
    scale_dtype: str  # safetensors dtype of the block scales, or of the per-quantizer scale
    global_scale: bool  # block scales AND a per-quantizer fp32 scale (NVFP4's weight_scale_2)
    activations: str  # how engines quantize activations: "none" (weight-only), "dynamic-token" or "dynamic-group" (1x128)
    modelopt: dict | None  # hf_quant_config "quantization" fields (quant_algo, group_size), or refused
    compressed_tensors: dict | None  # format, weights, input_activations, tensor_scale; or refused
    refused: dict = field(default_factory=dict)  # flavor -> why it cannot be served data-free, and what to use
    reads: dict = field(default_factory=dict)  # flavor -> other producers' spellings verify accepts as this format
    min_sqnr: float = 10.0  # verify --source: a tensor below this SQNR (dB) is a violation
    max_scaled: float = 0.0  # largest stored magnitude (element x block scale) the per-quantizer scale multiplies
    kernel: str = ""  # the CuPy device method (shardquant/cuda) that quantizes one tensor
    block: tuple[int, int] | None = None  # rows x columns of a 2-D tile (granularity "block")
    quantizer_scale: bool = True  # a per-quantizer fp32 scale is written (from the group's shared amax)
    scale_rule: str = ""  # how block scales are chosen, when a producer's rule is followed ("ct-round-pow2": MX)
    block_fp8: dict | None = None  # config.json quantization_config of the block-fp8 flavor (quant_method "fp8"), or refused
    default_flavor: str | None = None  # --flavor when none is given; None: the first flavor (registry order) that serves it
    scale_search: tuple[str, ...] = ()  # --scale-search modes its Quantizer takes besides "none" (round to nearest)

    @property
    def quant_algo(self) -> str | None:
        return self.modelopt["quant_algo"] if self.modelopt else None

    def weight_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (shape[0], shape[1] // self.elems_per_byte)

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        """Shape of the block scales of a weight of `shape` ([] when the format has none)."""
        if self.granularity == "row":
            return (shape[0], 1)
        if self.block:
            return (-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1]))
        return (shape[0], shape[1] // self.block_size) if self.block_size else ()

    @property
    def block_scales(self) -> bool:
        """Scales of the weight's own blocks, rows or tiles (beside or instead of a per-quantizer scale)."""
        return bool(self.block or self.block_size) or self.granularity == "row"

    def fits(self, shape: tuple[int, ...], name: str = "the weight") -> str | None:
        """Why a 2-D weight of this shape cannot take the format (engines need whole blocks), or None."""
        if self.block:
            if shape[0] % self.block[0] or shape[1] % self.block[1]:
                return f"shape {list(shape)} of {name} is not a multiple of {self.block[0]}x{self.block[1]} tiles"
            return None
        step = self.block_size or self.elems_per_byte
        return None if shape[1] % step == 0 else f"input dim {shape[1]} of {name} is not a multiple of {step}"

    def divides(self, in_features: int) -> bool:
        step = self.block_size or self.elems_per_byte
        return in_features % step == 0

    def spelling(self, flavor: str) -> dict | None:
        return {"modelopt": self.modelopt, "compressed-tensors": self.compressed_tensors,
                "block-fp8": self.block_fp8}.get(flavor)


def _e4m3_table() -> np.ndarray:
    """fp32 value of every E4M3 byte, from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m/8 x 2^-6), 0x7F and 0xFF are NaN, there is no Inf. Exact: each value is
    a small integer times a power of two."""
    b = np.arange(256)
    e, m = (b >> 3) & 0xF, b & 7
    mag = np.where(e == 0, np.ldexp(m / 8.0, -6), np.ldexp(1.0 + m / 8.0, e - 7))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(b & 0x80, -mag, mag).astype(np.float32)


# Decoding E4M3 is one table gather: NumPy's take runs without the GIL (the ml_dtypes cast does not, and
# verify decodes on many threads at once), and building it needs no ml_dtypes (whose import costs half a
# second of start-up: it is loaded only to encode, e4m3_dtype).
E4M3_VALUES = _e4m3_table()


@functools.cache
def e4m3_dtype():
    """ml_dtypes' float8_e4m3fn, imported on first use (encoding only)."""
    import ml_dtypes

    return ml_dtypes.float8_e4m3fn


def e4m3_values(codes: np.ndarray) -> np.ndarray:
    """fp32 values of E4M3 codes (uint8 or float8_e4m3fn storage)."""
    return E4M3_VALUES.take(codes.view(np.uint8))


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float32 values of raw storage (bf16 held as uint16: `u16 << 16` is exact)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.astype(np.float32)
    return raw


def magnitude_bits(raw: np.ndarray, dtype: str) -> np.ndarray:
    """|x| as unsigned integers: for finite values their order is the order of |x|."""
    return raw.view(_UINT[dtype]) & _MAG_MASK[dtype]


def mag_to_f32(mag: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (mag.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return mag.view(np.float16).astype(np.float32)
    return mag.view(np.float32)


def nonfinite(max_mag: np.ndarray | np.integer, dtype: str) -> bool:
    """Whether the largest magnitude bit pattern of a tensor is Inf or NaN."""
    return int(np.max(max_mag)) >= _NONFINITE[dtype]


def check_finite(max_mag: np.ndarray | np.integer, dtype: str, name: str) -> None:
    """Given the largest magnitude bit pattern of a tensor, refuse NaN and Inf."""
    if nonfinite(max_mag, dtype):
        raise NumericError(f"tensor {show(name)} holds NaN or Inf; cannot quantize it")


def tensor_amax(raw: np.ndarray, dtype: str, name: str) -> np.float32:
    """max |W| of one tensor, exact, refusing NaN/Inf."""
    if raw.size == 0:
        return np.float32(0)
    m = magnitude_bits(raw, dtype).max()
    check_finite(m, dtype, name)
    return np.float32(mag_to_f32(np.array([m], dtype=_UINT[dtype]), dtype)[0])


_POOL: ThreadPoolExecutor | None = None


def threads() -> int:
    return max(1, int(os.environ.get("SHARDQUANT_THREADS", os.cpu_count() or 1)))


def map_rows(fn: Callable[[int, int], None], rows: int, row_bytes: int, chunk_bytes: int = 1 << 20) -> None:
    """Run fn(start, stop) over row ranges on a thread pool. NumPy releases the GIL inside its
    loops, so chunks of ~1 MiB (cache-sized) run in parallel on all cores."""
    global _POOL
    step = max(1, chunk_bytes // max(1, row_bytes))
    spans = [(i, min(rows, i + step)) for i in range(0, rows, step)]
    n = threads()
    if n == 1 or len(spans) == 1:
        for a, b in spans:
            fn(a, b)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="shardquant")
    for f in [_POOL.submit(fn, a, b) for a, b in spans]:
        f.result()


def block_scales_of(raw: np.ndarray, dtype: str, name: str, block: int,
                    to_scales: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Scales (uint8 codes) [rows, cols/block] of a raw 2-D tensor: `to_scales` of each block's
    largest magnitude in fp32, row chunks in parallel; NaN/Inf anywhere is refused. Each chunk
    writes only its own rows of the per-row maximum (a shared running max updated from the pool's
    threads lost a NaN/Inf now and then)."""
    rows, cols = raw.shape
    nb = cols // block
    mags = magnitude_bits(raw, dtype).reshape(rows, nb, block)
    scales = np.empty((rows, nb), np.uint8)
    worst = np.zeros(rows + 1, np.uint64)

    def scale_rows(a: int, b: int) -> None:
        bm = mags[a:b].max(axis=2)
        if bm.size:
            worst[a:b] = bm.max(axis=1)
        scales[a:b] = to_scales(mag_to_f32(bm, dtype))

    map_rows(scale_rows, rows, raw.strides[0] if rows else 0)
    check_finite(worst, dtype, name)
    return scales


def no_global_scale(amax: np.float32) -> np.float32:
    """The per-quantizer scale of a format with block scales only (Format.quantizer_scale False):
    never written; 1.0 so that the pipeline's one code path runs."""
    return np.float32(1.0)
