"""minimize(), the torch.optim bridge and the torch module adapter."""

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoblackbox import ConfigError, CoordinateEstimator, FunctionOracle, RandomEstimator, ZOGradient, minimize
from zoblackbox.adapters import ModuleOracle


def _quad_oracle(quadratic, **kw):
    f, *_ = quadratic
    return FunctionOracle(f, dim=quadratic[2], dtype=torch.float64, **kw)


def test_minimize_reaches_the_minimum_of_a_quadratic(quadratic):
    f, _, d, A, b = quadratic
    x_star = torch.linalg.solve(A, -b)
    res = minimize(_quad_oracle(quadratic), np.zeros(d), estimator=CoordinateEstimator(scheme="central"),
                   optimizer="adam", lr=0.05, maxiter=800)
    assert res.success and res.nit == 800
    assert np.allclose(res.x, x_star.numpy(), atol=1e-3)
    assert res.fun == pytest.approx(f(x_star), abs=1e-6)
    assert res.nfev == 800 * 2 * d + 1
    assert len(res.history) == 800 and res.history[-1]["nfev"] == 800 * 2 * d


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "signsgd"])
@pytest.mark.parametrize("estimator", [CoordinateEstimator(), RandomEstimator(q=3, antithetic=True)])
def test_budget_is_exact_and_nfev_matches_the_oracle(quadratic, optimizer, estimator):
    oracle = _quad_oracle(quadratic)
    res = minimize(oracle, np.ones(quadratic[2]), estimator=estimator, optimizer=optimizer, lr=1e-3, budget=100)
    step = estimator.num_queries(quadratic[2])
    assert res.nfev == oracle.nfev <= 100
    assert res.nfev == (99 // step) * step + 1  # whole iterations, then the final evaluation
    assert res.fun < quadratic[0](np.ones(quadratic[2]))


def test_minimize_decreases_loss_with_rge(quadratic):
    res = minimize(_quad_oracle(quadratic), np.ones(quadratic[2]), estimator=RandomEstimator(q=10, seed=1), lr=0.05,
                   budget=3000)
    assert res.fun < 0.2 * quadratic[0](np.ones(quadratic[2]))


def test_callback_can_stop(quadratic):
    seen = []

    def cb(r):
        seen.append(r.nit)
        return r.nit == 3

    res = minimize(_quad_oracle(quadratic), np.zeros(quadratic[2]), maxiter=100, callback=cb)
    assert seen == [1, 2, 3] and res.nit == 3 and "callback" in res.message


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 5}, "budget=5 is below the cost of the default strategy's first step"),
    ({"budget": 5, "optimizer": "adam"}, "budget=5 is below the cost of one iteration"),
    ({"optimizer": "lbfgs-b", "maxiter": 1}, "unknown optimizer 'lbfgs-b'"),
    ({"lr": -1.0, "maxiter": 1}, "lr must be a positive finite number, got -1.0"),
    ({}, "give a budget"),
    ({"maxiter": -2}, "maxiter must be a non-negative int, got -2"),
])
def test_bad_arguments_are_refused_before_any_query(quadratic, kwargs, match):
    oracle = _quad_oracle(quadratic)
    with pytest.raises(ConfigError, match=match):
        minimize(oracle, np.zeros(quadratic[2]), **kwargs)
    assert oracle.nfev == 0


