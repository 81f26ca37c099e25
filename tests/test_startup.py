"""Start-up: the compiled-kernel cache on disk (shardquant/cuda), the GPU started while the plan is
made (shardquant/plan.py make_plan with a budget function), and the milestones a benchmark reads
(shardquant/trace.py). The GPU side of the cache is in tests/test_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
from click.testing import CliRunner

import shardquant.convert as conv
from shardquant import cuda, testing, trace
from shardquant.cli import main
from shardquant.rules import RuleSet
from shardquant.plan import make_plan
from shardquant.source import scan
from shardquant.st import STORAGE


def zeros(spec, rng):
    _, dtype, shape = spec
    return np.zeros(shape, STORAGE[dtype])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDQUANT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


def test_cache_round_trip(cache):
    image = bytes(range(256)) * 40
    cuda._cache_store("k1", image, {"amax_bits<float>": "_Z9amax_bitsIfEvPKT_xPj"})
    assert cuda._cache_load("k1") == (image, {"amax_bits<float>": "_Z9amax_bitsIfEvPKT_xPj"})
    assert cuda._cache_load("k2") is None  # another key: another compile
    assert [p.name for p in cache.iterdir()] == ["k1.bin"]  # no temporary left behind


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign"])
def test_a_damaged_entry_is_not_loaded(cache, damage):
    image = b"\x7fELF" + bytes(4000)
    cuda._cache_store("k", image, {"a": "b"})
    p = cache / "k.bin"
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[-100] ^= 1
    elif damage == "truncate":
        data = data[:-1]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"PK\x03\x04" + bytes(100))
    p.write_bytes(bytes(data))
    assert cuda._cache_load("k") is None


def test_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDQUANT_CACHE_DIR", "")
    assert cuda.kernel_cache_dir() is None
    cuda._cache_store("k", b"x", {})
    assert cuda._cache_load("k") is None


def test_default_cache_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARDQUANT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda.kernel_cache_dir() == tmp_path / "xdg" / "shardquant" / "kernels"


def test_an_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SHARDQUANT_CACHE_DIR", str(blocker))
    cuda._cache_store("k", b"image", {})  # cannot create file/kernels: silently compiles next time
    assert cuda._cache_load("k") is None


def _moe(tmp_path):
    return scan(testing.write_checkpoint(tmp_path / "ck", testing.qwen3_moe(), shard_bytes=16 * 1024, data=zeros))


def test_the_gpu_budget_is_asked_only_when_a_group_needs_it(tmp_path):
    ck = _moe(tmp_path)
    asked = []

    def budget():
        asked.append(1)
        return 10**12

    rules = RuleSet(expert_policy="shared", num_layers=2)
    p = make_plan(ck, "nvfp4", rules, device_memory=budget)
    assert asked == [] and p.device_memory is None and not any(g.on_device or g.two_pass for g in p.groups)
    big = max(g.source_bytes for g in p.groups)
    q = make_plan(ck, "nvfp4", rules, memory_budget=big - 1, device_memory=budget)
    assert asked == [1]  # once, however many groups ask
    assert q.device_memory == 10**12 and any(g.on_device for g in q.groups) and not any(g.two_pass for g in q.groups)
    r = make_plan(ck, "nvfp4", rules, memory_budget=big - 1, device_memory=lambda: None)  # the CPU after all
    assert any(g.two_pass for g in r.groups) and r.device_memory is None


def test_a_gpu_start_failure_surfaces_from_convert(tmp_path, monkeypatch):
    """The GPU starts on a thread; its error is the conversion's, one line, nothing written."""
    from shardquant import convert as conv
    from shardquant.errors import ShardquantError

    src = testing.write_checkpoint(tmp_path / "src", testing.qwen3_moe(), shard_bytes=16 * 1024)

    def broken(*a, **k):
        raise ShardquantError("no CUDA device visible to cupy")

    monkeypatch.setattr(conv, "get_backends", broken)
    with pytest.raises(ShardquantError, match="no CUDA device"):
        conv.convert(str(src), tmp_path / "out", "nvfp4", device="cuda")
    assert not (tmp_path / "out").exists()


