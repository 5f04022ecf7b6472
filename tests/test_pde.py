"""The PhiFlow adapter: a real PhiFlow solver as a black box, the solver-in-the-loop oracle, the
scenarios' bad-input rules, and the ``zoblackbox pde`` command (small sizes; float64, 1 thread)."""

import json
import math
import sys

import pytest
import torch

pytest.importorskip("phi", reason="the pde extra (phiflow) is not installed")

from zoblackbox import BudgetExhaustedError, CoordinateEstimator, OracleError, RandomEstimator
from zoblackbox.adapters.burgers import Burgers1D, BurgersConfig, burgers_datasets
from zoblackbox.adapters.phiflow import (
    DEFAULT_MU,
    CorrectionCNN,
    PhiFlowStep,
    SimulationSet,
    SolverInTheLoopOracle,
    default_estimator,
    require_phiflow,
    rollout_mae,
    rollout_maes,
    semi_lagrangian_1d,
    solver_blackbox,
    train_hybrid_sol,
    train_non,
    train_zo_sol,
)
from zoblackbox.errors import ConfigError, MissingDependencyError
from zoblackbox.schedule import SerialScheduler

SMALL = BurgersConfig(warmup=5, steps=24)


@pytest.fixture(scope="module")
def burgers_data():
    """Two training and one test simulation of 24 steps, the real scenario's physics."""
    return burgers_datasets(SMALL, n_train=2, n_test=1, seed=0)


@pytest.fixture
def burgers(burgers_data):
    """A fresh jitted step per test with the module's data: the step keeps one trace per batch size, and
    one step shared by the whole module would pass phiml's 'traced 10 times' warning threshold."""
    train, test = burgers_data
    return PhiFlowStep(SMALL.solver()), train, test


def _net(seed=0, activation="relu"):
    torch.manual_seed(seed)
    return CorrectionCNN(2, 1, hidden=(4, 4), kernel_size=5, activation=activation)


def _grid(values, length=32.0):
    from phi import math as pm
    from phi.flow import Box, CenteredGrid
    from phi.math import batch, extrapolation, spatial

    return CenteredGrid(pm.wrap(values, batch("b"), spatial("x")), extrapolation.PERIODIC, bounds=Box(x=length))


# --------------------------------------------------------------------------- dependency
def test_missing_phiflow_names_the_pde_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "phi", None)  # import phi -> ImportError
    with pytest.raises(MissingDependencyError, match=r"zoblackbox\[pde\]"):
        require_phiflow()


# --------------------------------------------------------------------------- the 1-D advection workaround
def test_phiflow_torch_1d_semi_lagrangian_is_still_broken():
    """Why the workaround exists: PhiFlow's own 1-D semi-Lagrangian step fails on torch."""
    from phi import math as pm
    from phi.flow import advect
    from phi.math import channel

    u = _grid(torch.randn(2, 32, dtype=torch.float64))
    velocity = u.with_values(pm.expand(u.values, channel(vector="x")))
    try:
        advect.semi_lagrangian(u, velocity, 0.1)
    except RuntimeError as exc:
        assert "grid_sample" in str(exc) or "dimensions" in str(exc)
    else:
        pytest.skip("this PhiFlow advects 1-D grids on torch; semi_lagrangian_1d is no longer needed")


def test_semi_lagrangian_1d_matches_phiflow_on_numpy():
    from phi import math as pm
    from phi.flow import advect
    from phi.math import backend, channel

    g = torch.Generator().manual_seed(0)
    values = 4 * torch.randn(3, 32, generator=g, dtype=torch.float64)
    for dt in (0.1, 0.7, 3.0):  # displacements below one cell and across several cells
        with backend.NUMPY, pm.precision(64):
            u = _grid(values.numpy())
            velocity = u.with_values(pm.expand(u.values, channel(vector="x")))
            expected = advect.semi_lagrangian(u, velocity, dt).values.numpy("b,x")
        with pm.precision(64):
            got = semi_lagrangian_1d(_grid(values), _grid(values), dt).values.native("b,x")  # torch backend
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, torch.as_tensor(expected), rtol=0, atol=1e-12)