def test_bad_x0(quadratic):
    oracle = _quad_oracle(quadratic)
    d = quadratic[2]
    with pytest.raises(ConfigError, match="must be 1-D"):
        minimize(oracle, np.zeros((d, 1)), maxiter=1)
    with pytest.raises(ConfigError, match=f"length {d + 1}, expected the oracle's dim {d}"):
        minimize(oracle, np.zeros(d + 1), maxiter=1)
    x0 = np.zeros(d)
    x0[3] = np.nan
    with pytest.raises(ConfigError, match=r"non-finite entries at indices \[3\]"):
        minimize(oracle, x0, maxiter=1)
    with pytest.raises(TypeError, match="fun must be a callable or a zoblackbox Oracle, got int"):
        minimize(3, np.zeros(d), maxiter=1)
    assert oracle.nfev == 0


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("vectorize", [True, False])
def test_module_oracle_matches_the_model_and_autograd(vectorize):
    net, (xb, yb) = _tiny_net(), _batch()
    oracle = ModuleOracle(net, F.cross_entropy, batch=(xb, yb), vectorize=vectorize)
    x = oracle.get_params()
    assert oracle.dim == sum(p.numel() for p in net.parameters()) == 43
    assert oracle(x) == pytest.approx(F.cross_entropy(net(xb), yb).item(), rel=1e-12)
    est = CoordinateEstimator(mu=1e-6, scheme="central").estimate(oracle, x)
    F.cross_entropy(net(xb), yb).backward()
    g = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.allclose(est.grad, g, rtol=1e-6, atol=1e-8)
    assert torch.equal(oracle.get_params(), x)  # the module was never perturbed in place


def test_module_oracle_on_a_parameter_subset():
    net, batch = _tiny_net(), _batch()
    oracle = ModuleOracle(net, F.cross_entropy, params=["2.weight", "2.bias"], batch=batch)
    assert oracle.dim == 18 and oracle.param_names == ("2.weight", "2.bias")
    with pytest.raises(ConfigError, match="no parameter named 'fc.weight'"):
        ModuleOracle(net, F.cross_entropy, params=["fc.weight"])


def test_zo_gradient_fills_grad_like_backward_and_torch_optim_steps():
    net, (xb, yb) = _tiny_net(), _batch()
    ref = _tiny_net()
    F.cross_entropy(ref(xb), yb).backward()
    zo = ZOGradient(net, F.cross_entropy, estimator=CoordinateEstimator(mu=1e-6, scheme="central"))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.zero_grad()
    zo.backward(xb, yb)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    before = F.cross_entropy(net(xb), yb).item()
    opt.step()
    assert F.cross_entropy(net(xb), yb).item() < before
    assert zo.nfev == 2 * 43


def test_zo_gradient_accumulates_like_autograd():
    net, (xb, yb) = _tiny_net(), _batch()
    zo = ZOGradient(net, F.cross_entropy, estimator=CoordinateEstimator(mu=1e-6, scheme="central"))
    zo.backward(xb, yb)
    first = [p.grad.clone() for p in net.parameters()]
    zo.backward(xb, yb)
    for p, g in zip(net.parameters(), first):
        assert torch.allclose(p.grad, 2 * g)


def test_batchnorm_running_stats_untouched_by_queries_and_updated_once_per_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    xb, yb = _batch()
    zo = ZOGradient(net, F.cross_entropy, bn_policy="batch")
    bn = net[1]
    zo.oracle.set_batch(xb, yb)
    x = zo.oracle.get_params()
    zo.oracle.evaluate(torch.stack([x, x + 0.1]))
    assert torch.equal(bn.running_mean, torch.zeros(6, dtype=torch.float64)) and bn.num_batches_tracked == 0
    # the query in "batch" mode equals a training-mode forward with batch statistics
    net.train()
    expected = F.cross_entropy(net(xb), yb).item()  # this forward updates the stats once
    assert zo.oracle(x) == pytest.approx(expected, rel=1e-12)
    stats = bn.running_mean.clone()
    zo.backward(xb, yb)
    assert bn.num_batches_tracked == 2  # one update from the manual forward, one from the step
    assert not torch.equal(bn.running_mean, stats)
    assert net.training  # modes restored


def test_batchnorm_eval_policy_uses_running_stats():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    net[1].running_mean.fill_(0.5)
    xb, yb = _batch()
    oracle = ModuleOracle(net, F.cross_entropy, bn_policy="eval", batch=(xb, yb))
    net.eval()
    assert oracle(oracle.get_params()) == pytest.approx(F.cross_entropy(net(xb), yb).item(), rel=1e-12)


def test_module_oracle_bad_input():
    net = _tiny_net()
    with pytest.raises(ConfigError, match="bn_policy must be one of"):
        ModuleOracle(net, F.cross_entropy, bn_policy="train")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ModuleOracle(lambda x: x, F.cross_entropy)
    oracle = ModuleOracle(net, F.cross_entropy)
    with pytest.raises(ConfigError, match="no data batch"):
        oracle.evaluate(oracle.get_params()[None])


