"""`verify`: prove that a quantized checkpoint is what engines load, whoever wrote it (shardquant,
ModelOpt, llm-compressor), and, given its source, how close it is.

Two levels, one API (the CLI's `shardquant verify DIR [--source SRC]` mirrors `verify()`):

- `verify_contract(path) -> list[Violation]`: the FORMATS.md contract, from the index, the shard
  headers and the small scale tensors only (never a packed weight): flavor and format announced,
  every quantized module's tensors with the right dtypes and shapes, one global scale and one
  precision per fused set, no NaN/Inf/zero global scale, no NaN block scale, excluded modules without
  scales and every high-precision linear excluded, index and shards in agreement, and the scale
  manifest (when there is one) valid against `manifest.schema.json` and true to the tensors.
- `verify(path, source=None) -> Report`: the contract, plus with a source every quantized tensor
  dequantized and compared with its source tensor (SQNR, relative RMS error), one tensor at a time;
  kept tensors are compared byte for byte.

Global-scale convention: s2 is ModelOpt's `weight_scale_2` (W ~ e2m1 * f32(e4m3 block scale) * s2).
compressed-tensors stores `weight_global_scale` = 1/s2; we dequantize with s2 = fl32(1 / stored), as
vLLM inverts it back (one ulp from the producer's s2 at most: far below NVFP4's own error).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import re
import struct
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import formats, manifest
from .errors import HeaderError, SourceError
from .flavors import FLAVORS, Flavor
from .formats import fp8, nvfp4
from .formats.base import to_f32
from .rules import BUILTIN_RULES, FLOAT_DTYPES, QUANTIZE, Decision, RuleSet
from .source import INDEX_NAME, SINGLE_NAME, _inside, _read_json, open_checkpoint
from .st import TensorInfo, read_header, read_raw

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
# Each rule a violation can break, in report order, with what breaking it means.
RULES: dict[str, str] = {
    "config": "the checkpoint does not announce a supported quantization",
    "index": "index and shards disagree",
    "tensors": "quantized module missing a tensor, or carrying one that does not belong",
    "dtype-shape": "tensor with the wrong dtype or shape",
    "global-scale": "global scale NaN, Inf, zero or negative",
    "block-scale": "NaN block scale (E4M3 0x7F/0xFF)",
    "fused-scale": "members of a fused set with different global scales",
    "fused-precision": "fused set mixing quantized and high-precision members",
    "excluded-with-scales": "excluded module carrying quantization tensors",
    "unlisted-high-precision": "high-precision linear missing from the exclude list",
    "manifest": "scale_manifest.json invalid or disagreeing with the tensors",
    "source": "output disagrees with its source checkpoint",
    "sqnr": "quantized tensor below the SQNR floor",
}
# Default --min-sqnr floors (dB). NVFP4 on Gaussian weights gives ~19-20 dB and FP8 ~31 dB (measured
# in tests/test_verify.py); a floor well below either flags a broken tensor, never a merely hard one.
DEFAULT_MIN_SQNR = {"nvfp4": 10.0, "fp8": 20.0}
# compressed-tensors formats and ModelOpt quant_algo values -> our format names.
CT_FORMATS = {"nvfp4-pack-quantized": "nvfp4", "float-quantized": "fp8", "naive-quantized": "fp8"}
MODELOPT_ALGOS = {"NVFP4": "nvfp4", "W4A16_NVFP4": "nvfp4", "NVFP4_AWQ": "nvfp4", "FP8": "fp8",
                  "FP8_PER_CHANNEL_PER_TOKEN": "fp8"}
# `<m>.<role>` and TransformerEngine's grouped `<m>.<role>{E}` (roles longest first: weight_scale_20
# is expert 0's weight_scale_2, weight_scale2 expert 2's weight_scale).
_ROLE = re.compile(r"(?P<base>.+)\.(?P<role>weight_scale_2|weight_global_scale|weight_scale|weight_packed|"
                   r"weight_shape|input_global_scale|input_scale|weight)(?P<idx>\d*)")
_LAYER = re.compile(r"(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<rest>.*)")
_EXPERT_IDX = re.compile(r"\.experts\.\d+\.")
_LINEAR_KEEPS = ("head", "router", "shared_expert_gate", "unclaimed")  # kept rows that are linears
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class Violation:
    """One module (or file, or quantizer) breaking one rule of RULES."""

    rule: str
    name: str
    detail: str


@dataclass(frozen=True)
class Stat:
    """Quantization error of one tensor, or summed over a group of tensors (signal and noise add)."""

    name: str
    numel: int
    signal: float  # sum of squares of the source
    noise: float  # sum of squared errors of the dequantized output

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    @property
    def rel_rms(self) -> float:
        if self.signal == 0:
            return 0.0 if self.noise == 0 else math.inf
        return math.sqrt(self.noise / self.signal)


@dataclass(frozen=True)
class TensorStat(Stat):
    quantizer: str = ""
    layer: int | None = None
    proj: str = ""


@dataclass
class Report:
    """What `verify` found. `ok` is what the CLI's exit status says."""

    path: str
    flavor: str | None
    format: str | None
    producer: str | None
    modules: int  # quantized modules seen
    violations: list[Violation]
    warnings: list[str] = field(default_factory=list)
    source: str | None = None
    tensors: list[TensorStat] = field(default_factory=list)  # --source: one per quantized tensor
    min_sqnr: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_rule(self) -> dict[str, list[Violation]]:
        out: dict[str, list[Violation]] = {r: [] for r in RULES}
        for v in self.violations:
            out.setdefault(v.rule, []).append(v)
        return {r: vs for r, vs in out.items() if vs}

    def overall(self) -> Stat:
        return _sum("all", self.tensors)

    def quantizers(self) -> list[Stat]:
        return _grouped(self.tensors, lambda t: t.quantizer)

    def layers(self) -> list[tuple[int | None, str, Stat]]:
        """(layer, projection, stat), in checkpoint order."""
        return [(k[0], k[1], s) for k, s in _grouped_keys(self.tensors, lambda t: (t.layer, t.proj))]

    def worst(self, n: int = 10) -> list[TensorStat]:
        return sorted(self.tensors, key=lambda t: (t.sqnr_db, t.name))[:n]

    def to_dict(self, top: int = 10) -> dict:
        def stat(s: Stat) -> dict:
            return {"name": s.name, "numel": s.numel, "sqnr_db": _finite(s.sqnr_db), "rel_rms": _finite(s.rel_rms)}

        d = {
            "path": self.path, "ok": self.ok, "flavor": self.flavor, "format": self.format,
            "producer": self.producer, "quantized_modules": self.modules, "seconds": round(self.seconds, 3),
            "violations": {r: {"description": RULES.get(r, r), "count": len(vs),
                               "items": [{"name": v.name, "detail": v.detail} for v in vs]}
                           for r, vs in self.by_rule().items()},
            "warnings": list(self.warnings), "source": self.source,
        }
        if self.source is not None:
            d["min_sqnr_db"] = self.min_sqnr
            d["overall"] = stat(self.overall())
            d["tensors"] = [dict(stat(t), quantizer=t.quantizer, layer=t.layer, proj=t.proj) for t in self.tensors]
            d["quantizers"] = [stat(s) for s in self.quantizers()]
            d["layers"] = [dict(stat(s), layer=L, proj=p) for L, p, s in self.layers()]
            d["worst"] = [t.name for t in self.worst(top)]
        return d


