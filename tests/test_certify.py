"""Randomized smoothing (zoblackbox.smoothing), the query-only classifier and denoised smoothing
(zoblackbox.adapters.blackbox), and ``zoblackbox certify``."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binomtest, norm
from torch import nn

from zoblackbox import CoordinateEstimator, RandomEstimator
from zoblackbox.adapters.blackbox import (
    BlackBoxClassifier,
    DenoisedClassifier,
    DenoiserOracle,
    LatentOracle,
    latent_zo_gradient,
    mlp_autoencoder,
    mlp_denoiser,
    stability_loss,
    train_classifier,
    train_mse_denoiser,
    train_zo_ae_ds,
    train_zo_sparse,
)
from zoblackbox.cli import main
from zoblackbox.data import load_digits_split
from zoblackbox.errors import BudgetExhaustedError, ConfigError, OracleError
from zoblackbox.smoothing import (
    ABSTAIN,
    Smooth,
    certified_accuracy,
    certified_radius,
    clopper_pearson_lower,
    max_certifiable_radius,
)

SHAPE = (1, 8, 8)


def constant(label: int, num_classes: int = 10):
    """A base classifier that always answers ``label`` (logits)."""

    def f(x):
        out = torch.zeros(x.shape[0], num_classes)
        out[:, label] = 1.0
        return out

    return f


def coin(x):
    """Class 0 or 1 by the sign of the first pixel: a fair coin under noise around 0."""
    out = torch.zeros(x.shape[0], 10)
    out[torch.arange(x.shape[0]), (x.flatten(1)[:, 0] > 0).long()] = 1.0
    return out


@pytest.fixture(scope="module")
def digits():
    split = load_digits_split()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train_classifier(model, split.x_train, split.y_train, epochs=15, batch_size=128, lr=3e-3)
    return split, model


# --------------------------------------------------------------------------- Clopper-Pearson and radii
def test_clopper_pearson_hand_computed():
    # all n successes: the bound solves p^n = alpha
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10), rel=1e-12)  # 0.74113
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    # 5 of 10: the lower end of the two-sided 90% exact interval, 0.2224
    assert clopper_pearson_lower(5, 10, 0.05) == pytest.approx(0.22244, abs=1e-5)
    for k, n in [(5, 10), (990, 1000), (1900, 2000)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.998, method="exact")
        assert clopper_pearson_lower(k, n, 0.001) == pytest.approx(ci.low, rel=1e-10)


def test_radius_hand_computed():
    assert certified_radius(norm.cdf(1.0), 0.5) == pytest.approx(0.5, rel=1e-12)
    assert certified_radius(norm.cdf(2.0), 0.25) == pytest.approx(0.5, rel=1e-12)
    assert certified_radius(0.5, 0.5) == 0.0
    assert certified_radius(0.3, 0.5) == 0.0
    # n = 2000, alpha = 0.001: pA <= 0.001 ** (1/2000) = 0.996552, radius <= 2.70 sigma
    assert max_certifiable_radius(0.5, 2000, 0.001) == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 2000)), rel=1e-12)
    assert max_certifiable_radius(1.0, 2000, 0.001) == pytest.approx(2.7017, abs=1e-3)


def test_certify_constant_classifier_reaches_the_max_radius_with_fresh_noise():
    seen = []

    def f(x):
        seen.append(x.clone())
        return constant(3)(x)

    smooth = Smooth(f, 10, 0.5, input_shape=SHAPE, batch_size=64)
    x = torch.full(SHAPE, 0.5)
    label, radius = smooth.certify(x, n0=20, n=100, alpha=0.001)
    assert label == 3
    assert radius == pytest.approx(max_certifiable_radius(0.5, 100, 0.001), rel=1e-12)
    assert smooth.samples == 120
    assert [t.shape[0] for t in seen] == [20, 64, 36]  # n0 alone, then n in batches of 64
    assert not torch.equal(seen[0], seen[1][:20])  # the estimation draws are fresh noise
    assert smooth.predict(x, n=50, alpha=0.001) == 3


def test_abstains_on_a_coin_flip():
    smooth = Smooth(coin, 10, 1.0, input_shape=SHAPE, input_range=None, seed=0)
    x = torch.zeros(SHAPE)
    assert smooth.certify(x, n0=100, n=1000, alpha=0.001) == (ABSTAIN, 0.0)
    assert smooth.predict(x, n=1000, alpha=0.001) == ABSTAIN
    # a clear majority is not abstained from: the first pixel far above 0
    x[0, 0, 0] = 3.0
    assert smooth.predict(x, n=200, alpha=0.001) == 1
    assert smooth.certify(x, n0=100, n=1000, alpha=0.001)[0] == 1


def test_certified_accuracy_counts_abstentions_as_wrong():
    acc = certified_accuracy([1, 2, ABSTAIN, 4], [0.3, 0.6, 0.0, 0.1], [1, 2, 3, 0], [0.0, 0.25, 0.5, 0.75])
    assert acc == {0.0: 0.5, 0.25: 0.5, 0.5: 0.25, 0.75: 0.0}


# --------------------------------------------------------------------------- the query-only wrapper
def test_blackbox_exposes_no_gradient_and_no_module():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    bb = BlackBoxClassifier(model, num_classes=10, input_shape=SHAPE)
    x = torch.rand(4, *SHAPE, requires_grad=True)
    out = bb.logits(x)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out.sum(), x)
    assert not isinstance(bb, nn.Module)
    assert not hasattr(bb, "parameters") and not hasattr(bb, "state_dict")
    public = {name: getattr(bb, name) for name in dir(bb) if not name.startswith("__")}
    assert not any(isinstance(v, (nn.Module, torch.nn.Parameter)) for v in public.values())
    assert all(v is not model for v in vars(bb).values())
    assert all(p.grad is None for p in model.parameters())
    # a denoiser in front keeps the output gradient-free too
    den = mlp_denoiser(SHAPE, (16,))
    assert not DenoisedClassifier(bb, den)(x).requires_grad


def test_query_counter_is_exact_and_budget_refuses_before_sending():
    calls = []

    def f(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 10)

    bb = BlackBoxClassifier(f, num_classes=10, input_shape=SHAPE, budget=300)
    bb.logits(torch.rand(7, *SHAPE))
    bb.predict(torch.rand(5, *SHAPE))
    assert bb.queries == 12 == sum(calls)
    smooth = Smooth(DenoisedClassifier(bb), 10, 0.5, input_shape=SHAPE, batch_size=7)
    smooth.certify(torch.rand(SHAPE), n0=10, n=25, alpha=0.01)
    assert bb.queries == 12 + 35 == smooth.samples + 12 == sum(calls)
    with pytest.raises(BudgetExhaustedError, match="budget of 300"):
        bb.logits(torch.rand(300, *SHAPE))
    assert bb.queries == 47 == sum(calls)  # nothing was sent
    assert bb.reset_queries() == 47 and bb.queries == 0


def test_latent_oracle_counts_one_query_per_image_and_matches_autograd():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Unflatten(1, SHAPE)).double()
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    bb = BlackBoxClassifier(clf, num_classes=10, input_shape=SHAPE)
    oracle = LatentOracle(dec, bb, 4, dtype=torch.float64)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    oracle.set_targets(targets)
    grad, info = latent_zo_gradient(oracle, CoordinateEstimator(mu=1e-5, scheme="central"), z)
    assert info["queries"] == 6 * 8 == oracle.nfev == bb.queries
    # the same per-image losses with autograd (a white-box check, only possible in a test)
    loss = F.cross_entropy(clf(dec(z)), targets, reduction="sum")
    (exact,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(grad, exact, rtol=1e-6, atol=1e-8)
    rge, info = latent_zo_gradient(oracle, RandomEstimator(q=7), z.detach())
    assert info["queries"] == 6 * 8 and rge.shape == (6, 4)


def test_denoiser_oracle_coordinate_fast_path_matches_plain_points():
    torch.manual_seed(0)
    den = mlp_denoiser(SHAPE, (8,)).double()
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    bb = BlackBoxClassifier(clf, num_classes=10, input_shape=SHAPE)
    oracle = DenoiserOracle(den, bb)
    oracle.set_batch(torch.rand(5, *SHAPE, dtype=torch.float64), torch.arange(5))
    x = oracle.get_params()
    plan = CoordinateEstimator().plan(x, torch.tensor([0, 3, 511, 520, 600, oracle.dim - 1]))
    fast = oracle.evaluate_plan(plan)
    plain = oracle.evaluate(plan.points())
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=0)
    assert oracle.nfev == 2 * len(plan) and bb.queries == 2 * len(plan) * 5


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, "sigma must be a positive finite number, got 0.0"),
    ({"sigma": -0.5}, "got -0.5"),
    ({"sigma": math.nan}, "got nan"),
    ({"n0": 0}, "n0 must be an int >= 1, got 0"),
    ({"n": 0}, "n must be an int >= 1, got 0"),
    ({"alpha": 0.0}, r"alpha must be in \(0, 1\), got 0.0"),
    ({"alpha": 1.0}, "got 1.0"),
    ({"alpha": 1.5}, "got 1.5"),
    ({"x": torch.zeros(1, 8, 9)}, r"x must have shape \(1, 8, 8\) \(one input\), got \(1, 8, 9\)"),
    ({"x": torch.zeros(2, 1, 8, 8)}, r"got \(2, 1, 8, 8\)"),
    ({"x": torch.full(SHAPE, 2.0)}, r"x must lie in \[0, 1\].*got values in \[2, 2\]"),
    ({"x": torch.full(SHAPE, math.nan)}, "non-finite"),
])
def test_bad_inputs_name_the_bad_value(kwargs, match):
    sigma = kwargs.pop("sigma", 0.5)
    args = {"x": torch.rand(SHAPE), "n0": 10, "n": 20, "alpha": 0.01, **kwargs}
    with pytest.raises(ConfigError, match=match):
        Smooth(constant(0), 10, sigma, input_shape=SHAPE).certify(**args)


def test_bad_inputs_of_the_wrapper_and_the_trainers():
    bb = BlackBoxClassifier(constant(0), num_classes=10, input_shape=SHAPE)
    with pytest.raises(ConfigError, match=r"x must have shape \(B, 1, 8, 8\) with B >= 1, got \(1, 8, 8\)"):
        bb.logits(torch.rand(SHAPE))
    bad_range = torch.rand(4, *SHAPE) * 255
    with pytest.raises(ConfigError, match=r"images must lie in \[0, 1\]"):
        train_mse_denoiser(mlp_denoiser(SHAPE, (8,)), bad_range, sigma=0.5, epochs=1)
    with pytest.raises(ConfigError, match="sigma must be a positive finite number, got -1"):
        train_zo_sparse(mlp_denoiser(SHAPE, (8,)), bb, torch.rand(4, *SHAPE), sigma=-1)
    with pytest.raises(OracleError, match=r"returned shape \(3, 5\)"):
        BlackBoxClassifier(lambda x: torch.zeros(x.shape[0], 5), num_classes=10, input_shape=SHAPE).logits(
            torch.rand(3, *SHAPE))
    with pytest.raises(OracleError, match="non-finite logits"):
        Smooth(lambda x: torch.full((x.shape[0], 10), math.nan), 10, 0.5, input_shape=SHAPE).certify(
            torch.rand(SHAPE), 5, 5, 0.1)


def test_nonfinite_logits_during_training_follow_the_failure_policy(digits):
    split, model = digits
    calls = {"n": 0}

    def flaky(x):  # every 5th call returns NaN logits for half of its images
        calls["n"] += 1
        out = model(x)
        if calls["n"] % 5 == 0:
            out[::2] = math.nan
        return out

    images = split.x_train[:64]
    enc, dec = mlp_autoencoder(SHAPE, 4, 16)
    kwargs = {"sigma": 0.5, "latent_dim": 4, "epochs": 1, "batch_size": 16}
    bb = BlackBoxClassifier(flaky, num_classes=10, input_shape=SHAPE)
    report = train_zo_ae_ds(mlp_denoiser(SHAPE, (16,)), enc, dec, bb, images, on_failure="skip", **kwargs)
    assert report.failures["failed_queries"] > 0 and report.failures["by_kind"] == {
        "nonfinite": report.failures["failed_queries"]}
    assert all(math.isfinite(float(p.detach().sum())) for p in enc.parameters())
    calls["n"] = 0
    with pytest.raises(OracleError, match="non-finite outputs"):
        train_zo_ae_ds(mlp_denoiser(SHAPE, (16,)), enc, dec, bb, images, on_failure="raise", **kwargs)


# --------------------------------------------------------------------------- training
def test_zo_ae_ds_lowers_the_stability_loss(digits):
    split, model = digits
    torch.manual_seed(0)
    bb = BlackBoxClassifier(model, num_classes=10, input_shape=SHAPE)
    images = split.x_train[:256]
    den = mlp_denoiser(SHAPE, (64,))
    enc, dec = mlp_autoencoder(SHAPE, 8, 64)
    pipe_model = nn.Sequential(den, enc, dec)
    train_mse_denoiser(pipe_model, images, sigma=0.5, epochs=10, batch_size=64, lr=3e-3)
    pipe = DenoisedClassifier(bb, pipe_model)
    held_out = split.x_train[256:512]
    targets = bb.predict(held_out)
    before = stability_loss(pipe, held_out, sigma=0.5, targets=targets, seed=1)
    q0 = bb.queries
    report = train_zo_ae_ds(den, enc, dec, bb, images, sigma=0.5, latent_dim=8, epochs=8, batch_size=32, lr=3e-3)
    spent = bb.queries - q0
    after = stability_loss(pipe, held_out, sigma=0.5, targets=targets, seed=1)
    assert after < before - 0.05, (before, after)
    # exact query count: labels of the 256 images once, then 2 * 8 + 1 central CGE rows of the BlackBox
    # (f(decoder(z)) itself and 2 * 8 perturbations) per image per epoch
    assert report.queries == spent == 256 + 8 * 256 * (2 * 8 + 1)
    assert report.oracle_queries == 8 * 256 * (2 * 8 + 1)


def test_zo_sparse_counts_queries_exactly(digits):
    split, model = digits
    bb = BlackBoxClassifier(model, num_classes=10, input_shape=SHAPE)
    torch.manual_seed(0)
    den = mlp_denoiser(SHAPE, (8,))
    images = split.x_train[:40]
    report = train_zo_sparse(den, bb, images, sigma=0.5, sparsity=0.9, epochs=1, batch_size=20, grasp_q=4)
    n_active = report.info["n_active"]
    # labels (40) + ZO-GraSP 2 (q + 1) queries of a 20-image batch + 2 steps x (n_active + 1) x 20
    assert report.queries == bb.queries == 40 + 2 * 5 * 20 + 2 * (n_active + 1) * 20
    assert report.oracle_queries == 2 * 5 + 2 * (n_active + 1)
    assert set(report.info["ratios"]) == {"1.weight", "3.weight"}


# --------------------------------------------------------------------------- the command line
def test_cli_certify_end_to_end(tmp_path, capsys):
    path = tmp_path / "certify.json"
    rc = main(["certify", "--pipeline", "none", "mse", "zo-ae-ds-cge", "--num-images", "6", "--n0", "10",
               "--n", "60", "--alpha", "0.01", "--epochs-factor", "0.02", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["max_radius"] == pytest.approx(max_certifiable_radius(0.5, 60, 0.01))
    assert set(data["certified_accuracy"]) == {"none", "mse", "zo-ae-ds-cge"}
    for accs in data["certified_accuracy"].values():
        assert list(accs) == ["0.0", "0.25", "0.5", "0.75"]
        assert all(0 <= a <= 1 for a in accs.values())
    assert data["queries"]["none"] == data["queries"]["mse"] == 0 and data["queries"]["zo-ae-ds-cge"] > 0
    assert data["certify_queries"]["mse"] == 6 * 70
    assert "max certifiable radius" in capsys.readouterr().out


def test_cli_certify_rejects_bad_values(capsys):
    for argv, message in ((["--sigma", "0"], "expected a positive finite number, got 0.0"),
                          (["--alpha", "1.5"], "expected a number in (0, 1), got 1.5"),
                          (["--n", "0"], "expected a positive integer, got 0")):
        with pytest.raises(SystemExit) as info:
            main(["certify", *argv])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_zo_sparse_is_a_driver_of_the_engine(digits, monkeypatch):
    """train_zo_sparse runs AskTell over the denoiser's flat parameters: one engine iteration per
    batch, each estimating the active coordinates only, and the denoiser holds the engine's iterate."""
    from zoblackbox import AskTell

    split, model = digits
    engines = []
    original = AskTell.step

    def recording_step(self, oracle, scheduler=None):
        if not engines or engines[-1] is not self:
            engines.append(self)
        return original(self, oracle, scheduler)

    monkeypatch.setattr(AskTell, "step", recording_step)
    bb = BlackBoxClassifier(model, num_classes=10, input_shape=SHAPE)
    torch.manual_seed(0)
    den = mlp_denoiser(SHAPE, (8,))
    images = split.x_train[:50]
    report = train_zo_sparse(den, bb, images, sigma=0.5, sparsity=0.9, epochs=2, batch_size=20, grasp_q=4,
                             mask_interval=2, mse_weight=0.5)
    n_active, grasp = report.info["n_active"], 2 * (4 + 1)
    assert report.steps == 2 * 3 and len(report.history) == 2
    assert report.oracle_queries == report.steps * (n_active + 1) + grasp
    assert report.queries == bb.queries == 50 + grasp * 20 + 2 * ((n_active + 1) * (20 + 20 + 10))
    (engine,) = engines
    assert engine.nit == report.steps == len(engine.history) and engine.nfev == report.steps * (n_active + 1)
    named = dict(den.named_parameters())
    flat = torch.cat([named[n].detach().reshape(-1) for n in ("1.weight", "1.bias", "3.weight", "3.bias")])
    assert torch.equal(flat, engine.x)
    assert all(math.isfinite(h["loss"]) for h in report.history)


