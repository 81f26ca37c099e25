"""`verify --engine`: any checkpoint (ours, llm-compressor's, ModelOpt's, DeepSeek's block FP8) against
each serving engine's loading contract, as the engine reads it (docs/formats.md, "verify --engine").

The contracts are data: one table per engine in `engine_rules/<engine>.json` (package data), each with

- `reads`: how that engine parses a checkpoint: which config file wins (`config_sources`), how it
  spells `quant_algo` (`algo_case`, `algo_aliases`, `algo_reroute`, `algo_map` from compressed-tensors
  groups and `quant_method: fp8` to its own algorithm names), which keys hold the exclude list and how
  an entry matches a module (`exclude_keys`, `exclude_match`), how compressed-tensors `targets` match
  (`target_classes`), whether the MoE scheme is expert 0's (`moe_scheme`) and which modules it fuses
  (`fused`);
- `rules`: one row per engine fact (docs/formats.md names its source): `id`, `flavor`, `applies_to`
  (a predicate over the checkpoint and its modules, vocabulary in APPLIES_TO), an optional `when` (a
  runtime condition: such a finding is a caveat, never a failure), `check` (a function of CHECKS) with
  its `params`, the human `requires`, `on_violation` (refuse | garbage | degraded, plus a note) and
  `source`.

Nothing here branches on an engine's name: the engine is a column of the table. docs/engine_rules.json
is generated from the tables (`python -m shardquant.engines docs/engine_rules.json`).

Only headers are read, plus the few scale values a rule compares (fused global scales) or decodes (E8M0
bytes). Whatever the directory holds, what this module finds is a Finding, never an exception (the
contract check of verify.py reports what is unreadable).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import json
import math
import re
import reprlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import HeaderError
from .report import Violation
from .st import STORAGE, TensorInfo, read_raw

if TYPE_CHECKING:
    from .verify import Module

RULES_DIR = Path(__file__).with_name("engine_rules")
KINDS = ("refuse", "garbage", "degraded")
FLAVOR_OF_METHOD = {"modelopt": "modelopt", "compressed-tensors": "compressed-tensors", "fp8": "block-fp8"}
FLAVORS = tuple(FLAVOR_OF_METHOD.values())
# applies_to vocabulary. Checkpoint-level keys are read from the config the engine reads; the others
# select modules (a rule with module keys applies when at least one quantized module matches, and its
# check sees those modules). `config.<key>` is a key of that config; `model.<key>` a key of config.json
# itself (model_type, architectures: the model code the engine builds).
CHECKPOINT_KEYS = ("quant_algo", "config_file")
MODULE_KEYS = ("layer_algo", "moe", "fused", "format", "scale_dtype", "input_activations")
SCHEME_PREFIXES = ("weights.", "input_activations.")
_MAX_FINDINGS = 200  # per rule: a 1000-expert model missing every input_scale is one problem, said 200 times at most


# ---------------------------------------------------------------------------------------------
# the tables

@dataclass(frozen=True)
class Rule:
    engine: str
    id: str
    flavor: str  # a flavor name, or "any"
    applies_to: tuple[dict, ...]  # alternatives (any of them); () = always
    check: str
    params: dict
    requires: str
    on_violation: str
    source: str
    when: str | None = None

    @property
    def kind(self) -> str:
        return self.on_violation.split(" ", 1)[0]

    @property
    def qualified(self) -> str:
        return f"{self.engine}:{self.id}"

    def row(self) -> dict:
        """The rule as docs/engine_rules.json lists it."""
        d = {"engine": self.engine, "id": self.id, "flavor": self.flavor,
             "applies_to": (self.applies_to[0] if len(self.applies_to) == 1 else list(self.applies_to))
             if self.applies_to else {}}
        if self.when:
            d["when"] = self.when
        d.update(check=self.check, params=self.params, requires=self.requires, on_violation=self.on_violation,
                 source=self.source)
        return d


@dataclass(frozen=True)
class Engine:
    name: str
    label: str
    version: str
    reads: dict
    rules: tuple[Rule, ...]


@functools.lru_cache(maxsize=1)
def tables() -> dict[str, Engine]:
    """Every engine's table, in the tables' own order."""
    found = []
    for path in sorted(RULES_DIR.glob("*.json")):
        t = json.loads(path.read_text(encoding="utf-8"))
        name = t["engine"]
        rules = tuple(Rule(name, r["id"], r["flavor"], _alternatives(r["applies_to"]), r["check"], r.get("params", {}),
                           r["requires"], r["on_violation"], r["source"], r.get("when")) for r in t["rules"])
        found.append((t.get("order", 0), Engine(name, t["label"], t["version"], t["reads"], rules)))
    return {e.name: e for _, e in sorted(found, key=lambda x: (x[0], x[1].name))}


def _alternatives(a: dict | list) -> tuple[dict, ...]:
    if isinstance(a, list):
        return tuple(a)
    return (a,) if a else ()


def engine_names() -> list[str]:
    return list(tables())


def all_rules() -> list[Rule]:
    return [r for e in tables().values() for r in e.rules]


def docs_table() -> str:
    """docs/engine_rules.json: every rule of every table, one a line (generated; never edit it by hand)."""
    return "[\n" + ",\n".join(json.dumps(r.row(), ensure_ascii=False) for r in all_rules()) + "\n]\n"


def problems() -> list[str]:
    """What is wrong with the tables themselves: unknown checks, params, predicate keys or kinds,
    duplicate ids, missing sources. The test suite requires none."""
    out = []
    seen = set()
    for r in all_rules():
        where = r.qualified
        if r.qualified in seen:
            out.append(f"{where}: duplicate id")
        seen.add(r.qualified)
        if r.check not in CHECKS:
            out.append(f"{where}: unknown check {r.check!r}")
        else:
            extra = set(r.params) - set(CHECKS[r.check].params)
            if extra:
                out.append(f"{where}: check {r.check} takes no params {sorted(extra)}")
        if r.kind not in KINDS:
            out.append(f"{where}: on_violation {r.on_violation!r} is not one of {KINDS}")
        if r.flavor != "any" and r.flavor not in FLAVORS:
            out.append(f"{where}: flavor {r.flavor!r}")
        if "@" not in r.source or not r.requires:
            out.append(f"{where}: a source (path@version function) and a requires sentence are needed")
        for expr in _expressions(r.params):
            try:
                names = {n.id.removesuffix("_") for n in ast.walk(_expr(expr)) if isinstance(n, ast.Name)} - {"ceil"}
                _value_of(expr, tuple((n, 256) for n in _EXPR_NAMES))
            except (SyntaxError, ValueError) as e:
                out.append(f"{where}: shape expression {expr!r}: {e}")
                continue
            if names - set(_EXPR_NAMES):
                out.append(f"{where}: shape expression {expr!r} names {sorted(names - set(_EXPR_NAMES))}")
        for alt in r.applies_to:
            for k in alt:
                if not (k in CHECKPOINT_KEYS or k in MODULE_KEYS or k.startswith(SCHEME_PREFIXES)
                        or k.startswith(("config.", "model."))):
                    out.append(f"{where}: applies_to key {k!r} is not in the vocabulary")
    for e in tables().values():
        for flavor, mode in e.reads.get("exclude_match", {}).items():
            if mode not in MATCHERS:
                out.append(f"{e.name}: exclude_match {flavor} {mode!r} is not one of {sorted(MATCHERS)}")
    return out


def _expressions(params: dict) -> list[str]:
    """The shape and divisor expressions of a module_spec row."""
    out = [v for v in params.get("divisible", {}).values() if isinstance(v, str)]
    for spec in params.get("tensors", {}).values():
        out += [x for x in spec.get("shape", []) if isinstance(x, str)]
    return out


# ---------------------------------------------------------------------------------------------
# the checkpoint, as every engine sees it

def load_json(path: Path) -> object:
    """A config file's JSON document as an engine gets it; None where it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, UnicodeError):
        return None


