"""The streaming pipeline: a reader thread (several reads in flight, bounded read-ahead), one
worker per device quantizing whole groups, and a writer thread that streams each shard header
first, in plan order, recording finished shards in the journal."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from . import decode, flavors, formats, trace
from .journal import Journal, shard_header
from .encoding import Encoded, f32_to_bf16
from .errors import NumericError
from .provenance import SourceHasher
from .plan import CAST_THREADS, JOB_BYTES, PREFETCH_BYTES, READ_THREADS, WRITE_AHEAD_BYTES, Plan, Unit
from .st import read_raw
from .startup import WARM_START_BYTES, hint
from .writer import NewFile, OutputDir

# A shard being written is made durable and recorded this often: an interrupted conversion loses at
# most this much writing, plus the quantizer straddling the checkpoint (README, "Resume").
CHECKPOINT_SECONDS = 2.0


def warm_start(plan: Plan, nbytes: int = WARM_START_BYTES) -> None:
    """Ask the kernel to read ahead the first `nbytes` the pipeline will read (POSIX_FADV_WILLNEED,
    adjacent tensors as one range), on a daemon thread: the disk starts while the GPU does
    (shardquant/convert.py), and the first reads come from the page cache. Files of a hub source
    still downloading are left alone; the hint is only a hint, so a failure is ignored."""
    if not hasattr(os, "posix_fadvise"):
        return
    ck = plan.checkpoint
    ranges: list[tuple[Path, int, int]] = []
    left = nbytes
    for u in plan.units:
        # a weight the source stores quantized is read as its stored parts (shardquant/encoding.py)
        for m in (p for t in ([u.kept] if u.kept is not None else u.group.members)
                  for p in (getattr(t, "parts", None) or (t,))):
            if left <= 0:
                break
            if ranges and ranges[-1][0] == m.file and ranges[-1][1] + ranges[-1][2] == m.offset:
                ranges[-1] = (m.file, ranges[-1][1], ranges[-1][2] + m.nbytes)
            else:
                ranges.append((m.file, m.offset, m.nbytes))
            left -= m.nbytes
        if left <= 0:
            break
    hint(ranges, ck.hub, "warm-start")



class _Counter:
    """Bytes read from the source, across threads (the benchmark checks it equals the source size);
    each first read of a tensor is also handed to the source hasher (shardquant/provenance.py). A hub
    source still downloading (shardquant/hub.py Downloads): each read first waits for its file."""

    def __init__(self, hasher=None, gate=None) -> None:
        self.gate = gate
        self.n = 0
        self.again = 0  # of which second reads (groups read twice): the speed counts source bytes once
        self.hasher = hasher
        self._lock = threading.Lock()

    def read(self, info, first: bool = True, defer: tuple[str, ...] = (), empty=np.empty):
        """A tensor's raw storage, in an array made by `empty` (st.read_raw). A weight the source stores
        quantized: its parts read, then decoded here, or, where its kind is in `defer` (the backend's
        own decodes), handed over as they are (shardquant/encoding.py Encoded)."""
        parts = getattr(info, "parts", None)
        if parts:
            raws = [self.read(p, first, empty=empty if info.encoding.kind in defer else np.empty) for p in parts]
            return Encoded(info, tuple(raws)) if info.encoding.kind in defer else info.decode(raws)
        if self.gate is not None:
            self.gate.wait(info.file)
        if not self.n:
            trace.mark("first-read")
        raw = read_raw(info, empty)
        with self._lock:
            self.n += info.nbytes
            self.again += 0 if first else info.nbytes
        if first and self.hasher is not None:
            self.hasher.feed(info, raw)
        return raw


class _Reader:
    """Reads units ahead on a thread, member by member, so the disk keeps working while the
    arithmetic runs. Bytes held (read and not yet released by the consumer) stay within the
    largest unit plus PREFETCH_BYTES. Two-pass groups are handed over without data."""

    def __init__(self, units: list[Unit], counter: _Counter, defer: tuple[str, ...] = (), empty=np.empty):
        self.units, self.counter, self.defer = units, counter, defer  # defer: the backend decodes these kinds
        self.empty = empty  # what a quantizer's members are read into (the backend's host_empty)
        self.budget = max((u.source_bytes for u in units if not _two(u)), default=0) + PREFETCH_BYTES
        self.held = 0
        self.waited = 0.0  # seconds the consumer waited for read data (shardquant/trace.py "pipeline")
        self.cv = threading.Condition()
        self.q: queue.Queue = queue.Queue()
        self.stop = False
        self.t = threading.Thread(target=self._work, name="shardquant-reader", daemon=True)
        self.t.start()

    def _acquire(self, n: int) -> bool:
        with self.cv:
            self.cv.wait_for(lambda: self.stop or self.held + n <= self.budget)
            self.held += n
            return not self.stop

    def release(self, n: int) -> None:
        with self.cv:
            self.held -= n
            self.cv.notify_all()

    def _work(self) -> None:
        trace.mark("reader-start")
        # READ_THREADS reads in flight: a disk serves several outstanding requests faster than one.
        pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shardquant-read")
        try:
            for u in self.units:
                if _two(u):
                    self.q.put((u, None))
                    continue
                futures = []
                members = u.group.members if u.group else [u.kept]
                shared = _shared_parts(members)
                part_reads: dict[int, object] = {}  # a slice several members view: read once
                for m in members:
                    if not self._acquire(m.nbytes):
                        return
                    parts = getattr(m, "parts", None) or ()
                    if any(id(p) in shared for p in parts):
                        for p in parts:
                            if id(p) not in part_reads:
                                part_reads[id(p)] = pool.submit(self.counter.read, p)
                        # submitted after its parts: they have started (FIFO) when this waits on them
                        futures.append(pool.submit(_decode_when_read, m, [part_reads[id(p)] for p in parts]))
                    else:  # a cast group's members as stored (pipeline.run cast_group casts their codes)
                        defer = () if u.group is None else (u.group.cast,) if u.group.cast else self.defer
                        empty = self.empty if u.group is not None and not u.group.cast else np.empty  # to the device
                        futures.append(pool.submit(self.counter.read, m, True, defer, empty))
                self.q.put((u, futures))
        except BaseException as e:  # handed to the consumer, which raises it
            self.q.put((None, e))
        finally:
            pool.shutdown(wait=False)
        self.q.put((None, None))

    def __iter__(self) -> Iterator[tuple[Unit, list[np.ndarray] | None]]:
        while True:
            t0 = time.perf_counter()
            u, futures = self.q.get()
            if u is None:
                if isinstance(futures, BaseException):
                    raise futures
                return
            data = None if futures is None else [f.result() for f in futures]
            self.waited += time.perf_counter() - t0
            futures = None
            yield u, data
            data = None

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()


def _shared_parts(members) -> set[int]:
    """ids of the stored parts more than one member reads (gate and up of one Llama 4 expert:
    shardquant/encoding.py ExpertView)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for m in members:
        for p in getattr(m, "parts", None) or ():
            (shared if id(p) in seen else seen).add(id(p))
    return shared


