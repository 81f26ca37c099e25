"""The output directory, and the only code that writes into it.

Safe by construction (README, "Output safety"):
- The directory is resolved once and opened; every later call is relative to that open descriptor
  (`dir_fd`), so renaming or re-linking a path component mid-run cannot redirect a write.
- A file is never opened for writing if it exists: each write goes to a fresh temporary name
  (`O_CREAT | O_EXCL | O_NOFOLLOW`: an existing file, symlink or hard link there is an error, not a
  target), is fsynced, and is renamed over the final name. rename(2) replaces a directory entry; it
  never writes through a symlink or into a hard-linked file's other names.
- Temporary names carry the run's token (`.NAME.TOKEN.sqtmp`); the token is recorded in the lock
  and the journal before the first temporary exists, so a later run removes exactly those.
- Every system call goes through `_sys`, which tests use to inject a failure at the N-th call.
Reads of files in the output (journal, previous manifest, resumed shards) refuse symlinks too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import secrets
import stat
import threading
import time
from pathlib import Path

from .errors import OutputError

TMP_SUFFIX = ".sqtmp"
TMP_RE = re.compile(r"\.(?P<name>.+)\.(?P<token>[0-9a-f]{16})\.sqtmp")
TOKEN_RE = re.compile(r"[0-9a-f]{16}")
RESUME_HINT = "re-run the same command to resume"
_CHUNK = 16 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Test hook: a callable(op, name) that may raise OSError, called before every system call that
# changes the output directory (open, write, fsync, close, rename, unlink, mkdir, truncate).
FAULT = None


def _sys(op: str, name: str, fn, *args, **kw):
    if FAULT is not None:
        FAULT(op, name)
    return fn(*args, **kw)


def _writeback_starter():
    """Linux sync_file_range(2) with SYNC_FILE_RANGE_WRITE: starts writing a range's dirty pages to the
    disk and returns without waiting (no Python binding exists, hence ctypes). Without it, a shard's
    bytes sit in the page cache until the next checkpoint's fsync writes them all at once, and the
    writer, stalled in that fsync, stalls the reads behind it; with it, the disk writes while it reads
    and the fsync finds little left. Errors are the fsync's to report. None where unavailable."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE


START_WRITEBACK = _writeback_starter()
WRITEBACK_BYTES = 8 << 20  # written bytes handed to START_WRITEBACK at once: one call per tensor is a
# system call per 4-byte global scale, and each may wait for the disk's queue
HASH_BEHIND_BYTES = 128 << 20  # written bytes a file's hasher may still have to hash (_Hasher)
HASH_BEHIND_MIN = 1 << 20  # a file this large so far has its hashing thread (a shard's expert outputs
# are each below 1 MiB on a 30B MoE: the file's size decides, not the write's)


class _Hasher:
    """A file's SHA-256 over its bytes in write order, on a thread of its own once the file has
    HASH_BEHIND_MIN bytes or more: the writer's write calls and the hash then run at once (each
    about half of the writer thread's time per byte; docs/benchmarks/README.md, write-behind and
    hash-behind), at most HASH_BEHIND_BYTES behind. Small files are hashed inline."""

    def __init__(self, sha):
        self.sha = sha
        self.waited = 0.0  # seconds the writer waited for the hash to catch up (trace)
        self.q: queue.Queue = queue.Queue()
        self.cv = threading.Condition()
        self.behind = 0
        self.seen = 0  # bytes handed in
        self.t: threading.Thread | None = None

    def update(self, mv: memoryview) -> None:
        self.seen += mv.nbytes
        if self.t is None and self.seen < HASH_BEHIND_MIN:
            self.sha.update(mv)
            return
        if self.t is None:
            self.t = threading.Thread(target=self._work, name="shardquant-hash-output", daemon=True)
            self.t.start()
        with self.cv:
            if self.behind >= HASH_BEHIND_BYTES:
                t0 = time.perf_counter()
                self.cv.wait_for(lambda: self.behind < HASH_BEHIND_BYTES)
                self.waited += time.perf_counter() - t0
            self.behind += mv.nbytes
        self.q.put(mv)  # the view keeps its buffer alive until hashed

    def _work(self) -> None:
        while (mv := self.q.get()) is not None:
            self.sha.update(mv)
            with self.cv:
                self.behind -= mv.nbytes
                self.cv.notify_all()

    def result(self):
        """The hash object, every byte written so far hashed."""
        with self.cv:
            self.cv.wait_for(lambda: self.behind == 0)
        return self.sha

    def close(self) -> None:
        if self.t is not None:
            self.q.put(None)
            self.t.join()
            self.t = None


def new_token() -> str:
    return secrets.token_hex(8)


def tmp_name(name: str, token: str) -> str:
    return f".{name}.{token}{TMP_SUFFIX}"


