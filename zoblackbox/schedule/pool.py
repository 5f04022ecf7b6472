"""Process-pool scheduler: a plan's queries sharded across worker processes (joblib's loky).

For opaque, expensive oracles -- simulators, external programs, anything that is not vectorized --
the queries of one step are independent, so they can run in parallel processes.

How a step runs (the same for :class:`ProcessPoolScheduler` and the Dask scheduler):

* The oracle is serialized with cloudpickle (its counters left out) and identified by a hash of
  the bytes, its *token*. A worker receives the bytes once per token and keeps the unpickled
  oracle; an oracle that changed between steps (new data batch, new weights) has a new token and
  is shipped again, an unchanged one is never sent twice.
* The plan is split into contiguous shards of balanced size. A task carries only the base point
  and its slice of the plan (coordinates and offsets, or direction rows) and returns the losses
  and the per-query errors.
* Workers call ``oracle.raw_evaluate`` one query at a time, exactly like
  :class:`~zoblackbox.schedule.SerialScheduler`, so the losses are bitwise the same whatever the
  number of workers. The main process calls ``oracle.reserve`` before and ``oracle.record``
  after, so counting, budgets and the failure policy are the oracle's own.
* An exception raised by the oracle in a worker comes back as a per-query error (type name,
  message and traceback text) and is rebuilt in the main process.

Each worker of :class:`ProcessPoolScheduler` is a single-process loky executor. A loky pool breaks
as a whole when one of its processes dies; with one executor per worker, a dead or hung worker is
replaced alone, the others keep their oracle and their running shards, and the query that killed
(or hung) a worker is known exactly from the worker's progress record.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import hashlib
import importlib
import itertools
import math
import mmap
import os
import pickle
import shutil
import signal
import struct
import tempfile
import threading
import time
import traceback
import weakref
from abc import abstractmethod
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import ClassVar

import cloudpickle
import numpy as np
import torch
from joblib.externals.loky import ProcessPoolExecutor
from joblib.externals.loky.process_executor import BrokenProcessPool

from ..errors import ConfigError, ZOError
from ..oracle import Oracle, RawResult
from ..plan import QueryPlan
from .base import Scheduler

__all__ = ["ProcessPoolScheduler", "RemoteQueryError", "UnpicklableOracleError", "WorkerCrashError"]


# ---------------------------------------------------------------------------------------- errors
class UnpicklableOracleError(ZOError, TypeError):
    """The oracle cannot be serialized for worker processes (raised before any query is spent).

    The message names the attribute that does not pickle. Also a :class:`TypeError`.

    Examples
    --------
    >>> import threading, torch
    >>> from zoblackbox import FunctionOracle, QueryPlan
    >>> from zoblackbox.schedule import ProcessPoolScheduler, UnpicklableOracleError
    >>> lock = threading.Lock()
    >>> oracle = FunctionOracle(lambda x: float(lock.locked()), dim=2)
    >>> with ProcessPoolScheduler(n_workers=1) as pool:
    ...     try:
    ...         pool.run(oracle, QueryPlan(torch.zeros(2), coords=[0], offsets=[0.1]))
    ...     except UnpicklableOracleError as err:
    ...         print(str(err)[:74])
    FunctionOracle cannot be sent to worker processes: oracle.fn (function) is
    >>> oracle.nfev
    0
    """


class RemoteQueryError(ZOError):
    """An exception the oracle raised in a worker process, rebuilt in the main process.

    The rebuilt exception's class has the original class name and derives from the nearest
    built-in exception of the original (``ValueError``, ``TimeoutError``, ...), so messages and
    ``isinstance`` checks read as if the query had run locally. Built-in exceptions and
    zoblackbox's own come back as themselves.

    Attributes
    ----------
    remote_type : str
        The original exception's ``module.qualname``.
    remote_traceback : str
        The traceback text from the worker.

    Examples
    --------
    A query that raises an exception class of the user's own, in a worker process:

    >>> import torch
    >>> from zoblackbox import FunctionOracle, OracleError, QueryPlan
    >>> from zoblackbox.schedule import ProcessPoolScheduler, RemoteQueryError
    >>> class SolverDiverged(ValueError):
    ...     pass
    >>> def simulate(x):
    ...     raise SolverDiverged("dt too large")
    >>> with ProcessPoolScheduler(n_workers=1) as pool:
    ...     try:
    ...         pool.run(FunctionOracle(simulate, dim=2), QueryPlan(torch.zeros(2), coords=[0], offsets=[0.1]))
    ...     except OracleError as err:
    ...         cause = err.__cause__
    >>> type(cause).__name__, isinstance(cause, RemoteQueryError), isinstance(cause, ValueError)
    ('SolverDiverged', True, True)
    >>> str(cause)
    'dt too large'
    """

    remote_type: str = ""
    remote_traceback: str = ""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        bases = [b.__name__ for b in type(self).__mro__ if b.__module__ == "builtins"]
        return _rebuild_remote_error, (type(self).__name__, self.remote_type, bases[0] if bases else None,
                                       str(self), self.remote_traceback)


class WorkerCrashError(ZOError):
    """A worker process died while evaluating a query, on every allowed attempt.

    It is a failed query of kind ``"exception"`` under the oracle's failure policy: under
    ``"raise"`` the :class:`~zoblackbox.OracleError`'s cause, otherwise recorded in the oracle's
    ``failures`` (the run goes on with the rest of the plan). The dead worker is replaced.

    Examples
    --------
    >>> from zoblackbox import ZOError
    >>> from zoblackbox.schedule import WorkerCrashError
    >>> err = WorkerCrashError("the worker process died while evaluating this query (2 attempts)")
    >>> isinstance(err, ZOError), str(err)
    (True, 'the worker process died while evaluating this query (2 attempts)')
    """


# ---------------------------------------------------------------------------------------- oracle
@dataclass(frozen=True)
class OracleBlob:
    """The cloudpickled oracle and its token (hash of the bytes)."""

    token: str
    data: bytes = field(repr=False)


def oracle_blob(oracle: Oracle) -> OracleBlob:
    """Serialize ``oracle`` for workers (counters left out); raises :class:`UnpicklableOracleError`.

    A counting view (the engine's :class:`~zoblackbox.engine.BudgetView`) sends the oracle it wraps:
    the limit and the counting stay in the main process."""
    oracle = getattr(oracle, "unwrapped", oracle)
    try:
        shadow = copy.copy(oracle)
        shadow.nfev = 0  # counters live in the main process; leaving them out keeps the token stable
        shadow.failures = []
    except Exception:  # noqa: BLE001 - an uncopyable oracle is pickled as it is
        shadow = oracle
    try:
        data = cloudpickle.dumps(shadow, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise UnpicklableOracleError(_explain_unpicklable(oracle, exc)) from exc
    return OracleBlob(hashlib.blake2b(data, digest_size=16).hexdigest(), data)


def _explain_unpicklable(oracle, exc: BaseException) -> str:
    found = _find_unpicklable(oracle, "oracle", depth=4)
    where = f"{found[0]} ({type(found[1]).__name__})" if found else f"the {type(oracle).__name__} itself"
    return (
        f"{type(oracle).__name__} cannot be sent to worker processes: {where} is not picklable "
        f"({type(exc).__name__}: {exc}). No query was spent. Keep such resources (locks, open files, "
        "generators, sockets, live sessions) out of the oracle, or create them lazily in the worker "
        "(on the first query, or in __setstate__)."
    )


def _find_unpicklable(obj, path: str, depth: int):
    """The first ``(path, value)`` below ``obj`` that cloudpickle refuses, or ``None``."""
    for name, child in _children(obj):
        try:
            cloudpickle.dumps(child)
        except Exception:  # noqa: BLE001
            deeper = _find_unpicklable(child, f"{path}{name}", depth - 1) if depth > 0 else None
            return deeper or (f"{path}{name}", child)
    return None


def _children(obj):
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in list(obj.items())[:1000]]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj[:1000])]
    code = getattr(obj, "__code__", None)
    if code is not None and getattr(obj, "__closure__", None):
        cells = []
        for name, cell in zip(code.co_freevars, obj.__closure__):
            try:
                cells.append((f".<closure {name}>", cell.cell_contents))
            except ValueError:  # empty cell
                continue
        return cells
    state = getattr(obj, "__dict__", None)
    return [(f".{k}", v) for k, v in state.items()] if isinstance(state, dict) else []


# ---------------------------------------------------------------------------------------- shards
def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(n)``, sizes differing by <= 1."""
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + size + (p < extra)
        out.append((start, stop))
        start = stop
    return out


def transport_plan(plan: QueryPlan) -> QueryPlan:
    """A CPU copy of ``plan`` whose tensors own their storage (views would pickle whole parents)."""
    def own(t):
        return None if t is None else t.detach().cpu().contiguous().clone()

    return QueryPlan(base=own(plan.base), include_base=plan.include_base, coords=own(plan.coords),
                     offsets=own(plan.offsets), directions=own(plan.directions), support=plan.support)


def shard_source(source, start: int, stop: int):
    """Queries ``start..stop-1`` of ``source`` (a :class:`QueryPlan` or a ``(K, d)`` tensor of points).

    A plan's shard is again a plan: the same base point and a copied slice of its coordinates and
    offsets (or direction rows), so that ``shard.point(j) == source.point(start + j)`` bitwise.
    """
    if isinstance(source, torch.Tensor):
        return source[start:stop].clone()
    shift = int(source.include_base)
    lo, hi = max(start - shift, 0), max(stop - shift, 0)
    include = source.include_base and start == 0
    if source.coords is not None:
        return QueryPlan(base=source.base, include_base=include, coords=source.coords[lo:hi].clone(),
                         offsets=source.offsets[lo:hi].clone())
    return QueryPlan(base=source.base, include_base=include, directions=source.directions[lo:hi].clone(),
                     support=source.support)


@dataclass
class Unit:
    """A shard in flight: plan indices ``start .. start + len(source) - 1``."""

    start: int
    source: QueryPlan | torch.Tensor  # a plan's queries or a tensor of points

    def __len__(self) -> int:
        return len(self.source)

    def parts_without(self, j: int, isolate: bool) -> list[Unit]:
        """The unit minus its query ``j`` (``isolate``: with ``j`` again, as a unit of its own)."""
        cuts = [(0, j), (j, j + 1), (j + 1, len(self))] if isolate else [(0, j), (j + 1, len(self))]
        return [Unit(self.start + a, shard_source(self.source, a, b)) for a, b in cuts if b > a]


# ---------------------------------------------------------------------------------------- worker side
@dataclass(frozen=True)
class ErrorInfo:
    """A picklable description of an exception raised in a worker (no pickled exception object)."""

    name: str  # the class's __name__
    module: str
    qualname: str
    message: str
    args: tuple | None  # the exception's args when they are plain scalars
    builtin_base: str | None  # nearest built-in class in its MRO
    traceback: str = ""

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        t = type(exc)
        simple = all(isinstance(a, (str, int, float, bool, type(None))) for a in exc.args)
        base = next((b.__name__ for b in t.__mro__ if b.__module__ == "builtins"), None)
        tb = "".join(traceback.format_exception(t, exc, exc.__traceback__))
        return cls(t.__name__, t.__module__, t.__qualname__, str(exc), tuple(exc.args) if simple else None, base, tb)

    @classmethod
    def timeout(cls, seconds: float, note: str = "") -> ErrorInfo:
        msg = f"query exceeded the timeout of {seconds:g} s{note}"
        return cls("TimeoutError", "builtins", "TimeoutError", msg, (msg,), "TimeoutError")

    @classmethod
    def crash(cls, attempts: int, detail: str) -> ErrorInfo:
        msg = f"the worker process died while evaluating this query ({attempts} attempts; {detail})"
        return cls("WorkerCrashError", __name__, "WorkerCrashError", msg, (msg,), "Exception")

    def rebuild(self) -> BaseException:
        """The exception as the main process sees it.

        Built-in exceptions and zoblackbox's own are rebuilt as themselves; any other class as a
        :class:`RemoteQueryError` of the same name (the main process may not be able to import it).
        """
        exc = self._native()
        if exc is None:
            return _rebuild_remote_error(self.name, f"{self.module}.{self.qualname}", self.builtin_base,
                                         self.message, self.traceback)
        if self.traceback:
            exc.remote_traceback = self.traceback  # type: ignore[attr-defined]  # kept for the user
        return exc

    def _native(self) -> BaseException | None:
        if self.module == "builtins":
            cls = getattr(builtins, self.qualname, None)
        elif self.module == "zoblackbox" or self.module.startswith("zoblackbox."):
            try:
                cls = getattr(importlib.import_module(self.module), self.qualname, None)
            except ImportError:
                return None
        else:
            return None
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return None
        try:
            exc = cls(*self.args) if self.args is not None else cls(self.message)
        except Exception:  # noqa: BLE001 - a constructor with other arguments: use RemoteQueryError
            return None
        return exc if str(exc) == self.message else None


_REMOTE_CLASSES: dict[tuple[str, str | None], type] = {}


def _rebuild_remote_error(name: str, remote_type: str, builtin_base: str | None, message: str, tb: str):
    key = (name, builtin_base)
    cls = _REMOTE_CLASSES.get(key)
    if cls is None:
        base = getattr(builtins, builtin_base or "", None)
        bases: tuple[type, ...] = (RemoteQueryError,)
        if isinstance(base, type) and issubclass(base, Exception) and base is not Exception:
            bases = (RemoteQueryError, base)
        try:
            cls = type(name, bases, {"__module__": __name__, "__qualname__": name})
            cls("probe")
        except Exception:  # noqa: BLE001 - an incompatible layout: keep RemoteQueryError only
            cls = type(name, (RemoteQueryError,), {"__module__": __name__, "__qualname__": name})
        _REMOTE_CLASSES[key] = cls
    exc = cls(message)
    exc.remote_type = remote_type
    exc.remote_traceback = tb
    return exc


@dataclass
class ShardResult:
    """What a worker sends back: losses, ``(j, ErrorInfo)`` per failed query, and a fatal error."""

    values: np.ndarray
    errors: list
    fatal: ErrorInfo | None = None


class _AlarmInterrupt(BaseException):
    """Raised by SIGALRM in a worker; a BaseException so oracle code cannot swallow it."""


def _on_alarm(signum, frame):
    raise _AlarmInterrupt()


class _WorkerState:
    """Process-global state of a worker (the oracle it holds, its progress record)."""

    oracles: ClassVar[dict[str, Oracle]] = {}
    lock = threading.Lock()
    progress: _ProgressRecord | None = None
    alarm = False
    threads_set: int | None = None


def set_compute_threads(n: int) -> None:
    """Limit torch's intra-op threads in this worker process (once)."""
    if _WorkerState.threads_set != n:
        torch.set_num_threads(n)
        _WorkerState.threads_set = n


def compute_env(n: int) -> dict[str, str]:
    """Environment that limits OpenMP/BLAS threads of a worker process to ``n``."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
             "NUMEXPR_NUM_THREADS")
    return {k: str(n) for k in names}


def load_oracle(token: str, data: bytes | None) -> Oracle | None:
    """The worker's oracle for ``token``, unpickled from ``data`` the first time (``None``: not held)."""
    with _WorkerState.lock:
        oracle = _WorkerState.oracles.get(token)
        if oracle is None and data is not None:
            try:
                oracle = cloudpickle.loads(data)
            except Exception as exc:
                raise RuntimeError(
                    f"the oracle could not be unpickled in worker process {os.getpid()}: "
                    f"{type(exc).__name__}: {exc} (is every module it needs installed on the worker?)"
                ) from exc
            _WorkerState.oracles = {token: oracle}  # one oracle per worker: drop the previous one
        return oracle


@contextlib.contextmanager
def _alarm(seconds: float | None):
    if seconds is None or not _WorkerState.alarm or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def evaluate_source(oracle: Oracle, source, timeout: float | None, on_query=None) -> ShardResult:
    """Evaluate every query of ``source`` one at a time, as SerialScheduler does (worker side).

    A query that takes longer than ``timeout`` seconds is reported as a timeout; in a pool worker
    (main thread, POSIX) it is also interrupted by SIGALRM at the deadline.
    """
    n = len(source)
    values = np.full(n, np.nan)
    errors = []
    for j in range(n):
        if on_query is not None:
            on_query(j)
        try:
            x = (source.point(j) if isinstance(source, QueryPlan) else source[j])
            x = x.to(device=oracle.device, dtype=oracle.dtype)
            started = time.perf_counter()
            with _alarm(timeout):
                raw = oracle.raw_evaluate(x[None])
        except _AlarmInterrupt:
            assert timeout is not None  # the alarm is set only with a timeout
            errors.append((j, ErrorInfo.timeout(timeout)))
            continue
        except Exception as exc:  # noqa: BLE001 - raw_evaluate itself failed: the step must stop
            return ShardResult(values, errors, ErrorInfo.of(exc))
        if timeout is not None and time.perf_counter() - started > timeout:
            errors.append((j, ErrorInfo.timeout(timeout)))
            continue
        values[j] = float(raw.values[0])
        if 0 in raw.errors:
            errors.append((j, ErrorInfo.of(raw.errors[0])))
    return ShardResult(values, errors)


# ---------------------------------------------------------------------------------------- base class
class ShardedScheduler(Scheduler):
    """Common part of the process-pool and Dask schedulers: ship, shard, evaluate, record."""

    def __init__(self, *, timeout: float | None, shards_per_worker: int, compute_threads: int,
                 start_timeout: float):
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ConfigError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        _check_count("shards_per_worker", shards_per_worker)
        _check_count("compute_threads", compute_threads)
        if (isinstance(start_timeout, bool) or not isinstance(start_timeout, (int, float))
                or not start_timeout > 0):
            raise ConfigError(f"start_timeout must be a positive number of seconds, got {start_timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        self.shards_per_worker = shards_per_worker
        self.compute_threads = compute_threads
        self.start_timeout = float(start_timeout)
        self._lock = threading.Lock()

    @property
    def hang_grace(self) -> float:
        """Seconds past ``timeout`` after which a query that has not returned is declared hung."""
        return 1.0 + 0.1 * (self.timeout or 0.0)

    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        """Losses of every query of ``plan`` in plan order, evaluated by the workers.

        Raises:
            UnpicklableOracleError: the oracle cannot be sent to workers (no query is spent).
            BudgetExhaustedError: the plan would overrun the oracle's budget (no query is spent).
            OracleError: a query failed under the ``raise`` policy.
            ZOError: the workers could not run the plan (they do not start, or keep dying).
        """
        if not isinstance(oracle, Oracle):
            raise TypeError(f"oracle must be a zoblackbox Oracle, got {type(oracle).__name__}")
        if not isinstance(plan, QueryPlan):
            raise TypeError(f"plan must be a QueryPlan, got {type(plan).__name__}")
        n = len(plan)
        if n == 0:
            return torch.empty(0, dtype=torch.float64)
        blob = oracle_blob(oracle)  # an unpicklable oracle fails here, before any query
        oracle.reserve(n)
        with self._lock:
            handle = self._ship(blob)
            source = transport_plan(plan)
            units = [Unit(a, shard_source(source, a, b)) for a, b in split_ranges(n, self._num_shards())]
            raw = self._raw(handle, units, n)
            point = lambda i: plan.point(i).to(device=oracle.device, dtype=oracle.dtype)
            # retries run in a worker under the per-query timeout, never in this process
            return oracle.record(raw, point, evaluate=lambda X: self._raw_rows(handle, X))

    def _raw_rows(self, handle, X: torch.Tensor) -> RawResult:
        rows = X.detach().cpu().contiguous().clone()
        units = [Unit(a, shard_source(rows, a, b)) for a, b in split_ranges(rows.shape[0], self._num_shards())]
        return self._raw(handle, units, rows.shape[0])

    def _raw(self, handle, units: list[Unit], n: int) -> RawResult:
        values = np.full(n, np.nan)
        errors: dict[int, ErrorInfo] = {}
        self._evaluate(handle, units, values, errors)
        return RawResult(torch.from_numpy(values), {i: e.rebuild() for i, e in sorted(errors.items())})

    @staticmethod
    def _store(unit: Unit, result: ShardResult, values: np.ndarray, errors: dict) -> None:
        if result.fatal is not None:
            raise result.fatal.rebuild()
        values[unit.start:unit.start + len(unit)] = result.values
        for j, info in result.errors:
            errors[unit.start + j] = info

    # subclass hooks
    @abstractmethod
    def _ship(self, blob: OracleBlob):
        """Make the oracle available to the workers; returns what ``_evaluate`` needs to find it."""

    @abstractmethod
    def _num_shards(self) -> int:
        """Shards to cut a plan into."""

    @abstractmethod
    def _evaluate(self, handle, units: list[Unit], values: np.ndarray, errors: dict) -> None:
        """Evaluate ``units``, writing losses into ``values`` and ErrorInfos into ``errors``."""


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------- process pool
class _ProgressRecord:
    """Two int64 in a small shared file: the worker's task id and query index (-1: loading the oracle)."""

    _FORMAT = "<qq"
    _SIZE = struct.calcsize(_FORMAT)

    def __init__(self, path: str, create: bool = False):
        if create:
            with open(path, "wb") as f:
                f.write(b"\0" * self._SIZE)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self._SIZE)  # the map keeps its own descriptor

    def write(self, task: int, j: int) -> None:
        struct.pack_into(self._FORMAT, self._map, 0, task, j)

    def read(self) -> tuple[int, int]:
        return struct.unpack_from(self._FORMAT, self._map, 0)

    def close(self) -> None:
        self._map.close()


_NEED_ORACLE = "need-oracle"


def _init_pool_worker(progress_path: str, compute_threads: int) -> None:
    set_compute_threads(compute_threads)
    _WorkerState.progress = _ProgressRecord(progress_path)
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, _on_alarm)
        _WorkerState.alarm = True


