"""Budget properties (hypothesis): no estimator/optimizer/scheduler/failure-policy combination ever
lets the oracle receive more queries than its budget, and every count the library reports equals
the evaluations the user's function really received.

The user's function counts itself: each row it evaluates appends one byte to a file, so the count
is exact whichever process evaluates the row (the process pool runs it in workers). It fails
deterministically on some points (a CRC of the point's bytes), by raising or by returning NaN/inf,
either always or only on the first evaluation of a point ("transient": a retry then succeeds), so
the failure policies and their retries are exercised on every path.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoblackbox import (
    BudgetExhaustedError,
    ConfigError,
    CoordinateEstimator,
    FailurePolicy,
    FunctionOracle,
    OracleError,
    RandomEstimator,
    minimize,
)
from zoblackbox.schedule import FeatureReuseScheduler, ProcessPoolScheduler, SerialScheduler, VectorizedScheduler

# Deterministic in CI: a fixed seed per test, no example database, no deadline on a shared machine.
settings.register_profile("zoblackbox-properties", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile("zoblackbox-properties")


# --------------------------------------------------------------------------------------- the function
class Counted:
    """The user's function: a quadratic that counts every row it evaluates and fails on some points.

    Args:
        directory: where the counter file (and the markers of transient failures) live.
        fail_mod: a point fails when ``crc32(point bytes) % fail_mod == 0`` (0: never).
        kind: ``"raise"`` (an exception), ``"nan"`` or ``"inf"`` (a non-finite loss).
        transient: fail only on the first evaluation of a failing point.
        vectorized: take a ``(K, d)`` batch (a raising batch fails as a whole).
    """

    def __init__(self, directory: str, fail_mod: int = 0, kind: str = "raise", transient: bool = False,
                 vectorized: bool = False):
        self.directory, self.fail_mod, self.kind = directory, fail_mod, kind
        self.transient, self.vectorized = transient, vectorized
        self.counter = os.path.join(directory, "calls")

    def count(self) -> int:
        return os.path.getsize(self.counter) if os.path.exists(self.counter) else 0

    def _fails(self, row: torch.Tensor) -> bool:
        if not self.fail_mod:
            return False
        key = zlib.crc32(row.detach().cpu().numpy().tobytes())
        if key % self.fail_mod:
            return False
        if not self.transient:
            return True
        marker = os.path.join(self.directory, f"failed-{key}")
        if os.path.exists(marker):
            return False
        open(marker, "w").close()
        return True

    def __call__(self, x):
        X = x if self.vectorized else x[None]
        with open(self.counter, "ab") as f:  # O_APPEND: exact across processes
            f.write(b"." * X.shape[0])
        losses = ((X.double() - 0.3) ** 2).sum(1)
        for i in range(X.shape[0]):
            if self._fails(X[i]):
                if self.kind == "raise":
                    raise ValueError(f"simulated failure at {X[i].tolist()}")
                losses[i] = math.nan if self.kind == "nan" else math.inf
        return losses if self.vectorized else float(losses[0])


# --------------------------------------------------------------------------------------- strategies
@st.composite
def estimators(draw):
    mu = draw(st.sampled_from([1e-3, 5e-3, 0.05]))
    if draw(st.booleans()):
        return CoordinateEstimator(mu=mu, scheme=draw(st.sampled_from(["forward", "central"])))
    return RandomEstimator(mu=mu, q=draw(st.integers(1, 6)), directions=draw(st.sampled_from(
        ["gaussian", "sphere", "rademacher"])), antithetic=draw(st.booleans()), seed=draw(st.integers(0, 99)))


POLICIES = ["raise", "inf", "skip", "retry", FailurePolicy("raise", retries=1), FailurePolicy("inf", retries=2),
            FailurePolicy("skip", retries=5)]

failures = st.fixed_dictionaries({
    "fail_mod": st.sampled_from([0, 0, 2, 3, 5]),
    "kind": st.sampled_from(["raise", "nan", "inf"]),
    "transient": st.booleans(),
    "vectorized": st.booleans(),
})


def local_scheduler(name: str, max_chunk: int):
    return {"oracle": None, "serial": SerialScheduler(), "vectorized": VectorizedScheduler(max_chunk=max_chunk),
            "reuse": FeatureReuseScheduler(max_chunk=max_chunk)}[name]


def _retries(oracle) -> int:
    """Retries the oracle ran (each one a counted query)."""
    return sum(f.attempts - 1 for f in oracle.failures)


def _action(policy) -> str:
    return FailurePolicy.coerce(policy).action


# --------------------------------------------------------------------------------------- estimates
def check_estimate(directory, dim, estimator, coord_mask, policy, failure, oracle_budget, slack, warmup, scheduler,
                   seed):
    """One estimate: the oracle never overruns its budget, and Estimate.nfev, oracle.nfev and the
    function's own count agree, failures and retries included.

    ``oracle_budget`` is the oracle's budget from the start; ``slack`` (if not None) sets it after
    the warm-up to the estimate's cost plus ``slack``, so that budgets straddle the boundary."""
    fn = Counted(directory, **failure)
    oracle = FunctionOracle(fn, dim, vectorized=failure["vectorized"], budget=oracle_budget, on_failure=policy,
                            dtype=torch.float64)
    rng = np.random.default_rng(seed)
    for _ in range(warmup):  # queries spent before the estimate must not be counted in Estimate.nfev
        try:
            oracle.evaluate(rng.uniform(-1, 1, size=(2, dim)))
        except (OracleError, BudgetExhaustedError):
            pass
    assert oracle.nfev == fn.count()
    before, failures_before, retries_before = fn.count(), len(oracle.failures), _retries(oracle)
    x = torch.as_tensor(rng.uniform(-1, 1, size=dim))
    coords = None if coord_mask is None else [i for i in range(dim) if coord_mask[i % len(coord_mask)]] or [0]
    expected = estimator.num_queries(dim, None if coords is None else len(coords))
    if slack is not None:
        oracle.budget = oracle_budget = max(0, before + expected + slack)
    try:
        est = estimator.estimate(oracle, x, coords=coords, scheduler=scheduler)
    except BudgetExhaustedError:
        assert oracle_budget is not None and before + expected > oracle_budget
        assert fn.count() == before, "a refused batch spent queries"
        return
    except OracleError:
        assert _action(policy) == "raise"
        est = None
    assert oracle.nfev == fn.count()
    if oracle_budget is not None:
        assert fn.count() <= oracle_budget
    if est is None:
        return
    assert oracle_budget is None or before + expected <= oracle_budget
    new_failures = oracle.failures[failures_before:]
    retries = _retries(oracle) - retries_before
    assert est.nfev == fn.count() - before == expected + retries
    assert est.n_failed == sum(not f.resolved for f in new_failures)
    assert est.grad.shape == (dim,) and torch.isfinite(est.grad).all()
    if coords is not None:
        outside = torch.ones(dim, dtype=torch.bool)
        outside[coords] = False
        assert (est.grad[outside] == 0).all()


