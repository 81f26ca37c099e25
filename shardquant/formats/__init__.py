"""The format registry: the one place a format is named. The CLI's --format choices come from it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

# name -> module of this package (its FORMAT declares that name: tests/test_startup.py
# test_the_registries_the_cli_reads_light_are_the_full_ones)
_MODULES = {"nvfp4": "nvfp4", "fp8": "fp8", "fp8-channel": "fp8_channel", "fp8-block": "fp8_block",
            "mxfp8": "mxfp8", "mxfp4": "mxfp4"}


class _Registry(Mapping):
    """name -> the format's module, imported when first asked for: the names alone (the CLI's choices,
    `shardquant --help`) import no module of a format and so not NumPy (shardquant/cli.py start-up)."""

    def __init__(self) -> None:
        self._loaded: dict[str, ModuleType] = {}  # asked for per group and per member: import_module once

    def __getitem__(self, name: str) -> ModuleType:
        mod = self._loaded.get(name)
        if mod is None:
            mod = self._loaded[name] = importlib.import_module(f".{_MODULES[name]}", __name__)
        return mod

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


FORMATS: Mapping[str, ModuleType] = _Registry()


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
