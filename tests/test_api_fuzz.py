"""A fuzz suite over the core Python API (hypothesis): minimize, AskTell (constructor and random
ask/tell/state_dict/load_state_dict sequences, junk told), the estimators, FunctionOracle, presets and
schedules.

The generic property: a call either succeeds with finite results (finite ``x``, ``nfev <= budget``,
exactly the queries counted) or raises a documented error -- a ``ZOError`` subclass, ``ValueError``
or ``TypeError`` -- whose message names the argument or shows the bad value; never another exception
type, never a hang, and a refused call spends no query (``OracleError`` -- a query that failed -- is
the only error raised after queries ran).

Default: about 40 s. ``ZOBLACKBOX_FUZZ=long`` runs ten times more examples.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from zoblackbox import AskTell, CoordinateEstimator, FunctionOracle, RandomEstimator, minimize
from zoblackbox.errors import CheckpointError, ConfigError, OracleError, ZOError
from zoblackbox.estimators import MAX_MU, MAX_Q, StepUnderflow
from zoblackbox.presets import ars_v2t, openai_es
from zoblackbox.schedules import Constant, WarmupCosine, schedule_from

try:
    from test_fuzz import JUNK, no_hang
except ImportError:  # pragma: no cover - run from another directory
    from tests.test_fuzz import JUNK, no_hang

LONG = os.environ.get("ZOBLACKBOX_FUZZ") == "long"
settings.register_profile("zoblackbox-api-fuzz", derandomize=not LONG, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
PROFILE = settings.get_profile("zoblackbox-api-fuzz")
ALLOWED = (ZOError, ValueError, TypeError)


def n(examples: int) -> int:
    return examples * 10 if LONG else examples


def fun(x):
    """Bounded (finite at every finite point and at +-inf), vectorized over leading axes."""
    x = np.asarray(x, dtype=np.float64)
    return np.sum(np.tanh(x - 0.3) ** 2, axis=-1)


def _mentions(message: str, names) -> bool:
    return any(name in message for name in names)


def attempt(call, names, *, calls=None):
    """``call()``; an exception must be documented and name one of ``names``; a refused call (not an
    OracleError) must have spent no query (``calls``: the list the black box appends to)."""
    spent = None if calls is None else len(calls)
    try:
        with no_hang(20):
            return call(), None
    except ALLOWED as exc:
        message = str(exc)
        if isinstance(exc, OracleError):  # a failed query: it names the query, not an argument
            names = [*names, "query", "loss"]
        if isinstance(exc, StepUnderflow):  # mu below the resolution at the point: names mu and x[i]
            names = [*names, "mu="]
        assert _mentions(message, names), f"{type(exc).__name__} names none of {names}: {message!r}"
        if calls is not None and not isinstance(exc, OracleError):
            assert len(calls) == spent, f"a refused call spent {len(calls) - spent} queries: {message!r}"
        return None, exc


def names_of(name, value) -> list[str]:
    """What a message may name: the argument or the value's repr (numpy reprs: their str too)."""
    out = [name, repr(value)]
    if isinstance(value, (np.generic, np.ndarray)):
        out.append(str(value))
    return out


def counting(calls):
    def f(x):
        x = np.asarray(x)
        calls.extend([1] * (x.shape[0] if x.ndim == 2 else 1))
        return fun(x)
    return f


# --------------------------------------------------------------------------------------------- values
ARRAYS = st.sampled_from([np.zeros(3), np.zeros(3, np.float32), np.arange(3), np.zeros((3, 1)), np.zeros(0),
                          np.array([np.nan, 0, 0]), np.array([1e300, 0, 0]), np.array([0, 0, np.inf]),
                          np.zeros(3, np.complex64), np.array(["a", "b", "c"]), torch.zeros(3),
                          torch.zeros(3, dtype=torch.float16), np.array([True, False, True]), [0.1, 0.2, 0.3],
                          "False", np.zeros(4)])
OPTIMIZER_KWARGS = st.sampled_from([{}, {"betas": "x"}, {"momentum": -1}, {"weight_decay": "a"}, {"foo": 1},
                                    {"momentum": 0.9}, {"weight_decay": 1e-3}, {"amsgrad": "False"},
                                    {"betas": (0.9, 2.0)}, {"eps": math.nan}, {"history_size": 3},
                                    {"history_size": -3}, {"noise": 0.1}, {1: 2}, {"max_iter": "x"},
                                    {"nesterov": True}, {"lr": 0.1}])