def _pool_task(task_id: int, token: str, data: bytes | None, source, timeout: float | None):
    progress = _WorkerState.progress
    assert progress is not None  # set by _init_pool_worker
    progress.write(task_id, -1)
    oracle = load_oracle(token, data)
    if oracle is None:
        return _NEED_ORACLE
    return evaluate_source(oracle, source, timeout, lambda j: progress.write(task_id, j))


@dataclass
class _Task:
    unit: Unit
    task_id: int
    future: Future
    seen: tuple = ()  # last (started, query) read from the progress record
    seen_at: float = 0.0


class _Slot:
    """One worker process: a single-process loky executor and its progress record."""

    def __init__(self, index: int, directory: str, compute_threads: int):
        self.index = index
        self.directory = directory
        self.compute_threads = compute_threads
        self.generation = 0
        self.executor: ProcessPoolExecutor | None = None
        self.progress: _ProgressRecord | None = None
        self.progress_path: str | None = None
        self.token: str | None = None  # oracle the current worker process holds
        self.task: _Task | None = None

    def submit(self, unit: Unit, blob: OracleBlob, timeout, task_id: int) -> _Task:
        try:
            return self._submit(unit, blob, timeout, task_id)
        except (BrokenProcessPool, RuntimeError):  # the idle worker died since its last task
            self.restart()
            return self._submit(unit, blob, timeout, task_id)

    def _submit(self, unit: Unit, blob: OracleBlob, timeout, task_id: int) -> _Task:
        if self.executor is None:
            self.generation += 1
            path = os.path.join(self.directory, f"worker{self.index}-{self.generation}.progress")
            self.progress, self.progress_path = _ProgressRecord(path, create=True), path
            self.executor = ProcessPoolExecutor(max_workers=1, initializer=_init_pool_worker,
                                                initargs=(path, self.compute_threads),
                                                env=compute_env(self.compute_threads))
        data = None if self.token == blob.token else blob.data
        assert self.executor is not None
        future = self.executor.submit(_pool_task, task_id, blob.token, data, unit.source, timeout)
        self.task = _Task(unit, task_id, future, seen_at=time.monotonic())
        return self.task

    def restart(self) -> None:
        """Kill the worker process (and its children); a new one starts on the next submit."""
        executor, progress, path = self.executor, self.progress, self.progress_path
        self.executor, self.progress, self.token, self.task = None, None, None, None
        if executor is not None:
            executor.shutdown(wait=False, kill_workers=True)
        if progress is not None:
            progress.close()
            if path is not None:  # set with progress
                with contextlib.suppress(OSError):
                    os.remove(path)