def test_auto_estimator_picks_cge_when_affordable_and_rge_under_tight_budgets():
    from zoblackbox.optim import auto_estimator

    assert isinstance(auto_estimator(10, 50), CoordinateEstimator)  # small d: CGE is as cheap as RGE
    assert isinstance(auto_estimator(1000, None), CoordinateEstimator)
    assert isinstance(auto_estimator(1000, 100 * 1001), CoordinateEstimator)
    rge = auto_estimator(1700, 30_000)  # the digits-CNN case: 17 CGE steps vs 1,428 RGE steps
    assert isinstance(rge, RandomEstimator) and rge.q == 20


def test_minimize_auto_default_under_a_tight_budget_uses_rge():
    oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=200, dtype=torch.float64)
    res = minimize(oracle, np.ones(200), lr=0.05, budget=2_100)
    assert res.nit == 99 and res.nfev == 99 * 21 + 1  # q=20 RGE steps, then the final evaluation
    assert res.fun < 200


def _rosenbrock(X):
    return (100 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (1 - X[:, :-1]) ** 2).sum(1)


def test_lbfgs_with_cge_solves_rosenbrock_within_an_exact_budget():
    calls = []

    def f(X):
        calls.append(X.shape[0])
        return _rosenbrock(X)

    oracle = FunctionOracle(f, 10, vectorized=True, dtype=torch.float64)
    res = minimize(oracle, np.zeros(10), estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs", lr=1.0,
                   budget=1500)
    assert res.fun < 1e-6 and res.fun == min(h["f0"] for h in res.history)  # the best point evaluated
    assert res.nfev == sum(calls) == oracle.nfev <= 1500
    assert res.nfev > 1500 - 12 or "converged" in res.message
    # Adam with the same estimator and budget is far behind on this valley
    adam = minimize(FunctionOracle(_rosenbrock, 10, vectorized=True, dtype=torch.float64), np.zeros(10),
                    estimator=CoordinateEstimator(mu=1e-6), optimizer="adam", lr=0.05, budget=1500)
    assert adam.fun > 100 * res.fun


