"""Fuzz `shardquant verify`: corrupt copies of small converted outputs at random and run verify on
each; any exception other than a ShardquantError is a crash. A copy changed beyond its manifest
(which nothing protects) that still passes a hashed verify is a miss. Exit status 1 on either.

    python tools/fuzz_verify.py --iterations 3000 --seed 0
    python tools/fuzz_verify.py --seed 0 --replay 1234     # one iteration again, its mutations shown

Bases: a tiny Qwen3-MoE converted on the CPU to NVFP4 and FP8 in both flavors (modelopt,
compressed-tensors), plus the ModelOpt and llm-compressor checkpoints of tests/data (no manifest,
single file). Mutations: bit flips (anywhere, or in a shard's header), truncation, JSON values
replaced by random-typed ones (huge integers, NaN, deep nesting, non-strings) at random paths, keys
deleted, duplicated or added, targeted breakage of config.json / hf_quant_config.json / the index /
the manifest, safetensors header edits (dtype, shape, offsets), scale tensors overwritten with
NaN/Inf/0/negative/huge/subnormal values, files replaced by directories, symlinks or FIFOs, files
deleted or added. After the mutations the manifest's files table is sometimes recomputed ("sealed"),
so that the contract checks see corrupted content that the file check would otherwise flag first.
Each checked copy runs `verify` (with or without hashes), sometimes with `--source`, sometimes
through the CLI. tests/test_verify_fuzz.py runs a seeded sample of the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from shardquant import manifest, testing
from shardquant.cli import main as cli_main
from shardquant.convert import convert
from shardquant.errors import ShardquantError
from shardquant.testing import served
from shardquant.verify import verify

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
MANIFEST = manifest.MANIFEST_NAME
VARIANTS = served()  # every (format, flavor) pair the CLI accepts
OTHER_PRODUCERS = [REPO / "tests" / "data" / "modelopt-qwen3-moe-w4a16-nvfp4",
                   REPO / "tests" / "data" / "llmc-qwen3-moe-nvfp4a16"]
ITERATION_TIMEOUT_S = 30  # a verify that takes longer is reported as a hang


# ---------------------------------------------------------------------------------------------
# bases

def seal(d: Path) -> None:
    """Recompute the manifest's files table from the directory as it is now (every regular file but
    the manifest, recursively, never through a symlink), as a producer that wrote these files
    would. A manifest that is not a JSON object is left alone."""
    path = d / MANIFEST
    if not path.is_file() or path.is_symlink():  # a FIFO would block the read
        return
    try:
        man = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(man, dict):
        return
    files = {}
    for top, dirs, names in os.walk(d):  # os.walk does not follow symlinked directories
        for n in names:
            p = Path(top) / n
            rel = p.relative_to(d).as_posix()
            if rel == MANIFEST or not os.path.isfile(p) or os.path.islink(p):
                continue
            files[rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
    man["files"] = dict(sorted(files.items()))
    path.write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")


def build_bases(root: Path, experts: int = 4) -> tuple[Path, dict[str, Path]]:
    """(source checkpoint, {base name: directory}): the source converted in every VARIANT, in
    several shards, plus the other producers' checkpoints of tests/data that exist."""
    # whole 128x128 tiles (testing.TILED's shapes), so that formats with 2-D block scales quantize too
    model = testing.qwen3_moe(experts=experts, hidden=128, inter=128, heads=2, kv_heads=1, head_dim=128)
    src = testing.write_checkpoint(root / "src", model, shard_bytes=20_000, seed=11)
    bases = {}
    for fmt, flavor in VARIANTS:
        out = root / f"{fmt}-{flavor}"
        convert(str(src), out, fmt, flavor=flavor, device="cpu", max_shard_size=30_000)
        bases[f"{fmt}-{flavor}"] = out
    for d in OTHER_PRODUCERS:
        if d.is_dir():
            bases[d.name] = d
    return src, bases


# ---------------------------------------------------------------------------------------------
# random values

