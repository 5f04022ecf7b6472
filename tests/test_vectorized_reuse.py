"""The fast torch schedulers against the serial reference: same losses, counts and failures.

Float64 comparisons are exact to 1e-10 (relative); float32 ones use the tolerance measured and
documented in docs/schedulers.md.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoblackbox import (
    BudgetExhaustedError,
    ConfigError,
    CoordinateEstimator,
    FailurePolicy,
    FunctionOracle,
    OracleError,
    RandomEstimator,
)
from zoblackbox.adapters import ModuleOracle
from zoblackbox.data import load_digits_split
from zoblackbox.models import digits_cnn
from zoblackbox.resnet import resnet20
from zoblackbox.schedule import FeatureReuseScheduler, SerialScheduler, VectorizedScheduler
from zoblackbox.staged import Residual, StagedModel, StagedOracle, Staging, staging_of

FAST = {
    "vectorized": lambda: VectorizedScheduler(),
    "reuse": lambda: FeatureReuseScheduler(),
    "reuse-no-deltas": lambda: FeatureReuseScheduler(explicit_deltas=False),
}


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these are correctness tests, and on a shared 2-core machine two threads that
    wait on each other slow them down by orders of magnitude when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    split = load_digits_split()
    return split.x_train[:64], split.y_train[:64]


def digits_oracle(digits, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = digits_cnn().to(dtype)
    x, y = digits
    return ModuleOracle(model, F.cross_entropy, batch=(x.to(dtype), y), **kw)


def spread_coords(oracle, per_tensor=12, seed=0):
    """A sorted coordinate subset that hits every parameter tensor."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in oracle.layout.names:
        sl = oracle.layout.slice(name)
        n = sl.stop - sl.start
        out.append(sl.start + torch.randperm(n, generator=g)[:per_tensor])
    return torch.cat(out).sort().values


def losses(oracle, plan, scheduler):
    before = oracle.nfev
    out = scheduler.run(oracle, plan)
    return out, oracle.nfev - before


# ---------------------------------------------------------------------------- float64 equality
@pytest.mark.parametrize("name", sorted(FAST))
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_digits_cnn_float64_matches_serial(digits, name, scheme):
    oracle = digits_oracle(digits)
    x = oracle.get_params()
    plan = CoordinateEstimator(scheme=scheme).plan(x, spread_coords(oracle))
    ref, n_ref = losses(oracle, plan, SerialScheduler())
    got, n_got = losses(oracle, plan, FAST[name]())
    assert n_got == n_ref == len(plan)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    est = CoordinateEstimator(scheme=scheme)
    assert rel(est.combine(plan, got).grad, est.combine(plan, ref).grad) <= 1e-10


def test_digits_cnn_float64_full_gradient_agrees_between_fast_schedulers(digits):
    oracle = digits_oracle(digits)
    x = oracle.get_params()
    est = CoordinateEstimator()
    grads = {name: est.estimate(oracle, x, scheduler=make()).grad for name, make in FAST.items()}
    assert oracle.nfev == 3 * (oracle.dim + 1)
    for name in ("reuse", "reuse-no-deltas"):
        assert rel(grads[name], grads["vectorized"]) <= 1e-10


def test_unsorted_coordinate_subset_keeps_plan_order(digits):
    oracle = digits_oracle(digits)
    x = oracle.get_params()
    coords = spread_coords(oracle, per_tensor=4)[torch.randperm(4 * len(oracle.layout.names))]
    plan = CoordinateEstimator().plan(x, coords)
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make in FAST.values():
        got, n = losses(oracle, plan, make())
        assert n == len(plan)
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- float32 tolerance
def test_digits_cnn_float32_within_documented_tolerance(digits):
    """float32: losses within 1e-6 relative of the serial ones; the gradient's forward differences
    amplify that by 1/mu, so gradients agree to max |dg| <= 1e-3 (rounding noise of the serial
    float32 gradient itself is of the same size, see docs/schedulers.md)."""
    oracle = digits_oracle(digits, torch.float32)
    x = oracle.get_params()
    plan = CoordinateEstimator().plan(x, spread_coords(oracle))
    ref, _ = losses(oracle, plan, SerialScheduler())
    est = CoordinateEstimator()
    for make in FAST.values():
        got, _ = losses(oracle, plan, make())
        assert float(((got - ref).abs() / ref.abs()).max()) <= 1e-6
        assert float((est.combine(plan, got).grad - est.combine(plan, ref).grad).abs().max()) <= 1e-3