def _decode_when_read(m, reads) -> np.ndarray:
    return m.decode([f.result() for f in reads])


class _MemberReads:
    """Members read one after another (a group read twice, held on the GPU, or read again): a slice
    several members view is read for the first and kept until the last of them has it."""

    def __init__(self, counter: _Counter, members, defer: tuple[str, ...]):
        self.counter, self.defer = counter, defer
        self.left: dict[int, int] = {}
        for m in members:
            for p in getattr(m, "parts", None) or ():
                self.left[id(p)] = self.left.get(id(p), 0) + 1
        self.kept: dict[int, np.ndarray] = {}

    def read(self, m, first: bool = True):
        parts = getattr(m, "parts", None) or ()
        if not any(self.left.get(id(p), 0) > 1 or id(p) in self.kept for p in parts):
            return self.counter.read(m, first, self.defer)
        raws = []
        for p in parts:
            raw = self.kept.pop(id(p), None)
            if raw is None:
                raw = self.counter.read(p, first)
            self.left[id(p)] -= 1
            if self.left[id(p)] > 0:
                self.kept[id(p)] = raw
            raws.append(raw)
        return m.decode(raws)


def _block_fp8_amax(m, gate=None) -> np.float32:
    """A block-FP8 member's amax as its decoded BF16 holds it, from its tile scales and the tiles they
    point to (decode.block_fp8_amax, exact over the fp32 products; rounding to BF16 is monotone, so the
    largest BF16 value is the largest product rounded). The codes are mapped, not read whole; this read
    is neither counted nor hashed: the quantize pass reads every byte once."""
    codes, scales = m.parts
    if gate is not None:
        gate.wait(codes.file)
    enc = m.encoding
    mapped = np.memmap(codes.file, dtype=np.uint8, mode="r", offset=codes.offset, shape=tuple(codes.shape))
    try:
        top = decode.block_fp8_amax(mapped, read_raw(scales), enc.block, enc.scale_dtype)
    except NumericError as e:
        raise NumericError(f"tensor {m.name}: {e}") from None
    finally:
        del mapped
    if not np.isfinite(top):
        raise NumericError(f"tensor {m.name}: a decoded value overflows fp32 (code x tile scale)")
    return np.float32((f32_to_bf16(np.array([top], np.float32)).astype(np.uint32) << 16).view(np.float32)[0])