VALUES = {
    "lr": st.sampled_from([1e-3, 0.05, 1.0, 1e300, 1e-300, "0.1"]),
    "budget": st.integers(0, 60),
    "maxiter": st.integers(0, 5),
    "optimizer": st.sampled_from(["sgd", "adam", "ADAMW", "signsgd", "lbfgs", torch.optim.SGD, torch.optim.LBFGS,
                                  torch.optim.Adagrad, "False", "rmsprop", int]),
    "estimator": st.sampled_from(["auto", "cge", CoordinateEstimator(), RandomEstimator(q=3),
                                  CoordinateEstimator(scheme="central"), RandomEstimator(q=2, antithetic=True)]),
    "optimizer_kwargs": OPTIMIZER_KWARGS,
    "bounds": st.sampled_from([(-1, 1), (0.5, -0.5), ([-1] * 3, [1] * 3), (math.nan, 1), (-math.inf, math.inf),
                               ([-1, -1], [1, 1]), (0.1, 1), "False", (None, None)]),
    "seed": st.integers(-2**70, 2**70),
    "lr_schedule": st.sampled_from([WarmupCosine(10), Constant(), WarmupCosine(5, 2, 0.1), lambda s: "x",
                                    lambda s: math.nan, lambda s: -1.0, lambda s: 1]),
    "x0": ARRAYS,
    "vectorized": st.booleans(),
    "callback": st.sampled_from([lambda r: None, lambda r: True]),
    "progress": st.sampled_from([False, None, "False"]),
}


def value_for(name):
    return st.one_of(JUNK, VALUES[name]) if name in VALUES else JUNK


def check_result(res, budget, calls=None):
    assert np.isfinite(res.x).all(), f"a non-finite x: {res.x}"
    assert res.nfev <= (math.inf if budget is None else budget)
    if calls is not None:
        assert res.nfev == len(calls), (res.nfev, len(calls))
    assert not res.success or math.isfinite(res.fun)


# --------------------------------------------------------------------------------------------- minimize
MINIMIZE_ARGS = sorted(VALUES)


@settings(PROFILE, max_examples=n(1500))
@given(data=st.data(), name=st.sampled_from(MINIMIZE_ARGS), second=st.sampled_from([None] + MINIMIZE_ARGS))
def test_minimize_succeeds_finitely_or_refuses_naming_the_argument(data, name, second):
    calls: list = []
    kwargs = {"estimator": CoordinateEstimator(), "lr": 0.05, "budget": 30, "maxiter": None}
    if name == "budget" or second == "budget":
        kwargs["maxiter"] = 3
    x0 = np.zeros(3)
    drawn = {}
    for arg in (name, second):
        if arg is None:
            continue
        drawn[arg] = data.draw(value_for(arg), label=arg)
    budget, maxiter = drawn.get("budget", kwargs["budget"]), drawn.get("maxiter", kwargs["maxiter"])
    ints = all(v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) for v in (budget, maxiter))
    if ints:  # a budget of 2**64 queries with no maxiter (or the reverse) is a valid run that never ends
        assume((budget is not None and budget <= 10**4) or (maxiter is not None and maxiter <= 10**3))
    x0 = drawn.pop("x0", x0)
    kwargs.update(drawn)
    names = [w for arg, v in drawn.items() for w in names_of(arg, v)] + (["x0"] if "x0" in (name, second) else [])
    res, exc = attempt(lambda: minimize(counting(calls), x0, **kwargs), names + ["budget", "maxiter"], calls=calls)
    if exc is None:
        check_result(res, kwargs["budget"], calls)


def test_minimize_explains_an_x0_that_overflows_the_oracles_float32():
    oracle = FunctionOracle(lambda x: float((x ** 2).sum()), 2, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"x0 overflows float32 .*indices \[0\] are \[1e\+300\]"):
        minimize(oracle, np.array([1e300, 1.0]), budget=10)
    with pytest.raises(ConfigError, match=r"x0 overflows float32 .*\[1e\+300\]"):
        AskTell(np.array([1e300, 1.0]), dtype=torch.float32)
    assert oracle.nfev == 0


