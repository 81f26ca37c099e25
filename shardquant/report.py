"""What `verify` found and how it is shown: violations by rule, quantization error (SQNR, relative
RMS error) per tensor, quantizer, layer and projection, the text table, and a PNG heat map written
without a plotting dependency."""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Each rule a violation can break, in report order, with what breaking it means.
RULES: dict[str, str] = {
    "file-integrity": "file missing, not a regular file, or its size or SHA-256 not the manifest's",
    "file-unlisted": "file or directory the scale manifest does not list",
    "config": "the checkpoint does not announce a supported quantization",
    "index": "index and shards disagree",
    "tensors": "quantized module missing a tensor, or carrying one that does not belong",
    "dtype-shape": "tensor with the wrong dtype or shape",
    "global-scale": "global scale NaN, Inf, zero, negative, subnormal or overflowing",
    "block-scale": "NaN (E4M3 0x7F/0xFF) or negative block scale",
    "fused-scale": "members of a fused set with different global scales",
    "fused-precision": "fused set mixing quantized and high-precision members",
    "excluded-with-scales": "excluded module carrying quantization tensors",
    "unlisted-high-precision": "high-precision linear missing from the exclude list",
    "manifest": "scale_manifest.json invalid or disagreeing with the tensors",
    "source": "output disagrees with its source checkpoint",
    "sqnr": "quantized tensor below the SQNR floor",
}
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
        """NaN when either sum is NaN or both are infinite; -inf when the noise swamps the signal
        beyond float range (a dequantized Inf), never a math domain error."""
        s, n = self.signal, self.noise
        if math.isnan(s) or math.isnan(n) or (math.isinf(s) and math.isinf(n)):
            return math.nan
        if n == 0:
            return math.inf
        ratio = s / n
        return 10 * math.log10(ratio) if ratio > 0 else -math.inf

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
    rtn_noise: float | None = None  # searched scales (--scale-search): the same tensor's noise under RTN

    @property
    def rtn_gain_db(self) -> float | None:
        """SQNR over RTN's for a tensor with searched scales (positive: better), else None."""
        if self.rtn_noise is None or not (self.noise > 0 and self.rtn_noise > 0):
            return None if self.rtn_noise is None else (0.0 if self.rtn_noise == self.noise else math.inf)
        return 10 * math.log10(self.rtn_noise / self.noise)


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
    files_checked: int | None = None  # files checked against the manifest (None: no manifest files table)
    hashed: bool = False  # ... SHA-256 included

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
        return sorted(self.tensors, key=lambda t: (not math.isnan(t.sqnr_db),  # NaN first: the worst
                                                   0.0 if math.isnan(t.sqnr_db) else t.sqnr_db, t.name))[:n]

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
            "files_checked": self.files_checked, "sha256_checked": self.hashed and self.files_checked is not None,
        }
        if self.source is not None:
            d["min_sqnr_db"] = self.min_sqnr
            d["overall"] = stat(self.overall())
            d["tensors"] = [dict(stat(t), quantizer=t.quantizer, layer=t.layer, proj=t.proj,
                                 **({} if t.rtn_gain_db is None else {"rtn_gain_db": _finite(t.rtn_gain_db)}))
                            for t in self.tensors]
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


def render(rep: Report, top: int = 10, names: int = _NAMES_SHOWN) -> str:
    """The report as the CLI prints it: violations grouped per rule, then (with a source) the
    SQNR table by layer and projection and the worst tensors."""
    lines = [f"{rep.path}: {rep.flavor or '?'} flavor, {rep.format or '?'}"
             + (f", made by {rep.producer}" if rep.producer else "") + f"; {rep.modules} quantized modules"]
    if rep.files_checked is not None:
        lines.append(f"{rep.files_checked} files checked against the manifest (size"
                     + (" and SHA-256)" if rep.hashed else " only)"))
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
    # names come from headers, the index and the directory: an unpaired surrogate there has no UTF-8
    # form and would make printing fail; it is shown escaped instead
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


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
    gains = [g for t in rep.tensors if (g := t.rtn_gain_db) is not None and math.isfinite(g)]
    if gains:
        out.append(f"searched scales: SQNR over round-to-nearest {sum(gains) / len(gains):+.2f} dB on average, "
                   f"{min(gains):+.2f} dB at worst, over {len(gains)} tensors")
    return out