def test_semi_lagrangian_1d_is_differentiable_on_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, generator=g, dtype=torch.float64, requires_grad=True)

    def f(v):
        from phi import math as pm

        with pm.precision(64):
            return semi_lagrangian_1d(_grid(v), _grid(v), 0.3).values.native("b,x")

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_semi_lagrangian_1d_keeps_a_diverged_row_in_its_row():
    values = torch.randn(3, 32, dtype=torch.float64)
    values[1, 5] = math.nan
    values[2, 7] = math.inf
    out = semi_lagrangian_1d(_grid(values), _grid(values), 0.1).values.native("b,x")
    assert torch.isfinite(out[0]).all()
    assert not torch.isfinite(out[1]).all() and not torch.isfinite(out[2]).all()
    clean = semi_lagrangian_1d(_grid(values[:1]), _grid(values[:1]), 0.1).values.native("b,x")
    assert torch.equal(out[:1], clean)


# --------------------------------------------------------------------------- solver and bad inputs
def test_explicit_diffusion_past_its_limit_is_refused():
    with pytest.raises(ConfigError, match=r"nu\*dt/dx\^2 = 0.8 .* > 0.5.*substeps >= 2"):
        Burgers1D(n=128, nu=0.5, dt=0.1, diffusion="explicit")
    ok = Burgers1D(n=128, nu=0.5, dt=0.1, diffusion="explicit", substeps=2)
    assert ok.diffusion_number == pytest.approx(0.4)


def test_diffusion_schemes_agree(burgers):
    """Fourier (default), implicit CG and explicit diffusion step the same state alike."""
    _, train, _ = burgers
    s, a = train.states[:, 3], train.aux[:, 3]
    outs = {d: PhiFlowStep(Burgers1D(diffusion=d), jit=False)(s, a) for d in ("fourier", "implicit", "explicit")}
    assert (outs["fourier"] - outs["implicit"]).abs().max() < 1e-3
    assert (outs["fourier"] - outs["explicit"]).abs().max() < 1e-3


def test_unstable_cfl_and_mismatched_resolutions_are_refused(burgers):
    with pytest.raises(ConfigError, match="CFL"):
        burgers_datasets(BurgersConfig(warmup=0, steps=2, init_amplitude=30.0), n_train=1, n_test=1)
    with pytest.raises(ConfigError, match="mismatched resolutions"):
        BurgersConfig(n_ref=100, n_src=32)
    step, train, _ = burgers
    fine = PhiFlowStep(SMALL.solver("reference"))
    with pytest.raises(ConfigError, match=r"mismatched resolutions.*\(1, 32\).*\(1, 128\)"):
        SolverInTheLoopOracle(fine, _net(), train)
    with pytest.raises(ConfigError, match=r"state must have shape \(B, 1, 32\)"):
        step(torch.zeros(2, 1, 16, dtype=torch.float64), torch.zeros(2, 1, 16, dtype=torch.float64))
    with pytest.raises(ConfigError, match="unroll must be an int >= 1 and <= the data's 24 steps"):
        SolverInTheLoopOracle(step, _net(), train, unroll=25)
    with pytest.raises(ConfigError, match="network maps 3 -> 1"):
        SolverInTheLoopOracle(step, CorrectionCNN(3, 1), train)


# --------------------------------------------------------------------------- batching
@pytest.mark.parametrize("rank, padding", [(1, "circular"), (2, "replicate"), (2, "zeros")])
def test_batched_network_equals_the_module(rank, padding):
    torch.manual_seed(0)
    net = CorrectionCNN(3, 2, hidden=(4,), spatial_rank=rank, padding_mode=padding).double()
    P = net.get_params()[None] + 0.1 * torch.randn(5, net.layout.dim, dtype=torch.float64)
    x = torch.randn(5, 3, 3, *((12,) if rank == 1 else (7, 9)), dtype=torch.float64)
    out = net.batched(P, x)
    for k in range(5):
        net.set_params(P[k])
        torch.testing.assert_close(out[k], net(x[k]), rtol=0, atol=1e-13)


def test_losses_do_not_depend_on_how_queries_are_batched(burgers):
    step, train, _ = burgers
    net = _net()
    oracle = SolverInTheLoopOracle(step, net, train, unroll=4, batch_size=3, seed=0)
    x = oracle.get_params()
    X = x + 1e-2 * torch.randn(7, x.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    together = oracle.evaluate(X)
    one_by_one = torch.cat([oracle.evaluate(X[i:i + 1]) for i in range(7)])
    chunked = torch.cat([oracle.evaluate(X[:2]), oracle.evaluate(X[2:])])
    torch.testing.assert_close(one_by_one, together, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked, together, rtol=1e-12, atol=0)
    assert oracle.nfev == 21
    # a whole CGE estimate: one batched solver call per unrolled step vs the serial reference
    coords = torch.arange(0, x.numel(), 7)
    calls = step.calls
    batched = default_estimator().estimate(oracle, x, coords=coords)
    assert step.calls - calls == 4
    serial = default_estimator().estimate(oracle, x, coords=coords, scheduler=SerialScheduler())
    torch.testing.assert_close(batched.grad, serial.grad, rtol=1e-8, atol=1e-12)


def test_jit_and_plain_solver_agree_with_gradients(burgers):
    _, train, _ = burgers
    s = train.states[:, 2].clone().requires_grad_(True)
    a = train.aux[:, 2]
    grads = []
    for jit in (True, False):
        out = PhiFlowStep(SMALL.solver(), jit=jit)(s, a, autodiff=True)
        (g,) = torch.autograd.grad(out.pow(2).sum(), s)
        grads.append((out.detach(), g))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-13)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- finite-difference step
