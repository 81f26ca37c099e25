"""The output side is safe by construction (README, "Output safety"): writes stay inside the output
and never go through a link; --force removes only what shardquant wrote; the source is read-only;
one writer per output; every write failure is one clean line and resumable; records read back are
validated; the finished output holds only what a user publishes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import shardquant.convert as conv
import shardquant.writer as writer
from shardquant.cli import main
from shardquant.errors import OutputError
from shardquant.journal import JOURNAL_NAME
from shardquant.lock import LOCK_NAME
from shardquant.manifest import MANIFEST_NAME
from shardquant.testing import qwen3_moe, write_checkpoint

INDEX = "model.safetensors.index.json"
SHARD = 40_000
ERRNOS = [errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EROFS]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src") / "m", qwen3_moe(hidden=64, layers=2, experts=4, inter=32),
                            shard_bytes=60_000)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=SHARD)
    return out


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root, without following links: what it is, and its bytes or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            else:
                out[str(p)] = ("dir",)
    return out


def run(src, out, **kw):
    return conv.convert(str(src), out, kw.pop("fmt", "nvfp4"), device="cpu", max_shard_size=SHARD, **kw)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r) -> str:
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. writes stay inside the output; links are never written through

def test_finished_output_holds_only_what_is_published(clean):
    names = {p.name for p in clean.iterdir()}
    assert not [n for n in names if n.startswith(".")], names  # no journal, lock or temporaries
    man = json.loads((clean / MANIFEST_NAME).read_text())
    assert set(man["files"]) == names - {MANIFEST_NAME}


@pytest.mark.parametrize("trap", ["shard", "config.json", JOURNAL_NAME, LOCK_NAME, INDEX, MANIFEST_NAME])
@pytest.mark.parametrize("force", [False, True])
def test_symlink_at_an_output_name_is_never_followed(src, clean, tmp_path, trap, force):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.bin"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    name = next(p.name for p in clean.glob("model-*.safetensors")) if trap == "shard" else trap
    (out / name).symlink_to(victim)
    (out / "dangling").symlink_to(outside / "created-through-link")
    before = tree(outside)
    with pytest.raises(OutputError) as e:
        run(src, out, force=force)
    assert name in str(e.value) or "not empty" in str(e.value) or "symlink" in str(e.value)
    assert tree(outside) == before
    assert (out / name).is_symlink()


def test_symlinked_shard_in_a_resumable_output_is_refused(src, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fail_at(monkeypatch, "rename", 6)
    with pytest.raises(OutputError):
        run(src, out)
    monkeypatch.setattr(writer, "FAULT", None)
    done = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert done, "the failed run finished no shard"
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x" * 10)
    (out / done[0]).unlink()
    (out / done[0]).symlink_to(outside)
    for force in (False, True):
        with pytest.raises(OutputError, match="not a regular file"):
            run(src, out, force=force)
    assert outside.read_bytes() == b"x" * 10


def test_hard_linked_output_file_is_replaced_not_written_into(src, clean, tmp_path):
    out = tmp_path / "out"
    run(src, out)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    twin = tmp_path / "twin.safetensors"
    os.link(shard, twin)
    before = twin.read_bytes()
    run(src, out, fmt="fp8", force=True)  # replaces every file of the previous conversion
    assert twin.read_bytes() == before
    assert not (out / shard.name).exists() or (out / shard.name).read_bytes() != before


def test_output_path_through_a_symlinked_parent_is_resolved_once(src, clean, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    run(src, tmp_path / "via" / "out")
    assert files(real / "out").keys() == files(clean).keys()


# ---------------------------------------------------------------------------------------------
# 2. --force deletes only what shardquant wrote

def test_force_refuses_to_overwrite_a_file_it_did_not_write(src, clean, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    theirs = next(p.name for p in clean.glob("model-*.safetensors"))
    (out / theirs).write_bytes(b"another tool's shard")
    (out / "config.json").write_text("{}")
    before = tree(out)
    line = one_error_line(cli("convert", src, "--format", "nvfp4", "-o", out, "--max-shard-size", SHARD,
                              "--device", "cpu", "--force"))
    assert theirs in line and "config.json" in line and "did not write" in line and "notes.txt" not in line
    assert tree(out) == before


def test_force_keeps_others_files_and_removes_its_own_stale_ones(src, clean, tmp_path):
    out = tmp_path / "out"
    run(src, out, max_shard_size=10**9) if False else conv.convert(str(src), out, "nvfp4", device="cpu",
                                                                   max_shard_size=20_000)
    many = sorted(p.name for p in out.glob("model-*.safetensors"))
    (out / "notes.txt").write_text("mine")
    (out / "model-00099-of-00099.safetensors").write_bytes(b"not from shardquant")
    r = run(src, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model-00099-of-00099.safetensors").read_bytes() == b"not from shardquant"
    assert any("not written by shardquant are left" in w for w in r.plan.warnings)
    now = sorted(p.name for p in out.glob("model-*.safetensors") if p.name != "model-00099-of-00099.safetensors")
    assert len(now) < len(many)  # the earlier conversion's extra shards are gone
    for n in files(clean):
        assert (out / n).read_bytes() == (clean / n).read_bytes(), n


def test_non_empty_directory_without_force_is_untouched(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("x")
    before = tree(out)
    line = one_error_line(cli("convert", src, "--format", "nvfp4", "-o", out, "--device", "cpu"))
    assert "not empty" in line and "a.txt" in line
    assert tree(out) == before


# ---------------------------------------------------------------------------------------------
# 3. the source is read-only

@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_and_source_must_be_apart(tmp_path, where):
    src = write_checkpoint(tmp_path / "a" / "src", qwen3_moe(hidden=64, layers=1, experts=2, inter=32))
    out = {"same": src, "inside": src / "quant", "around": tmp_path / "a"}[where]
    before = tree(tmp_path)
    line = one_error_line(cli("convert", src, "--format", "nvfp4", "-o", out, "--device", "cpu", "--force"))
    assert "source" in line
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 4. one writer per output

HOLDER = r"""
import sys, time
from pathlib import Path
from shardquant.lock import Lock
from shardquant.writer import OutputDir
od = OutputDir.open(Path(sys.argv[1]))
with Lock(od):
    print("HELD", flush=True)
    time.sleep(60)
