"""What a conversion starts before its heavy imports (numpy, the plan, cupy: most of a second): the
disk reading the first shard ahead, and for a GPU conversion cupy, the CUDA context and the kernels,
on daemon threads. This module imports only the standard library. The CLI (shardquant/cli.py convert)
calls it first; shardquant/convert.py convert() asks for the read-ahead too (skipped where the CLI
just asked) and starts the GPU itself, so the library API starts the same work a little later."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from . import trace

# Bytes the warm starts hint: what the disk can read while the GPU starts (0.9-1.2 s after the plan,
# at 1-2 GB/s; docs/benchmarks/README.md fourth session: the first pipeline read came 1.6-1.9 s after
# process start). Hints only: pages the kernel reads into its cache, nothing held by the process.
WARM_START_BYTES = 2 << 30
EARLY_WARM_START_BYTES = 1 << 30

_ahead: set[str] = set()  # sources the CLI hinted before its imports; convert() then does not again
_lock = threading.Lock()


def early_warm_start(src: str, nbytes: int = EARLY_WARM_START_BYTES, ahead: bool = False) -> None:
    """Before the headers are read and the plan made: a local source's first shard (by name, the
    order shardquant/source.py scan reads and the plan's first units come from) read ahead from its
    start, header included, so the disk works while Python plans. warm_start then names the exact
    ranges. `ahead`: asked by the CLI before its imports; the conversion's own call that follows is
    then skipped once."""
    root = Path(src).expanduser()
    if not hasattr(os, "posix_fadvise") or not root.is_dir():
        return
    key = str(root.resolve())
    with _lock:
        if ahead:
            _ahead.add(key)
        elif key in _ahead:
            _ahead.discard(key)
            return
    try:
        first = min((p for p in root.iterdir() if p.name.endswith(".safetensors")), default=None)
    except OSError:
        return
    if first is not None:
        hint([(first, 0, nbytes)], None, "early-warm-start")


def read_window(path: Path) -> int:
    """The most bytes one POSIX_FADV_WILLNEED call reads on the disk holding `path`. Linux reads at
    most the larger of the device's read-ahead window and its largest request per call
    (queue/read_ahead_kb, queue/max_sectors_kb) and drops the rest of a longer range without a word:
    a 2 GiB hint read 8 MiB (docs/benchmarks/README.md "the warm start read 8 MiB"). Where the device
    cannot be found (overlay and network filesystems, another system), 1 MiB."""
    try:
        dev = os.stat(path).st_dev
        base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        queue = base / "queue" if (base / "queue").is_dir() else base.resolve().parent / "queue"  # a partition's disk
        kb = max(int((queue / "read_ahead_kb").read_text()), int((queue / "max_sectors_kb").read_text()))
    except (OSError, ValueError):
        return 1 << 20
    return min(max(kb << 10, 128 << 10), 64 << 20)


def in_steps(ranges: list[tuple[Path, int, int]]):
    """Each range cut into pieces of at most its file's read_window, in order."""
    windows: dict[Path, int] = {}
    for path, off, n in ranges:
        w = windows.get(path) or windows.setdefault(path, read_window(path))
        yield from ((path, at, min(w, off + n - at)) for at in range(off, off + n, w))


def hint(ranges: list[tuple[Path, int, int]], hub, mark: str) -> None:
    """POSIX_FADV_WILLNEED over `ranges` on a daemon thread, each asked in steps of its disk's
    read_window; files of a hub source not yet downloaded whole are left alone. A hint is only a hint:
    a failure is ignored. Each call returns once its reads are queued: the thread keeps the disk's
    queue full until the last range is asked, and a write that must reach the disk meanwhile (an
    fsync) waits behind those reads: shardquant/convert.py claims the output before the bulk hint."""

    def work() -> None:
        trace.mark(mark)
        fds: dict[Path, int] = {}
        try:
            for path, off, n in in_steps(ranges):
                if path not in fds:
                    if hub is not None and (not path.is_file() or path.stat().st_size != hub.sizes.get(path.name)):
                        fds[path] = -1  # not downloaded yet
                    else:
                        fds[path] = os.open(path, os.O_RDONLY)
                if fds[path] >= 0:
                    os.posix_fadvise(fds[path], off, n, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            for fd in fds.values():
                if fd >= 0:
                    os.close(fd)
            trace.mark(f"{mark}-asked")  # the hint's system calls returned (they may wait for the disk)

    threading.Thread(target=work, name="shardquant-warm-start", daemon=True).start()


def gpu_start(device: str, devices: str | None = None) -> None:
    """For a conversion on the GPU (--device auto, cuda or cuda:N; --devices LIST or all): cupy
    imported, each named GPU's CUDA context created and its kernels loading (shardquant/cuda prestart),
    on a daemon thread, while the caller imports the rest. Whatever fails here is left for the
    backend (shardquant/backend.py get_backends) to meet and report."""
    if device == "cpu":
        return

    def work() -> None:
        try:
            from . import cuda

            if not cuda.available():
                return
            if devices:
                ids = range(cuda.device_count()) if devices == "all" else [int(x) for x in devices.split(",") if x.strip()]
            else:
                ids = [int(device.split(":", 1)[1]) if ":" in device else 0]
            for i in ids:
                if 0 <= i < cuda.device_count():
                    cuda.prestart(i)
            trace.mark("gpu-started")
        except Exception:  # the backend meets the same problem and says it
            pass

    threading.Thread(target=work, name="shardquant-gpu-start", daemon=True).start()