def test_forward_cge_is_biased_at_mu_1e_3_and_1e_4_and_the_default_is_not(burgers):
    """The adapter's documented default (forward, mu=1e-6, float64). At a NON-trained point the
    loss is ~3e-5 and its gradient tiny next to its curvature: forward differences at mu=1e-3 and
    1e-4 point away from the autograd gradient; mu=1e-6 and central differences match it."""
    step, train, _ = burgers
    net = _net()
    non = train_non(step, net, train, steps=150, batch_size=16, lr=3e-3, seed=0)
    oracle = SolverInTheLoopOracle(step, net, train, unroll=8, batch_size=2, seed=0)
    x = non.params
    X = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(oracle.losses(X[None], autodiff=True)[0], X)

    def compare(est):
        g = est.estimate(oracle, x).grad
        return float((g - exact).norm() / exact.norm()), float(g @ exact / (g.norm() * exact.norm()))

    assert default_estimator().mu == DEFAULT_MU == 1e-6 and default_estimator().scheme == "forward"
    for mu in (1e-3, 1e-4):
        rel, cos = compare(CoordinateEstimator(mu=mu))
        assert rel > 1 and cos < 0, (mu, rel, cos)
    rel, cos = compare(default_estimator())
    assert rel < 0.05 and cos > 0.999, (rel, cos)
    for mu in (1e-3, 1e-4):
        rel, cos = compare(CoordinateEstimator(mu=mu, scheme="central"))
        assert rel < 0.01, (mu, rel)


# --------------------------------------------------------------------------- failures and training
def test_a_diverging_rollout_is_handled_by_the_failure_policy(burgers):
    step, train, _ = burgers
    net = _net()
    x = net.get_params().double()
    blowup = x.clone()
    blowup[net.layout.slice("layers.2.bias")] = 1e300  # the correction overflows to inf at once
    X = torch.stack([x, blowup, x])
    oracle = SolverInTheLoopOracle(step, net, train, unroll=3, batch_size=2)  # default on_failure="inf"
    losses = oracle.evaluate(X)
    assert math.isfinite(losses[0]) and losses[1] == math.inf and losses[0] == losses[2]
    report = oracle.failure_report()
    assert report["failed_queries"] == 1 and report["by_kind"] == {"nonfinite": 1}
    strict = SolverInTheLoopOracle(step, net, train, unroll=3, batch_size=2, on_failure="raise")
    with pytest.raises(OracleError, match="query #1 returned the non-finite loss"):
        strict.evaluate(X)


def test_zo_sol_counts_queries_and_solver_calls_and_respects_budgets(burgers):
    step, train, test = burgers
    net = _net()
    d = net.layout.dim
    oracle = SolverInTheLoopOracle(step, net, train, unroll=4, batch_size=1, seed=0)
    calls = step.calls
    res = train_zo_sol(oracle, steps=3, lr=1e-3)
    assert res.steps == 3 and res.queries == 3 * (d + 1) == oracle.nfev
    assert res.solver_calls == step.calls - calls == 3 * 4  # d + 1 queries share each solver call
    assert res.solver_rows == 3 * 4 * (d + 1)
    rge = train_zo_sol(oracle, estimator=RandomEstimator(mu=1e-6, q=10), steps=100, budget=40, lr=1e-3)
    assert rge.steps == 3 and rge.queries == 33
    with pytest.raises(ConfigError, match="budget must be an int >= one step's"):
        train_zo_sol(oracle, steps=1, budget=5)
    mae, curve = rollout_mae(step, net, res.params, test)
    assert curve.shape == (24,) and math.isfinite(mae)


