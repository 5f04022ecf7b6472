"""Automatic staging of ordinary modules from their torch.fx graph (zoblackbox.staged_fx).

The scheduler-equivalence table: FeatureReuseScheduler's CGE gradient on models written as plain
``nn.Module`` s (a ResNet-18-style CIFAR network, ViTs, a GPT-style decoder) equals
SerialScheduler's to 1e-10 relative in float64, with the same query count, on coordinates sampled
from every stage. Then the fallbacks (each warns once, each still matches the serial gradient)
and the bad inputs.
"""

import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoblackbox import ConfigError, CoordinateEstimator, RandomEstimator
from zoblackbox.adapters import ModuleOracle
from zoblackbox.models import digits_vit
from zoblackbox.schedule import FeatureReuseScheduler, SerialScheduler
from zoblackbox.staged import StagedOracle, Staging, StagingWarning, staging_of

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # appended: benchmarks/mujoco.py must not shadow the mujoco package
from fx_models import ResNet18, TinyGPT, TinyViT


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def resnet18_problem():
    model = ResNet18(widths=(4, 8, 16, 32)).double()
    return model, torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))


def vit_problem():
    return TinyViT().double(), torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))


def digits_vit_problem():
    return digits_vit().double(), torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))


def gpt_problem(tied=False):
    idx = torch.randint(0, 11, (3, 8))
    return TinyGPT(tied=tied).double(), idx, torch.randint(0, 11, (3 * 8,))


PROBLEMS = {"resnet18": resnet18_problem, "vit": vit_problem, "digits_vit": digits_vit_problem, "gpt": gpt_problem}
MIN_STAGES = {"resnet18": 41, "vit": 21, "digits_vit": 21, "gpt": 20}


def make_oracle(name, **kw):
    torch.manual_seed(0)
    model, x, y = PROBLEMS[name]()
    return ModuleOracle(model, F.cross_entropy, batch=(x, y), **kw)


