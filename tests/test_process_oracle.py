"""The external-program oracle: protocol, timeouts, crashes, validation, pools; a real subprocess."""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from zoblackbox import ConfigError, CoordinateEstimator, FunctionOracle, OracleError, minimize
from zoblackbox.adapters.process import ProcessOracle, ProgramCrashError, ProtocolError
from zoblackbox.plan import QueryPlan
from zoblackbox.schedule import ProcessPoolScheduler

ROOT = Path(__file__).resolve().parents[1]
QUIRKY = [sys.executable, str(Path(__file__).parent / "programs" / "quirky_sim.py")]
ODE = ROOT / "docs" / "examples" / "ode_sim.py"


def load_ode():
    spec = importlib.util.spec_from_file_location("ode_sim", ODE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_answers_match_the_python_function_and_the_program_starts_once():
    ode = load_ode()
    rng = np.random.default_rng(0)
    X = torch.tensor(np.array(ode.X_TRUE) + 0.1 * rng.standard_normal((6, 4)))
    with ProcessOracle([sys.executable, str(ODE)], dim=4, dtype=torch.float64) as oracle:
        got = oracle.evaluate(X)
        assert oracle.starts == 1 and oracle.nfev == 6
        assert oracle(X[0]) == got[0].item()
    expected = torch.tensor([ode.loss(x.numpy()) for x in X], dtype=torch.float64)
    assert torch.equal(got, expected)  # JSON floats round-trip exactly
    assert not oracle.running


def test_fitting_the_ode_example_through_the_program_equals_the_function():
    ode = load_ode()
    kwargs = {"estimator": CoordinateEstimator(mu=1e-4, scheme="central"), "optimizer": "adam", "lr": 0.05,
              "budget": 400}
    a = minimize(FunctionOracle(ode.loss, 4, numpy=True, dtype=torch.float64), ode.X0, **kwargs)
    with ProcessOracle([sys.executable, str(ODE)], dim=4, dtype=torch.float64) as oracle:
        b = minimize(oracle, ode.X0, **kwargs)
    assert np.array_equal(a.x, b.x) and a.fun == b.fun and b.nfev == 400 - (400 - 1) % 8 and b.fun < 0.05 * ode.loss(ode.X0)


def test_a_hung_query_times_out_and_the_program_is_restarted():
    with ProcessOracle(QUIRKY, dim=2, timeout=0.5, startup_timeout=5, on_failure="inf") as oracle:
        assert oracle([1.0, 2.0]) == 5.0
        values = oracle.evaluate(torch.tensor([[100.0, 0.0], [3.0, 0.0]]))
        assert values[0].item() == math.inf and values[1].item() == 9.0
        assert oracle.starts == 2 and oracle.restarts == 1
        (failure,) = oracle.failures
        assert failure.kind == "timeout" and "within 5.5 s" not in failure.message and "0.5 s" in failure.message


def test_a_crash_is_reported_with_stderr_and_the_next_query_restarts():
    with ProcessOracle(QUIRKY, dim=2) as oracle:
        with pytest.raises(OracleError, match="(?s)quirky_sim.py' exited while answering query id 0.*crashing on purpose") as err:
            oracle([101.0, 0.0])
        assert isinstance(err.value.__cause__, ProgramCrashError)
        assert oracle([2.0, 0.0]) == 4.0 and oracle.starts == 2
    with ProcessOracle(QUIRKY, dim=2, on_failure="retry") as oracle:  # retries land on a fresh program
        out = oracle.evaluate(torch.tensor([[101.0, 0.0], [1.0, 1.0]]))
        assert math.isnan(out[0].item()) and out[1].item() == 2.0  # the crashing query is skipped after retries
        assert oracle.failure_report() == {"failed_queries": 1, "resolved_by_retry": 0, "by_kind": {"exception": 1}}
        # 4 attempts at the crashing query (each a counted query), each killing its program: the first
        # retry reuses the program started for [1, 1], the two others start their own
        assert oracle.nfev == 2 + 3 and oracle.starts == 4


@pytest.mark.parametrize(("trigger", "message"), [
    (102, "'this is not json'.*not a JSON line"),
    (103, "wrong id 7"),
    (104, "'loss' must be a number, got 'abc'"),
])
def test_malformed_answers_are_refused_with_the_offending_line(trigger, message):
    with ProcessOracle(QUIRKY, dim=2) as oracle:
        with pytest.raises(OracleError, match=message) as err:
            oracle([float(trigger), 0.0])
        assert isinstance(err.value.__cause__, ProtocolError)
        assert oracle([1.0, 0.0]) == 1.0 and oracle.starts == 2  # restarted: the stream is not trusted


def test_reported_errors_and_nan_go_to_the_failure_policy():
    with ProcessOracle(QUIRKY, dim=2, on_failure="inf") as oracle:
        out = oracle.evaluate(torch.tensor([[105.0, 0.0], [106.0, 0.0], [0.0, 2.0]]))
        assert out.tolist() == [math.inf, math.inf, 4.0]
        kinds = sorted(f.kind for f in oracle.failures)
        assert kinds == ["exception", "nonfinite"] and oracle.starts == 1
        assert "solver diverged" in next(f.message for f in oracle.failures if f.kind == "exception")


def test_no_shell_and_bad_arguments_are_refused():
    for bad in ("python sim.py", b"python", [], None, ["python", 3]):
        with pytest.raises(ConfigError, match="command") as err:
            ProcessOracle(bad, dim=2)
        assert repr(bad) in str(err.value)
    for key, value in (("timeout", 0), ("timeout", -1.0), ("timeout", math.nan), ("startup_timeout", None)):
        with pytest.raises(ConfigError, match=f"{key} must be a positive number of seconds, got {value!r}"):
            ProcessOracle(QUIRKY, dim=2, **{key: value})
    with pytest.raises(ConfigError, match="'/no/such/dir' is not a directory"):
        ProcessOracle(QUIRKY, dim=2, cwd="/no/such/dir")
    # a shell metacharacter in an argument is passed verbatim, never interpreted
    script = ("import sys, json; [print(json.dumps({'id': json.loads(l)['id'], 'loss': len(sys.argv)}), flush=True) "
              "for l in sys.stdin]")
    with ProcessOracle([sys.executable, "-c", script, "; rm -rf /tmp/x &&"], dim=1) as oracle:
        assert oracle([0.0]) == 2.0
    with pytest.raises(ConfigError, match="'/no/such/program' .* does not exist"):  # refused before any query
        ProcessOracle(["/no/such/program"], dim=1)


def _run_on(scheduler):
    X = torch.arange(24, dtype=torch.float64).reshape(12, 2) / 10
    oracle = ProcessOracle(QUIRKY, dim=2, dtype=torch.float64, on_failure="inf")
    est = CoordinateEstimator(mu=1e-3).estimate(oracle, X[3], scheduler=scheduler)
    values = scheduler.run(oracle, QueryPlan(base=X[0], include_base=True, directions=X[1:] - X[0]))
    assert torch.allclose(values, (X ** 2).sum(1), atol=1e-12)
    assert torch.allclose(est.grad, 2 * X[3], atol=1e-2) and oracle.nfev == 3 + 12
    # a crash in a worker's program is a counted, reported failure; the other queries are unaffected
    base = torch.tensor([0.0, 0.5], dtype=torch.float64)
    hit = scheduler.run(oracle, QueryPlan(base=base, include_base=True, directions=torch.tensor([[101.0, -0.5]])))
    assert hit.tolist() == [0.25, math.inf]
    assert oracle.failure_report()["by_kind"] == {"exception": 1}
    assert oracle.starts == 0  # the programs ran in the workers, not here
    json.dumps(oracle.failure_report())


def test_works_in_the_process_pool_with_one_program_per_worker():
    with ProcessPoolScheduler(n_workers=2) as pool:
        _run_on(pool)


def test_works_on_a_dask_cluster():
    dask_mod = pytest.importorskip("zoblackbox.schedule.dask_cluster")
    with dask_mod.DaskScheduler(n_workers=2) as scheduler:
        _run_on(scheduler)


def test_vectorized_example_simulator_one_call_per_batch_and_fitted():
    """docs/examples/fit_spring.py: the batched spring simulator answers a whole plan in one call
    (rows identical to one-at-a-time calls) and L-BFGS recovers its parameters."""
    spec = importlib.util.spec_from_file_location("fit_spring", ROOT / "docs" / "examples" / "fit_spring.py")
    spring = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spring)
    P = np.log([[4.0, 0.3], [1.0, 1.0], [9.0, 0.05]])
    batch = spring.loss(P)
    assert np.allclose(batch, [spring.loss(P[i:i + 1])[0] for i in range(3)], rtol=1e-12, atol=0)
    calls = []
    oracle = FunctionOracle(lambda X: calls.append(len(X)) or spring.loss(X), dim=2, vectorized=True, numpy=True,
                            dtype=torch.float64)
    CoordinateEstimator().estimate(oracle, np.zeros(2))
    assert calls == [3]  # base point and both coordinates in one simulator call
    res = spring.fit()
    assert res.nfev <= 300 and np.allclose(np.exp(res.x), spring.TRUE, rtol=0.01)
    assert res.fun < 1.2e-4  # at the observation noise floor (0.01 ** 2)