# ---------------------------------------------------------------------------- BatchNorm
def bn_model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(24, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10),
    ).double()


@pytest.mark.parametrize("bn_policy", ["batch", "eval"])
def test_batchnorm_model_matches_serial_in_both_policies(digits, bn_policy):
    torch.manual_seed(0)
    model = bn_model()
    x, y = digits
    with torch.no_grad():  # non-trivial running statistics, so that "eval" differs from "batch"
        model.train()
        for i in range(3):
            model(x[16 * i:16 * (i + 1)].double() * (i + 1))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    oracle = ModuleOracle(model, F.cross_entropy, batch=(x.double(), y), bn_policy=bn_policy)
    xp = oracle.get_params()
    plan = CoordinateEstimator().plan(xp, spread_coords(oracle, per_tensor=6))
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make in FAST.values():
        got, _ = losses(oracle, plan, make())
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    for n, b in model.named_buffers():  # queries never touch the running statistics
        assert torch.equal(b, buffers[n]), n


def test_batchnorm_statistics_are_per_query_not_per_stack(digits):
    """A stacked K x B batch must normalize each query over its own B samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)).double()
    x, y = digits
    oracle = ModuleOracle(model, F.cross_entropy, batch=(x.reshape(64, -1).double(), y))
    xp = oracle.get_params()
    plan = CoordinateEstimator(mu=0.5).plan(xp, torch.arange(0, 64 * 8, 37))  # large steps of layer 0
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make in FAST.values():
        got, _ = losses(oracle, plan, make())
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- layer variants
LAYER_VARIANTS = {
    # grouped, dilated and strided convolutions (explicit deltas pick the right input window)
    "grouped-conv": (lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.LeakyReLU(0.1), nn.AvgPool2d(2),
        nn.Conv2d(6, 6, 2, groups=6), nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 10)), (1, 8, 8)),
    # 'same' padding: no delta start, a grouped-convolution receive
    "same-padding": (lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(),
        nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(16, 10)), (1, 8, 8)),
    # 1-D convolutions (restarted with batched weights) and BatchNorm1d on (B, C, L)
    "conv1d": (lambda: nn.Sequential(
        nn.Conv1d(8, 5, 3), nn.BatchNorm1d(5), nn.SiLU(), nn.AdaptiveAvgPool1d(2), nn.Flatten(),
        nn.Linear(10, 10)), (8, 8)),
    # linear layers on (B, T, F): the band lies along the last dimension
    "sequence": (lambda: nn.Sequential(
        nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4), nn.Flatten(), nn.BatchNorm1d(32), nn.Linear(32, 10)), (8, 8)),
}


@pytest.mark.parametrize("variant", sorted(LAYER_VARIANTS))
def test_layer_variants_match_serial(digits, variant):
    make, shape = LAYER_VARIANTS[variant]
    torch.manual_seed(0)
    model = make().double()
    x, y = digits
    oracle = ModuleOracle(model, F.cross_entropy, batch=(x[:32].double().reshape(32, *shape), y[:32]))
    plan = CoordinateEstimator().plan(oracle.get_params(), spread_coords(oracle, per_tensor=8))
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make_scheduler in FAST.values():
        got, _ = losses(oracle, plan, make_scheduler())
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- residual blocks
def residual_model():
    """Residual blocks: nested, with BatchNorm, and one with a parameterized projection shortcut."""
    inner = Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), activation=nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), inner),
                 activation=nn.ReLU()),
        Residual(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)),
                 shortcut=nn.Sequential(nn.Conv2d(4, 6, 1, stride=2), nn.BatchNorm2d(6)), activation=nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    ).double()


def test_residual_blocks_are_unrolled_into_units():
    oracle = ModuleOracle(residual_model(), F.cross_entropy)
    staging = staging_of(oracle)
    kinds = [u.kind for u in staging.units]
    assert kinds == ["conv", "elementwise", "enter", "conv", "batchnorm", "elementwise", "enter", "conv",
                     "batchnorm", "merge", "merge", "enter", "conv", "batchnorm", "merge", "pool", "flatten",
                     "linear"]
    merge = staging.units[14]
    assert [local for local, _ in merge.params] == ["shortcut.0.weight", "shortcut.0.bias", "shortcut.1.weight",
                                                   "shortcut.1.bias"]
    assert staging.enclosing[9] == (2, 6) and staging.enclosing[10] == (2,) and staging.enclosing[11] == ()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's note on adaptive pooling here
@pytest.mark.parametrize("bn_policy", ["batch", "eval"])
def test_residual_model_matches_serial(digits, bn_policy):
    torch.manual_seed(0)
    model = residual_model()
    x, y = digits
    with torch.no_grad():
        model.train()
        model(x[:32].double())
    oracle = ModuleOracle(model, F.cross_entropy, batch=(x[:32].double(), y[:32]), bn_policy=bn_policy)
    plan = CoordinateEstimator().plan(oracle.get_params(), spread_coords(oracle, per_tensor=4))
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make in FAST.values():
        got, _ = losses(oracle, plan, make())
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- ResNet-20
def test_resnet20_has_the_paper_size_and_eleven_stages():
    model = resnet20()
    assert sum(p.numel() for p in model.parameters()) == 269_722
    oracle = StagedOracle(model, F.cross_entropy)
    names = [s.name for s in oracle.staging.stages]
    assert names[0] == "stem" and names[-1] == "head" and len(names) == 11
    assert [u.kind for u in oracle.staging.units[:3]] == ["conv", "batchnorm", "elementwise"]
    assert [u.kind for u in oracle.staging.units[3:10]] == ["enter", "conv", "batchnorm", "elementwise", "conv",
                                                            "batchnorm", "merge"]


def test_resnet20_float64_sampled_coordinates_in_every_stage():
    torch.manual_seed(0)
    model = resnet20().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    oracle = StagedOracle(model, F.cross_entropy, batch=(x, torch.tensor([3, 7])))
    g = torch.Generator().manual_seed(0)
    coords = []
    for stage in oracle.staging.stages:
        for name in (stage.param_names[0], stage.param_names[-1]):  # first and last tensor of the stage
            sl = oracle.layout.slice(name)
            coords.append(sl.start + int(torch.randint(sl.stop - sl.start, (1,), generator=g)))
    coords = torch.tensor(sorted(set(coords)))
    assert set(oracle.staging.stage_of(coords).tolist()) == set(range(11))
    plan = CoordinateEstimator().plan(oracle.get_params(), coords)
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make in FAST.values():
        got, _ = losses(oracle, plan, make())
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- direction plans
@pytest.mark.parametrize("restricted", [False, True])
def test_direction_plans_match_serial(digits, restricted):
    oracle = digits_oracle(digits)
    x = oracle.get_params()
    # restricted: directions on the two linear layers only, so reuse starts at the first of them
    coords = torch.arange(oracle.layout.slice("7.weight").start, oracle.dim) if restricted else None
    for antithetic in (False, True):
        est = RandomEstimator(q=6, antithetic=antithetic, seed=3)
        plan = est.plan(x, coords)
        ref, _ = losses(oracle, plan, SerialScheduler())
        for make in FAST.values():
            got, n = losses(oracle, plan, make())
            assert n == len(plan)
            assert torch.allclose(got, ref, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- failure policies
class NaNGate(nn.Module):
    """Scales its input by a parameter; the output is NaN where the parameter exceeds 1."""

    def __init__(self, n):
        super().__init__()
        self.g = nn.Parameter(torch.full((n,), 0.5, dtype=torch.float64))

    def forward(self, x):
        return torch.where(self.g > 1.0, torch.full_like(x, math.nan), x * self.g)


def nan_oracle(on_failure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), NaNGate(3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[1].g[1] = 1.0 - 2.5e-3  # the +mu step (mu = 5e-3) of this coordinate crosses 1
    x = torch.randn(8, 4, dtype=torch.float64)
    return ModuleOracle(model, F.cross_entropy, batch=(x, torch.arange(8) % 2), on_failure=on_failure)


@pytest.mark.parametrize("policy", ["inf", "skip", "retry", FailurePolicy("inf", retries=1)])
def test_nan_failure_policy_as_serial(policy):
    results = {}
    for name, make in [("serial", SerialScheduler), *FAST.items()]:
        oracle = nan_oracle(policy)
        est = CoordinateEstimator().estimate(oracle, oracle.get_params(), scheduler=make())
        failures = [{**f.as_dict(), "value": repr(f.value)} for f in oracle.failures]  # nan != nan
        results[name] = (est, oracle.nfev, failures)
    ref_est, ref_nfev, ref_failures = results["serial"]
    assert len(ref_failures) == 1 and ref_failures[0]["kind"] == "nonfinite"
    assert ref_est.n_failed == 1
    for name in FAST:
        est, nfev, failures = results[name]
        assert nfev == ref_nfev and failures == ref_failures and est.n_failed == 1, name
        assert torch.allclose(est.grad, ref_est.grad, rtol=1e-10, atol=1e-12), name


def test_nan_raise_policy_names_the_same_query():
    indices = {}
    for name, make in [("serial", SerialScheduler), *FAST.items()]:
        oracle = nan_oracle("raise")
        with pytest.raises(OracleError) as info:
            CoordinateEstimator().estimate(oracle, oracle.get_params(), scheduler=make())
        indices[name] = (info.value.query_index, info.value.kind)
    assert len(set(indices.values())) == 1
    assert indices["serial"] == (1 + 12 + 3 + 1, "nonfinite")  # base, layer 0 (15), gate coordinate 1


# ---------------------------------------------------------------------------- budgets and memory
@pytest.mark.parametrize("name", sorted(FAST))
def test_memory_budget_too_small_for_one_query(digits, name):
    oracle = digits_oracle(digits)
    scheduler = type(FAST[name]())(memory_budget=1000)
    with pytest.raises(ConfigError, match=r"memory_budget=1000 bytes .* needs about \d+ bytes"):
        CoordinateEstimator().estimate(oracle, oracle.get_params(), scheduler=scheduler)
    assert oracle.nfev == 0


def test_small_budget_means_small_chunks_same_answer(digits):
    oracle = digits_oracle(digits)
    x = oracle.get_params()
    plan = CoordinateEstimator().plan(x, spread_coords(oracle, per_tensor=5))
    ref, _ = losses(oracle, plan, FeatureReuseScheduler())
    tight, _ = losses(oracle, plan, FeatureReuseScheduler(memory_budget=4 * 2**20, max_chunk=3))
    assert torch.allclose(tight, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "512MiB"])
def test_bad_arguments_are_refused(bad):
    for cls in (VectorizedScheduler, FeatureReuseScheduler):
        with pytest.raises(ConfigError, match="memory_budget"):
            cls(memory_budget=bad)
        with pytest.raises(ConfigError, match="max_chunk"):
            cls(max_chunk=bad if bad != "512MiB" else 0)


def test_bad_staging_inputs_are_refused():
    with pytest.raises(ConfigError, match="at least one stage"):
        StagedModel([])
    with pytest.raises(TypeError, match="stage '1' must be an nn.Module"):
        StagedModel([nn.ReLU(), "relu"])
    with pytest.raises(TypeError, match="shortcut must be an nn.Module"):
        Residual(nn.Identity(), shortcut=lambda x: x)
    for cls in (VectorizedScheduler, FeatureReuseScheduler):
        with pytest.raises(ConfigError, match="cpu_cache_bytes"):
            cls(cpu_cache_bytes=0)


@pytest.mark.parametrize("name", sorted(FAST))
def test_query_budget_refuses_the_plan_before_any_query(digits, name):
    oracle = digits_oracle(digits, budget=100)
    with pytest.raises(BudgetExhaustedError):
        CoordinateEstimator().estimate(oracle, oracle.get_params(), scheduler=FAST[name]())
    assert oracle.nfev == 0


# ---------------------------------------------------------------------------- other oracles and models
@pytest.mark.parametrize("name", sorted(FAST))
def test_plain_function_oracle_falls_back_to_its_own_evaluation(name):
    oracle = FunctionOracle(lambda x: float((x ** 2).sum() + x[0] ** 3), dim=7, dtype=torch.float64)
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    plan = CoordinateEstimator(scheme="central").plan(x)
    ref, _ = losses(oracle, plan, SerialScheduler())
    got, n = losses(oracle, plan, FAST[name]())
    assert n == len(plan) and torch.equal(got, ref)


class TanhSkip(nn.Module):
    """``x + tanh(lin(x))`` written as a plain module (not a staging Residual): staged from its fx
    graph on its own, one opaque unit inside a StagedModel."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


