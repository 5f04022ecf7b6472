"""ProcessPoolScheduler and DaskScheduler against the serial reference.

Contract: the same losses (bitwise), the same query counts and budgets, the same failure handling
as SerialScheduler, whatever the number of workers -- and failures of the machinery itself (a
worker that dies, a query that hangs, an oracle that cannot be shipped) reported, never hidden.
Worker processes are slow to start on small machines, so schedulers are module-scoped.
"""

import importlib
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from zoblackbox import CoordinateEstimator, FunctionOracle, RandomEstimator
from zoblackbox.errors import BudgetExhaustedError, ConfigError, MissingDependencyError, OracleError, ZOError
from zoblackbox.schedule import (
    ProcessPoolScheduler,
    RemoteQueryError,
    SerialScheduler,
    UnpicklableOracleError,
    WorkerCrashError,
)
from zoblackbox.schedule.pool import oracle_blob, split_ranges

D = 6
X0 = torch.tensor([0.3, 0.499, 0.999, -0.2, 0.1, 0.7], dtype=torch.float64)
# With mu = 5e-3 only the query that perturbs coordinate 1 (resp. 2) pushes x[1] past 0.5 (x[2] past 1).


def smooth(x):
    return float((x ** 2).sum() + torch.sin(3 * x).sum() + x[0] * x[3])


def failing(x):
    """Raises for the query that moves x[1] past 0.5, returns NaN for the one that moves x[2] past 1."""
    if x[1] > 0.5:
        raise ValueError(f"x[1]={float(x[1]):.4f} is out of range")
    if x[2] > 1.0:
        return float("nan")
    return smooth(x)


class SimulatorCrash(RuntimeError):
    """A user exception type that the main process cannot import by that name."""


def custom_raise(x):
    if x[1] > 0.5:
        raise SimulatorCrash("mesh inverted")
    return smooth(x)


class Transient:
    """Fails the first evaluation of each distinct point (marker files), succeeds afterwards."""

    def __init__(self, directory):
        self.directory = str(directory)

    def __call__(self, x):
        marker = os.path.join(self.directory, "q" + "_".join(f"{v:.17g}" for v in x.tolist()))
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ConnectionError("simulator license server busy")
        return smooth(x)


class KillOnce:
    """Kills its own worker process on the query that moves x[1] past 0.5, once (or always)."""

    def __init__(self, marker, always=False):
        self.marker = str(marker)
        self.always = always
        self.main_pid = os.getpid()  # never kill the test process itself (serial reference)

    def __call__(self, x):
        if x[1] > 0.5 and os.getpid() != self.main_pid and (self.always or not os.path.exists(self.marker)):
            open(self.marker, "w").close()
            os._exit(3)
        return smooth(x)


def sleepy(x):
    """Sleeps 60 s (an interruptible hang) on the query that moves x[1] past 0.5."""
    if x[1] > 0.5:
        time.sleep(60)
    return smooth(x)


def stuck(x):
    """Hangs with SIGALRM blocked (like C code that never returns to Python) on one query."""
    if x[1] > 0.5:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return smooth(x)


def make(fn, **kw):
    return FunctionOracle(fn, dim=D, dtype=torch.float64, **kw)


def estimators():
    return {
        "cge-forward": lambda: CoordinateEstimator(mu=5e-3),
        "cge-central": lambda: CoordinateEstimator(mu=5e-3, scheme="central"),
        "rge-gauss": lambda: RandomEstimator(mu=5e-3, q=9, seed=3),
        "rge-antithetic": lambda: RandomEstimator(mu=5e-3, q=5, directions="sphere", antithetic=True, seed=4),
    }


def reference(fn, estimator, x=X0, **kw):
    oracle = make(fn, **kw)
    est = estimator().estimate(oracle, x, scheduler=SerialScheduler())
    return est, oracle