def _two(u: Unit) -> bool:
    """Groups the reader hands over without data: read twice, member by member onto the GPU, or cast
    member by member (plan.Group.streamed)."""
    return u.group is not None and (u.group.two_pass or u.group.on_device or u.group.streamed)


class _Shards:
    """Opens each planned shard (a fresh temporary file, shardquant/writer.py) when its first tensor
    arrives, header first; when it is full, fsyncs it, records its name in the journal, renames it
    into place and records its size and SHA-256. Tensors of shards a previous run finished are
    dropped (their bytes are already on disk)."""

    def __init__(self, plan: Plan, od: OutputDir, journal: Journal, done: set[str], scales: dict, lock,
                 hasher=None, partial: dict | None = None):
        self.od = od
        self.where = {t.name: i for i, (_, ts) in enumerate(plan.shards) for t in ts}
        self.slot = {t.name: j for _, ts in plan.shards for j, t in enumerate(ts)}
        self.skip = {i for i, (fname, _) in enumerate(plan.shards) if fname in done}
        # shard index -> (temporary file, tensors already in it, size, hash state): resumed mid-shard
        self.partial = {i: partial[fname] for i, (fname, _) in enumerate(plan.shards) if fname in (partial or {})}
        self.last_checkpoint = time.monotonic()
        self.plan, self.journal, self.scales, self.lock, self.hasher = plan, journal, scales, lock, hasher
        self.cur: NewFile | None = None
        self.expect: list = []
        self.pos = 0
        self.idx = -1
        self.synced = 0.0  # seconds the writer spent waiting for fsync (trace)

    def write(self, name: str, data: np.ndarray) -> None:
        i = self.where[name]
        if i in self.skip:
            return
        resumed = self.partial.get(i)
        if resumed is not None and self.slot[name] < resumed[1]:
            return  # already in the shard's checkpointed prefix (a group straddling it is recomputed)
        if i != self.idx:
            self._finish()
            self.idx = i
            fname, tensors = self.plan.shards[i]
            self.expect = tensors
            if resumed is not None:
                tmp, self.pos, size, sha = resumed
                self.cur = self.od.reopen(fname, tmp, size, sha)
            else:
                self.cur, self.pos = self.od.create(fname), 0
                self.cur.write(shard_header(self.plan, fname))
        t = self.expect[self.pos]
        if t.name != name or data.nbytes != t.nbytes:
            raise AssertionError(f"writer out of plan order: got {name!r}, expected {t.name!r}")
        self.cur.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8).data)
        self.pos += 1
        if self.pos == len(self.expect):
            self._finish()
        elif time.monotonic() - self.last_checkpoint >= CHECKPOINT_SECONDS:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Make the shard written so far durable and record it: an interrupted run resumes from here."""
        t0 = time.perf_counter()
        info = self.cur.checkpoint()
        self.synced += time.perf_counter() - t0
        with self.lock:
            scales = dict(self.scales)
        self.journal.checkpoint(self.cur.name, self.cur.tmp, self.pos, info, scales)
        self.last_checkpoint = time.monotonic()

    def _finish(self) -> None:
        if self.cur is None:
            return
        f, self.cur = self.cur, None
        try:
            self.journal.intend([f.name])
            t0 = time.perf_counter()
            info = f.commit()
            self.synced += time.perf_counter() - t0
        except BaseException:
            f.abort()
            raise
        with self.lock:
            scales = dict(self.scales)
        if self.hasher is not None:
            self.journal.sources.update({k: v for k, v in list(self.hasher.results.items())})
        self.journal.record(f.name, info, scales)

    def abort(self) -> None:
        """Stop: the current shard's temporary file is kept when a checkpoint of it is in the journal."""
        if self.cur is not None:
            self.cur.abort(keep=self.cur.name in self.journal.partial)
            self.cur = None