def test_custom_model_is_traced_and_mse_loss_works():
    torch.manual_seed(0)
    model = TanhSkip().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    oracle = ModuleOracle(model, F.mse_loss, batch=(x, torch.zeros(5, 6, dtype=torch.float64)))
    staging = staging_of(oracle)
    assert staging.num_stages == 1 and staging.traced and staging.reason == ""
    # x is kept live (a move), the layer and tanh are plain units, the sum a graph segment
    assert [u.kind for u in staging.units] == ["fx", "linear", "elementwise", "fx"]
    plan = CoordinateEstimator().plan(oracle.get_params())
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make in FAST.values():
        got, _ = losses(oracle, plan, make())
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


def test_staged_model_with_a_parameter_subset(digits):
    """Frozen parameters stay at the module's values; only the chosen ones are coordinates."""
    torch.manual_seed(0)
    model = StagedModel({"features": nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU()),
                         "block": TanhSkip(), "out": nn.Sequential(nn.Linear(6, 10))}).double()
    x, y = digits
    oracle = StagedOracle(model, F.cross_entropy, params=["features.1.weight", "block.lin.bias", "out.0.weight"],
                          batch=(x.double(), y))
    assert [s.name for s in oracle.staging.stages] == ["features", "block", "out"]
    plan = CoordinateEstimator().plan(oracle.get_params())
    ref, _ = losses(oracle, plan, SerialScheduler())
    for make in FAST.values():
        got, _ = losses(oracle, plan, make())
        assert torch.allclose(got, ref, rtol=1e-12, atol=0)