def test_zo_sparse_estimates_each_steps_own_mask(digits, monkeypatch):
    """The mask drawn at step k (every mask_interval steps) is the one step k's estimate covers."""
    from zoblackbox.sparsity import CoordinateSampler

    split, model = digits
    masks, planned = [], []
    sample, evaluate_plan = CoordinateSampler.sample, DenoiserOracle.evaluate_plan

    def recording_sample(self, x=None):
        masks.append(sample(self, x))
        return masks[-1]

    def recording_plan(self, plan, chunk_size=None):
        planned.append(plan.coords.clone())
        return evaluate_plan(self, plan, chunk_size)

    monkeypatch.setattr(CoordinateSampler, "sample", recording_sample)
    monkeypatch.setattr(DenoiserOracle, "evaluate_plan", recording_plan)
    bb = BlackBoxClassifier(model, num_classes=10, input_shape=SHAPE)
    torch.manual_seed(0)
    report = train_zo_sparse(mlp_denoiser(SHAPE, (8,)), bb, split.x_train[:40], sigma=0.5, sparsity=0.9,
                             ratios="uniform", epochs=1, batch_size=8, mask_interval=2)
    assert report.steps == 5 and len(planned) == 5 and len(masks) == 3
    for k, coords in enumerate(planned):
        assert torch.equal(coords, masks[k // 2]), k
