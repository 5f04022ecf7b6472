"""Seed replay (memory-free RGE) equals the batched RGE path for the same seeds, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from zoblackbox import (
    AskTell,
    ConfigError,
    FunctionOracle,
    RandomEstimator,
    SeededDirections,
    SeedReplayEstimator,
    SeedReplaySGD,
    Trainer,
)
from zoblackbox.seed_replay import SeededEstimate, SeededPlan


def _quartic(x):
    return float((x ** 2).sum() + 0.1 * (x ** 4).sum() + x[0] * x[-1])


def _oracle(dim=37):
    return FunctionOracle(_quartic, dim=dim, dtype=torch.float64)


@pytest.mark.parametrize("base", ["gaussian", "rademacher"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_replay_equals_batched_for_the_same_seeds(base, antithetic):
    dirs = SeededDirections(base, block=8)  # 37 entries: several blocks and a short last one
    x = torch.linspace(-1, 2, 37, dtype=torch.float64)
    kw = {"mu": 1e-3, "q": 6, "antithetic": antithetic, "seed": 11}
    batched = RandomEstimator(directions=dirs, **kw)
    replay = SeedReplayEstimator(directions=dirs, **kw)
    pb, pr = batched.plan(x), replay.plan(x)
    assert torch.equal(pr.points(), pb.points())  # the same query points, bit for bit
    losses = torch.tensor([_quartic(p) for p in pb.points()], dtype=torch.float64)
    gb, est = batched.combine(pb, losses).grad, replay.combine(pr, losses)
    assert isinstance(est, SeededEstimate)
    torch.testing.assert_close(est.grad, gb, rtol=1e-12, atol=1e-14)
    assert batched.generator.get_state().equal(replay.generator.get_state())  # the same draws consumed


def test_evaluation_uses_one_scratch_buffer():
    plan = SeedReplayEstimator(mu=1e-3, q=4, seed=0).plan(torch.zeros(20, dtype=torch.float64))
    buffers = {X.data_ptr() for start, _, X in plan.chunks(256) if start > 0}
    assert len(buffers) == 1 and len(plan) == 5


def test_coords_support_equals_batched():
    x = torch.linspace(-1, 1, 37, dtype=torch.float64)
    coords = torch.tensor([3, 0, 30, 17, 8, 22])
    dirs = SeededDirections(block=4)
    b = RandomEstimator(mu=1e-3, q=5, directions=dirs, seed=2).estimate(_oracle(), x, coords=coords)
    r = SeedReplayEstimator(mu=1e-3, q=5, directions=dirs, seed=2).estimate(_oracle(), x, coords=coords)
    torch.testing.assert_close(r.grad, b.grad, rtol=1e-12, atol=1e-14)
    outside = torch.ones(37, dtype=torch.bool)
    outside[coords] = False
    assert bool((r.grad[outside] == 0).all()) and bool((r.grad[coords] != 0).all())


def _run(estimator, optimizer, steps=15):
    engine = AskTell(torch.linspace(-1, 2, 37, dtype=torch.float64), estimator=estimator, optimizer=optimizer,
                     maxiter=steps, evaluate_final=False)
    return engine.run(_oracle())


def test_seed_replay_sgd_through_the_engine_equals_batched_sgd():
    dirs = SeededDirections(block=16)
    ref = AskTell(torch.linspace(-1, 2, 37, dtype=torch.float64),
                  estimator=RandomEstimator(mu=1e-4, q=4, directions=dirs, seed=5), optimizer="sgd", lr=0.01,
                  maxiter=15, evaluate_final=False).run(_oracle())
    got = _run(SeedReplayEstimator(mu=1e-4, q=4, directions=dirs, seed=5), SeedReplaySGD(lr=0.01))
    assert got.nit == ref.nit == 15 and got.nfev == ref.nfev == 15 * 5
    assert abs(got.x - ref.x).max() < 1e-12
    assert [h["f0"] for h in got.history] == pytest.approx([h["f0"] for h in ref.history], rel=1e-12)
    assert got.history[-1]["f0"] < 0.5 * got.history[0]["f0"]


def test_ask_tell_by_hand_and_resume_mid_iteration():
    def make():
        return AskTell(torch.linspace(-1, 2, 37, dtype=torch.float64),
                       estimator=SeedReplayEstimator(mu=1e-4, q=3, antithetic=True, seed=9),
                       optimizer=SeedReplaySGD(lr=0.01), maxiter=6, evaluate_final=False)

    full = make()
    for _ in range(6):
        X = full.ask()
        full.tell([_quartic(p) for p in X])
    a = make()
    for _ in range(3):
        X = a.ask()
        a.tell([_quartic(p) for p in X])
    X = a.ask()
    state = a.state_dict()
    saved_x = state["boundary"]["rule"]["x"].clone()
    a.tell([_quartic(p) for p in X])  # the iterate moves: the saved state must not
    assert torch.equal(state["boundary"]["rule"]["x"], saved_x)
    b = AskTell.from_state_dict(state, estimator=SeedReplayEstimator(mu=1e-4, q=3, antithetic=True, seed=9),
                                optimizer=SeedReplaySGD(lr=0.01))
    assert torch.equal(b.ask(), X)
    while not b.done:
        b.tell([_quartic(p) for p in b.ask()])
    assert full.done and b.result().nit == full.result().nit == 6
    assert (b.result().x == full.result().x).all()


def test_trainer_with_seed_replay_equals_batched():
    torch.manual_seed(0)
    X, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))

    def fit(estimator, optimizer, lr):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=False)
        trainer = Trainer(model, loader, estimator=estimator, optimizer=optimizer, lr=lr, lr_schedule="constant",
                          epochs=2, progress=False, loss_fn=F.cross_entropy)
        trainer.fit()
        return trainer.flat_params().detach()

    dirs = SeededDirections(block=32)
    ref = fit(RandomEstimator(mu=1e-4, q=4, directions=dirs, seed=3), "sgd", 0.05)
    got = fit(SeedReplayEstimator(mu=1e-4, q=4, directions=dirs, seed=3), SeedReplaySGD(lr=0.05), 1e-3)
    assert abs(got - ref).max() < 1e-12
    torch.manual_seed(1)
    start = torch.nn.utils.parameters_to_vector(
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().parameters())
    assert abs(got - start).max() > 1e-4  # it trained


def test_replay_never_materializes_a_direction_matrix_in_the_plan():
    plan = SeedReplayEstimator(q=1000, seed=0).plan(torch.zeros(10_000))
    assert isinstance(plan, SeededPlan) and plan.directions is None and plan.seeds.shape == (1000,)


@pytest.mark.parametrize("bad, match", [
    ({"directions": "gaussian"}, "'gaussian'"),
    ({"directions": SeededDirections("rademacher").base}, "RademacherDirections"),
    ({"q": 0}, "got 0"),
    ({"q": 2**25}, "33554432"),
])
def test_bad_estimator_arguments(bad, match):
    with pytest.raises(ConfigError, match=match):
        SeedReplayEstimator(**bad)


@pytest.mark.parametrize("bad, match", [({"base": "sphere"}, "sphere"), ({"block": 0}, "got 0"),
                                        ({"block": 2**27}, "134217728"), ({"block": 2.0}, "2.0")])
def test_bad_seeded_directions(bad, match):
    with pytest.raises(ConfigError, match=match):
        SeededDirections(**bad)


def test_more_directions_than_the_budget_allows():
    with pytest.raises(ConfigError, match="budget=20 is below the cost of one iteration \\(51 queries"):
        AskTell(torch.zeros(37, dtype=torch.float64), estimator=SeedReplayEstimator(q=50), budget=20,
                optimizer=SeedReplaySGD(lr=0.1))


def test_bad_rule_arguments_and_unsupported_bounds():
    with pytest.raises(ConfigError, match="-1"):
        SeedReplaySGD(lr=-1)
    with pytest.raises(TypeError, match="'fast'"):
        SeedReplaySGD(lr_schedule="fast")
    engine = AskTell(torch.zeros(37, dtype=torch.float64), estimator=SeedReplayEstimator(q=2),
                     optimizer=SeedReplaySGD(), bounds=(-1, 1), maxiter=2)
    with pytest.raises(ConfigError, match="bounds"):
        engine.run(_oracle())


def test_step_underflow_is_refused_not_a_silent_zero():
    plan = SeedReplayEstimator(mu=1e-30, q=2).plan(torch.full((8,), 1e6, dtype=torch.float32))
    with pytest.raises(ConfigError, match="resolution"):
        plan.points()