def coords_in_every_stage(oracle, per_tensor=2, seed=0):
    """``per_tensor`` coordinates of every parameter tensor (so of every stage), sorted."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in oracle.layout.names:
        sl = oracle.layout.slice(name)
        out.append(sl.start + torch.randperm(sl.stop - sl.start, generator=g)[:per_tensor])
    return torch.cat(out).sort().values


def assert_matches_serial(oracle, coords, scheme="forward", scheduler=None, estimator=None):
    """``estimator``: a factory (a fresh one per run, so that a random estimator draws the same directions)."""
    make = estimator or (lambda: CoordinateEstimator(scheme=scheme))
    x = oracle.get_params()
    before = oracle.nfev
    ref = make().estimate(oracle, x, coords=coords, scheduler=SerialScheduler())
    mid = oracle.nfev
    got = make().estimate(oracle, x, coords=coords, scheduler=scheduler or FeatureReuseScheduler())
    assert got.nfev == ref.nfev == mid - before == oracle.nfev - mid
    assert rel(got.grad, ref.grad) <= 1e-10, rel(got.grad, ref.grad)
    return got, ref


# ---------------------------------------------------------------------------- the equivalence table
@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_traced_model_matches_serial(name, scheme):
    oracle = make_oracle(name)
    staging = staging_of(oracle)
    assert staging.traced and staging.reason == "" and staging.num_stages >= MIN_STAGES[name]
    coords = coords_in_every_stage(oracle)
    assert set(staging.stage_of(coords).tolist()) == set(range(staging.num_stages))
    assert_matches_serial(oracle, coords, scheme)


@pytest.mark.parametrize("name", ["resnet18", "vit", "gpt"])
def test_traced_model_without_explicit_deltas_matches_serial(name):
    oracle = make_oracle(name)
    assert_matches_serial(oracle, coords_in_every_stage(oracle, per_tensor=1),
                          scheduler=FeatureReuseScheduler(explicit_deltas=False))


def test_traced_resnet18_in_eval_policy_with_running_statistics():
    torch.manual_seed(0)
    model, x, y = resnet18_problem()
    with torch.no_grad():  # running statistics that differ from the batch's
        model.train()
        model(2.0 * x + 1.0)
    oracle = ModuleOracle(model, F.cross_entropy, batch=(x, y), bn_policy="eval")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert_matches_serial(oracle, coords_in_every_stage(oracle, per_tensor=1))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_traced_vit_direction_plans_and_small_chunks_match_serial():
    oracle = make_oracle("vit")
    assert_matches_serial(oracle, None, estimator=lambda: RandomEstimator(q=5, seed=2))
    coords = coords_in_every_stage(oracle, per_tensor=3)
    assert_matches_serial(oracle, coords, scheduler=FeatureReuseScheduler(max_chunk=2))


def test_traced_vit_parameter_subset_keeps_frozen_parameters():
    torch.manual_seed(0)
    model, x, y = vit_problem()
    names = ["pos_embed", "blocks.0.ln1.weight", "blocks.1.attn.k.weight", "head.bias"]
    oracle = StagedOracle(model, F.cross_entropy, params=names, batch=(x, y))
    assert oracle.staging.traced and oracle.staging.num_stages == 4
    assert_matches_serial(oracle, None)


# ---------------------------------------------------------------------------- what the staging looks like
def test_resnet18_layers_are_plain_units_and_residuals_stay_live():
    oracle = make_oracle("resnet18")
    staging = staging_of(oracle)
    kinds = {u.name: u.kind for u in staging.units}
    for name, module in oracle.model.named_modules():
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
            assert kinds[name] == {nn.Conv2d: "conv", nn.BatchNorm2d: "batchnorm", nn.Linear: "linear"}[type(module)]
    # inside a block the block's input is live (the shortcut reads it): enclosing is non-empty there
    conv1 = next(u for u, unit in enumerate(staging.units) if unit.name == "layer2.0.conv1")
    merge = next(u for u in range(conv1, len(staging.units)) if staging.units[u].kind == "fx"
                 and staging.units[u].name.startswith("add"))
    assert all(staging.enclosing[u] for u in range(conv1, merge + 1))
    assert staging.enclosing[merge + 1] == ()
    rows = oracle.staging.summary() if hasattr(oracle, "staging") else staging.summary()
    assert sum(r["params"] for r in rows) == oracle.dim and rows[0]["stage"] == "conv1"


def test_vit_parameters_read_with_get_attr_are_owned_by_graph_segments():
    oracle = make_oracle("vit")
    staging = staging_of(oracle)
    for name in ("cls_token", "pos_embed"):
        unit = staging.units[staging.tensor_unit[oracle.layout.names.index(name)]]
        assert unit.kind == "fx" and unit.name == name
        assert staging.stages[unit.stage].name == name
    norm = staging.units[staging.tensor_unit[oracle.layout.names.index("blocks.0.ln1.weight")]]
    assert norm.kind == "fx"
    assert [staging.units[staging.tensor_unit[oracle.layout.names.index(f"blocks.0.attn.{p}.weight")]].kind
            for p in "qkv"] == ["linear"] * 3


# ---------------------------------------------------------------------------- fallbacks
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # control flow on data: fx cannot trace it
            h = torch.tanh(h)
        return self.b(h)


class SharedGetAttr(nn.Module):
    """A parameter read twice: fx reads it once (one get_attr node) and keeps the value live."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.shift = nn.Parameter(torch.linspace(-1, 1, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x + self.shift)) * self.shift)


class LayerUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class InplaceOnSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        y = torch.sigmoid(h)
        h.mul_(2.0)  # written into after y was computed from it; read again below
        return self.b(y + h)


class AliasedAugmentedAssign(nn.Module):
    """``y += 1`` writes into ``h`` (the same tensor) in eager mode; fx records an out-of-place add."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        y = h
        y += 1.0
        return self.b(h) + y[:, :3]


class SafeInplace(nn.Module):
    """In-place operations on values nobody reads afterwards: staged, run out of place."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.a(x)
        h = h.mul_(2.0)
        return self.b(self.act(h) + x)


class ItemScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h / h.abs().max().item())  # a Python number read from the data


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x, mask=None, scale=2.0):
        h = torch.tanh(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        return self.b(h) + x[:, :3]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x, mask):
        return self.a(x * mask)


def small_oracle(model, **kw):
    torch.manual_seed(0)
    model = model.double()
    x = torch.randn(8, 6, dtype=torch.float64)
    return ModuleOracle(model, F.cross_entropy, batch=(x, torch.arange(8) % 3), **kw)


