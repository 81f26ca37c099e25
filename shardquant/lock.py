"""One writer per output directory: `.shardquant.lock`, held from start to end of a run.

How it is taken (shardquant/writer.py says why files are only ever created fresh):
- The lock is prepared under a temporary name: created with O_EXCL, `flock`ed (non-blocking), the
  holder written into it (host, pid, the process's start time, the boot id, the run's token), then
  hard-linked to `.shardquant.lock`. link(2) fails if the name exists, on local disks and on NFS alike.
- An existing lock is `flock`ed without blocking. Held: the run stops at once, naming the holder.
  Not held, and the holder it names is dead (same host: no such process, another start time or
  another boot; other host: no heartbeat for STALE_AFTER seconds), it is stale: a fresh lock is
  renamed over it while the old one is still locked, so two runs cannot both take it over.
- Where `flock` is not supported, the holder's record alone decides. Nothing blocks: every lock
  call is LOCK_NB, so a network file system without a lock daemon cannot hang the run.
- A heartbeat thread touches the lock every HEARTBEAT seconds, for runs on other hosts to see.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import threading
import time

from .errors import OutputError
from .writer import TMP_RE, TOKEN_RE, OutputDir, _sys, tmp_name

LOCK_NAME = ".shardquant.lock"
HEARTBEAT = 10.0
STALE_AFTER = 120.0
_MAX_LOCK_BYTES = 4096
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the name (field 3 on), or None where unknown (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    tail = _stat(pid)
    try:
        return int(tail[19]) if tail else None  # field 22 of the line
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()[:64]
    except OSError:
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return True
    tail = _stat(pid)
    if tail and tail[0] in (b"Z", b"X"):  # exited, not yet reaped (a container's init may never reap it)
        return False
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "boot": _boot_id(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _parse(raw: bytes) -> dict | None:
    """The holder named in a lock file: untrusted bytes, checked field by field."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    ok = (isinstance(d.get("host"), str) and len(d["host"]) <= 255
          and type(d.get("pid")) is int and 0 < d["pid"] < 2**31
          and (d.get("start") is None or type(d.get("start")) is int)
          and (d.get("boot") is None or isinstance(d.get("boot"), str))
          and isinstance(d.get("token"), str) and TOKEN_RE.fullmatch(d["token"]) is not None)
    return d if ok else None


def _who(d: dict | None) -> str:
    if d is None:
        return "an unknown process"
    since = d.get("since") if isinstance(d.get("since"), str) else "?"
    return f"process {d['pid']} on host {d['host']!r} (since {since[:32]})"


