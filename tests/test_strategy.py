"""The zero-configuration default (``optimizer="auto"``: zoblackbox.strategy.AutoStrategy), ECNoise,
relative coordinate steps and bounds for every update rule."""

import doctest
import io
import math

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, rosen

import zoblackbox.noise
import zoblackbox.optim
from zoblackbox import AskTell, ConfigError, CoordinateEstimator, minimize
from zoblackbox.noise import ecnoise
from zoblackbox.strategy import AutoStrategy


def _pseudo_noisy(x):
    """A sphere plus deterministic noise of size ~1e-3 (a function of x: a resumed run sees the same values)."""
    x = np.asarray(x, dtype=np.float64)
    jitter = math.sin(1e5 * float(x @ np.arange(1, x.size + 1)) + 0.5) * 1.7e-3
    return float(x @ x + 1.0 + jitter)


def _phases(res):
    return [d["phase"] for d in res.strategy["decisions"]]


def _rastrigin(x):
    x = np.asarray(x)
    return float(10 * x.size + (x * x - 10 * np.cos(2 * np.pi * x)).sum())


# ------------------------------------------------------------------------------------------------- ECNoise
def test_ecnoise_recovers_a_known_noise_level_and_reports_smooth_and_constant_lines():
    rng = np.random.default_rng(1)
    t = np.linspace(-1e-4, 1e-4, 7)
    for sigma in (1e-9, 1e-6, 1e-3):
        ratios = [ecnoise(np.exp(t) + sigma * rng.standard_normal(7)).sigma / sigma for _ in range(40)]
        assert 0.5 < float(np.median(ratios)) < 2.0, (sigma, np.median(ratios))
    assert ecnoise(np.ones(7)).status == "constant" and ecnoise(np.ones(7)).sigma == 0.0
    smooth = ecnoise(np.linspace(0, 1, 7) ** 2)  # a quadratic: only float64 rounding is left to see
    assert smooth.status == "ok" and smooth.sigma < 1e-15
    steep = ecnoise(np.exp(np.linspace(0, 10, 7)))  # the step is far too large: differences never turn to noise
    assert steep.status == "h too large"
    assert ecnoise([1.0, 2.0, float("nan"), 1.0, 2.0]).status == "not finite"
    with pytest.raises(ValueError, match="at least 5 values, got 3"):
        ecnoise([1.0, 2.0, 3.0])


def test_doctests_of_the_default_strategy_pages():
    for module in (zoblackbox.noise, zoblackbox.optim):
        failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert tried > 0 and failures == 0, module.__name__


# ------------------------------------------------------------------------------------------------- relative CGE
def test_relative_coordinate_steps_scale_with_x():
    est = CoordinateEstimator(mu=1e-4, relative=True)
    x = torch.tensor([0.5, -3.0, 200.0], dtype=torch.float64)
    plan = est.plan(x)
    steps = torch.zeros(3, dtype=torch.float64).index_put_((plan.coords,), plan.offsets.abs(), accumulate=False)
    assert torch.allclose(steps, torch.tensor([1e-4, 3e-4, 2e-2], dtype=torch.float64))
    losses = torch.tensor([float((plan.point(i) ** 2).sum()) for i in range(len(plan))], dtype=torch.float64)
    assert torch.allclose(est.combine(plan, losses).grad, 2 * x, rtol=1e-3)
    assert "relative=True" in repr(est)
    with pytest.raises(ConfigError, match="relative must be a bool, got 'yes'"):
        CoordinateEstimator(relative="yes")


# ------------------------------------------------------------------------------------------------- choices
def test_smooth_function_local_phase_reaches_machine_precision_like_scipy():
    res = minimize(rosen, np.zeros(10), budget=3000)
    assert res.fun < 1e-10 and res.nfev <= 3000
    assert res.strategy["noise"]["noisy"] is False
    assert _phases(res)[:3] == ["probe", "local", "local-central"]
    assert "estimator" in res.strategy["decisions"][1] and "relative=True" in res.strategy["decisions"][1]["estimator"]