# ---------------------------------------------------------------- exact errors (bad input)
SIZED = [sys.executable, str(Path(__file__).parent / "programs" / "sized_answer.py")]
MIB = 1 << 20


def test_a_crash_always_reports_the_real_exit_code_and_stderr():
    """Reading EOF and reaping the process used to race ("exit code None"); 30 crashes in a row."""
    with ProcessOracle(QUIRKY, dim=2, on_failure="inf") as oracle:
        out = oracle.evaluate(torch.tensor([[101.0, 0.0]] * 30))
        assert out.tolist() == [math.inf] * 30 and oracle.starts == 30
        messages = [f.message for f in oracle.failures]
    assert len(messages) == 30
    for m in messages:
        assert "exited while answering query id" in m and "(exit code 3); its stderr ends with:\n" in m, m
        assert m.endswith("quirky_sim: crashing on purpose"), m


@pytest.mark.parametrize(("script", "message"), [
    ("pass", r"exited while answering query id 0 \(exit code 0\); it wrote nothing to stderr"),
    ("import sys; sys.stdin.close(); sys.stderr.write('bye\\n'); sys.exit(7)",
     r"exited while answering query id 0 \(exit code 7\); its stderr ends with:\nbye$"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
     r"exited while answering query id 0 \(killed by signal SIGKILL\); it wrote nothing"),
    ("import os, sys, time; sys.stdin.readline(); os.close(1); time.sleep(60)",
     (r"closed its stdout while answering query id 0 and was still running 2 s later, so it was killed "
      r"\(killed by signal SIGKILL\)")),
])
def test_a_program_that_exits_or_dies_at_once_is_a_crash_with_its_status(script, message):
    with ProcessOracle([sys.executable, "-c", script], dim=1, timeout=30) as oracle:
        with pytest.raises(OracleError, match=message) as err:
            oracle([0.0])
        assert isinstance(err.value.__cause__, ProgramCrashError)
        assert oracle.nfev == 1 and not oracle.running


