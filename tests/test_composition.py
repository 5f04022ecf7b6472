"""Directions, fitness shaping and presets as objects passed to RandomEstimator (composition).

The built-in objects must reproduce the former string flags bit for bit: the references below
redo the former code inline (the same generator calls in the same order, the same formulas).
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from zoblackbox import ConfigError, FunctionOracle, RandomEstimator, minimize
from zoblackbox.directions import (
    Directions,
    GaussianDirections,
    RademacherDirections,
    SphereDirections,
    directions_from,
)
from zoblackbox.presets import PRESETS, Preset, ars_v2t, openai_es
from zoblackbox.shaping import FitnessShaping, RankShaping, StdShaping, average_ranks, shaping_from

KINDS = {"gaussian": GaussianDirections, "sphere": SphereDirections, "rademacher": RademacherDirections}


def f(v):
    return ((v - 0.3) ** 2 * torch.arange(1, v.shape[0] + 1, dtype=v.dtype)).sum() + torch.sin(3 * v).sum()


def reference_directions(kind: str, q: int, n: int, g: torch.Generator) -> torch.Tensor:
    """The former ``RandomEstimator.sample``: the same torch calls in the same order."""
    if kind == "rademacher":
        return torch.randint(0, 2, (q, n), generator=g, dtype=torch.float64) * 2 - 1
    u = torch.randn(q, n, generator=g, dtype=torch.float64)
    if kind == "sphere":
        u = u / u.norm(dim=1, keepdim=True)
    return u


def reference_estimate(kind: str, antithetic: bool, x: torch.Tensor, *, mu: float, q: int, seed: int):
    """The former formulas: forward ``phi/q sum (f(x + mu u) - f(x)) / mu u``, antithetic ``/ 2 mu``."""
    g = torch.Generator()
    g.manual_seed(seed)
    n = x.shape[0]
    u = reference_directions(kind, q, n, g)
    phi = float(n) if kind == "sphere" else 1.0
    steps = mu * u
    U = steps / mu  # the plan stores mu * u; combine divides by mu again
    if antithetic:
        diffs = torch.stack([f(x + s) - f(x - s) for s in steps]) / (2 * mu)
    else:
        diffs = torch.stack([f(x + s) - f(x) for s in steps]) / mu
    return phi / q * (diffs @ U)


# --------------------------------------------------------------------------- (a) directions
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("antithetic", [False, True])
def test_direction_objects_equal_the_string_flags_and_the_former_formulas(kind, antithetic):
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    kw = {"mu": 0.05, "q": 5, "antithetic": antithetic, "seed": 11}
    by_name = RandomEstimator(directions=kind, **kw)
    by_object = RandomEstimator(directions=KINDS[kind](), **kw)
    g1 = by_name.estimate(FunctionOracle(f, 7, dtype=torch.float64), x).grad
    g2 = by_object.estimate(FunctionOracle(f, 7, dtype=torch.float64), x).grad
    assert torch.equal(g1, g2)
    expected = reference_estimate(kind, antithetic, x, mu=0.05, q=5, seed=11)
    assert torch.allclose(g1, expected, rtol=1e-12, atol=1e-12)
    # and the next draws stay in step: same generator stream as the former code
    g = torch.Generator()
    g.manual_seed(11)
    reference_directions(kind, 5, 7, g)
    u = reference_directions(kind, 5, 7, g)
    assert torch.equal(by_name.sample(7), u) and torch.equal(by_object.sample(7), u)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_direction_objects_draw_the_former_directions_bitwise(kind):
    for q, n, seed in ((1, 1, 0), (3, 9, 5), (20, 2, 123)):
        g1, g2 = torch.Generator(), torch.Generator()
        g1.manual_seed(seed)
        g2.manual_seed(seed)
        for _ in range(2):
            assert torch.equal(KINDS[kind]().sample(q, n, g1), reference_directions(kind, q, n, g2))
        assert torch.equal(g1.get_state(), g2.get_state())
    assert KINDS[kind]().phi(9) == (9.0 if kind == "sphere" else 1.0)


def test_specs_and_repr_stay_readable():
    for kind, cls in KINDS.items():
        for spec in (kind, cls()):
            est = RandomEstimator(directions=spec)
            assert est.directions == kind and type(est.sampler) is cls
            assert f"directions={kind!r}" in repr(est)
        assert directions_from(kind) == cls() and directions_from(cls()) == cls()
    for name, cls in (("std", StdShaping), ("rank", RankShaping)):
        for spec in (name, cls()):
            est = RandomEstimator(q=4, antithetic=True, fitness_shaping=spec)
            assert est.fitness_shaping == name and type(est.shaping) is cls
            assert f"fitness_shaping={name!r}" in repr(est)
    est = RandomEstimator()
    assert est.fitness_shaping is None and est.shaping is None and "fitness_shaping" not in repr(est)
    est.directions = "sphere"  # setting the spec replaces the object, as setting the flag did
    assert isinstance(est.sampler, SphereDirections) and est.phi(4) == 4.0
    est.fitness_shaping = "rank"
    assert isinstance(est.shaping, RankShaping)
    again = pickle.loads(pickle.dumps(est))
    assert repr(again) == repr(est) and torch.equal(again.sample(3), est.sample(3))


def test_state_dict_restores_the_directions():
    est = RandomEstimator(q=3, directions=SphereDirections(), seed=4)
    est.sample(5)
    state = est.state_dict()
    u = est.sample(5)
    est.sample(5)
    est.load_state_dict(state)
    assert torch.equal(est.sample(5), u)


# --------------------------------------------------------------------------- (b, c) shaping
def reference_shape(plus, minus, how, *, with_base):
    """The former ``estimators._shape`` (scipy ranks)."""
    from scipy.stats import rankdata

    values = torch.cat([plus, minus[:1]]) if with_base else torch.cat([plus, minus])
    if how == "std":
        sd = values.std(unbiased=False) if values.numel() > 1 else values.new_tensor(0.0)
        sd = sd if sd > 0 else values.new_tensor(1.0)
        return plus / sd, minus / sd
    ranks = torch.as_tensor(rankdata(values.numpy(), method="average") - 1.0, dtype=values.dtype)
    centered = ranks / max(values.numel() - 1, 1) - 0.5
    k = plus.numel()
    return centered[:k], (centered[k:].expand(k) if with_base else centered[k:])


CASES = [
    (torch.tensor([3.0, -1.0, 2.5, 7.0]), torch.tensor([0.5, 2.5, 2.5, -1.0])),  # ties across plus and minus
    (torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])),  # all equal: sd 0 and one rank
    (torch.tensor([4.0]), torch.tensor([-2.0])),
    (torch.tensor([0.0, -0.0, 5.0]), torch.tensor([5.0, 0.0, 1e-300])),  # -0.0 ties 0.0
]


@pytest.mark.parametrize("how,cls", [("std", StdShaping), ("rank", RankShaping)])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_base", [False, True])
def test_shaping_objects_equal_the_former_shape(how, cls, case, with_base):
    plus, minus = (t.to(torch.float64) for t in CASES[case])
    if with_base:
        minus = minus[:1].expand(plus.numel())
    got = cls()(plus, minus, with_base=with_base)
    want = reference_shape(plus, minus, how, with_base=with_base)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert shaping_from(how) == cls() and shaping_from(cls()) == cls() and shaping_from(None) is None


def test_average_ranks_equal_scipy_rankdata_with_ties():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 10, 57, 400):
        for pool in (2, 5, 1000):  # few distinct values: many ties
            v = rng.integers(0, pool, m).astype(np.float64) * rng.choice([0.25, -3.0])
            got = average_ranks(torch.from_numpy(v))
            assert got.dtype == torch.float64
            assert torch.equal(got, torch.from_numpy(rankdata(v, method="average") - 1.0)), (m, pool)
            centered = torch.from_numpy((rankdata(v, method="average") - 1.0) / max(m - 1, 1) - 0.5)
            k = m // 2
            plus, minus = RankShaping()(torch.from_numpy(v[:k]), torch.from_numpy(v[k:]), with_base=False)
            assert torch.equal(torch.cat([plus, minus]), centered)
    assert average_ranks(torch.zeros(0, dtype=torch.float64)).numel() == 0


def test_rank_shaping_needs_no_scipy_stats():
    import subprocess
    import sys

    code = ("import sys; sys.modules['scipy.stats'] = None\n"
            "import torch\n"
            "from zoblackbox.estimators import RandomEstimator\n"
            "e = RandomEstimator(mu=0.1, q=3, antithetic=True, fitness_shaping='rank')\n"
            "p = e.plan(torch.zeros(2, dtype=torch.float64))\n"
            "print(e.combine(p, torch.tensor([1., 2., 2., 0., 5., 1.], dtype=torch.float64)).grad.shape)\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2])" in out.stdout


@pytest.mark.parametrize("how", ["std", "rank"])
@pytest.mark.parametrize("antithetic,top_b", [(False, None), (True, None), (True, 3)])
def test_shaped_estimates_match_the_string_flags(how, antithetic, top_b):
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    kw = {"mu": 0.05, "q": 6, "antithetic": antithetic, "top_b": top_b, "seed": 2}
    g1 = RandomEstimator(fitness_shaping=how, **kw).estimate(FunctionOracle(f, 5, dtype=torch.float64), x).grad
    obj = {"std": StdShaping, "rank": RankShaping}[how]()
    g2 = RandomEstimator(fitness_shaping=obj, **kw).estimate(FunctionOracle(f, 5, dtype=torch.float64), x).grad
    assert torch.equal(g1, g2) and g1.abs().sum() > 0


# --------------------------------------------------------------------------- (d) user-defined objects
class CoordinateDirections(Directions):
    """Random coordinate axes ``e_i``: ``E[u u^T] = I / n``, so ``phi = n``."""

    name = "coordinate"

    def sample(self, q, n, generator):
        i = torch.randint(0, n, (q,), generator=generator)
        return torch.nn.functional.one_hot(i, n).to(torch.float64)

    def phi(self, n):
        return float(n)


class Sign(FitnessShaping):
    """Losses replaced by their sign: a shaping the built-ins cannot produce."""

    def __init__(self):
        self.calls = 0

    def __call__(self, plus, minus, *, with_base):
        self.calls += 1
        return torch.sign(plus), torch.sign(minus)


def test_user_defined_directions_are_used():
    d = 6
    est = RandomEstimator(mu=1e-3, q=4, directions=CoordinateDirections(), antithetic=True, seed=0)
    assert isinstance(est.directions, CoordinateDirections) and "CoordinateDirections()" in repr(est)
    plan = est.plan(torch.zeros(d, dtype=torch.float64))
    U = plan.directions[:4] / est.mu
    assert torch.equal((U != 0).sum(dim=1), torch.ones(4, dtype=torch.long))  # one axis per direction
    # a linear function: each direction measures one coordinate of the gradient, scaled by phi = n
    a = torch.arange(1.0, d + 1, dtype=torch.float64)
    est = RandomEstimator(mu=1e-3, q=1, directions=CoordinateDirections(), antithetic=True, seed=0)
    grad = est.estimate(FunctionOracle(lambda v: (a * v).sum(), d, dtype=torch.float64),
                        torch.zeros(d, dtype=torch.float64)).grad
    assert int((grad != 0).sum()) == 1
    i = int(grad.nonzero())
    assert torch.isclose(grad[i], d * a[i])


def test_user_defined_shaping_is_used():
    x = torch.linspace(-1, 1, 4, dtype=torch.float64)
    sign = Sign()
    est = RandomEstimator(mu=0.1, q=3, antithetic=True, fitness_shaping=sign, seed=0)
    assert est.fitness_shaping is sign and "fitness_shaping=Sign()" in repr(est)
    plan = est.plan(x)
    losses = torch.tensor([5.0, -2.0, 0.0, -1.0, 3.0, 0.0], dtype=torch.float64)
    U = plan.directions[:3] / est.mu
    expected = ((1 - (-1)) * U[0] + (-1 - 1) * U[1] + 0 * U[2]) / (2 * est.mu) / 3
    grad = est.combine(plan, losses).grad
    assert torch.allclose(grad, expected, rtol=1e-12, atol=0) and sign.calls == 1
    plain = RandomEstimator(mu=0.1, q=3, antithetic=True, seed=0).combine(plan, losses).grad
    assert not torch.allclose(grad, plain)  # the shaping changed the estimate


def test_a_sampler_of_the_wrong_shape_is_reported():
    class Short(Directions):
        def sample(self, q, n, generator):
            return torch.zeros(q, n - 1, dtype=torch.float64)

    with pytest.raises(ConfigError, match=re.escape("must return a tensor of shape (2, 3), got (2, 2)")):
        RandomEstimator(q=2, directions=Short()).plan(torch.zeros(3))


# --------------------------------------------------------------------------- (e) bad specs
@pytest.mark.parametrize("bad", ["Gaussian", "uniform", "", None, 3, ["gaussian"], StdShaping()])
def test_bad_directions_name_the_value(bad):
    with pytest.raises(ConfigError, match=re.escape(repr(bad))):
        RandomEstimator(directions=bad)
    with pytest.raises(ConfigError, match="'gaussian', 'sphere', 'rademacher'"):
        directions_from(bad)


@pytest.mark.parametrize("bad", ["ranks", "STD", "", 0, False, ["rank"], GaussianDirections(),
                                 lambda p, m, with_base: (p, m)])
def test_bad_shaping_names_the_value(bad):
    with pytest.raises(ConfigError, match=re.escape(repr(bad))):
        RandomEstimator(q=2, antithetic=True, fitness_shaping=bad)
    with pytest.raises(ConfigError, match="'std', 'rank'"):
        shaping_from(bad)


def test_a_class_instead_of_an_instance_is_named():
    with pytest.raises(ConfigError, match=re.escape("got the class <class 'zoblackbox.directions.SphereDirections'>: "
                                                    "pass SphereDirections()")):
        RandomEstimator(directions=SphereDirections)
    with pytest.raises(ConfigError, match=re.escape("pass RankShaping()")):
        RandomEstimator(q=2, antithetic=True, fitness_shaping=RankShaping)


# --------------------------------------------------------------------------- (f) presets
def test_ars_v2t_builds_the_recipe():
    preset = ars_v2t(8, 4, 0.02, 0.03)
    assert isinstance(preset, Preset) and isinstance(preset, dict)
    assert set(preset) == {"estimator", "optimizer", "lr"}
    est = preset["estimator"]
    assert isinstance(est, RandomEstimator)
    assert (est.mu, est.q, est.antithetic, est.top_b) == (0.03, 8, True, 4)
    assert isinstance(est.sampler, GaussianDirections) and isinstance(est.shaping, StdShaping)
    assert preset["optimizer"] == "sgd" and preset["lr"] == pytest.approx(2 * 0.03 * 0.02)
    assert repr(preset) == "ars_v2t(n_directions=8, top_b=4, step_size=0.02, noise=0.03, seed=0)"
    # the same directions as the long form with the same seed
    long = RandomEstimator(mu=0.03, q=8, antithetic=True, top_b=4, fitness_shaping="std", seed=0)
    assert torch.equal(est.sample(3), long.sample(3))
    assert PRESETS["ars_v2t"] is ars_v2t and PRESETS["openai_es"] is openai_es
    again = pickle.loads(pickle.dumps(preset))
    assert repr(again) == repr(preset) and set(again) == set(preset)


def test_ars_v2t_step_is_the_papers_step():
    # one step of the preset with SGD equals x - alpha / (b sigma_R) sum (f+ - f-) delta over the kept pairs
    d, nu, alpha = 5, 0.03, 0.02
    x0 = torch.linspace(-1, 1, d, dtype=torch.float64)
    res = minimize(FunctionOracle(f, d, dtype=torch.float64), x0, maxiter=1, **ars_v2t(6, 3, alpha, nu, seed=7))
    g = torch.Generator()
    g.manual_seed(7)
    delta = torch.randn(6, d, generator=g, dtype=torch.float64)
    fp = torch.stack([f(x0 + nu * u) for u in delta])
    fm = torch.stack([f(x0 - nu * u) for u in delta])
    keep = torch.topk(torch.minimum(fp, fm), 3, largest=False).indices
    sigma_r = torch.cat([fp[keep], fm[keep]]).std(unbiased=False)
    expected = x0 - alpha / (3 * sigma_r) * ((fp[keep] - fm[keep]) @ delta[keep])
    assert np.allclose(res.x, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_openai_es_builds_the_recipe_and_lowers_the_loss():
    preset = openai_es(population=20, sigma=0.1, lr=0.05)
    est = preset["estimator"]
    assert (est.mu, est.q, est.antithetic, est.top_b) == (0.1, 10, True, None)
    assert isinstance(est.sampler, GaussianDirections) and isinstance(est.shaping, RankShaping)
    assert preset["optimizer"] == "adam" and preset["lr"] == 0.05 and "optimizer_kwargs" not in preset
    assert repr(preset) == "openai_es(population=20, sigma=0.1, lr=0.05, weight_decay=0.0, seed=0)"
    wd = openai_es(20, 0.1, 0.05, weight_decay=1e-3)
    assert wd["optimizer"] == "adamw" and wd["optimizer_kwargs"] == {"weight_decay": 1e-3}

    d = 10
    target = torch.linspace(-1, 1, d, dtype=torch.float64)

    def quad(v):
        return ((v - target) ** 2).sum()

    x0 = torch.zeros(d, dtype=torch.float64)
    for p in (preset, wd):
        oracle = FunctionOracle(quad, d, dtype=torch.float64)
        res = minimize(oracle, x0, budget=2_001, **p)
        assert res.nfev <= 2_001 and res.fun < 0.1 * float(quad(x0)), (p, res.fun)


@pytest.mark.parametrize("call,name", [
    (lambda: ars_v2t(0, 1, 0.02, 0.03), "0"),
    (lambda: ars_v2t(8.0, 4, 0.02, 0.03), "8.0"),
    (lambda: ars_v2t(8, 9, 0.02, 0.03), "9"),
    (lambda: ars_v2t(8, True, 0.02, 0.03), "True"),
    (lambda: ars_v2t(8, 4, -0.02, 0.03), "-0.02"),
    (lambda: ars_v2t(8, 4, 0.02, float("nan")), "nan"),
    (lambda: ars_v2t(8, 4, 0.02, "0.03"), "'0.03'"),
    (lambda: ars_v2t(8, 4, 0.02, 0.03, seed=1.5), "1.5"),
    (lambda: openai_es(7, 0.1, 0.01), "7"),
    (lambda: openai_es(0, 0.1, 0.01), "0"),
    (lambda: openai_es(20, 0.0, 0.01), "0.0"),
    (lambda: openai_es(20, 0.1, float("inf")), "inf"),
    (lambda: openai_es(20, 0.1, 0.01, weight_decay=-1e-3), "-0.001"),
    (lambda: openai_es(20, 0.1, 0.01, seed="0"), "'0'"),
])
def test_preset_arguments_are_checked(call, name):
    with pytest.raises(ConfigError, match=re.escape(name)):
        call()