def random_value(rng: random.Random, depth: int = 0) -> object:
    """A JSON value of a random type; strings among them that mean something to verify."""
    k = rng.randrange(14 if depth < 2 else 10)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, 1, -1, 2, 16, 2**31, 2**63, -(2**64), 10**30])
    if k == 3:
        return rng.choice([0.0, -0.0, 1.5, -1.0, 1e38, 3.4e38, 1e-40, 5e-324, 1e308, math.nan, math.inf, -math.inf])
    if k in (4, 5, 6):
        return rng.choice(["", "x", "modelopt", "compressed-tensors", "nvfp4-pack-quantized", "float-quantized",
                           "NVFP4", "W4A16_NVFP4", "FP8", "MIXED_PRECISION", "compressed", "re:(", "re:.*",
                           "re:a{99999999999999999999}", "*", "lm_head", "\x00", "\ud800", "\udcff", "../x",
                           "/etc/hostname", "model.safetensors", INDEX, "config.json", MANIFEST, "a/b.json",
                           "x" * 5000, "\n\x1b[31m", "model-00001-of-00005.safetensors", "0" * 64, "A" * 64])
    if k == 7:
        return RawJSON(rng.choice(["9" * 4200, "-" + "9" * 4000, "1e400", "-1e400", "NaN", "Infinity",
                                   "[" * 900 + "]" * 900, "[" * 20000 + "]" * 20000,
                                   '{"a":' * 800 + "1" + "}" * 800]))
    if k == 8:
        return []
    if k == 9:
        return {}
    if k in (10, 11):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["a", "format", "weights", "members", "amax", "sha256", "size", "0"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


@dataclass(frozen=True)
class RawJSON:
    """JSON text put into a document as it is (numbers json.dumps cannot write, nesting too deep
    to build as objects)."""

    text: str


def dumps(obj: object) -> str:
    """json.dumps, with RawJSON values spliced in as their text."""
    raws: dict[str, str] = {}

    def walk(o):
        if isinstance(o, RawJSON):
            key = f"@@raw{len(raws)}@@"
            raws[key] = o.text
            return key
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    text = json.dumps(walk(obj), indent=1)  # ASCII: an unpaired surrogate can only be a \u escape
    for key, raw in raws.items():
        text = text.replace(json.dumps(key), raw)
    return text


def paths_of(obj: object, prefix: tuple = (), limit: int = 4000) -> list[tuple]:
    """Every path (tuple of keys and indices) to a value inside `obj`, the root included."""
    out, todo = [], [(prefix, obj)]
    while todo and len(out) < limit:
        p, o = todo.pop()
        out.append(p)
        if isinstance(o, dict):
            todo += [(p + (k,), v) for k, v in o.items()]
        elif isinstance(o, list):
            todo += [(p + (i,), v) for i, v in enumerate(o)]
    return out


def get(obj: object, path: tuple) -> object:
    for k in path:
        obj = obj[k]
    return obj


def mutate_json(rng: random.Random, obj: object) -> tuple[object, str]:
    """One random change to a JSON document: a value replaced, a key deleted, added or renamed, or a
    list item duplicated. Returns (new document, what was done)."""
    path = rng.choice(paths_of(obj))
    op = rng.randrange(5)
    if not path or op == 0:
        v = random_value(rng)
        if not path:
            return v, f"root := {short(v)}"
        parent = get(obj, path[:-1])
        parent[path[-1]] = v
        return obj, f"{short(path)} := {short(v)}"
    parent = get(obj, path[:-1])
    if op == 1:
        del parent[path[-1]]
        return obj, f"del {short(path)}"
    target = get(obj, path)
    if op == 2 and isinstance(target, dict):
        k = rng.choice(["x", "format", "quant_method", "files", "weight_map", "metadata", "dtype"])
        target[k] = random_value(rng)
        return obj, f"{short(path)}[{k!r}] added"
    if op == 3 and isinstance(parent, dict):
        v = parent.pop(path[-1])
        new = rng.choice([path[-1] + "x", path[-1].upper(), "", " " + path[-1]])
        parent[new] = v
        return obj, f"rename {short(path)} -> {new!r}"
    if isinstance(parent, list):
        parent.insert(path[-1], parent[path[-1]])
        return obj, f"dup item {short(path)}"
    parent[path[-1]] = random_value(rng)
    return obj, f"{short(path)} := random"


def short(x: object, n: int = 80) -> str:
    s = repr(x.text[:40] + "..." if isinstance(x, RawJSON) else x)
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------------------------------
# mutations: each takes (rng, directory) and returns what it did, or None when it found nothing to do

def regular_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and not p.is_symlink())


def shards(d: Path) -> list[Path]:
    return [p for p in regular_files(d) if p.suffix == ".safetensors"]


def json_files(d: Path) -> list[Path]:
    return [p for p in regular_files(d) if p.suffix == ".json"]


def header_len(p: Path) -> int:
    with open(p, "rb") as f:
        head = f.read(8)
    return struct.unpack("<Q", head)[0] if len(head) == 8 else 0


