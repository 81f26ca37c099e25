"""`verify`: prove that a quantized checkpoint is what engines load, whoever wrote it (shardquant,
ModelOpt, llm-compressor), and, given its source, how close it is.

Two levels, one API (the CLI's `shardquant verify DIR [--source SRC]` mirrors `verify()`):

- `verify_contract(path, hashes=True) -> list[Violation]`: every file of the directory against the
  scale manifest's `files` table (present, a regular file, its size and, unless hashes=False, its
  SHA-256; no file the table does not list), and the FORMATS.md contract, from the index, the shard
  headers and the small scale tensors only (never a packed weight): flavor and format announced,
  every quantized module's tensors with the right dtypes and shapes, one global scale and one
  precision per fused set, no NaN/Inf/zero global scale, no NaN block scale, excluded modules without
  scales and every high-precision linear excluded, index and shards in agreement, and the scale
  manifest (when there is one) valid against `manifest.schema.json` and true to the tensors.
- `verify(path, source=None, hashes=True) -> Report`: the same, plus with a source every quantized tensor
  dequantized and compared with its source tensor (SQNR, relative RMS error), one tensor at a time;
  kept tensors are compared byte for byte.

Whatever the directory holds (malformed JSON of any type or depth, absurd scales, truncated or
swapped files, symlinks, directories), what verify finds is a Violation; the only exception it
raises is a ShardquantError (the path is not a readable directory; with a source, the source's own
errors). Every value read from a config, the index or the manifest is type-checked where it is used.

Global-scale convention: s2 is ModelOpt's `weight_scale_2` (W ~ e2m1 * f32(e4m3 block scale) * s2).
compressed-tensors stores `weight_global_scale` = 1/s2; we dequantize with s2 = fl32(1 / stored), as
vLLM inverts it back (one ulp from the producer's s2 at most: far below NVFP4's own error).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
import os
import re
import reprlib
import stat
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import decode, formats, manifest, trace
from .background import in_background
from .errors import HeaderError, ShardquantError, SourceError
from .flavors import FLAVORS, Flavor
from .formats.base import to_f32
from .rules import BUILTIN_RULES, FLOAT_DTYPES, QUANTIZE, Decision, RuleSet
from .source import INDEX_NAME, SINGLE_NAME, _hub_blob, _inside, _read_json, open_checkpoint, with_decoded
from .report import Report, TensorStat, Violation
from .st import TensorInfo, read_header, read_raw

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
# Default --min-sqnr floors (dB), and the spellings of each format in each flavor, other producers'
# included: all from the format declarations (formats/base.py Format).
DEFAULT_MIN_SQNR = {name: formats.declared(name).min_sqnr for name in formats.FORMATS}
CT_FORMATS = {spelling: name for name in formats.FORMATS
              for spelling in formats.declared(name).reads.get("compressed-tensors", ())}
MODELOPT_ALGOS = {spelling: name for name in formats.FORMATS
                  for spelling in formats.declared(name).reads.get("modelopt", ())}
BLOCK_FP8_METHODS = {spelling: name for name in formats.FORMATS
                     for spelling in formats.declared(name).reads.get("block-fp8", ())}
# `<m>.<role>` and TransformerEngine's grouped `<m>.<role>{E}` (roles longest first: weight_scale_20
# is expert 0's weight_scale_2, weight_scale2 expert 2's weight_scale).
_ROLE = re.compile(r"(?P<base>.+)\.(?P<role>weight_scale_2|weight_global_scale|weight_scale_inv|weight_scale|"
                   r"weight_packed|weight_shape|input_global_scale|input_scale|weight)(?P<idx>\d*)")
_LAYER = re.compile(r"(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<rest>.*)")
_EXPERT_IDX = re.compile(r"\.experts\.\d+\.")
_LINEAR_KEEPS = ("head", "router", "shared_expert_gate", "unclaimed")  # kept rows that are linears
# verify --source compares a tensor this many elements at a time (1 MiB of fp32: a few such
# temporaries per thread stay in cache; fewer, larger NumPy calls keep threads off the GIL).
BAND_ELEMENTS = 1 << 18
HASH_CHUNK = 16 << 20  # bytes read per hashlib update (hashlib releases the GIL while it hashes)
HASH_THREADS = 8  # files hashed at once (at most; never more than the CPUs)
# verify --source on the GPU: threads that read, upload and check scales. On the H200 machine 4 reach
# 0.85 of the cold read of source + output, 8 only 0.66 and 16 0.76 (more readers of two files at
# once seek more; docs/benchmarks/README.md, 2026-12-03).
GPU_THREADS = 4
MAX_MANIFEST_DEPTH = 16  # a valid manifest nests 4 deep; deeper is refused before schema validation
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Values from a config, the index or the manifest shown in a message: bounded in length and depth.
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel, _REPR.maxlong = 120, 60, 8, 4, 3, 40
short_repr = _REPR.repr
FLT_MIN = float(np.finfo(np.float32).tiny)


# ---------------------------------------------------------------------------------------------
# what the checkpoint says about itself

@dataclass(frozen=True)
class Announced:
    flavor: str | None
    format: str | None
    producer: str | None
    exclude: tuple[str, ...]
    quant_algo: str | None = None  # ModelOpt's, e.g. NVFP4 (W4A4: input_scale required)
    schemes: tuple = ()  # compressed-tensors: (weights strategy, activations "dynamic-token" | "static" | None)
    targets: tuple = ()  # compressed-tensors with several config groups: ((format, targets, scheme), ...)

    @property
    def formats(self) -> tuple[str, ...]:
        """Every format the checkpoint announces (more than one: mixed precision)."""
        if self.targets:
            return tuple(dict.fromkeys(f for f, _, _ in self.targets if f is not None))
        return (self.format,) if self.format else ()

    def format_of(self, module: str) -> str | None:
        """The format a module takes, resolved as the engines resolve config groups (docs/formats.md
        1.2): a target naming the module (exactly or `re:`, matched at its start) before a class-name
        target (`Linear`: any linear). None: no group targets it."""
        return self._group_of(module)[0]

    def scheme_of(self, module: str) -> tuple:
        return self._group_of(module)[1] if self.targets else (self.schemes[0] if self.schemes else (None, None))

    def _group_of(self, module: str) -> tuple:
        if not self.targets:
            return self.format, None
        for by_name in (True, False):
            for fmt, targets, scheme in self.targets:
                for t in targets:
                    if t == "Linear":
                        hit = not by_name
                    elif t.startswith("re:"):
                        rx = _regex(t[3:])
                        hit = by_name and rx is not None and rx.match(module) is not None
                    else:
                        hit = by_name and t == module
                    if hit:
                        return fmt, scheme
        return None, None


def _strategy(w: object) -> str | None:
    return w.get("strategy") if isinstance(w, dict) and isinstance(w.get("strategy"), str) else None


def _act(a: object) -> str | None:
    if not isinstance(a, dict):
        return None
    return f"dynamic-{a.get('strategy')}" if a.get("dynamic") is True else "static"


def announced(root: Path, found: list[Violation], warnings: list[str], prefer: frozenset[str] = frozenset()) -> Announced:
    """Flavor, format, producer and exclude list from config.json and hf_quant_config.json. `prefer`:
    the formats a scale manifest names, which decide between formats spelled alike (fp8 and
    fp8-channel are both compressed-tensors `channel` weights)."""
    cfg = _json(root / "config.json", found) or {}
    hf = _json(root / "hf_quant_config.json", found)
    qc = cfg.get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    if "quantization_config" in cfg and not isinstance(cfg["quantization_config"], dict):
        found.append(Violation("config", "config.json", "quantization_config is not an object"))
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        ann = _announced_ct(qc, found, prefer)
    elif isinstance(method, str) and method in BLOCK_FP8_METHODS and hf is None:
        ann = _announced_block_fp8(qc, found)
    elif method == "modelopt" or hf is not None:
        if method not in ("modelopt", None):  # engines pick the method from config.json
            found.append(Violation("config", "config.json", f"quant_method {short_repr(method)}, but "
                                   "hf_quant_config.json announces ModelOpt"))
        ann = _announced_modelopt(qc, hf, found, warnings)
    else:
        why = f"quant_method {short_repr(method)}" if method else "no quantization_config and no hf_quant_config.json"
        found.append(Violation("config", "config.json", f"not a modelopt, compressed-tensors or block-fp8 checkpoint "
                               f"({why})"))
        return Announced(None, None, None, ())
    for pat in ann.exclude:
        if pat.startswith("re:") and _regex(pat[3:]) is None:
            found.append(Violation("config", "config.json", f"exclude pattern {short_repr(pat)} is not a valid "
                                   "regular expression (it excludes nothing)"))
    return ann


def _json(path: Path, found: list[Violation]) -> dict | None:
    if not path.exists():
        return None
    try:
        return _read_json(path)
    except HeaderError as e:
        found.append(Violation("config", path.name, str(e)))
        return None


def _announced_ct(qc: dict, found: list[Violation], prefer: frozenset[str] = frozenset()) -> Announced:
    groups = qc.get("config_groups", {})
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        found.append(Violation("config", "config.json", "quantization_config.config_groups must map names to objects"))
        groups = groups if isinstance(groups, dict) else {}
    groups = {k: g for k, g in groups.items() if isinstance(g, dict)}
    names = [qc.get("format")] + [g.get("format") for g in groups.values()]
    if any(n is not None and not isinstance(n, str) for n in names):  # engines parse it as a string
        found.append(Violation("config", "config.json", "a compressed-tensors format that is not a string"))
    top = qc.get("format") if isinstance(qc.get("format"), str) else None
    per_group = []  # (format, targets, scheme) of each config group
    for gname, g in groups.items():
        spelling = g.get("format") if isinstance(g.get("format"), str) else top
        strategy = _strategy(g.get("weights"))
        fmt = _ct_format(spelling, strategy, prefer) if spelling and spelling != "mixed-precision" else None
        if fmt is None:
            found.append(Violation("config", "config.json", f"config group {short_repr(gname)}: compressed-tensors "
                                   f"format {short_repr(spelling)} with weights strategy {short_repr(strategy)}: "
                                   f"verify supports one of {', '.join(CT_FORMATS)}"))
        targets = g.get("targets", ["Linear"])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            found.append(Violation("config", "config.json", f"config group {short_repr(gname)}: targets must be "
                                   "a list of names"))
            targets = []
        per_group.append((fmt, tuple(targets), (strategy, _act(g.get("input_activations")))))
    if not per_group:
        fmt = _ct_format(top, None, prefer) if top not in (None, "mixed-precision") else None
        if fmt is None:
            found.append(Violation("config", "config.json", f"compressed-tensors format {short_repr(top)} and no "
                                   f"config groups: verify supports one of {', '.join(CT_FORMATS)}"))
        per_group.append((fmt, ("Linear",), (None, None)))
    fmts = {f for f, _, _ in per_group if f is not None}
    fmt = next(iter(fmts)) if len(fmts) == 1 else None
    if qc.get("quantization_status") != "compressed":
        found.append(Violation("config", "config.json", f"quantization_status "
                               f"{short_repr(qc.get('quantization_status'))}, expected 'compressed'"))
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        found.append(Violation("config", "config.json", "quantization_config.ignore must be a list of names"))
        ignore = []
    version = qc.get("version")  # llm-compressor writes compressed-tensors' version, no producer
    version = version if isinstance(version, str) and version else None
    producer = _producer(qc.get("producer")) or (f"compressed-tensors {short_repr(version)[1:-1]}" if version else None)
    schemes = tuple(sch for _, _, sch in per_group)
    mixed = tuple(per_group) if len(fmts) > 1 else ()
    return Announced("compressed-tensors", fmt, producer, tuple(ignore), schemes=schemes, targets=mixed)


def _ct_format(spelling: str, strategy: str | None, prefer: frozenset[str] = frozenset()) -> str | None:
    """The format a compressed-tensors format name means with this weights strategy, as the
    declarations spell and read it: a format whose own spelling has this strategy first (the one a
    manifest names, else the one without a shared per-quantizer scale: per-row scales are the general
    reading of `channel`), else by tiles or not (`float-quantized` with `block` is fp8-block, with
    `tensor` fp8)."""
    names = [n for n in formats.FORMATS if spelling in formats.declared(n).reads.get("compressed-tensors", ())]
    own = [n for n in names
           if ((formats.declared(n).compressed_tensors or {}).get("weights") or {}).get("strategy") == strategy]
    if own:
        return next((n for n in own if n in prefer), min(own, key=lambda n: formats.declared(n).quantizer_scale))
    for n in names:
        if bool(formats.declared(n).block) == (strategy == "block"):
            return n
    return names[0] if names else None


def _announced_block_fp8(qc: dict, found: list[Violation]) -> Announced:
    """`quant_method: "fp8"` (docs/formats.md 1.3 and 5.1): served data-free only with dynamic activations
    and an explicit `weight_block_size` equal to the format's tile; exclusions are `ignored_layers`
    (vLLM's first choice) and `modules_to_not_convert` (transformers'), both read."""
    fmt = BLOCK_FP8_METHODS[qc["quant_method"]]
    want = formats.declared(fmt).spelling("block-fp8")
    for key in ("activation_scheme", "weight_block_size"):
        if qc.get(key) != want[key]:
            found.append(Violation("config", "config.json", f"quant_method fp8 with {key} {short_repr(qc.get(key))}: "
                                   f"verify supports {fmt} ({key} {want[key]!r}; docs/formats.md 5.1)"))
    exclude: set[str] = set()
    for key in ("ignored_layers", "modules_to_not_convert"):
        v = qc.get(key, [])
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            found.append(Violation("config", "config.json", f"quantization_config.{key} must be a list of names"))
        else:
            exclude |= set(v)
    return Announced("block-fp8", fmt, _producer(qc.get("producer")), tuple(sorted(exclude)))


def _announced_modelopt(qc: dict, hf: dict | None, found: list[Violation], warnings: list[str]) -> Announced:
    if hf is not None and not isinstance(hf.get("quantization"), dict):
        found.append(Violation("config", "hf_quant_config.json", "no quantization object"))
    hf = hf or {}
    hq = hf.get("quantization") if isinstance(hf.get("quantization"), dict) else {}
    algos = {a if isinstance(a, str) else short_repr(a) for a in (hq.get("quant_algo"), qc.get("quant_algo"))
             if a is not None}
    algo = next(iter(algos)) if len(algos) == 1 else None
    if len(algos) > 1:
        found.append(Violation("config", "hf_quant_config.json", f"quant_algo {sorted(algos)} differs between "
                               "hf_quant_config.json and config.json"))
    elif algo not in MODELOPT_ALGOS:  # MIXED_PRECISION (per-layer algorithms) included
        found.append(Violation("config", "hf_quant_config.json", f"quant_algo {short_repr(algo)}: verify supports "
                               f"{', '.join(MODELOPT_ALGOS)}"))
    fmt = MODELOPT_ALGOS.get(algo)
    lists = {}
    # hf_quant_config.json must carry exclude_modules (never null); config.json's ignore is optional
    for where, d, key, required in (("hf_quant_config.json", hq, "exclude_modules", bool(hq)),
                                    ("config.json", qc, "ignore", False)):
        if key not in d and not required:
            continue
        v = d.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            found.append(Violation("config", where, f"{key} must be a list of module names (never null)"))
        else:
            lists[where] = v
    if len(lists) == 2 and set(lists["hf_quant_config.json"]) != set(lists["config.json"]):
        warnings.append("hf_quant_config.json exclude_modules and config.json ignore differ; using both")
    exclude = tuple(sorted({x for v in lists.values() for x in v}))
    producer = _producer(hf.get("producer") or qc.get("producer"))
    return Announced("modelopt", fmt, producer, exclude, algo)


def _producer(p: object) -> str | None:
    """`name version` from a producer object whose fields are strings (or numbers)."""
    if isinstance(p, dict):
        parts = [p[k] for k in ("name", "version") if isinstance(p.get(k), (str, int, float))
                 and not isinstance(p.get(k), bool)]
        return " ".join(short_repr(x)[1:-1] if isinstance(x, str) else short_repr(x) for x in parts) or None
    return None


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern | None:
    """A `re:` exclude pattern compiled, or None when it is not a regular expression Python accepts
    (unbalanced, a repeat count too large, nested too deep)."""
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError):
        return None


def excluded(module: str, patterns: tuple[str, ...], flavor: str | None) -> bool:
    """Does an exclude list name this module? compressed-tensors (vLLM's should_ignore_layer): an
    exact name or a `re:` pattern matched from the start. ModelOpt (vLLM's is_layer_excluded): an
    exact name, a wildcard (fnmatch), or a dotted part of the name (`lm_head`, `mlp.gate`)."""
    for p in patterns:
        if p.startswith("re:"):
            rx = _regex(p[3:])
            if rx is not None and rx.match(module):
                return True
        elif p == module:
            return True
        elif flavor == "modelopt" and (fnmatch.fnmatchcase(module, p) or f".{p}." in f".{module}."):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# index and shards

def read_tensors(root: Path, found: list[Violation], warnings: list[str]) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint (in file and offset order), checking index against shards."""
    index_path = root / INDEX_NAME
    if not index_path.exists():
        files = [root / SINGLE_NAME] if (root / SINGLE_NAME).exists() else sorted(root.glob("*.safetensors"))
        if len(files) != 1:
            found.append(Violation("index", INDEX_NAME, f"no index, and {len(files)} .safetensors files"))
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            tensors.update(_header(f, found))
        return _ordered(tensors)
    try:
        index = _read_json(index_path)
    except HeaderError as e:
        found.append(Violation("index", INDEX_NAME, str(e)))
        return {}
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        found.append(Violation("index", INDEX_NAME, "no valid weight_map (name -> file)"))
        return {}
    headers: dict[str, dict[str, TensorInfo]] = {}
    for fname in sorted(set(wm.values())):
        try:
            path = _inside(root, fname, index_path)
        except HeaderError as e:
            found.append(Violation("index", fname, str(e)))
            continue
        if not path.exists():
            found.append(Violation("index", fname, "shard named by the index does not exist"))
            continue
        headers[fname] = _header(path, found)
    tensors = {}
    for name, fname in wm.items():
        if fname in headers:
            if name in headers[fname]:
                tensors[name] = headers[fname][name]
            else:
                found.append(Violation("index", name, f"named by the index in {fname}, which does not hold it"))
    for fname, hdr in headers.items():
        for name in hdr:
            if wm.get(name) != fname:
                where = f"mapped to {wm[name]}" if name in wm else "missing from the index"
                found.append(Violation("index", name, f"in shard {fname} but {where}"))
    meta = index.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    actual = sum(t.nbytes for hdr in headers.values() for t in hdr.values())
    if total is None:
        warnings.append(f"{INDEX_NAME}: no metadata.total_size")
    elif type(total) is not int:
        found.append(Violation("index", INDEX_NAME, f"metadata.total_size {short_repr(total)} is not an integer"))
    elif total != actual:
        found.append(Violation("index", INDEX_NAME, f"metadata.total_size {short_repr(total)} != {actual} bytes "
                               "of tensor data"))
    stray = sorted(p.name for p in root.glob("*.safetensors") if p.name not in set(wm.values()))
    if stray:
        warnings.append(f"shard file(s) not named by the index (engines ignore them): {', '.join(stray[:5])}")
    return _ordered(tensors)


def _header(path: Path, found: list[Violation]) -> dict[str, TensorInfo]:
    try:
        return read_header(path)
    except HeaderError as e:
        found.append(Violation("index", path.name, str(e)))
        return {}


def _ordered(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    return {t.name: t for t in sorted(tensors.values(), key=lambda t: (t.file.name, t.offset))}


# ---------------------------------------------------------------------------------------------
# modules: a weight and the tensors that quantize it

@dataclass
class Module:
    base: str  # `m` of `m.weight`, or of TransformerEngine's `m.weight{E}`
    idx: str  # "" or TE's expert index
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # role -> tensor

    @property
    def name(self) -> str:
        """How reports name it: the module, or for TE grouped weights `m.weight{E}`."""
        return f"{self.base}.weight{self.idx}" if self.idx else self.base

    @property
    def source_name(self) -> str:
        return f"{self.base}.weight{self.idx}"

    @property
    def quantized(self) -> bool:
        w = self.tensors.get("weight")
        return any(r != "weight" for r in self.tensors) or (w is not None and w.dtype not in FLOAT_DTYPES)


def modules(tensors: dict[str, TensorInfo]) -> dict[str, Module]:
    """source weight name -> Module, in checkpoint order."""
    out: dict[str, Module] = {}
    for name, t in tensors.items():
        m = _ROLE.fullmatch(name)
        if m is None:
            continue
        key = f"{m['base']}.weight{m['idx']}"
        out.setdefault(key, Module(m["base"], m["idx"])).tensors[m["role"]] = t
    return out


# ModelOpt algos that mean static activation scales: without input_scale the engines compute garbage
# (docs/formats.md: NVFP4 W4A4 zeroed every expert in older vLLM; FP8 gives zeros in vLLM and SGLang).
_STATIC_INPUT_ALGOS = ("NVFP4", "FP8")


def _roles(fl: Flavor, fmt: str, quant_algo: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(required role -> dtype, optional role -> dtype) of a quantized module, from the format's
    declaration (formats/base.py Format) as this flavor names it."""
    f = formats.declared(fmt)
    req = {fl.weight_name(fmt): f.weight_dtype, fl.scale_name: f.scale_dtype}
    if f.global_scale:
        req[fl.global_name] = "F32"
    opt = {fl.input_name(fmt): "F32"}
    if f.elems_per_byte > 1:
        opt["weight_shape"] = ""  # compressed-tensors records the unpacked shape
    if fl.name == "modelopt" and quant_algo in _STATIC_INPUT_ALGOS:
        req.update({k: v for k, v in opt.items() if k == fl.input_name(fmt)})
        opt.pop(fl.input_name(fmt))
    return req, opt


def _check_module(m: Module, fl: Flavor, fmt: str, quant_algo: str | None) -> list[Violation]:
    req, opt = _roles(fl, fmt, quant_algo)
    out = []
    missing = [r for r in req if r not in m.tensors]
    extra = [r for r in m.tensors if r not in req and r not in opt]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(extra)} for {fl.name} {fmt}"] if extra else [])
        out.append(Violation("tensors", m.name, "; ".join(parts)))
    bad = []
    for role, dtype in {**req, **opt}.items():
        t = m.tensors.get(role)
        if t is not None and dtype and t.dtype != dtype and not (role == fl.scale_name and _widened_scale(dtype, t.dtype)):
            bad.append(f"{role} is {t.dtype}, expected {dtype}")
    f = formats.declared(fmt)
    w, s = m.tensors.get(fl.weight_name(fmt)), m.tensors.get(fl.scale_name)
    if w is not None and len(w.shape) != 2:
        bad.append(f"weight shape {list(w.shape)} is not 2-D")
    elif w is not None and f.block:
        if s is not None and s.shape != f.scale_shape(w.shape):
            bad.append(f"{fl.scale_name} {list(s.shape)} does not fit weight {list(w.shape)} "
                       f"(expected {list(f.scale_shape(w.shape))}: one scale per {f.block[0]}x{f.block[1]} tile)")
    elif w is not None and f.block_size:
        rows, cols = w.shape
        width = cols * f.elems_per_byte
        if width % f.block_size:
            bad.append(f"weight {list(w.shape)}: input dim {width} is not a multiple of {f.block_size}")
        elif s is not None and s.shape != (rows, width // f.block_size):
            bad.append(f"weight_scale {list(s.shape)} does not fit weight {list(w.shape)} "
                       f"(expected {[rows, width // f.block_size]})")
    elif w is not None and s is not None and s.shape not in ((), (1,), (w.shape[0],), (w.shape[0], 1)):
        bad.append(f"weight_scale {list(s.shape)}: expected [], [1] or per-channel [{w.shape[0]}, 1]")
    g = m.tensors.get(fl.global_name) if f.global_scale else None
    if g is not None and g.shape != fl.scalar_shape:
        bad.append(f"{fl.global_name} shape {list(g.shape)}, expected {list(fl.scalar_shape)}")
    for role in ("input_scale", "input_global_scale"):
        t = m.tensors.get(role)
        if t is not None and t.numel != 1:
            bad.append(f"{role} shape {list(t.shape)}, expected one value")
    if bad:
        out.append(Violation("dtype-shape", m.name, "; ".join(bad)))
    return out


def _global_value(m: Module, fl: Flavor, fmt: str) -> np.float32 | None:
    """The per-quantizer fp32 scale as stored (NVFP4's weight_scale_2 or weight_global_scale, FP8's
    per-tensor weight_scale), or None if absent or malformed."""
    role = fl.per_quantizer_name(fmt)
    t = m.tensors.get(role) if role else None  # block scales only: none
    if t is None or t.dtype != "F32" or t.numel < 1 or t.numel > 1 << 20 or len(t.shape) > 2:
        return None
    vals = read_raw(t).reshape(-1)
    if t.numel > 1 and not np.all(vals.view(np.uint32) == vals.view(np.uint32)[0]):
        return None  # truly per-channel: no single per-quantizer value
    return np.float32(vals[0])  # one value, or one value per row (compressed-tensors `channel` spelling)


def _global_problem(v: np.float32, fl: Flavor, fmt: str) -> str | None:
    """What is wrong with a stored per-quantizer scale, or None. Beyond NaN, Inf, zero and negative:
    the scale an engine multiplies by (s2; compressed-tensors' NVFP4 stores 1/s2) must be a normal
    fp32 (formats/nvfp4.py and formats/fp8.py write 1.0 rather than a subnormal), and the largest
    code times it (6 x 448 for NVFP4, 448 for FP8) must not overflow fp32."""
    if not (np.isfinite(v) and v > 0):
        return f"global scale {float(v)!r}"
    with np.errstate(over="ignore", divide="ignore"):
        inverse = fl.inverted(fmt)
        s2 = np.float32(1) / v if inverse else v
        top = s2 * np.float32(formats.declared(fmt).max_scaled)
    what = f"global scale {float(v)!r}" + (f" (s2 = 1/it = {float(s2)!r})" if inverse else "")
    if v < FLT_MIN:
        return f"{what} is subnormal"
    if not np.isfinite(s2) or s2 < FLT_MIN:
        return f"{what}: s2 is {'subnormal' if np.isfinite(s2) else 'not finite'}"
    if not np.isfinite(top):
        return f"{what}: the largest code times it overflows fp32"
    return None


def _check_scales(m: Module, fl: Flavor, fmt: str) -> list[Violation]:
    """Global scale finite, positive, normal and not overflowing (see _global_problem); no NaN or
    negative block scale (E4M3 has no Inf: 0x7F/0xFF are NaN; sign bit set: a block of flipped
    signs); FP8 per-channel scales finite and positive."""
    out = []
    v = _global_value(m, fl, fmt)
    why = _global_problem(v, fl, fmt) if v is not None else None
    if why:
        out.append(Violation("global-scale", m.name, why))
    s = m.tensors.get(fl.scale_name)
    f = formats.declared(fmt)
    if (f.block or f.granularity == "row") and s is not None and s.dtype in FLOAT_DTYPES:  # tile or row scales
        vals = to_f32(read_raw(s), s.dtype)
        bad = int(np.count_nonzero(~(np.isfinite(vals) & (vals > 0))))
        if bad:
            what = "tile" if f.block else "row"
            out.append(Violation("block-scale", m.name, f"{bad} of {s.numel} {what} scales NaN, Inf or <= 0"))
    elif f.block_size and s is not None and s.dtype == "U8":  # E8M0 block scales (docs/formats.md, MX)
        codes = read_raw(s)
        nan, zero = int(np.count_nonzero(codes == 0xFF)), int(np.count_nonzero(codes == 0))
        bad = [f"{nan} of {s.numel} E8M0 block scales are NaN (255)"] if nan else []
        bad += [f"{zero} of {s.numel} E8M0 block scales are byte 0 (read as 0 by vLLM's upcast)"] if zero else []
        if bad:
            out.append(Violation("block-scale", m.name, "; ".join(bad)))
    elif f.block_size and s is not None and s.dtype == "F8_E4M3":
        codes = read_raw(s)
        nan = int(np.count_nonzero((codes & 0x7F) == 0x7F))
        neg = int(np.count_nonzero((codes > 0x80) & (codes < 0xFF)))
        bad = [f"{nan} of {s.numel} block scales are NaN"] if nan else []
        bad += [f"{neg} of {s.numel} block scales are negative"] if neg else []
        if bad:
            out.append(Violation("block-scale", m.name, "; ".join(bad)))
    elif not f.block_size and s is not None and s.dtype in FLOAT_DTYPES and s.numel > 1 and not why:
        vals = to_f32(read_raw(s), s.dtype)
        bad = int(np.count_nonzero(~(np.isfinite(vals) & (vals > 0))))
        if bad:
            out.append(Violation("global-scale", m.name, f"{bad} of {s.numel} per-channel scales NaN, Inf or <= 0"))
    return out


# ---------------------------------------------------------------------------------------------
# files against the manifest

@dataclass
class _FileCheck:
    """The file check of one directory: violations found from names and sizes, and the SHA-256 of
    every file whose size matched, being computed on a thread pool while the contract is checked."""

    found: list[Violation] = field(default_factory=list)
    listed: int | None = None  # files the manifest lists; None: no usable files table, nothing checked
    hashed: bool = False
    pending: list[tuple[str, str, Future]] = field(default_factory=list)  # (name, manifest sha256, job)
    pool: ThreadPoolExecutor | None = None

    def finish(self) -> list[Violation]:
        """Every file violation, in name order (waits for the hashes)."""
        try:
            for name, want, job in self.pending:
                try:
                    got = job.result()
                except OSError as e:
                    self.found.append(Violation("file-integrity", name, f"cannot read ({e.strerror or e})"))
                    continue
                if got != want:
                    self.found.append(Violation("file-integrity", name, "sha256 differs from the manifest"))
        finally:
            self.close()
        return sorted(self.found, key=lambda v: (v.rule, v.name))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _plain_name(name: object) -> bool:
    """A manifest `files` key naming a file inside the directory: relative, `/`-separated, no empty,
    `.` or `..` part, no NUL or backslash, and encodable as a file name."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    if any(part in ("", ".", "..") for part in name.split("/")):
        return False
    try:
        os.fsencode(name)
    except UnicodeEncodeError:  # an unpaired surrogate outside the surrogateescape range
        return False
    return True


def _file_entry(e: object) -> tuple[int, str] | None:
    """(size, sha256) of a `files` entry as the schema defines it ({"sha256": 64 lowercase hex
    digits, "size": integer >= 0}; like JSON Schema, 5.0 is an integer), or None."""
    if not isinstance(e, dict) or set(e) != {"sha256", "size"}:
        return None
    size, sha = e["size"], e["sha256"]
    if isinstance(size, float) and size.is_integer():
        size = int(size)
    if type(size) is not int or size < 0 or not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        return None
    return size, sha


def _lstat_file(root: Path, name: str) -> tuple[str | None, os.stat_result | None]:
    """(what is wrong, None) or (None, lstat) for a listed file: a regular file, reached through real
    directories (never a symlink, at any level)."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        folder = "/".join(parts[:i])
        try:
            st = os.lstat(root / folder)
        except OSError:
            return "missing", None
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            return f"missing ({folder} is {kind})", None
    try:
        st = os.lstat(root / name)
    except (FileNotFoundError, NotADirectoryError):
        return "missing", None
    except OSError as e:
        return f"cannot stat ({e.strerror or e})", None
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(root / name))
        if not _hub_blob(root, target):
            return "is a symlink, not a file", None
        try:  # a hub cache snapshot: its files are links into the repo's own blobs/ folder
            st = os.stat(target)
        except OSError as e:
            return f"cannot stat ({e.strerror or e})", None
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file", None
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file", None
    return None, st


def _blob_or_self(root: Path, name: str) -> Path:
    """The file to hash: a hub snapshot's link into its repo's blobs/ is read at its target (checked
    in _lstat_file); anything else as named, never through a link."""
    p = root / name
    if p.is_symlink():
        target = Path(os.path.realpath(p))
        if _hub_blob(root, target):
            return target
    return p


def _sha256(path: Path) -> str:
    """SHA-256 of a regular file, 16 MiB at a time. Opened without following a symlink and without
    blocking (a FIFO put there since the lstat); raises OSError."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        h = hashlib.sha256()
        buf = bytearray(min(HASH_CHUNK, max(st.st_size, 1)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _start_files(root: Path, man: dict | None, hashes: bool, warnings: list[str],
                 ignore: frozenset[str] = frozenset()) -> _FileCheck:
    """Check every file of `root` against the manifest's `files` table: names, types and sizes now;
    the SHA-256 of each file of the right size (unless `hashes` is False) started on a thread pool."""
    fc = _FileCheck()
    files = man.get("files") if man is not None else None
    if man is not None and not isinstance(files, dict):
        warnings.append(f"{manifest.MANIFEST_NAME} has no valid files table: file sizes and SHA-256 not checked")
    if not isinstance(files, dict):
        return fc
    listed: dict[str, tuple[int, str] | None] = {}
    for name, e in files.items():
        if not _plain_name(name):
            fc.found.append(Violation("file-integrity", short_repr(name), "listed in the manifest, but not a "
                                      "plain relative path inside the output directory"))
        elif name == manifest.MANIFEST_NAME:
            fc.found.append(Violation("file-integrity", name, "the manifest lists itself (it cannot hold its "
                                      "own hash)"))
        else:
            listed[name] = _file_entry(e)
            if listed[name] is None:
                fc.found.append(Violation("file-integrity", name, "its manifest entry is not {sha256: 64 hex digits, "
                                          "size: integer >= 0}: the file cannot be checked"))
    fc.listed, fc.hashed = len(listed), hashes
    jobs = []
    for name, e in sorted(listed.items()):
        why, st = _lstat_file(root, name)
        if why is not None:
            fc.found.append(Violation("file-integrity", name, why))
        elif e is not None and st.st_size != e[0]:
            fc.found.append(Violation("file-integrity", name, f"size {st.st_size}, manifest says {e[0]}"))
        elif e is not None and hashes:
            jobs.append((st.st_size, name, e[1]))
    fc.found += _unlisted(root, listed, ignore)
    if jobs:
        fc.pool = ThreadPoolExecutor(min(HASH_THREADS, os.cpu_count() or 1, len(jobs)), "sha256")
        for _size, name, want in sorted(jobs, reverse=True):  # the largest first
            fc.pending.append((name, want, fc.pool.submit(_sha256, _blob_or_self(root, name))))
    return fc


def _hub_local_dir_cache(root: Path, rel: str) -> bool:
    """`rel` is huggingface_hub's own bookkeeping of a `--local-dir` download or upload: a real top-level
    `.cache` directory holding nothing but a real `huggingface` directory (huggingface_hub/_local_folder.py,
    `_huggingface_dir`). No engine reads it (they read the index's shards and the config files), so it is
    not part of the checkpoint; anything else in `.cache` is."""
    if rel != ".cache":
        return False
    try:
        top = root / rel
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            return False
        with os.scandir(top) as it:
            names = [e.name for e in it]
        return names == ["huggingface"] and stat.S_ISDIR(os.lstat(top / "huggingface").st_mode)
    except OSError:
        return False


def _unlisted(root: Path, listed: dict[str, object], ignore: frozenset[str] = frozenset()) -> list[Violation]:
    """Every entry of `root` the manifest does not list (hidden ones too), descending only into real
    directories that hold listed files; scale_manifest.json itself (at the top) and huggingface_hub's
    `.cache/huggingface` of a `--local-dir` download (_hub_local_dir_cache) excepted."""
    folders = {name.rsplit("/", 1)[0] for name in listed if "/" in name}
    folders |= {f.rsplit("/", i)[0] for f in folders for i in range(1, f.count("/") + 1)}
    out: list[Violation] = []
    todo = [""]
    while todo:
        rel = todo.pop()
        try:
            with os.scandir(root / rel if rel else root) as it:
                entries = sorted((e.name, e.path) for e in it)
        except OSError as e:
            out.append(Violation("file-unlisted", rel or ".", f"cannot list this directory ({e.strerror or e})"))
            continue
        for name, path in entries:
            r = f"{rel}/{name}" if rel else name
            if r in listed or r == manifest.MANIFEST_NAME or r in ignore or _hub_local_dir_cache(root, r):
                continue
            try:
                mode = os.lstat(path).st_mode
            except OSError as e:
                out.append(Violation("file-unlisted", r, f"not in the manifest, and cannot stat ({e.strerror or e})"))
                continue
            if stat.S_ISDIR(mode) and r in folders:
                todo.append(r)
                continue
            kind = ("a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "a file" if stat.S_ISREG(mode) else "a special file")
            out.append(Violation("file-unlisted", r, f"{kind} the manifest does not list"))
    return out


# ---------------------------------------------------------------------------------------------
# the contract

@dataclass
class _Checked:
    """What the contract pass learned, reused by the numeric pass."""

    root: Path
    ann: Announced
    tensors: dict[str, TensorInfo]
    mods: dict[str, Module]
    good: dict[str, Module]  # quantized modules with every tensor and scale well-formed
    gs: dict[str, np.float32]  # source weight name -> stored global scale
    man: dict | None  # the manifest, when valid against its schema
    violations: list[Violation]
    warnings: list[str]
    files_listed: int | None = None  # files the manifest lists (None: no usable files table)
    hashed: bool = False
    files: _FileCheck | None = None  # defer_files: hashes still running, their violations not yet in `violations`
    fl: Flavor | None = None
    pending: dict[str, str] | None = None  # defer_data: modules (key -> format) whose scale values are
    # not checked yet (in `good` meanwhile, their global scales not yet in `gs`); None once checked


def verify_contract(path: str | Path, *, hashes: bool = True, ignore: frozenset[str] = frozenset()) -> list[Violation]:
    """Check a quantized checkpoint: every file against the scale manifest's sizes and (unless
    `hashes` is False) SHA-256, and the FORMATS.md contract from its headers and scale tensors.
    `ignore` names top-level files that may be present unlisted (`convert --verify` checks its
    output while still holding the output's lock file). An empty list means the checkpoint passes.
    Raises SourceError if `path` is not a directory."""
    return _contract(Path(path), hashes, ignore).violations


def _contract(root: Path, hashes: bool = True, ignore: frozenset[str] = frozenset(),
              defer_files: bool = False, defer_data: bool = False) -> _Checked:
    """defer_files: leave the file hashes running (verify --source compares meanwhile, so the disk
    reads the output's files and the source at once) and hand them over in `_Checked.files`; the
    caller must `finish()` or `close()` them. defer_data: check headers only; the modules' scale
    values (`_Checked.pending`) and what needs them are left to `_finish_data`, which verify
    --source runs as it reads each module for its comparison: every scale tensor is read once."""
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    try:
        os.scandir(root).close()
    except OSError as e:
        raise SourceError(f"{root}: cannot read the directory ({e.strerror or e})") from None
    found: list[Violation] = []
    warnings: list[str] = []
    raw, man = _read_manifest(root, found, warnings)
    trace.mark("contract-manifest-read")
    fc = _start_files(root, raw, hashes, warnings, ignore)
    try:
        prefer = frozenset({man.get("format")} | {q.get("format") for q in man.get("quantizers", {}).values()}
                           if man else ())
        ann = announced(root, found, warnings, prefer)
        if (ann.producer or "").split(" ")[0] == "shardquant" and not os.path.lexists(root / manifest.MANIFEST_NAME):
            found.append(Violation("manifest", manifest.MANIFEST_NAME, "missing, yet the config names shardquant as "
                                   "the producer (it always writes one)"))
        tensors = read_tensors(root, found, warnings)
        mods = modules(tensors)
        trace.mark("contract-headers")
        fl = FLAVORS.get(ann.flavor) if ann.flavor else None
        good: dict[str, Module] = {}
        gs: dict[str, np.float32] = {}
        pending: dict[str, str] = {}  # defer_data: module key -> format, scale values not yet read
        for key, m in mods.items():
            is_out = excluded(m.base, ann.exclude, ann.flavor)
            if is_out and m.quantized:
                has = ", ".join(sorted(m.tensors))
                found.append(Violation("excluded-with-scales", m.name, f"excluded, yet has {has}"
                                       + (f" ({m.tensors['weight'].dtype} weight)" if "weight" in m.tensors else "")))
                continue
            if not m.quantized:
                w = m.tensors["weight"]
                if not is_out and fl is not None and len(w.shape) == 2 and w.dtype in FLOAT_DTYPES and _is_linear(key):
                    found.append(Violation("unlisted-high-precision", m.name,
                                           f"{w.dtype} {list(w.shape)} linear not in the exclude list"))
                continue
            fmt = ann.format_of(m.base)
            if fl is None or fmt is None:
                if fl is not None and ann.targets:
                    found.append(Violation("config", m.name, "quantized, but no config group targets it"))
                continue
            problems = _check_module(m, fl, fmt, ann.quant_algo)
            found += problems
            if problems:
                continue
            good[key] = m
            if defer_data:
                pending[key] = fmt
                continue
            data, v = _check_data(m, fl, fmt)
            found += data
            if v is not None:
                gs[key] = v
            if data:
                del good[key]
        trace.mark("contract-modules")
        c = _Checked(root, ann, tensors, mods, good, gs, man, found, warnings, fc.listed, fc.hashed,
                     fc if defer_files else None, fl, pending if defer_data else None)
        if not defer_data:
            c.violations += _contract_tail(c)
        trace.mark("contract-manifest-checked")
        if not defer_files:
            found[:0] = fc.finish()
    except BaseException:
        fc.close()
        raise
    finally:
        if not defer_files:
            fc.close()
    return c


def _check_data(m: Module, fl: Flavor, fmt: str) -> tuple[list[Violation], np.float32 | None]:
    """The checks of a module's scale values (read from its files), and its stored global scale."""
    try:
        return _check_scales(m, fl, fmt), _global_value(m, fl, fmt)
    except HeaderError as e:  # a shard shrunk or vanished since its header was read
        return [Violation("index", m.name, str(e))], None


def _contract_tail(c: _Checked) -> list[Violation]:
    """The checks that need every module's global scale: fused sets, the engines' FP8 MoE schemes,
    the manifest against the checkpoint."""
    found = _fused(c.mods, c.gs) + _moe_fp8_served(c.ann, c.mods)
    if c.man is not None and c.fl is not None and c.ann.formats:
        _check_manifest(c.man, c.ann, c.fl, c.tensors, c.mods, c.gs, found)
    return found


def _finish_data(c: _Checked, results: dict[str, tuple[list[Violation], np.float32 | None]]) -> list[Violation]:
    """defer_data: fold the data checks of the pending modules (`results`, by key; the missing ones
    are run here) into `c` and return their violations in module order, then the contract's tail.
    Nothing when the contract checked them itself."""
    if c.pending is None:
        return []
    found: list[Violation] = []
    for key, fmt in c.pending.items():
        data, v = results[key] if key in results else _check_data(c.mods[key], c.fl, fmt)
        found += data
        if v is not None:
            c.gs[key] = v
        if data:
            c.good.pop(key, None)
    c.pending = None
    return found + _contract_tail(c)




_RULES = RuleSet(expert_policy="per-expert")  # per-expert keys: gate == up within each expert
_INNER = RuleSet()  # the same table without the vision/MTP rows: what a tensor inside them is
_INNER.rules = tuple(r for r in BUILTIN_RULES if r.name not in ("vision", "mtp"))


@functools.lru_cache(maxsize=None)
def _decide(name: str, inner: bool = False) -> Decision:
    """What the built-in rules say of a 2-D float weight of this name."""
    return (_INNER if inner else _RULES).classify(name, "BF16", (16, 16))


def _is_linear(name: str) -> bool:
    """A 2-D float weight an engine loads as a linear layer: one a quantize rule claims, an output
    head, router or shared-expert gate, or a 2-D weight no rule claims; inside vision towers and MTP
    layers, the same question for the inner name (their norms and embeddings are not linears)."""
    d = _decide(name)
    if d.rule in ("vision", "mtp"):
        d = _decide(name, inner=True)
    return d.action == QUANTIZE or d.rule in _LINEAR_KEEPS


# compressed-tensors FP8 schemes the fused-MoE loaders of vLLM and SGLang take (docs/formats.md,
# "fp8", compressed-tensors): (weights strategy, activations). Anything else is refused at load.
_CT_FP8_MOE = {("tensor", "static"), ("channel", "dynamic-token"), ("block", "dynamic-group")}


def _moe_fp8_served(ann: Announced, mods: dict[str, Module]) -> list[Violation]:
    """A compressed-tensors FP8 MoE whose scheme the engines' MoE loaders refuse: weight-only FP8
    ("Unsupported FusedMoe scheme"), or per-tensor weights with dynamic per-token activations."""
    if ann.flavor != "compressed-tensors":
        return []

    def fp8(m: Module) -> bool:  # MXFP8 aside: vLLM's own MX MoE method serves it (docs/formats.md, MX)
        f = ann.format_of(m.base)
        return f is not None and formats.declared(f).num_bits == 8 and formats.declared(f).scale_dtype != "U8"

    experts = [m for k, m in mods.items() if m.quantized and _EXPERT_IDX.search(k) and fp8(m)]
    if not experts:
        return []
    schemes = {ann.scheme_of(m.base) for m in experts} if ann.targets else set(ann.schemes)
    bad = sorted({f"weights {w} with {a or 'no'} activation quantization" for w, a in schemes
                  if (w, a) not in _CT_FP8_MOE}, key=str)
    if not bad:
        return []
    return [Violation("engine-moe-fp8", experts[0].name,
                      f"{'; '.join(bad)}: vLLM and SGLang do not load this FP8 scheme for fused MoE experts "
                      f"({len(experts)} quantized expert weights); FP8 MoE needs channel weights with dynamic "
                      "per-token activations, block weights, or calibrated static activation scales")]


def _fused(mods: dict[str, Module], gs: dict[str, np.float32]) -> list[Violation]:
    """Every fused set (q/k/v, gate/up, w1/w3, q_a/kv_a, per expert) has one precision and, when
    quantized, one global scale (exact fp32 equality)."""
    sets: dict[str, list[str]] = defaultdict(list)
    for key in mods:
        d = _decide(key)
        if d.action == QUANTIZE and d.fuse:
            sets[d.key].append(key)
    out = []
    for fkey, members in sets.items():
        if len(members) < 2:
            continue
        short = {k: mods[k].base.rsplit(".", 1)[-1] for k in members}
        q = [mods[k].quantized for k in members]
        if any(q) and not all(q):
            out.append(Violation("fused-precision", fkey, ", ".join(
                f"{short[k]} {'quantized' if mods[k].quantized else 'high precision'}" for k in members)))
            continue
        vals = {k: gs[k] for k in members if k in gs}
        if len({v.tobytes() for v in vals.values()}) > 1:
            lo, hi = float(min(vals.values())), float(max(vals.values()))
            ratio = f" (ratio {hi / lo:.4g})" if lo > 0 else ""
            out.append(Violation("fused-scale", fkey, ", ".join(
                f"{short[k]} {float(v):.9g}" for k, v in vals.items()) + ratio))
    return out


def _read_manifest(root: Path, found: list[Violation], warnings: list[str]) -> tuple[dict | None, dict | None]:
    """(the manifest as read, for its files table, or None; the manifest if it is valid against
    manifest.schema.json, else None). No manifest: a warning (another producer's checkpoint)."""
    import jsonschema

    name = manifest.MANIFEST_NAME
    path = root / name
    unchecked = "file sizes and SHA-256 not checked"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        warnings.append(f"no {name} (not a shardquant output?): {unchecked}")
        return None, None
    except OSError as e:
        found.append(Violation("manifest", name, f"cannot stat ({e.strerror or e})"))
        warnings.append(f"{name} unreadable: {unchecked}")
        return None, None
    if stat.S_ISLNK(mode) and not _hub_blob(root, Path(os.path.realpath(path))):
        found.append(Violation("manifest", name, "is a symlink, not a file"))
        warnings.append(f"{name} is a symlink: {unchecked}")
        return None, None
    try:
        raw = manifest.load(path)
    except HeaderError as e:
        found.append(Violation("manifest", name, str(e)))
        warnings.append(f"{name} unreadable: {unchecked}")
        return None, None
    if _depth(raw, MAX_MANIFEST_DEPTH) > MAX_MANIFEST_DEPTH:
        found.append(Violation("manifest", name, f"nested more than {MAX_MANIFEST_DEPTH} deep"))
        warnings.append(f"{name} unreadable: {unchecked}")
        return None, None
    errors = sorted(jsonschema.Draft202012Validator(load_schema()).iter_errors(raw),
                    key=lambda e: list(map(str, e.path)))
    for e in errors[:20]:
        where = "/".join(map(str, e.absolute_path)) or "(root)"
        found.append(Violation("manifest", name, f"schema: {_clip(where)}: {_clip(e.message)}"))
    return raw, None if errors else raw


def _depth(obj: object, limit: int) -> int:
    """How deep lists and objects nest in `obj` (1 for a flat one), counted up to limit + 1 without
    recursion."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > limit:
                return d
            todo.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _clip(s: str, n: int = 200) -> str:
    return s if len(s) <= n else f"{s[:n // 2]}...{s[-n // 2:]}"


def _f32(x: float | int) -> np.float32:
    """A JSON number as fp32: an integer too large for a float is infinite, not an OverflowError."""
    try:
        f = float(x)
    except OverflowError:
        f = math.inf if x > 0 else -math.inf
    with np.errstate(over="ignore"):
        return np.float32(f)


def _check_manifest(man: dict, ann: Announced, fl: Flavor, tensors: dict[str, TensorInfo],
                    mods: dict[str, Module], gs: dict[str, np.float32], found: list[Violation]) -> None:
    """The manifest (valid against its schema) against the tensors and the announced flavor/format(s)."""
    name = manifest.MANIFEST_NAME
    mt, qs = man["tensors"], man["quantizers"]
    fmt_of = {key: q.get("format", man["format"]) for key, q in qs.items()}  # older manifests: one format
    if man["flavor"] != ann.flavor:
        found.append(Violation("manifest", name, f"flavor {man['flavor']!r}, but the checkpoint is {ann.flavor!r}"))
    used = set(fmt_of.values()) or {man["format"]}
    if used != set(ann.formats):
        what = "format" if len(used) == 1 else "formats"
        found.append(Violation("manifest", name, f"{what} {', '.join(sorted(used))}, but the checkpoint announces "
                               f"{', '.join(ann.formats) or 'none'}"))
    for key, q in qs.items():
        fmt = formats.get(fmt_of[key])
        scaled = fmt.FORMAT.quantizer_scale  # else block scales only: no per-quantizer scale (null)
        for src in q["members"]:
            if mt.get(src, {}).get("quantizer") != key:
                found.append(Violation("manifest", src, f"member of quantizer {key} without a tensors entry naming it"))
        if not scaled or q["global_scale"] is None:
            if scaled or q["global_scale"] is not None:
                found.append(Violation("manifest", key, f"global_scale {short_repr(q['global_scale'])}: "
                                       f"{fmt_of[key]} {'has' if scaled else 'has no'} per-quantizer scale"))
            continue
        amax, g = _f32(q["amax"]), _f32(q["global_scale"])
        if "cast" in q:  # codes kept from the source: the global scale is the cast's (decode.py)
            if not decode.mx_cast_record_ok(q["amax"], q["global_scale"]):
                found.append(Violation("manifest", key, f"global_scale {short_repr(q['global_scale'])} is not the "
                                       f"scale of a {q['cast']['from']} cast of amax {short_repr(q['amax'])}"))
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            want_g = fmt.global_scale(amax)
        if want_g != g or float(g) != q["global_scale"]:
            found.append(Violation("manifest", key, f"global_scale {short_repr(q['global_scale'])} is not the "
                                   f"{fmt_of[key]} global scale of amax {short_repr(q['amax'])}"))
    for src, e in mt.items():
        q = qs.get(e["quantizer"])
        if q is None or src not in q["members"]:
            found.append(Violation("manifest", src, f"quantizer {e['quantizer']!r} does not list it"))
            continue
        absent = [e[r] for r in ("weight", "scale", "global_scale") if e[r] is not None and e[r] not in tensors]
        if absent:
            found.append(Violation("manifest", src, f"names tensor(s) not in the checkpoint: {', '.join(absent)}"))
            continue
        qfmt = fmt_of[e["quantizer"]]
        m = mods.get(src)
        announced_fmt = ann.format_of(m.base) if m is not None else None
        if ann.targets and announced_fmt is not None and announced_fmt != qfmt:
            found.append(Violation("manifest", src, f"quantizer {e['quantizer']} is {qfmt}, but the config gives "
                                   f"the module {announced_fmt}"))
        if q["global_scale"] is None:
            continue
        v = gs.get(src)
        with np.errstate(over="ignore", divide="ignore"):
            want = fl.scalar(qfmt, _f32(q["global_scale"])).reshape(-1)[0]
        if v is not None and v.tobytes() != want.tobytes():
            conv = " (compressed-tensors stores 1/global_scale)" if fl.inverted(qfmt) else ""
            found.append(Violation("manifest", src, f"{e['global_scale']} holds {float(v):.9g}, manifest quantizer "
                                   f"{e['quantizer']} says {float(want):.9g}{conv}"))
    for key, m in mods.items():
        if m.quantized and key not in mt and not excluded(m.base, ann.exclude, ann.flavor):
            found.append(Violation("manifest", m.name, "quantized, but the manifest has no entry for it"))
    for e in man["excluded"]:
        if e["name"] not in tensors:
            found.append(Violation("manifest", e["name"], "listed as excluded (kept) but not in the checkpoint"))


def load_schema() -> dict:
    """manifest.schema.json with the format names of the registry (a new format needs no schema edit)."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    schema["$defs"]["format"]["enum"] = sorted(formats.FORMATS)
    return schema


# ---------------------------------------------------------------------------------------------
# numerics against the source

def verify(path: str | Path, source: str | None = None, *, revision: str | None = None,
           min_sqnr: float | None = None, hashes: bool = True, engines: list[str] | None = None,
           device: str = "auto") -> Report:
    """The files and contract of `path` (as verify_contract); with `source` (directory or hub repo
    id) also every quantized tensor dequantized against its source tensor and every kept tensor
    compared byte for byte. A tensor under `min_sqnr` dB (default DEFAULT_MIN_SQNR of the format) is
    a violation. hashes=False skips reading whole files for their SHA-256 (sizes are still checked).
    The engines' loading contracts (shardquant/engines.py, attached as `report.engines`): engines=None
    checks every engine and fails only a checkpoint none serves; named engines fail on any finding.
    device: where --source comparisons run: "cpu", "cuda[:N]", or "auto" (a GPU when CuPy sees one);
    both give the same verdicts (the sums agree to float64 rounding, max |W| exactly)."""
    t0 = time.perf_counter()
    trace.mark("verify-start")
    gpu = _compare_device(device) if source is not None else None  # starting while the contract is checked
    ck = with_decoded(open_checkpoint(source, revision)) if source is not None else None
    trace.mark("verify-source-opened")
    c = _contract(Path(path), hashes, defer_files=source is not None, defer_data=source is not None)
    trace.mark("verify-contract")
    try:
        rep = _verify_checked(c, path, source, ck, min_sqnr, hashes, engines, gpu)
        trace.mark("verify-compared")
        if c.files is not None:
            rep.violations[:0] = c.files.finish()  # file violations first, as without --source
            trace.mark("verify-hashed")
    finally:
        if c.files is not None:
            c.files.close()
    rep.seconds = time.perf_counter() - t0
    return rep


def _verify_checked(c: _Checked, path, source, ck, min_sqnr, hashes, engines, gpu) -> Report:
    rep = Report(str(path), c.ann.flavor, ", ".join(c.ann.formats) or None, c.ann.producer,
                 sum(m.quantized for m in c.mods.values()), c.violations, c.warnings,
                 files_checked=c.files_listed, hashed=c.hashed)
    contract_end = len(rep.violations)  # the data checks' findings go here, ahead of the engines'
    from . import engines as engine_rules  # imports this module: not at the top

    compare = ck is not None and c.ann.formats
    # the engines' rules read a few scattered values: beside the comparison, which reads everything
    job = in_background(lambda: engine_rules.check(path, engines, c.tensors), "shardquant-engines") if compare else None
    if c.files_listed is not None and not hashes:
        rep.warnings.append("file contents not hashed (--no-hashes): sizes checked, SHA-256 not")
    data: dict[str, tuple[list[Violation], np.float32 | None]] = {}
    if compare:
        rep.source = source
        rep.min_sqnr = min(DEFAULT_MIN_SQNR[f] for f in c.ann.formats) if min_sqnr is None else min_sqnr
        data = _compare(c, ck, rep, min_sqnr, gpu)
    rep.engines = job.result() if job is not None else engine_rules.check(path, engines, c.tensors)
    trace.mark("verify-engines")
    rep.violations[contract_end:contract_end] = _finish_data(c, data) + rep.engines.violations
    return rep


def _compare_device(device: str) -> Future | None:
    """verify --device: None for the CPU, else a future of a shardquant.cuda Device, started on a
    thread (CuPy's import and the CUDA context take most of a second: the contract is checked
    meanwhile)."""
    if device == "cpu":
        return None
    if device != "auto" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ShardquantError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device == "auto":
        from .backend import nvidia_driver

        if nvidia_driver() is None:  # no NVIDIA driver on this machine: no reason to import CuPy at all
            return None
    def start():
        from .cuda import available, get_device

        return None if device == "auto" and not available() else get_device("cuda" if device == "auto" else device)

    return in_background(start, "shardquant-gpu-start")  # raised where the device is first needed


def _compare(c: _Checked, ck, rep: Report, min_sqnr: float | None = None,
             gpu=None) -> dict[str, tuple[list[Violation], np.float32 | None]]:
    """Each quantized tensor against its source at its own format's SQNR floor (or `min_sqnr`); on
    `gpu` (a future of a shardquant.cuda Device, started while the contract was checked) when it
    gives one, decoded and reduced there. Returns the data checks of the contract's pending modules
    it ran (by key), for _finish_data."""
    dev = gpu.result() if gpu is not None else None
    fl = FLAVORS[c.ann.flavor]
    qs = c.man["quantizers"] if c.man is not None else {}
    quantizer_of = {src: e["quantizer"] for src, e in (c.man or {}).get("tensors", {}).items()
                    if e["quantizer"] in qs}  # one naming no quantizer is a contract violation already
    amax: dict[str, np.float32] = {}
    work = []  # (key, module, source tensor, format), checked for shape; then compared on a thread pool
    for key, m in c.mods.items():
        if not m.quantized:
            continue
        src = ck.tensors.get(key)
        if src is None:
            rep.violations.append(Violation("source", m.name, f"quantized, but the source has no {key}"))
            continue
        fmt = c.ann.format_of(m.base)
        if fmt is None or key not in c.good or (key not in (c.pending or ()) and formats.declared(fmt).quantizer_scale
                                                and key not in c.gs):
            continue  # malformed: already reported by the contract
        w = m.tensors[fl.weight_name(fmt)]
        layout = formats.declared(fmt)
        want = layout.weight_shape(src.shape) if len(src.shape) == 2 else None
        if src.dtype not in FLOAT_DTYPES:
            rep.violations.append(Violation("source", m.name, f"source {key} is {src.dtype}, not a float tensor"))
            continue
        if want != w.shape or src.shape[1] != w.shape[1] * layout.elems_per_byte:
            rep.violations.append(Violation("source", m.name, f"weight {list(w.shape)} does not fit source "
                                            f"{src.dtype}{list(src.shape)} (expected {list(want or ())})"))
            continue
        work.append((key, m, src, fmt))

    work.sort(key=lambda it: (str(it[2].file), it[2].offset))  # the source read in file order

    def measure(item) -> tuple[float, float, np.float32]:
        """(signal, noise, max |source|) of one tensor, a cache-sized band of rows at a time: the fp32
        source, the dequantized band and their difference never leave the CPU's caches."""
        key, m, src, fmt = item
        raw, layout = read_raw(src), formats.declared(fmt)
        weight, scale = read_raw(m.tensors[fl.weight_name(fmt)]), _scale_values(m.tensors[fl.scale_name])
        gs = c.gs.get(key)
        per_quantizer = np.float32(1) / gs if gs is not None and fl.inverted(fmt) else gs  # CT stores 1/s2
        rows, cols = raw.shape
        tile = layout.block[0] if layout.block else 1  # scale rows cover `tile` weight rows
        step = max(tile, BAND_ELEMENTS // max(cols, 1) // tile * tile)
        signal = noise = 0.0
        top = np.float32(0)
        dequantize = formats.get(fmt).dequantize_stored
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for a in range(0, rows, step):
                b = min(rows, a + step)
                ref = to_f32(raw[a:b], src.dtype)
                band = scale if scale.size == 1 else scale[a // tile:-(-b // tile)]
                s, n = _power(ref, dequantize(weight[a:b], band, per_quantizer))
                signal, noise, top = signal + s, noise + n, max(top, np.float32(np.max(np.abs(ref), initial=0)))
        return signal, noise, top

    searched = (c.man or {}).get("scale_search")

    def rtn_noise(item) -> float | None:
        """The tensor's noise had its block scales been round to nearest, under the same stored
        per-quantizer scale (searched scales only: --scale-search; the CPU, in the format's own code)."""
        key, m, src, fmt = item
        layout = formats.declared(fmt)
        if not searched or searched not in layout.scale_search or (layout.quantizer_scale and key not in c.gs):
            return None
        if layout.quantizer_scale:
            gs = c.gs[key]
            s2 = np.float32(1) / gs if fl.inverted(fmt) else gs
        else:  # block scales only (MX): no per-quantizer scale
            s2 = np.float32(1)
        raw = read_raw(src)
        w, sc = formats.get(fmt).Quantizer(s2).quantize(raw, src.dtype, key)
        with np.errstate(over="ignore", invalid="ignore"):
            return _power(to_f32(raw, src.dtype), formats.get(fmt).dequantize_stored(w, sc, s2))[1]

    def measure_gpu(item) -> tuple[float, float, np.float32]:
        """The same three numbers from the GPU (kernels.cu error_power): only file reads stay on the CPU."""
        key, m, src, fmt = item
        layout, st = formats.declared(fmt), m.tensors[fl.scale_name]
        scale = _scale_values(st)
        rows, cols = src.shape
        if layout.block:
            tile = layout.block
        elif scale.size == 1:
            tile = (max(rows, 1), max(cols, 1))
        elif layout.block_size and scale.size != rows:
            tile = (1, layout.block_size)
        else:
            tile = (1, max(cols, 1))  # one scale per output row
        if scale.size != -(-rows // tile[0]) * -(-cols // tile[1]):
            return measure(item)  # a shape the contract did not expect: the reference path decides
        gs = c.gs.get(key) if layout.global_scale else None  # FP8's scale is `scale` itself; MX have none
        pq = np.float32(1) / gs if gs is not None and fl.inverted(fmt) else gs
        kind = 0 if st.dtype in FLOAT_DTYPES else (1 if layout.scale_dtype == "F8_E4M3" else 2)
        code = 1 if layout.element == "E2M1" else 0
        return dev.error_power(read_raw(src), src.dtype, read_raw(m.tensors[fl.weight_name(fmt)]), code, scale,
                               kind, tile, np.float32(1) if pq is None else np.float32(pq))

    quantized = {k for k, m in c.mods.items() if m.quantized}
    kept = []  # (source, output) of tensors kept as they were: compared byte for byte on the same pool
    for name, s in ck.tensors.items():
        if name in quantized:
            continue
        o = c.tensors.get(name)
        if o is None:
            rep.violations.append(Violation("source", name, "source tensor neither quantized nor kept in the output"))
        elif (o.dtype, o.shape) != (s.dtype, s.shape):
            rep.violations.append(Violation("source", name, f"kept as {o.dtype}{list(o.shape)}, source is "
                                            f"{s.dtype}{list(s.shape)}"))
        else:
            kept.append((s, o))

    casts = {k for k, q in qs.items() if "cast" in q}

    def changed_blocks(key: str, m: Module, src, fmt: str) -> int:
        """A cast member: its 32-element blocks whose packed codes differ from the source's."""
        stored = np.ascontiguousarray(read_raw(src.parts[0])).view(np.uint8).reshape(-1, 16)
        written = np.ascontiguousarray(read_raw(m.tensors[fl.weight_name(fmt)])).view(np.uint8).reshape(-1, 16)
        if stored.shape != written.shape:
            return stored.shape[0]
        return int(np.count_nonzero((stored != written).any(axis=1)))

    def one(item):
        """A kept tensor: equal or not. A quantized one: (its data checks if the contract left them
        here, else None; its three numbers, or None where the scales are malformed; for a cast's
        member, its blocks whose codes differ from the source's)."""
        if len(item) == 2:
            return bool(np.array_equal(read_raw(item[1]), read_raw(item[0])))
        key, m, src, fmt = item
        if quantizer_of.get(key) in casts and getattr(src, "parts", None):
            data, power = one_quantized(item)
            return data, power, changed_blocks(key, m, src, fmt)
        return one_quantized(item) + (None,)

    def one_quantized(item):
        key, m, _, fmt = item
        data = None
        if c.pending and key in c.pending:  # the scales are read here, once, just before the comparison reads them again
            data = _check_data(m, fl, fmt)
            if data[0] or (formats.declared(fmt).quantizer_scale and data[1] is None):
                return data, None
            if data[1] is not None:
                c.gs[key] = data[1]
        power = measure(item) if dev is None else measure_gpu(item)
        return data, (power + (rtn_noise(item),) if searched else power)

    # NumPy, CUDA and file reads release the GIL: tensors are compared in parallel, a few in flight per
    # thread. On the GPU the threads only read, upload and check scales: GPU_THREADS of them.
    results = list(_in_parallel(one, work + kept, threads=GPU_THREADS if dev is not None else None))
    for (s, o), same in zip(kept, results[len(work):]):
        if not same:
            rep.violations.append(Violation("source", s.name, "kept tensor differs from the source, byte for byte"))
    data: dict[str, tuple[list[Violation], np.float32 | None]] = {}
    changed: dict[str, int] = {}
    for (key, m, src, fmt), (checked, power, differ) in zip(work, results[:len(work)]):
        if differ is not None:
            changed[quantizer_of[key]] = changed.get(quantizer_of[key], 0) + differ
        if checked is not None:
            data[key] = checked
        if power is None:
            c.good.pop(key, None)
            continue
        signal, noise, tamax = power[:3]
        qkey = quantizer_of.get(key) or _decide(key).key or m.name
        layer, proj = _layer_proj(key)
        st = TensorStat(key, int(np.prod(src.shape)), signal, noise, qkey, layer, proj,
                        power[3] if len(power) > 3 else None)
        rep.tensors.append(st)
        if key in quantizer_of:
            amax[qkey] = max(amax.get(qkey, np.float32(0)), tamax)
        floor = DEFAULT_MIN_SQNR[fmt] if min_sqnr is None else min_sqnr
        if not st.sqnr_db >= floor:  # NaN too
            rep.violations.append(Violation("sqnr", key, f"SQNR {st.sqnr_db:.2f} dB < {floor:g} dB "
                                            f"(relative RMS error {st.rel_rms:.3g})"))
    for qkey, n in changed.items():  # a cast keeps every code but those of the blocks it says it re-quantized
        said = qs[qkey]["cast"]["requantized_blocks"]
        if n != said and len([s for s in qs[qkey]["members"] if s in c.good]) == len(qs[qkey]["members"]):
            rep.violations.append(Violation("manifest", qkey, f"cast from {qs[qkey]['cast']['from']}: {n} block(s) of "
                                            f"codes differ from the source's, the manifest says {said} were re-quantized"))
    for qkey, a in amax.items():
        q = qs[qkey]
        if len([s for s in q["members"] if s in c.good]) != len(q["members"]):
            continue
        if "cast" in q and not a <= _f32(q["amax"]):  # a cast's amax bounds max |W| (decode.py mx_cast_amax)
            rep.violations.append(Violation("manifest", qkey, f"amax {short_repr(q['amax'])} of a cast, but max |W| "
                                            f"of the source members is {float(a)!r}, above it"))
        elif "cast" not in q and _f32(q["amax"]) != a:
            rep.violations.append(Violation("manifest", qkey, f"amax {short_repr(q['amax'])}, but max |W| of the "
                                            f"source members is {float(a)!r}"))
    return data


def _scale_values(t: TensorInfo) -> np.ndarray:
    """A stored scale tensor: raw codes (E4M3, E8M0 bytes) as they are, float scales as fp32."""
    raw = read_raw(t)
    return to_f32(raw, t.dtype) if t.dtype in FLOAT_DTYPES else raw


def _widened_scale(declared: str, stored: str) -> bool:
    """An fp32 weight scale stored as bf16 or f16 (llm-compressor's FP8_DYNAMIC and FP8_BLOCK): the
    engines copy it into their fp32 parameter (docs/formats.md 4.2), so the values are what they read."""
    return declared == "F32" and stored in ("BF16", "F16")


def _in_parallel(fn, items: list, ahead: int = 2, threads: int | None = None):
    """fn over items on a thread pool (`threads`, default formats/base.py threads()), results in
    order, at most `ahead` per thread in flight (each holds a tensor's fp32 source and dequantized copies)."""
    from .formats import base

    n = threads or base.threads()
    if n == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="shardquant-verify") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead * n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _power(ref: np.ndarray, deq: np.ndarray, chunk: int = 1 << 18) -> tuple[float, float]:
    """(sum ref^2, sum (deq - ref)^2): fp32 dot products over chunks of 256 Ki elements (BLAS, which
    sums in blocks), summed in float64; relative error of each sum far below the 0.01 dB the report shows."""
    r, d = ref.reshape(-1), deq.reshape(-1)
    signal = noise = 0.0
    for a in range(0, r.size, chunk):
        x = r[a:a + chunk]
        e = d[a:a + chunk] - x
        s, n = float(np.dot(x, x)), float(np.dot(e, e))
        if not (math.isfinite(s) and math.isfinite(n)):  # beyond fp32's range (or a NaN): in float64
            x64 = x.astype(np.float64)
            e64 = d[a:a + chunk].astype(np.float64) - x64
            s, n = float(np.dot(x64, x64)), float(np.dot(e64, e64))
        signal += s
        noise += n
    return signal, noise


def _layer_proj(name: str) -> tuple[int | None, str]:
    """`model.layers.3.mlp.experts.7.gate_proj.weight` -> (3, "mlp.experts.*.gate_proj")."""
    m = _ROLE.fullmatch(name)
    module = m["base"] if m else name
    lm = _LAYER.fullmatch(module)
    if lm is None:
        return None, module
    return int(lm["layer"]), _EXPERT_IDX.sub(".experts.*.", "." + lm["rest"] + ".")[1:-1]
