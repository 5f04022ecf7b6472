"""The one result type of every driver: :func:`zoblackbox.minimize`, :meth:`AskTell.result`."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import OptimizeResult

__all__ = ["ZOResult"]

_SUMMARY_ORDER = ("message", "success", "fun", "x", "nit", "nfev", "failures", "history", "wall_time")


def _short(value) -> str:
    """A one-line view of a field: arrays and long lists are summarized."""
    if isinstance(value, np.ndarray):
        if value.size <= 6:
            return np.array2string(value, precision=4, separator=", ")
        head = ", ".join(f"{v:.4g}" for v in value[:3].tolist())
        return f"array of {value.size} ({value.dtype}): [{head}, ...]"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list) and len(value) > 4:
        return f"list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _history_summary(history: list) -> str:
    if not history:
        return "0 records"
    first, last = history[0], history[-1]

    def f0(h):
        v = h.get("f0") if isinstance(h, dict) else None
        return "None" if v is None else _short(float(v))

    return (f"{len(history)} records (nit {first.get('nit')} -> {last.get('nit')}, "
            f"f0 {f0(first)} -> {f0(last)}, nfev {first.get('nfev')} -> {last.get('nfev')})")


class ZOResult(OptimizeResult):
    """The result of a run: a ``scipy.optimize.OptimizeResult`` with a short ``repr``.

    A dict with attribute access. Fields set by :func:`minimize` and :meth:`AskTell.result`:
    ``x`` (best point; numpy when ``x0`` was numpy), ``fun`` (its loss), ``nfev`` (queries spent,
    ``<= budget``), ``nit`` (iterations), ``success``, ``message``, ``history`` (one record per
    iteration), ``failures`` (failed queries by kind), ``wall_time`` (seconds) and, under the
    default strategy, ``strategy`` (what it chose and why). Its ``repr`` is a few lines: the history
    is summarized by its length and first and last values, long arrays by their size and first
    entries.

    Examples
    --------
    >>> import numpy as np
    >>> from zoblackbox import minimize
    >>> res = minimize(lambda x: float(x @ x), np.ones(3), budget=200)
    >>> res.nfev <= 200, round(res.fun, 6)
    (True, 0.0)
    >>> print(res)  # doctest: +ELLIPSIS
      message: ...
      success: True
          fun: ...
            x: [...]
    ...
    """


    def __repr__(self) -> str:
        keys = [k for k in _SUMMARY_ORDER if k in self] + [k for k in self if k not in _SUMMARY_ORDER]
        width = max((len(k) for k in keys), default=0)
        lines = []
        for k in keys:
            v = self[k]
            text = _history_summary(v) if k == "history" and isinstance(v, list) else _short(v)
            lines.append(f"{k:>{width}}: {text}")
        return "\n".join(lines)

    __str__ = __repr__
