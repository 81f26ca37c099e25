"""`python -m shardquant`: the command line, with Ctrl-C handled from its first instant (the imports
take most of a second; shardquant/interrupt.py)."""

import _signal  # the C module: `signal` would import enum first, a window in which Ctrl-C is a traceback
import os

# the first instant: before even shardquant/interrupt.py is imported, nothing has been written
_signal.signal(_signal.SIGINT, lambda *_: (os.write(2, b"interrupted; nothing was written\n"), os._exit(130)))

from . import interrupt  # noqa: E402

interrupt.install()

from .cli import main  # noqa: E402  (after the handler is installed)

main(prog_name="shardquant")