def m_flip_bit(rng, d):
    files = regular_files(d)
    if not files:
        return None
    p = rng.choice(files)
    data = bytearray(p.read_bytes())
    if not data:
        return None
    if p.suffix == ".safetensors" and rng.random() < 0.5:
        i = rng.randrange(min(len(data), 8 + header_len(p)))  # length prefix or header JSON
    else:
        i = rng.randrange(len(data))
    bit = rng.randrange(8)
    data[i] ^= 1 << bit
    p.write_bytes(bytes(data))
    return f"flip bit {bit} of byte {i} in {p.name}"


def m_truncate(rng, d):
    files = regular_files(d)
    if not files:
        return None
    p = rng.choice(files)
    size = p.stat().st_size
    if size == 0:
        return None
    n = rng.choice([0, 1, 7, 8, 8 + header_len(p), size - 1, rng.randrange(size)])
    n = min(n, size - 1)
    with open(p, "r+b") as f:
        f.truncate(n)
    return f"truncate {p.name} {size} -> {n}"


def m_json_value(rng, d):
    files = json_files(d)
    if not files:
        return None
    p = rng.choice(files)
    try:
        obj = json.loads(p.read_bytes())
    except (ValueError, RecursionError):
        return None
    obj, what = mutate_json(rng, obj)
    p.write_text(dumps(obj))
    return f"{p.name}: {what}"


def m_json_raw(rng, d):
    files = json_files(d)
    if not files:
        return None
    p = rng.choice(files)
    kind = rng.randrange(9)
    text = p.read_bytes()
    if kind == 0:
        new, what = b"\xff\xfe" + text, "non-UTF-8 prefix"
    elif kind == 1:
        new, what = text[: rng.randrange(len(text))] if text else b"{", "cut"
    elif kind == 2:
        new, what = b"[" * 10000 + b"]" * 10000, "nested 10000 deep"
    elif kind == 3:
        new, what = b'{"a": ' + b"9" * 5000 + b"}", "5000-digit integer"
    elif kind == 4:
        new, what = rng.choice([b"", b"null", b"[]", b"3", b'"x"', b"NaN"]), "not an object"
    elif kind == 5:  # a key written twice (json.loads keeps the last)
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or not obj:
            return None
        k = rng.choice(list(obj))
        body = ", ".join(f"{json.dumps(a)}: {json.dumps(b)}" for a, b in obj.items())
        new, what = ("{" + body + f", {json.dumps(k)}: {dumps(random_value(rng))}" + "}").encode(), f"key {k!r} twice"
    elif kind == 6:
        new, what = text.replace(b'"', b"'", 1), "a quote changed"
    elif kind == 7:
        new, what = b"\xef\xbb\xbf" + text, "UTF-8 BOM"
    else:
        new, what = text + b"\x00garbage", "trailing garbage"
    p.write_bytes(new)
    return f"{p.name}: {what}"


def read_shard(p: Path) -> tuple[dict, bytes] | None:
    raw = p.read_bytes()
    if len(raw) < 8:
        return None
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        hdr = json.loads(raw[8:8 + n])
    except (ValueError, RecursionError):
        return None
    return (hdr, raw[8 + n:]) if isinstance(hdr, dict) else None


def write_shard(p: Path, hdr: object, data: bytes, length: int | None = None) -> None:
    body = dumps(hdr).encode()
    p.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)


def m_header(rng, d):
    """Edit a shard header: a tensor's dtype, shape or offsets, or a random JSON change."""
    ss = shards(d)
    if not ss:
        return None
    p = rng.choice(ss)
    got = read_shard(p)
    if got is None:
        return None
    hdr, data = got
    names = [k for k, v in hdr.items() if k != "__metadata__" and isinstance(v, dict)]
    scales = [k for k in names if ".weight_scale" in k or ".weight_global_scale" in k or ".input_scale" in k]
    kind = rng.randrange(6)
    if kind == 0 or not names:
        hdr, what = mutate_json(rng, hdr)
    else:
        name = rng.choice(scales if scales and rng.random() < 0.7 else names)
        e = hdr[name]
        shape = e.get("shape") if isinstance(e.get("shape"), list) else []
        if kind == 1:
            e["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "F8_E4M3", "I64", "F64", "BOOL", "F8_E8M0"])
            what = f"{name}: dtype {e['dtype']}"
        elif kind == 2:  # a new shape with the same byte count where one exists, else any
            n = math.prod(shape) if all(isinstance(x, int) for x in shape) else 1
            e["shape"] = rng.choice([[], [n], [1, n], [n, 1], [1, 1, n], [0], [0, 2**47], [2**47, 2**47], [-1], [n, 0]])
            what = f"{name}: shape {shape} -> {e['shape']}"
        elif kind == 3:
            offs = e.get("data_offsets")
            if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
                return None
            delta = rng.choice([1, -1, 4, -4, 2**40])
            e["data_offsets"] = [offs[0] + delta, offs[1] + delta] if rng.random() < 0.5 else [offs[0], offs[1] + delta]
            what = f"{name}: data_offsets {offs} -> {e['data_offsets']}"
        elif kind == 4:  # rename: a tensor becomes another role, or lands in another module
            new = rng.choice([name.replace("weight_scale_2", "weight_scale"),
                              name.replace("weight_scale", "input_scale"), name + "x",
                              name.replace(".weight", ".weight_packed"), name.replace("layers.0", "layers.9"),
                              name + "\ud800", "\n\x1b[2J" + name, "", "x" * 3000 + name])
            hdr[new] = hdr.pop(name)
            what = f"rename {name} -> {new}"
        else:
            del hdr[name]
            what = f"del header entry {name}"
    keep_len = rng.random() < 0.1
    write_shard(p, hdr, data, length=header_len(p) if keep_len else None)
    return f"{p.name} header: {what}" + (" (old length prefix kept)" if keep_len else "")


SCALE_F32 = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e38, 3.4e38, 1e-40, 1e-45, 1.17e-38, 5e-39]
SCALE_E4M3 = [0x7F, 0xFF, 0x80, 0x00, 0xFE, 0xF0, 0x01, 0x7E]