@dataclass
class Checkpoint:
    root: Path
    config: dict  # config.json ({} if absent or not an object)
    hf: dict | None  # hf_quant_config.json, when an object
    tensors: dict[str, TensorInfo]
    modules: dict[str, Module]
    values: dict[str, np.ndarray | None] = field(default_factory=dict)  # small scale tensors read so far

    def scalar(self, t: TensorInfo | None) -> np.ndarray | None:
        """A small fp32 tensor's values (a global or input scale), or None if absent, large or unreadable."""
        if t is None or t.dtype != "F32" or t.numel > 4096:
            return None
        if t.name not in self.values:
            try:
                self.values[t.name] = read_raw(t).reshape(-1)
            except (HeaderError, OSError, ValueError):
                self.values[t.name] = None
        return self.values[t.name]

    def prefetch(self, ts) -> None:
        """Read ahead what scalar() would read of the tensors `ts`, one open per file (a MoE checkpoint
        has thousands of such scalars); scalar() reads any left, and says what failed."""
        by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
        for t in ts:
            if t is not None and t.dtype == "F32" and t.numel <= 4096 and t.name not in self.values:
                by_file[t.file].append(t)
        for path, group in by_file.items():
            try:
                with open(path, "rb", buffering=0) as f:
                    for t in sorted(group, key=lambda t: t.offset):
                        f.seek(t.offset)
                        b = f.read(t.nbytes)
                        if len(b) == t.nbytes:
                            self.values[t.name] = np.frombuffer(b, dtype=STORAGE[t.dtype]).copy()
            except OSError:
                continue

    @classmethod
    def read(cls, root: Path, tensors: dict[str, TensorInfo] | None = None) -> Checkpoint:
        from .verify import read_tensors  # verify imports this module inside verify()

        cfg = load_json(root / "config.json")
        hf = load_json(root / "hf_quant_config.json") if (root / "hf_quant_config.json").exists() else None
        if tensors is None:
            tensors = read_tensors(root, [], [])  # unreadable files: the contract check says so
        return cls.of(root, cfg, hf, tensors)

    @classmethod
    def of(cls, root: Path, config: object, hf: object, tensors: dict[str, TensorInfo]) -> Checkpoint:
        """From config.json's and hf_quant_config.json's parsed contents (None: absent) and the headers."""
        from .verify import modules

        return cls(root, config if isinstance(config, dict) else {}, hf if isinstance(hf, dict) else None, tensors,
                   modules(tensors))

    @property
    def inline(self) -> dict | None:
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) else None


_EXPERT = re.compile(r"(?P<layer>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.\d+\.")


@dataclass
class Mod:
    """One module (a weight and the tensors that quantize it) as an engine sees it."""

    m: Module
    name: str  # the module's name in the checkpoint (TransformerEngine's grouped `m.weight{E}` as such)
    proj: str  # last name segment
    quantized: bool
    moe_layer: str | None = None  # `….experts`, for a routed expert
    expert: str | None = None
    fused_key: str | None = None  # `<parent>.<fused name>` when the engine fuses it with siblings
    fused: bool = False  # a fused set with at least two members present
    prefix: str = ""  # the engine's own module name: the fused layer's, or the MoE layer's for experts
    excluded_by: str | None = None  # the exclude entry that unquantizes it in this engine, if any
    group: str | None = None  # compressed-tensors config group
    scheme: dict = field(default_factory=dict)  # `format`, `weights.*`, `input_activations(.*)`
    layer_algo: str | None = None
    group_size: int | None = None

    def tensor(self, role: str) -> TensorInfo | None:
        return self.m.tensors.get(role)

    @property
    def weight(self) -> TensorInfo | None:
        return self.m.tensors.get("weight_packed") or self.m.tensors.get("weight")

    def dims(self) -> tuple[int, int] | None:
        """(out, in) of the weight: a uint8 weight holds two 4-bit codes a byte."""
        w = self.weight
        if w is None or len(w.shape) != 2:
            return None
        return w.shape[0], w.shape[1] * (2 if w.dtype == "U8" else 1)