def test_sequential_staging_folds_parameter_free_modules(digits):
    oracle = digits_oracle(digits)
    staging = staging_of(oracle)
    assert [s.name for s in staging.stages] == ["0", "3", "7", "9"]
    assert [len(s.units) for s in staging.stages] == [3, 4, 2, 1]
    assert [s.numel for s in staging.stages] == [80, 1168, 2080, 330]
    coords = torch.tensor([0, 79, 80, 1247, 1248, 3657])
    assert staging.stage_of(coords).tolist() == [0, 0, 1, 1, 2, 3]


def test_shared_parameters_fall_back_to_one_stage_or_are_refused():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    oracle = ModuleOracle(model, F.mse_loss)
    staging = Staging.from_model(model, oracle.layout)
    assert staging.num_stages == 1 and "used by both" in staging.reason
    with pytest.raises(ConfigError, match="used by both"):
        StagedOracle(StagedModel([lin, nn.ReLU(), lin]), F.mse_loss)


def test_unvmappable_model_is_evaluated_query_by_query():
    class Itemizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * float(self.lin.weight.sum().item() > -1e9)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), Itemizing()).double()
    oracle = ModuleOracle(model, F.cross_entropy, batch=(torch.randn(4, 3, dtype=torch.float64), torch.arange(4) % 2))
    plan = CoordinateEstimator().plan(oracle.get_params())
    ref, _ = losses(oracle, plan, SerialScheduler())
    with pytest.warns(UserWarning, match="cannot be vmapped"):
        got, _ = losses(oracle, plan, VectorizedScheduler())
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    got, _ = losses(oracle, plan, FeatureReuseScheduler())  # remembered: no second warning needed
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)