estimate_cases = {
    "dim": st.integers(1, 7),
    "estimator": estimators(),
    "coord_mask": st.one_of(st.none(), st.lists(st.booleans(), min_size=1, max_size=7)),
    "policy": st.sampled_from(POLICIES),
    "failure": failures,
    "oracle_budget": st.one_of(st.none(), st.integers(0, 40)),
    "slack": st.one_of(st.none(), st.integers(-2, 6)),
    "warmup": st.integers(0, 3),
    "seed": st.integers(0, 2**16),
}


@settings(PROFILE, max_examples=150)
@given(scheduler_name=st.sampled_from(["oracle", "serial", "vectorized", "reuse"]), max_chunk=st.integers(1, 5),
       **estimate_cases)
def test_estimate_counts_every_query_and_never_overruns_the_budget(scheduler_name, max_chunk, dim, estimator,
                                                                   coord_mask, policy, failure, oracle_budget, slack,
                                                                   warmup, seed):
    with tempfile.TemporaryDirectory() as directory:
        check_estimate(directory, dim, estimator, coord_mask, policy, failure, oracle_budget, slack, warmup,
                       local_scheduler(scheduler_name, max_chunk), seed)


# --------------------------------------------------------------------------------------- minimize
def check_minimize(directory, dim, estimator, optimizer, lr, policy, failure, budget, oracle_budget, maxiter,
                   scheduler, seed):
    """A whole run: never more than ``budget`` (nor the oracle's own budget) queries, retries and the
    final evaluation included; ``result.nfev`` is what the function received."""
    fn = Counted(directory, **failure)
    step_cost = estimator.num_queries(dim)
    budget, oracle_budget = (b[0] * step_cost + b[1] if isinstance(b, tuple) else b for b in (budget, oracle_budget))
    oracle = FunctionOracle(fn, dim, vectorized=failure["vectorized"], budget=oracle_budget, on_failure=policy,
                            dtype=torch.float64)
    x0 = np.random.default_rng(seed).uniform(-1, 1, size=dim)
    refused = (budget is None and maxiter is None) or (budget is not None and budget < step_cost + 1)
    try:
        res = minimize(oracle, x0, estimator=estimator, optimizer=optimizer, lr=lr, budget=budget, maxiter=maxiter,
                       scheduler=scheduler)
    except ConfigError:
        assert refused and fn.count() == 0
        return 0
    except OracleError:
        assert _action(policy) == "raise"
        res = None
    assert not refused
    calls = fn.count()
    assert oracle.nfev == calls
    if budget is not None:
        assert calls <= budget, f"{calls} queries for a budget of {budget}"
    if oracle_budget is not None:
        assert calls <= oracle_budget
    if res is None:
        return calls
    assert res.nfev == calls
    assert np.isfinite(res.x).all() and res.x.shape == (dim,)
    if res.success:
        assert math.isfinite(res.fun)
    steps = [h["nfev"] for h in res.history]
    assert steps == sorted(steps) and all(n <= res.nfev for n in steps) and len(steps) == res.nit
    if maxiter is not None:
        assert res.nit <= maxiter
    if not oracle.failures:  # exact accounting: every iteration costs step_cost, plus one final query
        final = 1 if oracle_budget is None or oracle_budget > res.nit * step_cost else 0
        assert res.nfev == res.nit * step_cost + final
        if "query budget reached" in res.message:  # ... and the run stops only when one more step would overrun
            assert res.nfev - final + step_cost + 1 > budget
    return calls


