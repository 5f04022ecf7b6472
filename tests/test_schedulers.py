"""One table over every scheduler: the same losses, gradient and query count as the serial reference.

Rows: scheduler x problem x estimator. float64 problems must agree with SerialScheduler to
1e-10 relative (L2) on the gradient; float32 problems to the documented rounding tolerance
``8 * eps32 * max|loss| / mu`` per coordinate (a few ulps of rounding in each of the two losses
of a forward difference; measured differences are ~2 ulps).
"""

import pytest
import torch
import torch.nn.functional as F

from zoblackbox import CoordinateEstimator, FunctionOracle, RandomEstimator
from zoblackbox.adapters import ModuleOracle
from zoblackbox.data import load_digits_split
from zoblackbox.models import digits_cnn
from zoblackbox.schedule import FeatureReuseScheduler, ProcessPoolScheduler, SerialScheduler, VectorizedScheduler

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolScheduler(n_workers=2) as scheduler:
        yield scheduler


@pytest.fixture(scope="module")
def dask():
    pytest.importorskip("distributed")
    from zoblackbox.schedule import DaskScheduler

    with DaskScheduler(n_workers=2) as scheduler:
        yield scheduler


SCHEDULERS = ["oracle", "serial", "vectorized", "reuse", "pool", "dask"]


def _scheduler(name, request):
    if name in ("pool", "dask"):
        return request.getfixturevalue(name)
    return {"oracle": None, "serial": SerialScheduler(), "vectorized": VectorizedScheduler(),
            "reuse": FeatureReuseScheduler()}[name]


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


def _problem(name, digits):
    if name == "quadratic-f64":
        g = torch.Generator().manual_seed(0)
        A = torch.randn(9, 9, generator=g, dtype=torch.float64)
        A = A @ A.T
        return FunctionOracle(lambda x: float(0.5 * x @ A @ x + x.sum()), dim=9, dtype=torch.float64), 1.0
    torch.manual_seed(0)
    model = digits_cnn(channels=(2, 4), hidden=6)  # 20 + 76 + 102 + 70 = 268 parameters
    batch = (digits.x_train[:24], digits.y_train[:24])
    if name == "cnn-f64":
        model = model.double()
        batch = (batch[0].double(), batch[1])
    return ModuleOracle(model, F.cross_entropy, batch=batch), 1.0


ESTIMATORS = {
    "cge-forward": lambda: (CoordinateEstimator(mu=5e-3), None),
    "cge-central": lambda: (CoordinateEstimator(mu=5e-3, scheme="central"), None),
    "cge-subset": lambda: (CoordinateEstimator(mu=5e-3), [0, 3, 8]),
    "rge": lambda: (RandomEstimator(mu=5e-3, q=7, seed=11), None),
}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("problem", ["quadratic-f64", "cnn-f64", "cnn-f32"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_matches_the_serial_reference(scheduler, problem, estimator, digits, request):
    ref_oracle, _ = _problem(problem, digits)
    oracle, _ = _problem(problem, digits)
    est_ref, coords = ESTIMATORS[estimator]()
    if coords is not None and problem.startswith("cnn"):
        coords = [0, 19, 25, 95, 150, 200, 267]  # every layer of the CNN, weights and biases
    est, _ = ESTIMATORS[estimator]()  # a fresh estimator: the same seed draws the same directions
    x = ref_oracle.get_params() if hasattr(ref_oracle, "get_params") else torch.linspace(-1, 1, 9,
                                                                                          dtype=torch.float64)
    ref = est_ref.estimate(ref_oracle, x, coords=coords, scheduler=SerialScheduler())
    got = est.estimate(oracle, x, coords=coords, scheduler=_scheduler(scheduler, request))
    assert got.nfev == ref.nfev == oracle.nfev == ref_oracle.nfev
    if problem.endswith("f64"):
        rel = float((got.grad - ref.grad).norm() / ref.grad.norm())
        assert rel <= 1e-10, rel
        if ref.f0 is not None:
            assert got.f0 == pytest.approx(ref.f0, rel=1e-12)
    else:
        assert got.grad.dtype == torch.float32
        tol = 8 * EPS32 * max(abs(ref.f0 or 3.0), 1.0) / est.mu
        assert float((got.grad - ref.grad).abs().max()) <= tol


class _InPlaceSum(torch.nn.Module):
    """torchvision's ``out += shortcut(x)``: under vmap the unbatched left side cannot take a batched right side."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        out = self.a(x)
        out += self.b(x)
        return self.head(out)


def test_in_place_add_that_vmap_cannot_batch_falls_back_to_one_by_one():
    torch.manual_seed(0)
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    oracle = ModuleOracle(_InPlaceSum().double(), F.cross_entropy, batch=batch)
    x = oracle.get_params()
    ref = CoordinateEstimator(mu=1e-3).estimate(oracle, x, scheduler=SerialScheduler())
    with pytest.warns(UserWarning, match="cannot be vmapped.*broadcast shape"):
        got = CoordinateEstimator(mu=1e-3).estimate(oracle, x, scheduler=VectorizedScheduler())
    assert oracle.failure_report()["failed_queries"] == 0
    assert float((got.grad - ref.grad).norm() / ref.grad.norm()) <= 1e-10


def test_a_model_error_is_not_mistaken_for_a_vmap_limit():
    """A forward that fails for every query still fails (the error is the model's, not vmap's)."""

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.w(x) @ torch.ones(5, 2, dtype=x.dtype)  # (B, 3) @ (5, 2): a shape error

    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    oracle = ModuleOracle(Broken(), F.cross_entropy, batch=batch)
    with pytest.raises(Exception, match="shapes cannot be multiplied|size mismatch|mat1 and mat2"):
        CoordinateEstimator(mu=1e-3).estimate(oracle, oracle.get_params(), scheduler=VectorizedScheduler())
