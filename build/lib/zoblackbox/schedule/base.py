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

import torch

from ..oracle import Oracle
from ..plan import QueryPlan

__all__ = ["Scheduler", "SerialScheduler"]


class Scheduler(ABC):
    """Evaluates query plans; estimators use it without knowing which implementation runs."""

    @abstractmethod
    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        """Losses of every query of ``plan`` in plan order (float64 tensor of length ``len(plan)``)."""

    def close(self) -> None:
        """Release workers or other resources (no-op by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialScheduler(Scheduler):
    """The obviously-correct reference: one query at a time, one ordinary evaluation each."""

    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        n = len(plan)
        oracle.reserve(n)
        out = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            x = plan.point(i).to(device=oracle.device, dtype=oracle.dtype)
            out[i] = oracle.record(oracle.raw_evaluate(x[None]), lambda _j, x=x: x)[0]
        return out