# a budget is absolute, or (k, extra): k iterations' cost plus extra, to straddle the boundaries
BUDGETS = st.one_of(st.none(), st.integers(0, 70), st.tuples(st.integers(0, 5), st.integers(0, 3)))
minimize_cases = {
    "dim": st.integers(1, 6),
    "estimator": estimators(),
    "optimizer": st.sampled_from(["sgd", "adam", "adamw", "signsgd"]),
    "lr": st.sampled_from([1e-3, 0.05, 0.5]),
    "policy": st.sampled_from(POLICIES),
    "failure": failures,
    "budget": BUDGETS,
    "oracle_budget": BUDGETS,
    "maxiter": st.one_of(st.none(), st.integers(0, 8)),
    "seed": st.integers(0, 2**16),
}


@settings(PROFILE, max_examples=150)
@given(scheduler_name=st.sampled_from(["oracle", "serial", "vectorized", "reuse"]), max_chunk=st.integers(1, 5),
       **minimize_cases)
def test_minimize_never_exceeds_its_budget_and_reports_the_real_count(scheduler_name, max_chunk, dim, estimator,
                                                                      optimizer, lr, policy, failure, budget,
                                                                      oracle_budget, maxiter, seed):
    with tempfile.TemporaryDirectory() as directory:
        check_minimize(directory, dim, estimator, optimizer, lr, policy, failure, budget, oracle_budget, maxiter,
                       local_scheduler(scheduler_name, max_chunk), seed)


@settings(PROFILE, max_examples=120)
@given(scheduler_name=st.sampled_from(["oracle", "serial", "vectorized", "reuse"]), max_chunk=st.integers(1, 5),
       noise=st.sampled_from([0.0, 0.0, 0.05]), max_ls=st.integers(1, 4),
       **{k: v for k, v in minimize_cases.items() if k not in ("optimizer", "lr")})
