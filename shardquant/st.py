"""The safetensors container: strict header parsing, raw reads and a streaming writer.

Written by hand (not through the safetensors package) for two reasons: the planner needs the byte
offsets of every tensor before anything is read, with each check failing as a clean error naming the
file; and the writer must stream a shard tensor by tensor, which `safetensors.save_file` cannot (it
needs the whole shard in memory). Tests read our files back with the safetensors package.
"""

from __future__ import annotations

import functools
import json
import math
import os
import reprlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import HeaderError
from .text import show, show_path

# dtype string -> bytes per element (safetensors spec names).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# Raw storage used to hold each dtype in NumPy (bf16 and fp8 as unsigned integers of the same size).
STORAGE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.uint8), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "F8_E4M3": np.dtype(np.uint8), "F8_E5M2": np.dtype(np.uint8), "F8_E8M0": np.dtype(np.uint8),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F64": np.dtype("<f8"),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # same bound the safetensors package applies
MAX_DIMS = 8
_ALIGN = 8
# repr for values taken from a header into a message: bounded in length and nesting depth (a header
# may hold a 100 MB string or a list nested a thousand deep).
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 200, 60, 10, 4, 3
short_repr = _REPR.repr


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: everything the planner needs without reading its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; return {name: TensorInfo}. Reads the header only."""
    try:
        fst = path.stat()
        if not stat.S_ISREG(fst.st_mode):  # a FIFO would block in open(), a device never end
            raise HeaderError(f"{show_path(path)}: not a regular file")
        size = fst.st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, show_path(path))
            raw = f.read(n)
    except OSError as e:
        raise HeaderError(f"{show_path(path)}: cannot read ({e.strerror or e})") from None
    return parse_header(path, raw, n, size)


def header_length(head: bytes, size: int, where: str) -> int:
    """The header length from a file's first 8 bytes, checked against the file's size. `where`
    names the file in messages."""
    if len(head) < 8:
        raise HeaderError(f"{where}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
        raise HeaderError(f"{where}: absurd header length {n} for a file of {size} bytes")
    return n


def parse_header(path: Path, raw: bytes, n: int, size: int, where: str | None = None) -> dict[str, TensorInfo]:
    """Check and parse the `n` header bytes that follow a file's 8-byte length (from a local read, or
    from a hub range request: shardquant/source.py), for a file of `size` bytes at `path`; `where`
    names it in messages (default: the path)."""
    where = show_path(path) if where is None else where
    if len(raw) != n:
        raise HeaderError(f"{where}: truncated header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:  # one name, two tensors: which one a reader takes is undefined
        raise HeaderError(f"{where}: header names {short_repr(e.args[0])} twice") from None
    # ValueError also covers an integer of over 4300 digits, which Python refuses to convert
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{where}: header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{where}: header is not a JSON object")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise HeaderError(f"{where}: __metadata__ must map strings to strings")
            continue
        infos[name] = _entry(path, where, name, entry, base, size)
        spans.append((infos[name].offset, infos[name].offset + infos[name].nbytes, name))
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise HeaderError(f"{where}: tensors {short_repr(n0)} and {short_repr(n1)} overlap")
    return infos


class _Where:
    """"FILE: tensor NAME", made when formatted."""

    __slots__ = ("file", "name")

    def __init__(self, file: str, name: str) -> None:
        self.file, self.name = file, name

    def __format__(self, spec: str) -> str:
        return f"{self.file}: tensor {short_repr(self.name)}"


def _entry(path: Path, file_where: str, name: str, entry: object, base: int, size: int) -> TensorInfo:
    where = _Where(file_where, name)  # named only in a message: a header of 90,000 tensors is parsed at start-up
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: header entry is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or dict is unhashable
        raise HeaderError(f"{where}: unsupported dtype {short_repr(dtype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d < 2**48 for d in shape)
    ):
        raise HeaderError(f"{where}: malformed shape {short_repr(shape)}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise HeaderError(f"{where}: malformed data_offsets {short_repr(offs)}")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offs[1] - offs[0] != nbytes:
        raise HeaderError(
            f"{where}: data_offsets span {offs[1] - offs[0]} bytes but {dtype}{shape} needs {nbytes}"
        )
    if base + offs[1] > size:
        raise HeaderError(f"{file_where}: truncated: tensor {short_repr(name)} ends past the end of the file")
    return TensorInfo(name, dtype, tuple(shape), path, base + offs[0], nbytes)


def read_raw(info: TensorInfo, empty=np.empty) -> np.ndarray:
    """Read one tensor's bytes into a fresh array of its raw storage dtype, shaped (made by `empty`,
    as np.empty: shardquant/cuda Device.pinned_empty reads into page-locked memory). A tensor the
    source stores quantized (shardquant/encoding.py DecodedTensor): its parts, decoded."""
    if getattr(info, "parts", None):
        return info.decode([read_raw(p) for p in info.parts])
    out = empty(info.shape, dtype=STORAGE[info.dtype])
    buf = memoryview(out.reshape(-1).view(np.uint8))
    try:
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            got = 0
            while got < info.nbytes:
                k = f.readinto(buf[got:])
                if not k:
                    break
                got += k
    except OSError as e:
        raise HeaderError(f"{show_path(info.file)}: cannot read tensor {show(info.name)} ({e.strerror or e})") from None
    if got != info.nbytes:
        raise HeaderError(f"{show_path(info.file)}: truncated while reading tensor {show(info.name)}")
    return out


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard, known before any data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @functools.cached_property
    def nbytes(self) -> int:  # asked for per tensor by the plan, the recipe and the writer's order check
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in the given order."""
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(sorted(metadata.items()))
    off = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    body = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    body += b" " * (-len(body) % _ALIGN)
    return struct.pack("<Q", len(body)) + body


class ShardWriter:
    """Writes one shard header-first, then each tensor's bytes in plan order, checking each."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self._expect = list(tensors)
        self._i = 0
        self._f = open(path, "wb")
        self._f.write(encode_header(tensors, metadata))

    def write(self, name: str, data: np.ndarray) -> None:
        t = self._expect[self._i]
        if t.name != name or data.nbytes != t.nbytes:
            raise AssertionError(f"writer out of plan order: got {name!r}, expected {t.name!r}")
        self._f.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
        self._i += 1

    @property
    def done(self) -> bool:
        return self._i == len(self._expect)

    def close(self, sync: bool = True) -> None:
        if sync:
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.close()