@pytest.mark.parametrize("optimizer, kwargs, words", [
    ("adam", {"betas": "x"}, ["betas", "'x'"]),
    ("sgd", {"momentum": -1}, ["momentum", "-1"]),
    ("adam", {"weight_decay": "a"}, ["weight_decay", "'a'"]),
    ("adam", {"foo": 1}, ["foo", "1"]),
    ("adamw", {"amsgrad": "False"}, ["amsgrad", "'False'"]),
    ("signsgd", {"momentum": 0.9}, ["momentum"]),
    (torch.optim.LBFGS, {"history_size": -3}, ["history_size", "-3"]),
    (torch.optim.LBFGS, {"max_iter": "x"}, ["max_iter", "'x'"]),
    ("sgd", {"lr": 0.1}, ["lr", "lr="]),
])
def test_bad_optimizer_kwargs_are_refused_when_the_engine_is_built(optimizer, kwargs, words):
    calls: list = []
    with pytest.raises(ConfigError) as info:
        AskTell(np.zeros(3), optimizer=optimizer, optimizer_kwargs=kwargs, budget=50)
    with pytest.raises(ConfigError):
        minimize(counting(calls), np.zeros(3), optimizer=optimizer, optimizer_kwargs=kwargs, budget=50)
    assert calls == []
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_an_lr_schedule_returning_junk_is_refused_before_any_query():
    calls: list = []
    for bad in ("x", math.nan, -1.0, None):
        with pytest.raises(ConfigError, match=rf"lr_schedule .* returned {bad!r} at step 0"):
            minimize(counting(calls), np.zeros(3), budget=20, lr_schedule=lambda s, bad=bad: bad)
    assert calls == []


def test_absurd_q_and_mu_are_refused_where_they_are_given():
    with pytest.raises(ConfigError, match=r"q=1000000000000000 directions per estimate is absurd"):
        RandomEstimator(q=10**15)
    for cls in (CoordinateEstimator, RandomEstimator):
        with pytest.raises(ConfigError, match=r"mu=1e\+300 is absurdly large"):
            cls(mu=1e300)
    assert RandomEstimator(q=MAX_Q).q == MAX_Q and CoordinateEstimator(mu=MAX_MU).mu == MAX_MU


# --------------------------------------------------------------------------------------------- AskTell
ASKTELL_ARGS = ["estimator", "optimizer", "lr", "budget", "seed", "bounds", "maxiter", "optimizer_kwargs",
                "lr_schedule", "on_failure", "evaluate_final", "dtype", "device", "x0"]
ASKTELL_VALUES = {
    "on_failure": st.sampled_from(["raise", "inf", "skip", "retry", "False"]),
    "evaluate_final": st.sampled_from([True, False, "False", 0]),
    "dtype": st.sampled_from([None, torch.float32, torch.float64, torch.int64, "float32", torch.float16]),
    "device": st.sampled_from([None, "cpu", "cuda:7", "nonsense", torch.device("cpu"), 3]),
}


@settings(PROFILE, max_examples=n(800))
@given(data=st.data(), name=st.sampled_from(ASKTELL_ARGS))
def test_asktell_constructor_succeeds_or_refuses_naming_the_argument(data, name):
    value = data.draw(st.one_of(JUNK, ASKTELL_VALUES[name]) if name in ASKTELL_VALUES else value_for(name),
                      label=name)
    kwargs = {"budget": 40, "maxiter": 8}  # the caller of ask/tell ends an unbounded run; this one is bounded
    x0 = np.zeros(3)
    if name == "x0":
        x0 = value
    else:
        kwargs[name] = value
    names = names_of(name, value) + (["x0"] if name == "x0" else [])
    engine, exc = attempt(lambda: AskTell(x0, **kwargs), names)
    if exc is not None:
        return
    with no_hang(20):
        for _ in range(500):
            _, exc = attempt(lambda: engine.done, names)  # mu below the resolution at x0: at the first ask
            if exc is not None:
                assert isinstance(exc, StepUnderflow) and engine.nfev == 0, exc
                return
            if engine.done:
                break
            X = engine.ask()
            X = X.numpy() if isinstance(X, torch.Tensor) else X
            assert X.ndim == 2 and np.isfinite(X.astype(np.float64)).all()
            engine.tell(fun(X.astype(np.float64)))
    check_result(engine.result(), engine.budget)


TOLD_JUNK = st.one_of(
    JUNK,
    st.lists(st.sampled_from([0.5, math.nan, math.inf, -math.inf, 1e308, -3.0]), max_size=6),
    st.sampled_from(["False", b"1", np.zeros((2, 2)), torch.zeros(4, 1), np.array([1 + 2j]), [[0.5]], {"a": 1},
                     torch.tensor([True]), np.array(["1"]), object()]),
)
OPERATIONS = st.lists(st.one_of(
    st.just(("ask",)), st.just(("tell",)), st.just(("tell",)), st.just(("tell",)),
    st.tuples(st.just("junk"), TOLD_JUNK), st.tuples(st.just("nfev"), JUNK), st.just(("reload",)),
    st.tuples(st.just("load"), st.one_of(JUNK, st.sampled_from([{"format": "zoblackbox-asktell"}, {}])))),
    max_size=16)


