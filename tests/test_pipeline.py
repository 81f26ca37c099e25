"""The pipeline's ordering and failure handling with several workers, on the CPU: groups finish
out of order on different 'devices', yet shards come out byte-identical and errors end cleanly."""

import filecmp
import random
import time

import pytest

from shardquant import formats

import shardquant.convert as conv
from shardquant.backend import NumpyBackend
from shardquant.errors import NumericError
from shardquant.testing import qwen3_moe, random_data, write_checkpoint


class SlowBackend(NumpyBackend):
    """A CPU backend that takes a random while per tensor, so that workers overtake each other."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def amax(self, x, dtype, name):
        time.sleep(self.rng.random() * 0.004)
        return super().amax(x, dtype, name)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src"), qwen3_moe(hidden=64, layers=3, experts=6, inter=32),
                            shard_bytes=60_000)


@pytest.fixture(scope="module")
def tiled_src(tmp_path_factory):
    """The same layout in whole 128x128 tiles, for formats with 2-D block scales (Format.block)."""
    model = qwen3_moe(hidden=128, layers=3, experts=6, inter=128, heads=2, kv_heads=1, head_dim=128)
    return write_checkpoint(tmp_path_factory.mktemp("tiled"), model, shard_bytes=200_000)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_several_workers_write_the_same_bytes(src, tiled_src, tmp_path, monkeypatch, fmt):
    src = tiled_src if formats.declared(fmt).block else src
    one = conv.convert(str(src), tmp_path / "one", fmt, device="cpu")
    monkeypatch.setattr(conv, "get_backends", lambda *a: [SlowBackend(1), SlowBackend(2), SlowBackend(3)])
    many = conv.convert(str(src), tmp_path / "many", fmt, device="cpu")
    assert many.bytes_read == one.bytes_read == one.plan.source_bytes
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "many").iterdir())
    for n in names:
        assert filecmp.cmp(tmp_path / "one" / n, tmp_path / "many" / n, shallow=False), n


def test_error_on_one_worker_ends_cleanly(tmp_path, monkeypatch):
    model = qwen3_moe(hidden=64, layers=3, experts=6, inter=32)
    bad = "model.layers.2.mlp.experts.4.up_proj.weight"

    def data(spec, rng):
        raw = random_data(spec, rng)
        if spec[0] == bad:
            raw[3, 5] = 0x7FC0  # bf16 NaN
        return raw

    src = write_checkpoint(tmp_path / "src", model, shard_bytes=60_000, data=data)
    monkeypatch.setattr(conv, "get_backends", lambda *a: [SlowBackend(4), SlowBackend(5)])
    t0 = time.perf_counter()
    with pytest.raises(NumericError, match=bad.replace(".", r"\.")):
        conv.convert(str(src), tmp_path / "out", "nvfp4", device="cpu")
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert not written & {"config.json", "scale_manifest.json", "hf_quant_config.json"}
    assert ".shardquant-journal.json" in written  # what a re-run resumes from


def test_devices_flag_is_refused_without_a_gpu(src, tmp_path):
    from click.testing import CliRunner

    from shardquant.cli import main
    from shardquant.cuda import available

    if available():
        pytest.skip("this check is for machines without a GPU")
    r = CliRunner().invoke(main, ["convert", str(src), "--format", "nvfp4", "-o", str(tmp_path / "o"), "--devices", "all"])
    assert r.exit_code != 0 and r.output.strip() == "error: --devices: no CUDA device visible to cupy"


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_gpu_quantizer_dispatches_to_the_declared_kernel(fmt):
    """The CuPy backend runs the kernel the format declares (formats/base.py Format.kernel), with no
    branch on the format's name; a format without one is a clean error (convert falls back to the
    CPU under --device auto). A stand-in device records the call, so this runs without a GPU."""
    from shardquant.backend import _CupyQuantizer
    from shardquant.errors import ShardquantError

    calls = []
    kernels = {formats.declared(f).kernel for f in formats.FORMATS} - {""}

    class Dev:
        def __getattr__(self, kernel):  # a method per declared kernel, as shardquant/cuda Device has
            if kernel not in kernels:
                raise AttributeError(kernel)

            def run(x, dtype, gs, name):
                calls.append((kernel, dtype, float(gs), name))
                return ("weight", "scales") if formats.declared(fmt).block_scales else "weight"
            return run

        def to_host(self, *xs):
            return [f"host:{x}" for x in xs]

    q = _CupyQuantizer(Dev(), fmt, 0.5)
    kernel = formats.declared(fmt).kernel
    if not kernel:
        with pytest.raises(ShardquantError, match="no GPU kernel"):
            q.quantize("x", "BF16", "w")
        return
    weight, scale = q.quantize("x", "BF16", "w")
    assert calls == [(kernel, "BF16", 0.5, "w")]
    assert weight.startswith("host:") and (scale is None) == (not formats.declared(fmt).block_scales)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_declared_kernel_is_a_device_method(fmt):
    """A declared kernel is a method of shardquant/cuda Device (importable without cupy): a name
    without one would make --device cuda fail instead of falling back to the CPU."""
    from shardquant.cuda import Device

    kernel = formats.declared(fmt).kernel
    assert not kernel or callable(getattr(Device, kernel, None)), kernel


class DeviceLikeBackend(NumpyBackend):
    """A CPU stand-in for a GPU backend: `load` copies (as an upload does), a device budget is set, and
    every load is counted, so a test sees which path a group took."""

    def __init__(self, budget: int):
        self.device_budget = budget
        self.loads = 0

    def load(self, raw):
        self.loads += 1
        return raw.copy()


def test_group_larger_than_host_budget_is_read_once_onto_the_device(src, tmp_path, monkeypatch):
    """plan.Group.on_device: a quantizer over --memory-budget that fits the device budget is read once,
    member by member, and quantized from the device copies: same bytes as the CPU, source read once."""
    budget = 30_000  # below one layer's experts (shared policy, 49 KB), above any one member (4 KB)
    cpu = conv.convert(str(src), tmp_path / "cpu", "nvfp4", device="cpu", memory_budget=budget)
    assert any(g.two_pass for g in cpu.plan.groups) and cpu.plan.read_factor > 1.2
    assert cpu.bytes_read == round(cpu.plan.read_factor * cpu.plan.source_bytes)
    dev = DeviceLikeBackend(1 << 30)
    monkeypatch.setattr(conv, "get_backends", lambda *a: [dev])
    gpu = conv.convert(str(src), tmp_path / "gpu", "nvfp4", device="cpu", memory_budget=budget)
    on = [g for g in gpu.plan.groups if g.on_device]
    assert on and not any(g.two_pass for g in gpu.plan.groups) and gpu.plan.read_factor == 1.0
    assert gpu.bytes_read == gpu.plan.source_bytes
    assert dev.loads == sum(len(g.members) for g in gpu.plan.groups)  # every member uploaded once
    for p in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert filecmp.cmp(p, tmp_path / "gpu" / p.name, shallow=False), p.name
    # a device budget below the group: read twice after all
    small = DeviceLikeBackend(budget // 2)
    monkeypatch.setattr(conv, "get_backends", lambda *a: [small])
    r = conv.convert(str(src), tmp_path / "small", "nvfp4", device="cpu", memory_budget=budget)
    assert not any(g.on_device for g in r.plan.groups) and r.plan.read_factor == cpu.plan.read_factor


def test_every_output_byte_is_handed_to_the_disk_as_it_is_written(src, tmp_path, monkeypatch):
    """A shard's writes ask the disk to start writing their range (shardquant/writer.py
    START_WRITEBACK: sync_file_range on Linux, every WRITEBACK_BYTES, the rest before the fsync), so
    the checkpoint's fsync does not stall the writer and the reads behind it: the ranges asked for,
    per file, tile it from byte 0 to its end."""
    import os
    import sys

    from shardquant import writer

    if not sys.platform.startswith("linux"):
        pytest.skip("sync_file_range and /proc/self/fd are Linux's")
    assert writer.START_WRITEBACK is not None  # the real call exists and accepts a file's range
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 8192)
        assert writer.START_WRITEBACK(f.fileno(), 0, 8192) == 0
    asked: dict[str, list[tuple[int, int]]] = {}

    def record(fd, offset, n):  # the file by its (temporary) name: shardquant/writer.py tmp_name
        asked.setdefault(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), []).append((offset, n))
        return 0

    monkeypatch.setattr(writer, "START_WRITEBACK", record)
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 3000)  # several ranges per shard
    out = tmp_path / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=20_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and any(len(v) > 1 for v in asked.values())
    for p in shards:
        mine = [k for k in asked if k.startswith(f".{p.name}.")]
        assert len(mine) == 1, (p.name, sorted(asked))
        ranges = sorted(asked[mine[0]])
        assert all(n >= 3000 for _, n in ranges[:-1])
        assert ranges[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
        assert ranges[-1][0] + ranges[-1][1] == p.stat().st_size


@pytest.mark.parametrize("behind_min", [1, 5000, 1 << 40])
def test_output_hash_behind_the_writes_is_the_files_hash(tmp_path, monkeypatch, behind_min):
    """shardquant/writer.py _Hasher: a file's SHA-256, hashed on its own thread behind the writes (at
    most HASH_BEHIND_BYTES behind) from its first byte, from its 5000th (small writes before, inline)
    or never, is the hash of the bytes on disk, at each checkpoint (the prefix written so far) and at
    commit; nothing is left running."""
    import hashlib
    import threading

    import numpy as np

    from shardquant import writer

    monkeypatch.setattr(writer, "HASH_BEHIND_MIN", behind_min)
    monkeypatch.setattr(writer, "HASH_BEHIND_BYTES", 5000)
    rng = np.random.default_rng(0)
    od = writer.OutputDir.open(tmp_path / "out")
    f = od.create("a.bin")
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in (7, 4096, 3, 20_000, 1, 9000, 0, 12_345)]
    for i, c in enumerate(chunks):
        f.write(c.data)
        if i == 4:
            info = f.checkpoint()
            assert info == {"size": sum(x.size for x in chunks[:5]),
                            "sha256": hashlib.sha256(b"".join(x.tobytes() for x in chunks[:5])).hexdigest()}
    got = f.commit()
    data = (tmp_path / "out" / "a.bin").read_bytes()
    assert data == b"".join(c.tobytes() for c in chunks)
    assert got == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not any(t.name == "shardquant-hash-output" for t in threading.enumerate())
    od.close()


def _holder(mem, ticket, nbytes, log, stop, release):
    import threading

    def run():
        with mem.hold(ticket, nbytes, stop):
            log.append(("in", ticket, mem.free))
            release[ticket].wait(5)
        log.append(("out", ticket))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_device_memory_grants_in_ticket_order_within_the_budget():
    """shardquant/backend.py DeviceMemory, shared by a GPU's lanes: grants go in ticket order (plan
    order), never past the budget, and a group that takes the whole GPU runs alone."""
    import threading

    from shardquant.backend import DeviceMemory

    mem, stop, log = DeviceMemory(100), threading.Event(), []
    tickets = [mem.ticket() for _ in range(5)]
    assert tickets == [0, 1, 2, 3, 4]
    release = {t: threading.Event() for t in tickets}
    entered = lambda t: any(e[:2] == ("in", t) for e in log)  # noqa: E731
    # ticket 1 asks first but waits for ticket 0; 0 and 1 (60 + 30) fit together; 2 (20) does not
    threads = [_holder(mem, 1, 30, log, stop, release)]
    time.sleep(0.2)
    assert log == []
    threads += [_holder(mem, 0, 60, log, stop, release), _holder(mem, 2, 20, log, stop, release)]
    assert _until(lambda: entered(0) and entered(1))
    time.sleep(0.2)
    assert not entered(2) and mem.free == 10
    threads.append(_holder(mem, 3, float("inf"), log, stop, release))  # the whole GPU: waits for everyone
    release[0].set()
    assert _until(lambda: entered(2))
    assert ("in", 2, 50) in log
    time.sleep(0.2)
    assert not entered(3)
    release[1].set()
    release[2].set()
    assert _until(lambda: entered(3)) and ("in", 3, 0) in log  # alone, with the whole budget
    threads.append(_holder(mem, 4, 1, log, stop, release))
    time.sleep(0.2)
    assert not entered(4)  # nothing beside a whole-GPU group
    release[3].set()
    release[4].set()
    for t in threads:
        t.join(10)
    assert [e[1] for e in log if e[0] == "in"] == [0, 1, 2, 3, 4] and mem.free == 100 and mem.users == 0


def test_device_memory_waits_end_when_the_run_stops():
    import threading

    from shardquant.backend import DeviceMemory

    mem, stop = DeviceMemory(10), threading.Event()
    mem.ticket()
    late = mem.ticket()
    stop.set()
    with pytest.raises(InterruptedError):
        with mem.hold(late, 1, stop):
            pass


class LaneBackend(NumpyBackend):
    """A CPU stand-in for a GPU with several lanes sharing one DeviceMemory (shardquant/backend.py
    CupyBackend.lanes): every lane records the bytes the ledger has handed out while it works."""

    def __init__(self, budget: int, lanes: int, seen: list, seed: int = 0):
        from shardquant.backend import DeviceMemory

        self.device_budget, self.n, self.seen = budget, lanes, seen
        self.memory = DeviceMemory(budget)
        self.rng = random.Random(seed)

    def lanes(self):
        twins = [LaneBackend.__new__(LaneBackend) for _ in range(self.n - 1)]
        for i, t in enumerate(twins):
            t.device_budget, t.n, t.seen, t.memory, t.rng = self.device_budget, 1, self.seen, self.memory, random.Random(i + 1)
        return [self] + twins

    def ticket(self):
        return self.memory.ticket()

    def hold(self, ticket, nbytes, stop):
        return self.memory.hold(ticket, nbytes, stop)

    def amaxes(self, items):  # a group read ahead whole
        self.whole_group = True
        out = super().amaxes(items)
        self.whole_group = False
        time.sleep(self.rng.random() * 0.003)
        self.seen.append(("group", self.memory.budget - self.memory.free, self.memory.users))
        return out

    def amax(self, x, dtype, name):  # alone: a member of a group held on the device (plan.Group.on_device)
        if not getattr(self, "whole_group", False):
            self.seen.append(("member", self.memory.budget - self.memory.free, self.memory.users))
        return super().amax(x, dtype, name)


@pytest.mark.parametrize("host, device", [(None, 1 << 30), (None, 60_000), (30_000, 1 << 30)])
def test_lanes_of_one_device_write_the_same_bytes_within_its_memory(src, tmp_path, monkeypatch, host, device):
    """Groups quantized up to three at once on one device's lanes come out byte-identical, with the
    ledger's bytes in use never above the device budget (60 KB: one layer's shared expert group, 49 KB,
    at a time); groups over the host budget held on the device (plan.Group.on_device) take it whole
    and run alone."""
    one = conv.convert(str(src), tmp_path / "one", "nvfp4", device="cpu")
    seen: list = []
    monkeypatch.setattr(conv, "get_backends", lambda *a: [LaneBackend(device, 3, seen)])
    many = conv.convert(str(src), tmp_path / "many", "nvfp4", device="cpu", **({"memory_budget": host} if host else {}))
    assert many.bytes_read == many.plan.source_bytes == one.bytes_read
    assert any(g.on_device for g in many.plan.groups) == (host is not None)
    assert seen and all(0 <= used <= device for _, used, _ in seen)
    groups = [users for kind, _, users in seen if kind == "group"]
    members = [users for kind, _, users in seen if kind == "member"]
    assert bool(members) == (host is not None) and all(users == 1 for users in members)
    assert max(groups) >= 2  # groups did run at once
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "many").iterdir())
    for n in names:
        assert filecmp.cmp(tmp_path / "one" / n, tmp_path / "many" / n, shallow=False), n


def test_error_on_one_lane_ends_cleanly_while_another_waits_for_memory(tmp_path, monkeypatch):
    """A NaN in one group while the other lanes wait for the device's memory (a 60 KB budget: one
    shared expert group at a time): the run ends with the NaN's error naming the tensor, promptly,
    no lane left waiting, the output not mistaken for a finished one."""
    import threading

    model = qwen3_moe(hidden=64, layers=3, experts=6, inter=32)
    bad = "model.layers.1.mlp.experts.2.down_proj.weight"

    def data(spec, rng):
        raw = random_data(spec, rng)
        if spec[0] == bad:
            raw[1, 1] = 0x7F80  # bf16 +Inf
        return raw

    src = write_checkpoint(tmp_path / "src", model, shard_bytes=60_000, data=data)
    monkeypatch.setattr(conv, "get_backends", lambda *a: [LaneBackend(60_000, 3, [])])
    t0 = time.perf_counter()
    with pytest.raises(NumericError, match=bad.replace(".", r"\.")):
        conv.convert(str(src), tmp_path / "out", "nvfp4", device="cpu")
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    time.sleep(0.5)  # a lane still waiting gives up within its 0.1 s poll of the stop event
    assert not [t for t in threading.enumerate() if t.name in ("shardquant-device", "shardquant-hash-output")
                and t.is_alive() and _waiting_for_memory(t)]


def _waiting_for_memory(t) -> bool:
    import sys
    import traceback

    frame = sys._current_frames().get(t.ident)
    return frame is not None and any(f.name == "hold" for f in traceback.extract_stack(frame))


def test_a_groups_waiting_outputs_are_bounded_by_bytes(monkeypatch):
    """shardquant/pipeline.py _Job: a lane's outputs wait for the writer side up to JOB_BYTES (or one
    output of any size, so a large tensor still passes alone); the next put waits until enough is
    taken, and ends with the run (the stop event) instead of waiting for ever."""
    import threading

    import numpy as np

    from shardquant import pipeline

    monkeypatch.setattr(pipeline, "JOB_BYTES", 1000)
    stop = threading.Event()
    job = pipeline._Job(stop)
    big = ([("w", np.zeros(5000, np.uint8))], 0, 0)
    job.put(big)  # alone: passes whatever its size
    done = threading.Event()
    t = threading.Thread(target=lambda: (job.put(([("s", np.zeros(10, np.uint8))], 0, 0)), done.set()), daemon=True)
    t.start()
    time.sleep(0.3)
    assert not done.is_set() and job.queued == 5000  # 5000 + 10 > 1000: waits
    assert job.get() is big
    assert _until(done.is_set) and job.queued == 10
    for i in range(99):  # small ones up to the bound pass at once
        job.put(([("s", np.zeros(10, np.uint8))], 0, 0))
    assert job.queued == 1000
    job.put(pipeline._DONE)  # markers and errors carry no bytes: never wait
    stopped = []
    t = threading.Thread(target=lambda: stopped.append(pytest.raises(pipeline._Aborted, job.put, big)), daemon=True)
    t.start()
    time.sleep(0.2)
    stop.set()
    t.join(5)
    assert stopped and job.waited > 0


@pytest.mark.parametrize("source", ["bf16", "deepseek_v3", "kimi_k3"])
def test_members_for_the_device_are_read_into_the_backends_host_memory(tmp_path, monkeypatch, source):
    """A backend's host_empty (shardquant/backend.py: page-locked memory on the GPU) makes the arrays the
    reader reads a quantizer's members into, and the stored parts of a weight the backend decodes
    itself; nothing else (kept tensors, a cast's codes, parts decoded on the host) is read into it.
    The output is the same bytes."""
    import numpy as np

    from shardquant.pipeline import _two
    from shardquant.testing_sources import SOURCES

    if source == "bf16":
        src = write_checkpoint(tmp_path / "src", qwen3_moe(), shard_bytes=16 * 1024)
    else:
        src = SOURCES[source]().write(tmp_path / "src")
    made = []

    class Host(NumpyBackend):
        decodes = ("block-fp8",)  # decoded at load (NumpyBackend.load), as the GPU does on the device

        def host_empty(self, shape, dtype):
            made.append((tuple(shape), np.dtype(dtype)))
            return np.empty(shape, dtype)

    plain = conv.convert(str(src), tmp_path / "plain", "nvfp4", device="cpu")
    monkeypatch.setattr(conv, "get_backends", lambda *a: [Host()])
    conv.convert(str(src), tmp_path / "host", "nvfp4", device="cpu")
    want = []
    for u in plain.plan.units:
        if u.group is None or u.group.cast or _two(u):
            continue
        for m in u.group.members:
            parts = getattr(m, "parts", None)
            if not parts:
                want.append(tuple(m.shape))
            elif m.encoding.kind in Host.decodes:
                want += [tuple(p.shape) for p in parts]
    assert sorted(s for s, _ in made) == sorted(want) and want
    assert (source == "kimi_k3") == any(u.group is not None and u.group.cast for u in plain.plan.units)
    for p in sorted((tmp_path / "plain").iterdir()):
        if p.suffix == ".safetensors":
            assert filecmp.cmp(p, tmp_path / "host" / p.name, shallow=False), p.name


@pytest.mark.parametrize("value,pinned", [("", False), ("0", False), ("1", True), ("yes", None)])
def test_pinned_host_memory_is_asked_by_zero_or_one(monkeypatch, value, pinned):
    from shardquant.backend import pinned_host
    from shardquant.errors import ShardquantError

    monkeypatch.setenv("SHARDQUANT_PINNED_HOST", value)
    if pinned is None:
        with pytest.raises(ShardquantError, match="SHARDQUANT_PINNED_HOST must be 0 or 1"):
            pinned_host()
    else:
        assert pinned_host() is pinned


def test_each_shard_header_is_encoded_once_per_conversion(tmp_path, monkeypatch):
    """The recipe hashes the planned headers, the card judges them and the writer writes them
    (shardquant/journal.py shard_header): one encoding per shard, the bytes the shard starts with."""
    from shardquant import journal, pipeline, st

    src = write_checkpoint(tmp_path / "src", qwen3_moe(), shard_bytes=16 * 1024)
    encoded = []
    real = st.encode_header
    for module in (st, journal, pipeline, conv):  # wherever a header may be encoded from
        if hasattr(module, "encode_header"):
            monkeypatch.setattr(module, "encode_header", lambda ts, md=None: encoded.append(len(ts)) or real(ts, md))
    r = conv.convert(str(src), tmp_path / "out", "nvfp4", device="cpu", max_shard_size=20_000)
    assert len(r.plan.shards) > 1 and len(encoded) == len(r.plan.shards)
    for fname, ts in r.plan.shards:
        raw = real(ts, journal.SHARD_METADATA)
        assert (tmp_path / "out" / fname).read_bytes()[: len(raw)] == raw