def test_lbfgs_respects_maxiter_and_works_with_central_differences():
    oracle = FunctionOracle(_rosenbrock, 4, vectorized=True, dtype=torch.float64)
    res = minimize(oracle, np.zeros(4), estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs", maxiter=3)
    assert res.nit == 3 and "maxiter=3" in res.message and res.nfev == oracle.nfev
    central = FunctionOracle(_rosenbrock, 4, vectorized=True, dtype=torch.float64)
    res = minimize(central, np.zeros(4), estimator=CoordinateEstimator(mu=1e-4, scheme="central"),
                   optimizer="lbfgs", budget=400)
    assert res.fun < 1e-8 and res.nfev == central.nfev <= 400
    # torch's own L-BFGS (a class) still needs the base value from every estimate
    with pytest.raises(ConfigError, match="does not query the base point"):
        minimize(oracle, np.zeros(4), estimator=CoordinateEstimator(scheme="central"), optimizer=torch.optim.LBFGS,
                 maxiter=3)


def _rotated_quadratic(d, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = (q * torch.logspace(0, np.log10(cond), d, dtype=torch.float64)) @ q.T

    def f(X):
        Z = X - 1
        return 0.5 * ((Z @ A) * Z).sum(1)

    return f


def test_lbfgs_gradient_only_at_accepted_points_and_no_repeated_query():
    """Each iteration costs d queries for the gradient (the line search measured the base value)
    plus its trials; no point is ever queried twice; on a quadratic every line search is exact
    after at most two trials, so an iteration costs at most d + 2 queries."""
    d = 30
    f = _rotated_quadratic(d, 100.0)
    rows = []

    def counted(X):
        rows.extend(tuple(r.tolist()) for r in X)
        return f(X)

    oracle = FunctionOracle(counted, d, vectorized=True, dtype=torch.float64)
    res = minimize(oracle, np.zeros(d), estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs", maxiter=12)
    assert res.nit == 12 and res.nfev == len(rows) == oracle.nfev
    assert len(set(rows)) == len(rows)  # the base point of an estimate is never re-queried
    gradients = res.nit + 1
    trials = res.nfev - gradients * d - 1  # the loss at x0 is one query of its own
    assert res.nit <= trials <= 2 * res.nit + 4  # the first search may need a few more to find the scale
    assert [h["nfev"] for h in res.history] == sorted(h["nfev"] for h in res.history)
    fs = [h["f0"] for h in res.history]
    assert all(b < a for a, b in itertools.pairwise(fs))  # sufficient decrease at every iteration
    assert res.fun == fs[-1] == pytest.approx(float(f(torch.as_tensor(res.x)[None])[0]), rel=1e-12)


def test_lbfgs_beats_torch_lbfgs_and_scipy_at_twenty_gradients():
    """At 20 evaluations per dimension (the regime of benchmarks/peers_bbo.py at d = 1000) on a
    rotated quadratic of condition 100: zoblackbox's L-BFGS against ``torch.optim.LBFGS`` with a
    strong-Wolfe search on the same estimates, and scipy's L-BFGS-B with its own finite differences."""
    from scipy.optimize import minimize as sp_minimize

    d = 100
    budget = 20 * d
    f = _rotated_quadratic(d, 100.0, seed=1)
    f0 = float(f(torch.zeros(1, d, dtype=torch.float64))[0])

    def rel(x):
        return float(f(torch.as_tensor(np.asarray(x), dtype=torch.float64)[None])[0]) / f0

    ours = minimize(FunctionOracle(f, d, vectorized=True, dtype=torch.float64), np.zeros(d),
                    estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs", budget=budget)
    torch_lbfgs = minimize(FunctionOracle(f, d, vectorized=True, dtype=torch.float64), np.zeros(d),
                           estimator=CoordinateEstimator(mu=1e-6), optimizer=torch.optim.LBFGS, lr=1.0, budget=budget)
    calls = []

    def scalar(x):
        if len(calls) >= budget:
            raise StopIteration
        calls.append(1)
        return float(f(torch.as_tensor(x)[None])[0])

    best = {}
    try:
        sp = sp_minimize(scalar, np.zeros(d), method="L-BFGS-B", options={"maxfun": budget, "maxiter": budget},
                         callback=lambda xk: best.__setitem__("x", xk.copy()))
        best["x"] = sp.x
    except StopIteration:
        pass
    assert ours.nfev <= budget and torch_lbfgs.nfev <= budget and len(calls) <= budget
    assert rel(ours.x) < 0.2 * rel(torch_lbfgs.x)
    assert rel(ours.x) < 0.5 * rel(best["x"])


def test_lbfgs_with_noise_averages_the_iterates_at_the_noise_floor():
    """A noisy sphere: with ``noise=`` the run relaxes its line searches by the noise and returns
    the mean of the iterates whose gradient estimate is mostly noise; that point is several
    times closer to the minimum than the last iterate, and better than SGD on the same estimates."""
    d, sd = 50, 0.1
    gen = torch.Generator().manual_seed(5)

    def noisy(X):
        return ((X - 1) ** 2).sum(1) + sd * torch.randn(X.shape[0], generator=gen, dtype=torch.float64)

    def err(x):
        return float(((torch.as_tensor(x) - 1) ** 2).sum()) / d  # f(x0) / d = 1

    est = CoordinateEstimator(mu=5 * sd, scheme="central")
    last = []
    res = minimize(FunctionOracle(noisy, d, vectorized=True, dtype=torch.float64), np.zeros(d), estimator=est,
                   optimizer="lbfgs", budget=5000, optimizer_kwargs={"noise": sd},
                   callback=lambda r: last.append(r.x))
    assert res.nfev <= 5000 and "returned the mean of the last" in res.message
    assert err(res.x) < 0.25 * err(last[-1])
    sgd = minimize(FunctionOracle(noisy, d, vectorized=True, dtype=torch.float64), np.zeros(d), estimator=est,
                   optimizer="sgd", lr=0.1, budget=5000)
    assert err(res.x) < 0.5 * err(sgd.x)
    # without noise= the search chases the noise and ends far from the minimum
    plain = minimize(FunctionOracle(noisy, d, vectorized=True, dtype=torch.float64), np.zeros(d), estimator=est,
                     optimizer="lbfgs", budget=5000)
    assert err(res.x) < 0.25 * err(plain.x)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"history": 3}, "unknown L-BFGS option(s) ['history']"),
    ({"history_size": 0}, "history_size must be a positive int, got 0"),
    ({"max_ls": 2.5}, "max_ls must be a positive int, got 2.5"),
    ({"c1": 1.0}, "c1 must be in (0, 1), got 1.0"),
    ({"noise": -0.1}, "noise must be a finite number >= 0 (the standard deviation of one evaluation), got -0.1"),
    ({"noise": float("inf")}, "got inf"),
])
def test_lbfgs_options_are_checked_before_any_query(kwargs, match):
    oracle = FunctionOracle(_rosenbrock, 3, vectorized=True, dtype=torch.float64)
    with pytest.raises(ConfigError, match=re.escape(match)):
        minimize(oracle, np.zeros(3), optimizer="lbfgs", budget=100, optimizer_kwargs=kwargs)
    with pytest.raises(ConfigError, match=re.escape("budget=4 is below the cost of")):
        minimize(oracle, np.zeros(3), estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs", budget=4,
                 optimizer_kwargs={"noise": 0.1})
    with pytest.raises(ConfigError, match=re.escape("budget=7 is below the cost of the first L-BFGS gradient (8")):
        minimize(oracle, np.zeros(3), estimator=CoordinateEstimator(mu=1e-6, scheme="central"), optimizer="lbfgs",
                 budget=7, optimizer_kwargs={"noise": 0.1})
    assert oracle.nfev == 0