class View:
    """A checkpoint as one engine reads it: the config it takes, its algorithm, exclude list and
    per-module scheme (docs/formats.md section 1)."""

    def __init__(self, engine: Engine, ck: Checkpoint):
        self.engine, self.ck, self.reads = engine, ck, engine.reads
        self.source, self.qc = self._config()
        self.flavor = self._flavor()
        self.groups = self._groups()
        self.algo = self._algo()
        self.exclude_key, self.exclude_value, self.exclude = self._exclude()
        self.block = self._block()
        self.mods = self._mods()
        self.quantized = [m for m in self.mods.values() if m.quantized]
        self._sigs: dict[tuple[str, ...], list[tuple]] = {}  # _signatures

    # -- config
    def _config(self) -> tuple[str | None, dict]:
        for src in self.reads.get("config_sources", []):
            if src["file"] == "config.json":
                qc = self.ck.inline
            else:
                q = self.ck.hf.get("quantization") if self.ck.hf is not None else None
                qc = q if isinstance(q, dict) else None
            if qc is None:
                continue
            unless = src.get("unless")
            if unless and all(_matches(v, qc.get(k)) for k, v in unless.items()):
                continue
            return src["file"], qc
        return None, {}

    def _flavor(self) -> str | None:
        if self.source == "hf_quant_config.json":
            return "modelopt"
        method = self.qc.get("quant_method")
        if isinstance(method, str):
            return FLAVOR_OF_METHOD.get(method)
        return "modelopt" if method is None and "quant_algo" in self.qc else None

    def _groups(self) -> dict[str, dict]:
        g = self.qc.get("config_groups") if self.flavor in ("compressed-tensors", "modelopt") else None
        if not isinstance(g, dict):
            return {}
        return {str(k): v for k, v in g.items() if isinstance(v, dict)}

    def normalize(self, algo: object) -> str | None:
        if not isinstance(algo, str):
            return None
        if self.reads.get("algo_case") == "upper":
            algo = algo.upper()
        for k, v in self.reads.get("algo_aliases", {}).items():
            if algo.upper() == k.upper():
                return v
        return algo

    def _algo(self) -> str | None:
        if self.flavor == "modelopt":
            algo = self.normalize(self.qc.get("quant_algo"))
            for r in self.reads.get("algo_reroute", []):
                if (algo == r["from"] and self.source == r["file"] and self.groups
                        and all(_fields_match(r["all_groups"], _flat_scheme(g, None)) for g in self.groups.values())):
                    algo = r["to"]
            return algo
        if self.flavor == "block-fp8":
            return self._mapped({})
        if self.flavor == "compressed-tensors":
            algos = [self._mapped(_flat_scheme(g, self.qc.get("format"))) for g in self.groups.values()]
            if len(algos) > 1 and all(algos):
                return "MIXED_PRECISION"
            return algos[0] if len(algos) == 1 else None
        return None

    def _mapped(self, scheme: dict) -> str | None:
        """The engine's own algorithm name for a compressed-tensors scheme or a block-fp8 config."""
        for e in self.reads.get("algo_map", []):
            if e["flavor"] == self.flavor and _fields_match(e["when"], scheme):
                return e["algo"]
        return None

    def _exclude(self) -> tuple[str | None, object, tuple[str, ...]]:
        """(the first exclude key present, its value, every string entry the engine reads)."""
        form = self.flavor or ""
        if self.flavor == "modelopt":
            form = "modelopt-nested" if self.source == "hf_quant_config.json" else "modelopt-flat"
        keys = self.reads.get("exclude_keys", {}).get(form, [])
        first, value, entries = None, None, []
        for k in keys:
            if k not in self.qc:
                continue
            if first is None:
                first, value = k, self.qc[k]
            v = self.qc[k]
            if isinstance(v, list):
                entries += [x for x in v if isinstance(x, str)]
            if not self.reads.get("exclude_keys_merge"):
                break
        return first, value, tuple(dict.fromkeys(entries))

    def _block(self) -> tuple[int, int]:
        b = self.qc.get("weight_block_size") if self.flavor == "block-fp8" else None
        if isinstance(b, list) and len(b) == 2 and all(type(x) is int and x > 0 for x in b):
            return b[0], b[1]
        return 128, 128

    # -- modules
    def _mods(self) -> dict[str, Mod]:
        fused_of = {mem: f["name"] for f in self.reads.get("fused", []) for mem in f["members"]}
        out: dict[str, Mod] = {}
        for key, m in self.ck.modules.items():
            if "weight" not in m.tensors and "weight_packed" not in m.tensors:
                continue
            name = m.name
            proj = m.base.rsplit(".", 1)[-1]
            mod = Mod(m, name, proj, m.quantized)
            e = _EXPERT.fullmatch(m.base)
            if e:
                mod.moe_layer, mod.expert = e["layer"], e["expert"]
            elif m.idx and ".experts." in f".{m.base}.":  # TransformerEngine's grouped experts
                mod.moe_layer, mod.expert = m.base.rsplit(".", 1)[0], m.idx
            if proj in fused_of and not m.idx:
                mod.fused_key = f"{m.base.rsplit('.', 1)[0]}.{fused_of[proj]}" if "." in m.base else fused_of[proj]
            mod.prefix = mod.moe_layer or mod.fused_key or name
            out[key] = mod
        sets = defaultdict(list)
        for mod in out.values():
            if mod.fused_key:
                sets[mod.fused_key].append(mod)
        for members in sets.values():
            for mod in members:
                mod.fused = len(members) > 1
        self.fused_sets = {k: sorted(v, key=lambda x: _member_order(self.reads, x.proj)) for k, v in sets.items()
                           if len(v) > 1}
        match = MATCHERS.get(self.reads.get("exclude_match", {}).get(self.flavor or "", ""), _no_match)
        for mod in out.values():
            mod.excluded_by = match(mod, self.exclude)
        if self.flavor == "compressed-tensors":
            self._resolve_groups(out)
        elif self.flavor == "modelopt":
            self._resolve_modelopt(out)
        elif self.flavor == "block-fp8":
            for mod in out.values():
                if mod.quantized:
                    mod.layer_algo = self._mapped({})
        return out

    def _resolve_groups(self, mods: dict[str, Mod]) -> None:
        classes = self.reads.get("target_classes", [])
        top = self.qc.get("format")
        for mod in mods.values():
            if mod.excluded_by is None and mod.dims() is not None:  # a linear: a 2-D weight
                mod.group = self.group_of(mod.name, classes)
        if self.reads.get("moe_scheme") == "expert0":
            zero = {(m.moe_layer, m.proj): m for m in mods.values() if m.moe_layer and m.expert == "0"}
            for mod in mods.values():
                first = zero.get((mod.moe_layer, mod.proj)) if mod.moe_layer else None
                if first is not None:
                    mod.group = first.group
        for mod in mods.values():
            if mod.group is not None and mod.quantized:
                mod.scheme = _flat_scheme(self.groups[mod.group], top)
                mod.layer_algo = self._mapped(mod.scheme)

    def group_of(self, name: str, classes: list[str]) -> str | None:
        """The config group whose targets name the module: an exact name first, then a `re:` regex
        (matched from the start), then a class name (`Linear`); one group of a single-group config
        applies to every module when the engine matches no class names."""
        if not classes and len(self.groups) == 1:
            return next(iter(self.groups))
        for test in (lambda t: t == name,
                     lambda t: t.startswith("re:") and _re_match(t[3:], name),
                     lambda t: t in classes):
            for g, body in self.groups.items():
                targets = body.get("targets")
                if isinstance(targets, list) and any(isinstance(t, str) and test(t) for t in targets):
                    return g
        return None

    def _resolve_modelopt(self, mods: dict[str, Mod]) -> None:
        layers = self.layers()
        default_gs = _int(self.qc.get("group_size"))
        for mod in mods.values():
            if not mod.quantized:
                continue
            if self.algo == "MIXED_PRECISION":
                entry = self.layer_entry(mod, layers)
                if entry is not None:
                    mod.layer_algo = self.normalize(entry.get("quant_algo"))
                    mod.group_size = _int(entry.get("group_size"))
            else:
                mod.layer_algo = self.algo
                mod.group_size = default_gs

    def layers(self) -> dict[str, dict]:
        q = self.qc.get("quantized_layers")
        return {k: v for k, v in q.items() if isinstance(v, dict)} if isinstance(q, dict) else {}

    def layer_entry(self, mod: Mod, layers: dict[str, dict]) -> dict | None:
        """MIXED_PRECISION: the module's entry: its own name, its fused layer's, or for a routed
        expert the first entry under its MoE layer (or the layer's `mlp.` parent)."""
        for k in (mod.name, mod.fused_key):
            if k and k in layers:
                return layers[k]
        if mod.moe_layer:
            parent = mod.moe_layer.rsplit(".", 1)[0]
            for p in (mod.moe_layer + ".", parent + "."):
                for k, v in layers.items():
                    if k.startswith(p):
                        return v
        return None

    # -- predicates
    def checkpoint_value(self, key: str) -> object:
        if key == "quant_algo":
            return self.algo
        if key == "config_file":
            return self.source
        if key.startswith("config."):
            return self.qc.get(key[len("config."):])
        if key.startswith("model."):  # config.json's own keys: the architecture the engine builds
            return self.ck.config.get(key[len("model."):])
        raise KeyError(key)

    def _signatures(self, keys: tuple[str, ...]) -> list[tuple]:
        """Each quantized module's values of these predicate keys, as memo keys; made once per set
        of keys (a table's rules ask few distinct sets, of thousands of modules)."""
        if keys not in self._sigs:
            self._sigs[keys] = [tuple(_hashable(_module_value(self, m, k)) for k in keys) for m in self.quantized]
        return self._sigs[keys]

    def select(self, rule: Rule) -> list[Mod] | None:
        """The quantized modules a rule applies to, or None when it does not apply."""
        if rule.flavor != "any" and rule.flavor != self.flavor:
            return None
        if self.flavor is None:
            return None
        chosen: dict[str, Mod] = {}
        applies = False
        for alt in rule.applies_to or ({},):
            ck = {k: v for k, v in alt.items() if k in CHECKPOINT_KEYS or k.startswith(("config.", "model."))}
            mk = {k: v for k, v in alt.items() if k not in ck}
            if not all(_matches(v, self.checkpoint_value(k)) for k, v in ck.items()):
                continue
            if not mk:
                applies = True
                chosen.update((m.name, m) for m in self.quantized)
                continue
            memo: dict[tuple, bool] = {}  # modules alike in every predicate value are decided once
            keys = tuple(mk)
            hit = []
            for m, sig in zip(self.quantized, self._signatures(keys)):
                if sig not in memo:
                    memo[sig] = all(_matches(v, _module_value(self, m, k)) for k, v in mk.items())
                if memo[sig]:
                    hit.append(m)
            if hit:
                applies = True
                chosen.update((m.name, m) for m in hit)
        return list(chosen.values()) if applies else None


