"""Estimators against analytic answers; autograd is never used; bad input is refused."""

import re

import pytest
import torch

from zoblackbox import ConfigError, CoordinateEstimator, FunctionOracle, RandomEstimator
from zoblackbox.schedule import SerialScheduler


def _oracle(f, d, **kw):
    return FunctionOracle(f, dim=d, dtype=torch.float64, **kw)


def test_central_cge_matches_analytic_gradient_of_quadratic(quadratic):
    f, grad, d, *_ = quadratic
    x = torch.linspace(-1, 1, d, dtype=torch.float64)
    est = CoordinateEstimator(scheme="central").estimate(_oracle(f, d), x)
    rel = (est.grad - grad(x)).norm() / grad(x).norm()
    assert rel < 1e-6
    assert est.nfev == 2 * d and est.f0 is None


def test_forward_cge_exact_on_linear_and_reports_f0():
    w = torch.tensor([1.5, -2.0, 0.25, 4.0], dtype=torch.float64)
    o = _oracle(lambda x: float(w @ x + 3.0), 4)
    x = torch.tensor([0.1, 0.2, -0.3, 0.4], dtype=torch.float64)
    est = CoordinateEstimator(mu=1e-3).estimate(o, x)
    assert torch.allclose(est.grad, w, rtol=1e-9, atol=1e-9)
    assert est.f0 == pytest.approx(float(w @ x + 3.0))
    assert est.nfev == 5 == o.nfev


def test_forward_cge_bias_is_half_mu_times_curvature(quadratic):
    f, grad, d, A, _ = quadratic
    x = torch.zeros(d, dtype=torch.float64)
    mu = 1e-2
    est = CoordinateEstimator(mu=mu).estimate(_oracle(f, d), x)
    expected = grad(x) + 0.5 * mu * torch.diagonal(A)  # forward difference of a quadratic
    assert torch.allclose(est.grad, expected, atol=1e-10)


def test_cge_on_a_coordinate_subset():
    o = _oracle(lambda x: float((x ** 2).sum()), 6)
    x = torch.arange(6, dtype=torch.float64)
    est = CoordinateEstimator(scheme="central").estimate(o, x, coords=[1, 4])
    assert torch.allclose(est.grad, torch.tensor([0, 2.0, 0, 0, 8.0, 0], dtype=torch.float64))
    assert est.nfev == 4
    mask = torch.zeros(6, dtype=torch.bool)
    mask[[1, 4]] = True
    est2 = CoordinateEstimator(scheme="central").estimate(o, x, coords=mask)
    assert torch.equal(est.grad, est2.grad)