def test_module_is_left_untouched(digits):
    oracle = digits_oracle(digits)
    before = {n: p.clone() for n, p in oracle.model.named_parameters()}
    x = oracle.get_params() + 0.1
    for make in FAST.values():
        CoordinateEstimator().estimate(oracle, x, scheduler=make())
    for n, p in oracle.model.named_parameters():
        assert torch.equal(p, before[n])


# ---------------------------------------------------------------------------- bands through residual blocks
def every_tensor_coords(oracle, per_tensor, seed=0):
    """``per_tensor`` random coordinates of every parameter tensor (all of a smaller one)."""
    return spread_coords(oracle, per_tensor=per_tensor, seed=seed)


@pytest.mark.parametrize("max_chunk", [1, 4, None])
def test_resnet20_float64_every_layer_matches_serial(max_chunk):
    """Sampled coordinates of every parameter tensor of ResNet-20 (float64): losses and gradient as
    the serial reference's, for one query per chunk, small chunks and calibrated ones."""
    torch.manual_seed(0)
    model = resnet20().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    oracle = StagedOracle(model, F.cross_entropy, batch=(x, torch.tensor([3, 7, 1])))
    coords = every_tensor_coords(oracle, per_tensor=3)
    assert len(set(oracle.layout.block_index(coords).tolist())) == len(oracle.layout.names)
    est = CoordinateEstimator()
    plan = est.plan(oracle.get_params(), coords)
    ref, _ = losses(oracle, plan, SerialScheduler())
    got, n = losses(oracle, plan, FeatureReuseScheduler(max_chunk=max_chunk))
    assert n == len(plan)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert rel(est.combine(plan, got).grad, est.combine(plan, ref).grad) <= 1e-10