@settings(PROFILE, max_examples=n(600))
@given(ops=OPERATIONS,
       optimizer=st.sampled_from(["adam", "sgd", "lbfgs", torch.optim.LBFGS]),
       estimator=st.sampled_from(["cge", "rge", "central"]),
       on_failure=st.sampled_from(["raise", "inf", "skip"]), budget=st.integers(8, 40))
def test_random_ask_tell_sequences_keep_the_engine_consistent(ops, optimizer, estimator, on_failure, budget):
    est = {"cge": lambda: CoordinateEstimator(), "rge": lambda: RandomEstimator(q=2, seed=1),
           "central": lambda: CoordinateEstimator(scheme="central")}[estimator]()
    engine, exc = attempt(lambda: AskTell(np.zeros(3), estimator=est, optimizer=optimizer, budget=budget,
                                          on_failure=on_failure), ["estimator", "needs the loss at x"])
    if exc is not None:
        return
    for op in ops:
        before = (engine.nfev, engine.done)
        if op[0] == "ask":
            X, exc = attempt(engine.ask, ["done", "ask"])
            assert (exc is not None) == before[1]
            if exc is None:
                assert X.ndim == 2 and X.shape[1] == 3 and np.isfinite(X).all()
        elif op[0] == "tell":
            if engine.done:
                _, exc = attempt(lambda e=engine: e.tell([0.0]), ["tell"])
                assert exc is not None
            else:
                engine.tell(fun(engine.ask()))
        elif op[0] in ("junk", "nfev"):
            pending = None if engine.done else engine.ask()
            if op[0] == "junk":
                call = lambda e=engine, v=op[1]: e.tell(v)
            else:
                call = lambda e=engine, p=pending, v=op[1]: e.tell(fun(p) if p is not None else [0.0], nfev=v)
            _, exc = attempt(call, ["tell", "loss", "nfev"])
            if exc is not None:  # refused: nothing changed, the same points are pending
                assert (engine.nfev, engine.done) == before
                if pending is not None:
                    assert np.array_equal(engine.ask(), pending)
        elif op[0] == "reload":
            state = engine.state_dict()
            pending = None if engine.done else engine.ask()
            again = AskTell.from_state_dict(state, estimator=type(est)(**_spec(est)))
            assert again.nfev == engine.nfev and again.done == engine.done
            if pending is not None:
                np.testing.assert_array_equal(again.ask(), pending)
            engine = again
        else:
            pending = None if engine.done else engine.ask()
            _, exc = attempt(lambda e=engine, v=op[1]: e.load_state_dict(v), ["state", "format"])
            assert isinstance(exc, CheckpointError), exc
            assert (engine.nfev, engine.done) == before
            if pending is not None:
                assert np.array_equal(engine.ask(), pending)
        assert engine.nfev <= budget
    res = engine.result()
    assert np.isfinite(res.x).all() and res.nfev <= budget


def _spec(est):
    if isinstance(est, RandomEstimator):
        return {"q": est.q, "mu": est.mu}
    return {"mu": est.mu, "scheme": est.scheme}


# --------------------------------------------------------------------------------------------- estimators
ESTIMATOR_VALUES = {
    "mu": st.sampled_from([5e-3, 1e-6, 1e-320, 1e29, 1e31, 1e300, -1.0, 0.0]),
    "q": st.sampled_from([1, 3, 2**24, 2**24 + 1, 10**15, 0, -1, 2.0]),
    "scheme": st.sampled_from(["forward", "central", "backward", "False"]),
    "directions": st.sampled_from(["gaussian", "sphere", "rademacher", "uniform"]),
    "antithetic": st.sampled_from([True, False, "False", 0]),
    "seed": st.sampled_from([0, 1, 2**64 - 1, 2**64, -2**63, None]),
    "top_b": st.sampled_from([None, 1, 2, 3, 0]),
    "fitness_shaping": st.sampled_from([None, "std", "rank", "ranks", "False"]),
}
ESTIMATOR_PARAMS = {CoordinateEstimator: ["mu", "scheme"],
                    RandomEstimator: ["mu", "q", "directions", "antithetic", "seed", "top_b", "fitness_shaping"]}