def test_hybrid_sol_gradient_matches_autograd_through_phiflow_without_using_it(burgers, monkeypatch):
    """HYBRID-SOL: backprop through the network, the solver step a BlackBox (forward CGE over the
    32-cell state, mu = 1e-6, float64). Its gradient equals FO-SOL's autograd gradient through
    PhiFlow to 1e-5 relative, and the solver is never asked for autodiff."""
    step, train, _ = burgers
    net = _net()
    oracle = SolverInTheLoopOracle(step, net, train, unroll=4, batch_size=2, seed=0)
    p = net.get_params().to(torch.float64).requires_grad_(True)
    (g_fo,) = torch.autograd.grad(oracle.losses(p[None], autodiff=True)[0], p)
    box = solver_blackbox(step, default_estimator())
    assert (box.n, box.m, box.context) == (32, 32, 32)
    modes = []
    original = PhiFlowStep.__call__

    def spy(self, state, aux=None, *, autodiff=False):
        modes.append((autodiff, torch.is_grad_enabled()))
        return original(self, state, aux, autodiff=autodiff)

    monkeypatch.setattr(PhiFlowStep, "__call__", spy)
    rows0 = step.rows

    def through_box(s, aux):
        return box(s.reshape(s.shape[0], -1), aux.reshape(aux.shape[0], -1)).reshape(s.shape)

    (g_h,) = torch.autograd.grad(oracle.losses(p[None], step_fn=through_box)[0], p)
    assert float((g_h - g_fo).norm() / g_fo.norm()) < 1e-5
    # the first unrolled step starts from data (no gradient: 2 rows); the other 3 need the Jacobian: 2 (32 + 1) rows
    assert box.oracle.nfev == step.rows - rows0 == 2 + 3 * 2 * 33
    assert modes and not any(autodiff for autodiff, _ in modes)
    monkeypatch.setattr(PhiFlowStep, "__call__", original)
    res = train_hybrid_sol(oracle, steps=3, lr=1e-3)
    assert res.steps == 3 and res.queries == res.solver_rows == 3 * (2 + 3 * 2 * 33) and res.solver_calls == 12
    assert not torch.equal(res.params, net.get_params().to(torch.float64))
    with pytest.raises(BudgetExhaustedError, match="nothing was queried"):
        train_hybrid_sol(oracle, steps=3, lr=1e-3, budget=100)


def test_simulation_set_checks_shapes():
    with pytest.raises(ConfigError, match="aux must have shape"):
        SimulationSet(torch.zeros(2, 5, 1, 8), torch.zeros(2, 5, 1, 8))


def test_simulation_set_split_keeps_every_simulation_once():
    states, aux = torch.randn(5, 4, 1, 8), torch.randn(5, 3, 1, 8)
    first, rest = SimulationSet(states, aux, {"split": "train"}).split(3)
    assert torch.equal(torch.cat([first.states, rest.states]), states)
    assert torch.equal(torch.cat([first.aux, rest.aux]), aux)
    assert (first.n_sims, rest.n_sims) == (3, 2) and first.info["split"] == "train" and rest.info["part"] == "rest"
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ConfigError, match=f"n_first must be an int in \\[1, 4\\].*got {bad!r}"):
            SimulationSet(states, aux).split(bad)


def test_one_rollout_of_several_sets_equals_separate_rollouts(burgers):
    step, train, test = burgers
    net = _net()
    params = net.get_params().to(torch.float64)
    joint = rollout_maes(step, net, params, [test, train])
    for (mae, curve), data in zip(joint, (test, train)):
        alone, alone_curve = rollout_mae(step, net, params, data)
        assert mae == pytest.approx(alone, rel=1e-12)
        torch.testing.assert_close(curve, alone_curve, rtol=1e-12, atol=0)
    short = SimulationSet(test.states[:, :5], test.aux[:, :4])
    with pytest.raises(ConfigError, match=r"equally many steps to share a rollout, got \[4, 24\]"):
        rollout_maes(step, net, params, [test, short])
    with pytest.raises(ConfigError, match="at least one"):
        rollout_maes(step, net, params, [])