class Lock:
    """`with Lock(od) as lk:` holds the output's lock; `lk.previous_tokens` are the tokens of dead runs
    found in stale locks (their temporary files are this run's to remove)."""

    def __init__(self, od: OutputDir):
        self.od = od
        self.fd = -1
        self.previous_tokens: set[str] = set()  # runs that died holding (or taking) this lock
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.release(report=exc_type is None)

    def _fresh(self) -> tuple[int, str]:
        """A new lock file under a temporary name: created, flocked, holder written, fsynced."""
        od = self.od
        tmp = tmp_name(LOCK_NAME.lstrip("."), od.token)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW
        try:
            fd = _sys("open", tmp, os.open, tmp, flags, 0o644, dir_fd=od.fd)
        except OSError as e:
            raise od.fail(LOCK_NAME, "cannot create the lock", e, hint=False) from None
        try:
            _flock(fd)
            body = json.dumps({**_record(), "token": od.token}, sort_keys=True).encode()
            _sys("write", tmp, os.write, fd, body)
            _sys("fsync", tmp, os.fsync, fd)
        except OSError as e:
            os.close(fd)
            _unlink(od, tmp)
            raise od.fail(LOCK_NAME, "cannot write the lock", e, hint=False) from None
        return fd, tmp

    def acquire(self) -> None:
        od = self.od
        for _ in range(20):  # each retry follows a lock that changed under us; never a wait
            fd, tmp = self._fresh()
            try:
                _sys("link", LOCK_NAME, os.link, tmp, LOCK_NAME, src_dir_fd=od.fd, dst_dir_fd=od.fd,
                     follow_symlinks=False)
                _unlink(od, tmp)
                self.fd = fd
                break
            except FileExistsError:
                pass
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    os.close(fd)
                    _unlink(od, tmp)
                    raise od.fail(LOCK_NAME, "cannot create the lock", e, hint=False) from None
                # no hard links here (some FUSE and FAT file systems): take the name only if absent
                if od.lstat(LOCK_NAME) is None:
                    od.rename(tmp, LOCK_NAME)
                    self.fd = fd
                    break
            # the name exists: held, or stale
            try:
                if self._take_over(fd, tmp):
                    self.fd = fd
                    break
            except BaseException:
                os.close(fd)
                _unlink(od, tmp)
                raise
            os.close(fd)
            _unlink(od, tmp)
        else:
            raise OutputError(f"{od.path / LOCK_NAME}: the lock keeps changing; is another run starting?")
        self._dead_takers()
        self._beat = threading.Thread(target=self._heartbeat, name="shardquant-lock", daemon=True)
        self._beat.start()

    def _dead_takers(self) -> None:
        """Lock files a run prepared but never linked (it died in between): its token is in the
        name, and in the content once written. Unlocked ones are dead runs'; they are removed."""
        od = self.od
        for name in od.entries():
            m = TMP_RE.fullmatch(name)
            if not m or m["name"] != LOCK_NAME.lstrip(".") or m["token"] == od.token:
                continue
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=od.fd)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode) or _try_flock(fd) is not True:
                    continue  # a run taking the lock right now, or not a file of ours
                raw = os.read(fd, _MAX_LOCK_BYTES + 1)
                rec = _parse(raw) if raw else None
                if raw and (rec is None or rec["token"] != m["token"]):
                    continue
                self.previous_tokens.add(m["token"])
                od.remove(name)
            finally:
                os.close(fd)

    def _take_over(self, fd: int, tmp: str) -> bool:
        """The lock name exists. Refuse if held; replace it (True) if stale; False to retry."""
        od = self.od
        try:
            old = os.open(LOCK_NAME, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=od.fd)
        except FileNotFoundError:
            return False  # released meanwhile: try to create it again
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{od.path / LOCK_NAME}: is a symlink, not a shardquant lock; "
                                  "remove it to use this output directory") from None
            raise od.fail(LOCK_NAME, "cannot open the lock", e, hint=False) from None
        try:
            st = os.fstat(old)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{od.path / LOCK_NAME}: not a regular file, not a shardquant lock")
            raw = os.read(old, _MAX_LOCK_BYTES + 1)
            holder = _parse(raw) if len(raw) <= _MAX_LOCK_BYTES else None
            flock = _try_flock(old)
            if flock is False:
                raise OutputError(f"{od.path}: another shardquant run is writing here: {_who(holder)}; "
                                  "wait for it to finish, or stop it")
            now = od.lstat(LOCK_NAME)
            if now is None or now.st_ino != st.st_ino:
                return False  # replaced or released after we opened it
            if holder is not None and self._live(holder, st, flock):
                raise OutputError(f"{od.path}: another shardquant run is writing here: {_who(holder)}; "
                                  "wait for it to finish, or stop it")
            if holder is None and raw and time.time() - st.st_mtime < STALE_AFTER and flock is None:
                raise OutputError(f"{od.path / LOCK_NAME}: unreadable lock, written less than "
                                  f"{STALE_AFTER:.0f} s ago; wait, or remove it if no run uses this output")
            od.rename(tmp, LOCK_NAME)  # the stale lock is replaced while we still hold it
            od.sync()
            if holder:
                self.previous_tokens.add(holder["token"])
            return True
        finally:
            os.close(old)

    @staticmethod
    def _live(holder: dict, st: os.stat_result, flock: bool | None) -> bool:
        """Whether the recorded holder may still be running, although its flock is free (or flock
        is unsupported)."""
        if holder["host"] == socket.gethostname():
            if flock and holder["pid"] == os.getpid():
                return False  # left by an earlier run of this process: a live one would hold the flock
            same_boot = holder.get("boot") is None or _boot_id() is None or holder.get("boot") == _boot_id()
            return same_boot and _alive(holder["pid"], holder.get("start"))
        if flock:  # the flock is free and the file system enforces it across hosts (NFSv4, Lustre)
            return time.time() - st.st_mtime < STALE_AFTER  # ... unless it is a local-only lock
        return time.time() - st.st_mtime < STALE_AFTER

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.fd)
            except OSError:
                pass

    def release(self, report: bool = False) -> None:
        """Remove the lock (when it is still ours) and unlock. A failure is raised only with
        `report` (nothing else is failing): a lock left behind is stale once this process ends."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=1)
        if self.fd < 0:
            return
        od = self.od
        try:
            now = od.lstat(LOCK_NAME)
            if now is not None and now.st_ino == os.fstat(self.fd).st_ino:
                od.remove(LOCK_NAME)
                od.sync()
        except OutputError as e:
            if report:
                raise OutputError(f"{e}; the run itself completed, and the next run on this output "
                                  "removes the stale lock") from None
        finally:
            os.close(self.fd)
            self.fd = -1


def _flock(fd: int) -> None:
    if _try_flock(fd) is False:
        raise OSError(errno.EWOULDBLOCK, "lock held")


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by someone else; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return None
        raise


def _unlink(od: OutputDir, name: str) -> None:
    try:
        os.unlink(name, dir_fd=od.fd)
    except OSError:
        pass


def holder(od: OutputDir) -> dict | None:
    """The holder recorded in the directory's lock file, if any (for messages and tests)."""
    raw = od.read_bytes(LOCK_NAME, _MAX_LOCK_BYTES)
    return _parse(raw) if raw else None
