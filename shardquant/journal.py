"""A small journal beside the output so that a killed conversion resumes where it stopped.

It records the plan's fingerprint and, for every finished shard, its size, its SHA-256 and the
scales of the quantizers computed so far. A re-run with the same fingerprint keeps the shards
that still match their checksums and redoes the rest; the bytes come out as an uninterrupted run
would write them. The index is written last, so a directory without it is never mistaken for a
finished checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import OutputError
from .plan import Plan
from .st import encode_header

JOURNAL_NAME = ".shardquant-journal.json"
SHARD_METADATA = {"format": "pt"}
_CHUNK = 16 << 20


def fingerprint(plan: Plan) -> str:
    """Everything that decides the output bytes: tool version, format, flavor, policy, the shard
    layout (names, dtypes, shapes, order), and the identity of every source file."""
    ck = plan.checkpoint
    files = sorted({*ck.shards, *(p for p in ck.extra_files)}, key=lambda p: p.name)
    doc = {
        "tool": __version__,
        "format": plan.format,
        "flavor": plan.flavor,
        "expert_policy": plan.expert_policy,
        "exclude_modules": plan.exclude_modules,
        "shards": [[fname, hashlib.sha256(encode_header(ts, SHARD_METADATA)).hexdigest()] for fname, ts in plan.shards],
        "source": [[p.name, *_identity(p)] for p in files],
        "config": hashlib.sha256(json.dumps(ck.config, sort_keys=True).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _identity(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Journal:
    path: Path
    fingerprint: str
    shards: dict[str, dict] = field(default_factory=dict)  # fname -> {"size", "sha256"}
    scales: dict[str, list[float]] = field(default_factory=dict)  # quantizer -> [amax, global scale]
    complete: bool = False

    @classmethod
    def load(cls, out: Path) -> "Journal | None":
        path = out / JOURNAL_NAME
        if not path.exists():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, str(d["fingerprint"]), dict(d["shards"]), dict(d["scales"]), bool(d["complete"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise OutputError(f"{path}: unreadable resume journal (use --force to start over)") from None

    def save(self) -> None:
        doc = {"fingerprint": self.fingerprint, "shards": self.shards, "scales": self.scales,
               "complete": self.complete, "tool": __version__}
        tmp = self.path.with_name(self.path.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def record(self, fname: str, size: int, digest: str, scales: dict) -> None:
        self.shards[fname] = {"sha256": digest, "size": size}
        self.scales.update({k: list(v) for k, v in scales.items()})
        self.save()

    def valid_shards(self, out: Path) -> set[str]:
        """Recorded shards still on disk with their recorded size and checksum."""
        ok = set()
        for fname, rec in self.shards.items():
            p = out / fname
            if p.is_file() and p.stat().st_size == rec["size"] and file_digest(p) == rec["sha256"]:
                ok.add(fname)
        return ok


def sync_dir(path: Path) -> None:
    """Make renames in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
