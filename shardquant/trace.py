"""Milestones of one process, for the benchmarks (tools/bench.py start-up table): with
SHARDQUANT_TRACE=FILE set, each `mark(event)` appends one JSON line {"event", "t"} (wall-clock
seconds, comparable with the parent's clock) to FILE. Unset, `mark` costs one dictionary lookup."""

from __future__ import annotations

import json
import os
import time

_seen: set[str] = set()


def enabled() -> bool:
    return bool(os.environ.get("SHARDQUANT_TRACE"))


def mark(event: str, once: bool = True, **fields) -> None:
    """Append {"event", "t", "pid", **fields}; with `once`, only the first mark of each event."""
    path = os.environ.get("SHARDQUANT_TRACE")
    if not path or (once and event in _seen):
        return
    _seen.add(event)
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError:  # a benchmark aid: never a reason for a conversion to fail
        pass


def read(path) -> dict[str, dict]:
    """{event: its first record} of a trace file, in the order first seen (tools/bench.py)."""
    out: dict[str, dict] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                e = json.loads(line)
                out.setdefault(e["event"], e)
    except FileNotFoundError:
        pass
    return out
