"""The ask/tell engine: the protocol, exact state round trips, budgets, bad input, and minimize as its driver."""

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import rosen

from zoblackbox import (
    AskTell,
    CheckpointError,
    ConfigError,
    CoordinateEstimator,
    FunctionOracle,
    OracleError,
    RandomEstimator,
    minimize,
)


def _quad(x):
    x = np.asarray(x, dtype=np.float64)
    return float(((x - np.arange(len(x))) ** 2 * (1 + np.arange(len(x)))).sum())


def _drive(solver, f=_quad):
    while not solver.done:
        X = solver.ask()
        solver.tell([f(x) for x in X])
    return solver.result()


CONFIGS = [
    {"estimator": CoordinateEstimator(mu=1e-6), "optimizer": "lbfgs", "budget": 300},
    {"estimator": CoordinateEstimator(), "optimizer": "adam", "lr": 0.1, "budget": 200},
    {"estimator": RandomEstimator(q=3, seed=7), "optimizer": "sgd", "lr": 0.01, "budget": 150},
    {"estimator": RandomEstimator(q=2, antithetic=True, seed=3), "optimizer": "adamw", "lr": 0.05, "maxiter": 20},
    {"estimator": CoordinateEstimator(mu=1e-6), "optimizer": torch.optim.LBFGS, "budget": 120},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c["optimizer"]).split(".")[-1].strip("'>"))
def test_ask_tell_loop_equals_minimize_bitwise(config):
    """Driving the engine by hand and minimize (its driver) take the same steps."""
    fresh = _fresh(config)
    res_loop = _drive(AskTell(np.zeros(5), **fresh()))
    res_min = minimize(_quad, np.zeros(5), **fresh())
    assert np.array_equal(res_loop.x, res_min.x) and res_loop.nfev == res_min.nfev and res_loop.nit == res_min.nit
    assert res_loop.fun == res_min.fun and res_loop.message == res_min.message
    if config.get("budget"):
        assert res_loop.nfev <= config["budget"]


def _fresh(config):
    """A factory of the config with a new estimator (estimators carry their random state)."""
    def make():
        c = dict(config)
        est = c["estimator"]
        if isinstance(est, RandomEstimator):
            c["estimator"] = RandomEstimator(q=est.q, antithetic=est.antithetic, mu=est.mu,
                                             seed=int(est.generator.initial_seed()))
        return c
    return make


def test_ask_returns_2d_numpy_for_numpy_and_torch_for_torch():
    s = AskTell(np.zeros(3), estimator=CoordinateEstimator(), maxiter=2)
    X = s.ask()
    assert isinstance(X, np.ndarray) and X.shape == (4, 3) and X.dtype == np.float64
    assert np.array_equal(s.ask(), X)  # asking again returns the same points
    t = AskTell(torch.zeros(3, dtype=torch.float32), estimator=CoordinateEstimator(), maxiter=2)
    T = t.ask()
    assert isinstance(T, torch.Tensor) and T.shape == (4, 3) and T.dtype == torch.float32


def test_tell_with_the_wrong_number_of_losses_changes_nothing():
    s = AskTell(np.zeros(3), estimator=CoordinateEstimator(), budget=50)
    X = s.ask()
    with pytest.raises(ConfigError, match=r"tell\(\) got 3 losses for the 4 points of the last ask"):
        s.tell([1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="tell\\(\\) takes 4 losses"):
        s.tell("1,2,3,4")
    assert s.nfev == 0 and np.array_equal(s.ask(), X)
    s.tell([_quad(x) for x in X])
    assert s.nfev == 4


def test_tell_after_done_is_refused_and_result_is_kept():
    s = AskTell(np.zeros(2), estimator=CoordinateEstimator(), maxiter=1)
    res = _drive(s)
    assert s.done and res.nit == 1 and "maxiter=1" in res.message
    with pytest.raises(ConfigError, match="tell\\(\\) after the run ended"):
        s.tell([1.0])
    with pytest.raises(ConfigError, match="the run is done"):
        s.ask()
    assert s.result().nfev == res.nfev


def test_non_finite_losses_follow_the_failure_policy():
    s = AskTell(np.zeros(2), estimator=CoordinateEstimator(), maxiter=3)
    X = s.ask()
    with pytest.raises(OracleError, match=r"loss #1 of 3 is nan"):
        s.tell([1.0, float("nan"), 2.0])
    assert s.nfev == 0 and np.array_equal(s.ask(), X)  # unchanged: the losses can be told again
    t = AskTell(np.zeros(2), estimator=CoordinateEstimator(), maxiter=3, on_failure="skip")
    with pytest.raises(ConfigError, match=r"tell\(\) before ask\(\)"):
        t.tell([1.0, 2.0, 3.0])  # losses of points the caller was never given
    t.ask()
    t.tell([1.0, float("nan"), 2.0])
    assert t.nit == 1 and t.nfev == 3 and t.n_failed == 1  # the NaN coordinate is left out, the step taken
    assert t.result().failures["failed_queries"] == 1
    with pytest.raises(ConfigError, match="retries need an oracle"):
        AskTell(np.zeros(2), on_failure="retry", maxiter=1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c["optimizer"]).split(".")[-1].strip("'>"))
