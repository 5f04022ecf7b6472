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
    """Base class of every error raised by zoblackbox.

    Catch it to handle all of the library's own failures in one place; the subclasses say which
    kind (docs/errors.md lists when each is raised).

    Examples
    --------
    >>> import numpy as np
    >>> from zoblackbox import ZOError, minimize
    >>> try:
    ...     minimize(lambda x: float(x @ x), np.zeros(2), budget=-5)
    ... except ZOError as err:
    ...     print(type(err).__name__)
    ConfigError
    """


class ConfigError(ZOError, ValueError):
    """A bad argument or configuration value (the message names the value).

    Raised where the value is given (a constructor, :func:`~zoblackbox.minimize`,
    :class:`~zoblackbox.AskTell`) and before any query is spent: out of range, non-finite, wrong
    shape, an unknown name, an inconsistent combination. Also a :class:`ValueError`.

    Examples
    --------
    >>> from zoblackbox import ConfigError, CoordinateEstimator
    >>> try:
    ...     CoordinateEstimator(mu=-1.0)
    ... except ConfigError as err:
    ...     print(err)
    mu must be a positive finite number, got -1.0
    >>> issubclass(ConfigError, ValueError)
    True
    """


class OracleError(ZOError):
    """An oracle query failed (exception, non-finite value or timeout) under the ``raise`` policy.

    The only error raised after queries were spent; those queries are counted.

    Parameters
    ----------
    message : str
        What failed.
    query_index : int or None, default None
        0-based index of the failing query in the oracle's lifetime count (kept as the attribute
        ``query_index``).
    value : object, default None
        The value the oracle returned (``None`` when it raised); attribute ``value``.
    kind : str, default ""
        ``"exception"``, ``"nonfinite"`` or ``"timeout"``; attribute ``kind``.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import FunctionOracle, OracleError
    >>> oracle = FunctionOracle(lambda x: float("nan"), dim=2)
    >>> try:
    ...     oracle(torch.zeros(2))
    ... except OracleError as err:
    ...     print(err.kind, err.query_index)
    nonfinite 0
    """

    def __init__(self, message: str, *, query_index: int | None = None, value: object = None, kind: str = ""):
        super().__init__(message)
        self.query_index = query_index
        self.value = value
        self.kind = kind


class BudgetExhaustedError(ZOError):
    """A query would exceed the oracle's own query budget; no query of the batch was spent.

    A budget given to :func:`~zoblackbox.minimize` or :class:`~zoblackbox.AskTell` does not raise
    it: the run stops with ``success=False``.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import BudgetExhaustedError, FunctionOracle
    >>> oracle = FunctionOracle(lambda x: float(x.sum()), dim=2, budget=2)
    >>> try:
    ...     oracle.evaluate(torch.zeros(3, 2))
    ... except BudgetExhaustedError:
    ...     print("refused; queries spent:", oracle.nfev)
    refused; queries spent: 0
    """


class CheckpointError(ZOError):
    """A checkpoint is missing, corrupt, of a foreign format, of another run, or unsafe to load.

    Raised by every ``load_state_dict`` (checked before anything changes), by
    ``minimize(checkpoint=...)`` and by ``zoblackbox.checkpoint.load_checkpoint``.

    Examples
    --------
    >>> import numpy as np
    >>> from zoblackbox import AskTell, CheckpointError
    >>> state = AskTell(np.zeros(2), budget=50).state_dict()
    >>> try:
    ...     AskTell(np.zeros(3), budget=50).load_state_dict(state)
    ... except CheckpointError:
    ...     print("a state of another problem")
    a state of another problem
    """


class MissingDependencyError(ZOError, ImportError):
    """An optional dependency is not installed; the message names the extra to install.

    Also an :class:`ImportError`.

    Examples
    --------
    >>> from zoblackbox import MissingDependencyError
    >>> err = MissingDependencyError("gymnasium is not installed: pip install 'zoblackbox[gym]'")
    >>> isinstance(err, ImportError)
    True
    """
