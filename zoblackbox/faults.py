"""The old home of the fault-injection helpers; they now live in :mod:`zoblackbox.testing`.

Kept so that ``from zoblackbox.faults import FaultyLoss`` (and the other names) keeps working.
"""

from __future__ import annotations

from .testing import FAULT_KINDS, Beacon, FaultyLoss, InjectedFault, Kill, WorkerKiller, injected_counts

__all__ = ["FAULT_KINDS", "Beacon", "FaultyLoss", "InjectedFault", "Kill", "WorkerKiller", "injected_counts"]