def m_scale_values(rng, d):
    """Overwrite a scale tensor's values in place (F32: NaN/Inf/0/negative/huge/subnormal; E4M3
    block scales: NaN, negative, zero codes)."""
    cands = []
    for p in shards(d):
        got = read_shard(p)
        if got is None:
            continue
        hdr, _ = got
        base = 8 + header_len(p)
        for k, e in hdr.items():
            if (isinstance(e, dict) and any(r in k for r in (".weight_scale", ".weight_global_scale", ".input_scale"))
                    and e.get("dtype") in ("F32", "F8_E4M3") and isinstance(e.get("data_offsets"), list)):
                cands.append((p, k, e["dtype"], base + e["data_offsets"][0], base + e["data_offsets"][1]))
    if not cands:
        return None
    p, k, dtype, a, b = rng.choice(cands)
    data = bytearray(p.read_bytes())
    if b > len(data) or b <= a:
        return None
    if dtype == "F32":
        vals = np.frombuffer(bytes(data[a:b]), "<f4").copy()
        v = rng.choice(SCALE_F32)
        idx = slice(None) if rng.random() < 0.5 else rng.randrange(vals.size)
        vals[idx] = v
        data[a:b] = vals.tobytes()
    else:
        v = rng.choice(SCALE_E4M3)
        for _ in range(rng.choice([1, 3, b - a])):
            data[rng.randrange(a, b)] = v
    p.write_bytes(bytes(data))
    return f"{p.name}: {k} ({dtype}) := {v!r}"


def m_replace_kind(rng, d):
    """A file becomes a directory, a symlink (to a sibling, out of the directory, dangling, to
    itself) or a FIFO."""
    files = regular_files(d)
    if not files:
        return None
    p = rng.choice(files)
    kind = rng.choice(["dir", "dir-with-file", "link-sibling", "link-outside", "link-dangling", "link-loop", "fifo"])
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        kind = "dir"
    data = p.read_bytes()
    p.unlink()
    if kind == "dir":
        p.mkdir()
    elif kind == "dir-with-file":
        p.mkdir()
        (p / "inner.json").write_text("{}")
    elif kind == "link-sibling":
        p.symlink_to(rng.choice([f.name for f in files if f != p] or ["x"]))
    elif kind == "link-outside":
        outside = d.parent / f"outside-{p.name}"
        outside.write_bytes(data)  # the same bytes: only the kind of file differs
        p.symlink_to(outside)
    elif kind == "link-dangling":
        p.symlink_to(d / "no-such-file")
    elif kind == "link-loop":
        p.symlink_to(p.name)
    else:
        os.mkfifo(p)
    return f"{p.name} -> {kind}"


