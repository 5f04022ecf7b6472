"""Fuzzed inputs over the public API (hypothesis).

Contract: a bad input is refused with one of the documented exceptions -- ``ConfigError`` (a
``ValueError``), ``TypeError``, ``OracleError``, ``BudgetExhaustedError``, ``CheckpointError`` --
whose message names the offending value; a good input gives the right answer. Never an exception
from deep inside torch/numpy/pickle, never a hang, never a silent wrong result (a NaN start
reported as a success, a cast that changes the data, a budget overrun, an absurd allocation).

Each test draws one argument at a time from a pool of junk (None, bools, huge ints, NaN/inf,
strings, bytes, complex numbers, lists, numpy scalars, dtypes, objects) or from arrays of every
dtype and shape, and decides from the documented rules whether it must be accepted.

"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pickle
import signal
from collections.abc import Mapping

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from zoblackbox import (
    BudgetExhaustedError,
    CheckpointError,
    ConfigError,
    CoordinateEstimator,
    Estimator,
    FailurePolicy,
    FunctionOracle,
    OracleError,
    QueryPlan,
    RandomEstimator,
    SignSGD,
    minimize,
)
from zoblackbox.checkpoint import load_checkpoint, save_checkpoint
from zoblackbox.data import load_cifar10
from zoblackbox.estimators import MAX_MU, MAX_Q
from zoblackbox.optim import OPTIMIZERS
from zoblackbox.params import ParamLayout
from zoblackbox.schedule import SerialScheduler, VectorizedScheduler
from zoblackbox.sparsity import CoordinateSampler, PruningRatios, check_sparsity, prunable_names, uniform_ratios

settings.register_profile("zoblackbox-fuzz", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
PROFILE = settings.get_profile("zoblackbox-fuzz")
REFUSALS = (ConfigError, TypeError)


# --------------------------------------------------------------------------------------------- helpers
class _Opaque:
    def __repr__(self) -> str:
        return "<opaque thing>"


JUNK = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.binary(max_size=4),
    st.complex_numbers(max_magnitude=10, allow_nan=False, allow_infinity=False),
    st.lists(st.integers(-3, 3), max_size=3),
    st.sampled_from([np.int64(3), np.int32(-1), np.uint8(7), np.float32(0.5), np.float64(-2.0), np.float64("nan"),
                     np.bool_(True), torch.float32, torch.int64, torch.complex64, _Opaque(), (), {}, [0.5]]),
)


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_py_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_positive_number(v) -> bool:
    """A positive finite Python number (numpy float64 is a float; float32 and numpy ints are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def refused(call, *names, allowed=REFUSALS) -> BaseException:
    """``call()`` must raise one of ``allowed`` (anything else propagates and fails the test) with a
    message containing each of ``names``."""
    with pytest.raises(allowed) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message, f"the message does not name {name!r}: {message!r}"
    return info.value


@contextlib.contextmanager
def no_hang(seconds: float = 20.0):
    """Fail (instead of hanging the suite) when the body takes longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def quad(x):
    return float(((x - 0.3) ** 2).sum())


VALID_DTYPES = (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8)
ALL_DTYPES = VALID_DTYPES + (np.bool_, np.complex64, np.complex128, np.uint16)


def _elements(dtype):
    if np.dtype(dtype).kind == "f" and np.dtype(dtype).itemsize >= 4:  # no overflow in (x - 0.3) ** 2 sums
        return st.one_of(st.floats(-1e6, 1e6, width=8 * np.dtype(dtype).itemsize),
                         st.sampled_from([math.nan, math.inf, -math.inf]))
    return None


@st.composite
def arrays(draw, min_dims=0, max_dims=3):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=4))
    return draw(hnp.arrays(dtype, shape, elements=_elements(dtype)))


def reference_losses(X: np.ndarray) -> torch.Tensor:
    """``quad`` of each row in float64, NaN where the loss is not finite (the ``skip`` policy)."""
    with np.errstate(all="ignore"):
        out = np.atleast_1d(((X.astype(np.float64) - 0.3) ** 2).sum(-1))
    out[~np.isfinite(out)] = np.nan
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------- oracle
DEVICES = [None, "cpu", "cpu:0", torch.device("cpu"), "nonsense", "cuda:99", -1, 1.5]
VALID_DEVICES = [None, "cpu", "cpu:0", torch.device("cpu")]
ORACLE_ARGS = {
    "dim": (st.one_of(JUNK, st.integers(-3, 10)), lambda v: is_int(v) and v >= 1),
    "budget": (st.one_of(JUNK, st.integers(-3, 10)), lambda v: v is None or (is_int(v) and v >= 0)),
    "dtype": (st.one_of(JUNK, st.sampled_from([torch.float16, torch.float64, torch.bool, torch.uint8, "float32"])),
              lambda v: v is None or (isinstance(v, torch.dtype) and v.is_floating_point)),
    "on_failure": (st.one_of(JUNK, st.sampled_from(["raise", "inf", "skip", "retry", "ignore", FailurePolicy()])),
                   lambda v: isinstance(v, FailurePolicy) or (isinstance(v, str) and v in
                                                              ("raise", "inf", "skip", "retry"))),
    "device": (st.sampled_from(DEVICES), lambda v: any(v is d or v == d for d in VALID_DEVICES)),
}


@settings(PROFILE, max_examples=250)
@given(data=st.data(), name=st.sampled_from(sorted(ORACLE_ARGS)))
def test_oracle_arguments_are_checked(data, name):
    strategy, valid = ORACLE_ARGS[name]
    value = data.draw(strategy, label=name)
    kwargs = {"dim": 3, name: value}
    if not valid(value):
        refused(lambda: FunctionOracle(quad, **kwargs), repr(value))
        return
    with no_hang():
        oracle = FunctionOracle(quad, **kwargs)  # a huge dim is only a number: nothing is allocated
    assert oracle.dim == int(kwargs["dim"]) and oracle.nfev == 0
    if oracle.dim > 64:
        refused(lambda: oracle(np.zeros(3)), "length 3", str(oracle.dim))
    elif oracle.budget == 0:
        refused(lambda: oracle(np.zeros(oracle.dim)), "budget of 0", allowed=BudgetExhaustedError)
    else:
        assert math.isclose(oracle(np.full(oracle.dim, 0.5)), 0.04 * oracle.dim, rel_tol=1e-2)
        assert oracle.nfev == 1


@settings(PROFILE, max_examples=250)
@given(X=arrays(), dim=st.integers(1, 4))
def test_oracle_evaluate_accepts_real_batches_only_and_is_exact(X, dim):
    oracle = FunctionOracle(quad, dim, on_failure="skip", dtype=torch.float64)
    if X.dtype.type not in VALID_DTYPES:
        refused(lambda: oracle.evaluate(X), str(X.dtype))
    elif X.ndim != 2 or X.shape[1] != dim or X.shape[0] == 0:
        refused(lambda: oracle.evaluate(X), str(tuple(X.shape)))
    else:
        out = oracle.evaluate(X)
        torch.testing.assert_close(out, reference_losses(X), rtol=1e-12, atol=0, equal_nan=True)
        assert oracle.nfev == X.shape[0] and len(oracle.failures) == int(out.isnan().sum())
        return
    assert oracle.nfev == 0


def as_array(value):
    """Lists and tuples are arrays to the library; other junk stays as it is."""
    return np.asarray(value) if isinstance(value, (list, tuple)) else value


@settings(PROFILE, max_examples=200)
@given(x=st.one_of(arrays(max_dims=2), JUNK.map(as_array)), dim=st.integers(1, 4))
def test_oracle_call_accepts_real_vectors_only_and_is_exact(x, dim):
    oracle = FunctionOracle(quad, dim, on_failure="skip", dtype=torch.float64)
    if not isinstance(x, np.ndarray):
        refused(lambda: oracle(x), repr(x))
    elif x.dtype.type not in VALID_DTYPES:
        refused(lambda: oracle(x), str(x.dtype))
    elif x.ndim != 1:
        refused(lambda: oracle(x), str(tuple(x.shape)))
    elif x.shape[0] != dim:
        refused(lambda: oracle(x), f"length {x.shape[0]}")
    else:
        torch.testing.assert_close(torch.tensor([oracle(x)], dtype=torch.float64), reference_losses(x),
                                   rtol=1e-12, atol=0, equal_nan=True)
        assert oracle.nfev == 1
        return
    assert oracle.nfev == 0


@settings(PROFILE, max_examples=60)
@given(k=st.integers(1, 5), returned=st.one_of(st.integers(0, 7).map(lambda n: [1.0] * n), JUNK),
       policy=st.sampled_from(["raise", "inf", "skip", "retry"]))
def test_vectorized_fn_returning_junk_is_an_error_and_still_counted(k, returned, policy):
    calls = []

    def fn(X):
        calls.append(X.shape[0])
        return returned

    oracle = FunctionOracle(fn, 2, vectorized=True, on_failure=policy)
    try:
        out = oracle.evaluate(np.zeros((k, 2)))
    except OracleError:
        pass
    else:  # the k losses returned, or failed queries (non-finite) under the policy: never a parsed string
        assert out.shape == (k,)
        arr = np.asarray(returned)
        if arr.dtype.kind in "biuf" and arr.size == k:
            expected = torch.as_tensor(arr.astype(np.float64).reshape(-1))
            finite = torch.isfinite(expected)
            assert torch.equal(out[finite], expected[finite]) and not torch.isfinite(out[~finite]).any()
        else:
            assert not torch.isfinite(out).any()
    assert oracle.nfev == sum(calls), "rows the function received are not all counted"


# --------------------------------------------------------------------------------------------- estimators
ESTIMATOR_ARGS = {
    (CoordinateEstimator, "mu"): lambda v: is_positive_number(v) and v <= MAX_MU,
    (CoordinateEstimator, "scheme"): lambda v: isinstance(v, str) and v in ("forward", "central"),
    (RandomEstimator, "mu"): lambda v: is_positive_number(v) and v <= MAX_MU,
    (RandomEstimator, "q"): lambda v: is_py_int(v) and 1 <= v <= MAX_Q,
    (RandomEstimator, "directions"): lambda v: isinstance(v, str) and v in ("gaussian", "sphere", "rademacher"),
    (RandomEstimator, "antithetic"): lambda v: isinstance(v, (bool, np.bool_)),
    (RandomEstimator, "seed"): lambda v: v is None or (is_int(v) and -2**63 <= v < 2**64),
}
EXTRA_VALUES = st.sampled_from(["forward", "central", "sphere", "rademacher", 0, -1, 1e-300, 5e-3, 2**64 - 1, 2**64])


@settings(PROFILE, max_examples=300)
@given(target=st.sampled_from(sorted(ESTIMATOR_ARGS, key=str)), value=st.one_of(JUNK, EXTRA_VALUES))
def test_estimator_hyperparameters_are_checked(target, value):
    cls, name = target
    if not ESTIMATOR_ARGS[target](value):
        refused(lambda: cls(**{name: value}), repr(value))
        return
    est = cls(**{name: value})
    if name != "seed":
        assert getattr(est, name) == (float(value) if name == "mu" else value)
    if cls is RandomEstimator and est.q <= 1000:  # the directions are a function of the seed, and finite
        again = cls(**{name: value})
        u = est.sample(5)
        assert torch.equal(u, again.sample(5)) and torch.isfinite(u).all() and u.shape == (est.q, 5)
    x = torch.linspace(-1, 1, 4, dtype=torch.float64)
    oracle = FunctionOracle(quad, 4, dtype=torch.float64)
    if est.num_queries(4) > 1000:
        return
    try:  # a valid estimator estimates, unless mu is below the resolution at x (refused, not a silent zero)
        grad = est.estimate(oracle, x).grad
    except ConfigError as exc:
        assert "resolution" in str(exc) and est.mu < 1e-10 and oracle.nfev == 0
        return
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


COORDS = st.one_of(
    st.lists(st.integers(-3, 9), max_size=8),
    st.lists(st.booleans(), max_size=8),
    st.lists(st.floats(-2, 8), min_size=1, max_size=3),
    st.lists(st.integers(2**63, 2**70), min_size=1, max_size=2),
    st.text(max_size=4), st.none(),
    st.sampled_from([[[0, 1]], [None, 1], 1.5, _Opaque()]),
)


@settings(PROFILE, max_examples=300)
@given(coords=COORDS, dim=st.integers(1, 6), central=st.booleans())
def test_coords_are_checked_and_estimates_stay_on_them(coords, dim, central):
    oracle = FunctionOracle(quad, dim, dtype=torch.float64)
    est = CoordinateEstimator(scheme="central" if central else "forward")
    x = torch.linspace(-1, 1, dim, dtype=torch.float64)

    def run():
        return est.estimate(oracle, x, coords=coords)

    if coords is None:
        chosen = list(range(dim))
    elif isinstance(coords, list) and coords and all(isinstance(c, bool) for c in coords):
        if len(coords) != dim:
            refused(run, f"({dim},)", f"({len(coords)},)")
            return
        chosen = [i for i, c in enumerate(coords) if c]
        if not chosen:
            refused(run, "no coordinate")
            return
    elif isinstance(coords, list) and all(is_py_int(c) and abs(c) < 2**63 for c in coords):
        if not coords:
            refused(run, "no coordinate", "[]")
            return
        bad = [c for c in coords if not 0 <= c < dim]
        if bad:
            refused(run, f"got an index {min(bad) if min(bad) < 0 else max(bad)}")
            return
        dups = sorted({c for c in coords if coords.count(c) > 1})
        if dups:
            refused(run, "duplicate", str(dups[0]))
            return
        chosen = coords
    elif coords == [[0, 1]]:  # any shape of indices is flattened
        chosen = [0, 1] if dim > 1 else None
        if chosen is None:
            refused(run, "got an index 1")
            return
    else:
        refused(run, repr(coords))
        assert oracle.nfev == 0
        return
    result = run()
    assert oracle.nfev == result.nfev == est.num_queries(dim, len(chosen))
    inside = torch.zeros(dim, dtype=torch.bool)
    inside[chosen] = True
    exact = 2 * (x - 0.3)  # central differences are exact on a quadratic; forward ones are off by mu
    torch.testing.assert_close(result.grad[inside], exact[inside], rtol=0, atol=1e-9 if central else 6e-3)
    assert (result.grad[~inside] == 0).all()


@settings(PROFILE, max_examples=100)
@given(what=st.sampled_from(["oracle", "scheduler"]), value=JUNK)
def test_estimate_refuses_what_is_not_an_oracle_or_a_scheduler(what, value):
    oracle = FunctionOracle(quad, 2)
    if what == "oracle":
        refused(lambda: CoordinateEstimator().estimate(value, [0.0, 0.0]), "oracle", repr(value))
    elif value is None:  # the default scheduler
        assert CoordinateEstimator().estimate(oracle, [0.0, 0.0], scheduler=value).nfev == oracle.nfev == 3
        return
    else:
        refused(lambda: CoordinateEstimator().estimate(oracle, [0.0, 0.0], scheduler=value), "scheduler", repr(value))
    assert oracle.nfev == 0


# --------------------------------------------------------------------------------------------- minimize
MINIMIZE_ARGS = ("lr", "budget", "maxiter", "optimizer", "estimator", "callback", "scheduler", "optimizer_kwargs",
                 "x0")
GOOD_OPTIMIZERS = st.sampled_from(["sgd", "Adam", "ADAMW", "signsgd", torch.optim.SGD, SignSGD])
VALID_MINIMIZE = {
    "lr": lambda v: v is None or is_positive_number(v),  # None: the optimizer's default
    "budget": lambda v: v is None or (is_int(v) and v >= 5),  # CGE at dim 3: 4 queries a step + 1
    "maxiter": lambda v: v is None or (is_int(v) and v >= 0),
    "optimizer": lambda v: (isinstance(v, str) and v.lower() in OPTIMIZERS)
    or (isinstance(v, type) and issubclass(v, torch.optim.Optimizer)),
    "estimator": lambda v: v is None or (isinstance(v, str) and v == "auto") or isinstance(v, Estimator),
    "callback": lambda v: v is None or callable(v),
    "scheduler": lambda v: v is None or callable(getattr(v, "run", None)),
    "optimizer_kwargs": lambda v: v is None or isinstance(v, Mapping),
}


def _minimize_value(name):
    extra = {
        "optimizer": st.one_of(GOOD_OPTIMIZERS, st.sampled_from([int, dict, "lbfgs"])),
        "estimator": st.sampled_from(["auto", "cge", CoordinateEstimator(), RandomEstimator(q=3)]),
        "callback": st.sampled_from([lambda r: None, lambda r: True]),
        "scheduler": st.sampled_from([SerialScheduler(), VectorizedScheduler(max_chunk=2)]),
        "optimizer_kwargs": st.sampled_from([{}, {"weight_decay": 0.0}]),
        "x0": st.one_of(arrays(max_dims=2), JUNK.map(as_array)),
        "budget": st.integers(0, 60),
        "lr": st.sampled_from([1e-3, 0.1, 1e300, 1e-300]),
    }.get(name)
    if name == "x0":
        return extra
    return JUNK if extra is None else st.one_of(JUNK, extra)


@settings(PROFILE, max_examples=400)
@given(data=st.data(), name=st.sampled_from(MINIMIZE_ARGS))
def test_minimize_refuses_each_bad_argument_before_any_query(data, name):
    value = data.draw(_minimize_value(name), label=name)
    oracle = FunctionOracle(quad, 3, dtype=torch.float64, on_failure="inf")  # a huge lr overflows the loss
    kwargs = {"x0": np.zeros(3), "estimator": CoordinateEstimator(), "lr": 0.05, "budget": 40, "maxiter": None}
    if name == "budget":
        kwargs["maxiter"] = 3
    kwargs[name] = value
    if name == "x0":
        valid = (isinstance(value, np.ndarray) and value.dtype.type in VALID_DTYPES and value.shape == (3,)
                 and bool(np.isfinite(value.astype(np.float64)).all()))
    else:
        valid = VALID_MINIMIZE[name](value)
    x0 = kwargs.pop("x0")
    if name == "x0" and not valid and isinstance(value, np.ndarray) and value.dtype.type in VALID_DTYPES \
            and value.shape == (3,):
        first = int(np.flatnonzero(~np.isfinite(value.astype(np.float64)))[0])
        refused(lambda: minimize(oracle, x0, **kwargs), "non-finite", f"[{first}")  # NaN/inf in x0: named
        assert oracle.nfev == 0
        return
    if not valid:
        if name != "x0" or not isinstance(value, np.ndarray):
            refused(lambda: minimize(oracle, x0, **kwargs), repr(value))
        elif value.dtype.type not in VALID_DTYPES:
            refused(lambda: minimize(oracle, x0, **kwargs), str(value.dtype))
        else:
            refused(lambda: minimize(oracle, x0, **kwargs), str(tuple(value.shape)) if value.ndim != 1
                    else f"length {value.shape[0]}")
        assert oracle.nfev == 0, "a refused call spent queries"
        return
    with no_hang():
        res = minimize(oracle, x0, **kwargs)
    assert res.nfev == oracle.nfev and res.nfev <= (kwargs["budget"] or math.inf)
    assert np.isfinite(res.x).all(), "a non-finite answer"
    assert not res.success or math.isfinite(res.fun)


@settings(PROFILE, max_examples=60)
@given(lr=st.floats(1e-3, 1e308), optimizer=st.sampled_from(sorted(OPTIMIZERS)),
       estimator=st.sampled_from([CoordinateEstimator(), RandomEstimator(q=3, seed=1)]), maxiter=st.integers(1, 6))
def test_minimize_never_returns_a_non_finite_point_as_a_success(lr, optimizer, estimator, maxiter):
    """tanh is bounded, so huge steps give finite losses all the way to x = +-inf: the run must stop
    at the last finite iterate and say so, not report inf/NaN as a success."""
    oracle = FunctionOracle(lambda x: float(torch.tanh(x).sum()), 2, dtype=torch.float64)
    res = minimize(oracle, np.zeros(2), estimator=estimator, optimizer=optimizer, lr=lr, maxiter=maxiter)
    assert np.isfinite(res.x).all()
    assert not res.success or math.isfinite(res.fun)
    if "non-finite" in res.message:
        assert not res.success


# --------------------------------------------------------------------------------------------- plans, policies
@st.composite
def plan_parts(draw):
    d = draw(st.integers(1, 4))
    m = draw(st.integers(0, 4))
    base_dtype = draw(st.sampled_from([np.float64, np.float32, np.int64]))
    base = draw(st.one_of(
        hnp.arrays(base_dtype, draw(st.sampled_from([(d,), (d,), (d, 1), ()])),
                   elements=st.floats(-10, 10, width=32) if base_dtype != np.int64 else st.integers(-10, 10)),
        JUNK))
    parts = {"base": torch.as_tensor(base) if isinstance(base, np.ndarray) else base,
             "include_base": draw(st.one_of(st.booleans(), st.sampled_from(["no", 1, None]))), "d": d}
    if draw(st.booleans()):
        parts["coords"] = torch.tensor(draw(st.lists(st.integers(-2, d + 1), min_size=m, max_size=m)),
                                       dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.float32])))
        parts["offsets"] = torch.tensor(draw(st.lists(st.floats(-1, 1, width=32), min_size=m, max_size=m + 1)),
                                        dtype=torch.float64)
    else:
        cols = draw(st.sampled_from([d, d, d + 1]))
        parts["directions"] = torch.tensor(draw(st.lists(st.lists(st.floats(-1, 1, width=32), min_size=cols,
                                                                  max_size=cols), min_size=m, max_size=m)),
                                           dtype=torch.float64).reshape(m, cols)
        parts["support"] = draw(st.one_of(st.none(), st.integers(-1, d + 1), st.just(1.5)))
    return parts


def plan_problems(base, parts) -> list[str]:
    """What the documented rules say is wrong with these plan fields (first problem first)."""
    if not (isinstance(base, torch.Tensor) and base.dim() == 1 and base.is_floating_point()):
        return ["base"]
    if not isinstance(parts["include_base"], bool):
        return ["include_base"]
    d = base.shape[0]
    if "coords" in parts:
        c, o = parts["coords"], parts["offsets"]
        if c.is_floating_point() or o.shape != c.shape or (c.numel() and not (0 <= int(c.min()) and int(c.max()) < d)):
            return ["coord"]
        return []
    if parts["directions"].shape[1] != d:
        return ["directions"]
    if not (parts["support"] is None or (is_py_int(parts["support"]) and 0 <= parts["support"] <= d)):
        return ["support"]
    return []


@settings(PROFILE, max_examples=300)
@given(parts=plan_parts())
def test_query_plans_are_checked_and_their_points_are_exact(parts):
    parts.pop("d")
    base = parts["base"]
    if isinstance(base, (list, tuple)):  # array-likes are converted
        base = torch.as_tensor(np.asarray(base))
    problems = plan_problems(base, parts)
    if problems:
        refused(lambda: QueryPlan(**parts), problems[0])
        return
    plan = QueryPlan(**parts)
    shift = int(plan.include_base)
    expected = base.repeat(len(plan), 1)
    for j in range(plan.num_perturbations):
        if plan.kind == "coordinate":
            expected[shift + j, int(plan.coords[j])] += plan.offsets[j].to(base.dtype)
        else:
            expected[shift + j] += plan.directions[j].to(base.dtype)
    assert torch.equal(plan.points(), expected)
    for i in range(len(plan)):
        assert torch.equal(plan.point(i), expected[i])
    refused(lambda: plan.point(len(plan)), str(len(plan)), allowed=IndexError)
    refused(lambda: plan.point(0.5), "0.5")


@settings(PROFILE, max_examples=150)
@given(action=st.one_of(JUNK, st.sampled_from(["raise", "inf", "skip", "retry"])),
       retries=st.one_of(JUNK, st.integers(-2, 5)))
def test_failure_policies_are_checked(action, retries):
    good_action = isinstance(action, str) and action in ("raise", "inf", "skip")
    good_retries = is_py_int(retries) and retries >= 0
    if not good_action:
        refused(lambda: FailurePolicy(action, retries), repr(action))
    elif not good_retries:
        refused(lambda: FailurePolicy(action, retries), repr(retries))
    else:
        assert FailurePolicy(action, retries).retries == retries
    if not (isinstance(action, str) and action in ("raise", "inf", "skip", "retry")):
        refused(lambda: FailurePolicy.coerce(action), repr(action))


# --------------------------------------------------------------------------------------------- huge sizes
@settings(PROFILE, max_examples=40)
@given(q=st.integers(2**22, MAX_Q), dim=st.integers(2 * 10**5, 10**6), budget=st.integers(0, 200),
       antithetic=st.booleans())
def test_huge_plans_are_refused_by_the_budget_before_anything_is_allocated(q, dim, budget, antithetic):
    """q * dim * 8 bytes is at least 6 TB: were the plan built before the budget check, the allocation
    would fail at once (sizes near the machine's memory could instead get the test run OOM-killed).
    (q itself is capped at MAX_Q = 2**24 where it is given: RandomEstimator(q=10**15) is refused.)"""
    calls = []
    oracle = FunctionOracle(lambda x: calls.append(1) or 0.0, dim, budget=budget)
    est = RandomEstimator(q=q, antithetic=antithetic)
    cost = est.num_queries(dim)
    with no_hang():
        refused(lambda: est.estimate(oracle, np.zeros(dim)), str(cost), str(budget), allowed=BudgetExhaustedError)
        refused(lambda: minimize(oracle, np.zeros(dim), estimator=est, budget=budget + 1), f"budget={budget + 1}")
        res = minimize(oracle, np.zeros(dim), estimator=est, maxiter=2)  # only the oracle's own budget limits it
    assert not res.success and "own budget" in res.message and res.nit == 0
    assert oracle.nfev == len(calls) == min(1, budget)  # the final evaluation, if the budget allows it


@settings(PROFILE, max_examples=30)
@given(dim=st.integers(2**31, 2**70))
def test_huge_dims_cost_nothing_until_a_point_of_that_size_is_given(dim):
    with no_hang(5):
        oracle = FunctionOracle(quad, dim)
        refused(lambda: oracle(np.zeros(3)), "length 3", str(dim))
        refused(lambda: oracle.evaluate(np.zeros((2, 3))), "(2, 3)")
        refused(lambda: minimize(oracle, np.zeros(3), maxiter=1), "length 3")
        refused(lambda: CoordinateEstimator().estimate(oracle, np.zeros(3)), "length 3")
    assert oracle.nfev == 0


def test_vectorized_scheduler_refuses_points_larger_than_its_memory_budget_before_any_query():
    oracle = FunctionOracle(quad, 1000)
    refused(lambda: CoordinateEstimator().estimate(oracle, np.zeros(1000), scheduler=VectorizedScheduler(1000)),
            "memory_budget=1000")
    assert oracle.nfev == 0


# --------------------------------------------------------------------------------------------- sparsity
@st.composite
def layouts(draw):
    n = draw(st.integers(1, 3))
    names, shapes = [], []
    for i in range(n):
        names.append(f"l{i}.weight")
        shapes.append((draw(st.integers(1, 4)), draw(st.integers(1, 4))))
        if draw(st.booleans()):
            names.append(f"l{i}.bias")
            shapes.append((shapes[-1][0],))
    return ParamLayout(tuple(names), tuple(shapes))


@settings(PROFILE, max_examples=150)
@given(layout=layouts(), sparsity=st.one_of(JUNK, st.floats(0, 1)))
def test_sparsity_targets_are_checked(layout, sparsity):
    if not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0 <= sparsity < 1):
        refused(lambda: check_sparsity(sparsity), repr(sparsity))
        refused(lambda: uniform_ratios(layout, sparsity), repr(sparsity))
        return
    assert check_sparsity(sparsity) == sparsity
    ratios = uniform_ratios(layout, sparsity)
    assert set(ratios.ratios) == set(prunable_names(layout)) and set(ratios.ratios.values()) == {float(sparsity)}


@settings(PROFILE, max_examples=150)
@given(layout=layouts(), data=st.data(), kind=st.sampled_from(["random", "magnitude", "other", None]),
       biases=st.sampled_from(["dense", "layer", "all", None]), seed=st.integers(0, 2**32))
def test_coordinate_sampler_draws_exactly_the_promised_coordinates(layout, data, kind, biases, seed):
    ratios = PruningRatios({n: data.draw(st.floats(0, 1), label=n) for n in prunable_names(layout)}, 0.5, "test")
    make = lambda: CoordinateSampler(layout, ratios, kind=kind, seed=seed, biases=biases)
    if kind not in ("random", "magnitude"):
        refused(make, repr(kind))
        return
    if biases not in ("dense", "layer"):
        refused(make, repr(biases))
        return
    sampler = make()
    x = torch.randn(layout.dim, generator=torch.Generator().manual_seed(seed))
    active = sampler.sample(x)
    assert active.dtype == torch.long and active.shape == (sampler.n_active,)
    assert (active[1:] > active[:-1]).all() and int(active[0]) >= 0 and int(active[-1]) < layout.dim
    for i, name in enumerate(layout.names):
        lo, hi = layout.offsets[i], layout.offsets[i + 1]
        kept = int(((active >= lo) & (active < hi)).sum())
        assert kept == sampler.keep[name] and 1 <= kept <= hi - lo
        if name in ratios.ratios:
            assert kept == min(hi - lo, max(1, round((1 - ratios.ratios[name]) * (hi - lo))))


@settings(PROFILE, max_examples=50)
@given(arg=st.sampled_from(["seed", "layout", "ratios"]), value=JUNK)
@example(arg="seed", value=1.5)
def test_coordinate_sampler_refuses_junk_arguments_naming_them(arg, value):
    layout = ParamLayout(("w",), ((3, 2),))
    kwargs = {"layout": layout, "ratios": uniform_ratios(layout, 0.5), "seed": 0, arg: value}
    assume(not (arg == "seed" and is_int(value)))
    refused(lambda: CoordinateSampler(kwargs["layout"], kwargs["ratios"], seed=kwargs["seed"]), repr(value))


JSON_SCALARS = st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers(-5, 5) | st.text(max_size=4)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)


@settings(PROFILE, max_examples=150)
@given(layout=layouts(), data=st.data())
def test_ratio_files_are_validated_against_the_layout(layout, data, tmp_path):
    names = list(prunable_names(layout))
    values = {n: data.draw(st.one_of(st.floats(0, 1), JSON_VALUES), label=n) for n in names}
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps({"ratios": values}))
    bad = [(n, v) for n, v in values.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1]
    if bad:
        refused(lambda: PruningRatios.from_json(path, layout), repr(bad[0][0]), repr(bad[0][1]))
        return
    assert PruningRatios.from_json(path, layout).ratios == values


@settings(PROFILE, max_examples=100)
@given(content=st.one_of(st.binary(max_size=40), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                         JSON_VALUES.map(lambda v: json.dumps({"ratios": {"w": 0.5}, "sparsity": v}).encode())))
@example(content=b"\xff\xfe")
@example(content=b'{"ratios": {"w": 0.5}, "sparsity": "abc"}')
def test_ratio_files_of_garbage_are_refused_naming_the_file(content, tmp_path):
    path = tmp_path / "garbage.json"
    path.write_bytes(content)
    try:
        PruningRatios.from_json(path, ParamLayout(("w",), ((3, 2),)))
    except ConfigError as exc:
        assert str(path) in str(exc) or "pruning ratio" in str(exc)


@settings(PROFILE, max_examples=100)
@given(names=st.one_of(JUNK, st.lists(st.text(max_size=2), max_size=3).map(tuple)),
       shapes=st.one_of(JUNK, st.lists(st.tuples(st.integers(-2, 3)), max_size=3).map(tuple)))
def test_param_layouts_are_checked(names, shapes):
    valid = (isinstance(names, tuple) and len(set(names)) == len(names) and isinstance(shapes, tuple)
             and len(shapes) == len(names) and all(k >= 0 for s in shapes for k in s))
    if not valid:
        if not (isinstance(names, tuple) and len(set(names)) == len(names)):
            named = repr(names)
        elif not (isinstance(shapes, tuple) and len(shapes) == len(names)):
            named = repr(shapes)
        else:
            named = repr(next(s for s in shapes if any(k < 0 for k in s)))
        refused(lambda: ParamLayout(names, shapes), named)
        return
    layout = ParamLayout(names, shapes)
    assert layout.dim == sum(k for s in shapes for k in s) and layout.dim >= 0


# --------------------------------------------------------------------------------------------- CIFAR-10 files
def _batch_bytes(data, labels) -> bytes:
    return pickle.dumps({b"batch_label": b"fuzz", b"labels": labels, b"data": data, b"filenames": []}, protocol=2)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(_batch_bytes(rng.integers(0, 256, (2, 3072), dtype=np.uint8), [i, 0]))
    return root


@st.composite
def mutated_batches(draw):
    n = draw(st.integers(1, 2))
    good = bytearray(_batch_bytes(np.full((n, 3072), 7, np.uint8), [3] * n))
    if draw(st.booleans()):
        return bytes(good[:draw(st.integers(0, len(good) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        good[draw(st.integers(0, len(good) - 1))] = draw(st.integers(0, 255))
    return bytes(good)


@settings(PROFILE, max_examples=200)
@given(content=st.one_of(st.binary(max_size=120), mutated_batches()))
def test_cifar_loader_refuses_garbage_files_naming_them(cifar_root, content):
    path = cifar_root / "test_batch"
    path.write_bytes(content)
    try:
        split = load_cifar10(cifar_root, normalize=False)
    except ConfigError as exc:
        assert str(path) in str(exc)
        return
    x, y = split.x_test, split.y_test  # a mutation that kept the file valid: the data must be sound
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and x.shape[0] == y.shape[0]
    assert torch.isfinite(x).all() and (x >= 0).all() and (x <= 1).all()
    assert y.dtype == torch.int64 and ((y >= 0) & (y <= 9)).all()


CIFAR_DATA = st.one_of(
    st.integers(1, 3).flatmap(lambda n: hnp.arrays(st.sampled_from([np.uint8, np.int64, np.float64, np.int8]),
                                                   st.sampled_from([(n, 3072), (n, 3071), (3072,)]))),
    st.tuples(st.integers(-300, 300), st.integers(1, 2)).map(lambda t: [[t[0]] * 3072] * t[1]),
    JUNK,
)
CIFAR_LABELS = st.one_of(st.lists(st.integers(-2, 12), max_size=3), st.lists(st.floats(0, 9), max_size=2),
                         st.lists(st.text(max_size=1), max_size=2), JUNK)


@settings(PROFILE, max_examples=150)
@given(data=CIFAR_DATA, labels=CIFAR_LABELS)
def test_cifar_loader_accepts_only_integer_pixels_and_labels_and_never_casts_silently(cifar_root, data, labels):
    path = cifar_root / "test_batch"
    path.write_bytes(_batch_bytes(data, labels))
    arr = np.asarray(data) if isinstance(data, (np.ndarray, list)) else None
    lab = labels if isinstance(labels, list) and all(is_py_int(v) for v in labels) else None
    valid = (arr is not None and arr.dtype.kind in "iu" and arr.ndim == 2 and arr.shape[1] == 3072
             and arr.min() >= 0 and arr.max() <= 255
             and lab is not None and len(lab) == arr.shape[0] and all(0 <= v <= 9 for v in lab))
    if not valid:
        refused(lambda: load_cifar10(cifar_root, normalize=False), str(path), allowed=ConfigError)
        return
    split = load_cifar10(cifar_root, normalize=False)
    expected = torch.from_numpy(arr.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)
    assert torch.equal(split.x_test, expected) and split.y_test.tolist() == lab


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved checkpoint and the bytes of its files (each test example rewrites them)."""
    directory = tmp_path_factory.mktemp("ckpt")
    pt = save_checkpoint(directory, {"w": torch.arange(3.0), "step": 2}, {"epoch": 1}, tag=1)
    js = pt.with_suffix(".json")
    files = {p: p.read_bytes() for p in (pt, js, directory / "latest.json")}

    def restore():
        for path, content in files.items():
            path.write_bytes(content)
        return directory, pt, js

    return restore


@settings(PROFILE, max_examples=120)
@given(meta=st.one_of(st.binary(max_size=60), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                      st.fixed_dictionaries({"format": st.sampled_from(["zoblackbox-checkpoint", "other"]),
                                             "version": st.one_of(st.just(1), st.integers(), st.text(max_size=3),
                                                                  st.floats(allow_nan=True), st.none()),
                                             "sha256": st.text(max_size=8)}).map(lambda v: json.dumps(v).encode())))
def test_checkpoint_metadata_of_garbage_is_refused(checkpoint, meta):
    _, pt, js = checkpoint()
    js.write_bytes(meta)
    err = refused(lambda: load_checkpoint(js), allowed=CheckpointError)
    assert js.name in str(err) or pt.name in str(err)


# torch.load's weights-only unpickler warns about the unknown pickle protocol of a garbage payload
# before refusing it: the warning is the expected effect of the garbage, the refusal is what is tested
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@settings(PROFILE, max_examples=100)
@given(payload=st.binary(max_size=60))
@example(payload=b"\x80")
@example(payload=b"\x80\x02.")
def test_checkpoint_payload_of_garbage_with_a_matching_checksum_is_refused(checkpoint, payload):
    _, pt, js = checkpoint()
    pt.write_bytes(payload)
    meta = json.loads(js.read_text())
    js.write_text(json.dumps({**meta, "sha256": hashlib.sha256(payload).hexdigest()}))
    refused(lambda: load_checkpoint(js), pt.name, allowed=CheckpointError)


@settings(PROFILE, max_examples=60)
@given(pointer=st.one_of(st.binary(max_size=30), JSON_VALUES.map(lambda v: json.dumps({"checkpoint": v}).encode())))
@example(pointer=b"\xff")
@example(pointer=b'{"checkpoint": 5}')
def test_checkpoint_pointer_of_garbage_is_refused(checkpoint, pointer):
    directory, _, _ = checkpoint()
    (directory / "latest.json").write_bytes(pointer)
    try:
        load_checkpoint(directory)
    except CheckpointError as exc:
        assert "latest.json" in str(exc) or "ckpt" in str(exc)


def test_the_fuzzed_checkpoint_loads_when_intact(checkpoint):
    """The garbage tests above must not pass merely because loading always fails."""
    directory, pt, _ = checkpoint()
    for path in (directory, pt):
        state, meta = load_checkpoint(path)
        assert torch.equal(state["w"], torch.arange(3.0)) and meta["epoch"] == 1