@pytest.mark.parametrize("directions", ["gaussian", "sphere", "rademacher"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_rge_mean_converges_to_gradient(quadratic, directions, antithetic):
    """Probabilistic: the mean of 4,000 single-direction estimates (seeded) is within 10% (L2) of
    the true gradient; unbiased for a quadratic with the documented scaling."""
    f, grad, d, *_ = quadratic
    x = torch.linspace(-1, 1, d, dtype=torch.float64)
    est = RandomEstimator(mu=1e-4, q=4000, directions=directions, antithetic=antithetic, seed=3)
    g = est.estimate(_oracle(f, d), x).grad
    rel = float((g - grad(x)).norm() / grad(x).norm())
    assert rel < 0.1, rel


def test_rge_scaling_is_unbiased_not_just_aligned(quadratic):
    """Scale check (seeded): the mean of 50 seeds of q=400 sphere estimates has the gradient's norm
    within 3% and lies within 6% (L2) of it; a missing factor n would be off by 12x."""
    f, grad, d, *_ = quadratic
    x = torch.ones(d, dtype=torch.float64)
    mean = sum(RandomEstimator(q=400, directions="sphere", seed=s, antithetic=True).estimate(_oracle(f, d), x).grad
               for s in range(50)) / 50
    assert abs(float(mean.norm() / grad(x).norm()) - 1) < 0.03
    assert float((mean - grad(x)).norm() / grad(x).norm()) < 0.06


def test_rge_is_reproducible_from_its_seed(quadratic):
    f, _, d, *_ = quadratic
    x = torch.zeros(d, dtype=torch.float64)
    a = RandomEstimator(q=5, seed=7).estimate(_oracle(f, d), x).grad
    b = RandomEstimator(q=5, seed=7).estimate(_oracle(f, d), x).grad
    c = RandomEstimator(q=5, seed=8).estimate(_oracle(f, d), x).grad
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rge_on_subset_leaves_other_coordinates_zero(quadratic):
    f, _, d, *_ = quadratic
    g = RandomEstimator(q=8).estimate(_oracle(f, d), torch.ones(d, dtype=torch.float64), coords=[0, 3]).grad
    assert (g[[1, 2] + list(range(4, d))] == 0).all() and (g[[0, 3]] != 0).all()


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return (x ** 2).sum()

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("the estimator called autograd")


@pytest.mark.parametrize("estimator", [CoordinateEstimator(), CoordinateEstimator(scheme="central"),
                                       RandomEstimator(q=3), RandomEstimator(q=3, antithetic=True)])
def test_estimators_never_use_autograd(estimator):
    o = _oracle(lambda x: _NoBackward.apply(x), 4)
    x = torch.ones(4, dtype=torch.float64, requires_grad=True)
    est = estimator.estimate(o, x)
    assert torch.isfinite(est.grad).all() and not est.grad.requires_grad


def test_failed_queries_are_left_out_of_the_differences():
    def f(x):
        return float("nan") if x[2] > 0.5 else float((x ** 2).sum())

    o = _oracle(f, 4, on_failure="skip")
    est = CoordinateEstimator(mu=1.0).estimate(o, torch.zeros(4, dtype=torch.float64))
    assert est.n_failed == 1
    assert est.grad.tolist() == [1.0, 1.0, 0.0, 1.0]  # (1 - 0) / 1 on the three finite coordinates


def test_estimate_with_the_serial_scheduler_is_identical(quadratic):
    f, _, d, *_ = quadratic
    x = torch.linspace(0, 1, d, dtype=torch.float64)
    for est in (CoordinateEstimator(), RandomEstimator(q=6, seed=2)):
        a = est.estimate(_oracle(f, d), x)
        if isinstance(est, RandomEstimator):
            est = RandomEstimator(q=6, seed=2)
        b = est.estimate(_oracle(f, d), x, scheduler=SerialScheduler())
        assert torch.equal(a.grad, b.grad) and a.nfev == b.nfev


@pytest.mark.parametrize("make, match", [
    (lambda: CoordinateEstimator(mu=0), "mu must be a positive finite number, got 0"),
    (lambda: CoordinateEstimator(mu=-1e-3), "got -0.001"),
    (lambda: CoordinateEstimator(scheme="backward"), "'backward'"),
    (lambda: RandomEstimator(q=0), "q must be an int >= 1, got 0"),
    (lambda: RandomEstimator(directions="uniform"), "'uniform'"),
])
def test_bad_hyperparameters(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_bad_coords_and_points_spend_no_query():
    o = _oracle(lambda x: 0.0, 3)
    est = CoordinateEstimator()
    for coords, match in (([3], r"\[0, 3\), got an index 3"), ([0, 0], "duplicate"), ([], "no coordinate"),
                          ([0.5], "integer indices")):
        with pytest.raises(ConfigError, match=match):
            est.estimate(o, torch.zeros(3), coords=coords)
    with pytest.raises(ConfigError, match="length 2, expected the oracle's dim 3"):
        est.estimate(o, torch.zeros(2))
    assert o.nfev == 0


# --------------------------------------------------------------------------- ARS-style options
def test_top_b_keeps_the_pairs_with_the_best_side():
    est = RandomEstimator(mu=0.1, q=4, antithetic=True, top_b=2, seed=3)
    x = torch.zeros(3, dtype=torch.float64)
    plan = est.plan(x)
    # pair k: f(x + mu u_k), f(x - mu u_k); best sides: 5, 0, 2, -1 -> pairs 3 and 1 are kept
    losses = torch.tensor([5.0, 0.0, 4.0, 7.0, 9.0, 1.0, 2.0, -1.0], dtype=torch.float64)
    U = plan.directions[:4] / est.mu
    expected = ((0.0 - 1.0) * U[1] + (7.0 - (-1.0)) * U[3]) / (2 * est.mu) / 2
    assert torch.allclose(est.combine(plan, losses).grad, expected)


def test_fitness_shaping_makes_the_estimate_invariant_to_the_loss_scale():
    x = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def f(v):
        return ((v - 0.3) ** 2).sum() + torch.sin(3 * v).sum()

    for shaping, transform in (("std", lambda y: 7.0 * y + 3.0), ("rank", lambda y: torch.exp(y) - 2.0)):
        for antithetic in (True, False):
            kw = {"mu": 0.05, "q": 6, "antithetic": antithetic, "fitness_shaping": shaping, "seed": 1}
            g1 = RandomEstimator(**kw).estimate(FunctionOracle(f, 6), x).grad
            g2 = RandomEstimator(**kw).estimate(FunctionOracle(lambda v, t=transform: t(f(v)), 6), x).grad
            assert torch.allclose(g1, g2), (shaping, antithetic)
    # unshaped estimates do scale with the loss
    kw = {"mu": 0.05, "q": 6, "antithetic": True, "seed": 1}
    g1 = RandomEstimator(**kw).estimate(FunctionOracle(f, 6), x).grad
    g2 = RandomEstimator(**kw).estimate(FunctionOracle(lambda v: 7.0 * f(v), 6), x).grad
    assert torch.allclose(7.0 * g1, g2)


def test_rank_shaping_values_are_centered_ranks():
    est = RandomEstimator(mu=0.5, q=2, antithetic=True, fitness_shaping="rank", seed=0)
    x = torch.zeros(2, dtype=torch.float64)
    plan = est.plan(x)
    losses = torch.tensor([10.0, -3.0, 0.0, 100.0], dtype=torch.float64)  # ranks 2, 0, 1, 3 of 3
    U = plan.directions[:2] / est.mu
    expected = ((2 / 3 - 1 / 3) * U[0] + (0.0 - 1.0) * U[1]) / (2 * est.mu) / 2
    assert torch.allclose(est.combine(plan, losses).grad, expected)


def test_ars_option_errors_name_the_value():
    with pytest.raises(ConfigError, match="needs antithetic=True"):
        RandomEstimator(q=4, top_b=2)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ConfigError, match=re.escape(repr(bad))):
            RandomEstimator(q=4, antithetic=True, top_b=bad)
    with pytest.raises(ConfigError, match="'ranks'"):
        RandomEstimator(fitness_shaping="ranks")
    assert "top_b=2" in repr(RandomEstimator(q=4, antithetic=True, top_b=2))


@pytest.mark.parametrize("scheduler", [None, SerialScheduler()])
def test_a_known_f0_replaces_the_base_query(quadratic, scheduler):
    f, *_ = quadratic
    d = quadratic[2]
    x = torch.linspace(-1, 1, d, dtype=torch.float64)
    seen = []

    def counted(v):
        seen.append(v.clone())
        return f(v)

    full = CoordinateEstimator(mu=1e-4).estimate(_oracle(f, d), x, scheduler=scheduler)
    oracle = _oracle(counted, d)
    est = CoordinateEstimator(mu=1e-4).estimate(oracle, x, scheduler=scheduler, f0=f(x))
    assert est.nfev == oracle.nfev == len(seen) == d  # one query fewer than the d + 1 of forward CGE
    assert not any(torch.equal(v, x) for v in seen)  # the base point itself was never queried
    assert torch.equal(est.grad, full.grad) and est.f0 == full.f0
    # a wrong f0 is used as given (it is the caller's measurement): every difference shifts by it
    off = CoordinateEstimator(mu=1e-4).estimate(_oracle(f, d), x, f0=f(x) + 1e-4)
    assert torch.allclose(off.grad, full.grad - 1.0, atol=1e-6)


def test_f0_is_ignored_by_schemes_without_a_base_query_and_checked(quadratic):
    f, _, d, *_ = quadratic
    x = torch.zeros(d, dtype=torch.float64)
    for est in (CoordinateEstimator(scheme="central"), RandomEstimator(q=3, antithetic=True, seed=1)):
        oracle = _oracle(f, d)
        out = est.estimate(oracle, x, f0=123.0)
        assert out.f0 is None and out.nfev == oracle.nfev == est.num_queries(d)
        assert not est.queries_base
    rge = RandomEstimator(q=3, seed=1)
    assert rge.queries_base and rge.estimate(_oracle(f, d), x, f0=f(x)).nfev == 3
    for bad in ("1.0", float("nan"), True, [1.0]):
        oracle = _oracle(f, d)
        with pytest.raises(ConfigError, match=re.escape(f"got {bad!r}")):
            CoordinateEstimator().estimate(oracle, x, f0=bad)
        assert oracle.nfev == 0


def test_noise_gain_is_the_standard_deviation_of_a_coordinate_estimate():
    """``noise_gain()`` times the loss noise is the spread of one CGE coordinate, measured."""
    gen = torch.Generator().manual_seed(3)

    def noisy(x):
        return float((x**2).sum() + 0.1 * torch.randn((), generator=gen, dtype=torch.float64))

    x = torch.zeros(4, dtype=torch.float64)
    for est in (CoordinateEstimator(mu=0.5), CoordinateEstimator(mu=0.5, scheme="central")):
        grads = torch.stack([est.estimate(_oracle(noisy, 4), x).grad for _ in range(400)])
        measured = float(grads[:, 0].std())
        assert measured == pytest.approx(0.1 * est.noise_gain(), rel=0.12)
    assert RandomEstimator(q=2).noise_gain() is None