def _plain(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


class OutputDir:
    """An open output directory. Every method takes plain file names (no path separators)."""

    def __init__(self, path: Path, fd: int, token: str, created: bool):
        self.path, self.fd, self.token, self.created = path, fd, token, created
        self.hint = RESUME_HINT
        # seconds the files written here spent in write calls, in starting write-back, and waiting for
        # their hash to catch up (shardquant/pipeline.py puts them in the trace)
        self.times = {"write_s": 0.0, "writeback_s": 0.0, "hash_wait_s": 0.0}

    @classmethod
    def open(cls, path: Path) -> "OutputDir":
        """Create the directory (and parents) if needed and open it. A path that names a symlink
        to a directory is followed here, once, as the user gave it; nothing inside is followed."""
        path = Path(path).expanduser()
        created = False
        try:
            if not os.path.lexists(path):
                _sys("mkdir", str(path), os.makedirs, path, exist_ok=True)
                created = True
        except OSError as e:
            raise OutputError(f"{path}: cannot create the output directory ({e.strerror or e})") from None
        if not path.is_dir():
            raise OutputError(f"{path}: exists and is not a directory")
        try:
            fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except OSError as e:
            raise OutputError(f"{path}: cannot open the output directory ({e.strerror or e})") from None
        return cls(Path(os.path.realpath(path)), fd, new_token(), created)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fail(self, name: str, what: str, e: OSError, hint: bool = True) -> OutputError:
        tail = f"; {self.hint}" if hint and self.hint else ""
        return OutputError(f"{self.path / name}: {what} ({e.strerror or e}){tail}")

    # ---- looking
    def entries(self) -> dict[str, os.stat_result]:
        """Every entry of the directory, lstat'ed (a symlink is reported as a symlink)."""
        out = {}
        try:
            names = os.listdir(self.fd)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot list ({e.strerror or e})") from None
        for n in names:
            st = self.lstat(n)
            if st is not None:
                out[n] = st
        return out

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(_plain(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OutputError(f"{self.path / name}: cannot stat ({e.strerror or e})") from None

    def is_file(self, name: str) -> bool:
        st = self.lstat(name)
        return st is not None and stat.S_ISREG(st.st_mode)

    def _open_read(self, name: str) -> int:
        """A regular file of the directory, never through a symlink (ELOOP) and never a FIFO."""
        fd = os.open(_plain(name), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0),
                     dir_fd=self.fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(0, "not a regular file")
        return fd

    def read_bytes(self, name: str, limit: int) -> bytes | None:
        """The file's bytes (None when absent); OutputError when it is not a regular file or is
        larger than `limit`."""
        try:
            fd = self._open_read(name)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OutputError(f"{self.path / name}: cannot read ({e.strerror or 'a symlink or special file'})") from None
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise OutputError(f"{self.path / name}: {size} bytes, larger than any file shardquant writes there")
            chunks, got = [], 0
            while chunk := os.read(fd, min(_CHUNK, limit + 1 - got)):
                chunks.append(chunk)
                got += len(chunk)
                if got > limit:
                    raise OutputError(f"{self.path / name}: grew past {limit} bytes while being read")
            return b"".join(chunks)
        except OSError as e:
            raise OutputError(f"{self.path / name}: cannot read ({e.strerror or e})") from None
        finally:
            os.close(fd)

    def digest(self, name: str) -> tuple[int, str] | None:
        """(size, SHA-256) of a regular file of the directory; None if absent, a symlink or unreadable."""
        try:
            fd = self._open_read(name)
        except OSError:
            return None
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "rb", buffering=0, closefd=True) as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except OSError:
            return None
        return size, h.hexdigest()

    def prefix(self, tmp: str, size: int, sha256: str):
        """The hash state of the first `size` bytes of our own temporary file `tmp` when they hash to
        `sha256` (a shard written up to a checkpoint, shardquant/journal.py `partial`), else None.
        Only a regular file with one link, never through a symlink."""
        try:
            fd = self._open_read(tmp)
        except OSError:
            return None
        h, got = hashlib.sha256(), 0
        try:
            st = os.fstat(fd)
            if st.st_nlink != 1 or st.st_size < size:
                return None
            while got < size and (chunk := os.read(fd, min(_CHUNK, size - got))):
                h.update(chunk)
                got += len(chunk)
        except OSError:
            return None
        finally:
            os.close(fd)
        return h if got == size and h.hexdigest() == sha256 else None

    # ---- writing
    def reopen(self, name: str, tmp: str, size: int, sha) -> "NewFile":
        """Our temporary file `tmp` for `name`, cut back to its checked prefix of `size` bytes (whose
        hash state is `sha`, from `prefix`), to be written on from there and committed as `name`."""
        return NewFile(self, _plain(name), resume=(_plain(tmp), size, sha))

    def create(self, name: str) -> "NewFile":
        """A fresh temporary file that `NewFile.commit` renames to `name`."""
        return NewFile(self, _plain(name))

    def write_file(self, name: str, data: bytes) -> dict:
        """Write `data` as `name` atomically; return {"sha256", "size"}."""
        f = self.create(name)
        try:
            f.write(data)
            return f.commit()
        except BaseException:
            f.abort()
            raise

    def remove(self, name: str) -> None:
        """Remove one directory entry (unlink never follows a symlink: the link itself goes)."""
        try:
            _sys("unlink", name, os.unlink, _plain(name), dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self.fail(name, "cannot remove", e) from None

    def rename(self, src: str, dst: str) -> None:
        try:
            _sys("rename", dst, os.replace, _plain(src), _plain(dst), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            raise self.fail(dst, "cannot rename into place", e) from None

    def sync(self) -> None:
        """Make renames and unlinks durable."""
        try:
            _sys("fsync", ".", os.fsync, self.fd)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a file system that cannot fsync a directory
                raise self.fail(".", "cannot sync the directory", e) from None


class NewFile:
    """A file being written under a temporary name, hashed as it is written."""

    def __init__(self, od: OutputDir, name: str, resume: tuple | None = None):
        self.od, self.name = od, name
        self.tmp = tmp_name(name, od.token)
        self.size = 0
        self.hash = _Hasher(hashlib.sha256())
        self.started = 0  # bytes handed to START_WRITEBACK
        self.fd = -1
        self.checkpointed = 0  # bytes made durable by `checkpoint` (kept by `abort`)
        if resume is not None:  # an earlier run's temporary, its prefix checked (OutputDir.prefix)
            self._reopen(*resume)
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        try:
            self.fd = _sys("open", self.tmp, os.open, self.tmp, flags, 0o644, dir_fd=od.fd)
        except OSError as e:
            raise od.fail(name, "cannot create", e) from None

    def _reopen(self, tmp: str, size: int, sha) -> None:
        self.tmp = tmp
        try:
            self.fd = _sys("open", tmp, os.open, tmp, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self.od.fd)
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise OSError(errno.EPERM, "not a regular file of one link")
            _sys("truncate", tmp, os.ftruncate, self.fd, size)
            os.lseek(self.fd, size, os.SEEK_SET)
        except OSError as e:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            raise self.od.fail(self.name, "cannot resume", e) from None
        self.size, self.hash, self.checkpointed, self.started = size, _Hasher(sha), size, size

    def checkpoint(self) -> dict:
        """Make what is written so far durable; return the prefix's {"size", "sha256"}."""
        self._start_writeback(0)
        try:
            _sys("fsync", self.name, os.fsync, self.fd)
        except OSError as e:
            raise self.od.fail(self.name, "write failed", e) from None
        self.checkpointed = self.size
        return {"size": self.size, "sha256": self.hash.result().copy().hexdigest()}

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        waited = self.hash.waited
        self.hash.update(mv)
        t0 = time.perf_counter()
        try:
            while mv:
                k = _sys("write", self.name, os.write, self.fd, mv[: 1 << 30])
                mv = mv[k:]
                self.size += k
        except OSError as e:
            raise self.od.fail(self.name, "write failed", e) from None
        t1 = time.perf_counter()
        self._start_writeback(WRITEBACK_BYTES)
        times = self.od.times
        times["write_s"] += t1 - t0
        times["writeback_s"] += time.perf_counter() - t1
        times["hash_wait_s"] += self.hash.waited - waited

    def _start_writeback(self, at_least: int) -> None:
        """Bytes written since the last call handed to the disk, once there are `at_least` of them."""
        if START_WRITEBACK is not None and self.size - self.started >= max(at_least, 1):
            START_WRITEBACK(self.fd, self.started, self.size - self.started)
            self.started = self.size

    def commit(self, sync_dir: bool = True) -> dict:
        """fsync, close and rename into place; return {"sha256", "size"}."""
        self._start_writeback(0)
        try:
            _sys("fsync", self.name, os.fsync, self.fd)
            fd, self.fd = self.fd, -1
            _sys("close", self.name, os.close, fd)
        except OSError as e:
            raise self.od.fail(self.name, "write failed", e) from None
        self.od.rename(self.tmp, self.name)
        if sync_dir:
            self.od.sync()
        sha = self.hash.result().hexdigest()
        self.hash.close()
        return {"sha256": sha, "size": self.size}

    def abort(self, keep: bool = False) -> None:
        """Close and remove the temporary file (kept when `keep`: a checkpointed shard to resume);
        errors here never hide the one being raised."""
        self.hash.close()
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if keep and self.checkpointed:
            return
        try:
            os.unlink(self.tmp, dir_fd=self.od.fd)
        except OSError:
            pass