def test_resnet20_bands_cross_the_residual_merge_and_the_next_block_entry():
    """A perturbed second convolution (or BatchNorm) of a block changes one channel of the block's
    output: the band passes the merge and the next block's entry, and the next block's first
    convolution absorbs it (its skip input carries the band until that block's merge)."""
    torch.manual_seed(0)
    model = resnet20().double()
    oracle = StagedOracle(model, F.cross_entropy, batch=(torch.randn(2, 3, 8, 8, dtype=torch.float64),
                                                         torch.tensor([0, 1])))
    from zoblackbox.schedule.reuse import _dense_start, _skip_entry, _StepCache

    staging = oracle.staging
    names = [u.name for u in staging.units]
    with torch.no_grad(), oracle.query_mode():  # BatchNorm in query mode: batch statistics, no state
        step = _StepCache(staging, oracle, oracle.layout.unflatten(oracle.get_params()), *oracle.batch)
        for tensor, block, nxt in [("layer1_0.body.3.weight", "layer1_0", "layer1_1"),
                                   ("layer1_2.body.4.bias", "layer1_2", "layer2_0"),  # padding shortcut next
                                   ("stem.0.weight", "stem", "layer1_0")]:
            unit = staging.tensor_unit[oracle.layout.names.index(tensor)]
            route = step.route(unit, tensor)
            ops = [op for op, _ in route]
            assert "enter" in ops and route[-1][0] == "receive", (tensor, route)
            assert ("merge" in ops) == (block != "stem")
            assert names[route[-1][1]] == f"{nxt}.body.0" and names[_skip_entry(route)] == nxt
            assert _dense_start(route) == route[-1][1] + 1
        last = staging.tensor_unit[oracle.layout.names.index("layer3_2.body.3.weight")]
        route = step.route(last, "layer3_2.body.3.weight")  # last block: through the merge into the classifier
    assert [op for op, _ in route] == ["batchnorm", "merge", "pool", "flatten", "receive"]


