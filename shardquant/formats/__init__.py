"""The format registry: the one place a format is named. The CLI's --format choices come from it."""

from __future__ import annotations

from types import ModuleType

from . import fp8, fp8_block, fp8_channel, mxfp4, mxfp8, nvfp4

FORMATS: dict[str, ModuleType] = {m.FORMAT.name: m for m in (nvfp4, fp8, fp8_channel, fp8_block, mxfp8, mxfp4)}


def get(name: str) -> ModuleType:
    return FORMATS[name]


def declared(name: str):
    """The format's declaration (formats/base.py Format)."""
    return FORMATS[name].FORMAT


def default_flavor(name: str, flavors) -> str:
    """The format's declared default flavor, else the first flavor (in registry order) that serves it."""
    fmt = declared(name)
    if fmt.default_flavor is not None:
        return fmt.default_flavor
    return next(f for f in flavors if fmt.spelling(f) is not None)