@settings(PROFILE, max_examples=n(800))
@given(data=st.data(), cls=st.sampled_from([CoordinateEstimator, RandomEstimator]),
       x=st.one_of(ARRAYS, JUNK), coords=st.one_of(st.none(), st.sampled_from([[0, 2], [True, False, True], [3],
                                                                                 [], "0", [0, 0], [1.5]])),
       f0=st.one_of(st.none(), st.sampled_from([0.5, math.nan, math.inf, "1", True])), budget=st.integers(0, 12))
def test_estimators_are_built_and_estimate_or_refuse_naming_the_argument(data, cls, x, coords, f0, budget):
    name = data.draw(st.sampled_from(ESTIMATOR_PARAMS[cls]), label="argument")
    value = data.draw(st.one_of(JUNK, ESTIMATOR_VALUES[name]), label=name)
    kwargs = {name: value}
    if cls is RandomEstimator:
        kwargs.setdefault("q", 3)
        if name == "top_b":
            kwargs["antithetic"] = True
    est, exc = attempt(lambda: cls(**kwargs), names_of(name, value))
    if exc is not None or est.num_queries(3) > 50:
        return
    calls: list = []
    oracle = FunctionOracle(counting(calls), 3, budget=budget, on_failure="inf")
    out, exc = attempt(lambda: est.estimate(oracle, x, coords=coords, f0=f0),
                       ["x", "coords", "f0", "budget", "mu", "q", "oracle", "sample"], calls=calls)
    if exc is None:
        assert torch.isfinite(out.grad).all() and out.nfev == len(calls) == oracle.nfev <= budget


# --------------------------------------------------------------------------------------------- oracles
ORACLE_VALUES = {
    "dim": st.sampled_from([1, 3, 0, -1, 2**70, 3.0]),
    "budget": st.sampled_from([None, 0, 2, 100, -1, 2.5]),
    "on_failure": st.sampled_from(["raise", "inf", "skip", "retry", "ignore"]),
    "dtype": st.sampled_from([None, torch.float32, torch.float64, torch.int32, "float64"]),
    "vectorized": st.sampled_from([False, True, "False", 1]),
    "numpy": st.sampled_from([True, False, "True", 0]),
}
BATCHES = st.sampled_from([np.zeros((2, 3)), np.ones((1, 3), np.float32), np.zeros((0, 3)), np.zeros(3),
                           np.zeros((2, 4)), np.full((2, 3), np.nan), np.full((1, 3), 1e300),
                           np.zeros((2, 3), np.complex128), [[0.1, 0.2, 0.3]], "False", torch.zeros(3, 3)])


@settings(PROFILE, max_examples=n(600))
@given(data=st.data(), name=st.sampled_from(sorted(ORACLE_VALUES)), X=st.one_of(BATCHES, JUNK))
def test_function_oracles_are_built_and_evaluate_or_refuse_naming_the_argument(data, name, X):
    value = data.draw(st.one_of(JUNK, ORACLE_VALUES[name]), label=name)
    calls: list = []
    kwargs = {"dim": 3, name: value}
    oracle, exc = attempt(lambda: FunctionOracle(counting(calls), **kwargs), names_of(name, value))
    if exc is not None:
        return
    out, exc = attempt(lambda: oracle.evaluate(X), ["X", "budget", "shape", "dim", repr(X)], calls=calls)
    if exc is None:
        assert out.dtype == torch.float64 and out.dim() == 1 and oracle.nfev == out.shape[0]
        assert oracle.budget is None or oracle.nfev <= oracle.budget
        assert torch.isfinite(out).all() or oracle.policy.action in ("inf", "skip")


# --------------------------------------------------------------------------------------------- presets, schedules
PRESET_VALUES = {
    "n_directions": st.sampled_from([1, 4, 0, 2**25]), "top_b": st.sampled_from([1, 2, 4, 5, 0]),
    "step_size": st.sampled_from([0.02, 0.0, 1e300, math.inf]), "noise": st.sampled_from([0.03, 1e31, 1e-320]),
    "population": st.sampled_from([2, 8, 3, 0, 2**26]), "sigma": st.sampled_from([0.05, 1e31, -1.0]),
    "lr": st.sampled_from([0.01, 0.0, 1e300]), "weight_decay": st.sampled_from([0.0, 1e-3, -1.0, math.nan]),
    "seed": st.sampled_from([0, None, 2**64, -1]),
}
PRESET_DEFAULTS = {ars_v2t: {"n_directions": 4, "top_b": 2, "step_size": 0.02, "noise": 0.03},
                   openai_es: {"population": 8, "sigma": 0.05, "lr": 0.01}}