def _finite(x: float) -> float | None:
    """JSON has no Infinity: an exact tensor's SQNR is written as null."""
    return x if math.isfinite(x) else None


def _sum(name: str, stats: list[Stat]) -> Stat:
    return Stat(name, sum(s.numel for s in stats), sum(s.signal for s in stats), sum(s.noise for s in stats))


def _grouped_keys(stats, key) -> list[tuple[object, Stat]]:
    groups: dict[object, list[Stat]] = {}
    for s in stats:
        groups.setdefault(key(s), []).append(s)
    return [(k, _sum(k if isinstance(k, str) else f"{k[0]}:{k[1]}", v)) for k, v in groups.items()]


def _grouped(stats, key) -> list[Stat]:
    return [s for _, s in _grouped_keys(stats, key)]


# ---------------------------------------------------------------------------------------------
# what the checkpoint says about itself

@dataclass(frozen=True)
class Announced:
    flavor: str | None
    format: str | None
    producer: str | None
    exclude: tuple[str, ...]
    quant_algo: str | None = None  # ModelOpt's, e.g. NVFP4 (W4A4: input_scale required)


def announced(root: Path, found: list[Violation], warnings: list[str]) -> Announced:
    """Flavor, format, producer and exclude list from config.json and hf_quant_config.json."""
    cfg = _json(root / "config.json", found) or {}
    hf = _json(root / "hf_quant_config.json", found)
    qc = cfg.get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _announced_ct(qc, found)
    if method == "modelopt" or hf is not None:
        return _announced_modelopt(qc, hf or {}, found, warnings)
    why = f"quant_method {method!r}" if method else "no quantization_config and no hf_quant_config.json"
    found.append(Violation("config", "config.json", f"not a modelopt or compressed-tensors checkpoint ({why})"))
    return Announced(None, None, None, ())


