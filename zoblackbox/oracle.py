"""The oracle: an opaque function of a flat parameter vector, queried and counted.

An oracle maps a 1-D parameter vector ``x`` (length :attr:`Oracle.dim`) to a scalar loss. The
library never differentiates it; it only *queries* it, one point (:meth:`Oracle.__call__`) or a
batch of ``K`` points (:meth:`Oracle.evaluate`). Every query is counted in :attr:`Oracle.nfev`,
budgets are exact (a batch that would overrun the budget is refused before anything runs), and
failed queries (exceptions, non-finite values, timeouts) are handled by a :class:`FailurePolicy`
and recorded in :attr:`Oracle.failures`.

Subclasses implement one of two hooks:

* :meth:`Oracle._evaluate_one` -- one point at a time (the default batch loop isolates failures
  per query), or
* :meth:`Oracle._evaluate_batch` -- a vectorized batch of points (a batch that raises marks all of
  its queries as failed).

Schedulers (``zoblackbox.schedule``) evaluate a :class:`~zoblackbox.plan.QueryPlan` through
:meth:`Oracle.reserve`, :meth:`Oracle.raw_evaluate` and :meth:`Oracle.record`, so the counting and
the failure policy are the same whichever scheduler runs the queries.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._types import BatchLike

if TYPE_CHECKING:
    from .plan import QueryPlan
from .errors import BudgetExhaustedError, ConfigError, OracleError

__all__ = [
    "BudgetView",
    "FailurePolicy",
    "FunctionOracle",
    "Oracle",
    "QueryFailure",
    "RawResult",
    "as_vector",
]

_ACTIONS = ("raise", "inf", "skip")


@dataclass(frozen=True)
class FailurePolicy:
    """What to do with a failed query (it raised, returned NaN/inf, or timed out).

    The string shortcuts accepted wherever a policy is expected (``on_failure=``) are ``"raise"``,
    ``"inf"``, ``"skip"`` and ``"retry"`` (= ``FailurePolicy("skip", retries=3)``).

    Parameters
    ----------
    action : {"raise", "inf", "skip"}, default "raise"
        ``"raise"`` stops with :class:`OracleError` naming the query index and the bad value;
        ``"inf"`` reports the query's loss as ``+inf``; ``"skip"`` reports it as ``nan``.
        Estimators leave non-finite losses out of their finite differences, so ``inf`` and
        ``skip`` keep a run going.
    retries : int, default 0
        How many times a failed query is re-evaluated (each attempt is a counted query, within the
        budget) before ``action`` applies; an int ``>= 0``.

    Raises
    ------
    ConfigError
        An unknown ``action``, or ``retries`` not an int ``>= 0``.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import FailurePolicy, FunctionOracle
    >>> FailurePolicy.coerce("retry")
    FailurePolicy(action='skip', retries=3)
    >>> oracle = FunctionOracle(lambda x: float("nan") if x[0] > 0 else 1.0, dim=1,
    ...                         on_failure=FailurePolicy("inf"))
    >>> oracle.evaluate(torch.tensor([[-1.0], [1.0]]))
    tensor([1., inf], dtype=torch.float64)
    >>> oracle.failures[0].kind
    'nonfinite'
    """

    action: str = "raise"
    retries: int = 0

    def __post_init__(self):
        if self.action not in _ACTIONS:
            raise ConfigError(f"unknown failure action {self.action!r}; expected one of {_ACTIONS}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigError(f"retries must be a non-negative int, got {self.retries!r}")

    @classmethod
    def coerce(cls, spec: FailurePolicy | str) -> FailurePolicy:
        """A policy from a policy (returned as is) or a string shortcut; ``ConfigError`` otherwise."""
        if isinstance(spec, FailurePolicy):
            return spec
        if spec == "retry":
            return cls("skip", retries=3)
        if isinstance(spec, str) and spec in _ACTIONS:
            return cls(spec)
        raise ConfigError(
            f"unknown failure policy {spec!r}; expected a FailurePolicy or one of "
            f"{_ACTIONS + ('retry',)}"
        )


@dataclass
class QueryFailure:
    """The record of one failed query (kept in the oracle's ``failures`` list).

    A dataclass; the parameters are its fields.

    Parameters
    ----------
    index : int
        0-based index of the query in the oracle's lifetime count.
    kind : {"exception", "nonfinite", "timeout"}
        How it failed.
    message : str
        The exception's message, or a description of the bad value.
    value : float or None, default None
        The value returned (``None`` when the query raised).
    attempts : int, default 1
        Evaluations made, retries included.
    resolved : bool, default False
        Whether a retry produced a finite value.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import FunctionOracle
    >>> def flaky(x):
    ...     raise RuntimeError("simulator crashed")
    >>> oracle = FunctionOracle(flaky, dim=2, on_failure="skip")
    >>> oracle.evaluate(torch.zeros(1, 2))
    tensor([nan], dtype=torch.float64)
    >>> failure = oracle.failures[0]
    >>> failure.index, failure.kind, failure.message
    (0, 'exception', 'query #0 raised RuntimeError: simulator crashed')
    """

    index: int
    kind: str  # "exception" | "nonfinite" | "timeout"
    message: str
    value: float | None = None
    attempts: int = 1
    resolved: bool = False  # a retry produced a finite value

    def as_dict(self) -> dict:
        """The record as a JSON-able dict."""
        return {
            "index": self.index,
            "kind": self.kind,
            "message": self.message,
            "value": self.value,
            "attempts": self.attempts,
            "resolved": self.resolved,
        }


@dataclass
class RawResult:
    """Losses of a batch before the failure policy: ``values[i]`` is meaningless where
    ``errors`` has an entry for ``i``."""

    values: torch.Tensor  # float64, shape (K,)
    errors: dict[int, BaseException] = field(default_factory=dict)


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 60, 60, 8, 8, 8


def _plan_rows(plan, start: int, device, dtype) -> Callable[[int], torch.Tensor]:
    """Point ``start + i`` of ``plan`` for a chunk's row ``i`` (on ``device`` in ``dtype``)."""
    def point(i: int) -> torch.Tensor:
        return plan.point(start + i).to(device, dtype)

    return point


def short_repr(value) -> str:
    """``repr(value)``, shortened for large containers (error messages name the bad value)."""
    return _REPR.repr(value)


def _real_tensor(x, what: str) -> torch.Tensor:
    """``x`` as a tensor of real numbers (ints or floats); TypeError naming the value otherwise."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{what} of numbers, got {type(x).__name__}: {short_repr(x)}")
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise TypeError(f"{what} of numbers, got {type(x).__name__}: {short_repr(x)} ({exc})") from exc
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        scalar = "" if isinstance(x, (torch.Tensor, np.ndarray)) else f": {short_repr(x)}"
        raise TypeError(f"{what} of real numbers, got dtype {t.dtype}{scalar}")
    return t


def as_vector(x, *, dim: int | None = None, dtype=None, device=None, name: str = "x") -> torch.Tensor:
    """Convert ``x`` (tensor, numpy array or sequence) to a detached 1-D tensor, checking it."""
    t = _real_tensor(x, f"{name} must be a 1-D array")
    if t.dim() != 1:
        scalar = f": {short_repr(x)}" if t.dim() == 0 else ""
        raise ConfigError(f"{name} must be 1-D, got shape {tuple(t.shape)}{scalar}")
    if dim is not None and t.shape[0] != dim:
        raise ConfigError(f"{name} has length {t.shape[0]}, expected the oracle's dim {dim}")
    t = t.detach()
    if dtype is not None or not t.is_floating_point():
        target = dtype or torch.get_default_dtype()
        converted = t.to(dtype=target)
        check_overflow(t, converted, name)
        t = converted
    if device is not None:
        t = t.to(device)
    return t


def check_overflow(source: torch.Tensor, converted: torch.Tensor, name: str) -> None:
    """ConfigError when a conversion to a narrower dtype turned finite entries of ``source`` into
    inf (``1e300`` in float32): say so, with the values as given, instead of reporting them as
    non-finite later."""
    if source.dtype == converted.dtype:
        return
    lost = torch.isfinite(source) & ~torch.isfinite(converted)
    if bool(lost.any()):  # source is 1-D here (as_vector and the engine's start check the shape first)
        idx = lost.reshape(-1).nonzero().flatten()[:5]
        values = source.reshape(-1)[idx].tolist()
        raise ConfigError(f"{name} overflows {str(converted.dtype).replace('torch.', '')} (largest "
                          f"{torch.finfo(converted.dtype).max:.3g}): entries at indices {idx.tolist()} are "
                          f"{values}; pass values in range or use a wider dtype")


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class Oracle:
    """Base class of every oracle: counted, budgeted queries with a failure policy.

    An oracle is an opaque function of a flat parameter vector that is only ever queried.
    Subclasses implement ``_evaluate_one(x) -> float`` or the vectorized
    ``_evaluate_batch(X) -> Tensor[K]``; callers use ``oracle(x)``, :meth:`evaluate` and
    :meth:`evaluate_plan`, which count every query in ``nfev`` and apply the failure policy
    (failed queries are recorded in ``failures``).

    Parameters
    ----------
    dim : int
        Length of the parameter vector, ``>= 1``.
    budget : int or None, default None
        Maximum number of queries over the oracle's lifetime, ``>= 0`` (``None``: unlimited).
    on_failure : FailurePolicy or {"raise", "inf", "skip", "retry"}, default "raise"
        What a failed query does.
    dtype : torch.dtype or None, default None
        Floating dtype of the points handed to the hooks (default: torch's default dtype).
    device : str or torch.device or None, default None
        Device of those points (default: CPU).

    Raises
    ------
    ConfigError
        ``dim`` not an int ``>= 1``, ``budget`` not an int ``>= 0``, an unknown failure policy, a
        non-floating ``dtype`` or a device torch cannot parse.

    See Also
    --------
    FunctionOracle : any Python callable as an oracle.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import Oracle
    >>> class Sphere(Oracle):
    ...     def _evaluate_batch(self, X):
    ...         return (X.double() ** 2).sum(dim=1)
    >>> oracle = Sphere(3, budget=10)
    >>> oracle.evaluate(torch.ones(4, 3))
    tensor([3., 3., 3., 3.], dtype=torch.float64)
    >>> oracle.nfev, oracle.remaining
    (4, 6)
    """

    def __init__(
        self,
        dim: int,
        *,
        budget: int | None = None,
        on_failure: FailurePolicy | str = "raise",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ConfigError(f"dim must be a positive int, got {dim!r}")
        if budget is not None and (not isinstance(budget, (int, np.integer)) or isinstance(budget, bool)
                                   or budget < 0):
            raise ConfigError(f"budget must be a non-negative int or None, got {budget!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        self._dim = int(dim)
        self.budget = None if budget is None else int(budget)
        self.policy = FailurePolicy.coerce(on_failure)
        self.dtype = dtype or torch.get_default_dtype()
        self.device = _check_device(device)
        self.nfev = 0
        self.failures: list[QueryFailure] = []

    # ------------------------------------------------------------------ protocol
    @property
    def dim(self) -> int:
        """Length of the parameter vector."""
        return self._dim

    @property
    def remaining(self) -> float:
        """Queries left in the budget (``math.inf`` when unlimited)."""
        return math.inf if self.budget is None else self.budget - self.nfev

    def __call__(self, x) -> float:
        """Loss at one point ``x`` (counted as one query)."""
        x = as_vector(x, dim=self.dim, dtype=self.dtype, device=self.device)
        return float(self.evaluate(x[None])[0])

    def evaluate(self, X: BatchLike) -> torch.Tensor:
        """Losses at the ``K`` rows of ``X`` (shape ``(K, dim)``) as a float64 tensor of length K."""
        X = self._check_batch(X)
        self.reserve(X.shape[0])
        raw = self.raw_evaluate(X)
        return self.record(raw, lambda i: X[i])

    def evaluate_plan(self, plan: QueryPlan, chunk_size: int | None = None) -> torch.Tensor:
        """Losses of every query of a :class:`~zoblackbox.plan.QueryPlan`, in plan order.

        The whole plan is reserved against the budget before the first query; points are
        materialized ``chunk_size`` rows at a time (default ``chunk_size``).
        """
        n = len(plan)
        self.reserve(n)
        size = int(chunk_size or self.chunk_size)
        if size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size!r}")
        out = torch.empty(n, dtype=torch.float64)
        for start, stop, X in plan.chunks(size):
            X = X.to(device=self.device, dtype=self.dtype)
            raw = self.raw_evaluate(X)
            out[start:stop] = self.record(raw, _plan_rows(plan, start, self.device, self.dtype))
        return out

    #: rows materialized at once by :meth:`evaluate_plan`
    chunk_size: int = 256
    #: queries reserved by :meth:`reserve` that :meth:`record` has not counted yet
    _outstanding: int = 0

    # ------------------------------------------------------------------ hooks
    def _evaluate_one(self, x: torch.Tensor) -> float:
        """Loss at one point; override this or :meth:`_evaluate_batch`."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _evaluate_one nor _evaluate_batch")

    def _evaluate_batch(self, X: torch.Tensor) -> torch.Tensor:
        """Losses at the rows of ``X``; override for vectorized evaluation."""
        return torch.tensor([float(self._evaluate_one(x)) for x in X], dtype=torch.float64)

    # ------------------------------------------------------------------ scheduler API
    def reserve(self, n: int) -> None:
        """Refuse (before anything runs) a batch of ``n`` queries that would overrun the budget.

        The ``n`` queries stay reserved until :meth:`~zoblackbox.Oracle.record` has counted them: retries of failed
        queries never spend budget that the rest of the batch needs.
        """
        if self.budget is not None and self.nfev + n > self.budget:
            raise BudgetExhaustedError(
                f"a batch of {n} queries would exceed the budget of {self.budget} "
                f"({self.nfev} already spent, {self.budget - self.nfev} left)"
            )
        self._outstanding = n

    def raw_evaluate(self, X: torch.Tensor) -> RawResult:
        """Evaluate without counting or failure policy (schedulers call this, then :meth:`~zoblackbox.Oracle.record`).

        With a per-point oracle, exceptions are isolated per query; a vectorized batch that raises
        marks every query of the batch as failed with that exception. A batch that raises
        :class:`OracleError` (e.g. the wrong number of losses) stops the step; it ran, so it is
        counted in ``nfev`` first.
        """
        with torch.no_grad():
            if type(self)._evaluate_batch is Oracle._evaluate_batch:
                values = torch.empty(X.shape[0], dtype=torch.float64)
                errors: dict[int, BaseException] = {}
                for i in range(X.shape[0]):
                    try:
                        values[i] = _to_float(self._evaluate_one(X[i]))
                    except Exception as exc:  # noqa: BLE001 - every failure goes to the policy
                        values[i] = math.nan
                        errors[i] = exc
                return RawResult(values, errors)
            try:
                out = self._evaluate_batch(X)
                values = torch.as_tensor(out).detach().to("cpu", torch.float64).reshape(-1)
                if values.shape[0] != X.shape[0]:
                    raise OracleError(
                        f"{type(self).__name__}._evaluate_batch returned {values.shape[0]} values "
                        f"for a batch of {X.shape[0]} points"
                    )
                return RawResult(values, {})
            except OracleError:
                self.nfev += X.shape[0]  # the batch was evaluated: count it, then stop the step
                raise
            except Exception as exc:  # noqa: BLE001
                nan = torch.full((X.shape[0],), math.nan, dtype=torch.float64)
                return RawResult(nan, {i: exc for i in range(X.shape[0])})

    def record(self, raw: RawResult, point: Callable[[int], torch.Tensor],
               evaluate: Callable[[torch.Tensor], RawResult] | None = None) -> torch.Tensor:
        """Count the batch's queries and apply the failure policy; returns the final losses.

        ``point(i)`` rebuilds the i-th query point (used for retries only); ``evaluate(X)`` runs a
        retry (default :meth:`raw_evaluate` in this process; sharding schedulers pass one that runs
        in a worker under the per-query timeout).
        """
        values = raw.values.clone()
        first = self.nfev
        self.nfev += values.shape[0]
        self._outstanding = max(0, self._outstanding - values.shape[0])
        nonfinite = (~torch.isfinite(values)).nonzero().flatten().tolist()
        bad = sorted(set(raw.errors) | set(nonfinite))
        for i in bad:
            values[i] = self._settle(first + i, i, float(values[i]), raw.errors.get(i), point,
                                     evaluate or self.raw_evaluate)
        return values

    # ------------------------------------------------------------------ failures
    def _settle(self, index: int, i: int, value: float, exc: BaseException | None, point, evaluate) -> float:
        failure = _describe(index, value, exc)
        # a retry may only spend budget that no reserved query of the batch still needs
        while failure.attempts <= self.policy.retries and self.remaining - self._outstanding >= 1:
            retry = evaluate(point(i)[None])
            self.nfev += 1
            failure.attempts += 1
            v = float(retry.values[0])
            if 0 not in retry.errors and math.isfinite(v):
                failure.resolved = True
                self.failures.append(failure)
                return v
        self.failures.append(failure)
        if self.policy.action == "raise":
            raise OracleError(
                failure.message + _retry_note(failure), query_index=index, value=failure.value, kind=failure.kind
            ) from exc
        return math.inf if self.policy.action == "inf" else math.nan

    def failure_report(self) -> dict:
        """Counts of failed queries by kind, and how many a retry resolved."""
        by_kind: dict[str, int] = {}
        resolved = 0
        for f in self.failures:
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
            resolved += int(f.resolved)
        return {"failed_queries": len(self.failures), "resolved_by_retry": resolved, "by_kind": by_kind}

    # ------------------------------------------------------------------ helpers
    def _check_batch(self, X) -> torch.Tensor:
        t = _real_tensor(X, f"X must be a 2-D array of shape (K, {self.dim})")
        if t.dim() != 2 or t.shape[1] != self.dim:
            raise ConfigError(f"X must have shape (K, {self.dim}), got {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ConfigError(f"X must hold at least one point, got an empty batch of shape {tuple(t.shape)}")
        return t.detach().to(device=self.device, dtype=self.dtype)

    def state_dict(self) -> dict:
        """Counters to checkpoint (the oracle's function itself is not saved)."""
        return {"nfev": self.nfev, "failures": [f.as_dict() for f in self.failures]}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_outstanding", None)  # bookkeeping of the batch in progress, not part of the oracle
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Load :meth:`state_dict`: every field is checked (:meth:`check_state_dict`) before anything
        changes; a failure is a :class:`~zoblackbox.errors.CheckpointError` naming the field."""
        nfev, failures = self.check_state_dict(state)
        self.nfev = nfev
        self._outstanding = 0
        self.failures = failures

    def check_state_dict(self, state: Mapping) -> tuple[int, list[QueryFailure]]:
        """``(nfev, failures)`` of a :meth:`state_dict` after checking it against what this oracle could
        have written: ``nfev`` an int >= 0 within the budget, ``failures`` a list of dicts with exactly
        the :class:`QueryFailure` fields and types, indices below ``nfev``. Changes nothing."""
        from .checkpoint import check_int, field_error, field_of  # checkpoint.py imports no oracle

        if not isinstance(state, Mapping):
            raise field_error("oracle", state, "a dict")
        state = dict(state)
        budget = self.budget
        nfev = check_int(field_of(state, "nfev", "oracle.nfev"), "oracle.nfev", 0, budget,
                         "the oracle's budget" if budget is not None else "")
        raw = field_of(state, "failures", "oracle.failures")
        if not isinstance(raw, list):
            raise field_error("oracle.failures", raw, "a list of failure records")
        failures = []
        for i, record in enumerate(raw):
            failures.append(self._checked_failure(record, f"oracle.failures[{i}]", nfev))
        return nfev, failures

    _FAILURE_FIELDS = ("index", "kind", "message", "value", "attempts", "resolved")

    @staticmethod
    def _checked_failure(record, field: str, nfev: int) -> QueryFailure:
        """A :class:`QueryFailure` from its ``as_dict`` record, every field checked (``Oracle.check_state_dict``)."""
        from .checkpoint import check_int, field_error
        from .errors import CheckpointError

        if not isinstance(record, dict):
            raise field_error(field, record, f"a dict with the fields {', '.join(Oracle._FAILURE_FIELDS)}")
        missing = [k for k in Oracle._FAILURE_FIELDS if k not in record]
        extra = sorted(map(str, set(record) - set(Oracle._FAILURE_FIELDS)))
        if missing or extra:
            raise CheckpointError(f"field {field} has {'no ' + ', '.join(missing) if missing else ''}"
                                  f"{' and ' if missing and extra else ''}"
                                  f"{'unknown fields ' + ', '.join(extra) if extra else ''}; a failure record has "
                                  f"exactly {', '.join(Oracle._FAILURE_FIELDS)}")
        index = check_int(record["index"], f"{field}.index", 0, max(nfev - 1, 0), "a query the oracle counted")
        if nfev == 0:
            raise field_error(f"{field}.index", index, "the index of a counted query (oracle.nfev is 0)")
        kind = record["kind"]
        if not isinstance(kind, str) or kind not in ("exception", "nonfinite", "timeout"):
            raise field_error(f"{field}.kind", kind, "'exception', 'nonfinite' or 'timeout'")
        if not isinstance(record["message"], str):
            raise field_error(f"{field}.message", record["message"], "a str")
        value = record["value"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise field_error(f"{field}.value", value, "a float or None")
        attempts = check_int(record["attempts"], f"{field}.attempts", 1)
        if not isinstance(record["resolved"], bool):
            raise field_error(f"{field}.resolved", record["resolved"], "a bool")
        return QueryFailure(index, kind, record["message"], None if value is None else float(value), attempts,
                            record["resolved"])

    def __repr__(self) -> str:
        budget = "" if self.budget is None else f", budget={self.budget}"
        return f"{type(self).__name__}(dim={self.dim}, nfev={self.nfev}{budget})"


class BudgetView(Oracle):
    """A counting view of ``oracle`` that refuses queries past ``limit`` more of them.

    Queries are evaluated by the wrapped oracle (its ``raw_evaluate``, so its own evaluation, pool
    or vectorized path is used) and counted in *its* ``nfev`` and ``failures``, under its failure
    policy; the view only adds a limit of its own on top of the oracle's budget. The wrapped oracle's
    ``budget`` is never changed. Other attributes (``layout``, ``model``, ``set_batch``...) are the
    wrapped oracle's, so schedulers see through the view (:attr:`unwrapped`).
    """

    def __init__(self, oracle: Oracle, limit: int | None = None):
        object.__setattr__(self, "unwrapped", oracle)
        self._start = oracle.nfev
        self.limit = limit
        self._outstanding = 0

    # counting goes to the wrapped oracle
    @property
    def nfev(self) -> int:
        return self.unwrapped.nfev

    @nfev.setter
    def nfev(self, value: int) -> None:
        self.unwrapped.nfev = value

    @property
    def failures(self):
        return self.unwrapped.failures

    # the view's settings are the wrapped oracle's, read-only (a base-class attribute there)
    @property
    def policy(self) -> FailurePolicy:  # type: ignore[override]
        return self.unwrapped.policy

    @property
    def dim(self) -> int:
        return self.unwrapped.dim

    @property
    def dtype(self):
        return self.unwrapped.dtype

    @property
    def device(self):
        return self.unwrapped.device

    @property
    def chunk_size(self) -> int:  # type: ignore[override]
        return self.unwrapped.chunk_size

    @property
    def budget(self) -> int | None:  # type: ignore[override]
        """The tighter of the wrapped oracle's budget and the view's limit (absolute, in ``nfev``)."""
        own = self.unwrapped.budget
        if self.limit is None:
            return own
        mine = self._start + self.limit
        return mine if own is None else min(own, mine)

    def set_limit(self, limit: int | None) -> None:
        """Allow ``limit`` more queries from now on (``None``: only the oracle's own budget)."""
        self._start = self.unwrapped.nfev
        self.limit = limit

    def reserve(self, n: int) -> None:
        super().reserve(n)
        inner = type(self.unwrapped).reserve
        if inner is not Oracle.reserve:  # the oracle checks something of its own (e.g. a batch is set)
            self.unwrapped.reserve(n)

    def raw_evaluate(self, X: torch.Tensor) -> RawResult:
        return self.unwrapped.raw_evaluate(X)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "unwrapped"), name)

    def __repr__(self) -> str:
        return f"BudgetView({self.unwrapped!r}, limit={self.limit})"


class FunctionOracle(Oracle):
    """Wrap any Python callable as an oracle.

    The points' dtype: ``dtype`` when given; otherwise ``torch.float64`` with ``numpy=True``
    (numpy computes in float64, and float32 points would round every perturbation of a float64
    simulator to float32 precision) and torch's default dtype (``torch.get_default_dtype()``)
    for a torch function.

    Parameters
    ----------
    fn : callable
        ``fn(x) -> float`` for one 1-D point, or, with ``vectorized=True``, ``fn(X) -> K losses``
        for a ``(K, dim)`` batch.
    dim : int
        Length of the parameter vector, ``>= 1``.
    vectorized : bool, default False
        Whether ``fn`` takes a batch.
    numpy : bool, default False
        Hand ``fn`` numpy arrays instead of torch tensors (for simulators written in numpy).
    **kwargs
        ``budget``, ``on_failure``, ``dtype``, ``device`` as in :class:`Oracle`.

    Raises
    ------
    TypeError
        ``fn`` not callable, or ``vectorized``/``numpy`` not a bool (the string ``"False"`` is not
        ``False``).
    ConfigError
        A bad ``dim``, ``budget``, ``on_failure``, ``dtype`` or ``device``, as in :class:`Oracle`.

    Examples
    --------
    >>> from zoblackbox import FunctionOracle
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=3)
    >>> oracle([1.0, 2.0, 2.0])
    9.0
    >>> import numpy as np
    >>> batch = FunctionOracle(lambda X: (X ** 2).sum(axis=1), dim=2, vectorized=True, numpy=True)
    >>> batch.evaluate(np.eye(2)), batch.nfev
    (tensor([1., 1.], dtype=torch.float64), 2)
    """

    def __init__(self, fn: Callable, dim: int, *, vectorized: bool = False, numpy: bool = False, **kwargs):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}: {fn!r}")
        for name, flag in (("vectorized", vectorized), ("numpy", numpy)):
            # a truthy non-bool (the string 'False', a config value read as text) would silently mean True
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}: {flag!r}")
        if numpy and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.float64
        super().__init__(dim, **kwargs)
        self.fn = fn
        self.vectorized = bool(vectorized)
        self.numpy = bool(numpy)

    def _convert(self, x: torch.Tensor):
        return x.cpu().numpy() if self.numpy else x

    def _evaluate_one(self, x):
        return self.fn(self._convert(x))

    def raw_evaluate(self, X: torch.Tensor) -> RawResult:
        if not self.vectorized:
            return super().raw_evaluate(X)
        with torch.no_grad():
            try:
                out = self.fn(self._convert(X))
                if not isinstance(out, torch.Tensor) and np.asarray(out).dtype.kind not in "biuf":
                    raise TypeError(f"the vectorized fn must return real losses, got {type(out).__name__}: "
                                    f"{short_repr(out)}")
                values = torch.as_tensor(np.asarray(out, dtype=np.float64) if not isinstance(out, torch.Tensor) else out)
                values = values.detach().to("cpu", torch.float64).reshape(-1)
            except Exception as exc:  # noqa: BLE001
                return RawResult(torch.full((X.shape[0],), math.nan, dtype=torch.float64), {i: exc for i in range(X.shape[0])})
        if values.shape[0] != X.shape[0]:
            self.nfev += X.shape[0]  # the batch was evaluated: count it, then stop the step
            raise OracleError(f"vectorized fn returned {values.shape[0]} values for a batch of {X.shape[0]} points")
        return RawResult(values, {})


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` this build can use (CPU for ``None``); ConfigError naming it otherwise."""
    return _check_device(device)


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)  # a device that does not exist here fails now, not at the first query
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"device {device!r} is not usable here: {exc}") from exc
    return dev


def _to_float(v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise OracleError(f"the oracle must return a scalar loss, got a tensor of shape {tuple(v.shape)}")
        return float(v.detach().cpu())
    arr = np.asarray(v)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise OracleError(f"the oracle must return a real scalar loss, got {type(v).__name__}: {v!r}")
    return float(arr.reshape(()))


def _describe(index: int, value: float, exc: BaseException | None) -> QueryFailure:
    if exc is None:
        return QueryFailure(index, "nonfinite", f"query #{index} returned the non-finite loss {value!r}", value)
    kind = "timeout" if isinstance(exc, TimeoutError) else "exception"
    return QueryFailure(index, kind, f"query #{index} raised {type(exc).__name__}: {exc}", None)


def _retry_note(f: QueryFailure) -> str:
    return f" (after {f.attempts} attempts)" if f.attempts > 1 else ""


def iter_chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    """Yield ``(start, stop)`` pairs that cover ``range(n)`` in chunks of at most ``size``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)