def _hashable(x: object) -> object:
    """A predicate value as a memo key: typed (true and 1 are different keys), lists and maps as JSON."""
    return type(x).__name__, (json.dumps(x, sort_keys=True, default=str) if isinstance(x, (dict, list)) else x)


def _member_order(reads: dict, proj: str) -> int:
    for f in reads.get("fused", []):
        if proj in f["members"]:
            return f["members"].index(proj)
    return 0


def _module_value(view: View, m: Mod, key: str) -> object:
    if key == "layer_algo":
        return m.layer_algo
    if key == "moe":
        return m.moe_layer is not None
    if key == "fused":
        return m.fused
    if key == "scale_dtype":
        t = m.tensor("weight_scale") or m.tensor("weight_scale_inv")
        return t.dtype if t is not None else None
    return m.scheme.get(key)


def _flat_scheme(group: dict, top_format: object) -> dict:
    """A compressed-tensors group as predicate fields: `format` (the group's, else the top level's),
    `weights.<k>`, `input_activations` and `input_activations.<k>`."""
    out: dict = {"format": group.get("format") if isinstance(group.get("format"), str) else
                 top_format if isinstance(top_format, str) else None}
    w = group.get("weights")
    a = group.get("input_activations")
    out["input_activations"] = a
    for prefix, d in (("weights.", w), ("input_activations.", a)):
        if isinstance(d, dict):
            for k, v in d.items():
                out[prefix + str(k)] = v
    return out


def _fields_match(spec: dict, fields: dict) -> bool:
    return all(_matches(v, fields.get(k)) for k, v in spec.items())


def _matches(spec: object, actual: object) -> bool:
    """A predicate value: a list is any of its values; {"set": b} is whether the value is present
    (not null); {"not": x} negates; null is absent or null; otherwise equality (true is not 1)."""
    if isinstance(spec, list):
        return any(_matches(s, actual) for s in spec)
    if isinstance(spec, dict):
        if "set" in spec:
            return (actual is not None) == bool(spec["set"])
        if "not" in spec:
            return not _matches(spec["not"], actual)
        return spec == actual
    if isinstance(spec, bool) or isinstance(actual, bool):
        return isinstance(spec, bool) and isinstance(actual, bool) and spec == actual
    return spec == actual


def _int(x: object) -> int | None:
    return x if type(x) is int else None


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern | None:
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError):
        return None


def _re_match(pattern: str, name: str) -> bool:
    rx = _regex(pattern)
    return rx is not None and rx.match(name) is not None


# ---------------------------------------------------------------------------------------------
# how an exclude entry matches a module, per engine and flavor (the modes are named in each table's
# reads.exclude_match; docs/formats.md 1.1-1.3)

def _no_match(mod: Mod, entries: tuple[str, ...]) -> str | None:
    return None


# A checkpoint has thousands of modules and an exclude list tens of entries; most modules match
# none. Each entry list is compiled once into one regex that finds whether any entry could match, so
# only a module that some entry matches is searched entry by entry for the first (the engine's order).

@functools.lru_cache(maxsize=64)
def _any_fnmatch(entries: tuple[str, ...]) -> re.Pattern:
    """Matches (re.match) a name that some entry fnmatches (fnmatch.fnmatchcase's own translation)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(e)})" for e in entries) or r"(?!)")


@functools.lru_cache(maxsize=64)
def _any_substring(entries: tuple[str, ...]) -> re.Pattern:
    """Finds (re.search) a name that holds some non-empty entry as a substring."""
    return re.compile("|".join(re.escape(e) for e in entries if e) or r"(?!)")


@functools.lru_cache(maxsize=64)
def _entry_set(entries: tuple[str, ...]) -> frozenset[str]:
    return frozenset(entries)


def _substring_fnmatch(mod: Mod, entries: tuple[str, ...]) -> str | None:
    """Exact (the shard's own name, or the engine's fused/MoE layer name), then substring of the
    engine's layer name (also without `language_model.`), then an fnmatch wildcard."""
    plain = mod.prefix.replace("language_model.", "")
    exact = _entry_set(entries)
    if not ((not mod.moe_layer and mod.name in exact) or mod.prefix in exact
            or _any_substring(entries).search(mod.prefix) or _any_substring(entries).search(plain)
            or _any_fnmatch(entries).match(mod.prefix)):
        return None
    for e in entries:
        if (not mod.moe_layer and e == mod.name) or e == mod.prefix:
            return e
    for e in entries:
        if e and (e in mod.prefix or e in plain):
            return e
        if fnmatch.fnmatchcase(mod.prefix, e):
            return e
    return None


def _regex_parts(mod: Mod, entries: tuple[str, ...]) -> str | None:
    """Each entry as a regex (`.` literal, `*` any), full-matched against the whole name and against
    each dotted part (the module's own name and the engine's layer name)."""
    names = (mod.name, mod.prefix)
    parts = {p for n in names for p in n.split(".")}
    for e in entries:
        if "*" not in e:  # no wildcard: the whole name, or (without a dot) one part, equal to it
            if e in names or ("." not in e and e in parts):
                return e
            continue
        rx = _regex(".*".join(re.escape(p) for p in e.split("*")))
        if rx is not None and (any(rx.fullmatch(n) for n in names) or any(rx.fullmatch(p) for p in parts)):
            return e
    return None


def _exact_or_re(mod: Mod, entries: tuple[str, ...]) -> str | None:
    for e in entries:
        if e == mod.name or (e.startswith("re:") and _re_match(e[3:], mod.name)):
            return e
    return None


