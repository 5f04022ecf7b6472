"""Exception hierarchy of zoblackbox.

Every error the library raises on purpose derives from :class:`ZOError`, so callers can catch the
package's failures in one place; input-validation errors are also ``ValueError``/``TypeError`` so
that generic code keeps working.
"""

from __future__ import annotations

__all__ = [
    "BudgetExhaustedError",
    "CheckpointError",
    "ConfigError",
    "MissingDependencyError",
    "OracleError",
    "ZOError",
]


class ZOError(Exception):
    """Base class of every error raised by zoblackbox."""


class ConfigError(ZOError, ValueError):
    """A bad argument or configuration value (the message names the value)."""


class OracleError(ZOError):
    """An oracle query failed (exception, non-finite value or timeout) under the ``raise`` policy.

    Attributes:
        query_index: 0-based index of the failing query in the oracle's lifetime count.
        value: the value the oracle returned (``None`` when it raised).
        kind: ``"exception"``, ``"nonfinite"`` or ``"timeout"``.
    """

    def __init__(self, message: str, *, query_index: int | None = None, value=None, kind: str = ""):
        super().__init__(message)
        self.query_index = query_index
        self.value = value
        self.kind = kind


class BudgetExhaustedError(ZOError):
    """A query would exceed the oracle's query budget; no query of the batch was spent."""


class CheckpointError(ZOError):
    """A checkpoint is missing, corrupt, of a foreign format, or unsafe to load."""


class MissingDependencyError(ZOError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