def heatmap_grid(rep: Report) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, projections, SQNR dB per cell; NaN where a layer has no such projection)."""
    # a NaN SQNR (NaN in the data) is as bad as it gets: -inf, not the NaN of an empty cell
    cells = {(L, p): -math.inf if math.isnan(s.sqnr_db) else s.sqnr_db for L, p, s in rep.layers() if L is not None}
    rows = sorted({L for L, _ in cells})
    cols = list(dict.fromkeys(p for _, p in cells))
    return rows, cols, [[cells.get((L, p), math.nan) for p in cols] for L in rows]


# A 5x7 bitmap font for the heat map's text: each glyph is 7 rows, top first, as two hex digits
# whose low 5 bits are the pixels (16 = the leftmost). Characters not listed are drawn as "?".
_FONT = {
    " ": "00000000000000", "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F",
    "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E",
    "7": "1F010204080808", "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E1111111F1111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E", "P": "1E11111E101010",
    "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "1111110A040404", "Z": "1F01020408101F",
    "a": "00000E010F110F", "b": "1010161911111E", "c": "00000E1010110E", "d": "01010D1311110F",
    "e": "00000E111F100E", "f": "0609081C080808", "g": "000F11110F010E", "h": "10101619111111",
    "i": "04000C0404040E", "j": "0200060202120C", "k": "10101214181412", "l": "0C04040404040E",
    "m": "00001A15151111", "n": "00001619111111", "o": "00000E1111110E", "p": "00001E111E1010",
    "q": "00000D130F0101", "r": "00001619101010", "s": "00000E100E011E", "t": "08081C08080906",
    "u": "0000111111130D", "v": "00001111110A04", "w": "0000111115150A", "x": "0000110A040A11",
    "y": "000011110F010E", "z": "00001F0204081F",
    ".": "00000000000C0C", ",": "000000000C0408", ":": "000C0C000C0C00", ";": "000C0C000C0408",
    "_": "0000000000001F", "-": "0000001F000000", "+": "0004041F040400", "=": "00001F001F0000",
    "(": "02040808080402", ")": "08040202020408", "[": "0E08080808080E", "]": "0E02020202020E",
    "/": "00010204081000", "*": "0004150E150400", "<": "02040810080402", ">": "08040201020408",
    "%": "18190204081303", "#": "0A0A1F0A1F0A0A", "'": "0C040800000000", "?": "0E110102040004",
    "!": "04040404040004", "~": "00000815020000",
}
_GLYPH_W, _GLYPH_H = 5, 7
_INK = (30, 30, 30)
_PAPER = (255, 255, 255)
_NONE = (128, 128, 128)  # a layer without such a tensor


def _glyph(ch: str) -> np.ndarray:
    code = _FONT.get(ch, _FONT["?"])
    rows = [int(code[i:i + 2], 16) for i in range(0, 14, 2)]
    return np.array([[(r >> (4 - j)) & 1 for j in range(_GLYPH_W)] for r in rows], dtype=bool)


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """The pixels of `text` in the built-in font: bool [7 * scale, (6 * len - 1) * scale]."""
    if not text:
        return np.zeros((_GLYPH_H * scale, 0), dtype=bool)
    gap = np.zeros((_GLYPH_H, 1), dtype=bool)
    parts = []
    for i, ch in enumerate(text):
        parts += [gap] if i else []
        parts.append(_glyph(ch))
    m = np.concatenate(parts, axis=1)
    return np.repeat(np.repeat(m, scale, axis=0), scale, axis=1)


def _text_w(text: str, scale: int = 1) -> int:
    return max(0, (6 * len(text) - 1) * scale)


def _colours(vals: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Red at or below lo, through yellow, to green at hi and above; grey where NaN (no tensor)."""
    t = np.clip((np.nan_to_num(vals, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.empty(vals.shape + (3,), np.uint8)
    rgb[..., 0] = np.where(t < 0.5, 220, 220 * (1 - t) * 2).astype(np.uint8)
    rgb[..., 1] = np.where(t < 0.5, 40 + 360 * t, 200).astype(np.uint8)
    rgb[..., 2] = 40
    rgb[np.isnan(vals)] = _NONE
    return rgb


def _scale(rep: Report, vals: np.ndarray) -> tuple[float, float]:
    """The colour scale is absolute, so pictures of different checkpoints compare: the SQNR floor
    (10 dB NVFP4, 20 dB FP8) to 15 dB above it."""
    finite = vals[np.isfinite(vals)]
    lo = rep.min_sqnr if rep.min_sqnr is not None else (float(finite.min()) if finite.size else 0.0)
    return lo, lo + 15.0


_PAD, _BAR_W, _MAX_LABEL = 12, 14, 30


def _short(label: str) -> str:
    """A projection name as a column label: at most _MAX_LABEL characters, the end kept."""
    return label if len(label) <= _MAX_LABEL else ".." + label[-(_MAX_LABEL - 2):]


def _db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else ("-inf" if x < 0 else "inf")


@dataclass(frozen=True)
class HeatmapLayout:
    """Where write_heatmap draws: the picture's size, the grid's top-left pixel and its cell size,
    the colour bar's top-left pixel and height (top = the scale's high end)."""

    width: int
    height: int
    grid_x: int
    grid_y: int
    cell: int
    bar_x: int
    bar_y: int
    bar_h: int


def heatmap_layout(rep: Report, cell: int = 16) -> HeatmapLayout:
    return _heatmap(rep, cell)[0]


def _heatmap(rep: Report, cell: int) -> tuple[HeatmapLayout, list[tuple[str, int, int, int, bool]], dict]:
    """The layout, every text (text, x, y, scale, vertical) and the values drawn."""
    rows, cols, grid = heatmap_grid(rep)
    vals = np.array(grid, dtype=np.float64).reshape(len(rows), len(cols))
    lo, hi = _scale(rep, vals)
    texts: list[tuple[str, int, int, int, bool]] = []
    title = "SQNR dB by layer and projection"
    sub = f"{rep.format or '?'} vs its source: {len(rep.tensors)} tensors, floor {lo:g} dB"
    real = [(v, L, c) for i, L in enumerate(rows) for j, c in enumerate(cols) if not math.isnan(v := vals[i, j])]
    foot = []
    if real:
        v, L, c = min(real, key=lambda t: t[0])
        foot.append(f"lowest {_db(v)} dB: layer {L} {_short(c)}")
        v, L, c = max(real, key=lambda t: t[0])
        foot.append(f"highest {_db(v)} dB: layer {L} {_short(c)}")
    y = _PAD
    texts.append((title, _PAD, y, 2, False))
    y += 2 * _GLYPH_H + 6
    texts.append((sub, _PAD, y, 1, False))
    grid_y = y + _GLYPH_H + 12
    # every row label while a row is tall enough for one, else every step-th
    step = max(1, -(-(_GLYPH_H + 2) // cell))
    row_w = max((_text_w(str(L)) for L in rows), default=0)
    axis_x = _PAD
    label_x = axis_x + _GLYPH_H + 6
    grid_x = label_x + row_w + 4
    grid_w, grid_h = len(cols) * cell, len(rows) * cell
    texts.append(("layer", axis_x, grid_y + max(0, (grid_h - _text_w("layer")) // 2), 1, True))
    for i, L in enumerate(rows):
        if i % step == 0:
            s = str(L)
            texts.append((s, label_x + row_w - _text_w(s), grid_y + i * cell + (cell - _GLYPH_H) // 2, 1, False))
    col_h = max((_text_w(_short(c)) for c in cols), default=0)
    cstep = max(1, -(-(_GLYPH_H + 2) // cell))
    for j, c in enumerate(cols):
        if j % cstep == 0:
            s = _short(c)
            texts.append((s, grid_x + j * cell + (cell - _GLYPH_H) // 2, grid_y + grid_h + 4, 1, True))
    axis_y = grid_y + grid_h + 4 + col_h + 6
    texts.append(("projection", grid_x + max(0, (grid_w - _text_w("projection")) // 2), axis_y, 1, False))
    foot_y = axis_y + _GLYPH_H + 10
    for k, f in enumerate(foot):
        texts.append((f, _PAD, foot_y + k * (_GLYPH_H + 4), 1, False))
    bottom = foot_y + len(foot) * (_GLYPH_H + 4)
    # the colour bar: its scale's ends and middle, and the colour of an empty cell
    bar_x, bar_y = grid_x + grid_w + 16, grid_y
    bar_h = max(grid_h, 100)
    low = f"{lo:g} dB floor" if rep.min_sqnr is not None else f"{lo:g} dB"
    marks = [(f"{hi:g} dB", bar_y), (f"{(lo + hi) / 2:g}", bar_y + bar_h // 2), (low, bar_y + bar_h - 1)]
    for s, at in marks:
        texts.append((s, bar_x + _BAR_W + 4, min(max(at - _GLYPH_H // 2, bar_y), bar_y + bar_h - _GLYPH_H), 1, False))
    none_y = bar_y + bar_h + 8
    texts.append(("no tensor", bar_x + _BAR_W + 4, none_y + 1, 1, False))
    right = bar_x + _BAR_W + 4 + max(_text_w(s) for s, _ in marks + [("no tensor", 0)])
    bottom = max(bottom, none_y + 10 + 6)
    width = max([right] + [x + (_GLYPH_H * sc if vert else _text_w(s, sc)) for s, x, _, sc, vert in texts]) + _PAD
    height = max([bottom] + [y + (_text_w(s, sc) if vert else _GLYPH_H * sc) for s, _, y, sc, vert in texts]) + _PAD
    lay = HeatmapLayout(width, height, grid_x, grid_y, cell, bar_x, bar_y, bar_h)
    return lay, texts, {"vals": vals, "lo": lo, "hi": hi, "none_y": none_y}


def write_heatmap(path: str | Path, rep: Report, cell: int = 16, labels: bool = True) -> tuple[int, int]:
    """PNG heat map of SQNR by layer (rows) and projection (columns, in the order `render` lists
    them), readable on its own: a title, layer numbers, projection names (vertical, the end of a long
    one kept), axis names, and a colour bar from the SQNR floor (red; 10 dB NVFP4, 20 dB FP8) through
    yellow to green at 15 dB above it, with its values, grey for a layer without such a tensor, and
    the lowest and highest cell. The scale is absolute, so pictures of different checkpoints compare.
    Text is drawn in a built-in 5x7 font; the file is written with zlib and struct (no plotting
    dependency) and is the same bytes for the same report. labels=False: the bare grid of
    cell-sized squares. Returns (width, height) in pixels."""
    if not labels:
        rows, cols, grid = heatmap_grid(rep)
        vals = np.array(grid, dtype=np.float64).reshape(len(rows), len(cols))
        img = np.repeat(np.repeat(_colours(vals, *_scale(rep, vals)), cell, axis=0), cell, axis=1)
        write_png(path, img)
        return img.shape[1], img.shape[0]
    lay, texts, d = _heatmap(rep, cell)
    img = np.empty((lay.height, lay.width, 3), np.uint8)
    img[...] = _PAPER
    vals, lo, hi = d["vals"], d["lo"], d["hi"]
    rgb = _colours(vals, lo, hi)
    inner = cell - 1 if cell >= 6 else cell  # a 1-pixel line of paper between cells
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            y, x = lay.grid_y + i * cell, lay.grid_x + j * cell
            img[y:y + inner, x:x + inner] = rgb[i, j]
    ramp = hi - (hi - lo) * np.arange(lay.bar_h, dtype=np.float64) / max(lay.bar_h - 1, 1)  # top: hi
    img[lay.bar_y:lay.bar_y + lay.bar_h, lay.bar_x:lay.bar_x + _BAR_W] = _colours(ramp, lo, hi)[:, None, :]
    img[d["none_y"]:d["none_y"] + 10, lay.bar_x:lay.bar_x + _BAR_W] = _NONE
    for s, x, y, sc, vert in texts:
        m = text_mask(s, sc)
        if vert:  # read from the bottom up
            m = np.rot90(m)
        img[y:y + m.shape[0], x:x + m.shape[1]][m] = _INK
    write_png(path, img)
    return lay.width, lay.height


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG of an [height, width, 3] uint8 array."""
    h, w, _ = rgb.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + np.ascontiguousarray(row).tobytes() for row in rgb)  # filter 0 per row
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
