"""The resume journal, `.shardquant-journal.json`, kept in the output while a run is unfinished and
removed when it completes (the finished output's record is then scale_manifest.json).

It holds the plan's fingerprint, every file this conversion wrote or is about to write (so that a
later run, `--force` included, knows exactly what it may replace or remove), the scales of the
quantizers computed so far, the SHA-256 of source files hashed completely, and the tokens of the
runs whose temporary files may lie in the directory. A re-run with the same fingerprint keeps the
shards that still match their checksums and redoes the rest; the bytes come out as an uninterrupted
run would write them. The journal is untrusted input when read back: every field is checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from . import __version__
from .errors import OutputError
from .plan import Plan
from .st import encode_header
from .writer import TMP_RE, TOKEN_RE, OutputDir

JOURNAL_NAME = ".shardquant-journal.json"
JOURNAL_VERSION = 3  # 3 adds `partial`; a version 2 journal reads as one without partial shards
SHARD_METADATA = {"format": "pt"}
MAX_JOURNAL_BYTES = 256 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def recipe(plan: Plan) -> str:
    """What decides the output bytes and can be known without reading weights: tool version,
    format, flavor, policy, the shard layout (names, dtypes, shapes, order), the source config, and
    each source file's name and size (and, from a hub cache, its content hash). Made once per plan:
    a plan is not changed once made (shardquant/plan.py), and a conversion asks at its claim, for its
    card and for its manifest: the shard layout of ~20k tensors takes ~0.15 s to encode."""
    kept = vars(plan)  # beside the plan's fields, not one of them (a plan's equality is its fields')
    if "_recipe" not in kept:
        kept["_recipe"] = _recipe(plan)
    return kept["_recipe"]


def shard_header(plan: Plan, fname: str) -> bytes:
    """Planned shard `fname`'s header bytes as the writer writes them (st.encode_header with
    SHARD_METADATA), encoded once per plan and kept beside its fields: the recipe hashes them, the card
    judges them, the writer writes them (1.0-1.3 s each for 135,000 output tensors on the 2-core
    development machine: DeepSeek-V3 to NVFP4)."""
    kept = vars(plan)
    if "_headers" not in kept:  # all at once: the recipe, which asks first, hashes every shard's
        kept["_headers"] = {f: encode_header(ts, SHARD_METADATA) for f, ts in plan.shards}
    return kept["_headers"][fname]


def _recipe(plan: Plan) -> str:
    from .provenance import hub_sha256, source_files

    ck = plan.checkpoint
    files = source_files(ck)
    doc = {
        "tool": __version__,
        "format": plan.format,
        "flavor": plan.flavor,
        "expert_policy": plan.expert_policy,
        "exclude_modules": plan.exclude_modules,
        "shards": [[fname, hashlib.sha256(shard_header(plan, fname)).hexdigest()] for fname, _ in plan.shards],
        "source": [[p.name, *_hub_id(p, ck)] if ck.hub is not None else [p.name, p.stat().st_size, hub_sha256(p, ck)]
                   for p in files],
        "config": hashlib.sha256(json.dumps(ck.config, sort_keys=True).encode()).hexdigest(),
    }
    if len(plan.formats) > 1:  # mixed precision: which quantizer takes which format
        doc["formats"] = {g.key: g.format for g in plan.groups}
    if any(g.cast for g in plan.groups):  # codes cast from the source (--mx-source cast) or re-quantized
        doc["casts"] = {g.key: g.cast for g in plan.groups if g.cast}
    if getattr(plan, "scale_search", "none") != "none":
        doc["scale_search"] = plan.scale_search
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def fingerprint(plan: Plan) -> str:
    """The recipe plus the identity of every source file on this machine (size, mtime and ctime:
    ctime changes on any write and cannot be set back, so a source rewritten in place with its
    size and mtime kept is still noticed). A hub source's files are identified by the hub itself:
    repo, commit, and each file's size and (LFS files) SHA-256 from the plan's file listing, so the
    fingerprint needs no file on disk and a conversion can start before its downloads end
    (shardquant/convert.py); the SHA-256 of every file is still checked as it is read
    (shardquant/provenance.py)."""
    from .provenance import source_files

    ck = plan.checkpoint
    if ck.hub is not None:
        ids = [["hub", ck.hub.repo, ck.hub.commit]] + [[p.name, *_hub_id(p, ck)] for p in source_files(ck)]
    else:
        ids = [[p.name, *identity(p)] for p in source_files(ck)]
    return hashlib.sha256(json.dumps([recipe(plan), ids]).encode()).hexdigest()


def _hub_id(p, ck) -> list:
    """A hub file's size and SHA-256 (None for a file not in LFS) as the plan's listing gives them:
    the values the cached file's size and blob name have once it is downloaded (shardquant/hub.py)."""
    return [ck.hub.sizes.get(p.name), ck.hub.sha256.get(p.name)]