class _Writer:
    """Writes (and fsyncs) on its own thread so the disk writes while the next group is read and
    quantized; holds at most WRITE_AHEAD bytes of finished outputs."""

    WRITE_AHEAD = WRITE_AHEAD_BYTES

    def __init__(self, shards: _Shards):
        self.shards = shards
        self.q: queue.Queue = queue.Queue()
        self.cv = threading.Condition()
        self.pending = 0
        self.idle = 0.0  # seconds with nothing to write (shardquant/trace.py "pipeline")
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._work, name="shardquant-writer", daemon=True)
        self.t.start()

    def put(self, outs: list[tuple[str, np.ndarray]]) -> None:
        """One member's (or kept tensor's) outputs, in plan order."""
        n = sum(a.nbytes for _, a in outs)
        with self.cv:
            self.cv.wait_for(lambda: self.error is not None or self.pending < self.WRITE_AHEAD)
            if self.error is not None:
                raise self.error
            self.pending += n
        self.q.put((outs, n))

    def _work(self) -> None:
        while True:
            t0 = time.perf_counter()
            item = self.q.get()
            self.idle += time.perf_counter() - t0
            if item is None:
                return
            outs, n = item
            try:
                for name, data in outs:
                    if self.error is None:
                        self.shards.write(name, data)
            except BaseException as e:
                self.error = e
            with self.cv:
                self.pending -= n
                self.cv.notify_all()

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop after what is queued is dropped; the caller is already raising."""
        self.error = self.error or _Aborted()
        self.q.put(None)
        self.t.join()


class _Aborted(Exception):
    pass


_DONE = object()


class _Job:
    """One unit's outputs, in plan order, handed from the device that computes them to the
    writer. Bounded by bytes (JOB_BYTES, or one member's outputs of any size), so a device that runs ahead
    waits instead of piling outputs up: plan.Plan.peak_bytes counts JOB_BYTES per job in flight."""

    def __init__(self, stop: threading.Event, items: list | None = None):
        self.q: queue.Queue = queue.Queue()  # (item, its bytes counted against JOB_BYTES)
        self.cv = threading.Condition()
        self.queued = 0
        self.stop = stop
        self.waited = 0.0  # seconds the device waited for the writer side to take its outputs (trace)
        for it in items or ():  # a kept tensor: its bytes are the read budget's until written
            self.q.put((it, 0))

    def put(self, item) -> None:
        """`item`: ([(name, array), ...] of one member or kept tensor, read bytes it gives back, bytes it
        counts done), or _DONE, or an error."""
        if self.stop.is_set():  # the run is failing or interrupted: a device stops at its next output
            raise _Aborted()
        n = sum(a.nbytes for _, a in item[0]) if isinstance(item, tuple) else 0
        with self.cv:
            if self.queued and self.queued + n > JOB_BYTES:
                t0 = time.perf_counter()
                try:
                    while self.queued and self.queued + n > JOB_BYTES:
                        if self.stop.is_set():
                            raise _Aborted()
                        self.cv.wait(0.1)
                finally:
                    self.waited += time.perf_counter() - t0
            self.queued += n
        self.q.put((item, n))

    def get(self):
        item, n = self.q.get()
        if n:
            with self.cv:
                self.queued -= n
                self.cv.notify_all()
        return item


def _device_bytes(g) -> int | float:
    """GPU memory a lane holds while it quantizes group `g` (shardquant/backend.py DeviceMemory): a
    group that reads its own members (two_pass, on_device, streamed) takes the whole GPU, so that
    such groups never run two at once and the plan's memory bound (plan.Plan.peak_bytes, one such
    group) holds; a cast none (NumPy on the host); any other its members' bytes."""
    if g.two_pass or g.on_device or g.streamed:
        return float("inf")
    return 0 if g.cast is not None else g.source_bytes


