"""CuPy kernels: the GPU twin of the NumPy path, same signatures, same bits. Only this package
imports cupy; everything else asks `available()` first."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..background import in_background
from ..errors import ShardquantError

_SRC = Path(__file__).with_name("kernels.cu")
_TYPES = {"BF16": "unsigned short", "F16": "Half", "F32": "float"}
_VEC = {"BF16": 8, "F16": 8, "F32": 4}  # elements per 16-byte load
_THREADS = 256
_ROW_CHUNKS = 8  # kernels.cu ROW_CHUNKS
# --scale-search modes (besides "none") each Device method (formats/base.py Format.kernel) computes on
# the GPU, byte for byte as the format's NumPy search: kernels.cu nvfp4_search, mx_search, tile_search
SEARCHES = {"nvfp4": ("mse",), "mxfp8": ("mse",), "mxfp4": ("mse",), "fp8_block": ("mse",)}


def available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: the CPU path is used
        return False


def device_count() -> int:
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


# IEEE fp32 throughout: no fast math, no flush of subnormals, no FMA contraction.
_OPTIONS = ("--std=c++14", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=false")


class _Module:
    """The kernels compiled once per device. CuPy's RawModule appends -ftz=true to every NVRTC
    compile, which would flush subnormal inputs and scales; so compile through CuPy's NVRTC
    wrapper with our options, and prove the result keeps subnormals (`ieee_probe`) before use.
    The compiled image is kept on disk (`kernel_cache_dir`): a later process loads it in
    milliseconds instead of compiling for seconds."""

    def __init__(self, device: int):
        import cupy
        from cupy.cuda import compiler, function

        names = ["ieee_probe", "block_fp8_decode<0>", "block_fp8_decode<1>"]
        for dtype, t in _TYPES.items():
            names += [f"amax_bits<{t}>", f"fp8_quant<{t}>", f"fp8_quant_scalar<{t}>"]
            names += [f"{k}<{t}, {s}>" for k in ("nvfp4_quant", "mxfp8_quant", "mxfp4_quant") for s in (0, 1)]
            names += [f"fp8_channel_quant<{t}, {v}>" for v in (_VEC[dtype], 1)]
            names += [f"fp8_block_quant<{t}, {v}, {s}>" for v in (_VEC[dtype], 1) for s in (0, 1)]
            names += [f"error_power<{t}, {c}, {s}>" for c in (0, 1) for s in (0, 1, 2)]
        with cupy.cuda.Device(device):
            source = _SRC.read_text()
            key = _cache_key(cupy, device, source, names)
            cached = _cache_load(key)
            if cached is not None:
                obj, mapping = cached
            else:
                try:
                    obj, mapping = compiler.compile_using_nvrtc(source, options=_OPTIONS, name_expressions=names)
                except TypeError:  # an older CuPy without name expressions here
                    raise ShardquantError("this CuPy cannot compile the kernels without -ftz; use CuPy >= 13 or "
                                          "--device cpu") from None
            self.mod = function.Module()
            self.mod.load(obj)
            self.names = dict(mapping)
            self._probe(cupy)
            if cached is None:
                _cache_store(key, obj, self.names)  # only an image that passed the probe

    def get(self, name: str):
        return self.mod.get_function(self.names[name])

    def _probe(self, cupy) -> None:
        out = cupy.zeros(4, dtype=cupy.uint32)
        tiny = np.float32(1e-40)  # subnormal
        self.get("ieee_probe")((1,), (1,), (tiny, out))
        got = out.get()
        want = np.array([np.float32(tiny) / np.float32(3.0), tiny * np.float32(0.5), 1, 0], np.float32).view(np.uint32)
        want[2:] = [1, 0]
        if not np.array_equal(got, want):
            raise ShardquantError("the CUDA kernels do not keep subnormals (flush-to-zero); exact results "
                                  "cannot be guaranteed on this GPU stack: use --device cpu")


KERNEL_CACHE_VERSION = 1  # bump when the cache entry's layout changes


def kernel_cache_dir() -> Path | None:
    """Where compiled kernels are kept: $SHARDQUANT_CACHE_DIR, else $XDG_CACHE_HOME/shardquant, else
    ~/.cache/shardquant; SHARDQUANT_CACHE_DIR set to "" keeps none (every process compiles)."""
    env = os.environ.get("SHARDQUANT_CACHE_DIR")
    if env is not None:
        return Path(env).expanduser() / "kernels" if env else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shardquant" / "kernels"


def _cache_key(cupy, device: int, source: str, names: list[str]) -> str:
    """Everything the compiled image depends on: the source, options and template instances; CuPy,
    NVRTC and driver versions; the device's architecture."""
    try:
        nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception:  # the key only gets coarser
        nvrtc = "?"
    parts = [str(KERNEL_CACHE_VERSION), source, " ".join(_OPTIONS), "\n".join(names), cupy.__version__, nvrtc,
             str(cupy.cuda.runtime.driverGetVersion()), str(cupy.cuda.Device(device).compute_capability)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


_MAGIC = b"SQKC1\n"


def _cache_load(key: str) -> tuple[bytes, dict] | None:
    """(image, name mapping) of a cache entry whose checksum holds, else None (absent, torn, foreign)."""
    root = kernel_cache_dir()
    if root is None:
        return None
    try:
        with open(root / f"{key}.bin", "rb") as f:
            data = f.read(64 << 20)
        if not data.startswith(_MAGIC):
            return None
        head_len = int.from_bytes(data[len(_MAGIC):len(_MAGIC) + 4], "little")
        start = len(_MAGIC) + 4
        head = json.loads(data[start:start + head_len])
        image = data[start + head_len:]
        if hashlib.sha256(image).hexdigest() != head["sha256"] or not isinstance(head["names"], dict):
            return None
        return image, {str(k): str(v) for k, v in head["names"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_store(key: str, image, names: dict) -> None:
    """Publish an entry whole (a temporary file renamed into place): a concurrent reader sees the old
    entry or the new one. Failing to write is not an error: the next process compiles again."""
    root = kernel_cache_dir()
    if root is None:
        return
    image = image.encode() if isinstance(image, str) else bytes(image)
    head = json.dumps({"sha256": hashlib.sha256(image).hexdigest(), "names": names}).encode()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + len(head).to_bytes(4, "little") + head + image)
        os.replace(tmp, root / f"{key}.bin")
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_modules: dict[int, concurrent.futures.Future] = {}
_modules_lock = threading.Lock()


def _start_module(device: int) -> concurrent.futures.Future:
    """Load (or compile) the kernels for `device` on a background thread, once per process: the
    conversion reads its first bytes meanwhile; the first launch waits for it (`_module`)."""
    with _modules_lock:
        fut = _modules.get(device)
        if fut is None:  # an error is raised again by the first launch
            fut = _modules[device] = in_background(lambda: _Module(device), "shardquant-kernels")
    return fut


def prestart(index: int) -> None:
    """Device `index`'s CUDA context created and its kernels loading, before any Device is made
    (shardquant/startup.py gpu_start, ahead of the conversion's own imports)."""
    import cupy

    with cupy.cuda.Device(index):
        cupy.cuda.runtime.memGetInfo()  # the first runtime call on a device creates its context
    _start_module(index)


def _module(device: int) -> _Module:
    return _start_module(device).result()


def _kernel(device: int, name: str, dtype: str, *args: int):
    return _module(device).get(f"{name}<{', '.join([_TYPES[dtype], *map(str, args)])}>")


def _search(kernel: str, search: str) -> int:
    """The kernels' SEARCH template argument: 0 for round to nearest, 1 for "mse" (SEARCHES)."""
    if search == "none":
        return 0
    if search not in SEARCHES.get(kernel, ()):
        raise ShardquantError(f"--scale-search {search} has no GPU kernel in Device.{kernel}; use --device cpu")
    return 1


def _grid(n: int) -> tuple[int]:
    return (max(1, (n + _THREADS - 1) // _THREADS),)


class Device:
    """One GPU's kernels and stream. Arrays passed in are NumPy raw storage or CuPy arrays."""

    pinned = False  # to_host copies into page-locked memory (shardquant/backend.py pinned_host)

    def __init__(self, index: int = 0):
        import cupy

        self.cp = cupy
        self.index = index
        self.device = cupy.cuda.Device(index)
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._thr, self._thr_key = None, None
        _start_module(index)

    def to_device(self, raw: np.ndarray):
        """Copy to the device on this device's stream (the caller keeps `raw` alive until the
        stream is synchronized, as amaxes and quantize do: a copy from pinned memory is asynchronous)."""
        src = raw.view(np.uint16) if raw.dtype == np.float16 else raw
        with self.device, self.stream:
            x = self.cp.empty(src.shape, dtype=src.dtype)
            x.set(src, stream=self.stream)
        return x

    def amaxes(self, items) -> list[np.float32]:
        """max |x| of each (device array, dtype, name), exact: one launch each into one buffer and
        one synchronization for the lot; NaN/Inf raise NumericError naming the tensor. A device
        array may be dropped as soon as its launch is queued (the pool reuses memory in stream order)."""
        from ..formats.base import check_finite, mag_to_f32

        dtypes, names = [], []
        with self.device, self.stream:
            buf = self.cp.zeros(256, dtype=self.cp.uint32)
            for i, (x, dtype, name) in enumerate(items):
                if i == len(buf):
                    buf = self.cp.concatenate([buf, self.cp.zeros(len(buf), dtype=self.cp.uint32)])
                dtypes.append(dtype)
                names.append(name)
                if x.size:
                    blocks = min(4 * 132 * 8, _grid(x.size)[0])
                    _kernel(self.index, "amax_bits", dtype)((blocks,), (_THREADS,), (x, np.int64(x.size), buf[i:i + 1]),
                                                            stream=self.stream)
            ms = buf[: len(names)].get(stream=self.stream)
            self.stream.synchronize()
        out = []
        for m, dtype, name in zip(ms, dtypes, names):
            check_finite(np.uint32(m), dtype, name)
            width = np.uint32 if dtype == "F32" else np.uint16
            out.append(np.float32(mag_to_f32(np.array([m], dtype=width), dtype)[0]))
        return out

    def amax(self, x, dtype: str, name: str) -> np.float32:
        """max |x| of one tensor (device array), exact; NaN/Inf raise NumericError naming it."""
        return self.amaxes([(x, dtype, name)])[0]

    def nvfp4(self, x, dtype: str, s2: np.float32, name: str = "the weight", search: str = "none"):
        """Device arrays (packed uint8 [rows, cols/2], E4M3 codes uint8 [rows, cols/16]). NaN/Inf are
        refused by the quantizer's amax pass (amaxes), not here. search "mse": block scales as
        formats/nvfp4.py search_scales chooses them (kernels.cu nvfp4_search)."""
        from ..formats.nvfp4 import code_thresholds

        flag = _search("nvfp4", search)
        rows, cols = x.shape
        nb = x.size // 16
        with self.device, self.stream:
            packed = self.cp.empty((rows, cols // 2), dtype=self.cp.uint8)
            scales = self.cp.empty((rows, cols // 16), dtype=self.cp.uint8)
            if nb:
                key = float(np.float32(s2))
                if self._thr_key != key:  # one table per quantizer (per s2)
                    self._thr = self.cp.asarray(code_thresholds(np.float32(s2)).view(np.uint32))
                    self._thr_key = key
                _kernel(self.index, "nvfp4_quant", dtype, flag)(
                    _grid(nb), (_THREADS,), (x, np.int64(nb), np.float32(s2), self._thr, packed, scales),
                    stream=self.stream)
        return packed, scales

    def fp8(self, x, dtype: str, scale: np.float32, name: str = "the weight"):
        """Device E4M3 codes uint8 [rows, cols]; NaN/Inf are refused by the amax pass, as for nvfp4."""
        with self.device, self.stream:
            out = self.cp.empty(x.shape, dtype=self.cp.uint8)
            n = x.size
            if n and n % 8 == 0:
                _kernel(self.index, "fp8_quant", dtype)(_grid(n // 8), (_THREADS,), (x, np.int64(n // 8), np.float32(scale), out),
                                                        stream=self.stream)
            elif n:
                _kernel(self.index, "fp8_quant_scalar", dtype)(_grid(n), (_THREADS,), (x, np.int64(n), np.float32(scale), out),
                                                               stream=self.stream)
        return out

    # Formats whose scales are the tensor's own (rows, tiles, 32-element blocks): scales and codes in
    # one launch that also reports NaN/Inf (kernels.cu `bad`), refused here before anything is returned.

    def _flag(self):
        return self.cp.zeros(1, dtype=self.cp.uint32)

    def _refuse_nonfinite(self, bad, dtype: str, name: str) -> None:
        """NumericError naming the tensor when a kernel saw NaN/Inf (its magnitude bits in `bad`)."""
        from ..formats.base import check_finite

        m = bad.get(stream=self.stream)
        self.stream.synchronize()
        check_finite(np.uint32(m[0]), dtype, name)

    def _vec(self, x, dtype: str, cols: int) -> int:
        """Elements per load: 16 bytes when every row starts 16-byte aligned, else 1."""
        v = _VEC[dtype]
        return v if cols % v == 0 and x.data.ptr % 16 == 0 else 1

    def fp8_channel(self, x, dtype: str, gs=None, name: str = "the weight"):
        """Device arrays (E4M3 codes uint8 [rows, cols], fp32 row scales [rows, 1]); formats/fp8_channel.py."""
        rows, cols = x.shape
        with self.device, self.stream:
            x = self.cp.ascontiguousarray(x)
            out = self.cp.empty((rows, cols), dtype=self.cp.uint8)
            scales = (self.cp.empty if x.size else self.cp.ones)((rows, 1), dtype=self.cp.float32)  # 1.0: no columns
            if x.size:
                bad, v = self._flag(), self._vec(x, dtype, cols)
                chunks = -(-(cols // v) // _ROW_CHUNKS)  # per row, over the threads' register slots
                threads = min(_THREADS, max(32, -(-chunks // 32) * 32))
                _kernel(self.index, "fp8_channel_quant", dtype, v)(
                    (rows,), (threads,), (x, np.int64(cols), out, scales, bad), stream=self.stream)
                self._refuse_nonfinite(bad, dtype, name)
        return out, scales

    def fp8_block(self, x, dtype: str, gs=None, name: str = "the weight", search: str = "none"):
        """Device arrays (E4M3 codes uint8 [rows, cols], fp32 tile scales [ceil(rows/128), ceil(cols/128)]);
        formats/fp8_block.py, edge tiles included. search "mse": tile scales as search_tile_scales
        chooses them (kernels.cu tile_search), for a tensor of whole tiles as the NumPy path."""
        rows, cols = x.shape
        br, bc = 128, 128
        flag = _search("fp8_block", search) if rows % br == 0 and cols % bc == 0 else 0
        with self.device, self.stream:
            x = self.cp.ascontiguousarray(x)
            out = self.cp.empty((rows, cols), dtype=self.cp.uint8)
            scales = self.cp.empty((-(-rows // br), -(-cols // bc)), dtype=self.cp.float32)
            if x.size:
                bad = self._flag()
                _kernel(self.index, "fp8_block_quant", dtype, self._vec(x, dtype, cols), flag)(
                    (scales.shape[1], scales.shape[0]), (256,), (x, np.int64(rows), np.int64(cols), out, scales, bad),
                    stream=self.stream)
                self._refuse_nonfinite(bad, dtype, name)
        return out, scales

    def _mx(self, method: str, x, dtype: str, name: str, packed_cols: int, search: str):
        flag = _search(method, search)
        rows, cols = x.shape
        if cols % 32:
            raise ShardquantError(f"input dim {cols} of {name} is not a multiple of 32")
        with self.device, self.stream:
            x = self.cp.ascontiguousarray(x)
            if x.data.ptr % 16:  # a view: 16-byte loads need an aligned start
                x = x.copy()
            out = self.cp.empty((rows, packed_cols), dtype=self.cp.uint8)
            scales = self.cp.empty((rows, cols // 32), dtype=self.cp.uint8)
            if x.size:
                bad, nchunks = self._flag(), x.size // _VEC[dtype]
                _kernel(self.index, f"{method}_quant", dtype, flag)(
                    _grid(nchunks), (_THREADS,), (x, np.int64(nchunks), out, scales, bad), stream=self.stream)
                self._refuse_nonfinite(bad, dtype, name)
        return out, scales

    def mxfp8(self, x, dtype: str, gs=None, name: str = "the weight", search: str = "none"):
        """Device arrays (E4M3 codes uint8 [rows, cols], E8M0 bytes uint8 [rows, cols/32]); formats/mxfp8.py.
        search "mse": bytes as formats/mxfp4.py search_scales chooses them (kernels.cu mx_search)."""
        return self._mx("mxfp8", x, dtype, name, x.shape[1], search)

    def mxfp4(self, x, dtype: str, gs=None, name: str = "the weight", search: str = "none"):
        """Device arrays (packed E2M1 uint8 [rows, cols/2], low nibble first; E8M0 bytes uint8 [rows, cols/32]);
        formats/mxfp4.py. search "mse": as mxfp8."""
        return self._mx("mxfp4", x, dtype, name, x.shape[1] // 2, search)

    def error_power(self, src: np.ndarray, dtype: str, weight: np.ndarray, code: int, scale: np.ndarray,
                    scale_kind: int, tile: tuple[int, int], pq: float) -> tuple[float, float, np.float32]:
        """verify --source on the GPU: (sum ref^2, sum (deq - ref)^2, max |ref|) of one stored tensor
        against its raw source [rows, cols] (kernels.cu error_power: code 0 E4M3 / 1 packed E2M1;
        scale_kind 0 fp32 / 1 E4M3 / 2 E8M0; tile: weight rows x columns one scale covers)."""
        rows, cols = src.shape
        with self.device, self.stream:
            out = self.cp.zeros(2, dtype=self.cp.float64)
            top = self.cp.zeros(1, dtype=self.cp.uint32)
            if src.size:
                x, w = self.to_device(np.ascontiguousarray(src)), self.to_device(np.ascontiguousarray(weight))
                sc = self.to_device(np.ascontiguousarray(scale, dtype=np.float32 if scale_kind == 0 else np.uint8))
                blocks = int(min(rows, 8 * 132))
                _kernel(self.index, "error_power", dtype, code, scale_kind)(
                    (blocks,), (_THREADS,), (x, w, sc, np.int64(rows), np.uint32(cols), np.uint32(tile[0]),
                                             np.uint32(tile[1]), np.uint32(sc.size // max(1, -(-rows // tile[0]))),
                                             np.float32(pq), out, top), stream=self.stream)
            sums, m = out.get(stream=self.stream), top.get(stream=self.stream)
            self.stream.synchronize()
        return float(sums[0]), float(sums[1]), np.uint32(m[0]).view(np.float32)

    def block_fp8_decode(self, codes: np.ndarray, scales: np.ndarray, block: tuple[int, int], e8m0: bool):
        """A block-FP8 weight's codes [out, in] and tile scales (fp32, or E8M0 bytes) uploaded and
        decoded to bf16 storage on the device (kernels.cu block_fp8_decode; the NumPy twin is
        shardquant/encoding.py DecodedTensor.decode). The caller keeps the host arrays alive until
        the stream is synchronized (to_device)."""
        rows, cols = codes.shape
        c, s = self.to_device(codes.view(np.uint8)), self.to_device(scales.view(np.uint8) if e8m0 else scales)
        with self.device, self.stream:
            out = self.cp.empty((rows, cols), dtype=self.cp.uint16)
            n = rows * cols
            if n:
                _module(self.index).get(f"block_fp8_decode<{int(e8m0)}>")(
                    (min(_grid(n)[0], 1 << 20),), (_THREADS,),
                    (c, s, np.int64(rows), np.int64(cols), np.int64(scales.shape[1]), np.int32(block[0]),
                     np.int32(block[1]), out), stream=self.stream)
        return out

    def to_host(self, *xs) -> list[np.ndarray]:
        """Device arrays back to NumPy, after everything queued on this device's stream (into
        page-locked memory where `pinned`)."""
        with self.device, self.stream:
            if self.pinned:
                out = [x.get(stream=self.stream, out=self.pinned_empty(x.shape, x.dtype)) for x in xs]
            else:
                out = [x.get(stream=self.stream) for x in xs]
            self.stream.synchronize()
        return out

    def pinned_empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised NumPy array in page-locked host memory from cupy's pinned pool (np.empty's
        signature: st.read_raw): a copy to or from the GPU from it is DMA, asynchronous."""
        count = math.prod(shape)
        mem = self.cp.cuda.alloc_pinned_memory(max(1, count * np.dtype(dtype).itemsize))
        return np.frombuffer(mem, dtype, count).reshape(shape)


def get_device(spec: str) -> Device:
    """'cuda' / 'cuda:N' / 'auto' -> a Device, or a clean error."""
    if not available():
        raise ShardquantError("no CUDA device visible to cupy (install shardquant[gpu] on a GPU machine, or use --device cpu)")
    index = int(spec.split(":", 1)[1]) if ":" in spec else 0
    if not 0 <= index < device_count():
        raise ShardquantError(f"--device {spec}: only {device_count()} CUDA device(s) visible")
    return Device(index)
