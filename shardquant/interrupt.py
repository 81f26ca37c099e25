"""Ctrl-C at any moment of a command: one line on stderr saying what was kept, exit status 130, no
traceback, and the process gone within a second (README "Messages, --quiet and Ctrl-C").

Only the command line takes SIGINT over (`install`, called by shardquant/__main__.py and at the top
of shardquant/cli.py before its heavy imports); a program that calls `convert()` keeps its own
handling. Outside `guarded()` (imports, option parsing, printing) nothing is being written and SIGINT
ends the process at once. Inside it (planning, converting, verifying) SIGINT raises
KeyboardInterrupt in the main thread, so the conversion unwinds: shardquant/pipeline.py `run` stops
its reader, device and writer threads and keeps the unfinished shard's temporary only when the
journal has a checkpoint of it, and the lock is released (shardquant/lock.py). Should that take longer than GRACE seconds (a thread in a long
system call), a watchdog ends the process anyway: a run killed at any instant resumes
(README "Output safety, resume and provenance")."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn

EXIT_STATUS = 130  # 128 + SIGINT: what a shell reports for a process that Ctrl-C ended
GRACE = 0.5  # seconds the main thread has to unwind before the watchdog ends the process
NOTHING_WRITTEN = "interrupted; nothing was written"

_describe: Callable[[], str] | None = None
_exiting = threading.Lock()
_installed = False
_guarded = 0
_fired = False
_leaving = False  # exit_interrupted has begun: a further Ctrl-C changes nothing


def is_command() -> bool:
    """True in the `shardquant` console script (sys.argv[0] is the script while it imports the CLI)."""
    name = os.path.basename(sys.argv[0]) if getattr(sys, "argv", None) else ""
    return name in ("shardquant", "shardquant.exe", "shardquant-script.py")


def install() -> None:
    """Take SIGINT over for the rest of this process (the command line only)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _on_sigint)
    _installed = True


def installed() -> bool:
    return _installed


def describe(fn: Callable[[], str] | None) -> None:
    """What the one line says if Ctrl-C comes now: fn() is called then (it may look at the output)."""
    global _describe
    _describe = fn


@contextmanager
def guarded() -> Iterator[None]:
    """While the command's work runs: SIGINT raises KeyboardInterrupt here so the work unwinds; the
    caller catches it and calls exit_interrupted()."""
    global _guarded
    _guarded += 1
    try:
        yield
    finally:
        _guarded -= 1


def line() -> str:
    try:
        return _describe() if _describe is not None else NOTHING_WRITTEN
    except BaseException:  # the line must come whatever the state of the output
        return "interrupted"


def exit_interrupted() -> NoReturn:
    """Print the one line and end the process with status 130. With SIGINT taken over, without
    waiting for worker threads (a read, a quantize or an fsync in flight); else by SystemExit."""
    global _leaving
    if not _installed:
        sys.stderr.write(line() + "\n")
        sys.exit(EXIT_STATUS)
    _leaving = True
    _exiting.acquire()  # one thread prints; another arriving here waits for the end
    try:
        text = line()
        # what the command printed so far; not from the watchdog, which a stuck writer must not hold up
        for f in (sys.stdout, sys.stderr) if threading.current_thread() is threading.main_thread() else ():
            try:
                f.flush()
            except BaseException:
                pass
        os.write(2, (text + "\n").encode("utf-8", "backslashreplace"))
    finally:
        os._exit(EXIT_STATUS)


def _on_sigint(_signum, _frame) -> None:
    global _fired
    if _leaving:  # the line is being printed: a second Ctrl-C must not print another or deadlock
        return
    if _guarded and not _fired:
        _fired = True
        watchdog = threading.Timer(GRACE, exit_interrupted)
        watchdog.daemon = True
        watchdog.start()
        raise KeyboardInterrupt
    exit_interrupted()