def test_trace_milestones_in_order(tmp_path):
    src = testing.write_checkpoint(tmp_path / "src", testing.qwen3_moe(), shard_bytes=16 * 1024)
    log = tmp_path / "trace.jsonl"
    env = dict(os.environ, SHARDQUANT_TRACE=str(log))
    r = subprocess.run([sys.executable, "-m", "shardquant", "convert", str(src), "-o", str(tmp_path / "out"),
                        "--format", "nvfp4", "--device", "cpu", "-q"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    marks = trace.read(str(log))
    # only while the device is still starting when the plan is made; then the output is claimed first
    still_starting = marks.pop("warm-start", None) is not None
    marks.pop("warm-start-asked", None)
    # a hint on its own thread, asked by the CLI before its imports (shardquant/startup.py), before the plan
    early = marks.pop("early-warm-start")["t"]
    assert marks["python-ready"]["t"] <= early <= marks["planned"]["t"]
    assert marks.pop("early-warm-start-asked")["t"] >= early  # its system calls returned
    settled = ["locked", "claimed", "planned"] if still_starting else ["planned", "locked", "claimed"]
    order = ["python-ready", "convert", *settled, "reader-start", "first-read", "pipeline",
             "configs-written", "card-written", "finished"]
    assert list(marks) == order
    assert all(marks[a]["t"] <= marks[b]["t"] for a, b in zip(order, order[1:]))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    lines = [e for e in lines if e["event"] not in ("warm-start", "early-warm-start", "warm-start-asked",
                                                    "early-warm-start-asked")]
    assert len({e["pid"] for e in lines}) == 1 and len(lines) == len(order)  # each once
    (waits,) = [e for e in lines if e["event"] == "pipeline"]  # where the pipeline waited, for tools/bench.py
    assert waits["units"] > 0 and waits["reader_wait_s"] >= 0 and waits["writer_idle_s"] >= 0
    # the writer's own time (shardquant/writer.py OutputDir.times): every field tools/bench.py reports
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent.parent / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.PIPELINE_FIELDS) <= set(waits) and waits["writer_write_s"] > 0


def test_no_trace_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARDQUANT_TRACE", raising=False)
    monkeypatch.chdir(tmp_path)
    trace.mark("anything")
    assert list(Path(tmp_path).iterdir()) == []


def test_verify_device_is_checked():
    r = CliRunner().invoke(main, ["verify", "examples/tiny-moe", "--source", "examples/tiny-moe", "--device", "tpu"])
    assert r.exit_code != 0 and "--device must be auto, cpu, cuda or cuda:N" in r.output
    assert "Traceback" not in r.output



def test_warm_start_hints_the_first_reads_in_plan_order(tmp_path, monkeypatch):
    """While the GPU starts, the kernel is asked to read ahead what the pipeline reads first
    (shardquant/pipeline.py warm_start): the plan's first members, adjacent ones as one range,
    as many bytes as asked and no more than one member beyond."""
    from shardquant import pipeline

    ck = _moe(tmp_path)
    plan = make_plan(ck, "nvfp4", RuleSet(expert_policy="shared", num_layers=2))
    hints = _record_hints(monkeypatch)
    want = sum(sorted(t.nbytes for t in ck.tensors.values())[-3:])  # a few tensors' worth
    pipeline.warm_start(plan, want)
    _join_hints()
    members = [m for u in plan.units for m in ([u.kept] if u.kept is not None else u.group.members)]
    first = []
    total = 0
    for m in members:
        if total >= want:
            break
        first.append(m)
        total += m.nbytes
    assert all(any(h[0] == m.file and h[1] <= m.offset and m.offset + m.nbytes <= h[1] + h[2] for h in hints)
               for m in first)
    assert sum(h[2] for h in hints) == total  # the first members only, each once
    assert all(h[3] == os.POSIX_FADV_WILLNEED for h in hints)
    assert all(a[0] != b[0] or a[1] + a[2] != b[1] for a, b in zip(hints, hints[1:]))  # adjacent: one hint
    assert len(hints) < len(first)  # this layout has adjacent members among the first


def test_the_cli_starts_without_numpy_or_a_formats_module():
    """`shardquant --help` and argument parsing import no format module, no engines table code and so
    not NumPy (formats/__init__.py _Registry, cli.py _engine_names): start-up stays short."""
    import subprocess
    import sys

    code = ("import sys; import shardquant.cli as c; "
            "c.main(['--help'], standalone_mode=False); c.main(['verify', '--help'], standalone_mode=False); "
            "bad = [m for m in sys.modules if m == 'numpy' or m.startswith(('shardquant.formats.', 'shardquant.engines'))]; "
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_the_registries_the_cli_reads_light_are_the_full_ones():
    from shardquant import engines, formats
    from shardquant.cli import _engine_names

    assert _engine_names() == engines.engine_names()
    assert [formats.FORMATS[n].FORMAT.name for n in formats.FORMATS] == list(formats.FORMATS)
    assert dict(formats.FORMATS.items()) == {n: formats.get(n) for n in formats.FORMATS}


def test_planning_a_bf16_source_imports_no_encoding_code(tmp_path):
    """A plain source is planned without shardquant/encoding.py (source.py _MAY_BE_ENCODED: a superset of
    what that module recognizes, so nothing it would decode is missed)."""
    import subprocess
    import sys

    from shardquant import encoding
    from shardquant.source import _MAY_BE_ENCODED

    assert set(encoding.QUANTIZED_DTYPES + encoding.PACKED_DTYPES) <= set(_MAY_BE_ENCODED)
    code = ("import sys; from shardquant.plan import prepare; p = prepare(sys.argv[1], 'nvfp4'); "
            "print(len(p.groups), 'shardquant.encoding' in sys.modules, 'shardquant.decode' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "tiny-moe")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    groups, enc, dec = r.stdout.split()
    assert int(groups) > 0 and (enc, dec) == ("False", "False")


def _record_hints(monkeypatch):
    from shardquant import pipeline

    hints, names = [], {}
    real_open = os.open

    def record_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        names[fd] = Path(path)
        return fd

    monkeypatch.setattr(pipeline.os, "open", record_open)
    monkeypatch.setattr(pipeline.os, "posix_fadvise", lambda fd, off, n, advice: hints.append((names[fd], off, n, advice)))
    return hints


def _join_hints():
    import threading

    for t in threading.enumerate():
        if t.name == "shardquant-warm-start":
            t.join(10)


def test_early_warm_start_reads_ahead_the_first_shard_before_the_plan(tmp_path, monkeypatch):
    """Before the headers are parsed (shardquant/startup.py early_warm_start): the first shard by
    name, from its first byte, which is where scan and the plan's first unit begin; nothing for a
    source that is not a local directory. Asked ahead by the CLI, the conversion's own ask that
    follows is skipped, once."""
    from shardquant import startup

    src = testing.write_checkpoint(tmp_path / "src", testing.qwen3_moe(), shard_bytes=16 * 1024)
    hints = _record_hints(monkeypatch)
    startup.early_warm_start("org/not-a-directory")
    startup.early_warm_start(str(src), 4096)
    _join_hints()
    first = sorted(src.glob("*.safetensors"))[0]
    assert hints == [(first, 0, 4096, os.POSIX_FADV_WILLNEED)]
    startup.early_warm_start(str(src), 4096, ahead=True)  # the CLI, before its imports
    startup.early_warm_start(str(src), 4096)  # convert() right after: skipped
    _join_hints()
    assert len(hints) == 2
    startup.early_warm_start(str(src), 4096)  # a later conversion of the same source: hinted again
    _join_hints()
    assert hints == 3 * [(first, 0, 4096, os.POSIX_FADV_WILLNEED)]
    plan = conv.prepare(str(src), "nvfp4")
    assert plan.units[0].group.members[0].file == first if plan.units[0].group else plan.units[0].kept.file == first


@pytest.mark.parametrize("device,devices,want", [
    ("cpu", None, []), ("auto", None, [0]), ("cuda", None, [0]), ("cuda:2", None, [2]), ("cuda", "0,2", [0, 2]),
    ("auto", "all", [0, 1, 2]), ("cuda:7", None, []), ("cuda", "x", []), ("cuda", "1,9", [1]),
])
def test_gpu_start_starts_each_named_gpu_ahead(monkeypatch, device, devices, want):
    """The CLI starts cupy, each named GPU's context and its kernels on a thread before its own imports
    (shardquant/startup.py gpu_start, cuda.prestart): the GPUs --device / --devices name, none for the
    CPU; a bad or out-of-range name starts nothing and raises nothing (the backend reports it)."""
    import threading

    from shardquant import cuda, startup

    started = []
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 3)
    monkeypatch.setattr(cuda, "prestart", started.append)
    startup.gpu_start(device, devices)
    for t in threading.enumerate():
        if t.name == "shardquant-gpu-start":
            t.join(10)
    assert started == want


def test_warm_start_of_a_quantized_source_hints_its_stored_parts(tmp_path, monkeypatch):
    """A weight stored quantized is read as its parts (codes, scales): those are the ranges hinted,
    not its decoded size."""
    from shardquant import pipeline
    from shardquant.testing_sources import SOURCES

    fx = SOURCES["deepseek_v3"]()
    plan = conv.prepare(str(fx.write(tmp_path / "src")), "nvfp4")
    hints = _record_hints(monkeypatch)
    pipeline.warm_start(plan, 1 << 40)  # everything
    _join_hints()
    parts = [p for u in plan.units for t in ([u.kept] if u.kept is not None else u.group.members)
             for p in (getattr(t, "parts", None) or (t,))]
    assert any(getattr(t, "parts", None) for u in plan.units if u.group for t in u.group.members)
    assert sum(h[2] for h in hints) == sum(p.nbytes for p in parts)
    assert all(any(h[0] == p.file and h[1] <= p.offset and p.offset + p.nbytes <= h[1] + h[2] for h in hints)
               for p in parts)


def test_a_long_range_is_hinted_in_steps_of_the_read_window(tmp_path, monkeypatch):
    """Linux reads at most one read window per WILLNEED call and drops the rest of a longer range
    (shardquant/startup.py read_window): a range is asked in window-sized steps that cover it exactly."""
    from shardquant import startup

    f = tmp_path / "model.safetensors"
    f.write_bytes(bytes(10_000))
    hints = _record_hints(monkeypatch)
    monkeypatch.setattr(startup, "read_window", lambda path: 4096)
    startup.hint([(f, 100, 9_000), (f, 9_500, 10)], None, "warm-start")
    _join_hints()
    assert [(h[1], h[2]) for h in hints] == [(100, 4096), (4196, 4096), (8292, 808), (9_500, 10)]


def test_the_read_window_is_the_disks_or_a_mebibyte(tmp_path):
    """The larger of the disk's read-ahead window and largest request, from its queue in sysfs (a
    partition: its disk's); 1 MiB where there is no block device behind the file."""
    from shardquant.startup import read_window

    assert read_window(Path("/proc/self/status")) == 1 << 20  # procfs: no disk
    assert read_window(tmp_path / "missing") == 1 << 20
    f = tmp_path / "x"
    f.write_bytes(b"x")
    dev = os.stat(f).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    queue = base / "queue" if (base / "queue").is_dir() else base.resolve().parent / "queue"
    try:
        kb = max(int((queue / n).read_text()) for n in ("read_ahead_kb", "max_sectors_kb"))
    except OSError:
        assert read_window(f) == 1 << 20
    else:
        assert read_window(f) == min(max(kb << 10, 128 << 10), 64 << 20)


def _slow_start(monkeypatch, events: list, fail: bool):
    """A GPU start that ends after the plan: with an error, or with the CPU backend."""
    import threading

    from shardquant import pipeline
    from shardquant.backend import NumpyBackend
    from shardquant.errors import ShardquantError

    go = threading.Event()
    real_claim, real_warm = conv.claim_output, pipeline.warm_start

    def backends(*a, **k):
        go.wait(10)  # until the output is claimed, or the plan is done
        events.append("device")
        if fail:
            raise ShardquantError("no CUDA device visible to cupy")
        return [NumpyBackend()]

    def claim(*a, **k):
        events.append("claim")
        return real_claim(*a, **k)

    def warm(plan, *a):
        events.append("warm-start")
        go.set()
        real_warm(plan, *a)

    monkeypatch.setattr(conv, "get_backends", backends)
    monkeypatch.setattr(conv, "claim_output", claim)
    monkeypatch.setattr(pipeline, "warm_start", warm)


def test_the_output_is_claimed_before_the_warm_start_while_the_gpu_starts(tmp_path, monkeypatch):
    """The claim's fsyncs would wait behind the reads a warm start queues: with the device still
    starting after the plan, the output is claimed first, then the disk reads ahead, then the device
    is waited for; the output is the one a conversion claimed after the device writes."""
    src = testing.write_checkpoint(tmp_path / "src", testing.qwen3_moe(), shard_bytes=16 * 1024)
    events: list[str] = []
    _slow_start(monkeypatch, events, fail=False)
    conv.convert(str(src), tmp_path / "early", "nvfp4", device="cuda")
    assert events == ["claim", "warm-start", "device"]
    monkeypatch.undo()
    conv.convert(str(src), tmp_path / "late", "nvfp4", device="cpu")
    for p in sorted((tmp_path / "late").iterdir()):
        if p.name != "shardquant_manifest.json" and p.suffix == ".safetensors":
            assert (tmp_path / "early" / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("before", ["nothing", "empty directory", "unfinished conversion"])
def test_a_gpu_that_fails_after_the_claim_leaves_the_output_as_it_was(tmp_path, monkeypatch, before):
    """The device fails to start after the output was claimed: a fresh claim is undone (its journal
    removed, the directory too if this run made it); an unfinished conversion keeps its journal and
    its finished shards, for the next run to resume."""
    from shardquant.errors import ShardquantError
    from shardquant.journal import JOURNAL_NAME

    src = testing.write_checkpoint(tmp_path / "src", testing.qwen3_moe(), shard_bytes=16 * 1024)
    out = tmp_path / "out"
    if before == "empty directory":
        out.mkdir()
    elif before == "unfinished conversion":  # stopped after its shards, before its finish
        with monkeypatch.context() as m:
            m.setattr(conv, "_finish", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                conv.convert(str(src), out, "nvfp4", device="cpu")
        assert (out / JOURNAL_NAME).is_file() and list(out.glob("*.safetensors"))
    had = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    events: list[str] = []
    _slow_start(monkeypatch, events, fail=True)
    with pytest.raises(ShardquantError, match="no CUDA device"):
        conv.convert(str(src), out, "nvfp4", device="cuda")
    assert events[:2] == ["claim", "warm-start"]
    if before == "nothing":
        assert not out.exists()
    elif before == "empty directory":
        assert out.is_dir() and list(out.iterdir()) == []
    else:  # as it was but for the journal, which names one more run
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != JOURNAL_NAME} == \
            {n: b for n, b in had.items() if n != JOURNAL_NAME}
        assert (out / JOURNAL_NAME).is_file()
        monkeypatch.undo()
        conv.convert(str(src), out, "nvfp4", device="cpu")  # and the next run finishes it
        assert (out / "model.safetensors.index.json").is_file()
