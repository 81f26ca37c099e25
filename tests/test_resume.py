"""Crash safety: a conversion killed (SIGKILL) at several points resumes on re-run and ends
byte-identical to an uninterrupted run; finished outputs are checked, not rewritten; a changed
command or source is refused; disk-full and write errors end cleanly and resumably."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shardquant.convert as conv
import shardquant.writer as writer
from shardquant.errors import OutputError
from shardquant.journal import JOURNAL_NAME
from shardquant.testing import qwen3_moe, write_checkpoint

INDEX = "model.safetensors.index.json"
# A conversion in a child process that announces its progress and slows down at chosen points,
# so that the parent can kill it there.
CHILD = r"""
import sys, time
import shardquant.convert as conv
import shardquant.writer as writer
import shardquant.pipeline as pipe
stage, count = sys.argv[3], int(sys.argv[4])
seen = {"SHARD": 0, "MID": 0}
if stage.endswith("checkpointed"):
    pipe.CHECKPOINT_SECONDS = 0.0  # a checkpoint after every tensor
orig_finish_shard = pipe._Shards._finish
def finish_shard(self):
    had = self.cur is not None
    orig_finish_shard(self)
    if had:
        print("SHARD", flush=True)
        seen["SHARD"] += 1
        if stage == "after-shard" and seen["SHARD"] == count:
            time.sleep(30)
pipe._Shards._finish = finish_shard
orig_write = pipe._Shards.write
def write(self, name, data):
    orig_write(self, name, data)
    if stage.startswith("mid-shard") and self.cur is not None and self.pos == 2:
        print("MID", flush=True)
        seen["MID"] += 1
        if seen["MID"] == count:
            time.sleep(30)
pipe._Shards.write = write
orig_final = conv._finish
def final(*a):
    print("FINAL", flush=True)
    if stage == "before-index":
        time.sleep(30)
    orig_final(*a)
conv._finish = final
conv.convert(sys.argv[1], sys.argv[2], "nvfp4", device="cpu", max_shard_size=40_000)
print("DONE", flush=True)
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src"), qwen3_moe(hidden=64, layers=3, experts=6, inter=32),
                            shard_bytes=100_000)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    return out


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def kill_at(src: Path, out: Path, stage: str, marker: str, count: int = 1) -> None:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), stage, str(count)],
                         stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 120
    for line in p.stdout:
        if line.strip() == marker:
            seen += 1
            if seen == count:
                break
        assert time.time() < deadline
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert seen == count, f"the child never reached {marker} x{count}"
    assert not (out / INDEX).exists()  # a killed run never looks finished


@pytest.mark.parametrize("stage,marker,count", [
    ("after-shard", "SHARD", 1),   # between shards
    ("after-shard", "SHARD", 3),   # further on
    ("mid-shard", "MID", 2),       # inside a shard being written
    ("mid-shard-checkpointed", "MID", 2),  # the same, with the shard's first tensors checkpointed
    ("before-index", "FINAL", 1),  # every shard done, configs and index not yet
])
def test_killed_conversion_resumes_byte_identical(src, clean, tmp_path, stage, marker, count):
    out = tmp_path / "out"
    kill_at(src, out, stage, marker, count)
    before = {p.name for p in out.iterdir()}
    assert JOURNAL_NAME in before
    r = conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    if not stage.startswith("mid-shard") or count > 1:
        assert r.resumed >= 1  # finished shards were kept, not redone
    assert r.resumed < len(r.plan.shards) or stage == "before-index"
    # a checkpointed shard goes on from its checkpoint (header and two tensors here), not from zero
    assert (r.resumed_bytes > 0) == (stage == "mid-shard-checkpointed")
    assert files(out) == files(clean)


def _fail_mid_shard(monkeypatch, src, out):
    """A write error in the second shard after its first tensors were checkpointed."""
    import shardquant.pipeline as pipe

    monkeypatch.setattr(pipe, "CHECKPOINT_SECONDS", 0.0)
    writes = {"n": 0}

    def fault(op, name):
        if op == "write" and name.startswith("model-00002-"):
            writes["n"] += 1
            if writes["n"] == 4:
                raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(writer, "FAULT", fault)
    with pytest.raises(OutputError, match="model-00002-.*write failed"):
        conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    monkeypatch.setattr(writer, "FAULT", None)
    monkeypatch.setattr(pipe, "CHECKPOINT_SECONDS", 2.0)