@settings(PROFILE, max_examples=n(400))
@given(data=st.data(), preset=st.sampled_from([ars_v2t, openai_es]))
def test_presets_build_usable_runs_or_refuse_naming_the_argument(data, preset):
    kwargs = dict(PRESET_DEFAULTS[preset])
    name = data.draw(st.sampled_from(sorted(set(kwargs) | {"seed"} | ({"weight_decay"} if preset is openai_es
                                                                      else set()))), label="argument")
    value = data.draw(st.one_of(JUNK, PRESET_VALUES[name]), label=name)
    kwargs[name] = value
    built, exc = attempt(lambda: preset(**kwargs), names_of(name, value))
    if exc is not None:
        return
    calls: list = []
    res, exc = attempt(lambda: minimize(counting(calls), np.zeros(3), budget=40, **built), ["budget"], calls=calls)
    if exc is None:
        check_result(res, 40, calls)


@settings(PROFILE, max_examples=n(400))
@given(data=st.data(), which=st.sampled_from(["WarmupCosine", "schedule_from"]))
def test_schedules_give_finite_factors_or_refuse_naming_the_argument(data, which):
    if which == "WarmupCosine":
        name = data.draw(st.sampled_from(["total_steps", "warmup_steps", "final_fraction"]), label="argument")
        value = data.draw(st.one_of(JUNK, st.sampled_from([0, 5, 10, 0.5, 1.0, 2.0, -1])), label=name)
        kwargs = {"total_steps": 10, name: value}
        call = lambda: WarmupCosine(**kwargs)
    else:
        name = data.draw(st.sampled_from(["name", "total_steps", "warmup_steps", "final_fraction"]), label="argument")
        value = data.draw(st.one_of(JUNK, st.sampled_from(["cosine", "constant", "linear", 0, 7, 0.25])), label=name)
        kwargs = {"name": "cosine", "total_steps": 10, name: value}
        call = lambda: schedule_from(**kwargs)
    schedule, exc = attempt(call, names_of(name, value) + (["lr schedule"] if name == "name" else []))
    if exc is not None:
        return
    factors = [schedule(step) for step in range(25)]
    assert all(math.isfinite(f) and 0 <= f <= 1 for f in factors), factors
    calls: list = []
    res, exc = attempt(lambda: minimize(counting(calls), np.zeros(3), budget=30, lr_schedule=schedule),
                       ["lr_schedule"], calls=calls)
    assert exc is None, exc
    check_result(res, 30, calls)


def test_tell_nfev_keeps_the_query_of_the_final_evaluation():
    engine = AskTell(np.zeros(3), estimator=CoordinateEstimator(), budget=8)
    X = engine.ask()
    with pytest.raises(ConfigError, match=r"nfev=8 would take the run past its budget of 8 \(0 used, 1 kept for "
                                          r"the final evaluation\)"):
        engine.tell(fun(X), nfev=8)
    engine.tell(fun(X), nfev=7)
    assert engine.nfev == 7 and not engine.done
    engine.tell(fun(engine.ask()))  # the final evaluation
    assert engine.done and engine.result().nfev == 8


def test_asktell_dtype_and_device_are_checked():
    with pytest.raises(ConfigError, match="dtype must be a floating-point torch.dtype or None, got 'float32'"):
        AskTell(np.zeros(3), dtype="float32")
    with pytest.raises(ConfigError, match="dtype .* got torch.int64"):
        AskTell(np.zeros(3), dtype=torch.int64)
    with pytest.raises(ConfigError, match="device"):
        AskTell(np.zeros(3), device="nonsense")


@pytest.mark.parametrize("losses", [[1 + 2j, 0, 0, 0], [True, False, True, False], ["1", "2", "3", "4"],
                                    np.array(["1", "2", "3", "4"]), [0.5, 0.5, "0.5", 0.5]])
def test_tell_never_casts_complex_bool_or_text_losses_silently(losses):
    engine = AskTell(np.zeros(3), estimator=CoordinateEstimator(), budget=20)
    X = engine.ask()
    with pytest.raises(ConfigError, match=r"tell\(\) takes 4 real losses"):
        engine.tell(losses)
    assert engine.nfev == 0 and np.array_equal(engine.ask(), X)
