"""SHA-256 of every source file, computed from the bytes the conversion reads anyway.

The pipeline reads tensors in quantizer order, not file order, and SHA-256 must see a file's bytes
in order. So each file keeps a cursor: a tensor read at the cursor is hashed at once; one read ahead
of it is held (bounded by HOLD_BYTES in all) until the gap before it is filled; the header, the
padding between tensors and the tensors this run does not read (those of shards a resumed run
keeps) are read by the hasher itself, which is the only extra I/O. A tensor read ahead while
HOLD_BYTES are held is dropped and read again by the hasher when its cursor gets there (from the page
cache, most often; counted in `extra_bytes`): hashing keeps pace with the conversion instead of
being left for its end (a shared expert group reads gate and up of every expert before any down).
Hashing runs on its own threads, each file on one (SHA-256 is serial within a file), files in
parallel; hashlib releases the GIL while it hashes.

A hub source may still be downloading while it is converted (shardquant/hub.py Downloads): the
hasher starts a file (its size, its header) only once the file is complete; the first tensor the
pipeline reads from a file means it is (the pipeline waits for it), and finish() waits for the rest.

For a hub source the expected value is known before reading: the hub cache names each large
file's blob by its LFS object id, which is the file's SHA-256. A mismatch is an error.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np

from .errors import SourceError
from .plan import HASH_HOLD_BYTES as HOLD_BYTES

HASH_THREADS = 4  # files hashed at once; the conversion reads one or two shards at a time

_CHUNK = 16 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def hub_sha256(p: Path, ck) -> str | None:
    """The hub's SHA-256 of a source file, where the hub cache holds it as a blob named by it."""
    if getattr(ck, "repo", None) is None:
        return None
    target = Path(os.path.realpath(p))
    if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
        return target.name
    return None


def source_files(ck) -> list[Path]:
    """Every file of the source that the conversion reads: shards, index, config and copied files."""
    index = ck.root / "model.safetensors.index.json"
    has_index = index.name in ck.hub.sizes if getattr(ck, "hub", None) is not None else index.is_file()
    files = {*ck.shards, *ck.extra_files, *([index] if has_index else [])}
    return sorted(files, key=lambda p: p.name)


class _File:
    def __init__(self, path: Path, spans: list[tuple[int, int]], self_read: set[int]):
        self.path = path
        self.size: int | None = None  # set when the file is started: complete on disk
        self.spans = spans  # tensors' (offset, nbytes), sorted
        self.self_read = self_read  # offsets of tensors the conversion will not read
        self.i = 0
        self.cursor = 0
        self.h = hashlib.sha256()
        self.pending: dict[int, np.ndarray] = {}
        self.deferred = False
        self.digest: str | None = None


class _Worker:
    """One hashing thread and the files it owns: SHA-256 is serial within a file, so files hash in
    parallel on their own threads (one thread hashes about 1.3 GB/s on an H200 host,
    docs/benchmarks/README.md, slower than the disk)."""

    def __init__(self, n: int):
        self.q: queue.Queue = queue.Queue()
        self.files: list[_File] = []
        self.unstarted: list[_File] = []
        self.next_look = 0.0
        self.busy = 0.0
        self.n = n