def test_the_same_defaults_for_plain_vectorized_and_oracle_functions():
    from zoblackbox import FunctionOracle

    plain = minimize(_rastrigin, 2.2 * np.ones(3), budget=1200)
    vec = minimize(lambda X: np.array([_rastrigin(x) for x in X]), 2.2 * np.ones(3), budget=1200, vectorized=True)
    oracle = FunctionOracle(lambda X: torch.tensor([_rastrigin(x.numpy()) for x in X], dtype=torch.float64), 3,
                            vectorized=True, dtype=torch.float64)
    orc = minimize(oracle, torch.full((3,), 2.2, dtype=torch.float64), budget=1200)
    assert np.array_equal(plain.x, vec.x) and np.array_equal(plain.x, np.asarray(orc.x))
    assert plain.fun == vec.fun == orc.fun and plain.strategy == vec.strategy


def test_the_step_follows_the_scale_of_x():
    """A minimum at 1e6 * ones: absolute steps of 1e-8 would be below the resolution of x there."""
    center = 1e6 * np.ones(5)
    res = minimize(lambda x: float(((x - center) / center) @ ((x - center) / center)), center * 0.5, budget=600)
    assert res.fun < 1e-12


def test_noise_is_detected_and_handled_with_central_differences():
    rng = np.random.default_rng(0)
    sigma = 1e-3

    def noisy(x):
        return float((x * x).sum() + 1.0 + sigma * rng.standard_normal())

    res = minimize(noisy, 3 * np.ones(4), budget=2000)
    noise = res.strategy["noise"]
    assert noise["noisy"] is True and sigma / 3 < noise["sigma"] < 3 * sigma
    assert "central" in res.strategy["decisions"][1]["estimator"]
    assert float((res.x ** 2).sum()) < 1e-3  # from f - 1 = 36 at x0 (measured: 4e-5); the noise is 1e-3


def test_multimodal_function_gets_a_global_phase_that_beats_the_local_search():
    x0 = 3.3 * np.ones(4)
    local = minimize(_rastrigin, x0, budget=4000, optimizer="lbfgs", estimator=CoordinateEstimator(mu=1e-7))
    auto = minimize(_rastrigin, x0, budget=4000)
    assert "global" in _phases(auto) and auto.nfev <= 4000
    assert auto.fun < local.fun - 5  # the local search stops in the nearest of rastrigin's basins


def test_large_dimension_for_the_budget_goes_straight_to_sep_cma():
    res = minimize(lambda x: float((x * x).sum()), np.ones(100), budget=800)
    decision = res.strategy["decisions"][1]
    assert decision["phase"] == "global" and decision["variant"] == "sep-CMA-ES" and res.nfev <= 800
    assert res.fun < 100  # started at 100


def test_explicit_settings_are_kept_exactly():
    given = minimize(rosen, np.zeros(3), budget=100, estimator=CoordinateEstimator(mu=1e-3))
    adam = minimize(rosen, np.zeros(3), budget=100, estimator=CoordinateEstimator(mu=1e-3), optimizer="adam")
    assert np.array_equal(given.x, adam.x) and "strategy" not in given
    lr = minimize(rosen, np.zeros(3), budget=100, lr=1e-3)
    assert "strategy" not in lr and lr.nit > 1
    assert AskTell(np.zeros(3), budget=100)._config()["estimator"] == "auto"


def test_default_run_is_deterministic_and_leaves_the_global_numpy_rng_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = minimize(_rastrigin, 2.2 * np.ones(3), budget=1500)
    assert np.array_equal(np.random.get_state()[1], before)
    b = minimize(_rastrigin, 2.2 * np.ones(3), budget=1500)
    assert np.array_equal(a.x, b.x) and a.fun == b.fun and a.nfev == b.nfev
    c = minimize(_rastrigin, 2.2 * np.ones(3), budget=1500, seed=7)
    assert c.nfev == 1500


