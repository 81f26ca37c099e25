"""Names from a checkpoint, made safe for a one-line message.

Tensor names, shard file names and the quantizer keys made from them are opaque strings taken from
headers and the index: they may hold newlines, terminal escapes, bidi overrides, unpaired surrogates
or megabytes of text. Every message that shows one goes through `show`, so it stays one line of
printable text of bounded length.
"""

from __future__ import annotations

LIMIT = 200  # characters of a name kept in a message (head and tail when longer)


def show(value: object, *, quote: bool = True, limit: int = LIMIT) -> str:
    """`value` for a message: repr-style (quoted, with every unprintable character escaped) and, when
    longer than `limit` characters, cut to its head and tail around '...'.

    With quote=False a name that is printable and short enough is shown as it is, bare; any other is
    shown quoted and escaped, so an escaped name is never mistaken for a plain one.
    """
    s = value if isinstance(value, str) else str(value)
    if not quote and len(s) <= limit and s.isprintable():
        return s
    if len(s) <= limit:
        return repr(s)
    half = max(limit // 2, 1)
    return f"{s[:half]!r}...{s[-half:]!r}"


def show_path(path: object, limit: int = 4 * LIMIT) -> str:
    """A file path for a message: as it is when printable, else quoted and escaped (see `show`)."""
    return show(str(path), quote=False, limit=limit)