def test_validation_sims_are_held_out_of_every_method(burgers, monkeypatch):
    """With ``validation_sims`` the methods fit only the first training simulations (NON's pairs, the
    SOL oracle's minibatches) and every result carries the validation MAE of the held-back ones."""
    from dataclasses import replace

    from zoblackbox.adapters import phiflow
    from zoblackbox.cli_pde import Problem, run_methods
    from zoblackbox.recipes import Recipe

    step, _, test = burgers
    train, _ = burgers_datasets(SMALL, n_train=3, n_test=1, seed=0)
    problem = Problem("burgers1d", step, train, test, {})
    seen = []
    original_non, original_oracle = phiflow.train_non, phiflow.SolverInTheLoopOracle

    def spy_non(step_, net, data, **kw):
        seen.append(("non", data.n_sims))
        return original_non(step_, net, data, **kw)

    def spy_oracle(step_, net, data, **kw):
        seen.append(("sol", data.n_sims))
        return original_oracle(step_, net, data, **kw)

    monkeypatch.setattr(phiflow, "train_non", spy_non)
    monkeypatch.setattr(phiflow, "SolverInTheLoopOracle", spy_oracle)
    recipe = Recipe(hidden=(2,), non_steps=5, sol_steps=2, unroll=3, batch_size=1, validation_sims=1)
    out = run_methods(problem, ["src", "non", "fo-sol"], recipe, seed=0, log=lambda *_: None)
    assert seen == [("non", 2), ("sol", 2)]
    held = train.split(2)[1]
    assert out["src"]["val_mae"] == pytest.approx(rollout_mae(step, None, None, held)[0])
    assert out["src"]["val_mae"] != pytest.approx(out["src"]["mae"])
    assert all(math.isfinite(row["val_mae"]) for row in out.values())
    plain = run_methods(problem, ["src"], replace(recipe, validation_sims=0), seed=0, log=lambda *_: None)
    assert plain["src"]["val_mae"] is None
    with pytest.raises(ConfigError, match="validation_sims must be an int in \\[0, 2\\].*got 3"):
        run_methods(problem, ["src"], replace(recipe, validation_sims=3), seed=0)


# --------------------------------------------------------------------------- scenario 2
def test_wake_flow_runs_end_to_end():
    from zoblackbox.adapters.wake import WakeConfig, downsample_staggered, wake_datasets

    config = WakeConfig(warmup=1, steps=3)
    train, test = wake_datasets(config, n_train=1, n_test=1, seed=0)
    assert train.states.shape == (1, 4, 2, 65, 33) and train.aux.shape == (1, 3, 2, 65, 33)
    assert torch.isfinite(train.states).all() and float(train.states[:, :, 0].mean()) > 0.5  # the inflow
    step = PhiFlowStep(config.solver("source"))
    torch.manual_seed(0)
    net = CorrectionCNN(4, 2, hidden=(2,), kernel_size=3, spatial_rank=2, padding_mode="replicate")
    oracle = SolverInTheLoopOracle(step, net, train, unroll=2, batch_size=1)
    x = oracle.get_params()
    X = torch.stack([x, x + 1e-3])
    together = oracle.evaluate(X)
    alone = oracle.evaluate(X[1:])
    assert torch.isfinite(together).all()
    torch.testing.assert_close(alone, together[1:], rtol=1e-5, atol=0)  # CG tolerance, not bitwise
    est = CoordinateEstimator(mu=1e-3, scheme="central").estimate(oracle, x, coords=[0, 5, 60])
    assert est.nfev == 6 and torch.isfinite(est.grad).all()
    src_mae, _ = rollout_mae(step, None, None, test)
    assert 0 < src_mae < 1
    with pytest.raises(ConfigError, match="mismatched resolutions"):
        downsample_staggered(torch.zeros(2, 9, 6), 2)


def test_wake_flow_evolves_and_the_inflow_sets_only_the_inflow_faces():
    """Regression: an infinite inflow box made PhiFlow mark every face as inflow, so each step reset
    the velocity to the uniform inflow and the 'wake' was a static potential flow (every recorded
    frame equal, the step independent of its input)."""
    from zoblackbox.adapters.wake import WakeConfig, wake_datasets

    config = WakeConfig(x=16, y=8, cylinder=(4.0, 4.0, 1.0), warmup=2, steps=4)
    solver = config.solver("source")
    mask = torch.as_tensor(solver.inflow_mask().staggered_tensor().numpy("vector,x,y"))  # (2, 17, 9)
    assert mask[0, 0, :8].eq(1).all() and mask[0, 1:].eq(0).all()  # x faces: the left boundary only
    assert mask[1, 1:].eq(0).all()  # y faces: none past the first column of cells
    train, _ = wake_datasets(config, n_train=1, n_test=1, seed=0)
    frames = train.states[0]
    assert all(float((frames[t + 1] - frames[t]).abs().max()) > 1e-3 for t in range(4))
    step = PhiFlowStep(solver)
    u, aux = train.states[:, 1], train.aux[:, 0]
    assert float((step(u, aux) - step(0.5 * u, aux)).abs().max()) > 1e-2