def test_an_answer_line_of_exactly_one_mib_is_accepted_and_one_byte_more_is_refused():
    with ProcessOracle(SIZED + [str(MIB)], dim=2, timeout=30) as oracle:
        assert oracle([1.0, 2.0]) == 5.0 and oracle([3.0, 0.0]) == 9.0 and oracle.starts == 1
    with ProcessOracle(SIZED + [str(MIB + 1)], dim=2, timeout=30) as oracle:
        with pytest.raises(OracleError, match=r"answered query id 0 with a line of 1048577 bytes \(starting "
                                              r"'\{\"id\": 0, \"loss\": 5\.0\} *'\.\.\.\): longer than the "
                                              r"protocol's limit of 1 MiB = 1048576 bytes per line; the program "
                                              r"will be restarted") as err:
            oracle([1.0, 2.0])
        assert isinstance(err.value.__cause__, ProtocolError) and not oracle.running
        with pytest.raises(OracleError, match="1048577 bytes"):
            oracle([1.0, 2.0])
        assert oracle.starts == 2 and oracle.nfev == 2  # restarted as for other protocol errors
    with (ProcessOracle(SIZED + ["2000000"], dim=2, timeout=30) as oracle,
          pytest.raises(OracleError, match=r"a line of 2000000 bytes .*limit of 1 MiB = 1048576 bytes")):
        oracle([1.0, 2.0])