def test_budget_smaller_than_the_probe_is_refused_before_any_query():
    calls = []
    with pytest.raises(ConfigError, match="budget=6 is below the cost of the default strategy's first step"):
        minimize(lambda x: calls.append(x) or 0.0, np.zeros(3), budget=6)
    assert calls == []


def test_a_non_finite_loss_at_x0_is_an_error_naming_it():
    from zoblackbox import OracleError

    with pytest.raises(OracleError, match="query #0 returned the non-finite loss nan"):
        minimize(lambda x: float("nan"), np.zeros(3), budget=100)


# ------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("fun, x0, budget, kwargs", [
    (rosen, np.zeros(4), 900, {}), (_rastrigin, 3.3 * np.ones(3), 1500, {}),
    (_rastrigin, 3.3 * np.ones(3), 1500, {"bounds": (-4.0, 5.0)}), (_pseudo_noisy, 2 * np.ones(3), 1500, {})],
    ids=["rosen-local", "rastrigin-global", "rastrigin-bounded", "noisy-global"])
def test_resume_from_any_point_is_exact(fun, x0, budget, kwargs):
    def drive(s, steps=None):
        n = 0
        while not s.done and (steps is None or n < steps):
            s.tell([fun(x) for x in s.ask()])
            n += 1
        return s

    reference = drive(AskTell(x0, budget=budget, **kwargs)).result()
    assert "global" in _phases(reference) or fun is rosen
    assert reference.strategy["noise"]["noisy"] is (fun is _pseudo_noisy)
    for cut in (1, 2, 7, 40, 120, 300):
        s = drive(AskTell(x0, budget=budget, **kwargs), cut)
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        resumed = drive(AskTell.from_state_dict(state, **kwargs)).result()
        assert np.array_equal(resumed.x, reference.x), cut
        assert (resumed.nfev, resumed.nit, resumed.fun) == (reference.nfev, reference.nit, reference.fun), cut
        assert resumed.strategy == reference.strategy


def test_resume_keeps_an_explicit_strategy_seed():
    def run(s, steps=None):
        n = 0
        while not s.done and (steps is None or n < steps):
            s.tell([_rastrigin(x) for x in s.ask()])
            n += 1
        return s

    reference = run(AskTell(3.3 * np.ones(3), budget=1500, optimizer=AutoStrategy(seed=5))).result()
    other_seed = run(AskTell(3.3 * np.ones(3), budget=1500)).result()
    assert not np.array_equal(reference.x, other_seed.x)  # the seed matters, so the check below can fail
    s = run(AskTell(3.3 * np.ones(3), budget=1500, optimizer=AutoStrategy(seed=5)), 3)  # before CMA-ES starts
    resumed = run(AskTell.from_state_dict(s.state_dict())).result()
    assert np.array_equal(resumed.x, reference.x) and resumed.nfev == reference.nfev


def test_a_tampered_cma_state_is_refused():
    import pickle

    from zoblackbox.errors import CheckpointError
    from zoblackbox.strategy import _load_cma

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with pytest.raises(CheckpointError, match="builtins.print"):
        _load_cma(pickle.dumps(Evil()))

    class NumpyLoad:  # a numpy function that would unpickle a file of the attacker's choosing
        def __reduce__(self):
            return (np.load, ("/tmp/x.npy", None, True))

    with pytest.raises(CheckpointError, match="numpy.load"):
        _load_cma(pickle.dumps(NumpyLoad()))


# ------------------------------------------------------------------------------------------------- bounds
BOUND_FORMS = {
    "scipy Bounds": Bounds([-1.0, 0.5, -2.0], [0.3, 2.0, 2.0]),
    "pairs": [(-1.0, 0.3), (0.5, 2.0), (-2.0, 2.0)],
    "lower/upper": ([-1.0, 0.5, -2.0], [0.3, 2.0, 2.0]),
}