FALLBACKS = {
    "untraceable": (DataDependent, "cannot trace DataDependent"),
    "tied-gpt": (lambda: TinyGPT(tied=True), "'tok.weight' is used in two places"),
    "layer-used-twice": (LayerUsedTwice, "'lin.weight' is used in two places"),
    "inplace-on-skip": (InplaceOnSkip, "in-place operation call_method 'mul_'"),
    "aliased-augmented-assignment": (AliasedAugmentedAssign, "output differs from the model's"),
    "item": (ItemScale, "call_method 'item' (item) reads a tensor's data into Python"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_fallback_warns_once_and_matches_serial(name):
    make, message = FALLBACKS[name]
    if name == "tied-gpt":
        torch.manual_seed(0)
        model, x, y = gpt_problem(tied=True)
        oracle = ModuleOracle(model, F.cross_entropy, batch=(x, y))
    else:
        oracle = small_oracle(make())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        staging = staging_of(oracle)
        for scheme in ("forward", "central"):
            assert_matches_serial(oracle, coords_in_every_stage(oracle, per_tensor=3), scheme)
    staging_warnings = [w for w in caught if issubclass(w.category, StagingWarning)]
    assert len(staging_warnings) == 1, [str(w.message) for w in caught]
    assert message in str(staging_warnings[0].message)
    staging = staging_of(oracle)
    assert staging.num_stages == 1 and not staging.traced and message in staging.reason


@pytest.mark.parametrize("model", [SafeInplace, OptionalMask, SharedGetAttr])
def test_safe_inplace_operations_default_arguments_and_reread_parameters_are_staged(model):
    oracle = small_oracle(model())
    with warnings.catch_warnings():
        warnings.simplefilter("error", StagingWarning)
        staging = staging_of(oracle)
    layers = [m for m in oracle.model.children() if list(m.parameters())]
    assert staging.traced and staging.num_stages == len(layers) + (model is SharedGetAttr)
    for scheme in ("forward", "central"):
        assert_matches_serial(oracle, None, scheme)
    for scheme in ("forward", "central"):
        assert_matches_serial(oracle, None, scheme, scheduler=FeatureReuseScheduler(explicit_deltas=False))


def test_model_returning_a_tuple_falls_back():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h), self.c(h)

    torch.manual_seed(0)
    x = torch.randn(8, 6, dtype=torch.float64)
    oracle = ModuleOracle(TwoHeads().double(), lambda out, y: F.cross_entropy(out[0], y) + out[1].square().mean(),
                          batch=(x, torch.arange(8) % 3))
    with pytest.warns(StagingWarning, match="returns tuple, not one tensor"):
        staging = staging_of(oracle)
    assert staging.num_stages == 1
    assert_matches_serial(oracle, None)


def test_forward_with_two_inputs_is_refused():
    oracle = small_oracle(TwoInputs())
    with pytest.raises(ConfigError, match=r"takes the inputs \['x', 'mask'\] \(2 required\)"):
        Staging.from_model(oracle.model, oracle.layout)
    with pytest.raises(ConfigError, match="one input"):
        CoordinateEstimator().estimate(oracle, oracle.get_params(), scheduler=FeatureReuseScheduler())


def test_dropout_is_traced_in_query_mode():
    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.drop = nn.Linear(6, 6), nn.Linear(6, 3), nn.Dropout(0.5)

        def forward(self, x):
            h = F.dropout(torch.tanh(self.a(x)), 0.5, self.training)
            return self.b(self.drop(h)) + x[:, :3]

    model = WithDropout()
    model.train()  # the oracle's queries run with dropout off; the trace must too
    oracle = small_oracle(model)
    assert staging_of(oracle).traced and model.training
    assert_matches_serial(oracle, None, "central")


def test_traced_models_float32_losses_within_documented_tolerance():
    """float32: every query's loss within 1e-6 relative of the serial one (docs/schedulers.md)."""
    for name in ("resnet18", "vit"):
        torch.manual_seed(0)
        model, x, y = PROBLEMS[name]()
        oracle = ModuleOracle(model.float(), F.cross_entropy, batch=(x.float(), y))
        plan = CoordinateEstimator().plan(oracle.get_params(), coords_in_every_stage(oracle, per_tensor=1))
        ref = SerialScheduler().run(oracle, plan)
        got = FeatureReuseScheduler().run(oracle, plan)
        assert float(((got - ref).abs() / ref.abs()).max()) <= 1e-6, name


def test_staged_oracle_of_a_traced_model_pickles():
    torch.manual_seed(0)
    model, x, y = vit_problem()
    oracle = StagedOracle(model, F.cross_entropy, batch=(x, y))
    copy = pickle.loads(pickle.dumps(oracle))
    assert copy.staging.traced and copy.staging.num_stages == oracle.staging.num_stages
    assert_matches_serial(copy, coords_in_every_stage(copy, per_tensor=1))


def test_parameters_the_forward_never_reads_are_staged_with_zero_gradient():
    class WithUnusedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.aux = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    oracle = small_oracle(WithUnusedHead())
    staging = staging_of(oracle)
    assert staging.traced and staging.stages[-1].name == "<unused parameters>"
    assert staging.stages[-1].param_names == ("aux.weight", "aux.bias")
    got, _ = assert_matches_serial(oracle, None, "central")
    assert torch.equal(got.grad[oracle.layout.slice("aux.weight").start:], torch.zeros(14, dtype=torch.float64))