def m_add(rng, d):
    """Something the manifest does not list: a hidden file, a stray file or shard, a directory, a
    symlink, a file with a name that is not UTF-8."""
    kind = rng.randrange(7)
    ss = shards(d)
    if kind == 0:
        (d / ".hidden").write_text("x")
        return "add .hidden"
    if kind == 1:
        (d / "notes.txt").write_text("x")
        return "add notes.txt"
    if kind == 2 and ss:
        shutil.copyfile(rng.choice(ss), d / "model-extra.safetensors")
        return "add model-extra.safetensors"
    if kind == 3:
        (d / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
        (d / "sub" / "deeper" / "x.json").write_text("{}")
        return "add sub/deeper/x.json"
    if kind == 4:
        (d / "link.json").symlink_to("config.json")
        return "add link.json -> config.json"
    if kind == 5:
        name = os.fsdecode(b"bad-\xff-name.json")
        (d / name).write_text("{}")
        return "add a file named with byte 0xff"
    (d / "emptydir").mkdir(exist_ok=True)
    return "add emptydir/"


def m_delete(rng, d):
    files = regular_files(d)
    if not files:
        return None
    p = rng.choice(files)
    p.unlink()
    return f"delete {p.name}"


def edit_json_file(p: Path, fn) -> bool:
    try:
        obj = json.loads(p.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(obj, dict):
        return False
    fn(obj)
    p.write_text(dumps(obj))
    return True


def first(d: dict) -> object:
    return next(iter(d.values())) if isinstance(d, dict) and d else None


def _ensure(obj: dict, key: str) -> dict:
    if not isinstance(obj.get(key), dict):
        obj[key] = {}
    return obj[key]


CONFIG_BREAKS = {
    "quantization_config []": lambda c: c.update(quantization_config=[]),
    "quantization_config str": lambda c: c.update(quantization_config="modelopt"),
    "quant_method list": lambda c: _ensure(c, "quantization_config").update(quant_method=["modelopt"]),
    "quant_method dict": lambda c: _ensure(c, "quantization_config").update(quant_method={"a": 1}),
    "ignore dict": lambda c: _ensure(c, "quantization_config").update(ignore={"a": 1}),
    "ignore ints": lambda c: _ensure(c, "quantization_config").update(ignore=[1, 2]),
    "ignore bad regex": lambda c: _ensure(c, "quantization_config").update(ignore=["re:(", "re:a{9999999999999999999}"]),
    "config_groups str": lambda c: _ensure(c, "quantization_config").update(config_groups="x"),
    "config_groups list": lambda c: _ensure(c, "quantization_config").update(config_groups=[{"format": "x"}]),
    "group format list": lambda c: _ensure(c, "quantization_config").update(config_groups={"g": {"format": ["a"]}}),
    "format list": lambda c: _ensure(c, "quantization_config").update(format=["nvfp4-pack-quantized"]),
    "format dict": lambda c: _ensure(c, "quantization_config").update(format={"a": 1}),
    "quant_algo list": lambda c: _ensure(c, "quantization_config").update(quant_algo=["NVFP4"]),
    "quant_algo int": lambda c: _ensure(c, "quantization_config").update(quant_algo=4),
    "producer nested": lambda c: _ensure(c, "quantization_config").update(producer={"name": {"x": [1]}, "version": 2}),
    "producer str": lambda c: _ensure(c, "quantization_config").update(producer="me"),
    "version list": lambda c: _ensure(c, "quantization_config").update(version=[1]),
    "status dict": lambda c: _ensure(c, "quantization_config").update(quantization_status={"a": 1}),
}
HF_BREAKS = {
    "quantization list": lambda h: h.update(quantization=[]),
    "exclude_modules 5": lambda h: _ensure(h, "quantization").update(exclude_modules=5),
    "exclude_modules null": lambda h: _ensure(h, "quantization").update(exclude_modules=None),
    "exclude_modules ints": lambda h: _ensure(h, "quantization").update(exclude_modules=[1, None]),
    "exclude bad regex": lambda h: _ensure(h, "quantization").update(exclude_modules=["re:[", "*"]),
    "quant_algo dict": lambda h: _ensure(h, "quantization").update(quant_algo={"a": 1}),
    "quant_algo None": lambda h: _ensure(h, "quantization").update(quant_algo=None),
    "producer list": lambda h: h.update(producer=["modelopt"]),
}
INDEX_BREAKS = {
    "weight_map ints": lambda ix: ix.update(weight_map={k: 1 for k in (ix.get("weight_map") or {"a": 0})}),
    "weight_map list": lambda ix: ix.update(weight_map=[]),
    "weight_map None": lambda ix: ix.update(weight_map=None),
    "shard ../x": lambda ix: _one_shard(ix, "../x.safetensors"),
    "shard absolute": lambda ix: _one_shard(ix, "/etc/hostname"),
    "shard NUL": lambda ix: _one_shard(ix, "a\x00b"),
    "shard surrogate": lambda ix: _one_shard(ix, "\ud800.safetensors"),
    "shard is config": lambda ix: _one_shard(ix, "config.json"),
    "shard is index": lambda ix: _one_shard(ix, INDEX),
    "shard empty": lambda ix: _one_shard(ix, ""),
    "shard dot": lambda ix: _one_shard(ix, "."),
    "shard long": lambda ix: _one_shard(ix, "x" * 5000),
    "total_size str": lambda ix: _ensure(ix, "metadata").update(total_size="12"),
    "total_size huge": lambda ix: _ensure(ix, "metadata").update(total_size=RawJSON("9" * 4000)),
    "total_size bool": lambda ix: _ensure(ix, "metadata").update(total_size=True),
    "metadata list": lambda ix: ix.update(metadata=[1]),
}


def _one_shard(ix: dict, fname: str) -> None:
    wm = ix.get("weight_map")
    if isinstance(wm, dict) and wm:
        wm[next(iter(wm))] = fname


def _q(m: dict) -> dict:
    q = first(m.get("quantizers"))
    return q if isinstance(q, dict) else {}


def _t(m: dict) -> dict:
    t = first(m.get("tensors"))
    return t if isinstance(t, dict) else {}


def _f(m: dict) -> dict:
    f = first(m.get("files"))
    return f if isinstance(f, dict) else {}


MANIFEST_BREAKS = {
    "quantizers list": lambda m: m.update(quantizers=list(m["quantizers"].values()) if isinstance(m.get("quantizers"), dict)
                                          else []),
    "amax str": lambda m: _q(m).update(amax="0.5"),
    "amax huge int": lambda m: _q(m).update(amax=RawJSON("9" * 4000)),
    "amax 1e400": lambda m: _q(m).update(amax=RawJSON("1e400")),
    "amax NaN": lambda m: _q(m).update(amax=math.nan),
    "global_scale NaN": lambda m: _q(m).update(global_scale=math.nan),
    "global_scale Infinity": lambda m: _q(m).update(global_scale=math.inf),
    "global_scale huge int": lambda m: _q(m).update(global_scale=RawJSON("9" * 4000)),
    "global_scale tiny": lambda m: _q(m).update(global_scale=5e-324),
    "members non-strings": lambda m: _q(m).update(members=[1, None, ["x"]]),
    "members unknown": lambda m: _q(m).update(members=["no.such.weight"]),
    "quantizer missing": lambda m: _t(m).update(quantizer="no-such-quantizer"),
    "quantizer other": lambda m: _t(m).update(quantizer=list(m.get("quantizers") or {"x": 0})[-1]),
    "tensor names missing": lambda m: _t(m).update(weight="nope.weight", scale="nope.weight_scale"),
    "tensors list": lambda m: m.update(tensors=[]),
    "excluded dict": lambda m: m.update(excluded={"a": 1}),
    "excluded unknown": lambda m: m.update(excluded=[{"name": "nope", "reason": "x"}]),
    "files list": lambda m: m.update(files=[]),
    "files missing": lambda m: m.pop("files", None),
    "files entry str": lambda m: m["files"].update({"config.json": "abc"}) if isinstance(m.get("files"), dict) else None,
    "file size -1": lambda m: _f(m).update(size=-1),
    "file size str": lambda m: _f(m).update(size="1"),
    "file size huge": lambda m: _f(m).update(size=RawJSON("9" * 4000)),
    "file size float": lambda m: _f(m).update(size=1.0),
    "file sha upper": lambda m: _f(m).update(sha256=str(_f(m).get("sha256", "")).upper()),
    "file sha short": lambda m: _f(m).update(sha256="abc"),
    "file extra key": lambda m: _f(m).update(mtime=1),
    "files odd names": lambda m: (m.get("files") or {}).update({n: {"sha256": "0" * 64, "size": 0} for n in (
        "../x", "/etc/hostname", "a\\b", "a//b", "./x", MANIFEST, "sub/x.json", "\ud800", "\udcff", "a\x00b")})
        if isinstance(m.get("files"), dict) else None,
    "schema_version 1": lambda m: m.update(schema_version=1),
    "format other": lambda m: m.update(format="fp8" if m.get("format") == "nvfp4" else "nvfp4"),
    "flavor list": lambda m: m.update(flavor=["modelopt"]),
    "source files bad": lambda m: _ensure(m, "source").update(files={"x": {"sha256": 1}}),
}


def _targeted(breaks: dict, names: tuple[str, ...]):
    def mutate(rng, d):
        targets = [d / n for n in names if (d / n).is_file() and not (d / n).is_symlink()]
        if not targets:
            return None
        p = rng.choice(targets)
        key = rng.choice(sorted(breaks))
        if not edit_json_file(p, breaks[key]):
            return None
        return f"{p.name}: {key}"

    return mutate


MUTATIONS = {
    "flip-bit": (m_flip_bit, 6),
    "truncate": (m_truncate, 2),
    "json-value": (m_json_value, 5),
    "json-raw": (m_json_raw, 2),
    "header": (m_header, 4),
    "scale-values": (m_scale_values, 5),
    "replace-kind": (m_replace_kind, 2),
    "add": (m_add, 1),
    "delete": (m_delete, 1),
    "config": (_targeted(CONFIG_BREAKS, ("config.json",)), 3),
    "hf-quant-config": (_targeted(HF_BREAKS, ("hf_quant_config.json",)), 2),
    "index": (_targeted(INDEX_BREAKS, (INDEX,)), 3),
    "manifest": (_targeted(MANIFEST_BREAKS, (MANIFEST,)), 4),
}


# ---------------------------------------------------------------------------------------------
# the loop

@dataclass
class Crash:
    iteration: int
    base: str
    mutations: list[str]
    how: str  # which call: verify, verify+source, cli
    error: str
    where: str  # innermost shardquant frame (file:line function)
    trace: str


@dataclass
class Summary:
    iterations: int = 0
    checks: int = 0
    mutations: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # ok / violations / ShardquantError
    rules: Counter = field(default_factory=Counter)
    crashes: list[Crash] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # changed (but the manifest), unsealed copies that passed
    seconds: float = 0.0

    def kinds(self) -> Counter:
        return Counter(f"{c.error.split(':')[0]} at {c.where}" for c in self.crashes)

    def render(self) -> str:
        lines = [f"{self.iterations} iterations, {self.checks} verify runs in {self.seconds:.1f} s",
                 "mutations: " + ", ".join(f"{k} {n}" for k, n in sorted(self.mutations.items())),
                 "outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items())),
                 "rules found: " + ", ".join(f"{k} {n}" for k, n in self.rules.most_common())]
        lines.append(f"missed: {len(self.missed)} copies changed beyond their manifest passed verify with hashes")
        lines += [f"  {m}" for m in self.missed[:10]]
        if not self.crashes:
            lines.append("crashes: none")
        else:
            lines.append(f"CRASHES: {len(self.crashes)} ({len(self.kinds())} kinds)")
            for kind, n in self.kinds().most_common():
                c = next(c for c in self.crashes if f"{c.error.split(':')[0]} at {c.where}" == kind)
                lines += [f"  {n} x {kind}", f"    e.g. iteration {c.iteration} ({c.base}, {c.how}): "
                          f"{'; '.join(c.mutations)}", f"    {c.error[:300]}"]
        return "\n".join(lines)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise Hang if the block runs longer (main thread, POSIX only; elsewhere no limit)."""
    usable = hasattr(signal, "SIGALRM") and _main_thread()
    if not usable:
        yield
        return

    def on_alarm(_sig, _frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _where(tb) -> str:
    frames = [f for f in traceback.extract_tb(tb) if "shardquant" in f.filename and "fuzz_verify" not in f.filename]
    f = frames[-1] if frames else traceback.extract_tb(tb)[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}"


def check(d: Path, src: Path, rng: random.Random, summary: Summary) -> tuple[list[tuple[str, BaseException]], bool]:
    """Run verify on `d` the ways a user would; return ((how, exception) for every crash, whether
    the verify with hashes passed)."""
    crashes, hashed_ok = [], False
    hashes = rng.random() < 0.8
    runs = [("verify", lambda: verify(d, hashes=hashes))]
    if rng.random() < 0.15:
        runs.append(("verify+source", lambda: verify(d, str(src))))
    if rng.random() < 0.1:
        runs.append(("cli", lambda: _cli(d, rng)))
    for how, fn in runs:
        summary.checks += 1
        try:
            with time_limit(ITERATION_TIMEOUT_S):
                rep = fn()
        except ShardquantError:
            summary.outcomes["ShardquantError"] += 1
        except Exception as e:  # noqa: BLE001 - what the fuzzer exists to find
            crashes.append((how, e))
        else:
            if rep is not None:
                summary.outcomes["ok" if rep.ok else "violations"] += 1
                summary.rules.update({v.rule for v in rep.violations})
                hashed_ok |= how == "verify" and hashes and rep.ok
    return crashes, hashed_ok


def tree_digest(d: Path) -> str:
    """What the directory holds but the manifest (which nothing protects): every entry's path,
    kind, link target and bytes."""
    h = hashlib.sha256()
    for top, dirs, names in os.walk(d):
        dirs.sort()
        for n in sorted(dirs + names):
            p = Path(top) / n
            if p == d / MANIFEST:
                continue
            h.update(os.fsencode(p.relative_to(d).as_posix()) + b"\0")
            if p.is_symlink():
                h.update(b"L" + os.fsencode(os.readlink(p)))
            elif p.is_file():
                h.update(b"F" + hashlib.sha256(p.read_bytes()).digest())
            else:
                h.update(b"D" if p.is_dir() else b"S")
    return h.hexdigest()


class CliCrash(Exception):
    pass


def _cli(d: Path, rng: random.Random):
    """The CLI, in process: any exception but SystemExit, or a traceback in its output, is a crash."""
    args = ["verify", str(d)] + (["--no-hashes"] if rng.random() < 0.3 else [])
    with tempfile.TemporaryDirectory() as t:
        args += ["--json", str(Path(t) / "r.json")]
        r = CliRunner().invoke(cli_main, args)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        if r.exit_code not in (0, 1) or "Traceback" in r.output:
            raise CliCrash(f"exit {r.exit_code}: {r.output[-300:]}")
        if r.exit_code in (0, 1) and not r.output.startswith("error:"):
            json.loads((Path(t) / "r.json").read_text())  # the report it wrote is JSON
    return None


def iteration(i: int, seed: int, src: Path, bases: dict[str, Path], work: Path, summary: Summary,
              show: bool = False) -> None:
    rng = random.Random(f"{seed}:{i}")
    base = rng.choice(sorted(bases))
    d = work / f"it{i}"
    shutil.copytree(bases[base], d, symlinks=True)
    done = []
    before = tree_digest(d)
    names, weights = zip(*[(k, w) for k, (_, w) in MUTATIONS.items()])
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        kind = rng.choices(names, weights)[0]
        try:
            what = MUTATIONS[kind][0](rng, d)
        except RecursionError:  # the document is already nested too deep for json.dumps to write
            what = None
        if what is not None:
            summary.mutations[kind] += 1
            done.append(what)
    sealed = rng.random() < 0.3
    if sealed:
        seal(d)
        done.append("sealed")
    if show:
        print(f"iteration {i} on {base}: " + "; ".join(done))
    changed = tree_digest(d) != before
    crashes, hashed_ok = check(d, src, rng, summary)
    # (a copy whose manifest is gone protects nothing: only a config naming shardquant tells, see
    # shardquant/verify.py; that is tested in tests/test_verify.py, not counted here)
    protected = (bases[base] / MANIFEST).is_file() and (d / MANIFEST).is_file() and not (d / MANIFEST).is_symlink()
    if hashed_ok and changed and not sealed and protected:
        summary.missed.append(f"iteration {i} ({base}): {'; '.join(done)}")
    for how, e in crashes:
        summary.crashes.append(Crash(i, base, done, how, f"{type(e).__name__}: {e}"[:2000], _where(e.__traceback__),
                                     "".join(traceback.format_exception(e))))
    summary.iterations += 1
    shutil.rmtree(d, ignore_errors=True)
    for p in work.glob("outside-*"):
        p.unlink()


def fuzz(iterations: int, seed: int, work: Path, *, built: tuple[Path, dict[str, Path]] | None = None,
         replay: int | None = None, progress: bool = False) -> Summary:
    """Run `iterations` seeded iterations (or only iteration `replay`) on copies of the bases
    (`built`, as build_bases returns them; built under `work` when not given)."""
    t0 = time.perf_counter()
    src, bases = built or build_bases(work / "bases")
    summary = Summary()
    todo = [replay] if replay is not None else range(iterations)
    for n, i in enumerate(todo):
        iteration(i, seed, src, bases, work, summary, show=replay is not None)
        if progress and (n + 1) % 100 == 0:
            print(f"... {n + 1} iterations, {len(summary.crashes)} crashes", file=sys.stderr, flush=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", type=int, default=None, metavar="I",
                    help="Run only iteration I, showing its mutations.")
    ap.add_argument("--traces", action="store_true", help="Print the full traceback of one crash of each kind.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-verify-") as t:
        summary = fuzz(args.iterations, args.seed, Path(t), replay=args.replay, progress=True)
    print(summary.render())
    if args.traces or args.replay is not None:
        seen = set()
        for c in summary.crashes:
            if c.where not in seen:
                seen.add(c.where)
                print(f"\n--- iteration {c.iteration}, {c.how}: {'; '.join(c.mutations)}\n{c.trace}")
    sys.exit(1 if summary.crashes or summary.missed else 0)


if __name__ == "__main__":
    main()