@pytest.mark.parametrize("optimizer", ["auto", "adam", "sgd", "signsgd", "lbfgs"])
@pytest.mark.parametrize("form", list(BOUND_FORMS))
def test_no_query_leaves_the_bounds_for_any_rule(optimizer, form):
    lower, upper = np.array([-1.0, 0.5, -2.0]), np.array([0.3, 2.0, 2.0])
    seen = []

    def f(x):
        seen.append(np.array(x))
        return float(((x - np.array([3.0, -3.0, 0.7])) ** 2).sum() + np.sin(5 * x).sum())

    x0 = np.array([0.3, 0.5, 0.0])  # on the bounds: forward steps must turn back
    kwargs = {} if optimizer == "auto" else {"optimizer": optimizer}
    res = minimize(f, x0, budget=400, bounds=BOUND_FORMS[form], **kwargs)
    pts = np.stack(seen)
    assert np.all(pts >= lower) and np.all(pts <= upper), optimizer
    assert np.all(res.x >= lower) and np.all(res.x <= upper)
    n = len(seen)
    assert res.fun == f(res.x) and len(seen) == n + 1  # the reported loss is the loss at the returned point
    if optimizer in ("auto", "lbfgs"):
        assert res.x[0] == pytest.approx(0.3) and res.x[1] == pytest.approx(0.5)  # the minimum is on the corner


def test_fixed_coordinates_lower_equal_upper():
    seen = []

    def f(x):
        seen.append(np.array(x))
        return _rastrigin(x)

    res = minimize(f, np.array([0.5, 1.0, 2.0]), budget=2000, bounds=[(0.5, 0.5), (-3, 3), (2.0, 2.0)])
    pts = np.stack(seen)
    assert np.all(pts[:, 0] == 0.5) and np.all(pts[:, 2] == 2.0) and res.nfev <= 2000
    assert "global" in _phases(res) and abs(res.x[1]) < 1e-6
    everything_fixed = minimize(f, np.zeros(3), budget=100, bounds=(0.0, 0.0))
    assert np.array_equal(everything_fixed.x, np.zeros(3))


def test_pairs_with_none_are_unbounded_sides():
    res = minimize(lambda x: float(((x - 5) ** 2).sum()), np.zeros(2), budget=300, bounds=[(None, 1.0), (-1, None)])
    assert res.x[0] == pytest.approx(1.0) and res.x[1] == pytest.approx(5.0, abs=1e-4)


def test_bad_bounds_are_refused_naming_the_value():
    f = lambda x: float((x * x).sum())
    with pytest.raises(ConfigError, match=r"lower\[1\]=3.0 exceeds upper\[1\]=2.0"):
        minimize(f, np.zeros(3), bounds=[(0, 1), (3, 2), (0, 1)], budget=100)
    with pytest.raises(ConfigError, match="outside the bounds"):
        minimize(f, np.zeros(3), bounds=Bounds(0.5, 1.0), budget=100)
    with pytest.raises(ConfigError, match="ambiguous"):  # both readings hold x0 and differ
        minimize(f, np.array([0.5, 1.0]), bounds=[(0.0, 1.0), (0.5, 2.0)], budget=100)
    res = minimize(f, np.array([0.8, 1.5]), bounds=[(0.0, 1.0), (0.5, 2.0)], budget=100)  # only pairs hold x0
    assert res.x[1] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"or 2 \(min, max\) pairs, got \[\(0, 1\), \(0, 1\), \(0, 1\)\]"):
        minimize(f, np.zeros(2), bounds=[(0, 1), (0, 1), (0, 1)], budget=100)


def test_strategy_repr_and_config():
    rule = AutoStrategy(seed=3)
    assert rule.config() == {"rule": "AutoStrategy", "seed": 3}
    assert math.isfinite(minimize(rosen, np.zeros(2), budget=50, optimizer=rule).fun)
