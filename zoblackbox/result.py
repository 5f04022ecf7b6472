"""The result type of :func:`zoblackbox.minimize`."""

from __future__ import annotations

from scipy.optimize import OptimizeResult

__all__ = ["ZOResult"]


def _printable(value):
    """Nested dicts with their empty dicts shown as ``{}`` (scipy's formatter fails on them)."""
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()} if value else "{}"
    return value


class ZOResult(OptimizeResult):
    """``scipy.optimize.OptimizeResult`` (a dict with attribute access) whose ``repr`` also works
    when a field holds an empty dict, as ``failures["by_kind"]`` of a run without failures does
    (scipy's own formatter raises ``ValueError`` there)."""

    def __repr__(self) -> str:
        return OptimizeResult.__repr__(OptimizeResult({k: _printable(v) for k, v in self.items()}))