def failure_summary(oracle):
    """Kinds, messages, attempts; the "query #N" prefix is left out: the oracle numbers a failure by
    its position in the batch it was recorded with, so after a retry serial and batched numbering differ."""
    return [(f.kind, f.message.split(" ", 2)[2], f.attempts, f.resolved) for f in oracle.failures]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pool1():
    with ProcessPoolScheduler(n_workers=1) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool2():
    with ProcessPoolScheduler(n_workers=2, timeout=2.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def dask_mod():
    return pytest.importorskip("zoblackbox.schedule.dask_cluster")


@pytest.fixture(scope="module")
def dask2(dask_mod):
    with dask_mod.DaskScheduler(n_workers=2) as scheduler:
        yield scheduler


@pytest.fixture(scope="module")
def dask1(dask_mod):
    with dask_mod.DaskScheduler(n_workers=1) as scheduler:
        yield scheduler


@pytest.fixture(params=["pool1", "pool2", "dask1", "dask2"])
def scheduler(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("name", list(estimators()))
def test_gradients_and_counts_match_serial(scheduler, name):
    estimator = estimators()[name]
    ref, ref_oracle = reference(smooth, estimator)
    oracle = make(smooth)
    est = estimator().estimate(oracle, X0, scheduler=scheduler)
    assert torch.equal(est.grad, ref.grad)  # bitwise, not approximately
    assert (est.f0, est.nfev, est.n_failed) == (ref.f0, ref.nfev, ref.n_failed)
    assert oracle.nfev == ref_oracle.nfev


@pytest.mark.parametrize("policy", ["inf", "skip", "retry"])
def test_nan_and_exception_failures_match_serial(scheduler, policy):
    ref, ref_oracle = reference(failing, estimators()["cge-forward"], on_failure=policy)
    oracle = make(failing, on_failure=policy)
    est = CoordinateEstimator(mu=5e-3).estimate(oracle, X0, scheduler=scheduler)
    assert torch.equal(est.grad, ref.grad)
    assert (est.nfev, est.n_failed) == (ref.nfev, ref.n_failed)
    assert oracle.nfev == ref_oracle.nfev
    assert oracle.failure_report() == ref_oracle.failure_report()
    assert failure_summary(oracle) == failure_summary(ref_oracle)  # same kinds, messages and attempts


def test_raise_policy_names_the_same_query(scheduler):
    with pytest.raises(OracleError) as ref:
        reference(failing, estimators()["cge-forward"])
    with pytest.raises(OracleError) as got:
        CoordinateEstimator(mu=5e-3).estimate(make(failing), X0, scheduler=scheduler)
    assert (got.value.query_index, got.value.kind, str(got.value)) == (
        ref.value.query_index, ref.value.kind, str(ref.value))
    assert isinstance(got.value.__cause__, ValueError)


def test_retries_run_in_the_workers(scheduler, tmp_path):
    (tmp_path / "serial").mkdir()
    (tmp_path / "remote").mkdir()
    ref, ref_oracle = reference(Transient(tmp_path / "serial"), estimators()["rge-gauss"], on_failure="retry")
    oracle = make(Transient(tmp_path / "remote"), on_failure="retry")
    est = RandomEstimator(mu=5e-3, q=9, seed=3).estimate(oracle, X0, scheduler=scheduler)
    assert torch.equal(est.grad, ref.grad)
    assert oracle.nfev == ref_oracle.nfev == 2 * 10
    assert oracle.failure_report() == ref_oracle.failure_report() == {
        "failed_queries": 10, "resolved_by_retry": 10, "by_kind": {"exception": 10}}
    assert "raw_evaluate" not in vars(oracle)  # the retry route is removed after the step


def test_budget_is_checked_before_any_query(scheduler):
    oracle = make(smooth, budget=D)  # a forward CGE step needs D + 1 queries
    with pytest.raises(BudgetExhaustedError):
        CoordinateEstimator().estimate(oracle, X0, scheduler=scheduler)
    assert oracle.nfev == 0
    exact = make(smooth, budget=D + 1)
    CoordinateEstimator().estimate(exact, X0, scheduler=scheduler)
    assert exact.nfev == exact.budget and exact.remaining == 0


# ---------------------------------------------------------------------------------------------- pool details
def test_worker_exception_is_rebuilt_with_its_name(pool2):
    ref, ref_oracle = reference(custom_raise, estimators()["cge-forward"], on_failure="inf")
    oracle = make(custom_raise, on_failure="inf")
    est = CoordinateEstimator(mu=5e-3).estimate(oracle, X0, scheduler=pool2)
    assert torch.equal(est.grad, ref.grad)
    assert failure_summary(oracle) == failure_summary(ref_oracle)
    assert oracle.failures[0].message == "query #2 raised SimulatorCrash: mesh inverted"
    with pytest.raises(OracleError) as err:
        CoordinateEstimator(mu=5e-3).estimate(make(custom_raise), X0, scheduler=pool2)
    exc = err.value.__cause__
    assert isinstance(exc, RemoteQueryError) and isinstance(exc, RuntimeError)
    assert type(exc).__name__ == "SimulatorCrash" and exc.remote_type.endswith(".SimulatorCrash")
    assert "mesh inverted" in exc.remote_traceback and "custom_raise" in exc.remote_traceback


def test_changed_oracle_is_shipped_again(pool2):
    oracle = make(smooth)
    token = oracle_blob(oracle).token
    CoordinateEstimator().estimate(oracle, X0, scheduler=pool2)
    assert oracle_blob(oracle).token == token  # counters do not count as a change
    oracle.fn = failing
    oracle.policy = oracle.policy.coerce("skip")
    est = CoordinateEstimator(mu=5e-3).estimate(oracle, X0, scheduler=pool2)
    assert est.n_failed == 2  # the workers evaluate the new function, not the cached one


def test_worker_killed_mid_step_gives_identical_result(pool2, tmp_path):
    ref, _ = reference(smooth, estimators()["cge-central"])
    oracle = make(KillOnce(tmp_path / "killed"))
    est = CoordinateEstimator(mu=5e-3, scheme="central").estimate(oracle, X0, scheduler=pool2)
    assert (tmp_path / "killed").exists()  # a worker really died during the step
    assert torch.equal(est.grad, ref.grad)
    assert oracle.nfev == 2 * D and oracle.failures == []


def test_query_that_always_kills_its_worker_is_a_failure(pool2, tmp_path):
    ref, _ = reference(smooth, estimators()["cge-forward"])
    oracle = make(KillOnce(tmp_path / "killed", always=True), on_failure="inf")
    est = CoordinateEstimator(mu=5e-3).estimate(oracle, X0, scheduler=pool2)
    assert oracle.nfev == D + 1 and len(oracle.failures) == 1
    assert "worker process died" in oracle.failures[0].message and "WorkerCrashError" in oracle.failures[0].message
    assert est.grad[1] == 0 and torch.equal(est.grad[[0, 2, 3, 4, 5]], ref.grad[[0, 2, 3, 4, 5]])
    with pytest.raises(OracleError) as err:
        CoordinateEstimator(mu=5e-3).estimate(make(KillOnce(tmp_path / "x", always=True)), X0, scheduler=pool2)
    assert isinstance(err.value.__cause__, WorkerCrashError)


@pytest.mark.parametrize("fn", [sleepy, stuck], ids=["interruptible", "uninterruptible"])
def test_pool_timeout_is_a_failure_under_the_policy(pool2, fn):
    ref, _ = reference(smooth, estimators()["cge-forward"])
    oracle = make(fn, on_failure="inf")
    started = time.monotonic()
    est = CoordinateEstimator(mu=5e-3).estimate(oracle, X0, scheduler=pool2)
    assert time.monotonic() - started < 30  # the query would sleep for 60 s
    assert [(f.kind, f.index) for f in oracle.failures] == [("timeout", 2)]
    assert est.n_failed == 1 and est.grad[1] == 0
    assert torch.equal(est.grad[[0, 2, 3, 4, 5]], ref.grad[[0, 2, 3, 4, 5]])
    again = CoordinateEstimator(mu=5e-3).estimate(make(smooth), X0, scheduler=pool2)  # the pool recovered
    assert torch.equal(again.grad, ref.grad)


def test_unpicklable_oracle_fails_before_any_query(pool1):
    lock = threading.Lock()

    def locked(x):
        with lock:
            return smooth(x)

    oracle = make(locked)
    with pytest.raises(UnpicklableOracleError, match=r"oracle\.fn\.<closure lock> \(lock\)") as err:
        CoordinateEstimator().estimate(oracle, X0, scheduler=pool1)
    assert isinstance(err.value, TypeError) and "No query was spent" in str(err.value)
    assert oracle.nfev == 0

    class WithStream(FunctionOracle):
        def __init__(self):
            super().__init__(smooth, dim=D)
            self.stream = (i for i in range(3))

    with pytest.raises(UnpicklableOracleError, match=r"oracle\.stream \(generator\)"):
        pool1.run(WithStream(), CoordinateEstimator().plan(X0))


def test_oracle_the_workers_cannot_import_is_reported(pool1, monkeypatch):
    module = types.ModuleType("zoblackbox_test_only_here")

    def f(x):
        return smooth(x)

    f.__module__, f.__qualname__, module.f = module.__name__, "f", f
    monkeypatch.setitem(sys.modules, module.__name__, module)  # importable here, not in the workers
    oracle = make(module.f)
    with pytest.raises(ZOError, match="could not be unpickled.*zoblackbox_test_only_here"):
        CoordinateEstimator().estimate(oracle, X0, scheduler=pool1)
    assert oracle.nfev == 0


def test_uneven_shards_give_the_same_result():
    with ProcessPoolScheduler(n_workers=2, shards_per_worker=3) as pool:
        for name in ("cge-central", "rge-gauss"):
            ref, _ = reference(smooth, estimators()[name])
            assert torch.equal(estimators()[name]().estimate(make(smooth), X0, scheduler=pool).grad, ref.grad)


def test_shards_are_balanced():
    assert split_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split_ranges(3, 8) == [(0, 1), (1, 2), (2, 3)]
    sizes = [b - a for a, b in split_ranges(1001, 16)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1001


def test_configuration_is_validated():
    bad_values = [("n_workers", 0), ("n_workers", 1.5), ("timeout", -1), ("timeout", math.inf),
                  ("shards_per_worker", 0), ("crash_retries", -1), ("compute_threads", True)]
    for name, value in bad_values:
        with pytest.raises(ConfigError, match=rf"{name} .*{value!r}"):
            ProcessPoolScheduler(**{name: value})
    with pytest.raises(TypeError, match="QueryPlan"):
        ProcessPoolScheduler(1).run(make(smooth), X0)


def test_closed_pool_refuses_to_run():
    pool = ProcessPoolScheduler(n_workers=1)
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(ZOError, match="closed"):
        pool.run(make(smooth), CoordinateEstimator().plan(X0))


# ---------------------------------------------------------------------------------------------- dask details
def test_dask_worker_killed_mid_step_gives_identical_result(dask2, tmp_path):
    ref, _ = reference(smooth, estimators()["cge-central"])
    oracle = make(KillOnce(tmp_path / "killed"))
    est = CoordinateEstimator(mu=5e-3, scheme="central").estimate(oracle, X0, scheduler=dask2)
    assert (tmp_path / "killed").exists()  # a worker really died during the step
    assert torch.equal(est.grad, ref.grad)
    assert oracle.nfev == 2 * D and oracle.failures == []


def test_dask_timeout_is_a_failure_under_the_policy(dask_mod, dask1):
    """On one worker: its restart also loses the oracle's only replica, which must be shipped again."""
    ref, _ = reference(smooth, estimators()["cge-forward"])
    with dask_mod.DaskScheduler(client=dask1.client, timeout=2.0) as scheduler:
        oracle = make(sleepy, on_failure="skip")
        started = time.monotonic()
        est = CoordinateEstimator(mu=5e-3).estimate(oracle, X0, scheduler=scheduler)
        assert time.monotonic() - started < 30  # the query would sleep for 60 s
        assert [(f.kind, f.index) for f in oracle.failures] == [("timeout", 2)]
        assert est.n_failed == 1 and torch.equal(est.grad[[0, 2, 3, 4, 5]], ref.grad[[0, 2, 3, 4, 5]])
        again = CoordinateEstimator(mu=5e-3).estimate(make(smooth), X0, scheduler=scheduler)
        assert torch.equal(again.grad, ref.grad)
    assert dask1.client.status == "running"  # a scheduler on a borrowed client leaves it open


def test_local_cluster_listens_on_localhost_only(dask2):
    psutil = pytest.importorskip("psutil")
    info = dask2.client.scheduler_info()
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert info["workers"] and all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
    me = psutil.Process()
    listening = [c.laddr.ip for p in [me, *me.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"127.0.0.1"}  # scheduler, nannies, workers, HTTP endpoints


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_dask_over_tls(dask_mod, tmp_path):
    from distributed.security import Security

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=zoblackbox-test"], check=True, capture_output=True, timeout=60)
    security = Security(tls_ca_file=cert, tls_client_cert=cert, tls_client_key=key, tls_scheduler_cert=cert,
                        tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)
    ref, _ = reference(smooth, estimators()["cge-forward"])
    with dask_mod.DaskScheduler(n_workers=1, security=security) as local:
        address = local.client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        with dask_mod.DaskScheduler(address, security=security) as remote:  # how a remote cluster is used
            est = CoordinateEstimator(mu=5e-3).estimate(make(smooth), X0, scheduler=remote)
    assert torch.equal(est.grad, ref.grad)


def test_dask_unpicklable_oracle_fails_before_any_query(dask2):
    lock = threading.Lock()
    oracle = make(lambda x: smooth(x) if lock else 0.0)
    with pytest.raises(UnpicklableOracleError, match="lock"):
        CoordinateEstimator().estimate(oracle, X0, scheduler=dask2)
    assert oracle.nfev == 0


def test_dask_arguments_are_validated(dask_mod, dask2):
    with pytest.raises(ConfigError, match="either"):
        dask_mod.DaskScheduler("tcp://127.0.0.1:1", client=dask2.client)
    with pytest.raises(ConfigError, match="local cluster"):
        dask_mod.DaskScheduler(client=dask2.client, n_workers=2)
    with pytest.raises(TypeError, match="Client"):
        dask_mod.DaskScheduler(client="tcp://127.0.0.1:1")


def test_missing_dask_names_the_extra(monkeypatch):
    from zoblackbox import schedule

    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.delitem(sys.modules, "zoblackbox.schedule.dask_cluster", raising=False)
    with pytest.raises(MissingDependencyError, match=r"pip install zoblackbox\[distributed\]"):
        importlib.import_module("zoblackbox.schedule.dask_cluster")
    with pytest.raises(MissingDependencyError):
        schedule.DaskScheduler  # noqa: B018 - the lazy attribute raises the same error
