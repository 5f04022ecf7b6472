"""Batch-forward schedulers: how a query plan is evaluated (serial reference and faster ones)."""

from .base import Scheduler, SerialScheduler
from .pool import ProcessPoolScheduler, RemoteQueryError, UnpicklableOracleError, WorkerCrashError

__all__ = [
    "DaskScheduler",
    "ProcessPoolScheduler",
    "RemoteQueryError",
    "Scheduler",
    "SerialScheduler",
    "UnpicklableOracleError",
    "WorkerCrashError",
]


def __getattr__(name):  # dask is an optional extra: import it on first use
    if name == "DaskScheduler":
        from .dask_cluster import DaskScheduler

        return DaskScheduler
    raise AttributeError(f"module 'zoblackbox.schedule' has no attribute {name!r}")


# The torch schedulers (vectorized batches, feature reuse over staged models).
from .reuse import FeatureReuseScheduler
from .vectorized import VectorizedScheduler

__all__ += ["FeatureReuseScheduler", "VectorizedScheduler"]
