"""Every-call fault sweep of one small conversion (tests/test_output_safety.py runs a sample).

For N = 1 .. the number of system calls a conversion makes on its output (shardquant/writer.py FAULT):
  --mode fail: the N-th call fails with ENOSPC, EFBIG, EIO or EROFS (in turn); the conversion must end
               in one OutputError line naming the output, and a re-run without --force must give
               exactly the bytes of an uninterrupted run.
  --mode kill: the process is SIGKILLed just before the N-th call; the same re-run check.
Prints one line per failure and a summary; exits 1 if any N broke a guarantee.

    python tools/fault_sweep.py --mode fail
    python tools/fault_sweep.py --mode kill --every 3
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import shardquant.convert as conv
import shardquant.writer as writer
from shardquant.errors import OutputError
from shardquant.testing import qwen3_moe, write_checkpoint

SHARD = 40_000
ERRNOS = [errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EROFS]
KILLER = r"""
import os, signal, sys
import shardquant.convert as conv
import shardquant.writer as writer
n, seen = int(sys.argv[3]), [0]
def fault(op, name):
    seen[0] += 1
    if seen[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
writer.FAULT = fault
conv.convert(sys.argv[1], sys.argv[2], "nvfp4", device="cpu", max_shard_size=int(sys.argv[4]))
"""


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def convert(src: Path, out: Path) -> None:
    conv.convert(str(src), out, "nvfp4", device="cpu", max_shard_size=SHARD)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["fail", "kill"], default="fail")
    ap.add_argument("--every", type=int, default=1, help="test every k-th call only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shardquant-sweep-"))
    try:
        src = write_checkpoint(work / "src", qwen3_moe(hidden=64, layers=2, experts=4, inter=32), shard_bytes=60_000)
        clean = work / "clean"
        calls: list[tuple[str, str]] = []
        writer.FAULT = lambda op, name: calls.append((op, name))
        convert(src, clean)
        writer.FAULT = None
        want = files(clean)
        bad = 0
        for n in range(1, len(calls) + 1, args.every):
            out = work / f"o{n}"
            if args.mode == "fail":
                err = ERRNOS[n % len(ERRNOS)]
                seen = [0]

                def fault(op, name, n=n, err=err):
                    seen[0] += 1
                    if seen[0] == n:
                        raise OSError(err, os.strerror(err))

                writer.FAULT = fault
                try:
                    convert(src, out)
                    problem = "no error raised"
                except OutputError as e:
                    msg = str(e)
                    problem = None if ("\n" not in msg and os.strerror(err) in msg and str(out) in msg) else f"message: {msg}"
                except BaseException as e:  # the guarantee under test: nothing else escapes
                    problem = f"escaped {type(e).__name__}: {e}"
                finally:
                    writer.FAULT = None
            else:
                p = subprocess.run([sys.executable, "-c", KILLER, str(src), str(out), str(n), str(SHARD)],
                                   capture_output=True)
                problem = None if p.returncode == -signal.SIGKILL else f"exit {p.returncode}: {p.stderr[-300:]!r}"
            try:
                convert(src, out)
                if files(out) != want:
                    problem = (problem or "") + " resumed output differs"
            except BaseException as e:
                problem = (problem or "") + f" resume failed: {e}"
            if problem:
                bad += 1
                print(f"call {n} {calls[n - 1]}: {problem}")
            shutil.rmtree(out, ignore_errors=True)
        tested = len(range(1, len(calls) + 1, args.every))
        print(f"{args.mode}: {tested} of {len(calls)} calls tested, {bad} broke a guarantee")
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
