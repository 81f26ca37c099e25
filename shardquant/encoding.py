"""What each tensor of a source checkpoint is, from the shard headers and config.json alone (issue 14):
plain floats, block-FP8 weights and their tile scales, MXFP4 weights and their E8M0 block scales,
gpt-oss's fused 3-D MXFP4 experts, and fused 3-D float experts in either orientation.

Two tables decide it, both of full-match name patterns (no branching on model names):
- PAIRINGS: which tensor scales which, by name; the pair's dtypes pick the row, so DeepSeek-V4's
  `X.weight` + `X.scale` is block FP8 when the data is F8_E4M3 and MXFP4 when it is packed I8/U8.
- FUSED_3D: for 3-D expert tensors, per model_type and name, whether they are stored [E, out, in] or
  [E, in, out] and how gate and up share gate_up_proj's output features.

Every weight gets a logical name, the one it has in a bf16 checkpoint (`X.weight` for `X.weight_packed`,
`...experts.gate_up_proj` for gpt-oss's `...experts.gate_up_proj_blocks`), which the name rules
(shardquant/rules.py) match. Scale tensors are consumed by the encoding of their data tensor and must
never be copied to an output (SourceLayout.scales). An inconsistent encoding is a SourceError naming the
tensor, raised before any weight is read. The arithmetic of decoding is shardquant/decode.py's;
decode_weight applies it to one logical weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

from . import decode
from .errors import SourceError
from .formats import mxfp4
from .formats.base import to_f32
from .source import quantization_config
from .st import TensorInfo
from .text import show

PLAIN = "plain"  # BF16 / F16 / F32 (or an integer table), read as stored
BLOCK_FP8 = "block-fp8"  # F8_E4M3 codes x one F32 or E8M0 scale per 128x128 tile
MXFP4 = "mxfp4"  # E2M1 packed two per byte, low nibble first, x one E8M0 scale per 32 elements
MXFP4_3D = "mxfp4-fused-3d"  # gpt-oss: `X_blocks` [E, out, in/32, 16] + `X_scales` [E, out, in/32]
PLAIN_3D = "plain-3d"  # every expert of a layer in one float tensor, [E, out, in] or [E, in, out]
KINDS = (PLAIN, BLOCK_FP8, MXFP4, MXFP4_3D, PLAIN_3D)

OUT_IN, IN_OUT = "[E, out, in]", "[E, in, out]"  # how a 3-D expert tensor is stored
HALVES, INTERLEAVED = "halves", "interleaved"  # gate_up_proj's output features: gate then up, or alternating

FLOAT_DTYPES = ("BF16", "F16", "F32")
BYTE_SCALES = ("F8_E8M0", "U8")  # E8M0 exponents: 2^(b - 127)
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0")  # never a plain weight: codes that need a scale
PACKED_DTYPES = ("U8", "I8")  # packed E2M1 when named as a weight
MX_BLOCK = decode.MX_BLOCK  # 32 elements per E8M0 byte (OCP MX)
DEFAULT_TILE = decode.FP8_TILE  # 128x128 when config.json gives no weight_block_size


@dataclass(frozen=True)
class Pairing:
    """A data tensor and the tensor that scales it, by name: `data`, `scale` and `logical` (the weight's
    name in a bf16 checkpoint) are templates over `{base}`. The row claims a pair only when the data's
    dtype is one of `data_dtypes`; the scale's dtype must then be one of `scale_dtypes`. `strict`: the
    scale's name only ever names a scale, so one left without its data is an error whatever its dtype
    (a float `.scale` may be an ordinary parameter; a byte one never is)."""

    name: str
    data: str
    scale: str
    logical: str
    data_dtypes: tuple[str, ...]
    scale_dtypes: tuple[str, ...]
    kind: str
    strict: bool = True

    def __post_init__(self) -> None:
        if not (self.data.startswith("{base}") and self.scale.startswith("{base}")) or "{base}" in (
                self.data[6:] + self.scale[6:]):
            raise ValueError(f"pairing {self.name}: data and scale templates start with {{base}}, once")


# ../shared/LAYOUTS.md and ../shared/FORMATS.md; the first row whose names and data dtype fit wins.
PAIRINGS: tuple[Pairing, ...] = (
    # DeepSeek-V3/R1, Kimi-K2 (LAYOUTS.md "DeepSeek-V3 / R1"; FORMATS.md 3, block 128x128, F32)
    Pairing("fp8-scale-inv", "{base}.weight", "{base}.weight_scale_inv", "{base}.weight",
            ("F8_E4M3",), ("F32",) + BYTE_SCALES, BLOCK_FP8),
    # DeepSeek-V4 attention, shared experts, indexer, MTP projections (LAYOUTS.md "DeepSeek-V4": UE8M0)
    Pairing("fp8-scale", "{base}.weight", "{base}.scale", "{base}.weight",
            ("F8_E4M3",), BYTE_SCALES + ("F32",), BLOCK_FP8, strict=False),
    # DeepSeek-V4 routed experts: FP4 E2M1 packed in I8, E8M0 per 32 (LAYOUTS.md "DeepSeek-V4")
    Pairing("fp4-scale", "{base}.weight", "{base}.scale", "{base}.weight",
            PACKED_DTYPES, BYTE_SCALES, MXFP4, strict=False),
    # compressed-tensors mxfp4-pack-quantized, Kimi-K3 routed experts (LAYOUTS.md "Kimi-K3"; FORMATS.md 4)
    Pairing("ct-mxfp4", "{base}.weight_packed", "{base}.weight_scale", "{base}.weight",
            ("U8",), BYTE_SCALES, MXFP4),
    # gpt-oss fused experts (LAYOUTS.md "gpt-oss")
    Pairing("gpt-oss-mxfp4", "{base}_blocks", "{base}_scales", "{base}",
            ("U8",), BYTE_SCALES, MXFP4_3D),
)


def _by_rest(side: str) -> tuple[tuple[str, tuple[Pairing, ...]], ...]:
    """PAIRINGS by what their `side` template ("data" or "scale") has after `{base}`, in row order."""
    rests: dict[str, list[Pairing]] = {}
    for p in PAIRINGS:
        rests.setdefault(getattr(p, side).removeprefix("{base}"), []).append(p)
    return tuple((rest, tuple(ps)) for rest, ps in rests.items())


_DATA_RESTS, _SCALE_RESTS = _by_rest("data"), _by_rest("scale")
_ROW = {p.name: i for i, p in enumerate(PAIRINGS)}


def _bases(name: str, rests) -> list[tuple[Pairing, str]]:
    """(row, base) for every PAIRINGS row whose template (_DATA_RESTS or _SCALE_RESTS) `name` fits, in row
    order: the base any non-empty prefix without a line break, the template's rest literal. A suffix
    test per distinct rest, not a regex per row: the plan asks it of every tensor (90,000 in DeepSeek-V3)."""
    out: list[tuple[Pairing, str]] = []
    for rest, rows in rests:
        if len(name) > len(rest) and name.endswith(rest):
            base = name[: len(name) - len(rest)]
            if "\n" not in base:
                out += [(p, base) for p in rows]
    if len(out) > 1:
        out.sort(key=lambda pb: _ROW[pb[0].name])
    return out


@dataclass(frozen=True)
class Fused3D:
    """How one architecture stores all experts of a layer in one 3-D tensor. `pattern` full-matches the
    logical name and has a group `proj` (gate_up_proj or down_proj); `model_types` lists the config's
    model_type values it applies to (top level or text_config; empty: any); `kind` the encoding it
    applies to. `gate_up` says how gate and up share gate_up_proj's output features. `split`: the
    engines' model code for this architecture loads quantized experts under per-expert names
    (`X.experts.{e}.gate_proj.weight`, ...), so the tensor is planned as its experts' 2-D weights; when
    False it is kept whole (a per-expert name would be skipped by the loader: experts left unloaded)."""

    name: str
    model_types: tuple[str, ...]
    kind: str
    pattern: str
    orientation: str
    gate_up: str
    split: bool = True
    rx: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rx", re.compile(self.pattern))


_GPT_OSS = r".*\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)"
# The first row whose model_type, kind and name fit wins.
FUSED_3D: tuple[Fused3D, ...] = (
    # ../shared/LAYOUTS.md "gpt-oss": *_blocks [E, 2I, H/32, 16], rows are output features and blocks run
    # along the input; gate = rows 0, 2, 4, ..., up = rows 1, 3, 5, ... (docs/formats.md "gpt-oss layout").
    # Not split: the engines' gpt-oss loaders take experts only as fused 3-D tensors (docs/formats.md
    # "gpt-oss: what the engines load").
    Fused3D("gpt-oss-mxfp4", ("gpt_oss",), MXFP4_3D, _GPT_OSS, OUT_IN, INTERLEAVED, split=False),
    # gpt-oss dequantized to bf16 keeps the model's own parameters, [E, in, out] (docs/formats.md
    # "gpt-oss layout": the dequantizer transposes [E, rows, in] to [E, in, rows]); rows still interleaved.
    Fused3D("gpt-oss-bf16", ("gpt_oss",), PLAIN_3D, _GPT_OSS, IN_OUT, INTERLEAVED, split=False),
    # ../shared/LAYOUTS.md "Llama 4": gate_up_proj [E, in, 2I], down_proj [E, in, out] (the forward computes
    # x @ W); gate is the first half of the output features, up the second.
    Fused3D("llama4", ("llama4", "llama4_text"), PLAIN_3D,
            r".*\.feed_forward\.experts\.(?P<proj>gate_up_proj|down_proj)", IN_OUT, HALVES),
    # ../shared/LAYOUTS.md "transformers-5 style fused experts": gate_up_proj [E, 2I, H] (gate rows then up
    # rows), down_proj [E, H, I]; blocks run along the last (input) dim.
    Fused3D("transformers-5", (), PLAIN_3D, r".*\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)", OUT_IN, HALVES),
)
# A 3-D float tensor named like fused experts that no FUSED_3D row claims: its orientation is unknown.
_FUSED_NAME = re.compile(r".*\.experts\.(?:gate_up_proj|down_proj)")


def fused_expert_name(name: str, info: TensorInfo) -> bool:
    """A 3-D float tensor named like fused experts (recognize decides its layout)."""
    return len(info.shape) == 3 and info.dtype in FLOAT_DTYPES and bool(_FUSED_NAME.fullmatch(name))


@dataclass(frozen=True)
class SourceEncoding:
    """One logical weight of a source checkpoint and how it is stored.

    name: the logical name (as in a bf16 checkpoint). kind: one of KINDS. dtype: the data tensor's
    dtype. data / scales: the tensors read; the scales are consumed and never copied. scale_dtype:
    "F32" or "E8M0" (None when unscaled). block: elements per scale, (rows, cols): (128, 128) for
    block FP8, (1, 32) for MX. shape: the logical [out, in] after decoding, per expert for 3-D tensors
    (the stored shape for other plain tensors). experts: the number of experts of a 3-D tensor.
    orientation: OUT_IN or IN_OUT as stored. gate_up: HALVES or INTERLEAVED for a fused gate_up_proj.
    bias: a 3-D tensor's companion bias (`X_bias`, plain: not consumed). rule: the PAIRINGS or FUSED_3D
    row that decided it ("" for a plain tensor)."""

    name: str
    kind: str
    dtype: str
    data: tuple[str, ...]
    scales: tuple[str, ...] = ()
    scale_dtype: str | None = None
    block: tuple[int, int] | None = None
    shape: tuple[int, ...] = ()
    experts: int | None = None
    orientation: str | None = None
    gate_up: str | None = None
    bias: str | None = None
    rule: str = ""
    split: bool = True  # a 3-D tensor is planned as its experts' 2-D weights (Fused3D.split)

    @property
    def interleaved(self) -> bool:
        """Gate and up rows alternate (gpt-oss)."""
        return self.gate_up == INTERLEAVED

    @property
    def quantized(self) -> bool:
        return self.kind not in (PLAIN, PLAIN_3D)

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.data + self.scales

    @property
    def members(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(member, logical [out, in]) of the weight per expert: gate and up for a fused gate_up."""
        if self.gate_up is None:
            return (("", self.shape),)
        half = (self.shape[0] // 2, self.shape[1])
        return (("gate", half), ("up", half))


@dataclass(frozen=True, eq=False)
class SourceLayout:
    """Every logical weight of a checkpoint (in the order of its data tensors), the scale tensors they
    consume, and for every tensor the logical weight that reads it."""

    encodings: Mapping[str, SourceEncoding]
    scales: frozenset[str]
    owner: Mapping[str, str]

    def of(self, tensor: str) -> SourceEncoding:
        """The encoding that reads `tensor` (as data or as scale)."""
        return self.encodings[self.owner[tensor]]

    @property
    def quantized(self) -> tuple[SourceEncoding, ...]:
        return tuple(e for e in self.encodings.values() if e.quantized)


def model_types(config: Mapping | None) -> frozenset[str]:
    """The config's model_type values: top level and text_config (multimodal wrappers nest the text model)."""
    if not isinstance(config, Mapping):
        return frozenset()
    text = config.get("text_config")
    found = [config.get("model_type"), text.get("model_type") if isinstance(text, Mapping) else None]
    return frozenset(t for t in found if isinstance(t, str))


def fp8_tile(config: Mapping | None) -> tuple[int, int]:
    """The block-FP8 tile: `weight_block_size` of a quant_method "fp8" config (FORMATS.md 6), else 128x128."""
    qc = quantization_config(config) or {}
    wbs = qc.get("weight_block_size")
    if qc.get("quant_method") == "fp8" and wbs is not None:
        if not (isinstance(wbs, list) and len(wbs) == 2 and all(type(v) is int and v > 0 for v in wbs)):
            raise SourceError(f"config.json quantization_config.weight_block_size {show(wbs)} is not two positive integers")
        return (wbs[0], wbs[1])
    return DEFAULT_TILE


def recognize(tensors: Mapping[str, TensorInfo], config: Mapping | None = None) -> SourceLayout:
    """The encoding of every logical weight of a checkpoint from its headers (Checkpoint.tensors, name ->
    TensorInfo; anything with .dtype and .shape) and config.json. Raises SourceError on a quantized
    tensor without its scale, a scale without its data, dtypes no pairing takes, a scale shape that does
    not tile its weight, or a 3-D expert tensor of unknown orientation."""
    tile = fp8_tile(config)
    types = model_types(config)
    found: dict[str, SourceEncoding] = {}
    owner: dict[str, str] = {}
    for name, info in tensors.items():  # quantized pairs first: a scale may precede its data
        enc = _pair(name, info, tensors, tile, types)
        if enc is not None:
            _claim(enc, found, owner)
    for name, info in tensors.items():
        if name not in owner:
            _claim(_unpaired(name, info, tensors, types), found, owner)
    order = {n: i for i, n in enumerate(tensors)}
    encodings = {e.name: e for e in sorted(found.values(), key=lambda e: order[e.data[0]])}
    _check_fused_pairs(encodings)
    scales = frozenset(s for e in encodings.values() for s in e.scales)
    return SourceLayout(MappingProxyType(encodings), scales, MappingProxyType(owner))


def _claim(enc: SourceEncoding, found: dict[str, SourceEncoding], owner: dict[str, str]) -> None:
    if enc.name in found:
        raise SourceError(f"tensors {show(found[enc.name].data[0])} and {show(enc.data[0])} are both the weight "
                          f"{show(enc.name)}: a checkpoint holds each weight once")
    found[enc.name] = enc
    for t in enc.tensors:
        owner[t] = enc.name


def _pair(name: str, info: TensorInfo, tensors: Mapping[str, TensorInfo], tile: tuple[int, int],
          types: frozenset[str]) -> SourceEncoding | None:
    """The encoding of `name` as the data tensor of a PAIRINGS row whose scale exists, or None."""
    rows = [(p, base) for p, base in _bases(name, _DATA_RESTS) if p.scale.format(base=base) in tensors]
    if not rows:
        return None
    for p, base in rows:
        if info.dtype in p.data_dtypes:
            return _paired(p, {"base": base}, info, tensors, tile, types)
    if info.dtype in FLOAT_DTYPES:
        return None  # a float weight is plain; its would-be scale is judged on its own (_unpaired)
    p, base = rows[0]
    takes = sorted({d for q, _ in rows for d in q.data_dtypes})
    raise SourceError(f"tensor {show(name)} is {info.dtype} with scale tensor {show(p.scale.format(base=base))}, "
                      f"but no pairing takes {info.dtype} data (only {', '.join(takes)})")


def _paired(p: Pairing, groups: dict, data: TensorInfo, tensors: Mapping[str, TensorInfo], tile: tuple[int, int],
            types: frozenset[str]) -> SourceEncoding:
    scale = tensors[p.scale.format(**groups)]
    if scale.dtype not in p.scale_dtypes:
        raise SourceError(f"scale tensor {show(scale.name)} is {scale.dtype}; the {data.dtype} weight {show(data.name)} "
                          f"needs {' or '.join(p.scale_dtypes)} scales (pairing {p.name})")
    sdt = "F32" if scale.dtype == "F32" else "E8M0"
    logical = p.logical.format(**groups)
    base = dict(name=logical, kind=p.kind, dtype=data.dtype, data=(data.name,), scales=(scale.name,),
                scale_dtype=sdt, rule=p.name)
    if p.kind == BLOCK_FP8:
        rows, cols = _dims(data, 2)
        want = (-(-rows // tile[0]), -(-cols // tile[1]))
        _check_scale(scale, want, data, f"one scale per {tile[0]}x{tile[1]} tile")
        return SourceEncoding(**base, block=tile, shape=(rows, cols))
    if p.kind == MXFP4:
        rows, half = _dims(data, 2)
        cols = _mx_cols(data, half)
        _check_scale(scale, (rows, cols // MX_BLOCK), data, f"one E8M0 byte per {MX_BLOCK} elements")
        return SourceEncoding(**base, block=(1, MX_BLOCK), shape=(rows, cols))
    e, rows, nb, nbytes = _dims(data, 4)  # MXFP4_3D
    if nbytes != MX_BLOCK // 2:
        raise SourceError(f"tensor {show(data.name)} {data.dtype}{list(data.shape)}: the last dim of MX blocks must be "
                          f"{MX_BLOCK // 2} bytes ({MX_BLOCK} E2M1 codes)")
    _check_scale(scale, (e, rows, nb), data, f"one E8M0 byte per {MX_BLOCK}-element block")
    f = _fused(logical, p.kind, types, data.name)
    bias = f"{groups['base']}_bias"
    base["rule"] = f"{p.name}, {f.name}"
    return SourceEncoding(**base, block=(1, MX_BLOCK), shape=(rows, nb * MX_BLOCK), experts=e,
                          orientation=f.orientation, gate_up=_gate_up(f, logical, rows, data.name),
                          bias=bias if bias in tensors else None, split=f.split)


def _dims(t: TensorInfo, ndim: int) -> tuple[int, ...]:
    if len(t.shape) != ndim:
        raise SourceError(f"tensor {show(t.name)} {t.dtype}{list(t.shape)} must have {ndim} dims")
    return tuple(t.shape)


def _mx_cols(data: TensorInfo, half: int) -> int:
    if (2 * half) % MX_BLOCK:
        raise SourceError(f"tensor {show(data.name)} {data.dtype}{list(data.shape)} packs {2 * half} E2M1 codes per "
                          f"row, not a whole number of {MX_BLOCK}-element MX blocks")
    return 2 * half


def _check_scale(scale: TensorInfo, want: tuple[int, ...], data: TensorInfo, what: str) -> None:
    if tuple(scale.shape) != want:
        raise SourceError(f"scale tensor {show(scale.name)} has shape {list(scale.shape)} but {show(data.name)} "
                          f"{data.dtype}{list(data.shape)} needs {list(want)} ({what})")


def _fused(logical: str, kind: str, types: frozenset[str], tensor: str) -> Fused3D:
    for f in FUSED_3D:
        if f.kind == kind and (not f.model_types or types & set(f.model_types)) and f.rx.fullmatch(logical):
            return f
    got = ", ".join(sorted(types)) or "none"
    raise SourceError(f"tensor {show(tensor)} holds 3-D experts, but no rule says how {show(logical)} is stored "
                      f"for model_type {got} ([E, out, in] or [E, in, out]; shardquant/encoding.py FUSED_3D)")


def _gate_up(f: Fused3D, logical: str, out: int, tensor: str) -> str | None:
    if f.rx.fullmatch(logical).group("proj") != "gate_up_proj":
        return None
    if out % 2:
        raise SourceError(f"tensor {show(tensor)}: fused gate_up has an odd number of output features ({out})")
    return f.gate_up


def _unpaired(name: str, info: TensorInfo, tensors: Mapping[str, TensorInfo], types: frozenset[str]) -> SourceEncoding:
    """A tensor no pairing claimed: a plain tensor, a plain 3-D expert tensor, or an error."""
    for p, base in _bases(name, _SCALE_RESTS):  # a scale left without its data
        if p.strict or info.dtype not in FLOAT_DTYPES:
            target = p.data.format(base=base)
            if target in tensors:
                raise SourceError(f"scale tensor {show(name)} ({info.dtype}) scales {show(target)}, which is "
                                  f"{tensors[target].dtype}, not quantized data (pairing {p.name})")
            raise SourceError(f"scale tensor {show(name)} ({info.dtype}) has no data tensor {show(target)} (pairing {p.name})")
    if info.dtype in QUANTIZED_DTYPES or (info.dtype in PACKED_DTYPES and _bases(name, _DATA_RESTS)):
        raise SourceError(f"tensor {show(name)} is {info.dtype} but has no scale tensor{_looked_for(name, info, tensors)}")
    if info.dtype in FLOAT_DTYPES and len(info.shape) == 3:
        for f in FUSED_3D:
            if f.kind == PLAIN_3D and (not f.model_types or types & set(f.model_types)) and f.rx.fullmatch(name):
                e, a, b = info.shape
                out, inp = (a, b) if f.orientation == OUT_IN else (b, a)
                bias = f"{name}_bias"
                return SourceEncoding(name, PLAIN_3D, info.dtype, (name,), shape=(out, inp), experts=e,
                                      orientation=f.orientation, gate_up=_gate_up(f, name, out, name),
                                      bias=bias if bias in tensors else None, rule=f.name, split=f.split)
        if _FUSED_NAME.fullmatch(name):
            _fused(name, PLAIN_3D, types, name)  # raises: experts of unknown orientation
    return SourceEncoding(name, PLAIN, info.dtype, (name,), shape=tuple(info.shape))


def _looked_for(name: str, info: TensorInfo, tensors: Mapping[str, TensorInfo]) -> str:
    wanted = [p.scale.format(base=base) for p, base in _bases(name, _DATA_RESTS) if info.dtype in p.data_dtypes]
    said = f" (looked for {', '.join(show(w) for w in wanted)})" if wanted else " (no pairing rule covers its name)"
    stem = name.rsplit(".", 1)[0] if "." in name else name
    near = [n for n in tensors if n != name and n.startswith(stem) and "scale" in n[len(stem):]][:3]
    if near:
        said += "; found " + ", ".join(f"{show(n)} {tensors[n].dtype}{list(tensors[n].shape)}" for n in near) + \
                ", which no pairing takes"
    return said


def _check_fused_pairs(encodings: Mapping[str, SourceEncoding]) -> None:
    """A layer's fused gate_up [E, 2I, H] and down [E, H, I] must agree (as [out, in] per expert): a
    wrong orientation shows up here, before anything is read."""
    for e in encodings.values():
        if e.experts is None or e.gate_up is None or not e.name.endswith("gate_up_proj"):
            continue
        down = encodings.get(e.name[: -len("gate_up_proj")] + "down_proj")
        if down is None or down.experts is None:
            continue
        (out, inp), (d_out, d_in) = e.shape, down.shape
        if down.experts != e.experts or d_out != inp or d_in * 2 != out:
            raise SourceError(
                f"tensors {show(e.data[0])} and {show(down.data[0])} disagree as {e.orientation} experts: gate_up is "
                f"[{out}, {inp}] and down [{d_out}, {d_in}] per expert (expected down [{inp}, {out // 2}]), "
                f"{e.experts} and {down.experts} experts")


def describe(enc: SourceEncoding) -> str:
    """A short human description of a source encoding for plan and inspect: "block-FP8 128x128, F32
    scales", "MXFP4, E8M0 scales per 32", "MXFP4 3-D, 32 experts [E, out, in], gate/up interleaved, E8M0
    scales per 32", "plain BF16 3-D, 16 experts [E, in, out], gate/up halves", "plain BF16"."""
    fused = ""
    if enc.experts is not None:
        fused = f" 3-D, {enc.experts} experts {enc.orientation}" + (f", gate/up {enc.gate_up}" if enc.gate_up else "")
    if enc.kind == BLOCK_FP8:
        return f"block-FP8 {enc.block[0]}x{enc.block[1]}, {enc.scale_dtype} scales"
    if enc.kind in (MXFP4, MXFP4_3D):
        return f"MXFP4{fused}, E8M0 scales per {MX_BLOCK}"
    return f"plain {enc.dtype}{fused}"


# ---------------------------------------------------------------------------------------------
# Decoding one logical weight (shardquant/decode.py's arithmetic)


def decode_weight(enc: SourceEncoding, read: Callable[[str], np.ndarray], expert: int | None = None) -> np.ndarray:
    """fp32 values of a float or quantized logical weight in its logical [out, in] orientation (one expert
    of a 3-D tensor: `expert`). `read(name)` returns a tensor's raw storage (shardquant/st.py read_raw).
    Block FP8: decode.block_fp8_decode; MXFP4: formats/mxfp4.py dequantize (E2M1 x 2^(b - 127)); gpt-oss
    blocks: decode.gpt_oss_expert first. Exact, except block FP8 with F32 scales (one fp32 product)."""
    if (enc.experts is None) != (expert is None):
        raise ValueError(f"{enc.name}: give an expert index exactly for a 3-D weight")
    if enc.kind == BLOCK_FP8:
        return decode.block_fp8_decode(read(enc.data[0]), read(enc.scales[0]), enc.block, enc.scale_dtype)
    if enc.kind == MXFP4:
        return mxfp4.dequantize(read(enc.data[0]).view(np.uint8), read(enc.scales[0]).view(np.uint8))
    if enc.kind == MXFP4_3D:
        packed, e8m0 = decode.gpt_oss_expert(read(enc.data[0]).view(np.uint8), read(enc.scales[0]).view(np.uint8), expert)
        return mxfp4.dequantize(packed, e8m0)
    if enc.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{enc.name}: {enc.dtype} is not a weight")
    raw = read(enc.data[0])
    if enc.kind == PLAIN_3D:
        raw = raw[expert] if enc.orientation == OUT_IN else raw[expert].T
    return np.ascontiguousarray(to_f32(np.ascontiguousarray(raw), enc.dtype))


def split_gate_up(enc: SourceEncoding, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gate, up) rows of a fused gate_up weight (or of its scales, or of its bias) along axis 0, as the
    encoding lays them out: halves, or interleaved (decode.deinterleave_gate_up). Views."""
    if enc.gate_up is None:
        raise ValueError(f"{enc.name} is not a fused gate_up")
    if enc.interleaved:
        return decode.deinterleave_gate_up(x)
    if x.shape[0] % 2:
        raise ValueError(f"{enc.name}: fused gate_up has an odd number of rows ({x.shape[0]})")
    h = x.shape[0] // 2
    return x[:h], x[h:]



# ---------------------------------------------------------------------------------------------
# Decoded tensors: what the planner and the pipeline see of a quantized source


@dataclass(frozen=True)
class DecodedTensor(TensorInfo):
    """A logical weight that the source stores quantized, seen by the planner as the BF16 tensor its
    dequantization gives ([out, in], `nbytes` its BF16 size: what the pipeline holds). `parts`: the
    stored tensors read to make it (data, then scales). shardquant/st.py read_raw reads the parts and
    calls decode(); the pipeline reads them itself so that each one is hashed as it is read."""

    encoding: SourceEncoding = None  # type: ignore[assignment]
    parts: tuple[TensorInfo, ...] = ()

    @property
    def stored_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def decode(self, raws: list[np.ndarray]) -> np.ndarray:
        """BF16 storage (uint16) of the dequantized weight from its parts' raw arrays. Block FP8: every
        code times its tile's scale, the product rounded once to BF16 (round to nearest even), which is
        what a dequantized BF16 copy of the checkpoint holds (docs/formats.md "Quantized sources")."""
        enc = self.encoding
        by_name = dict(zip((p.name for p in self.parts), raws))
        if enc.kind != BLOCK_FP8:
            return f32_to_bf16(decode_weight(enc, by_name.__getitem__))
        # a band of whole tile rows at a time: the fp32 products never exist for the whole weight
        codes, scales = by_name[enc.data[0]], by_name[enc.scales[0]]
        rows, cols = codes.shape
        out = np.empty((rows, cols), np.uint16)
        step = max(1, DECODE_BAND_ELEMENTS // max(cols, 1) // enc.block[0]) * enc.block[0]
        for a in range(0, rows, step):
            b = min(rows, a + step)
            out[a:b] = f32_to_bf16(decode.block_fp8_decode_rows(codes, scales, a, b, enc.block, enc.scale_dtype))
        return out


@dataclass(frozen=True, eq=False)
class Encoded:
    """A decoded weight's stored parts as read, not decoded yet: handed to a backend that decodes on
    its device (shardquant/backend.py load; the GPU's kernels.cu block_fp8_decode)."""

    info: DecodedTensor
    raws: tuple[np.ndarray, ...]

    def decode(self) -> np.ndarray:
        return self.info.decode(list(self.raws))


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> BF16 storage, round to nearest even; every NaN becomes the quiet NaN 0x7FC0 (its sign
    and payload depend on the processor that made it; the GPU decode writes the same)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    out = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


DECODE_BAND_ELEMENTS = 1 << 22  # decoded at once: 16 MiB of fp32 (in the plan's fixed overhead, plan.py)
# Kinds a conversion decodes today; the others are refused with the reason (SourceError).
DECODED_KINDS = (BLOCK_FP8, MXFP4)
_REFUSED = {
    # docs/formats.md "gpt-oss: what the engines load": experts in any encoding but the source's own MXFP4
    # (or BF16) would be skipped by the engines' gpt-oss loaders, so no conversion of them is offered.
    MXFP4_3D: "fused 3-D MXFP4 experts (gpt-oss layout); the engines' gpt-oss loaders take experts only as "
              "the source's own MXFP4 blocks or as BF16 (docs/formats.md 'gpt-oss: what the engines load'), so "
              "there is no output format they would serve",
}


def casts_losslessly(kind: str, fmt) -> bool:
    """Whether weights stored as `kind` go into the declared format `fmt` (formats/base.py Format) by
    a cast that keeps every code (decode.mxfp4_to_nvfp4): MXFP4 into E2M1 codes with 16-element E4M3
    block scales under a power-of-two global scale. Any other pair is decoded and re-quantized."""
    return (kind == MXFP4 and fmt.element == "E2M1" and fmt.block_size == 16 and fmt.scale_dtype == "F8_E4M3"
            and fmt.global_scale)


@dataclass(frozen=True)
class ExpertView(TensorInfo):
    """One expert's weight of a 3-D tensor stored [E, in, out] (Llama 4): its [out, in] is the transpose
    of columns `cols` of the expert's contiguous [in, out] slice (`parts[0]`). Gate and up of one
    expert share that slice: the pipeline reads it once for both (shardquant/pipeline.py)."""

    encoding: SourceEncoding = None  # type: ignore[assignment]
    parts: tuple[TensorInfo, ...] = ()
    cols: tuple[int, int] = (0, 0)

    @property
    def stored_bytes(self) -> int:
        return self.parts[0].nbytes

    def decode(self, raws: list[np.ndarray]) -> np.ndarray:
        a, b = self.cols
        return np.ascontiguousarray(raws[0][:, a:b].T)


def expert_slices(info: TensorInfo, enc: SourceEncoding) -> list[TensorInfo] | None:
    """A plain 3-D expert tensor with gate and up as halves (or no gate/up). Stored [E, out, in]: each
    expert's weights are contiguous rows of it, so each is planned, read and hashed as a 2-D tensor of
    its own; stored [E, in, out] (Llama 4): each is an ExpertView of its expert's slice. Either way under
    the per-expert name the engines load (`X.experts.gate_up_proj` -> `X.experts.{e}.gate_proj.weight`
    and `...up_proj.weight`; `X.experts.down_proj` -> `X.experts.{e}.down_proj.weight`: the names of
    vLLM's FusedMoE expert mapping, docs/formats.md "Quantized sources: conversion"). None for
    interleaved gate/up, or for an architecture whose engines load only the fused tensor (gpt-oss,
    Fused3D.split)."""
    if enc.kind != PLAIN_3D or enc.interleaved or not enc.split or "." not in info.name:
        return None
    base, proj = info.name.rsplit(".", 1)
    out, inp = enc.shape
    item = info.nbytes // max(1, enc.experts * out * inp)
    pieces = []
    for e in range(enc.experts):
        at = info.offset + e * out * inp * item
        if enc.orientation == IN_OUT:  # [in, out] per expert: each member is a transposed column range
            part = TensorInfo(f"{info.name}[{e}]", info.dtype, (inp, out), info.file, at, out * inp * item)
            members = (("gate_proj", 0, out // 2), ("up_proj", out // 2, out)) if enc.gate_up else ((proj, 0, out),)
            pieces += [ExpertView(f"{base}.{e}.{member}.weight", info.dtype, (b - a, inp), info.file, at,
                                  (b - a) * inp * item, enc, (part,), (a, b)) for member, a, b in members]
            continue
        if enc.gate_up is None:
            pieces.append(TensorInfo(f"{base}.{e}.{proj}.weight", info.dtype, (out, inp), info.file, at, out * inp * item))
            continue
        half = out // 2
        for k, member in enumerate(("gate_proj", "up_proj")):
            pieces.append(TensorInfo(f"{base}.{e}.{member}.weight", info.dtype, (half, inp), info.file,
                                     at + k * half * inp * item, half * inp * item))
    return pieces


def decoded_tensors(tensors: Mapping[str, TensorInfo], layout: SourceLayout,
                    notes: dict[str, list[int]] | None = None) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """(the tensors a conversion plans with, the stored tensors as it reads them), in source order:
    each quantized weight as one DecodedTensor under its logical name, its scale tensors gone (they
    never reach an output); each contiguous 3-D expert tensor as its experts' 2-D slices
    (expert_slices), in both; every other tensor as stored. Raises SourceError for an encoding not
    decoded yet. `notes`, if given, gains {description of a fused 3-D layout: [tensors, weights]}."""
    out: dict[str, TensorInfo] = {}
    stored: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name in layout.scales:
            stored[name] = info
            continue
        enc = layout.of(name)
        if not enc.quantized:
            pieces = expert_slices(info, enc) or [info]
            if notes is not None and (len(pieces) > 1 or enc.kind == PLAIN_3D):
                n = notes.setdefault(describe(enc), [0, 0])
                n[0], n[1] = n[0] + 1, n[1] + len(pieces)
            out.update((t.name, t) for t in pieces)
            for t in pieces:  # what is read: a view's slice (once for the members that share it)
                for r in getattr(t, "parts", None) or (t,):
                    stored[r.name] = r
            continue
        stored[name] = info
        if enc.kind not in DECODED_KINDS:
            raise SourceError(f"tensor {show(name)} ({show(info.file.name, quote=False)}): source holds "
                              f"{_REFUSED.get(enc.kind, f'{enc.kind}, which shardquant does not convert yet')}")
        if name != enc.data[0]:
            continue
        parts = tuple(tensors[n] for n in enc.tensors)
        out[enc.name] = DecodedTensor(enc.name, "BF16", tuple(enc.shape), info.file, info.offset,
                                      2 * math.prod(enc.shape), enc, parts)
    return out, stored