"""


def test_second_run_fails_at_once_naming_the_holder(src, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "HELD"
        t0 = time.monotonic()
        line = one_error_line(cli("convert", src, "--format", "nvfp4", "-o", out, "--device", "cpu", "--force"))
        assert time.monotonic() - t0 < 10
        assert f"process {p.pid}" in line and "another shardquant run" in line
        assert sorted(x.name for x in out.iterdir()) == [LOCK_NAME]
    finally:
        p.kill()
        p.wait()
    run(src, out)  # the holder died: its lock is stale and taken over
    assert not (out / LOCK_NAME).exists()


def test_lock_of_a_dead_process_is_taken_over(src, clean, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    token = "0123456789abcdef"
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": 1,
                                             "boot": None, "token": token}))
    (out / f".{JOURNAL_NAME.lstrip('.')}.{token}.sqtmp").write_text("half a journal")  # its leftover
    run(src, out)
    assert files(out) == files(clean)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see a process's state")
def test_lock_of_an_exited_but_unreaped_process_is_taken_over(src, clean, tmp_path):
    """A holder killed but not yet reaped (a zombie: its pid still answers kill(pid, 0), as in a container
    whose first process never reaps) holds nothing: the next run takes its lock over."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "HELD"
        p.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{p.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline, "the holder did not exit"
            time.sleep(0.01)
        run(src, out)  # not waited for: still a zombie while this runs
        assert Path(f"/proc/{p.pid}").exists()
        assert files(out) == files(clean)
    finally:
        p.kill()
        p.wait()


def test_a_racing_runs_lock_temporary_is_not_someone_elses_file(src, clean, tmp_path):
    """Two runs starting at once each prepare a lock under a temporary name; the winner's claim may see
    the loser's before the loser removes it. It is neither a conversion's file nor the winner's to delete."""
    out = tmp_path / "out"
    out.mkdir()
    racer = out / f".{LOCK_NAME.lstrip('.')}.fedcba9876543210.sqtmp"
    racer.write_text("another run's lock, being prepared")
    run(src, out)
    assert racer.read_text() == "another run's lock, being prepared"
    assert {k: v for k, v in files(out).items() if k != racer.name} == files(clean)
    # any other file beside it still makes the directory someone else's
    other = tmp_path / "other"
    other.mkdir()
    (other / racer.name).write_text("x")
    (other / "notes.txt").write_text("mine")
    line = one_error_line(cli("convert", src, "--format", "nvfp4", "-o", other, "--device", "cpu"))
    assert "holds no shardquant conversion (notes.txt)" in line


def test_two_concurrent_runs_one_wins_and_the_output_is_whole(src, clean, tmp_path):
    out = tmp_path / "out"
    code = ("import sys, shardquant.convert as c\n"
            "from shardquant.errors import OutputError\n"
            "try:\n"
            f"    c.convert(sys.argv[1], sys.argv[2], 'nvfp4', device='cpu', max_shard_size={SHARD})\n"
            "    print('OK')\n"
            "except OutputError as e:\n"
            "    print('REFUSED', e)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(src), str(out)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sum(o.startswith("OK") for o in outs) >= 1, outs
    for o in outs:
        assert o.startswith("OK") or "another shardquant run" in o, o
    assert files(out) == files(clean)


# ---------------------------------------------------------------------------------------------
# 5. any write failure is one clean line, and the output resumes

def fail_at(monkeypatch, op: str | None, n: int, err: int = errno.EIO) -> dict:
    """The n-th system call (of kind `op`, or any) on the output fails with `err`."""
    seen = {"n": 0, "hit": None}

    def fault(o, name):
        if op is None or o == op:
            seen["n"] += 1
            if seen["n"] == n:
                seen["hit"] = (o, name)
                raise OSError(err, os.strerror(err))

    monkeypatch.setattr(writer, "FAULT", fault)
    return seen


def count_calls(src, tmp_path, monkeypatch) -> int:
    seen = fail_at(monkeypatch, None, -1)
    run(src, tmp_path / "count")
    monkeypatch.setattr(writer, "FAULT", None)
    return seen["n"]


@pytest.mark.parametrize("hash_behind", [False, True])
def test_write_failure_at_sampled_calls_is_clean_and_resumes(src, clean, tmp_path, monkeypatch, hash_behind):
    """A bounded sample of the sweep in tools/fault_sweep.py: failure at the N-th system call; also
    with every file hashed on its own thread from its first byte (shardquant/writer.py _Hasher: this
    fixture's files are below HASH_BEHIND_MIN)."""
    if hash_behind:
        monkeypatch.setattr(writer, "HASH_BEHIND_MIN", 1)
    total = count_calls(src, tmp_path, monkeypatch)
    assert total > 50
    rng = random.Random(9)
    sample = sorted({1, 2, 3, total} | set(rng.sample(range(4, total), 14)))
    for i, n in enumerate(sample):
        out = tmp_path / f"o{n}"
        err = ERRNOS[i % len(ERRNOS)]
        seen = fail_at(monkeypatch, None, n, err)
        with pytest.raises(OutputError) as e:
            run(src, out)
        msg = str(e.value)
        assert "\n" not in msg and os.strerror(err) in msg and str(out) in msg, (seen["hit"], msg)
        assert not [t for t in threading.enumerate() if t.name == "shardquant-hash-output"], n  # none left running
        monkeypatch.setattr(writer, "FAULT", None)
        assert not (out / INDEX).exists() or seen["hit"][1] in (INDEX, ".", JOURNAL_NAME, LOCK_NAME), seen
        run(src, out)  # no --force
        assert files(out) == files(clean), (n, seen["hit"])


def test_cleanup_failure_does_not_hide_the_first_error(src, clean, tmp_path, monkeypatch):
    def fault(op, name):
        if op == "write" and name.startswith("model-00002"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if op == "unlink":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(writer, "FAULT", fault)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="model-00002.*No space left on device"):
        run(src, out)
    monkeypatch.setattr(writer, "FAULT", None)
    run(src, out)
    assert files(out) == files(clean)


def _sweep_tool():
    """tools/fault_sweep.py (not a package): its KILLER child is the one both use."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "fault_sweep.py"
    spec = importlib.util.spec_from_file_location("fault_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KILLER = _sweep_tool().KILLER  # SIGKILL just before the N-th system call on the output


def test_kill_at_sampled_instants_resumes_without_force(src, clean, tmp_path, monkeypatch):
    """SIGKILL just before the N-th system call on the output (the first journal write included),
    for a bounded sample of N; tools/fault_sweep.py --kill runs every N."""
    total = count_calls(src, tmp_path, monkeypatch)
    rng = random.Random(3)
    for n in sorted({1, 2, 3, 4, 5, 6} | set(rng.sample(range(7, total), 5))):
        out = tmp_path / f"k{n}"
        p = subprocess.run([sys.executable, "-c", KILLER, str(src), str(out), str(n), str(SHARD)],
                           capture_output=True, timeout=120)
        assert p.returncode == -signal.SIGKILL, p.stderr
        run(src, out)
        assert files(out) == files(clean), n


# ---------------------------------------------------------------------------------------------
# 6. records are untrusted

@pytest.mark.parametrize("edit", [
    lambda j: j.update(files={"../escape": None}),
    lambda j: j.update(files={"a/b": None}),
    lambda j: j.update(files={"x": {"sha256": "zz", "size": 1}}),
    lambda j: j.update(files={"x": {"sha256": "0" * 64, "size": -1}}),
    lambda j: j.update(files=[]),
    lambda j: j.update(scales={"k": ["nan", 1]}),
    lambda j: j.update(scales={"k": [1.0]}),
    lambda j: j.update(runs=["../../x"]),
    lambda j: j.update(fingerprint=5),
    lambda j: j.update(version=99),
    lambda j: j.pop("sources"),
    lambda j: j.update(sources={"s": {"sha256": "0" * 64}}),
])
def test_bad_journal_is_a_clean_error(src, tmp_path, monkeypatch, edit):
    out = tmp_path / "out"
    fail_at(monkeypatch, "rename", 6)
    with pytest.raises(OutputError):
        run(src, out)
    monkeypatch.setattr(writer, "FAULT", None)
    j = json.loads((out / JOURNAL_NAME).read_text())
    edit(j)
    (out / JOURNAL_NAME).write_text(json.dumps(j))
    before = tree(out)
    line = one_error_line(cli("convert", src, "--format", "nvfp4", "-o", out, "--max-shard-size", SHARD,
                              "--device", "cpu"))
    assert JOURNAL_NAME in line and "--force" in line
    assert tree(out) == before


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe", b"[1,2]", b"{" * 100_000, b'{"version": 2}'])
def test_unreadable_journal_is_a_clean_error(src, tmp_path, garbage):
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL_NAME).write_bytes(garbage)
    line = one_error_line(cli("convert", src, "--format", "nvfp4", "-o", out, "--device", "cpu"))
    assert JOURNAL_NAME in line


# ---------------------------------------------------------------------------------------------
# 8. provenance

def test_resumed_run_records_the_same_source_hashes(src, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fail_at(monkeypatch, "rename", 8)
    with pytest.raises(OutputError):
        run(src, out)
    monkeypatch.setattr(writer, "FAULT", None)
    j = json.loads((out / JOURNAL_NAME).read_text())
    assert j["sources"], "the interrupted run hashed no source file completely"
    j["sources"] = {}  # as if it had stopped before: the resumed run hashes the kept shards' tensors itself
    (out / JOURNAL_NAME).write_text(json.dumps(j))
    r = run(src, out)
    assert r.resumed >= 1 and r.hashed_extra > sum(p.stat().st_size for p in src.glob("*.json")) 
    assert (out / MANIFEST_NAME).read_bytes() == (clean / MANIFEST_NAME).read_bytes()


def test_hub_blob_that_does_not_match_its_name_is_refused(src, tmp_path):
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--name"
    commit = "a" * 40
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        if f.name.startswith("model-00001"):
            data = data[:-1] + bytes([data[-1] ^ 1])  # damaged in the cache, same size
        (blobs / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "shardquant.cli", "convert", "org/name", "--format", "nvfp4",
                        "-o", str(out), "--device", "cpu", "-q"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "model-00001" in p.stderr and "differs from the hub's" in p.stderr
    assert not (out / INDEX).exists()


# ---------------------------------------------------------------------------------------------
# 7. verify proves every byte, also of an output downloaded into a hub cache

def test_verify_accepts_a_hub_snapshot_of_links_into_blobs_only(clean, tmp_path):
    from shardquant.verify import verify_contract

    repo = tmp_path / "hub" / "models--org--q"
    snap, blobs = repo / "snapshots" / ("b" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in clean.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert verify_contract(snap) == []
    shard = next(snap.glob("model-*.safetensors"))
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(elsewhere)  # same bytes, but from outside the repo's blobs
    bad = verify_contract(snap)
    assert ("file-integrity", shard.name) in [(v.rule, v.name) for v in bad]


def test_source_hash_keeps_pace_when_reads_come_out_of_order(src, monkeypatch):
    """Tensors read far ahead of a file's hash cursor, past the bound on held bytes, are not held:
    the hasher reads them itself when its cursor gets there, while the conversion is still running
    (shardquant/provenance.py), instead of leaving the file's remainder for the end."""
    import shardquant.provenance as prov
    from shardquant.source import open_checkpoint
    from shardquant.st import read_raw

    ck = open_checkpoint(str(src))
    monkeypatch.setattr(prov, "HOLD_BYTES", 1)  # nothing out of order is ever held
    h = prov.SourceHasher(ck, {}, set())
    try:
        for info in sorted(ck.tensors.values(), key=lambda t: (str(t.file), -t.offset)):  # each file backwards
            h.feed(info, read_raw(info))
        deadline = time.monotonic() + 10
        while any(f.digest is None for f in h.files.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(f.digest is not None for f in h.files.values()), "hashing was left for finish()"
    finally:
        got = h.finish()
    assert got == {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                            "checked_against_hub": False} for p in prov.source_files(ck)}
    assert h.extra_bytes <= sum(p.stat().st_size for p in prov.source_files(ck))  # each byte read again at most once


def test_source_files_hash_in_parallel_each_on_one_thread(src, monkeypatch):
    """SHA-256 is serial within a file and one thread hashes slower than a fast disk reads, so the
    shards hash on several threads, each file's bytes in order on one of them (shardquant/provenance.py)."""
    import shardquant.provenance as prov
    from shardquant.source import open_checkpoint
    from shardquant.st import read_raw

    seen: dict[int, set[str]] = {}  # id of a hash object -> threads that fed it
    real = hashlib.sha256

    class Recording:
        def __init__(self):
            self._h = real()
            seen[id(self)] = set()

        def update(self, b):
            seen[id(self)].add(threading.current_thread().name)
            self._h.update(b)

        def hexdigest(self):
            return self._h.hexdigest()

    monkeypatch.setattr(prov.hashlib, "sha256", Recording)
    ck = open_checkpoint(str(src))
    assert len(ck.shards) >= 3
    h = prov.SourceHasher(ck, {}, set(), threads=3)
    for info in sorted(ck.tensors.values(), key=lambda t: (t.offset, str(t.file))):  # the files in turn
        h.feed(info, read_raw(info))
    got = h.finish()
    monkeypatch.undo()
    assert got == {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                            "checked_against_hub": False} for p in prov.source_files(ck)}
    assert all(len(threads) == 1 for threads in seen.values())
    assert len(set().union(*seen.values())) == 3