# --------------------------------------------------------------------------- command line
def test_pde_command_writes_results(tmp_path, capsys):
    from zoblackbox.cli import main

    path = tmp_path / "pde.json"
    rc = main(["pde", "--scenario", "burgers1d", "--method", "src", "non", "zo-sol", "rge-sol", "--n-train", "2",
               "--n-test", "1", "--sim-steps", "12", "--warmup", "2", "--non-steps", "20", "--sol-steps", "2",
               "--unroll", "3", "--q", "8", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert set(data["mae"]) == {"src", "non", "zo-sol", "rge-sol"}
    assert all(math.isfinite(v) for v in data["mae"].values())
    d = data["methods"]["zo-sol"]["params"]
    assert data["queries"]["zo-sol"] == 2 * (d + 1)
    assert data["queries"]["rge-sol"] <= data["queries"]["zo-sol"]
    assert data["methods"]["zo-sol"]["solver_calls"] == 2 * 3
    assert "test MAE" in capsys.readouterr().out
    assert all(r["val_mae"] is None for r in data["methods"].values())  # --n-train: no validation set by default
    rc = main(["pde", "--method", "src", "--n-train", "3", "--n-test", "1", "--sim-steps", "6", "--warmup", "0",
               "--unroll", "3", "--validation-sims", "1", "--json", str(path)])
    assert rc == 0 and "fit 2 of the training simulations; the last 1 are validation" in capsys.readouterr().out
    assert math.isfinite(json.loads(path.read_text())["methods"]["src"]["val_mae"])
    rc = main(["pde", "--method", "src", "--n-train", "2", "--n-test", "1", "--sim-steps", "6",
               "--unroll", "3", "--validation-sims", "2"])
    assert rc == 2 and "validation_sims must be an int in [0, 1]" in capsys.readouterr().err


def test_pde_command_rejects_bad_values(capsys):
    from zoblackbox.cli import main

    with pytest.raises(SystemExit) as info:
        main(["pde", "--unroll", "0"])
    assert info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pde", "--mu", "-1e-4"])
    with pytest.raises(SystemExit):
        main(["pde", "--scenario", "navier"])
    rc = main(["pde", "--n-train", "1", "--n-test", "1", "--sim-steps", "4", "--warmup", "0", "--unroll", "9",
               "--method", "src"])
    assert rc == 2 and "--unroll 9 exceeds the 4 recorded steps" in capsys.readouterr().err


def test_zo_sol_is_a_driver_of_the_engine_and_leaves_the_oracles_budget_alone(burgers, monkeypatch):
    """train_zo_sol runs AskTell: one engine iteration per step, the run's budget is the engine's
    (exact, no query kept for a final evaluation) and the user's oracle keeps its own budget."""
    from zoblackbox import AskTell

    step, train, _ = burgers
    oracle = SolverInTheLoopOracle(step, _net(), train, unroll=3, batch_size=1, seed=0, budget=10_000)
    calls = []
    original = AskTell.step

    def counting_step(self, oracle_, scheduler=None):
        calls.append(oracle_.nfev)
        return original(self, oracle_, scheduler)

    monkeypatch.setattr(AskTell, "step", counting_step)
    before = oracle.nfev
    for budget, steps in ((40, 3), (33, 3), (32, 2), (11, 1)):  # q=10: 11 queries a step
        start = oracle.nfev
        res = train_zo_sol(oracle, estimator=RandomEstimator(mu=1e-6, q=10, seed=0), steps=100, budget=budget,
                           lr=1e-3, log_every=1)
        assert res.steps == steps and res.queries == oracle.nfev - start == 11 * steps <= budget
        assert [h["queries"] for h in res.history] == [11 * (i + 1) for i in range(steps)]
        assert oracle.budget == 10_000
    assert len(calls) == 3 + 3 + 2 + 1 and oracle.nfev - before == 11 * 9
    # steps, not the budget, end the run: no engine step past them, and the callback sees every step
    seen = []
    res = train_zo_sol(oracle, estimator=RandomEstimator(mu=1e-6, q=4, seed=0), steps=4, lr=1e-3,
                       callback=lambda it, p: seen.append((it, p.clone())))
    assert res.steps == 4 and len(calls) == 9 + 4 and [it for it, _ in seen] == [0, 1, 2, 3]
    assert torch.equal(seen[-1][1], res.params) and res.params.dtype == torch.float64
    assert oracle.budget == 10_000
