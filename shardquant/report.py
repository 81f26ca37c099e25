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
    return out


def heatmap_grid(rep: Report) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, projections, SQNR dB per cell; NaN where a layer has no such projection)."""
    # a NaN SQNR (NaN in the data) is as bad as it gets: -inf, not the NaN of an empty cell
    cells = {(L, p): -math.inf if math.isnan(s.sqnr_db) else s.sqnr_db for L, p, s in rep.layers() if L is not None}
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