def test_lbfgs_stops_cleanly_on_a_non_finite_start_and_on_the_oracles_own_budget():
    def f(X):
        return torch.where(X[:, 0] > 0, torch.full_like(X[:, 0], float("nan")), (X**2).sum(1))

    bad = FunctionOracle(f, 2, vectorized=True, dtype=torch.float64, on_failure="inf")
    res = minimize(bad, np.array([1.0, 1.0]), optimizer="lbfgs", budget=50)
    assert not res.success and "not finite" in res.message and res.nfev == 1
    small = FunctionOracle(_rosenbrock, 3, vectorized=True, dtype=torch.float64, budget=7)
    res = minimize(small, np.zeros(3), estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs", budget=100)
    assert res.nfev == small.nfev <= 7 and "budget" in res.message and np.isfinite(res.x).all()


def test_lbfgs_auto_estimator_is_forward_cge_even_under_a_tight_budget():
    calls = []

    def f(X):
        calls.append(X.shape[0])
        return ((X - 0.5) ** 2).sum(1)

    d = 200  # a budget of 2,100 would make "auto" pick RGE (q=20) for Adam
    res = minimize(FunctionOracle(f, d, vectorized=True, dtype=torch.float64), np.zeros(d), optimizer="lbfgs",
                   budget=2_100)
    assert calls[0] == 1 and calls[1] == d  # the loss at x0, then one forward-CGE plan without its base query
    # at the minimum of the forward-difference model: each coordinate mu / 2 off, f = d (mu / 2)^2
    assert res.fun == pytest.approx(d * (5e-3 / 2) ** 2, rel=1e-3) and res.nfev <= 2_100


def test_results_print_even_without_failures():
    """scipy's OptimizeResult formatter raises on an empty dict (``failures['by_kind']`` of a clean
    run); minimize's results print."""
    for optimizer in ("adam", "lbfgs"):
        res = minimize(FunctionOracle(lambda x: float((x**2).sum()), 3), np.ones(3), optimizer=optimizer, maxiter=2)
        text = repr(res)
        assert "by_kind: {}" in text and "nfev:" in text and res.failures["by_kind"] == {}