class _Devices:
    """One worker thread per lane (a GPU's lanes, plan.device_lanes; the one CPU
    backend). Each quantizes whole groups; outputs are written strictly in plan order."""

    def __init__(self, lanes: list, work, stop: threading.Event):
        self.free: queue.Queue = queue.Queue()
        self.tasks: queue.Queue = queue.Queue()
        self.stop = stop
        self.busy = 0.0  # seconds the lanes spent on groups, outputs handed over included, summed (trace)
        self.put_wait = 0.0  # of which waiting for the writer side to take the outputs
        self.hold_wait = 0.0  # of which waiting for the device memory the group needs (backend.DeviceMemory)
        self._lock = threading.Lock()
        self.threads = []
        for lane in lanes:
            self.free.put(lane)
            t = threading.Thread(target=self._loop, args=(work,), name="shardquant-device", daemon=True)
            t.start()
            self.threads.append(t)

    def submit(self, g, data, job: _Job) -> None:
        """Group `g` to the next free lane. Its device memory ticket is taken here, in plan order."""
        lane = self.free.get()
        self.tasks.put((lane, lane.ticket(), (g, data), job))

    def _loop(self, work) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                return
            lane, ticket, args, job = task
            g = args[0]
            t0 = time.perf_counter()
            try:
                with lane.hold(ticket, _device_bytes(g), self.stop):
                    held = time.perf_counter()
                    work(lane, *args, job)
                job.put(_DONE)
                with self._lock:
                    self.busy += time.perf_counter() - t0
                    self.put_wait += job.waited
                    self.hold_wait += held - t0
            except BaseException as e:  # handed to the writer side, which raises it
                try:
                    job.put(e)
                except _Aborted:
                    pass
            finally:
                self.free.put(lane)

    def close(self) -> None:
        for _ in self.threads:
            self.tasks.put(None)