class SourceHasher:
    """feed() from the reader threads; finish() once every conversion read is done."""

    def __init__(self, ck, skip_files: dict[str, dict], unread: set[tuple[str, int]], gate=None,
                 threads: int = HASH_THREADS):
        """skip_files: source files already hashed by an earlier run of this conversion (same
        identity), by name; unread: (file name, offset) of tensors this run will not read; gate: a hub
        source's downloads (ready(path), wait(path)), None for a local directory."""
        self.ck = ck
        self.gate = gate
        self.results: dict[str, dict] = {}
        self.extra_bytes = 0
        self._lock = threading.Lock()
        self._held = 0
        self.files: dict[Path, _File] = {}
        spans: dict[Path, list[tuple[int, int]]] = {}
        for t in ck.stored_tensors.values():
            spans.setdefault(t.file, []).append((t.offset, t.nbytes))
        shard_set = set(ck.shards)  # a set: a checkpoint of hundreds of shards has thousands of spans
        for p in source_files(ck):
            if p.name in skip_files:
                self.results[p.name] = dict(skip_files[p.name])
                continue
            sp = sorted(spans.get(p, []))
            self.files[p] = _File(p, sp, {o for o, _ in sp if p not in shard_set or (p.name, o) in unread})
        # consecutive shards go to different threads: the conversion reads them roughly in turn
        shards = [f for f in self.files.values() if f.spans]
        others = [f for f in self.files.values() if not f.spans]
        self._workers = [_Worker(i) for i in range(max(1, min(threads, len(shards))))]
        self._owner: dict[Path, _Worker] = {}
        for i, f in enumerate(shards + others):
            w = self._workers[i % len(self._workers)]
            w.files.append(f)
            w.unstarted.append(f)
            self._owner[f.path] = w
        self.error: BaseException | None = None
        self._threads = [threading.Thread(target=self._work, args=(w,), name=f"shardquant-hash-{w.n}", daemon=True)
                         for w in self._workers]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> float:
        """Seconds the hashing threads spent on tensors handed to them, the busiest thread's
        (shardquant/trace.py)."""
        return max(w.busy for w in self._workers)

    def feed(self, info, raw: np.ndarray) -> None:
        f = self.files.get(info.file)
        if f is None:
            return
        with self._lock:
            if f.deferred:
                return
            if self._held + info.nbytes > HOLD_BYTES:
                raw = None  # not held: the hasher reads it itself when its cursor gets there
            else:
                self._held += info.nbytes
        self._owner[f.path].q.put((f, info.offset, raw))

    def _work(self, w: _Worker) -> None:
        try:
            self._start_ready(w)  # headers, and leading tensors this run does not read
            while (item := w.q.get()) is not None:
                t0 = time.perf_counter()
                f, off, raw = item
                if f.size is None:  # the pipeline read from it: the file is complete
                    self._start(w, f)
                if raw is None:
                    if f.digest is None and not f.deferred and off >= f.cursor:
                        f.self_read.add(off)
                        self._advance(f)
                elif f.digest is None and not f.deferred and off >= f.cursor and off not in f.pending:
                    f.pending[off] = raw
                    self._advance(f)
                else:
                    self._release(raw.nbytes)
                if f.deferred and f.pending:
                    for a in f.pending.values():
                        self._release(a.nbytes)
                    f.pending.clear()
                if w.unstarted and time.monotonic() >= w.next_look:  # files completed since
                    self._start_ready(w)
                w.busy += time.perf_counter() - t0
            # every conversion read is done: hash what is left of this thread's files
            for f in w.files:
                if f.digest is None and not f.deferred:
                    self._start(w, f, wait=True)
                    if f.digest is None:
                        self._advance(f, to_end=True)
        except BaseException as e:  # handed to finish()
            self.error = e
            while w.q.get() is not None:
                pass

    def _start_ready(self, w: _Worker) -> None:
        """Start, and hash as far as possible, the files not started yet that are complete on disk."""
        w.next_look = time.monotonic() + 0.5
        for f in list(w.unstarted):
            if self.gate is None or self.gate.ready(f.path):
                self._start(w, f)

    def _start(self, w: _Worker, f: _File, wait: bool = False) -> None:
        if f.size is not None:
            return
        if wait and self.gate is not None:
            self.gate.wait(f.path)
        try:
            f.size = f.path.stat().st_size
        except OSError as e:
            raise SourceError(f"{f.path}: cannot read ({e.strerror or e})") from None
        w.unstarted.remove(f)
        self._advance(f)

    def _release(self, n: int) -> None:
        with self._lock:
            self._held -= n

    def _advance(self, f: _File, to_end: bool = False) -> None:
        """Hash from the cursor as far as the bytes are at hand (or, to_end, reading what is not)."""
        while f.cursor < f.size:
            nxt = f.spans[f.i] if f.i < len(f.spans) else None
            if nxt is None or f.cursor < nxt[0]:  # header or padding: not a tensor's bytes
                self._read(f, (nxt[0] if nxt else f.size) - f.cursor)
                continue
            off, n = nxt
            if off in f.pending:
                raw = f.pending.pop(off)
                f.h.update(memoryview(raw.reshape(-1).view(np.uint8)))
                self._release(raw.nbytes)
                f.cursor += n
            elif off in f.self_read or to_end:
                self._read(f, n)
            else:
                return
            f.i += 1
        f.digest = f.h.hexdigest()
        self.results[f.path.name] = {"sha256": f.digest, "size": f.size}

    def _read(self, f: _File, n: int) -> None:
        try:
            with open(f.path, "rb", buffering=0) as fh:
                fh.seek(f.cursor)
                left = n
                while left:
                    chunk = fh.read(min(_CHUNK, left))
                    if not chunk:
                        raise SourceError(f"{f.path}: the file shrank while it was converted")
                    f.h.update(chunk)
                    left -= len(chunk)
        except OSError as e:
            raise SourceError(f"{f.path}: cannot read ({e.strerror or e})") from None
        f.cursor += n
        with self._lock:
            self.extra_bytes += n
        # a span entirely read here advances the span index in the caller

    def abort(self) -> None:
        """Stop the thread without finishing (the conversion is failing)."""
        with self._lock:
            for f in self.files.values():
                f.deferred = True
        for w in self._workers:
            w.q.put(None)

    def finish(self) -> dict[str, dict]:
        """Hash what is left, check hub values; {file name: {"sha256", "size", "checked_against_hub"}}."""
        for w in self._workers:
            w.q.put(None)
        for t in self._threads:
            t.join()
        if self.error is not None:
            raise self.error
        out = {}
        for p in source_files(self.ck):
            rec = self.results[p.name]
            hub = hub_sha256(p, self.ck)
            if hub is not None and hub != rec["sha256"]:
                raise SourceError(f"{p}: SHA-256 {rec['sha256']} differs from the hub's {hub}: the cached copy is "
                                  "damaged; delete it from the hub cache and run again")
            out[p.name] = {"sha256": rec["sha256"], "size": rec["size"], "checked_against_hub": hub is not None}
        return out