def bn_cnn():
    """A BatchNorm CNN with a residual block (identity shortcut), one with a projection shortcut whose
    merge has no activation, and a nested block whose band cannot pass an inner entry."""
    inner = Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), activation=nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                               nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), activation=nn.ReLU()),
        Residual(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), inner),
                 activation=nn.Tanh()),
        Residual(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)),
                 shortcut=nn.Sequential(nn.Conv2d(4, 6, 1, stride=2), nn.BatchNorm2d(6))),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(24, 10),
    ).double()


@pytest.mark.parametrize("bn_policy", ["batch", "eval"])
@pytest.mark.parametrize("max_chunk", [1, 5])
def test_batchnorm_cnn_float64_every_layer_matches_serial(digits, bn_policy, max_chunk):
    torch.manual_seed(0)
    model = bn_cnn()
    x, y = digits
    with torch.no_grad():
        model.train()
        model(x[:32].double())
    oracle = ModuleOracle(model, F.cross_entropy, batch=(x[:24].double(), y[:24]), bn_policy=bn_policy)
    coords = every_tensor_coords(oracle, per_tensor=5, seed=1)
    assert len(set(oracle.layout.block_index(coords).tolist())) == len(oracle.layout.names)
    est = CoordinateEstimator()
    plan = est.plan(oracle.get_params(), coords)
    ref, _ = losses(oracle, plan, SerialScheduler())
    got, _ = losses(oracle, plan, FeatureReuseScheduler(max_chunk=max_chunk))
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert rel(est.combine(plan, got).grad, est.combine(plan, ref).grad) <= 1e-10


# ---------------------------------------------------------------------------- chunk calibration
def _calibration_oracle(digits, n=16, dtype=torch.float64):
    torch.manual_seed(0)
    model = bn_model().to(dtype)
    x, y = digits
    return ModuleOracle(model, F.cross_entropy, batch=(x[:n].to(dtype), y[:n]))


def _chunk_sizes(scheduler, oracle, plan):
    """The chunk sizes the scheduler's jobs would use for ``plan``."""
    from zoblackbox.schedule.reuse import _StepCache

    staging = staging_of(oracle)
    base = oracle.layout.unflatten(plan.base)
    with torch.no_grad(), oracle.query_mode():
        step = _StepCache(staging, oracle, base, *oracle.batch)
        _, jobs = scheduler._jobs(oracle, plan, staging, step)
    return [job.size for job in jobs]


def test_chunk_calibration_is_cached_per_shape_and_device(digits, monkeypatch):
    from zoblackbox.schedule import reuse

    monkeypatch.setattr(reuse, "_CALIBRATIONS", {})
    made = []
    original = reuse._Calibration.__init__

    def counting(self, step, caps):
        made.append(tuple(step.acts[0].shape))
        original(self, step, caps)

    monkeypatch.setattr(reuse._Calibration, "__init__", counting)
    oracle = _calibration_oracle(digits)
    est = CoordinateEstimator()
    ref = est.estimate(oracle, oracle.get_params(), scheduler=SerialScheduler()).grad
    got = est.estimate(oracle, oracle.get_params(), scheduler=FeatureReuseScheduler()).grad
    assert rel(got, ref) <= 1e-10
    assert made == [(16, 1, 8, 8)]
    est.estimate(_calibration_oracle(digits), oracle.get_params(), scheduler=FeatureReuseScheduler())
    assert len(made) == 1  # another oracle and scheduler of the same shape: measured once
    est.estimate(_calibration_oracle(digits, n=24), oracle.get_params(), scheduler=FeatureReuseScheduler())
    assert made[1:] == [(24, 1, 8, 8)]  # another batch shape: measured again
    ((key, calibration),) = [(k, c) for k, c in reuse._CALIBRATIONS.items() if k[0][0] == (24, 1, 8, 8)]
    assert "cpu" in key and torch.float64 in key
    staging = staging_of(oracle)
    assert len(calibration.per_query) == staging.num_stages
    assert all(costs and min(costs) == 1 and all(t >= 0 for t in costs.values()) for costs in calibration.per_query)