def test_lbfgs_never_exceeds_its_budget_and_reports_the_real_count(scheduler_name, max_chunk, noise, max_ls, dim,
                                                                   estimator, policy, failure, budget,
                                                                   oracle_budget, maxiter, seed):
    """``optimizer="lbfgs"`` spends queries on line-search trials, gradients without their base
    query and (with ``noise``) one for the averaged point: the same budget properties hold."""
    with tempfile.TemporaryDirectory() as directory:
        fn = Counted(directory, **failure)
        step_cost = estimator.num_queries(dim)
        budget, oracle_budget = (b[0] * step_cost + b[1] if isinstance(b, tuple) else b
                                 for b in (budget, oracle_budget))
        oracle = FunctionOracle(fn, dim, vectorized=failure["vectorized"], budget=oracle_budget, on_failure=policy,
                                dtype=torch.float64)
        x0 = np.random.default_rng(seed).uniform(-1, 1, size=dim)
        try:
            res = minimize(oracle, x0, estimator=estimator, optimizer="lbfgs", budget=budget, maxiter=maxiter,
                           scheduler=local_scheduler(scheduler_name, max_chunk),
                           optimizer_kwargs={"noise": noise, "max_ls": max_ls})
        except ConfigError:
            assert fn.count() == 0 and (budget is None and maxiter is None or budget is not None)
            return
        except OracleError:
            assert _action(policy) == "raise"
            res = None
        calls = fn.count()
        assert oracle.nfev == calls
        assert budget is None or calls <= budget, f"{calls} queries for a budget of {budget}"
        assert oracle_budget is None or calls <= oracle_budget
        if res is None:
            return
        assert res.nfev == calls and np.isfinite(res.x).all() and res.x.shape == (dim,)
        if res.success:
            assert math.isfinite(res.fun)
        steps = [h["nfev"] for h in res.history]
        assert steps == sorted(steps) and all(n <= res.nfev for n in steps)
        assert maxiter is None or res.nit <= maxiter


def test_retries_cannot_spend_the_queries_reserved_for_the_rest_of_the_batch(tmp_path):
    """Regression (found by the properties above): a failing first query retried with the budget
    the rest of its batch had reserved, so the batch overran the oracle's budget."""
    fn = Counted(str(tmp_path), fail_mod=1)  # every point fails, always
    oracle = FunctionOracle(fn, 2, budget=3, on_failure="retry", dtype=torch.float64)
    est = CoordinateEstimator().estimate(oracle, torch.zeros(2, dtype=torch.float64), scheduler=SerialScheduler())
    assert fn.count() == oracle.nfev == est.nfev == 3 and est.n_failed == 3


def test_minimize_budget_includes_retries(tmp_path):
    """Regression: minimize checked its budget only between iterations, so retries inside an
    iteration (and of the final evaluation) could spend more than ``budget``."""
    fn = Counted(str(tmp_path), fail_mod=1)
    oracle = FunctionOracle(fn, 2, on_failure="retry", dtype=torch.float64)
    res = minimize(oracle, np.zeros(2), estimator=CoordinateEstimator(), budget=4, optimizer="sgd", lr=1e-3)
    assert fn.count() == res.nfev <= 4
    assert oracle.budget is None  # the run's limit is lifted afterwards


# --------------------------------------------------------------------------------------- process pool
@pytest.fixture(scope="module")
def pool():
    with ProcessPoolScheduler(n_workers=2) as scheduler:
        yield scheduler


@settings(PROFILE, max_examples=5)
@given(**estimate_cases)
def test_process_pool_counts_every_query_and_never_overruns_the_budget(pool, dim, estimator, coord_mask, policy,
                                                                       failure, oracle_budget, slack, warmup, seed):
    with tempfile.TemporaryDirectory() as directory:
        check_estimate(directory, dim, estimator, coord_mask, policy, failure, oracle_budget, slack, warmup, pool,
                       seed)


@settings(PROFILE, max_examples=4)
@given(**{**minimize_cases,  # runs that do query the workers: a budget for 1-3 iterations, failures
          "budget": st.tuples(st.integers(2, 4), st.integers(0, 3)), "maxiter": st.none(), "oracle_budget": st.none(),
          "failure": failures.filter(lambda f: f["fail_mod"] > 0)})
def test_process_pool_minimize_never_exceeds_its_budget(pool, dim, estimator, optimizer, lr, policy, failure,
                                                        budget, oracle_budget, maxiter, seed):
    with tempfile.TemporaryDirectory() as directory:
        assert check_minimize(directory, dim, estimator, optimizer, lr, policy, failure, budget, oracle_budget,
                              maxiter, pool, seed) > 0
