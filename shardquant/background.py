"""One function run on a daemon thread, its result or exception kept in a Future: how the GPU is
started while other work goes on (shardquant/convert.py, shardquant/verify.py, shardquant/cuda)."""

from __future__ import annotations

import threading
from concurrent.futures import Future


def in_background(fn, name: str = "shardquant-start") -> Future:
    """fn() on a daemon thread; its result, or its exception, from the returned future (raised
    where the result is asked for)."""
    fut: Future = Future()

    def work() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to whoever asks for the result
            fut.set_exception(e)

    threading.Thread(target=work, name=name, daemon=True).start()
    return fut