def test_calibrated_chunks_respect_max_chunk_and_explicit_cache_override(digits, monkeypatch):
    from zoblackbox.schedule import reuse

    monkeypatch.setattr(reuse, "_CALIBRATIONS", {})
    oracle = _calibration_oracle(digits)
    plan = CoordinateEstimator().plan(oracle.get_params(), spread_coords(oracle, per_tensor=6))
    assert FeatureReuseScheduler().cpu_cache_bytes == "auto"
    assert max(_chunk_sizes(FeatureReuseScheduler(max_chunk=3), oracle, plan)) <= 3
    # an explicit cache size: the fixed cap, no calibration (a tiny cap: one query per chunk)
    monkeypatch.setattr(reuse, "_CALIBRATIONS", {})
    assert set(_chunk_sizes(FeatureReuseScheduler(cpu_cache_bytes=1), oracle, plan)) == {1}
    assert reuse._CALIBRATIONS == {}
    none = _chunk_sizes(FeatureReuseScheduler(cpu_cache_bytes=None, max_chunk=7), oracle, plan)
    assert reuse._CALIBRATIONS == {} and max(none) == 7

    # a calibration whose measurements say "the bigger the chunk, the cheaper per query" gives big chunks
    class Fake:
        def __init__(self, step, caps):
            self.per_query = [{k: 1.0 / k for k in reuse.CALIBRATION_CHUNKS if k <= cap} for cap in caps]

        chunk = reuse._Calibration.chunk
        key = reuse._Calibration.key

    monkeypatch.setattr(reuse, "_Calibration", Fake)
    big = _chunk_sizes(FeatureReuseScheduler(max_chunk=16), oracle, plan)
    assert max(big) == 16
    with pytest.raises(ConfigError, match="cpu_cache_bytes"):
        FeatureReuseScheduler(cpu_cache_bytes="fast")


# ---------------------------------------------------------------------------- the benchmark's block loop
def test_benchmark_block_loop_gradient_equals_the_scheduler_in_float64():
    """benchmarks/feature_reuse.py's per-query block-reuse loop (DeepZero's scheme) and the reuse
    scheduler give the same float64 gradient on the same coordinates, and the loop restores every weight."""
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # appended: benchmarks/mujoco.py must not shadow the mujoco package
    import feature_reuse

    torch.manual_seed(0)
    model = resnet20().double()
    oracle = StagedOracle(model, F.cross_entropy, batch=(torch.randn(4, 3, 8, 8, dtype=torch.float64),
                                                         torch.tensor([3, 7, 1, 0])))
    x = oracle.get_params()
    coords = feature_reuse.sample_coords(oracle, 40, 2, seed=1)
    steps = feature_reuse.realized_steps(x, coords, feature_reuse.MU)
    f0, block = feature_reuse.block_reuse_cge_losses(oracle, x, coords, feature_reuse.MU)
    assert torch.equal(oracle.get_params(), x)
    grad_loop = (block - f0) / steps
    grad = CoordinateEstimator(mu=feature_reuse.MU).estimate(oracle, x, coords=coords,
                                                             scheduler=FeatureReuseScheduler()).grad[coords]
    assert rel(grad, grad_loop) <= 1e-10
    macs = feature_reuse.macs_per_query(oracle, x, coords)
    assert macs["naive"] > macs["block_loop"] > macs["layer_floor"] > macs["reuse"] > 0


def test_banded_skip_of_a_model_run_query_by_query_matches_serial(monkeypatch):
    """Where vmap is known to fail, a banded skip input is written out per query (the fallback path)."""
    from zoblackbox.schedule import reuse

    monkeypatch.setattr(reuse, "known_unvmappable", lambda model: True)
    torch.manual_seed(0)
    model = resnet20().double()
    oracle = StagedOracle(model, F.cross_entropy, batch=(torch.randn(2, 3, 8, 8, dtype=torch.float64),
                                                         torch.tensor([3, 7])))
    plan = CoordinateEstimator().plan(oracle.get_params(), every_tensor_coords(oracle, per_tensor=2, seed=2))
    ref, _ = losses(oracle, plan, SerialScheduler())
    got, _ = losses(oracle, plan, FeatureReuseScheduler(max_chunk=3))
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
