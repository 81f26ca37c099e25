"""Typed errors. The library raises these; only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class ShardquantError(Exception):
    """Base class: a clean, one-line, user-facing failure."""


class SourceError(ShardquantError):
    """The source checkpoint cannot be found, fetched or is not usable (e.g. pickle-only)."""


class HeaderError(ShardquantError):
    """A safetensors file or the index is malformed, truncated or inconsistent."""


class RuleError(ShardquantError):
    """A rules file is invalid, or the rules leave a quantizer group incomplete."""


class PlanError(ShardquantError):
    """The plan cannot be made (unsupported dtype, unclaimed tensor under --strict, ...)."""


class NumericError(ShardquantError):
    """A weight to be quantized holds NaN or Inf."""


class OutputError(ShardquantError):
    """The output directory cannot be written as asked (exists, is the source, ...)."""
