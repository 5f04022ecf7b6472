"""Dask scheduler: the process pool's sharding over a ``dask.distributed`` cluster.

The oracle is scattered once to every worker (``client.scatter(..., broadcast=True)``) and held
there; a task carries only the base point and its slice of the plan, and returns losses and
per-query errors. Everything else -- one query at a time through ``oracle.raw_evaluate``, counting
and failure policy in the main process -- is shared with
:class:`~zoblackbox.schedule.pool.ProcessPoolScheduler` (see that module).

Requires the ``distributed`` extra: ``pip install zoblackbox[distributed]``, on the machine that
runs the optimization and on every worker machine (the workers import ``zoblackbox``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import deque
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingDependencyError, ZOError
from .pool import (
    ErrorInfo,
    OracleBlob,
    ShardedScheduler,
    Unit,
    compute_env,
    evaluate_source,
    load_oracle,
    set_compute_threads,
    shard_source,
)

try:
    import dask
    import distributed
    import distributed.client
    from distributed.scheduler import KilledWorker
except ImportError as _exc:  # pragma: no cover - exercised by a test with dask hidden
    raise MissingDependencyError(
        "DaskScheduler needs dask.distributed, which is not installed: pip install zoblackbox[distributed]"
    ) from _exc

__all__ = ["DaskScheduler"]

# distributed.wait raises this (newer releases) when a future is cancelled, e.g. by lost dependencies
_CANCELLED = getattr(distributed.client, "FuturesCancelledError", distributed.client.CancelledError)

_TOPIC_PREFIX = "zoblackbox-progress-"


def _dask_task(blob: OracleBlob, source, timeout, unit_id: str, topic: str | None, compute_threads: int):
    """Worker side: evaluate one shard with the worker's copy of the oracle."""
    set_compute_threads(compute_threads)
    oracle = load_oracle(blob.token, blob.data)  # unpickled once per worker process and token
    assert oracle is not None  # the blob carries the bytes: it always loads
    report = None
    if topic is not None:
        worker = distributed.get_worker()

        def report(j):
            worker.log_event(topic, [unit_id, j, worker.address])

    return evaluate_source(oracle, source, timeout, report)