def run(plan: Plan, od: OutputDir, backends: list, progress: bool, journal: Journal,
        done: set[str], partial: dict | None = None, gate=None) -> tuple[int, dict, dict, int, int]:
    """Stream every unit through the backends into the shards. `partial`: shards resumed mid-way
    (shardquant/output.py Claim.partial). `gate`: a hub source's downloads under way
    (shardquant/hub.py Downloads): every read of a source file waits until that file is complete.
    Returns (bytes read, scales by quantizer, each source file's {"sha256", "size",
    "checked_against_hub"}, bytes the hasher read on its own: headers, padding, tensors of kept
    shards; bytes of the first count read a second time: groups read twice)."""
    scales: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()
    partial = partial or {}
    units = _units_to_run(plan, journal, done, scales, {s: p[1] for s, p in partial.items()})
    todo = {id(u) for u in units}
    unread = {(p.file.name, p.offset) for u in plan.units if id(u) not in todo
              for t in ([u.kept] if u.kept is not None else u.group.members) for p in (getattr(t, "parts", ()) or (t,))}
    hasher = SourceHasher(plan.checkpoint, journal.sources, unread, gate)
    shards = _Shards(plan, od, journal, done, scales, lock, hasher, partial)
    writer = _Writer(shards)
    counter = _Counter(hasher, gate)
    bar = _bar(sum(u.source_bytes for u in units), progress)
    reader = _Reader(units, counter, backends[0].decodes, getattr(backends[0], "host_empty", np.empty))
    stop = threading.Event()
    lanes = [lane for b in backends for lane in b.lanes()]
    # one pool for the run: a per-expert cast is thousands of one- or two-member groups
    cast_pool = ThreadPoolExecutor(CAST_THREADS * len(lanes), thread_name_prefix="shardquant-cast")

    def cast_group(g, data, job: _Job) -> None:
        """Members stored MXFP4 cast into the group's format code for code (decode.mxfp4_to_nvfp4): the
        global scale from every member's E8M0 scales, then each member's codes cast. `data`: every
        member's stored parts as the reader read them (shardquant/encoding.py Encoded), or None for a
        streamed group (plan.Group.streamed): its scales read first (1/16 of the codes), then each
        member's codes read here. The same NumPy arithmetic whatever the backend: byte copies, and only
        the blocks out of E4M3's range re-quantized (counted in the manifest)."""
        e8m0 = [counter.read(m.parts[1]) for m in g.members] if data is None else [d.raws[1] for d in data]
        gmax = decode.e8m0_group_max(e8m0, g.key)
        amax = decode.mx_cast_amax(gmax)
        with lock:
            scales[g.key] = (float(amax), float(decode.mx_cast_global_scale(amax)), 0)
        requantized = 0

        def cast(i: int):  # NumPy byte work that releases the GIL: CAST_THREADS members of a group at once
            codes = counter.read(g.members[i].parts[0]) if data is None else data[i].raws[0]
            return decode.mxfp4_to_nvfp4(codes, e8m0[i], gmax, g.members[i].name)

        pending = deque(cast_pool.submit(cast, i) for i in range(min(CAST_THREADS, len(g.members))))
        try:
            for i, m in enumerate(g.members):
                weight, scale, s2, n = pending.popleft().result()
                if i + CAST_THREADS < len(g.members):
                    pending.append(cast_pool.submit(cast, i + CAST_THREADS))
                e8m0[i] = None
                if data is not None:
                    data[i] = None
                requantized += n
                put_member(g.format, m, weight, scale, s2, 0 if data is None else m.nbytes, job)
        finally:  # a failed member: the ones still queued are not cast
            for f in pending:
                f.cancel()
        with lock:
            scales[g.key] = (float(amax), float(s2), requantized)

    def put_member(fmt: str, m, weight, scale, gs, owed: int, job: _Job) -> None:
        """A member's outputs to the writer, as one item: weight, block scales, and the group's one scale
        where the format writes it (FP8's weight_scale, NVFP4's global scale); once written they give back
        `owed` bytes of the read budget and count the member done."""
        names = plan.outputs[m.name]
        outs = [(names["weight"], weight)] + ([(names["scale"], scale)] if scale is not None else [])
        if formats.declared(fmt).quantizer_scale:
            outs.append((names.get("global_scale", names["scale"]), flavors.FLAVORS[plan.flavor].scalar(fmt, gs, m.shape)))
        job.put((outs, owed, m.nbytes))  # one item: the queues' cost is paid per member, not per tensor

    phases: dict[str, float] = defaultdict(float)  # lane seconds per step of a group, summed (trace)

    def spent(name: str, t0: float) -> float:
        t = time.perf_counter()
        with lock:
            phases[name] += t - t0
        return t

    def quantize_group(backend, g, data, job: _Job) -> None:
        t0 = time.perf_counter()
        if g.cast is not None:
            cast_group(g, data, job)
            spent("cast", t0)
            return
        fmt = formats.get(g.format)  # mixed precision: each quantizer its own format
        two_pass = data is None  # the reader did not read it: members are read here, one at a time
        held_on_device: set[int] = set()  # members whose read budget went back after the amax
        if two_pass and g.on_device and backend.device_budget is not None:
            # held on the GPU (plan.Group.on_device): each member read once, uploaded, reduced, kept
            handles = []
            amax = np.float32(0)
            reads = _MemberReads(counter, g.members, backend.decodes)
            for m in g.members:
                h = backend.load(reads.read(m))
                amax = max(amax, backend.amax(h, m.dtype, m.name))  # synchronizes: the host copy may go
                handles.append(h)
            data = [None] * len(g.members)
        elif two_pass and g.amax_from_scales:  # the amax from the tile scales: the source read once, below
            amax = max(_block_fp8_amax(m, counter.gate) for m in g.members)
            data = [None] * len(g.members)
            handles = [None] * len(g.members)
        elif two_pass:  # read each member for the amax, then again to quantize
            reads = _MemberReads(counter, g.members, backend.decodes)
            amax = max(backend.amax(backend.load(reads.read(m)), m.dtype, m.name) for m in g.members)
            data = [None] * len(g.members)
            handles = [None] * len(g.members)
        else:
            # One amax launch per member and one synchronization per group. Members stay on the
            # device between amax and quantize while they fit its budget; the rest are uploaded
            # again from the host copy (never read twice from disk).
            handles, kept_bytes = [], 0

            def loaded():
                nonlocal kept_bytes
                for m, raw in zip(g.members, data):
                    h = backend.load(raw)
                    fits = backend.device_budget is None or kept_bytes + m.nbytes <= backend.device_budget
                    kept_bytes += m.nbytes if fits else 0
                    handles.append(h if fits else None)
                    yield h, m.dtype, m.name

            amax = max(backend.amaxes(loaded()), default=np.float32(0))  # synchronizes: every copy is done
            # Members held on the device need no host copy any more: their read budget goes back now,
            # so the reader reads the next group while this one is quantized and written.
            early = 0
            for i, m in enumerate(g.members):
                if handles[i] is not None and handles[i] is not data[i]:
                    data[i] = None
                    early += m.nbytes
                    held_on_device.add(i)
            if early:
                reader.release(early)
        t1 = spent("load_amax", t0)  # members uploaded (decoded), the group's amax
        gs = fmt.global_scale(np.float32(amax))
        with lock:
            scales[g.key] = (float(amax), float(gs))
        q = backend.quantizer(g.format, gs, plan.scale_search)
        t1 = spent("quantizer", t1)  # the quantizer of that global scale (NVFP4: its code-threshold table)
        again = _MemberReads(counter, [m for i, m in enumerate(g.members) if data[i] is None and handles[i] is None],
                             backend.decodes)
        first_read_here = two_pass and g.amax_from_scales and not g.on_device  # the amax pass read no member
        for i, m in enumerate(g.members):
            h = handles[i]
            raw = data[i] if data[i] is not None or h is not None else again.read(m, first_read_here)
            if h is None:
                h = backend.load(raw)
            weight, scale = q.quantize(h, m.dtype, m.name)  # synchronizes: raw's copy is done
            handles[i] = data[i] = None  # release each member once quantized
            del h, raw
            t1 = spent("quantize", t1)  # (a second read, an upload again,) the codes and scales to the host
            put_member(g.format, m, weight, scale, gs, 0 if two_pass or i in held_on_device else m.nbytes, job)
            t1 = spent("put", t1)  # handed to the writer side (waiting where its job is full)

    devices = _Devices(lanes, quantize_group, stop)
    pending: deque[_Job] = deque()

    def drain_one() -> None:
        job = pending.popleft()
        while (item := job.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            outs, release, done = item
            writer.put(outs)
            if release:
                reader.release(release)
            bar.update(done)

    try:
        for u, data in reader:
            if u.kept is not None:
                pending.append(_Job(stop, [([(u.kept.name, data[0])], u.kept.nbytes, u.kept.nbytes), _DONE]))
            else:
                while devices.free.empty() and pending:
                    drain_one()
                job = _Job(stop)
                pending.append(job)
                devices.submit(u.group, data, job)
            data = None
            while len(pending) > 2 * len(lanes):
                drain_one()
        while pending:
            drain_one()
        writer.close()
        t_hash = time.perf_counter()
        sources = hasher.finish()
        trace.mark("pipeline", reader_wait_s=round(reader.waited, 3), writer_idle_s=round(writer.idle, 3),
                   writer_sync_s=round(shards.synced, 3),
                   **{f"writer_{k}": round(v, 3) for k, v in od.times.items()},
                   device_busy_s=round(devices.busy, 3),
                   device_put_wait_s=round(devices.put_wait, 3), device_hold_wait_s=round(devices.hold_wait, 3),
                   **{f"lane_{k}_s": round(phases.get(k, 0.0), 3)
                      for k in ("load_amax", "quantizer", "quantize", "put", "cast")}, hash_busy_s=round(hasher.busy, 3),
                   hash_finish_s=round(time.perf_counter() - t_hash, 3), hash_extra_bytes=hasher.extra_bytes,
                   units=len(units))
    except BaseException:
        stop.set()
        hasher.abort()
        reader.close()
        writer.abort()
        shards.abort()
        raise
    finally:
        devices.close()
        cast_pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return counter.n, scales, sources, hasher.extra_bytes, counter.again


def _units_to_run(plan: Plan, journal: Journal, done: set[str], scales: dict,
                  prefix: dict[str, int] | None = None) -> list[Unit]:
    """Units whose outputs all lie in finished shards, or in the checkpointed prefix of a resumed
    shard (its first `prefix[shard]` tensors), are skipped (their scales come from the journal); a
    group straddling written and unwritten outputs is computed again."""
    prefix = prefix or {}
    if not done and not prefix:
        return list(plan.units)
    shard_of = {t.name: fname for fname, ts in plan.shards for t in ts}
    slot = {t.name: j for _, ts in plan.shards for j, t in enumerate(ts)}
    run = []
    for u in plan.units:
        names = [u.kept.name] if u.kept else [n for m in u.group.members for n in plan.outputs[m.name].values()]
        finished = all(shard_of[n] in done or slot[n] < prefix.get(shard_of[n], 0) for n in names)
        if finished and u.group is not None and u.group.key in journal.scales:
            scales[u.group.key] = tuple(journal.scales[u.group.key])
        elif not finished or u.group is not None:
            run.append(u)
    return run




class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="quantize", dynamic_ncols=True)
