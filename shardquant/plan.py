"""Plan, validate, then run: everything knowable from the index and shard headers is decided here,
before any weight is read: quantizer groups, output names, shapes and shards, byte totals, the
memory bound."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable
from dataclasses import dataclass, field

from . import formats
from .errors import PlanError, RuleError, ShardquantError, SourceError
from .flavors import FLAVORS
from .flavors import refusal
from .rules import (FLOAT_DTYPES, KEEP, KEEP_FORMAT, TE_WEIGHT, Decision, RuleSet, format_choice, load_rules_file,
                    module_name)
from .source import Checkpoint, open_checkpoint, quantization_config, with_decoded
from .st import OutTensor, TensorInfo
from .text import show
from .writer import HASH_BEHIND_BYTES

DEFAULT_SHARD_SIZE = 5 * 10**9
DEFAULT_MEMORY_BUDGET = 8 * 2**30
PREFETCH_BYTES = 512 * 2**20  # read-ahead allowed beyond the largest group
# Reads in flight: on the H200 machine's disk, per-tensor reads in plan order on 4 threads reach 0.92
# of one sequential reader, on 8 threads 1.01 (tools/bench_reads.py, docs/benchmarks/README.md).
READ_THREADS = 8
SCALE_SEARCH = ("none", "mse")  # block scales by round to nearest, or the least squared error nearby
MX_SOURCE = ("cast", "requantize")  # what becomes of MXFP4 source weights (make_plan mx_source)
# Groups a GPU quantizes at once, each on its own thread and CUDA stream (shardquant/backend.py
# CupyBackend.lanes): one group's uploads, host copies and synchronizations overlap the other's
# kernels. Per-expert quantizers are small (6,000+ on a 30B MoE): one lane spends most of its time
# waiting on them (docs/benchmarks/README.md, device lanes). SHARDQUANT_DEVICE_LANES sets another
# number, as SHARDQUANT_THREADS does the CPU's threads (tools/bench.py --vs-env compares two).
DEVICE_LANES = 2


def device_lanes() -> int:
    raw = os.environ.get("SHARDQUANT_DEVICE_LANES", "").strip()
    if not raw:
        return DEVICE_LANES
    if not raw.isdecimal() or int(raw) < 1:
        raise ShardquantError(f"SHARDQUANT_DEVICE_LANES must be a whole number of at least 1, not {raw!r}")
    return int(raw)


CAST_THREADS = 4  # members of a lossless cast read and cast at once (shardquant/pipeline.py cast_group)
WRITE_AHEAD_BYTES = 256 * 2**20  # finished outputs queued for the writer thread
JOB_BYTES = 64 * 2**20  # outputs of one group waiting for the groups before it (shardquant/pipeline.py _Job)
FIXED_OVERHEAD = 512 * 2**20  # interpreter, libraries (a CUDA context), lookup tables, temporaries
# The model card's engine verdicts, judged while the shards are written (shardquant/card.py Judging): each
# engine's view of every module, per output tensor (2.1 KiB measured, 6,684 source and 19,876 output tensors)
CARD_BYTES_PER_TENSOR = 3 << 10
# Source tensors read ahead of a file's hash cursor, held until the gap before them is read
# (shardquant/provenance.py); past this, the file's rest is hashed by a second read at the end.
HASH_HOLD_BYTES = 1 << 30


@dataclass
class Group:
    """One logical quantizer: its members share one amax and one global scale."""

    key: str
    rule: str
    members: list[TensorInfo]
    two_pass: bool = False  # larger than the host memory budget: read once for the amax, again to quantize
    on_device: bool = False  # larger than the host memory budget but held on the GPU: read once
    format: str = ""  # the registered format this quantizer takes (mixed precision: per group)
    # the source kind its members are cast from, code for code (shardquant/encoding.py casts_losslessly):
    # the global scale comes from the members' scale tensors alone. A group within the memory budget is
    # read ahead whole like any other (its bytes stream while the previous group is cast); a larger one
    # is `streamed`: every member's scales first, then each member's codes read and cast on its own, so
    # it is never held whole
    cast: str | None = None
    streamed: bool = False

    @property
    def source_bytes(self) -> int:
        return sum(m.nbytes for m in self.members)

    @property
    def amax_from_scales(self) -> bool:
        """Every member is block FP8: read member by member (two_pass), its amax comes from the
        source's tile scales and the few tiles they point to (decode.block_fp8_amax), so the source
        is read once, not twice (shardquant/pipeline.py)."""
        return all(getattr(getattr(m, "encoding", None), "kind", None) == "block-fp8"  # encoding.py BLOCK_FP8
                   for m in self.members)


@dataclass
class Unit:
    """One step of the pipeline, in read order: a quantizer group, or one tensor copied as is."""

    group: Group | None = None
    kept: TensorInfo | None = None

    @property
    def source_bytes(self) -> int:
        return self.group.source_bytes if self.group else self.kept.nbytes


@dataclass
class Plan:
    checkpoint: Checkpoint
    format: str
    expert_policy: str
    flavor: str
    groups: list[Group]
    units: list[Unit]
    outputs: dict[str, dict[str, str]]  # source tensor -> {"weight", "scale", "global_scale"} names
    out_tensors: dict[str, OutTensor]  # output name -> tensor
    shards: list[tuple[str, list[OutTensor]]]
    excluded: list[dict[str, str]]  # [{name, reason}], sorted
    exclude_modules: list[str]
    warnings: list[str] = field(default_factory=list)
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    device_memory: int | None = None  # GPU bytes a quantizer may be held in (None: planned for the CPU)
    scale_search: str = "none"  # block scales by round to nearest, or searched (--scale-search; Format.scale_search)

    @property
    def read_factor(self) -> float:
        """Source bytes read over source bytes: groups read twice count twice."""
        total = self.source_bytes
        twice = sum(g.source_bytes for g in self.groups if g.two_pass and not g.amax_from_scales)
        return (total + twice) / total if total else 1.0

    @property
    def source_bytes(self) -> int:
        return sum(u.source_bytes for u in self.units)

    @property
    def formats(self) -> list[str]:
        """Every format some quantizer takes: more than one is mixed precision. --format first."""
        used = {g.format for g in self.groups}
        return sorted(used, key=lambda f: (f != self.format, f))

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.out_tensors.values())

    @property
    def peak_bytes(self) -> int:
        """Bound on resident memory: the largest group held at once (or, for a group read twice or
        held on the GPU, its largest member), the read-ahead, the write queue, one member's outputs
        being written and one being made per device lane, the outputs of the groups in flight (two per
        lane, each at most JOB_BYTES or one member's outputs) waiting for the ones before them, the output written
        but not yet hashed (shardquant/writer.py), the source hasher's out-of-order hold and a fixed
        overhead; and, the one term that grows with the model, the card's verdicts judged meanwhile
        (CARD_BYTES_PER_TENSOR per output tensor)."""
        held = max((_held(u) for u in self.units), default=0)
        out = max((self.member_out_bytes(m) for g in self.groups for m in g.members), default=0)
        # a source stored quantized: each reader holds a weight's stored parts while it decodes them
        # (shardquant/encoding.py DecodedTensor; the decoded BF16 is what `held` counts)
        stored = max((getattr(t, "stored_bytes", 0) for t in self.checkpoint.tensors.values()), default=0)
        lanes = device_lanes() if self.device_memory is not None else 1
        return (held + PREFETCH_BYTES + WRITE_AHEAD_BYTES + HASH_BEHIND_BYTES + (1 + lanes) * out
                + 2 * lanes * max(JOB_BYTES, out) + FIXED_OVERHEAD + HASH_HOLD_BYTES
                + READ_THREADS * stored + CARD_BYTES_PER_TENSOR * len(self.out_tensors))

    def format_targets(self) -> dict[str, list[str]]:
        """Mixed precision: format -> `re:` patterns naming exactly the modules that take it (module
        names with their numeric parts widened to any number wherever that picks modules of one
        format only: one pattern per projection kind, not one per expert). {} for one format."""
        if len(self.formats) < 2:
            return {}
        fmt_of = {module_name(m.name): g.format for g in self.groups for m in g.members}
        widened: list[dict[str, set[str]]] = [{}, {}, {}]  # per width: pattern -> formats of its modules
        shapes = {}
        for mod, f in fmt_of.items():
            parts = mod.split(".")
            nums = [i for i, p in enumerate(parts) if p.isdecimal()]
            # all numbers widened; all but the first (layer kept); none
            cands = [_widen(parts, nums), _widen(parts, nums[1:]), _widen(parts, [])]
            shapes[mod] = cands
            for width, pat in enumerate(cands):
                widened[width].setdefault(pat, set()).add(f)
        out: dict[str, list[str]] = {f: [] for f in self.formats}
        for mod, f in fmt_of.items():
            pat = next(p for w, p in enumerate(shapes[mod]) if widened[w][p] == {f})
            if pat not in out[f]:
                out[f].append(pat)
        return {f: [f"re:^{p}$" for p in sorted(pats)] for f, pats in out.items()}

    def member_out_bytes(self, m: TensorInfo) -> int:
        return sum(self.out_tensors[n].nbytes for n in self.outputs[m.name].values())


def _widen(parts: list[str], nums: list[int]) -> str:
    """A module name as a regex, the numeric parts at `nums` matching any number."""
    return r"\.".join(r"\d+" if i in nums else re.escape(p) for i, p in enumerate(parts))


def _held(u: Unit) -> int:
    if u.group is not None and u.group.streamed:  # every member's scales, CAST_THREADS members' codes
        return sum(m.parts[1].nbytes for m in u.group.members) + CAST_THREADS * max(m.nbytes for m in u.group.members)
    if u.group is not None and (u.group.two_pass or u.group.on_device):
        return max(m.nbytes for m in u.group.members)
    return u.source_bytes


def make_plan(
    ck: Checkpoint,
    fmt: str,
    rules: RuleSet,
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    strict: bool = False,
    flavor: str | None = None,
    device_memory: int | None | Callable[[], int | None] = None,
    mx_source: str = "cast",
    scale_search: str = "none",
) -> Plan:
    """flavor None: the format's default flavor if it spells every format the plan uses, else the
    first flavor that does. device_memory: GPU bytes one quantizer may be held in (a GPU conversion);
    a group larger than memory_budget that fits there is read once, member by member, onto the GPU.
    It may be a function, called only when some group exceeds memory_budget (the GPU is then being
    started while the plan is made: shardquant/convert.py); otherwise the caller sets
    Plan.device_memory once it knows it, which changes no decision. mx_source: "cast" (MXFP4 members
    go into NVFP4 code for code, where the format allows: encoding.py casts_losslessly) or
    "requantize" (decoded and re-quantized by round to nearest, as any other source)."""

    gpu_bytes = functools.cache(device_memory if callable(device_memory) else lambda: device_memory)
    gpu_asked = False
    if flavor is not None and flavor not in FLAVORS:
        raise PlanError(f"unknown flavor {show(flavor)}; choose one of {', '.join(FLAVORS)}")
    if mx_source not in MX_SOURCE:
        raise PlanError(f"--mx-source must be one of {', '.join(MX_SOURCE)}, not {show(mx_source)}")
    if scale_search not in SCALE_SEARCH:
        raise PlanError(f"--scale-search must be one of {', '.join(SCALE_SEARCH)}, not {show(scale_search)}")
    warnings: list[str] = list(ck.warnings)
    decisions = {n: rules.classify(n, t.dtype, t.shape) for n, t in ck.tensors.items()}

    unclaimed = [n for n, d in decisions.items() if d.rule == "unclaimed"]
    if unclaimed and strict:
        raise PlanError(f"--strict: no rule claims {len(unclaimed)} weight tensor(s): "
                        f"{', '.join(show(n, quote=False) for n in unclaimed[:8])}")

    by_key: dict[str, list[str]] = defaultdict(list)
    for n, d in decisions.items():
        if d.action != KEEP:
            by_key[d.key].append(n)
    kept: dict[str, Decision] = {n: d for n, d in decisions.items() if d.action == KEEP}
    for key, names in by_key.items():
        rules_used = sorted({decisions[n].rule for n in names})
        if len(rules_used) > 1:
            raise RuleError(f"quantizer {show(key, quote=False)} is claimed by rules "
                            f"{', '.join(show(r, quote=False) for r in rules_used)}; give them distinct keys")
    # A fused set shares one precision: excluding one member keeps the whole set.
    excluded_from = {d.key: n for n, d in decisions.items() if d.rule == "--exclude" and d.key}
    for key in [k for k in by_key if k in excluded_from]:
        why = f"fused with {show(excluded_from[key], quote=False)}, which --exclude keeps"
        warnings.append(f"quantizer {show(key, quote=False)} kept in high precision as a whole: {why}")
        for n in by_key.pop(key):
            kept[n] = Decision(KEEP, "--exclude", reason=why)

    groups: list[Group] = []
    picked: set[str] = set()  # selectors of --format-for choices that picked something
    for key, names in list(by_key.items()):
        gfmt = _group_format(key, names, decisions, rules, fmt, picked)
        if gfmt == KEEP_FORMAT:
            for n in by_key.pop(key):
                kept[n] = Decision(KEEP, decisions[n].rule, reason=f"--format-for {rules.format_of(n, decisions[n]).selector}="
                                   f"{KEEP_FORMAT}")
            continue
        layout = formats.declared(gfmt)
        _check_complete(key, [decisions[n] for n in names], names)
        members = [ck.tensors[n] for n in names]
        for m in members:
            if m.dtype not in FLOAT_DTYPES:
                raise PlanError(
                    f"tensor {show(m.name)} ({show(m.file.name, quote=False)}): unsupported dtype {m.dtype} for "
                    f"quantization (inputs must be one of {', '.join(FLOAT_DTYPES)})"
                )
            if 0 in m.shape:  # nothing to scale; a GEMM with an empty side is not a real projection
                raise PlanError(
                    f"tensor {show(m.name)} ({show(m.file.name, quote=False)}): shape {list(m.shape)} has no "
                    "elements, so it cannot be quantized; --exclude it to copy it as it is"
                )
        bad = [why for m in members if (why := layout.fits(m.shape, show(m.name, quote=False)))]
        if bad:
            why = bad[0]
            warnings.append(f"quantizer {show(key, quote=False)} kept in high precision as a whole: {why}")
            for n in names:
                kept[n] = Decision(KEEP, decisions[n].rule, reason=f"fused set not quantizable: {why}", warn=True)
            continue
        g = Group(key, decisions[names[0]].rule, members, format=gfmt)
        kinds = {m.encoding.kind for m in members if getattr(m, "encoding", None) is not None}
        if kinds:  # a source stored quantized: only then is its encoding module imported (start-up)
            from .encoding import MXFP4, casts_losslessly
        cast = [k for k in kinds if casts_losslessly(k, layout)] if kinds and mx_source == "cast" else []
        if cast:
            if len(kinds) > 1 or len(members) != sum(getattr(m, "encoding", None) is not None for m in members):
                raise PlanError(f"quantizer {show(key, quote=False)} mixes {cast[0]} members, which {gfmt} takes "
                                "by a lossless cast, with members stored otherwise; one global scale cannot serve both")
            g.cast = cast[0]
            g.streamed = g.source_bytes > memory_budget
        elif kinds and MXFP4 in kinds:
            why = "--mx-source requantize" if mx_source != "cast" else "no lossless cast into it"
            warnings.append(f"quantizer {show(key, quote=False)}: source {', '.join(sorted(kinds))} decoded and "
                            f"re-quantized to {gfmt} ({why})")
        if g.source_bytes > memory_budget and g.cast is None:
            gpu_asked = True
            g.on_device = gpu_bytes() is not None and g.source_bytes <= gpu_bytes()
            g.two_pass = not g.on_device
        if g.two_pass:
            warnings.append(f"quantizer {show(key, quote=False)} ({g.source_bytes / 1e9:.1f} GB) exceeds the "
                            "memory budget: " + ("read member by member, its amax from the source's block scales"
                                                 if g.amax_from_scales else "read twice")
                            + ("" if gpu_bytes() is None else " (and the GPU memory budget)"))
        groups.append(g)

    # a filter that does nothing is most often a typo: named, and an error with --strict
    unused = rules.unused_filters() + [f"--format-for {show(c.selector, quote=False)}={c.format} picks no quantized "
                                       "tensor" for c in rules.format_for if c.selector not in picked]
    if unused and strict:
        raise PlanError(f"--strict: {'; '.join(unused[:8])}" + (f"; and {len(unused) - 8} more" if len(unused) > 8 else ""))
    warnings += unused
    _check_moe_layers(groups, decisions)
    used = sorted({g.format for g in groups}, key=lambda f: (f != fmt, f))
    asked, flavor = flavor, _flavor_for(used, fmt, flavor)
    own = formats.default_flavor(fmt, FLAVORS)
    if asked is None and flavor != own:
        warnings.append(f"--flavor {flavor}: {fmt}'s own flavor, {own}, does not spell "
                        f"{', '.join(f for f in used if refusal(own, f))}")
    fl = FLAVORS[flavor]
    _keep_everywhere(fl.excluded_everywhere, groups, kept, ck, warnings)
    for n, d in kept.items():
        if d.warn:
            warnings.append(f"{show(n, quote=False)}: kept in high precision ({d.reason})")
    if not groups:  # an output that claims a format and holds not one quantized weight is no conversion
        raise PlanError(f"nothing would be quantized: all {len(kept)} tensor{'s' * (len(kept) != 1)} are kept "
                        f"({_reasons(kept)}); "
                        "--include REGEX quantizes 2-D weights no rule claims, --rules FILE adds rules")

    # Read order: each unit at the position of its first member in the source.
    pos = {n: i for i, n in enumerate(ck.tensors)}
    units = [Unit(group=g) for g in groups] + [Unit(kept=ck.tensors[n]) for n in kept]
    units.sort(key=lambda u: pos[u.group.members[0].name] if u.group else pos[u.kept.name])

    outputs: dict[str, dict[str, str]] = {}
    out_tensors: dict[str, OutTensor] = {}
    order: list[OutTensor] = []
    for u in units:
        if u.kept is not None:
            t = OutTensor(u.kept.name, u.kept.dtype, u.kept.shape)
            order.append(t)
            continue
        gfmt = u.group.format
        layout = formats.declared(gfmt)
        for m in u.group.members:
            names = fl.output_names(gfmt, m.name)
            outputs[m.name] = names
            order.append(OutTensor(names["weight"], layout.weight_dtype, layout.weight_shape(m.shape)))
            scale_shape = layout.scale_shape(m.shape) if layout.block_scales else fl.tensor_scale_shape(gfmt, m.shape)
            order.append(OutTensor(names["scale"], layout.scale_dtype, scale_shape))
            if layout.global_scale:
                order.append(OutTensor(names["global_scale"], "F32", fl.scalar_shape))
    for t in order:
        if t.name in out_tensors:
            raise PlanError(f"output tensor {show(t.name)} would be written twice (a source tensor already has "
                            "that name)")
        out_tensors[t.name] = t

    excluded = sorted(({"name": n, "reason": d.reason} for n, d in kept.items()), key=lambda e: e["name"])
    exclude_modules = sorted({
        module_name(n) for n in kept
        if len(ck.tensors[n].shape) >= 2 and ck.tensors[n].dtype in FLOAT_DTYPES
        and (n.endswith(".weight") or TE_WEIGHT.fullmatch(n) or len(ck.tensors[n].shape) > 2)
    })
    if scale_search != "none":
        lacking = sorted({g.format for g in groups if scale_search not in formats.declared(g.format).scale_search})
        if lacking:
            have = [f for f in formats.FORMATS if scale_search in formats.declared(f).scale_search]
            raise PlanError(f"--scale-search {scale_search}: {', '.join(lacking)} has no searched scales yet "
                            f"(formats that have them: {', '.join(have) or 'none'})")
    return Plan(
        ck, fmt, rules.expert_policy, flavor, groups, units, outputs, out_tensors,
        _shard(order, max_shard_size), excluded, exclude_modules, warnings, memory_budget,
        gpu_bytes() if gpu_asked or not callable(device_memory) else None, scale_search,
    )


def _group_format(key: str, names: list[str], decisions: dict[str, Decision], rules: RuleSet, default: str,
                  picked: set[str]) -> str:
    """The one format of a quantizer (mixed precision: --format-for choices, else --format). A fused
    set shares one scale, so all of its members take one format."""
    chosen = {}
    for n in names:
        c = rules.format_of(n, decisions[n])
        if c is not None:
            picked.add(c.selector)
        chosen[n] = c.format if c is not None else default
    if len(set(chosen.values())) > 1:
        by = {f: n for n, f in chosen.items()}
        parts = ", ".join(f"{show(n, quote=False)} takes {f}" for f, n in sorted(by.items()))
        raise RuleError(f"quantizer {show(key, quote=False)}: the members of a fused set share one format, but {parts}")
    return next(iter(chosen.values()))


_EXPERTS = ".experts."


def _check_moe_layers(groups: list[Group], decisions: dict[str, Decision]) -> None:
    """All expert projections of one MoE layer take one format: engines build one fused-MoE method
    per layer from expert 0's gate, up and down (docs/formats.md 1.2)."""
    seen: dict[str, tuple[str, str]] = {}
    for g in groups:
        m = g.members[0]
        if decisions[m.name].expert is None or _EXPERTS not in m.name:
            continue
        layer = m.name.split(_EXPERTS, 1)[0]
        first = seen.setdefault(layer, (g.format, g.key))
        if first[0] != g.format:
            raise RuleError(f"MoE layer {show(layer, quote=False)}: quantizer {show(first[1], quote=False)} takes "
                            f"{first[0]} but {show(g.key, quote=False)} takes {g.format}; engines run one format "
                            "for all experts of a layer")


def _keep_everywhere(names: tuple[str, ...], groups: list[Group], kept: dict[str, Decision], ck: Checkpoint,
                     warnings: list[str]) -> None:
    """A module kept in one layer whose name the flavor's engines exclude in every layer (Flavor.excluded_everywhere)
    is kept in every layer, with its fused set: else those engines load the quantized ones as high precision."""
    def last(n: str) -> str:
        return module_name(n).rsplit(".", 1)[-1]

    hit = sorted({last(n) for n in kept if last(n) in names and len(ck.tensors[n].shape) == 2
                  and ck.tensors[n].dtype in FLOAT_DTYPES})
    if not hit:
        return
    dropped = [g for g in groups if any(last(m.name) in hit for m in g.members)]
    ids = {id(g) for g in dropped}
    groups[:] = [g for g in groups if id(g) not in ids]  # not list.remove: a Group compares field by field
    for g in dropped:
        for m in g.members:
            kept[m.name] = Decision(KEEP, g.rule, reason=f"{', '.join(hit)} kept in some layer: engines of this flavor "
                                                         "exclude it in every layer")
    warnings.append(f"{', '.join(hit)}: kept in high precision in every layer, because some layer keeps it and the "
                    "engines of this flavor exclude such a name everywhere (docs/formats.md 1.1)")


def _flavor_for(used: list[str], fmt: str, flavor: str | None) -> str:
    """The flavor that spells every format in `used`: the one asked for (else the refusal), or by default
    the --format's default flavor, else the first flavor that spells them all."""
    if flavor is not None:
        for f in used:
            why = refusal(flavor, f)
            if why:
                lead = f"--format {f}" if f == fmt else f"--format-for ...={f}"
                raise PlanError(f"{lead} --flavor {flavor} is refused: {why}")
        return flavor
    order = [formats.default_flavor(fmt, FLAVORS)] + list(FLAVORS)
    for cand in order:
        if all(refusal(cand, f) is None for f in used):
            return cand
    raise PlanError(f"no flavor spells all of {', '.join(used)} (mixed precision needs one flavor for every format): "
                    + "; ".join(f"{f}: {refusal(order[0], f)}" for f in used if refusal(order[0], f)))


def _check_complete(key: str, ds: list[Decision], names: list[str]) -> None:
    """Every fused quantizer must hold all of its projections, for every expert it covers."""
    fuse = ds[0].fuse
    if not fuse:
        return
    have: dict[str | None, set[str]] = defaultdict(set)
    for d in ds:
        have[d.expert].add(d.proj)
    for expert, projs in sorted(have.items(), key=lambda kv: _expert_order(kv[0])):
        missing = [p for p in fuse if p not in projs]
        if missing:
            who = f" expert {show(expert, quote=False)}" if expert is not None else ""
            raise RuleError(f"quantizer {show(key, quote=False)}{who}: missing "
                            f"{', '.join(show(p, quote=False) for p in missing)} "
                            f"(has {', '.join(show(p, quote=False) for p in sorted(projs, key=str))})")


def _expert_order(expert: str | None) -> tuple[bool, int, str]:
    """Experts in numeric order; a user rule's `expert` group may capture more than digits."""
    return expert is not None, int(expert) if expert and expert.isdecimal() else -1, expert or ""


def _reasons(kept: dict[str, Decision], most: int = 4) -> str:
    """Why tensors are kept, counted: 'norm: 5, embedding: 1, output head: 1'."""
    counts: dict[str, int] = defaultdict(int)
    for d in kept.values():
        counts[d.reason or d.rule] += 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out = ", ".join(f"{show(r, quote=False, limit=80)}: {n}" for r, n in top[:most])
    return out + (f", other: {sum(n for _, n in top[most:])}" if len(top) > most else "")


def _shard(order: list[OutTensor], max_size: int) -> list[tuple[str, list[OutTensor]]]:
    chunks: list[list[OutTensor]] = [[]]
    size = 0
    for t in order:
        if chunks[-1] and size + t.nbytes > max_size:
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += t.nbytes
    n = len(chunks)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", c) for i, c in enumerate(chunks)]


# `plan`'s time estimate: deliberately conservative constants, not a measurement of this machine.
# docs/benchmarks/README.md measured 0.30 (nvfp4) to 0.63 (fp8) GB/s of source on 2 CPU cores, and
# 0.67 to 0.85 GB/s on an H200, where the disk was the limit. Hub downloads overlap the conversion
# (shardquant/hub.py): the slower of the two sets the pace, and the last shard to arrive is converted
# after its download ends.
ESTIMATE_DOWNLOAD_BPS = 100e6
ESTIMATE_CONVERT_BPS = {"CPU": 0.25e9, "GPU": 0.5e9}


def estimated_seconds(plan: Plan) -> tuple[float, str]:
    """(seconds, the assumptions behind them) for downloading what is not cached while converting."""
    where = "GPU" if getattr(plan, "device_memory", None) is not None else "CPU"
    ck = plan.checkpoint
    down = ck.download_bytes
    read = plan.source_bytes * getattr(plan, "read_factor", 1.0)
    rate = ESTIMATE_CONVERT_BPS[where]
    secs = read / rate
    if down:
        missing = set(ck.hub.missing(ck.root))
        last = max((ck.hub.sizes.get(s.name) or 0 for s in ck.shards if s.name in missing), default=0)
        secs = max(down / ESTIMATE_DOWNLOAD_BPS, secs) + last / rate
    how = (f"download at {ESTIMATE_DOWNLOAD_BPS / 1e6:.0f} MB/s while " if down else "") + (
        f"conversion at {rate / 1e9:.2f} GB/s of source read on the {where}")
    return secs, how


@dataclass(frozen=True)
class Options:
    """Every choice that shapes a conversion's plan, and so its bytes: one record for `prepare`,
    `convert`, the command line, a zoo's jobs (shardquant/batch.py Job.options) and Ray tasks.

    format: the output format (formats registry; any case). revision: a hub source's revision.
    expert_policy: shared or per-expert (rules.EXPERT_POLICIES). rules_file: a TOML/JSON file of rule
    rows. include / exclude: regexes of weights to quantize / keep. strict: warnings become errors.
    max_shard_size, memory_budget: bytes. flavor: None for the format's own (modelopt for nvfp4,
    compressed-tensors for fp8), or with mixed precision the first flavor that spells every format
    used. format_for: `SELECTOR=FORMAT` choices (rules.FormatChoice), tried before the rules file's.
    mx_source: MX_SOURCE. scale_search: SCALE_SEARCH."""

    format: str = "nvfp4"
    revision: str | None = None
    expert_policy: str = "shared"
    rules_file: str | Path | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strict: bool = False
    max_shard_size: int = DEFAULT_SHARD_SIZE
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    flavor: str | None = None
    format_for: tuple[str, ...] = ()
    mx_source: str = "cast"
    scale_search: str = "none"

    @classmethod
    def of(cls, options: Options | None = None, fmt: str | None = None, **choices) -> Options:
        """`options` (default: the defaults) with `fmt` and any of its fields given by name; an unknown
        name is a TypeError, as a misspelt keyword argument is."""
        opts = options or cls()
        if fmt is not None:
            choices["format"] = fmt
        return dataclasses.replace(opts, **choices) if choices else opts


def prepare(src: str, fmt: str | None = None, *, options: Options | None = None, device_memory=None,
            **choices) -> Plan:
    """Open the source (headers only) and plan the conversion with `options` (Options; or its fields
    by name, and `fmt` for its format). device_memory: the GPU bytes a quantizer may be held in, or a
    function giving them when first asked (make_plan)."""
    o = Options.of(options, fmt, **choices)
    fmt = o.format.lower() if isinstance(o.format, str) else o.format
    flavor = o.flavor
    if fmt not in formats.FORMATS:
        raise ShardquantError(f"unknown format {fmt!r}; choose one of {', '.join(formats.FORMATS)}")
    if flavor is not None and flavor not in FLAVORS:
        raise ShardquantError(f"unknown flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    known = tuple(formats.FORMATS)
    picked = tuple(format_choice(c, known) for c in o.format_for)
    user, from_file = load_rules_file(Path(o.rules_file), known) if o.rules_file else ((), ())
    picked += from_file
    if not picked:  # one format: refuse a pair that cannot be served before reading anything
        pair_flavor = flavor or formats.default_flavor(fmt, FLAVORS)
        why = refusal(pair_flavor, fmt)
        if why:
            raise ShardquantError(f"--format {fmt} --flavor {pair_flavor} is refused: {why}")
    ck = open_checkpoint(src, o.revision, download=False)  # a hub repo: index, config and headers only
    ck = with_decoded(ck)  # a quantized source: its weights as their dequantization (shardquant/encoding.py)
    qc = quantization_config(ck.config)
    if qc is not None and ck.stored is None:
        raise SourceError(f"{ck.root / 'config.json'}: source is already quantized (quant_method "
                          f"{qc.get('quant_method', '?')!r}) in a form shardquant does not read")
    num_layers = (ck.config or {}).get("num_hidden_layers")
    rules = RuleSet(user, tuple(o.include), tuple(o.exclude), o.expert_policy,
                    num_layers if isinstance(num_layers, int) else None, picked)
    return make_plan(ck, fmt, rules, max_shard_size=o.max_shard_size, memory_budget=o.memory_budget, strict=o.strict,
                     mx_source=o.mx_source, scale_search=o.scale_search,
                     flavor=flavor, device_memory=device_memory)