def _shutdown_slots(slots: list[_Slot], directory: str | None) -> None:
    for slot in slots:
        slot.restart()
    slots.clear()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class ProcessPoolScheduler(ShardedScheduler):
    """Shards each plan's queries across worker processes; the oracle is shipped once per worker.

    Meant for opaque oracles that cost milliseconds or more per query (simulators, external
    programs). Losses, query counts and failure handling are the same as with
    :class:`~zoblackbox.schedule.SerialScheduler`; see ``docs/distributed.md``.

    Parameters
    ----------
    n_workers : int or None, default None
        Worker processes, ``>= 1`` (``None``: ``os.cpu_count()``). They start on the first
        :meth:`~zoblackbox.schedule.Scheduler.run` and live until :meth:`close`.
    timeout : float or None, default None
        Per-query limit in seconds, positive and finite (``None``: no limit). A query that exceeds
        it is a failed query of kind ``"timeout"`` under the oracle's failure policy; a query that
        does not return is interrupted (SIGALRM, POSIX) or its worker process is killed and
        replaced.
    shards_per_worker : int, default 1
        Shards per worker and step, ``>= 1``; more than 1 balances queries of uneven cost.
    compute_threads : int, default 1
        torch/OpenMP/BLAS threads per worker, ``>= 1`` (1 avoids oversubscribing cores).
    crash_retries : int, default 1
        How many times (``>= 0``) a query whose worker process died is re-run on a fresh worker
        before it is reported as a :class:`WorkerCrashError` failure.
    start_timeout : float, default 120.0
        Seconds a worker may take to start and load the oracle, ``> 0``.

    Raises
    ------
    ConfigError
        A count not an int ``>= 1`` (``crash_retries``: ``>= 0``), or a timeout that is not a
        positive number.

    See Also
    --------
    DaskScheduler : the same over a Dask cluster.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import CoordinateEstimator, FunctionOracle
    >>> from zoblackbox.schedule import ProcessPoolScheduler
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=4, dtype=torch.float64)
    >>> with ProcessPoolScheduler(n_workers=2, timeout=60) as pool:
    ...     est = CoordinateEstimator(mu=1e-4, scheme="central").estimate(oracle, torch.ones(4), scheduler=pool)
    >>> est.grad.round(decimals=6), oracle.nfev
    (tensor([2., 2., 2., 2.], dtype=torch.float64), 8)
    """

    def __init__(self, n_workers: int | None = None, *, timeout: float | None = None, shards_per_worker: int = 1,
                 compute_threads: int = 1, crash_retries: int = 1, start_timeout: float = 120.0):
        super().__init__(timeout=timeout, shards_per_worker=shards_per_worker, compute_threads=compute_threads,
                         start_timeout=start_timeout)
        n_workers = (os.cpu_count() or 1) if n_workers is None else n_workers
        _check_count("n_workers", n_workers)
        if isinstance(crash_retries, bool) or not isinstance(crash_retries, int) or crash_retries < 0:
            raise ConfigError(f"crash_retries must be a non-negative int, got {crash_retries!r}")
        self.n_workers = n_workers
        self.crash_retries = crash_retries
        self._slots: list[_Slot] = []
        self._directory: str | None = None
        self._task_ids = itertools.count(1)
        self._closed = False
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return (f"ProcessPoolScheduler(n_workers={self.n_workers}, timeout={self.timeout}, "
                f"shards_per_worker={self.shards_per_worker})")

    def close(self) -> None:
        """Kill the worker processes and remove their files; the scheduler cannot run afterwards."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()

    # ------------------------------------------------------------------ hooks
    def _num_shards(self) -> int:
        return self.n_workers * self.shards_per_worker

    def _ship(self, blob: OracleBlob) -> OracleBlob:
        if self._closed:
            raise ZOError("this ProcessPoolScheduler is closed; create a new one")
        if not self._slots:
            self._directory = tempfile.mkdtemp(prefix="zoblackbox-pool-")
            self._slots = [_Slot(i, self._directory, self.compute_threads) for i in range(self.n_workers)]
            self._finalizer = weakref.finalize(self, _shutdown_slots, self._slots, self._directory)
        return blob  # each worker gets the bytes with its first task of this token

    def _evaluate(self, blob: OracleBlob, units: list[Unit], values: np.ndarray, errors: dict) -> None:
        pending = deque(units)
        crashes: Counter = Counter()  # plan index -> worker deaths while evaluating it
        lost_starts = 0  # worker deaths before a task reached its first query
        busy: dict[Future, _Slot] = {}
        poll = 0.5 if self.timeout is None else min(0.1, self.timeout / 4)
        try:
            while pending or busy:
                for slot in self._slots:
                    if slot.task is None and pending:
                        task = slot.submit(pending.popleft(), blob, self.timeout, next(self._task_ids))
                        busy[task.future] = slot
                done, _ = wait(list(busy), timeout=poll, return_when=FIRST_COMPLETED)
                for future in done:
                    slot = busy.pop(future)
                    finished, slot.task = slot.task, None
                    assert finished is not None  # a busy slot has a task
                    task = finished
                    exc = future.exception()
                    if exc is None:
                        result = future.result()
                        if isinstance(result, str) and result == _NEED_ORACLE:
                            slot.token = None  # the worker process was replaced behind our back
                            pending.appendleft(task.unit)
                            continue
                        slot.token = blob.token
                        self._store(task.unit, result, values, errors)
                    elif isinstance(exc, BrokenProcessPool):
                        lost_starts += self._on_crash(slot, task, exc, crashes, pending, errors)
                        if lost_starts > self.crash_retries:
                            raise ZOError(f"worker process {slot.index} died before evaluating any query, "
                                          f"{lost_starts} times ({exc}); the oracle may fail to load there")
                    else:
                        raise ZOError(f"worker process {slot.index} failed: {type(exc).__name__}: {exc}") from exc
                now = time.monotonic()
                for future, slot in list(busy.items()):
                    if self._watch(slot, now, pending, errors):
                        del busy[future]
        except BaseException:
            for slot in busy.values():
                slot.restart()  # never leave a worker running a shard of an abandoned step
            raise

    def _on_crash(self, slot: _Slot, task: _Task, exc, crashes: Counter, pending: deque, errors: dict) -> int:
        """Requeue the shard of a dead worker; returns 1 when it died before its first query."""
        assert slot.progress is not None  # a busy slot has a progress record
        task_id, j = slot.progress.read()
        slot.restart()
        if task_id != task.task_id or j < 0:
            pending.appendleft(task.unit)
            return 1
        index = task.unit.start + j
        crashes[index] += 1
        if crashes[index] > self.crash_retries:
            errors[index] = ErrorInfo.crash(crashes[index], str(exc).strip().splitlines()[-1])
            pending.extendleft(reversed(task.unit.parts_without(j, isolate=False)))
        else:  # retry, with the suspect query in a shard of its own so a second death is attributed
            pending.extendleft(reversed(task.unit.parts_without(j, isolate=True)))
        return 0

    def _watch(self, slot: _Slot, now: float, pending: deque, errors: dict) -> bool:
        """Check a busy worker's progress; kill it when a query hangs (returns True then)."""
        task = slot.task
        assert task is not None and slot.progress is not None  # a busy slot
        task_id, j = slot.progress.read()
        seen = (task_id == task.task_id, j)
        if seen != task.seen:
            task.seen, task.seen_at = seen, now
            return False
        waited = now - task.seen_at
        if not seen[0] or j < 0:
            if waited > self.start_timeout:
                raise ZOError(f"worker process {slot.index} did not start or load the oracle within "
                              f"{self.start_timeout:g} s (start_timeout)")
            return False
        if self.timeout is None or waited <= self.timeout + self.hang_grace:
            return False
        errors[task.unit.start + j] = ErrorInfo.timeout(self.timeout, "; its worker process was killed")
        pending.extendleft(reversed(task.unit.parts_without(j, isolate=False)))
        slot.restart()
        return True

