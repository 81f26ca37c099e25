"""The format registry: the one place a format is named. The CLI's --format choices come from it."""

from __future__ import annotations

from types import ModuleType

from . import fp8, nvfp4

FORMATS: dict[str, ModuleType] = {m.FORMAT.name: m for m in (nvfp4, fp8)}


def get(name: str) -> ModuleType:
    return FORMATS[name]


def declared(name: str):
    """The format's declaration (formats/base.py Format)."""
    return FORMATS[name].FORMAT


def default_flavor(name: str, flavors) -> str:
    """The first flavor (in registry order) that serves this format."""
    fmt = declared(name)
    return next(f for f in flavors if fmt.spelling(f) is not None)