def identity(p) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


@dataclass
class Journal:
    od: OutputDir
    fingerprint: str
    files: dict[str, dict | None] = field(default_factory=dict)  # name -> {"sha256", "size"}, or None while written
    scales: dict[str, list[float]] = field(default_factory=dict)  # quantizer -> [amax, global scale]
    sources: dict[str, dict] = field(default_factory=dict)  # source file -> {"sha256", "size"}
    runs: list[str] = field(default_factory=list)  # tokens of runs whose temporary files may remain
    # shard -> {"tmp", "tensors", "size", "sha256"}: a shard whose temporary file holds its header and
    # first `tensors` tensors, durable (`size` bytes hashing to `sha256`): resumed from there
    partial: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, od: OutputDir) -> "Journal | None":
        raw = od.read_bytes(JOURNAL_NAME, MAX_JOURNAL_BYTES)
        if raw is None:
            return None
        where = od.path / JOURNAL_NAME
        try:
            d = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            raise OutputError(f"{where}: unreadable resume journal (not JSON); use --force to start over") from None
        try:
            return cls(od, *_validate(d))
        except _Bad as e:
            raise OutputError(f"{where}: invalid resume journal ({e}); use --force to start over") from None

    def save(self) -> None:
        doc = {"version": JOURNAL_VERSION, "tool": __version__, "fingerprint": self.fingerprint,
               "files": self.files, "scales": self.scales, "sources": self.sources, "runs": self.runs,
               "partial": self.partial}
        # compact: the C encoder (an indent takes Python's, 2.5x slower), and this is written every
        # CHECKPOINT_SECONDS with a scale per quantizer so far (shardquant/pipeline.py _Shards)
        self.od.write_file(JOURNAL_NAME, (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode())

    def intend(self, names) -> None:
        """Record that these files are about to be written (so they are ours if a kill lands
        between their rename and their record)."""
        changed = False
        for n in names:
            if self.files.get(n, 0) is not None:
                self.files[n] = None
                changed = True
        if changed:
            self.save()

    def checkpoint(self, name: str, tmp: str, tensors: int, info: dict, scales: dict) -> None:
        """Shard `name`'s temporary file `tmp` holds its first `tensors` tensors, durably."""
        self.partial[name] = {"tmp": tmp, "tensors": tensors, "size": info["size"], "sha256": info["sha256"]}
        self.scales.update({k: _scale_rec(v) for k, v in scales.items()})
        self.save()

    def record(self, name: str, info: dict, scales: dict | None = None) -> None:
        self.partial.pop(name, None)
        self.files[name] = {"sha256": info["sha256"], "size": info["size"]}
        if scales:
            self.scales.update({k: _scale_rec(v) for k, v in scales.items()})
        self.save()

    def valid(self, names) -> set[str]:
        """Recorded files, of these names, still on disk with their recorded size and checksum."""
        ok = set()
        for n in names:
            rec = self.files.get(n)
            if not rec:
                continue
            st = self.od.lstat(n)
            if st is None or not _regular(st) or st.st_size != rec["size"]:
                continue
            got = self.od.digest(n)
            if got is not None and got == (rec["size"], rec["sha256"]):
                ok.add(n)
        return ok


def _regular(st) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


def _scale_rec(v) -> list:
    """[amax, global scale], and for a cast (shardquant/pipeline.py cast_group) the blocks it re-quantized."""
    return [float(v[0]), float(v[1])] + ([int(v[2])] if len(v) > 2 else [])


class _Bad(Exception):
    pass


def plain_name(n: object) -> bool:
    return (isinstance(n, str) and 0 < len(n) <= 255 and n not in (".", "..") and "/" not in n
            and "\0" not in n and "\\" not in n)


def _file_rec(v: object, what: str) -> dict:
    if not isinstance(v, dict) or set(v) != {"sha256", "size"}:
        raise _Bad(f"{what}: expected {{sha256, size}}")
    if not isinstance(v["sha256"], str) or not _HEX64.fullmatch(v["sha256"]):
        raise _Bad(f"{what}: sha256 is not 64 hex digits")
    if type(v["size"]) is not int or not 0 <= v["size"] < 2**63:
        raise _Bad(f"{what}: size out of range")
    return {"sha256": v["sha256"], "size": v["size"]}


def _validate(d: object) -> tuple:
    if not isinstance(d, dict):
        raise _Bad("not a JSON object")
    if d.get("version") not in (2, JOURNAL_VERSION):
        raise _Bad(f"version {str(d.get('version'))[:20]!r}, expected {JOURNAL_VERSION}")
    fp = d.get("fingerprint")
    if not isinstance(fp, str) or not _HEX64.fullmatch(fp):
        raise _Bad("fingerprint is not 64 hex digits")
    files, scales, sources, runs = d.get("files"), d.get("scales"), d.get("sources"), d.get("runs")
    if not isinstance(files, dict) or not isinstance(scales, dict) or not isinstance(sources, dict) \
            or not isinstance(runs, list):
        raise _Bad("files, scales, sources or runs missing or of the wrong type")
    out_files: dict[str, dict | None] = {}
    for n, v in files.items():
        if not plain_name(n):
            raise _Bad(f"file name {n[:80]!r} is not a plain file name")
        out_files[n] = None if v is None else _file_rec(v, f"file {n[:80]!r}")
    out_scales: dict[str, list[float]] = {}
    for k, v in scales.items():
        if not (isinstance(v, list) and len(v) in (2, 3) and all(type(x) in (int, float) for x in v)
                and all(math.isfinite(x) for x in v) and v[0] >= 0 and v[1] > 0
                and (len(v) == 2 or (type(v[2]) is int and v[2] >= 0))):
            raise _Bad(f"scales of {k[:80]!r}: expected [amax >= 0, global scale > 0, (re-quantized blocks of a "
                       "cast >= 0)], finite")
        out_scales[k] = _scale_rec(v)
    out_sources = {}
    for n, v in sources.items():
        if not plain_name(n):
            raise _Bad(f"source file name {n[:80]!r} is not a plain file name")
        out_sources[n] = _file_rec(v, f"source {n[:80]!r}")
    if len(runs) > 10_000 or not all(isinstance(t, str) and TOKEN_RE.fullmatch(t) for t in runs):
        raise _Bad("runs: expected a list of run tokens")
    partial = d.get("partial", {}) if d["version"] == JOURNAL_VERSION else {}
    if not isinstance(partial, dict):
        raise _Bad("partial: expected an object")
    out_partial = {}
    for n, v in partial.items():
        m = TMP_RE.fullmatch(v.get("tmp", "")) if isinstance(v, dict) and isinstance(v.get("tmp"), str) else None
        if not plain_name(n) or not isinstance(v, dict) or set(v) != {"tmp", "tensors", "size", "sha256"} or m is None \
                or m["name"] != n or m["token"] not in runs or type(v["tensors"]) is not int or v["tensors"] < 0:
            raise _Bad(f"partial shard {str(n)[:80]!r}: expected {{tmp (ours), tensors, size, sha256}}")
        rec = _file_rec({"sha256": v["sha256"], "size": v["size"]}, f"partial shard {n[:80]!r}")
        out_partial[n] = {"tmp": v["tmp"], "tensors": v["tensors"], **rec}
    return fp, out_files, out_scales, out_sources, list(runs), out_partial