def _json(path: Path, found: list[Violation]) -> dict | None:
    if not path.exists():
        return None
    try:
        return _read_json(path)
    except HeaderError as e:
        found.append(Violation("config", path.name, str(e)))
        return None


def _announced_ct(qc: dict, found: list[Violation]) -> Announced:
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    names = {qc.get("format")} | {g.get("format") for g in groups.values() if isinstance(g, dict)}
    names = {n for n in names if isinstance(n, str) and n != "mixed-precision"}
    fmts = {CT_FORMATS.get(n) for n in names}
    fmt = None
    if len(fmts) != 1 or None in fmts:
        found.append(Violation("config", "config.json", f"compressed-tensors format(s) {sorted(map(str, names))}: "
                               f"verify supports one of {', '.join(CT_FORMATS)}"))
    else:
        fmt = fmts.pop()
    if qc.get("quantization_status") != "compressed":
        found.append(Violation("config", "config.json", f"quantization_status {qc.get('quantization_status')!r}, "
                               "expected 'compressed'"))
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        found.append(Violation("config", "config.json", "quantization_config.ignore must be a list of names"))
        ignore = []
    version = qc.get("version")  # llm-compressor writes compressed-tensors' version, no producer
    producer = _producer(qc.get("producer")) or (f"compressed-tensors {version}" if version else None)
    return Announced("compressed-tensors", fmt, producer, tuple(ignore))


