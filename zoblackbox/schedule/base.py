"""The scheduler interface and the serial reference scheduler.

A scheduler evaluates a :class:`~zoblackbox.plan.QueryPlan` against an oracle and returns the
losses in plan order (float64, CPU). Every scheduler goes through the oracle's bookkeeping --
:meth:`~zoblackbox.oracle.Oracle.reserve` (budget, before any query),
:meth:`~zoblackbox.oracle.Oracle.raw_evaluate` (or its own faster evaluation) and
:meth:`~zoblackbox.oracle.Oracle.record` (counting and failure policy) -- so results, query counts
and failure handling do not depend on which scheduler runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..oracle import Oracle
from ..plan import QueryPlan

__all__ = ["Scheduler", "SerialScheduler"]


def _constant(x: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """The point of a one-row batch, whatever the row index."""
    def point(_i: int) -> torch.Tensor:
        return x

    return point


class Scheduler(ABC):
    """Base class of schedulers: how a plan's queries are evaluated.

    Estimators take ``scheduler=`` and call :meth:`run`; every scheduler returns the serial
    reference's losses, counts the same queries and applies the oracle's failure policy the same
    way. Schedulers are context managers (:meth:`close` on exit). The class takes no constructor
    parameters.

    See Also
    --------
    SerialScheduler, VectorizedScheduler, FeatureReuseScheduler, ProcessPoolScheduler, DaskScheduler

    Examples
    --------
    A scheduler that evaluates a plan back to front (same losses, in plan order):

    >>> import torch
    >>> from zoblackbox import FunctionOracle, QueryPlan
    >>> from zoblackbox.schedule import Scheduler
    >>> class Reversed(Scheduler):
    ...     def run(self, oracle, plan):
    ...         n = len(plan)
    ...         oracle.reserve(n)
    ...         out = torch.empty(n, dtype=torch.float64)
    ...         for i in reversed(range(n)):
    ...             x = plan.point(i).to(oracle.dtype)
    ...             out[i] = oracle.record(oracle.raw_evaluate(x[None]), lambda _j, x=x: x)[0]
    ...         return out
    >>> oracle = FunctionOracle(lambda x: float(x.sum()), dim=2)
    >>> Reversed().run(oracle, QueryPlan(torch.zeros(2), coords=[0, 1], offsets=[1.0, 2.0]))
    tensor([0., 1., 2.], dtype=torch.float64)
    """

    @abstractmethod
    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        """Evaluate every query of ``plan``.

        Parameters
        ----------
        oracle : Oracle
            The function; its budget is reserved before any query and every query is recorded.
        plan : QueryPlan
            The queries.

        Returns
        -------
        torch.Tensor
            Losses in plan order, float64 of length ``len(plan)``.
        """

    def close(self) -> None:
        """Release workers or other resources (no-op by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialScheduler(Scheduler):
    """The obviously-correct reference: one query at a time, one ordinary evaluation each.

    Takes no parameters. Every other scheduler is tested against it.

    See Also
    --------
    VectorizedScheduler, FeatureReuseScheduler : faster for torch models.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import CoordinateEstimator, FunctionOracle
    >>> from zoblackbox.schedule import SerialScheduler
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=3, dtype=torch.float64)
    >>> est = CoordinateEstimator(mu=1e-4, scheme="central").estimate(oracle, torch.ones(3),
    ...                                                               scheduler=SerialScheduler())
    >>> est.grad.round(decimals=6), oracle.nfev
    (tensor([2., 2., 2.], dtype=torch.float64), 6)
    """

    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        """Evaluate the plan's queries one at a time; see :meth:`Scheduler.run`."""
        n = len(plan)
        oracle.reserve(n)
        out = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            x = plan.point(i).to(device=oracle.device, dtype=oracle.dtype)
            out[i] = oracle.record(oracle.raw_evaluate(x[None]), _constant(x))[0]
        return out