class DaskScheduler(ShardedScheduler):
    """Shards each plan's queries over a Dask cluster; every worker holds the oracle once.

    By default a :class:`distributed.LocalCluster` of ``n_workers`` single-threaded worker
    processes is started on 127.0.0.1 (no dashboard). To use several machines, start
    ``dask scheduler`` and ``dask worker`` there and pass the scheduler's ``address`` (see
    ``docs/distributed.md``; use ``security=`` for TLS on untrusted networks). Needs the
    ``distributed`` extra (``MissingDependencyError`` otherwise, on first use of the name).

    Parameters
    ----------
    address : str or None, default None
        Address of a running Dask scheduler (e.g. ``"tls://10.0.0.5:8786"``).
    client : distributed.Client or None, default None
        An existing client to use instead (not closed by :meth:`close`).
    n_workers : int or None, default None
        Worker processes of the local cluster, ``>= 1`` (``None``: ``os.cpu_count()``).
    timeout : float or None, default None
        Per-query limit in seconds, positive (``None``: no limit). A query that exceeds it is a
        failed query of kind ``"timeout"``; a query that does not return gets its worker restarted
        by its nanny and the rest of its shard is re-run elsewhere.
    security : distributed.security.Security or None, default None
        TLS certificates for ``address`` or the local cluster.
    shards_per_worker : int, default 1
        Shards per worker thread and step, ``>= 1``.
    compute_threads : int, default 1
        torch/OpenMP/BLAS threads per local worker process, ``>= 1``.
    start_timeout : float, default 120.0
        Seconds allowed to connect, start workers and ship the oracle, ``> 0``.
    restart_timeout : float, default 60.0
        Seconds allowed to restart a worker that hangs, ``> 0``.

    Raises
    ------
    ConfigError
        Both ``address`` and ``client``; ``n_workers`` with a remote cluster; a count or timeout
        out of range.
    TypeError
        ``address`` not a string, ``client`` not a ``distributed.Client``.

    See Also
    --------
    ProcessPoolScheduler : the same on this machine's processes, without Dask.

    Examples
    --------
    Arguments are checked before any cluster is started or contacted:

    >>> from zoblackbox import ConfigError
    >>> from zoblackbox.schedule import DaskScheduler
    >>> try:
    ...     DaskScheduler("tcp://10.0.0.5:8786", n_workers=4)
    ... except ConfigError as err:
    ...     print(err)
    n_workers applies to the local cluster only; the cluster at address/client has the workers it was started with

    A local cluster of two workers (not run here: starting Dask takes several seconds)::

        with DaskScheduler(n_workers=2, timeout=60) as cluster:
            res = minimize(oracle, x0, budget=2_000, scheduler=cluster)
    """

    def __init__(self, address: str | None = None, *, client: distributed.Client | None = None,
                 n_workers: int | None = None, timeout: float | None = None,
                 security: distributed.security.Security | None = None, shards_per_worker: int = 1,
                 compute_threads: int = 1, start_timeout: float = 120.0, restart_timeout: float = 60.0):
        super().__init__(timeout=timeout, shards_per_worker=shards_per_worker, compute_threads=compute_threads,
                         start_timeout=start_timeout)
        if address is not None and client is not None:
            raise ConfigError("pass either address= or client=, not both")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string like 'tcp://host:8786', got {type(address).__name__}")
        if client is not None and not isinstance(client, distributed.Client):
            raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
        if n_workers is not None and (address is not None or client is not None):
            raise ConfigError("n_workers applies to the local cluster only; the cluster at address/client "
                              "has the workers it was started with")
        if (isinstance(restart_timeout, bool) or not isinstance(restart_timeout, (int, float))
                or not restart_timeout > 0):
            raise ConfigError(f"restart_timeout must be a positive number of seconds, got {restart_timeout!r}")
        self.restart_timeout = float(restart_timeout)
        self._closed = False
        self._cluster: Any = None  # distributed.LocalCluster (distributed is untyped)
        self.client: Any = None  # distributed.Client
        self._owns_client = client is None
        self._topic: str | None = None
        self._blob: OracleBlob | None = None
        self._blob_future: Any = None  # distributed.Future of the scattered oracle
        self._progress: dict[str, tuple[int, str, float]] = {}
        self._progress_lock = threading.Lock()
        if client is not None:
            self.client = client
        elif address is not None:
            self.client = distributed.Client(address, security=security, timeout=self.start_timeout,
                                             set_as_default=False)
        else:
            n = (os.cpu_count() or 1) if n_workers is None else n_workers
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"n_workers must be an int >= 1, got {n_workers!r}")
            self._cluster = _local_cluster(n, compute_threads, security)
            self.client = distributed.Client(self._cluster, timeout=self.start_timeout, set_as_default=False)
        try:
            self.client.wait_for_workers(1, timeout=self.start_timeout)
            self._topic = _TOPIC_PREFIX + uuid.uuid4().hex
            self.client.subscribe_topic(self._topic, self._on_progress)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"DaskScheduler({self.client!r}, timeout={self.timeout})"

    def close(self) -> None:
        """Release the oracle on the workers; close the client and the local cluster if owned."""
        if self._closed:
            return
        self._closed = True
        client, cluster = self.client, self._cluster
        if client is not None and client.status == "running":
            if self._topic is not None:
                client.unsubscribe_topic(self._topic)
            if self._blob_future is not None:
                self._blob_future.release()
        self._blob_future = None
        if client is not None and self._owns_client:
            client.close(timeout=self.restart_timeout)
        if cluster is not None:
            cluster.close(timeout=self.restart_timeout)
            self._cluster = None

    @property
    def n_workers(self) -> int:
        """Worker threads of the cluster right now (each runs one query at a time)."""
        return sum(self.client.nthreads().values())

    # ------------------------------------------------------------------ hooks
    def _num_shards(self) -> int:
        return max(1, self.n_workers) * self.shards_per_worker

    def _ship(self, blob: OracleBlob):
        if self._closed:
            raise ZOError("this DaskScheduler is closed; create a new one")
        if self._blob is None or self._blob.token != blob.token or self._blob_future.status != "finished":
            if self._blob_future is not None:
                self._blob_future.release()
            self._blob_future = self.client.scatter(blob, broadcast=True, hash=False, timeout=self.start_timeout)
            self._blob = blob
        return self._blob_future

    def _evaluate(self, blob_future, units: list[Unit], values: np.ndarray, errors: dict) -> None:
        futures: dict = {}  # future -> (unit, unit id)
        pending = deque(units)
        poll = 1.0 if self.timeout is None else min(0.25, self.timeout / 4)
        reships = lost = 0
        idle_since = time.monotonic()
        try:
            while pending or futures:
                while pending:
                    unit, unit_id = pending.popleft(), uuid.uuid4().hex
                    futures[self._submit(blob_future, unit, unit_id)] = (unit, unit_id)
                try:
                    with self.client.as_current():
                        done = distributed.wait(list(futures), timeout=poll, return_when="FIRST_COMPLETED").done
                except (TimeoutError, asyncio.TimeoutError):
                    done = ()
                except _CANCELLED:
                    done = [f for f in futures if f.status != "pending"]
                if done:
                    idle_since = time.monotonic()
                for future in done:
                    unit, unit_id = futures.pop(future)
                    with self._progress_lock:
                        self._progress.pop(unit_id, None)
                    if future.status == "finished":
                        self._store(unit, future.result(timeout=self.start_timeout), values, errors)
                        continue
                    exc = future.exception(timeout=self.start_timeout) if future.status == "error" else None
                    if isinstance(exc, KilledWorker):
                        self._on_killed(unit, exc, pending, errors)
                    elif self._blob_future.status != "finished":  # the oracle's last replica died
                        reships += 1
                        if reships > 3:
                            raise ZOError(f"the oracle was lost from the Dask cluster {reships} times in one "
                                          "step: every worker holding it died")
                        assert self._blob is not None  # shipped before the first submit
                        blob_future = self._ship(self._blob)
                        pending.append(unit)
                    elif exc is None:  # cancelled by the cluster (lost dependencies): run it again
                        lost += 1
                        if lost > 3 * len(units) + 3:
                            raise ZOError(f"Dask cancelled this step's tasks {lost} times")
                        pending.append(unit)
                    else:
                        raise ZOError(f"a Dask worker failed: {type(exc).__name__}: {exc}") from exc
                now = time.monotonic()
                if self.timeout is not None:
                    for future, (unit, unit_id) in list(futures.items()):
                        if self._hung(future, unit, unit_id, now, pending, errors):
                            del futures[future]
                if futures and now - idle_since > self.start_timeout and not self.client.nthreads():
                    raise ZOError(f"the Dask cluster has had no worker for {self.start_timeout:g} s (start_timeout)")
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        finally:
            with self._progress_lock:
                self._progress.clear()

    def _submit(self, blob_future, unit: Unit, unit_id: str):
        topic = self._topic if self.timeout is not None else None
        return self.client.submit(_dask_task, blob_future, unit.source, self.timeout, unit_id, topic,
                                  self.compute_threads, key=f"zoblackbox-shard-{unit_id}", pure=False)

    def _on_killed(self, unit: Unit, exc, pending: deque, errors: dict) -> None:
        """Dask gave up on a shard after repeated worker deaths: isolate, then fail, its queries."""
        if len(unit) > 1:  # find the culprit: one task per query
            pending.extend(Unit(unit.start + j, shard_source(unit.source, j, j + 1)) for j in range(len(unit)))
            return
        allowed = dask.config.get("distributed.scheduler.allowed-failures")
        errors[unit.start] = ErrorInfo.crash(allowed + 1, f"{type(exc).__name__}: {exc}")

    def _on_progress(self, event) -> None:
        _, (unit_id, j, address) = event
        with self._progress_lock:
            self._progress[unit_id] = (j, address, time.monotonic())

    def _hung(self, future, unit: Unit, unit_id: str, now: float, pending: deque, errors: dict) -> bool:
        """Restart the worker of a query that has not returned in time (returns True then)."""
        with self._progress_lock:
            seen = self._progress.get(unit_id)
        if seen is None:
            return False
        j, address, since = seen
        assert self.timeout is not None  # only called with a timeout
        if now - since <= self.timeout + self.hang_grace:
            return False
        future.cancel()
        errors[unit.start + j] = ErrorInfo.timeout(self.timeout, "; its worker was restarted")
        pending.extend(unit.parts_without(j, isolate=False))
        with self._progress_lock:
            self._progress.pop(unit_id, None)
        status = self.client.restart_workers([address], timeout=self.restart_timeout, raise_for_error=False)
        if status.get(address) not in ("OK", "removed"):
            logging.getLogger(__name__).warning(
                "could not restart Dask worker %s after a query timed out (%s); its thread keeps running the "
                "query. Workers started without a nanny cannot be restarted.", address, status.get(address))
        return True


def _local_cluster(n_workers: int, compute_threads: int, security):
    """A LocalCluster on 127.0.0.1: one single-threaded process per worker, no dashboard."""
    settings = {
        # broadcast replicas of the oracle must stay on every worker
        "distributed.scheduler.active-memory-manager.start": False,
        # the statistical profiler samples the task thread every 10 ms; it competes with the oracle
        "distributed.worker.profile.enabled": False,
        # Dask's own defaults (MALLOC_TRIM_THRESHOLD_, ...) stay; the thread limits are ours
        "distributed.nanny.pre-spawn-environ": {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                                                **compute_env(compute_threads)},
    }
    with dask.config.set(settings):
        return distributed.LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, security=security, silence_logs=logging.ERROR,
            # no dashboard; the scheduler's health endpoint on a free port of 127.0.0.1 only
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        )