def test_an_endless_answer_line_is_refused_at_the_limit_without_hanging():
    with ProcessOracle(SIZED + ["endless"], dim=2, timeout=30, on_failure="inf") as oracle:
        started = time.monotonic()
        assert oracle.evaluate(torch.tensor([[1.0, 2.0], [0.0, 0.0]])).tolist() == [math.inf, math.inf]
        assert time.monotonic() - started < 10  # each refusal measures the line for at most 0.5 s
        assert oracle.starts == 2 and [f.kind for f in oracle.failures] == ["exception", "exception"]
        assert "with a line of at least" in oracle.failures[0].message
        assert "limit of 1 MiB = 1048576 bytes" in oracle.failures[0].message


def test_a_missing_or_non_executable_program_is_refused_when_the_oracle_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"program '/no/such/program' of command \['/no/such/program', '-v'\] "
                                          "does not exist"):
        ProcessOracle(["/no/such/program", "-v"], dim=1)
    with pytest.raises(ConfigError, match="program 'no-such-program-zo' of command .* was not found as an "
                                          "executable on PATH"):
        ProcessOracle(["no-such-program-zo"], dim=1)
    script = tmp_path / "sim.py"
    script.write_text("print('hi')\n")
    with pytest.raises(ConfigError, match=f"program '{script}' of command .* is not executable"):
        ProcessOracle([str(script)], dim=1)
    with pytest.raises(ConfigError, match=f"program '{tmp_path}' of command .* is a directory"):
        ProcessOracle([str(tmp_path)], dim=1)
    with pytest.raises(ConfigError, match=r"program './sim\.py' \(relative to cwd .*\) .* is not executable"):
        ProcessOracle(["./sim.py"], dim=1, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"program 'sim\.py' .* not found as an executable on PATH"):
        ProcessOracle(["sim.py"], dim=1, env={"PATH": str(tmp_path)})  # the PATH the program would run with
    script.chmod(0o755)
    ProcessOracle(["sim.py"], dim=1, env={"PATH": str(tmp_path)})
    ProcessOracle(["./sim.py"], dim=1, cwd=tmp_path)
    # a file that exists but cannot be run is reported when it is started, as a failed query
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01\x02")
    garbage.chmod(0o755)
    with ProcessOracle([str(garbage)], dim=1) as oracle, pytest.raises(OracleError, match="cannot start") as err:
        oracle([0.0])
    assert isinstance(err.value.__cause__, ProgramCrashError) and str(garbage) in str(err.value)


def test_a_program_that_never_answers_times_out():
    with ProcessOracle([sys.executable, "-c", "import time; time.sleep(60)"], dim=1, timeout=0.3,
                       startup_timeout=0.3) as oracle:
        started = time.monotonic()
        with pytest.raises(OracleError, match=r"did not answer query id 0 within 0\.6 s; it was killed") as err:
            oracle([0.0])
        assert time.monotonic() - started < 5 and err.value.kind == "timeout" and not oracle.running