def _exact_re_suffix(mod: Mod, entries: tuple[str, ...]) -> str | None:
    for e in entries:
        if (e == mod.name or (e.startswith("re:") and _re_match(e[3:], mod.name))
                or (e and mod.name.endswith("." + e))):
            return e
    return None


def _fnmatch(mod: Mod, entries: tuple[str, ...]) -> str | None:
    if not (mod.name in _entry_set(entries) or _any_fnmatch(entries).match(mod.name)
            or _any_fnmatch(entries).match(mod.prefix)):
        return None
    for e in entries:
        if e == mod.name or fnmatch.fnmatchcase(mod.name, e) or fnmatch.fnmatchcase(mod.prefix, e):
            return e
    return None


def _exact(mod: Mod, entries: tuple[str, ...]) -> str | None:
    for e in entries:
        if e in (mod.name, mod.prefix):
            return e
    return None


def _exact_model_prefix(mod: Mod, entries: tuple[str, ...]) -> str | None:
    for e in entries:
        if e in (mod.name, mod.prefix) or f"model.{e}" in (mod.name, mod.prefix):
            return e
    return None


MATCHERS = {"substring-fnmatch": _substring_fnmatch, "regex-parts": _regex_parts, "exact-or-re": _exact_or_re,
            "exact-re-suffix": _exact_re_suffix, "fnmatch": _fnmatch, "exact": _exact,
            "exact-model-prefix": _exact_model_prefix}


# ---------------------------------------------------------------------------------------------
# the check library: check(view, modules the rule selected, params) -> [(name, what is wrong)]

@dataclass(frozen=True)
class Check:
    fn: object
    params: tuple[str, ...]
    values: bool = False  # reads tensor values from the shards, not only headers and configs


CHECKS: dict[str, Check] = {}


def _register(*params: str, values: bool = False):
    def register(fn):
        CHECKS[fn.__name__.removeprefix("check_")] = Check(fn, params, values)
        return fn
    return register


def _cfg_name(view: View) -> str:
    return view.source or "config.json"


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel, _REPR.maxlong = 80, 60, 6, 4, 2, 40


def _short(x: object, n: int = 80) -> str:
    """A config value in a message: bounded in length and depth, whatever the file holds."""
    s = _REPR.repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