def test_state_dict_round_trips_exactly_at_any_moment(config):
    """Stopped after any number of tells -- in the middle of a line search too -- saved with the
    safe checkpoint loader, and resumed, the run ends exactly where an uninterrupted one does."""
    fresh = _fresh(config)
    reference = _drive(AskTell(np.zeros(5), **fresh()))
    for cut in (0, 1, 2, 5, 9):
        s = AskTell(np.zeros(5), **fresh())
        for _ in range(cut):
            if s.done:
                break
            s.tell([_quad(x) for x in s.ask()])
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # no pickle of objects
        overrides = {"optimizer": config["optimizer"]} if not isinstance(config["optimizer"], str) else {}
        resumed = _drive(AskTell.from_state_dict(state, **overrides))
        assert np.array_equal(resumed.x, reference.x), cut
        assert (resumed.nfev, resumed.nit, resumed.fun) == (reference.nfev, reference.nit, reference.fun)


def test_a_state_from_another_problem_is_refused_and_nothing_changes():
    a = AskTell(np.zeros(4), estimator=CoordinateEstimator(), budget=100)
    a.tell([_quad(x) for x in a.ask()])
    state = a.state_dict()
    other_dim = AskTell(np.zeros(5), estimator=CoordinateEstimator(), budget=100)
    with pytest.raises(CheckpointError, match="its dimension is 4, this run's is 5"):
        other_dim.load_state_dict(state)
    other_est = AskTell(np.zeros(4), estimator=CoordinateEstimator(mu=1e-3), budget=100)
    before = other_est.ask()
    with pytest.raises(CheckpointError, match=r"its estimator is .CoordinateEstimator\(mu=0.005"):
        other_est.load_state_dict(state)
    assert np.array_equal(other_est.ask(), before) and other_est.nfev == 0
    tampered = dict(state, boundary=dict(state["boundary"], nfev=-1_000_000))
    with pytest.raises(CheckpointError, match="nfev is -1000000"):
        AskTell(np.zeros(4), estimator=CoordinateEstimator(), budget=100).load_state_dict(tampered)
    with pytest.raises(CheckpointError, match="not an AskTell state"):
        AskTell.from_state_dict({"format": "something"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(4, 80), kind=st.sampled_from(["cge", "central", "rge", "lbfgs", "anti"]),
       losses=st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(math.inf), st.just(math.nan)), min_size=1,
                       max_size=40), dim=st.integers(1, 4))
def test_no_sequence_of_asks_and_tells_exceeds_the_budget(budget, kind, losses, dim):
    est = {"cge": CoordinateEstimator(), "central": CoordinateEstimator(scheme="central"),
           "rge": RandomEstimator(q=2), "lbfgs": CoordinateEstimator(mu=1e-6),
           "anti": RandomEstimator(q=2, antithetic=True)}[kind]
    optimizer = "lbfgs" if kind == "lbfgs" else "sgd"
    try:
        s = AskTell(np.zeros(dim), estimator=est, optimizer=optimizer, budget=budget, on_failure="inf")
    except ConfigError:
        return  # a budget below one iteration is refused up front
    feed = iter(losses * 200)
    for _ in range(500):
        if s.done:
            break
        X = s.ask()
        s.tell([next(feed) for _ in range(len(X))])
        assert s.nfev <= budget
    assert s.done and s.result().nfev <= budget