def test_failed_shard_resumes_from_its_checkpoint(src, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_mid_shard(monkeypatch, src, out)
    temps = [p for p in out.iterdir() if p.name.startswith(".model-00002-") and p.name.endswith(".sqtmp")]
    assert len(temps) == 1  # kept: its prefix is recorded in the journal
    r = conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert r.resumed == 1 and r.resumed_bytes > 0
    assert files(out) == files(clean)


def test_tampered_checkpointed_prefix_is_rewritten(src, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_mid_shard(monkeypatch, src, out)
    [tmp] = [p for p in out.iterdir() if p.name.startswith(".model-00002-") and p.name.endswith(".sqtmp")]
    data = bytearray(tmp.read_bytes())
    data[-1 - len(data) // 3] ^= 0x01  # inside the checkpointed prefix
    tmp.write_bytes(bytes(data))
    r = conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert r.resumed_bytes == 0  # the prefix no longer hashes as recorded: the shard is written anew
    assert files(out) == files(clean)


def test_finished_output_is_checked_not_rewritten(src, clean, tmp_path):
    out = tmp_path / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert r.complete and r.bytes_read == 0 and r.resumed == len(r.plan.shards)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert files(out) == files(clean)


def test_corrupted_finished_shard_is_redone(src, clean, tmp_path):
    out = tmp_path / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert not r.complete and r.resumed == len(r.plan.shards) - 1
    assert files(out) == files(clean)


def test_changed_command_or_source_is_refused(src, tmp_path):
    out = tmp_path / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    with pytest.raises(OutputError, match="different command.*--force"):
        conv.convert(str(src), out, "fp8", device="cpu", max_shard_size=40_000)
    with pytest.raises(OutputError, match="different command"):
        conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000, expert_policy="per-expert")
    r = conv.convert(str(src), out, "fp8", device="cpu", max_shard_size=40_000, force=True)
    assert not r.complete and r.resumed == 0
    assert r.plan.format == "fp8"


def test_changed_source_is_refused_on_resume(tmp_path, monkeypatch):
    """An unfinished output whose source was rewritten in place, size and mtime kept, is not resumed:
    the ctime in the journal's fingerprint gives it away."""
    src = write_checkpoint(tmp_path / "src", qwen3_moe(hidden=64, layers=2, experts=4, inter=32), shard_bytes=60_000)
    out = tmp_path / "out"
    fail_at_nth(monkeypatch, "rename", 3)  # an unfinished output: some shards done, no index
    with pytest.raises(OutputError):
        conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    monkeypatch.setattr(writer, "FAULT", None)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    time.sleep(0.01)
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(OutputError, match="different command, version or source"):
        conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)


def test_finished_output_with_same_recipe_is_complete(tmp_path):
    """A finished output is judged by its recipe (names, sizes, layout) and its own files' hashes:
    touching the source does not make it unfinished."""
    src = write_checkpoint(tmp_path / "src", qwen3_moe(hidden=64, layers=1, experts=4, inter=32), shard_bytes=100_000)
    out = tmp_path / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert conv.convert(str(src), out, "nvfp4", device="cpu").complete


def fail_at_nth(monkeypatch, op: str, n: int, err: int = errno.EIO) -> None:
    """The n-th call of system call `op` on the output fails with `err` (shardquant/writer.py FAULT)."""
    seen = {"n": 0}

    def fault(o, name):
        if o == op:
            seen["n"] += 1
            if seen["n"] == n:
                raise OSError(err, os.strerror(err))

    monkeypatch.setattr(writer, "FAULT", fault)


def test_not_enough_space_is_an_error_up_front(src, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 50_000, 50_000))
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"needs .* GB for the output but only 0\.00 GB are free"):
        conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert not list(out.glob("model-*"))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_failure_mid_way_is_clean_and_resumable(src, clean, tmp_path, monkeypatch, err):
    last = conv.prepare(str(src), "nvfp4", max_shard_size=40_000).shards[-1][0]

    def fault(op, name):  # the disk fills up in the last shard
        if op == "write" and name == last:
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(writer, "FAULT", fault)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=rf"{last}: write failed \({os.strerror(err)}\); re-run the same command to resume"):
        conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert not (out / INDEX).exists()
    monkeypatch.setattr(writer, "FAULT", None)
    r = conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=40_000)
    assert r.resumed >= 1
    assert files(out) == files(clean)


def test_cli_says_resumed_and_complete(src, tmp_path):
    from click.testing import CliRunner

    from shardquant.cli import main

    out = tmp_path / "out"
    args = ["convert", str(src), "--format", "nvfp4", "-o", str(out), "--max-shard-size", "40KB"]
    assert CliRunner().invoke(main, args + ["-q"]).exit_code == 0
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "already complete" in r.output and "nothing written" in r.output


def test_recipe_once_per_plan_and_each_plan_its_own(src):
    """The recipe (what decides the output bytes) is made once per plan and asked again from it;
    another plan gets its own: the same choices give the same recipe, another policy or shard size
    another one (shardquant/journal.py recipe)."""
    from shardquant.journal import recipe

    a = conv.prepare(str(src), "nvfp4", max_shard_size=40_000)
    first = recipe(a)
    assert recipe(a) == first
    assert recipe(conv.prepare(str(src), "nvfp4", max_shard_size=40_000)) == first
    others = {recipe(conv.prepare(str(src), "nvfp4", max_shard_size=40_000, expert_policy="per-expert")),
              recipe(conv.prepare(str(src), "nvfp4", max_shard_size=80_000)),
              recipe(conv.prepare(str(src), "fp8", max_shard_size=40_000))}
    assert first not in others and len(others) == 3
    plans = [conv.prepare(str(src), "nvfp4", max_shard_size=40_000 + 1000 * i) for i in range(12)]  # past the cache
    assert len({recipe(p) for p in plans}) == 12 and recipe(a) == first