@_register("present", "one_of", "equal", "length", "if_set", "layers")
def check_config_spec(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """Keys of the config the engine reads: present, one of the accepted values (quant_algo as the
    engine spells it; with `layers`, each MIXED_PRECISION quantized_layers entry too), equal to a value,
    of a length, and a key's accepted values when another key is set."""
    qc, out, where = view.qc, [], _cfg_name(view)

    def value(k: str) -> object:
        return view.algo if k == "quant_algo" else qc.get(k)

    for k in p.get("present", []):
        if k not in qc:
            out.append((where, f"no key {k!r}"))
    for k, allowed in p.get("one_of", {}).items():
        if value(k) not in allowed:
            read_as = f" (read as {_short(value(k))})" if value(k) != qc.get(k) else ""
            out.append((where, f"{k} {_short(qc.get(k))}{read_as} is not one it accepts"))
        if p.get("layers") and k == "quant_algo":
            for name, entry in view.layers().items():
                a = view.normalize(entry.get("quant_algo"))
                if a not in allowed:
                    out.append((name, f"quantized_layers entry quant_algo {_short(entry.get('quant_algo'))} "
                                      "is not one it accepts"))
    for k, want in p.get("equal", {}).items():
        if qc.get(k) != want:
            out.append((where, f"{k} is {_short(qc.get(k))}, not {_short(want)}"))
    for k, n in p.get("length", {}).items():
        v = qc.get(k)
        if v is not None and not (isinstance(v, list) and len(v) == n):
            out.append((where, f"{k} {_short(v)} does not have {n} entries"))
    for k, cond in p.get("if_set", {}).items():
        if qc.get(k) is not None:
            for k2, allowed in cond.items():
                if qc.get(k2) not in allowed:
                    out.append((where, f"{k} is set, so {k2} must be one of {allowed}, not {_short(qc.get(k2))}"))
    return out


@_register()
def check_exclude_list(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """The exclude list, under the first key the engine reads, is a list of strings (never null)."""
    if view.exclude_key is None:
        return []
    v = view.exclude_value
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return [(_cfg_name(view), f"{view.exclude_key} is {_short(v)}, not a list of module names")]
    return []


def _kv(x: object) -> object:
    """A KV-cache setting in one spelling: a compressed-tensors scheme dict becomes its algorithm."""
    if isinstance(x, dict):
        return "FP8" if x.get("type") == "float" and x.get("num_bits") == 8 else _short(x)
    return x


@_register("pairs")
def check_configs_agree(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """hf_quant_config.json's `quantization` and config.json's quantization_config say the same
    (nested key, flat key pairs; lists compared as sets)."""
    hq = view.ck.hf.get("quantization") if view.ck.hf is not None else None
    qc = view.ck.inline
    if not isinstance(hq, dict) or qc is None:
        return []
    out = []
    for nested, flat in p["pairs"]:
        a, b = _kv(hq.get(nested)), _kv(qc.get(flat, qc.get(nested)))
        if isinstance(a, list) and isinstance(b, list):
            same = {json.dumps(x) for x in a} == {json.dumps(x) for x in b}
        else:
            same = a == b
        if not same:
            out.append(("hf_quant_config.json", f"{nested} {_short(a)} but config.json {flat} {_short(b)}"))
    return out


@_register()
def check_groups_recognized(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """Every compressed-tensors config group is a scheme the engine maps to one of its algorithms."""
    out = []
    for name, g in view.groups.items():
        s = _flat_scheme(g, view.qc.get("format"))
        if view._mapped(s) is None:
            w = {k[len("weights."):]: s[k] for k in ("weights.type", "weights.num_bits", "weights.strategy",
                                                    "weights.group_size") if k in s}
            a = s.get("input_activations")
            act = "no input activations" if a is None else f"input_activations {_short(a, 60)}"
            out.append((f"config_groups.{name}", f"weights {_short(w, 110)} with {act}: not a scheme it maps"))
    return out


_EXPR_NAMES = ("out", "in", "group", "b0", "b1")


@functools.lru_cache(maxsize=256)
def _expr(text: str) -> ast.AST:
    return ast.parse(re.sub(r"\bin\b", "in_", text), mode="eval").body  # `in` is a Python keyword


def _eval(node: ast.AST, env: dict) -> Fraction | None:
    """A shape expression over out, in, group, b0, b1 with + - * / and ceil(): exact rationals; None
    when a variable is unknown."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.Name):
        v = env.get(node.id.removesuffix("_"))
        return None if v is None else Fraction(v)
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, env), _eval(node.right, env)
        if a is None or b is None:
            return None
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            return a / b if b else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "ceil"
            and len(node.args) == 1):
        v = _eval(node.args[0], env)
        return None if v is None else Fraction(math.ceil(v))
    raise ValueError(f"not a shape expression: {ast.dump(node)}")


def _value(x: int | str, env: dict) -> Fraction | None:
    return Fraction(x) if type(x) is int else _value_of(x, tuple(sorted(env.items())))


@functools.lru_cache(maxsize=4096)
def _value_of(text: str, env: tuple) -> Fraction | None:
    return _eval(_expr(text), dict(env))


def _env(view: View, m: Mod) -> dict:
    d = m.dims()
    gs = m.group_size or _int(view.qc.get("group_size")) or _int(m.scheme.get("weights.group_size")) or 16
    b0, b1 = view.block
    return {"out": d[0] if d else None, "in": d[1] if d else None, "group": gs, "b0": b0, "b1": b1}


def _dtypes(spec: object, view: View) -> list[str] | None:
    if spec is None:
        return None
    if isinstance(spec, dict):  # {"config": key, value: [dtypes], "else": [dtypes]}
        v = view.qc.get(spec["config"])
        spec = spec.get(v, spec["else"]) if isinstance(v, str) else spec["else"]
    return [spec] if isinstance(spec, str) else list(spec)


@_register("scheme", "tensors", "divisible")
def check_module_spec(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """Per module: scheme fields (compressed-tensors), dims divisible by values, and tensors by role
    (`a|b`: either name) present with a dtype, a shape (expressions over out, in, group, b0, b1) or a
    number of elements; `optional` roles are checked only when present."""
    out = []
    memo: dict[tuple, list[str]] = {}  # modules alike in everything checked (most experts) are checked once
    roles = [role.split("|") for role in p.get("tensors", {})]
    for m in mods:
        env = _env(view, m)
        found = [next((m.tensor(r) for r in names if m.tensor(r) is not None), None) for names in roles]
        sig = (tuple(_hashable(m.scheme.get(k)) for k in p.get("scheme", {})), tuple(env.items()),
               tuple(None if t is None else (t.name.rsplit(".", 1)[-1], t.dtype, t.shape, t.numel) for t in found))
        if sig not in memo:
            memo[sig] = _module_spec_problems(view, m, p, env, found)
        if memo[sig]:
            out.append((m.name, "; ".join(memo[sig])))
    return out


def _module_spec_problems(view: View, m: Mod, p: dict, env: dict, found: list) -> list[str]:
    """check_module_spec's findings on one module: `env` its shape variables, `found` the tensor
    filling each role of p["tensors"] (None: absent)."""
    bad = []
    for k, want in p.get("scheme", {}).items():
        if not _matches(want, m.scheme.get(k)):
            bad.append(f"{k} is {_short(m.scheme.get(k))}, not {_short(want)}")
    for dim, by in p.get("divisible", {}).items():
        have, div = env.get(dim), _value(by, env)
        if have is not None and div and Fraction(have) % div:
            bad.append(f"{dim} {have} is not a multiple of {div}")
    for (role, spec), t in zip(p.get("tensors", {}).items(), found):
        names = role.split("|")
        if t is None:
            if not spec.get("optional"):
                bad.append(f"no {' or '.join(names)}")
            continue
        dts = _dtypes(spec.get("dtype"), view)
        if dts is not None and t.dtype not in dts:
            bad.append(f"{t.name.rsplit('.', 1)[-1]} is {t.dtype}, not {' or '.join(dts)}")
        if "numel" in spec and t.numel != spec["numel"]:
            bad.append(f"{t.name.rsplit('.', 1)[-1]} {list(t.shape)} has {t.numel} elements, not {spec['numel']}")
        if "shape" in spec:
            want = [_value(x, env) for x in spec["shape"]]
            if None not in want:
                ok = all(w.denominator == 1 for w in want) and tuple(int(w) for w in want) == t.shape
                if not ok:
                    shown = [int(w) if w.denominator == 1 else float(w) for w in want]
                    bad.append(f"{t.name.rsplit('.', 1)[-1]} {list(t.shape)}, not {shown} "
                               f"({', '.join(map(str, spec['shape']))})")
    return bad


def _fused_sets_of(view: View, mods: list[Mod]) -> dict[str, list[Mod]]:
    keys = {m.fused_key for m in mods if m.fused}
    return {k: view.fused_sets[k] for k in keys if k in view.fused_sets}


@_register("roles", values=True)
def check_fused_equal_values(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """The members of each fused set (q/k/v, gate/up, an expert's w1/w3) hold equal values in each
    of the roles (global scales, input scales): bitwise equal fp32."""
    out = []
    sets = sorted(_fused_sets_of(view, mods).items())
    view.ck.prefetch(m.tensor(role) for _, members in sets for m in members for role in p["roles"])
    for key, members in sets:
        for role in p["roles"]:
            vals = {m.proj: view.ck.scalar(m.tensor(role)) for m in members}
            got = {k: v for k, v in vals.items() if v is not None and v.size}
            if len(got) > 1 and len({v.tobytes() for v in got.values()}) > 1:
                shown = ", ".join(f"{k} {float(v[0]):.9g}" for k, v in got.items())
                out.append((key, f"{role} differs: {shown}"))
    return out


@_register("block", "except_last")
def check_fused_out_divisible(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """Each member of a fused set (all but the last, with except_last) has out % block == 0."""
    block = view.block[0] if p["block"] == "b0" else p["block"]
    out = []
    for key, members in sorted(_fused_sets_of(view, mods).items()):
        check_ = members[:-1] if p.get("except_last") else members
        bad = [f"{m.proj} out {m.dims()[0]}" for m in check_ if m.dims() and m.dims()[0] % block]
        if bad:
            out.append((key, f"{', '.join(bad)} not a multiple of {block}"))
    return out


@_register("block")
def check_moe_intermediate_divisible(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """The MoE intermediate size (a gate/up/w1/w3 expert's out, a down/w2 expert's in) is a multiple
    of the block."""
    block = view.block[0] if p["block"] == "b0" else p["block"]
    down = {"down_proj", "w2", "linear_fc2"}
    out, seen = [], set()
    for m in mods:
        d = m.dims()
        if d is None or m.moe_layer is None:
            continue
        inter = d[1] if m.proj in down else d[0]
        if inter % block and m.moe_layer not in seen:
            seen.add(m.moe_layer)
            out.append((m.moe_layer, f"intermediate size {inter} ({m.name}) is not a multiple of {block}"))
    return out


@_register()
def check_exclude_unquantizes(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """No module carrying quantized tensors is excluded by the engine's matching of the exclude list."""
    return [(m.name, f"carries {', '.join(sorted(r for r in m.m.tensors if r != 'weight')) or 'a quantized weight'}, "
                     f"but the exclude entry {_short(m.excluded_by)} unquantizes it (as {m.prefix})")
            for m in mods if m.excluded_by is not None]


@_register()
def check_fused_same_exclusion(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """The members of each fused set are all excluded or none."""
    out = []
    for key, members in sorted(_fused_sets_of(view, mods).items()):
        ex = [m for m in members if m.excluded_by is not None]
        if ex and len(ex) < len(members):
            out.append((key, f"{', '.join(m.proj for m in ex)} excluded "
                             f"({', '.join(sorted({_short(m.excluded_by) for m in ex}))}), "
                             f"{', '.join(m.proj for m in members if m.excluded_by is None)} not"))
    return out


@_register("names")
def check_exclude_uniform_across_layers(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """An exclude entry whose last segment is one of `names` unquantizes every module whose last
    segment contains it, in every layer: none of those may carry quantized tensors."""
    out = []
    for e in view.exclude:
        last = e.rsplit(".", 1)[-1]
        if last not in p["names"]:
            continue
        for m in mods:
            if last in m.proj:
                out.append((m.name, f"quantized, but the exclude entry {_short(e)} unquantizes every {last} "
                                    "(in every layer)"))
    return out


@_register()
def check_moe_expert0_scheme(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """Per MoE layer, expert 0's projections resolve to one config group (or are all ignored), and the
    ignore list does not single out some experts."""
    out = []
    layers = defaultdict(list)
    for m in view.mods.values():
        if m.moe_layer is not None:
            layers[m.moe_layer].append(m)
    chosen = {m.moe_layer for m in mods}
    classes = view.reads.get("target_classes", [])
    for layer in sorted(chosen):
        members = layers[layer]
        zero = [m for m in members if m.expert == "0"]
        got = {m.proj: (None if m.excluded_by is not None else view.group_of(m.name, classes)) for m in zero}
        if len(set(got.values())) > 1:
            out.append((layer, "expert 0 resolves to " + ", ".join(f"{k} -> {v or 'ignored'}"
                                                                   for k, v in got.items())))
        ignored = sorted({m.expert for m in members if m.excluded_by is not None}, key=int)
        if ignored and len(ignored) < len({m.expert for m in members}):
            more = " ..." if len(ignored) > 8 else ""
            out.append((layer, f"the ignore list names experts {', '.join(ignored[:8])}{more} only (the engine "
                               "uses expert 0's scheme for all)"))
    return out


@_register("layer_algos", "require_any", "single_group_size", "complete", "fused_same_algo", "moe_only")
def check_mixed_precision_layers(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """MIXED_PRECISION quantized_layers: a non-empty map of {quant_algo, group_size} objects whose
    algorithms the engine accepts (`moe_only` ones only for experts); with `complete`, every
    quantized module resolves to an entry; with `fused_same_algo`, fused shards agree; one group_size
    per algorithm of `single_group_size`; with `require_any`, at least one entry of those algorithms."""
    where = _cfg_name(view)
    raw = view.qc.get("quantized_layers")
    if not isinstance(raw, dict) or not raw:
        return [(where, f"quantized_layers is {_short(raw)}, not a non-empty map")]
    out = []
    layers = view.layers()
    for k, v in raw.items():
        if not isinstance(v, dict):
            out.append((k, f"quantized_layers entry {_short(v)} is not an object"))
    algos = {k: view.normalize(v.get("quant_algo")) for k, v in layers.items()}
    accepted = p.get("layer_algos")
    for k, a in algos.items():
        if accepted is not None and a not in accepted:
            out.append((k, f"quant_algo {_short(layers[k].get('quant_algo'))} is not one it accepts per layer"))
    if p.get("require_any") and not any(a in p["require_any"] for a in algos.values()):
        out.append((where, f"no quantized_layers entry is {' or '.join(p['require_any'])}"))
    for algo in p.get("single_group_size", []):
        sizes = {json.dumps(v.get("group_size")) for k, v in layers.items() if algos[k] == algo}
        if len(sizes) > 1:
            out.append((where, f"{algo} entries have group sizes {', '.join(sorted(sizes))}, not one"))
    for m in mods:
        entry = view.layer_entry(m, layers)
        if entry is None:
            if p.get("complete"):
                out.append((m.name, "carries quantized tensors, but quantized_layers has no entry for it (built "
                                    "unquantized)"))
        elif m.layer_algo in p.get("moe_only", []) and m.moe_layer is None:
            out.append((m.name, f"tagged {m.layer_algo}, which the engine takes for MoE layers only (this linear is "
                                "built unquantized)"))
    if p.get("fused_same_algo"):
        for key, members in sorted(_fused_sets_of(view, mods).items()):
            got = {m.proj: m.layer_algo for m in members}
            if len(set(got.values())) > 1:
                out.append((key, "fused shards tagged " + ", ".join(f"{k} {v}" for k, v in got.items())))
    return out


@_register("allowed")
def check_scheme_one_of(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """Each module's compressed-tensors scheme matches one of the allowed field sets."""
    out, seen = [], set()
    for m in mods:
        if any(_fields_match(a, m.scheme) for a in p["allowed"]):
            continue
        where = m.moe_layer or m.name
        if where in seen:
            continue
        seen.add(where)
        w = m.scheme.get("weights.strategy")
        a = m.scheme.get("input_activations")
        act = ("no input activations" if a is None else _short(a) if not isinstance(a, dict) else
               f"input_activations {a.get('strategy')} {'dynamic' if a.get('dynamic') else 'static'}")
        out.append((where, f"group {m.group}: weights {w}, format {m.scheme.get('format')}, {act}"))
    return out


@_register()
def check_applicable(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """The rule applying is the finding (a kind of checkpoint the engine does not take)."""
    what = []
    if view.algo:
        what.append(f"quant_algo {view.algo}")
    if mods:
        first = mods[0]
        what.append(f"{len(mods)} quantized module(s) concerned, e.g. {first.name}"
                    + (f" ({first.layer_algo})" if first.layer_algo and first.layer_algo != view.algo else ""))
    whole = len(mods) == len(view.quantized)  # the rule is about the checkpoint, not some modules of it
    return [(_cfg_name(view) if whole or not mods else mods[0].moe_layer or mods[0].name,
             f"{view.flavor} checkpoint" + (f", {'; '.join(what)}" if what else ""))]


@_register("roles", "lo", "hi", values=True)
def check_scale_bytes(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """E8M0 scale bytes in [lo, hi] (0 decodes to 0 in some engines, 255 is NaN)."""
    out = []
    for m in mods:
        t = next((m.tensor(r) for r in p["roles"] if m.tensor(r) is not None), None)
        if t is None or t.dtype not in ("U8", "F8_E8M0"):
            continue
        try:
            b = read_raw(t)
        except (HeaderError, OSError, ValueError):
            continue
        low, high = int(np.count_nonzero(b < p["lo"])), int(np.count_nonzero(b > p["hi"]))
        if low or high:
            out.append((m.name, f"{low + high} of {t.numel} scale bytes outside {p['lo']}..{p['hi']}"
                                f" ({low} below, {high} above)"))
    return out


@_register("flat", "defaults")
def check_group_size_and_exclude(view: View, mods: list[Mod], p: dict) -> list[tuple[str, str]]:
    """FP4 group size resolvable (flat config.json: the keys in order, `config_groups.*.` meaning the
    first group, then a default per algorithm; hf_quant_config.json: exactly one value in the file)
    and the exclude list not null."""
    where, out = _cfg_name(view), []
    if view.source == "hf_quant_config.json":
        sizes = set()
        _collect(view.qc, "group_size", sizes)
        if len(sizes) != 1:
            out.append((where, f"group_size values {sorted(sizes, key=str) or 'none'}: not one value"))
    else:
        gs = None
        for k in p["flat"]:
            if k.startswith("config_groups.*."):
                first = next(iter(view.groups.values()), {})
                d: object = first
                for part in k[len("config_groups.*."):].split("."):
                    d = d.get(part) if isinstance(d, dict) else None
                gs = d
            else:
                gs = view.qc.get(k)
            if gs is not None:
                break
        if gs is None:
            gs = p.get("defaults", {}).get(view.algo or "")
        if gs is None:
            out.append((where, "no group_size (top level, first config group, or a default for "
                               f"{view.algo})"))
    if view.exclude_key is None or view.exclude_value is None:
        out.append((where, "the exclude list is " + ("null" if view.exclude_key else "absent")))
    return out


def _collect(d: object, key: str, into: set, depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key and v is not None:
                into.add(json.dumps(v))
            else:
                _collect(v, key, into, depth + 1)
    elif isinstance(d, list):
        for v in d:
            _collect(v, key, into, depth + 1)


# ---------------------------------------------------------------------------------------------
# findings and verdicts

_CONSEQUENCE = {"refuse": "refuses to load it", "garbage": "loads it but computes garbage",
                "degraded": "loads it with degraded accuracy"}


@dataclass(frozen=True)
class Finding:
    rule: Rule
    label: str  # the engine's name in prose
    name: str  # module, fused set, MoE layer or config file
    what: str

    @property
    def blocking(self) -> bool:
        """Does the engine not serve the checkpoint because of it (refusal or garbage, unconditionally)?"""
        return self.rule.when is None and self.rule.kind in ("refuse", "garbage")

    @property
    def detail(self) -> str:
        """What is wrong; what the engine requires; what it does otherwise; the engine source."""
        note = self.rule.on_violation[len(self.rule.kind):].strip()
        cond = f"when {self.rule.when}, " if self.rule.when else ""
        return (f"{self.what}. Requires: {self.rule.requires}. Otherwise {cond}{self.label} "
                f"{_CONSEQUENCE[self.rule.kind]}{' ' + note if note else ''} ({self.rule.source})")

    def violation(self) -> Violation:
        return Violation(self.rule.qualified, self.name, self.detail)


@dataclass
class Verdict:
    engine: Engine
    flavor: str | None
    findings: list[Finding]
    strict: bool  # named with --engine: each unconditional finding is a violation

    @property
    def served(self) -> bool:
        return self.flavor is not None and not any(f.blocking for f in self.findings)

    @property
    def status(self) -> str:
        kinds = {f.rule.kind for f in self.findings if f.rule.when is None}
        if self.flavor is None:
            return "reads no quantization it knows here"
        for k in KINDS:
            if k in kinds:
                return {"refuse": "REFUSES it", "garbage": "loads it but computes GARBAGE",
                        "degraded": "serves it with degraded accuracy"}[k]
        return "serves it"

    def lines(self, per_rule: int = 1) -> list[str]:
        head = f"  {self.engine.name:<12} {self.status}"
        out = [head]
        by: dict[str, list[Finding]] = {}
        for f in self.findings:
            by.setdefault(f.rule.qualified, []).append(f)
        for fs in by.values():
            rule = fs[0].rule
            tag = "caveat" if rule.when else rule.kind
            out.append(f"    {tag} {rule.qualified} x{len(fs)}: {fs[0].name}: {fs[0].what}"
                       + (f" (when {rule.when})" if rule.when else ""))
        return out

    def to_dict(self) -> dict:
        return {"engine": self.engine.name, "served": self.served, "status": self.status, "strict": self.strict,
                "findings": [{"rule": f.rule.qualified, "kind": f.rule.kind, "when": f.rule.when, "name": f.name,
                              "detail": f.detail} for f in self.findings]}


@dataclass
class Result:
    verdicts: list[Verdict]
    violations: list[Violation]
    strict: bool

    def lines(self) -> list[str]:
        if not self.verdicts:
            return []
        mode = ("--engine " + " ".join(v.engine.name for v in self.verdicts) + ": their findings fail" if self.strict
                else "every engine; fails only if none serves it; --engine NAME fails on its findings")
        return [f"engines ({mode}):"] + [ln for v in self.verdicts for ln in v.lines()]

    def to_dict(self) -> dict:
        return {"engines": {"strict": self.strict, "verdicts": [v.to_dict() for v in self.verdicts]}}


def judge(view: View, rule: Rule) -> list[Finding]:
    """One rule of the view's engine against its checkpoint: [] where it finds nothing or does not apply."""
    mods = view.select(rule)
    if mods is None:
        return []
    hits = CHECKS[rule.check].fn(view, mods, rule.params)
    return [Finding(rule, view.engine.label, name, what) for name, what in hits[:_MAX_FINDINGS]]


def evaluate(engine: Engine, ck: Checkpoint) -> tuple[View, list[Finding]]:
    """Every rule of one engine's table against the checkpoint."""
    view = View(engine, ck)
    return view, [f for rule in engine.rules for f in judge(view, rule)]


def check(path: str | Path, engines: list[str] | tuple[str, ...] | None = None,
          tensors: dict[str, TensorInfo] | None = None) -> Result:
    """Judge the checkpoint at `path` against the engines' tables. engines=None: every engine, and
    only a checkpoint no engine serves is a violation (docs/formats.md "verify --engine"); a list
    of names: each unconditional finding of those engines is a violation. `tensors`: the headers, if
    already read (verify passes its own)."""
    known = tables()
    strict = engines is not None
    names = list(known) if engines is None else list(dict.fromkeys(engines))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown engine(s) {', '.join(unknown)}: one of {', '.join(known)}")
    ck = Checkpoint.read(Path(path), tensors)
    verdicts = []
    for n in names:
        view, found = evaluate(known[n], ck)
        verdicts.append(Verdict(known[n], view.flavor, found, strict))
    violations: list[Violation] = []
    if strict:
        violations = [f.violation() for v in verdicts for f in v.findings if f.rule.when is None]
    elif any(v.flavor is not None for v in verdicts) and not any(v.served for v in verdicts):
        why = "; ".join(f"{v.engine.name} {v.status} ("
                        + (", ".join(dict.fromkeys(f.rule.qualified for f in v.findings if f.blocking))
                           or "no quantization it reads") + ")" for v in verdicts)
        violations = [Violation("engines", Path(path).name or str(path), f"no engine serves this checkpoint: {why}")]
    return Result(verdicts, violations, strict)


def of(report: object) -> Result | None:
    """The engine verdicts verify() attached to a Report (None if it ran none)."""
    return getattr(report, "engines", None)


def summary_lines(report: object) -> list[str]:
    r = of(report)
    return r.lines() if r is not None else []


def report_dict(report: object) -> dict:
    r = of(report)
    return r.to_dict() if r is not None else {}


if __name__ == "__main__":  # python -m shardquant.engines docs/engine_rules.json
    if len(sys.argv) != 2:
        sys.exit("usage: python -m shardquant.engines OUT.json")
    Path(sys.argv[1]).write_text(docs_table(), encoding="utf-8")