# ------------------------------------------------------------------------------------------- minimize as a driver
def test_minimize_takes_a_plain_callable_like_scipy():
    res = minimize(rosen, np.zeros(10), budget=2000, estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs")
    assert res.nfev <= 2000 and res.fun < 1e-4
    vec = minimize(lambda X: rosen(X.T), np.zeros(10), vectorized=True, budget=2000,
                   estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs")
    assert np.array_equal(vec.x, res.x)  # the same run, one batch per ask
    torch_fn = minimize(lambda x: float((x ** 2).sum()), torch.ones(3, dtype=torch.float64), maxiter=5,
                        optimizer="adam")
    assert torch_fn.nit == 5
    auto = minimize(lambda x: float((x ** 2).sum()), torch.ones(3, dtype=torch.float64), maxiter=5)
    assert auto.nit <= 5 and auto.fun < 1e-12  # the default (L-BFGS on relative CGE) solves it within 5 iterations


def test_function_dtype_follows_x0():
    seen = []
    minimize(lambda x: seen.append(x.dtype) or float((x ** 2).sum()), np.ones(3), maxiter=1)
    assert seen and all(d == np.float64 for d in seen)
    seen.clear()
    minimize(lambda x: seen.append(x.dtype) or float((x ** 2).sum()), np.ones(3, dtype=np.float32), maxiter=1)
    assert all(d == np.float32 for d in seen)


def test_the_users_oracle_is_never_changed():
    budgets = []
    oracle = FunctionOracle(lambda x: budgets.append(oracle.budget) or float((x ** 2).sum()), 3, budget=10_000)
    res = minimize(oracle, np.ones(3), budget=50)
    assert set(budgets) == {10_000} and oracle.budget == 10_000
    assert oracle.nfev == res.nfev <= 50  # queries are still counted on it


def test_result_prints_in_a_few_lines():
    res = minimize(rosen, np.zeros(30), budget=3000)
    text = repr(res)
    assert len(text.splitlines()) <= 12 and "history: " in text and f"{len(res.history)} records" in text


def test_callback_contract_true_or_stopiteration_stops():
    seen = []

    def stop_at_3(r):
        seen.append(r.nit)
        if r.nit == 3:
            raise StopIteration

    res = minimize(rosen, np.zeros(3), maxiter=50, callback=stop_at_3)
    assert seen == [1, 2, 3] and res.nit == 3 and "callback" in res.message and res.success
    res = minimize(rosen, np.zeros(3), maxiter=50, optimizer="lbfgs", callback=lambda r: r.nit >= 2)
    assert res.nit == 2


def test_bounds_are_respected_by_iterates_and_forward_steps():
    seen = []

    def f(x):
        seen.append(np.array(x))
        return float(((x - 5.0) ** 2).sum())

    res = minimize(f, np.zeros(3), bounds=(-1.0, 1.0), optimizer="lbfgs", estimator=CoordinateEstimator(mu=1e-3),
                   budget=200)
    assert np.all(np.abs(np.stack(seen)) <= 1.0) and np.allclose(res.x, 1.0)
    with pytest.raises(ConfigError, match=r"lower\[0\]=2.0 exceeds upper\[0\]=1.0"):
        minimize(f, np.zeros(3), bounds=(2.0, 1.0), maxiter=1)
    with pytest.raises(ConfigError, match="outside the bounds at indices \\[0, 1, 2\\]"):
        minimize(f, np.zeros(3), bounds=(0.5, 1.0), maxiter=1)


def test_log_and_progress(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    res = minimize(rosen, np.zeros(4), maxiter=7, log=log, progress=True, optimizer="adam")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["nit"] for r in lines] == list(range(1, 8)) and lines[-1]["nfev"] == res.history[-1]["nfev"]
    assert "q_per_s" in capsys.readouterr().err
    # the default strategy also logs its probe and the first gradient (no iteration yet: nit stays 0)
    auto_log = tmp_path / "auto.jsonl"
    auto = minimize(rosen, np.zeros(4), maxiter=7, log=auto_log)
    nits = [json.loads(line)["nit"] for line in auto_log.read_text().splitlines()]
    assert nits == sorted(nits) and nits[-1] == auto.nit == 7 and nits[0] == 0


def test_checkpoint_resume_returns_a_finished_run_without_querying(tmp_path):
    calls = []
    res = minimize(lambda x: calls.append(1) or rosen(x), np.zeros(4), maxiter=5, checkpoint=tmp_path / "ck")
    n = len(calls)
    again = minimize(lambda x: calls.append(1) or rosen(x), np.zeros(4), maxiter=5, checkpoint=tmp_path / "ck")
    assert len(calls) == n and np.array_equal(again.x, res.x) and again.nfev == res.nfev
    with pytest.raises(CheckpointError, match="dimension is 4, this run's is 5"):
        minimize(rosen, np.zeros(5), maxiter=5, checkpoint=tmp_path / "ck")


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from zoblackbox import minimize, RandomEstimator

    def f(x):
        time.sleep(float(sys.argv[3]))
        return float(((x - 1.0) ** 2).sum() + 0.1 * np.sin(10 * x).sum())

    res = minimize(f, np.zeros(6), estimator=RandomEstimator(q=4, seed=5), lr=0.05, budget=int(sys.argv[2]),
                   checkpoint=sys.argv[1], checkpoint_every=2)
    np.save(sys.argv[1] + "-x.npy", res.x)
    print("DONE", res.nfev, flush=True)
""")


@pytest.mark.slow
def test_minimize_resumes_after_sigkill_bitwise(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    budget = 400
    ref = str(tmp_path / "ref")
    subprocess.run([sys.executable, str(script), ref, str(budget), "0"], check=True, env=env, capture_output=True)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, str(script), killed, str(budget), "0.004"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(os.path.join(killed, "latest.json")):
        time.sleep(0.05)
    time.sleep(0.3)  # a few more iterations, then a kill in the middle of one
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(killed + "-x.npy"), "the run finished before the kill; slow it down"
    out = subprocess.run([sys.executable, str(script), killed, str(budget), "0"], check=True, env=env,
                         capture_output=True, text=True)
    assert "DONE" in out.stdout
    assert np.array_equal(np.load(ref + "-x.npy"), np.load(killed + "-x.npy"))


def test_schedulers_see_through_the_engines_counting_view():
    """With a run budget the engine evaluates through a BudgetView; the vectorized and feature-reuse
    schedulers still take their model fast paths (and give the same run as the unbudgeted one)."""
    import torch.nn.functional as F
    from torch import nn

    from zoblackbox.engine import BudgetView
    from zoblackbox.schedule import FeatureReuseScheduler, VectorizedScheduler
    from zoblackbox.staged import is_plain_module_oracle, staging_of
    from zoblackbox.torch_module import ModuleOracle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    oracle = ModuleOracle(model, F.cross_entropy, batch=batch)
    view = BudgetView(oracle, 100)
    assert is_plain_module_oracle(view) and staging_of(view) is staging_of(oracle)
    x0 = oracle.get_params()
    for scheduler in (VectorizedScheduler(), FeatureReuseScheduler()):
        cost = CoordinateEstimator().num_queries(oracle.dim)
        budgeted = minimize(oracle, x0, estimator=CoordinateEstimator(), scheduler=scheduler, budget=3 * cost + 1,
                            lr=0.1)
        free = minimize(oracle, x0, estimator=CoordinateEstimator(), scheduler=scheduler, maxiter=3, lr=0.1)
        assert budgeted.nit == free.nit == 3
        assert np.allclose(budgeted.x, free.x, rtol=0, atol=1e-12)
    assert oracle.budget is None


def test_the_readme_examples_run():
    """The README's scipy-style and ask/tell examples run as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "rosen" in b]
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    assert namespace["res"].nfev <= 2_000 and namespace["solver"].done


@pytest.mark.slow
def test_cli_minimize_runs_an_external_program_and_resumes(tmp_path):
    """``zoblackbox minimize --program``: the JSON-lines test simulator, 2 workers, a checkpoint;
    running the same command again returns the finished result without new queries."""
    from pathlib import Path

    from zoblackbox.cli import main

    sim = Path(__file__).parent / "programs" / "quirky_sim.py"
    out = tmp_path / "result.json"
    args = ["minimize", "--program", f"{sys.executable} {sim}", "--dim", "3", "--x0", "1", "2", "3",
            "--budget", "200", "--estimator", "cge", "--mu", "1e-6", "--optimizer", "lbfgs", "--workers", "2",
            "--checkpoint", str(tmp_path / "ck"), "--json", str(out), "--no-progress"]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert first["fun"] < 1e-10 and first["nfev"] <= 200
    assert main(args) == 0
    assert json.loads(out.read_text()) == first
    assert main(["minimize", "--program", "", "--dim", "3", "--budget", "10"]) == 2
    assert main(["minimize", "--program", f"{sys.executable} {sim}", "--dim", "3", "--x0", "1", "2",
                 "--budget", "10"]) == 2


def test_a_state_that_does_not_replay_changes_nothing():
    a = AskTell(np.zeros(3), estimator=CoordinateEstimator(), budget=100)
    a.tell([_quad(x) for x in a.ask()])
    a.ask()
    state = a.state_dict()
    b = AskTell(np.zeros(3), estimator=CoordinateEstimator(), budget=100)
    b.tell([_quad(x) for x in b.ask()])
    before_x, before_ask = b.x, b.ask()
    tampered = dict(state, told=[torch.zeros(2)], told_nfev=[2])  # 2 losses for an ask of 4 points
    with pytest.raises(CheckpointError, match=r"told losses \(2\) do not match the replayed ask \(4 points\)"):
        b.load_state_dict(tampered)
    assert np.array_equal(b.x, before_x) and np.array_equal(b.ask(), before_ask) and b.nfev == 4
    with pytest.raises(CheckpointError, match="malformed"):
        b.load_state_dict(dict(state, told=["x"], told_nfev=[1]))


def test_a_fresh_run_never_overwrites_an_existing_log(tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text('{"nit": 1}\n')
    with pytest.raises(ConfigError, match="already holds another run's records"):
        minimize(rosen, np.zeros(3), maxiter=2, log=log)
    assert log.read_text() == '{"nit": 1}\n'


@pytest.mark.parametrize("field, value, words", [
    ("nit", 50, "nit=50 exceeds"), ("n_failed", 10, "n_failed=10 exceeds"), ("message", 5, "message is 5"),
    ("success", "no", "success is 'no'"), ("wall", math.nan, "wall is nan"), ("wall", -1.0, "wall is -1.0"),
    ("history", "[1]", "history is [1]"), ("history", "{", "history is not JSON"),
    ("has_coords", "yes", "has_coords is 'yes'"), ("coords", "x", "coords are 'x'"),
    ("freeze", torch.ones(3), "freeze mask"), ("estimator", None, "estimator is None"),
    ("phase", "done", "phase is 'done'"),
])
def test_every_boundary_field_is_checked_before_anything_changes(field, value, words):
    a = AskTell(np.zeros(3), estimator=CoordinateEstimator(), budget=100)
    a.tell([_quad(x) for x in a.ask()])
    state = a.state_dict()
    b = AskTell(np.zeros(3), estimator=CoordinateEstimator(), budget=100)
    before = b.ask()
    with pytest.raises(CheckpointError, match=re.escape(words)):
        b.load_state_dict(dict(state, boundary=dict(state["boundary"], **{field: value})))
    assert np.array_equal(b.ask(), before) and b.nfev == 0
    bad_x = dict(state["boundary"]["rule"], x=torch.full((3,), math.nan, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="not finite"):
        b.load_state_dict(dict(state, boundary=dict(state["boundary"], rule=bad_x)))
    with pytest.raises(CheckpointError, match="bounds"):
        b.load_state_dict(dict(state, bounds=[torch.ones(3), torch.zeros(3)]))


def test_lbfgs_first_step_with_a_gradient_whose_norm_underflows():
    """Regression (a hypothesis case): losses 0 and 2.2e-308 give a nonzero forward-difference
    gradient whose norm underflows to 0; the first step must not divide by it."""
    import math as _math

    from zoblackbox import minimize as _minimize

    values = iter([0.0, 2.2250738585072014e-308, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    res = _minimize(lambda x: next(values, 0.0), np.zeros(2), estimator=CoordinateEstimator(mu=1e-6),
                    optimizer="lbfgs", budget=4)
    assert res.nfev <= 4 and _math.isfinite(res.fun)
