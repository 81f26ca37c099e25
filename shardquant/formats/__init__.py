"""The format registry: the one place a format is named. The CLI's --format choices come from it."""

from __future__ import annotations

from types import ModuleType

from . import fp8, nvfp4

FORMATS: dict[str, ModuleType] = {"nvfp4": nvfp4, "fp8": fp8}


def get(name: str) -> ModuleType:
    return FORMATS[name]