def _announced_modelopt(qc: dict, hf: dict, found: list[Violation], warnings: list[str]) -> Announced:
    hq = hf.get("quantization") if isinstance(hf.get("quantization"), dict) else {}
    algos = {str(a) for a in (hq.get("quant_algo"), qc.get("quant_algo")) if a is not None}
    algo = next(iter(algos)) if len(algos) == 1 else None
    if len(algos) > 1:
        found.append(Violation("config", "hf_quant_config.json", f"quant_algo {sorted(algos)} differs between "
                               "hf_quant_config.json and config.json"))
    elif algo not in MODELOPT_ALGOS:  # MIXED_PRECISION (per-layer algorithms) included
        found.append(Violation("config", "hf_quant_config.json", f"quant_algo {algo}: verify supports "
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
    if isinstance(p, dict):
        return " ".join(str(p[k]) for k in ("name", "version") if p.get(k) is not None) or None
    return None


def excluded(module: str, patterns: tuple[str, ...], flavor: str | None) -> bool:
    """Does an exclude list name this module? compressed-tensors (vLLM's should_ignore_layer): an
    exact name or a `re:` pattern matched from the start. ModelOpt (vLLM's is_layer_excluded): an
    exact name, a wildcard (fnmatch), or a dotted part of the name (`lm_head`, `mlp.gate`)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
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
    total = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    actual = sum(t.nbytes for hdr in headers.values() for t in hdr.values())
    if total is None:
        warnings.append(f"{INDEX_NAME}: no metadata.total_size")
    elif total != actual:
        found.append(Violation("index", INDEX_NAME, f"metadata.total_size {total} != {actual} bytes of tensor data"))
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


def _roles(fl: Flavor, fmt: str, quant_algo: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(required role -> dtype, optional role -> dtype) of a quantized module."""
    if fmt == "nvfp4":
        req = {fl.packed_name: "U8", "weight_scale": "F8_E4M3", fl.global_name: "F32"}
        inp = "input_scale" if fl.name == "modelopt" else "input_global_scale"
        opt = {inp: "F32", "weight_shape": ""}
        if quant_algo == "NVFP4":  # W4A4: without input_scale older vLLM zeroed every expert
            req[inp] = opt.pop(inp)
        return req, opt
    return {"weight": "F8_E4M3", "weight_scale": "F32"}, {"input_scale": "F32"}


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
        if t is not None and dtype and t.dtype != dtype:
            bad.append(f"{role} is {t.dtype}, expected {dtype}")
    w, s = m.tensors.get(fl.packed_name if fmt == "nvfp4" else "weight"), m.tensors.get("weight_scale")
    if w is not None and len(w.shape) != 2:
        bad.append(f"weight shape {list(w.shape)} is not 2-D")
    elif w is not None and fmt == "nvfp4":
        rows, cols = w.shape
        if (2 * cols) % nvfp4.BLOCK:
            bad.append(f"packed weight {list(w.shape)}: input dim {2 * cols} is not a multiple of {nvfp4.BLOCK}")
        elif s is not None and s.shape != (rows, 2 * cols // nvfp4.BLOCK):
            bad.append(f"weight_scale {list(s.shape)} does not fit packed weight {list(w.shape)} "
                       f"(expected {[rows, 2 * cols // nvfp4.BLOCK]})")
    elif w is not None and s is not None and s.shape not in ((), (1,), (w.shape[0],), (w.shape[0], 1)):
        bad.append(f"weight_scale {list(s.shape)}: expected [], [1] or per-channel [{w.shape[0]}, 1]")
    g = m.tensors.get(fl.global_name) if fmt == "nvfp4" else None
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
    t = m.tensors.get(fl.global_name if fmt == "nvfp4" else "weight_scale")
    if t is None or t.dtype != "F32" or t.numel != 1:
        return None
    return np.float32(read_raw(t).reshape(-1)[0])


def _check_scales(m: Module, fl: Flavor, fmt: str) -> list[Violation]:
    """Global scale finite and positive; no NaN block scale (E4M3 has no Inf: 0x7F/0xFF are NaN);
    FP8 per-channel scales finite and positive."""
    out = []
    v = _global_value(m, fl, fmt)
    if v is not None and not (np.isfinite(v) and v > 0):
        out.append(Violation("global-scale", m.name, f"global scale {float(v)!r}"))
    s = m.tensors.get("weight_scale")
    if fmt == "nvfp4" and s is not None and s.dtype == "F8_E4M3":
        nan = int(np.count_nonzero((read_raw(s) & 0x7F) == 0x7F))
        if nan:
            out.append(Violation("block-scale", m.name, f"{nan} of {s.numel} block scales are NaN"))
    elif fmt == "fp8" and s is not None and s.dtype == "F32" and s.numel > 1:
        vals = read_raw(s)
        bad = int(np.count_nonzero(~(np.isfinite(vals) & (vals > 0))))
        if bad:
            out.append(Violation("global-scale", m.name, f"{bad} of {s.numel} per-channel scales NaN, Inf or <= 0"))
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
    man: dict | None
    violations: list[Violation]
    warnings: list[str]


def verify_contract(path: str | Path) -> list[Violation]:
    """Check the FORMATS.md contract of a quantized checkpoint from its headers and scale tensors.
    An empty list means the checkpoint passes. Raises SourceError if `path` is not a directory."""
    return _contract(Path(path)).violations


def _contract(root: Path) -> _Checked:
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    found: list[Violation] = []
    warnings: list[str] = []
    ann = announced(root, found, warnings)
    tensors = read_tensors(root, found, warnings)
    mods = modules(tensors)
    fl = FLAVORS.get(ann.flavor) if ann.flavor else None
    good: dict[str, Module] = {}
    gs: dict[str, np.float32] = {}
    for key, m in mods.items():
        is_out = excluded(m.base, ann.exclude, ann.flavor)
        if is_out and m.quantized:
            found.append(Violation("excluded-with-scales", m.name, f"excluded, yet has {', '.join(sorted(m.tensors))}"
                                   + (f" ({m.tensors['weight'].dtype} weight)" if "weight" in m.tensors else "")))
            continue
        if not m.quantized:
            w = m.tensors["weight"]
            if not is_out and fl is not None and len(w.shape) == 2 and w.dtype in FLOAT_DTYPES and _is_linear(key):
                found.append(Violation("unlisted-high-precision", m.name,
                                       f"{w.dtype} {list(w.shape)} linear not in the exclude list"))
            continue
        if fl is None or ann.format is None:
            continue
        problems = _check_module(m, fl, ann.format, ann.quant_algo) + _check_scales(m, fl, ann.format)
        found += problems
        v = _global_value(m, fl, ann.format)
        if v is not None:
            gs[key] = v
        if not problems:
            good[key] = m
    found += _fused(mods, gs)
    man = None
    if (root / manifest.MANIFEST_NAME).exists() and fl is not None and ann.format is not None:
        man = _check_manifest(root / manifest.MANIFEST_NAME, ann, fl, tensors, mods, gs, found)
    return _Checked(root, ann, tensors, mods, good, gs, man, found, warnings)


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


def _check_manifest(path: Path, ann: Announced, fl: Flavor, tensors: dict[str, TensorInfo],
                    mods: dict[str, Module], gs: dict[str, np.float32], found: list[Violation]) -> dict | None:
    import jsonschema

    name = path.name
    try:
        man = manifest.load(path)
    except HeaderError as e:
        found.append(Violation("manifest", name, str(e)))
        return None
    errors = sorted(jsonschema.Draft202012Validator(load_schema()).iter_errors(man), key=lambda e: list(e.path))
    for e in errors[:20]:
        where = "/".join(map(str, e.absolute_path)) or "(root)"
        found.append(Violation("manifest", name, f"schema: {where}: {e.message}"))
    if errors:
        return None
    for k in ("flavor", "format"):
        if man[k] != getattr(ann, k):
            found.append(Violation("manifest", name, f"{k} {man[k]!r}, but the checkpoint is {getattr(ann, k)!r}"))
    fmt = formats.get(man["format"])
    mt, qs = man["tensors"], man["quantizers"]
    for key, q in qs.items():
        amax, g = np.float32(q["amax"]), np.float32(q["global_scale"])
        if fmt.global_scale(amax) != g or float(g) != q["global_scale"]:
            found.append(Violation("manifest", key, f"global_scale {q['global_scale']!r} is not the "
                                   f"{man['format']} global scale of amax {q['amax']!r}"))
        for src in q["members"]:
            if mt.get(src, {}).get("quantizer") != key:
                found.append(Violation("manifest", src, f"member of quantizer {key} without a tensors entry naming it"))
    for src, e in mt.items():
        q = qs.get(e["quantizer"])
        if q is None or src not in q["members"]:
            found.append(Violation("manifest", src, f"quantizer {e['quantizer']!r} does not list it"))
            continue
        absent = [e[r] for r in ("weight", "scale", "global_scale") if e[r] not in tensors]
        if absent:
            found.append(Violation("manifest", src, f"names tensor(s) not in the checkpoint: {', '.join(absent)}"))
            continue
        v = gs.get(src)
        want = fl.scalar(man["format"], np.float32(q["global_scale"])).reshape(-1)[0]
        if v is not None and v.tobytes() != want.tobytes():
            conv = " (compressed-tensors stores 1/global_scale)" if fl.inverse_global and ann.format == "nvfp4" else ""
            found.append(Violation("manifest", src, f"{e['global_scale']} holds {float(v):.9g}, manifest quantizer "
                                   f"{e['quantizer']} says {float(want):.9g}{conv}"))
    for key, m in mods.items():
        if m.quantized and key not in mt and not excluded(m.base, ann.exclude, ann.flavor):
            found.append(Violation("manifest", m.name, "quantized, but the manifest has no entry for it"))
    for e in man["excluded"]:
        if e["name"] not in tensors:
            found.append(Violation("manifest", e["name"], "listed as excluded (kept) but not in the checkpoint"))
    return man


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# numerics against the source

def verify(path: str | Path, source: str | None = None, *, revision: str | None = None,
           min_sqnr: float | None = None) -> Report:
    """The contract of `path`; with `source` (directory or hub repo id) also every quantized tensor
    dequantized against its source tensor and every kept tensor compared byte for byte. A tensor
    under `min_sqnr` dB (default DEFAULT_MIN_SQNR of the format) is a violation."""
    t0 = time.perf_counter()
    c = _contract(Path(path))
    rep = Report(str(path), c.ann.flavor, c.ann.format, c.ann.producer,
                 sum(m.quantized for m in c.mods.values()), c.violations, c.warnings)
    if source is not None and c.ann.format is not None:
        rep.source = source
        rep.min_sqnr = DEFAULT_MIN_SQNR[c.ann.format] if min_sqnr is None else min_sqnr
        _compare(c, source, revision, rep)
    rep.seconds = time.perf_counter() - t0
    return rep


def _compare(c: _Checked, source: str, revision: str | None, rep: Report) -> None:
    ck = open_checkpoint(source, revision)
    fl, fmt = FLAVORS[c.ann.flavor], c.ann.format
    quantizer_of = {src: e["quantizer"] for src, e in (c.man or {}).get("tensors", {}).items()}
    amax: dict[str, np.float32] = {}
    for key, m in c.mods.items():
        if not m.quantized:
            continue
        src = ck.tensors.get(key)
        if src is None:
            rep.violations.append(Violation("source", m.name, f"quantized, but the source has no {key}"))
            continue
        if key not in c.good or key not in c.gs:
            continue  # malformed: already reported by the contract
        w = m.tensors[fl.packed_name if fmt == "nvfp4" else "weight"]
        want = formats.get(fmt).LAYOUT.weight_shape(src.shape) if len(src.shape) == 2 else None
        if want != w.shape:
            rep.violations.append(Violation("source", m.name, f"weight {list(w.shape)} does not fit source "
                                            f"{src.dtype}{list(src.shape)} (expected {list(want or ())})"))
            continue
        ref = to_f32(read_raw(src), src.dtype)
        deq = _dequantize(m, fl, fmt, c.gs[key])
        signal, noise = _power(ref, deq)
        qkey = quantizer_of.get(key) or _decide(key).key or m.name
        layer, proj = _layer_proj(key)
        st = TensorStat(key, int(ref.size), signal, noise, qkey, layer, proj)
        rep.tensors.append(st)
        if key in quantizer_of:
            amax[qkey] = max(amax.get(qkey, np.float32(0)), np.float32(np.max(np.abs(ref), initial=0)))
        if st.sqnr_db < rep.min_sqnr:
            rep.violations.append(Violation("sqnr", key, f"SQNR {st.sqnr_db:.2f} dB < {rep.min_sqnr:g} dB "
                                            f"(relative RMS error {st.rel_rms:.3g})"))
    for qkey, a in amax.items():
        q = c.man["quantizers"][qkey]
        if len([s for s in q["members"] if s in c.good]) == len(q["members"]) and np.float32(q["amax"]) != a:
            rep.violations.append(Violation("manifest", qkey, f"amax {q['amax']!r}, but max |W| of the source "
                                            f"members is {float(a)!r}"))
    quantized = {k for k, m in c.mods.items() if m.quantized}
    for name, s in ck.tensors.items():
        if name in quantized:
            continue
        o = c.tensors.get(name)
        if o is None:
            rep.violations.append(Violation("source", name, "source tensor neither quantized nor kept in the output"))
        elif (o.dtype, o.shape) != (s.dtype, s.shape):
            rep.violations.append(Violation("source", name, f"kept as {o.dtype}{list(o.shape)}, source is "
                                            f"{s.dtype}{list(s.shape)}"))
        elif not np.array_equal(read_raw(o), read_raw(s)):
            rep.violations.append(Violation("source", name, "kept tensor differs from the source, byte for byte"))


def _dequantize(m: Module, fl: Flavor, fmt: str, gs: np.float32) -> np.ndarray:
    scale = read_raw(m.tensors["weight_scale"])
    if fmt == "nvfp4":
        s2 = np.float32(1) / gs if fl.inverse_global else gs  # compressed-tensors stores 1/s2
        return nvfp4.dequantize(read_raw(m.tensors[fl.packed_name]), scale, s2)
    q = read_raw(m.tensors["weight"])
    if scale.size == 1:
        return fp8.dequantize(q, scale.reshape(-1)[0])
    return fp8.dequantize(q, np.float32(1)) * scale.reshape(-1, 1)  # per output channel


def _power(ref: np.ndarray, deq: np.ndarray, rows: int = 4096) -> tuple[float, float]:
    """(sum ref^2, sum (deq - ref)^2) in float64, a few thousand rows at a time."""
    signal = noise = 0.0
    for a in range(0, ref.shape[0], rows):
        r = ref[a:a + rows].astype(np.float64)
        d = deq[a:a + rows].astype(np.float64) - r
        signal += float(np.einsum("ij,ij->", r, r))
        noise += float(np.einsum("ij,ij->", d, d))
    return signal, noise


def _layer_proj(name: str) -> tuple[int | None, str]:
    """`model.layers.3.mlp.experts.7.gate_proj.weight` -> (3, "mlp.experts.*.gate_proj")."""
    m = _ROLE.fullmatch(name)
    module = m["base"] if m else name
    lm = _LAYER.fullmatch(module)
    if lm is None:
        return None, module
    return int(lm["layer"]), _EXPERT_IDX.sub(".experts.*.", "." + lm["rest"] + ".")[1:-1]


# ---------------------------------------------------------------------------------------------
# output: text table and PNG heat map

def render(rep: Report, top: int = 10, names: int = _NAMES_SHOWN) -> str:
    """The report as the CLI prints it: violations grouped per rule, then (with a source) the
    SQNR table by layer and projection and the worst tensors."""
    lines = [f"{rep.path}: {rep.flavor or '?'} flavor, {rep.format or '?'}"
             + (f", made by {rep.producer}" if rep.producer else "") + f"; {rep.modules} quantized modules"]
    lines += [f"warning: {w}" for w in rep.warnings]
    for rule, vs in rep.by_rule().items():
        lines.append(f"FAIL {rule}: {len(vs)} x {RULES.get(rule, rule)}")
        lines += [f"  {v.name}: {v.detail}" for v in vs[:names]]
        if len(vs) > names:
            lines.append(f"  ... and {len(vs) - names} more")
    if rep.source is not None and rep.tensors:
        lines += _sqnr_table(rep, top)
    lines.append("OK: no violations" if rep.ok else f"FAILED: {len(rep.violations)} violation(s) of "
                 f"{len(rep.by_rule())} rule(s)")
    return "\n".join(lines)


def _sqnr_table(rep: Report, top: int) -> list[str]:
    rows, cols, grid = heatmap_grid(rep)
    o = rep.overall()
    out = [f"source {rep.source}: {len(rep.tensors)} tensors, SQNR {o.sqnr_db:.2f} dB, relative RMS error "
           f"{o.rel_rms:.4f} (floor {rep.min_sqnr:g} dB)", "SQNR dB by layer (rows) and projection:"]
    for j, c in enumerate(cols):
        out.append(f"  [{j}] {c}")
    out.append("  layer " + " ".join(f"{f'[{j}]':>7s}" for j in range(len(cols))))
    for i, L in enumerate(rows):
        out.append(f"  {L:5d} " + " ".join(f"{v:7.2f}" if not math.isnan(v) else f"{'-':>7s}" for v in grid[i]))
    for L, p, s in rep.layers():
        if L is None:
            out.append(f"  {p}: {s.sqnr_db:.2f} dB")
    out.append(f"worst {min(top, len(rep.tensors))} tensors:")
    out += [f"  {t.sqnr_db:8.2f} dB  rel RMS {t.rel_rms:.4f}  {t.name}" for t in rep.worst(top)]
    return out


def heatmap_grid(rep: Report) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, projections, SQNR dB per cell; NaN where a layer has no such projection)."""
    cells = {(L, p): s.sqnr_db for L, p, s in rep.layers() if L is not None}
    rows = sorted({L for L, _ in cells})
    cols = list(dict.fromkeys(p for _, p in cells))
    return rows, cols, [[cells.get((L, p), math.nan) for p in cols] for L in rows]


def write_heatmap(path: str | Path, rep: Report, cell: int = 16) -> tuple[int, int]:
    """PNG heat map of SQNR by layer (rows) and projection (columns, in the order `render` lists
    them), no text. The colour scale is absolute, so pictures of different checkpoints compare:
    red at or below the SQNR floor (10 dB NVFP4, 20 dB FP8), through yellow, to green at 15 dB above
    it; grey where a layer has no such tensor. Written with zlib and struct (no plotting
    dependency). Returns (width, height) in pixels."""
    rows, cols, grid = heatmap_grid(rep)
    vals = np.array(grid, dtype=np.float64).reshape(len(rows), len(cols))
    finite = vals[np.isfinite(vals)]
    lo = rep.min_sqnr if rep.min_sqnr is not None else (float(finite.min()) if finite.size else 0.0)
    hi = lo + 15.0
    t = np.clip((np.nan_to_num(vals, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.empty(vals.shape + (3,), np.uint8)
    rgb[..., 0] = np.where(t < 0.5, 220, 220 * (1 - t) * 2).astype(np.uint8)
    rgb[..., 1] = np.where(t < 0.5, 40 + 360 * t, 200).astype(np.uint8)
    rgb[..., 2] = 40
    rgb[np.isnan(vals)] = (128, 128, 128)
    img = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    write_png(path, img)
    return img.shape[1], img.shape[0]


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG of an [height, width, 3] uint8 array."""
    h, w, _ = rgb.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + np.ascontiguousarray(row).tobytes() for row in rgb)  # filter 0 per row
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
