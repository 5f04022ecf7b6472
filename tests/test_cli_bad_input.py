"""Bad input on the command line: every sub-command refuses it before any work, in one line, without a traceback.

Each case of the tables runs ``zoblackbox.cli.main`` in-process (argparse errors raise ``SystemExit(2)``)
in an empty working directory; nothing trains -- the errors come before the first query.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from zoblackbox import cli
from zoblackbox.cli import main
from zoblackbox.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
NOPROG = "zoblackbox-no-such-program-xyz"  # never started: every minimize case fails before the program runs
MIN = ["minimize", "--program", NOPROG, "--dim", "2", "--maxiter", "3"]
HUGE = str(10**30)

# (argv, a piece of text the error line must contain); {tmp} is an empty directory, {file} an existing file
TRAIN = [
    (["train", "--optimizer", "sgd", "--momentum", "nan"], "--momentum"),
    (["train", "--optimizer", "sgd", "--momentum", "-0.5"], "--momentum"),
    (["train", "--optimizer", "sgd", "--momentum", "1"], "--momentum"),
    (["train", "--optimizer", "sgd", "--momentum", "inf"], "--momentum"),
    (["train", "--momentum", "0.5"], "--momentum applies to --optimizer sgd"),
    (["train", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--weight-decay", "nan"], "--weight-decay"),
    (["train", "--weight-decay", "inf"], "--weight-decay"),
    (["train", "--warmup-epochs", "nan"], "--warmup-epochs"),
    (["train", "--warmup-epochs", "-1"], "--warmup-epochs"),
    (["train", "--warmup-epochs", "inf"], "--warmup-epochs"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr", "1e999"], "--lr"),
    (["train", "--lr", "fast"], "'fast'"),
    (["train", "--mu", "nan"], "--mu"),
    (["train", "--mu", "0"], "--mu"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--epochs", "1.5"], "--epochs"),
    (["train", "--epochs", HUGE], "below 2**63"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "nan"], "--batch-size"),
    (["train", "--batch-size", HUGE], "--batch-size"),
    (["train", "--q", "0"], "--q"),
    (["train", "--budget", "0"], "--budget"),
    (["train", "--budget", "inf"], "--budget"),
    (["train", "--mask-interval", "0"], "--mask-interval"),
    (["train", "--checkpoint-every-steps", "-2"], "--checkpoint-every-steps"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--seed", str(2**64)], "--seed"),
    (["train", "--seed", str(2**63)], "--seed"),
    (["train", "--seed", "nan"], "--seed"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--threads", str(10**19)], "--threads"),
    (["train", "--sparsity", "nan"], "sparsity"),
    (["train", "--sparsity", "1.0"], "sparsity"),
    (["train", "--sparsity", "-0.1"], "sparsity"),
    (["train", "--sparsity", "inf"], "sparsity"),
    (["train", "--device", "nonsense"], "--device 'nonsense' is not usable here"),
    (["train", "--device", "cuda:99"], "--device 'cuda:99' is not usable here"),
    (["train", "--device", "meta"], "--device 'meta' is not usable here"),
    (["train", "--out", "{file}/run"], "--out"),
    (["train", "--out", "{file}"], "--out"),
    (["train", "--json", "{tmp}"], "--json"),
    (["train", "--json", "{file}/x/summary.json"], "--json"),
    (["train", "--resume", "--out", "{file}"], "--out"),
    (["train", "--ratios", "{tmp}/missing.json", "--sparsity", "0.5"], "--ratios"),
    (["train", "--ratios", "{tmp}", "--sparsity", "0.5"], "--ratios"),
    (["train", "--task", "cifar10", "--data", "{tmp}/none"], "--data"),
    (["train", "--task", "cifar10", "--data", "{file}"], "--data"),
    (["train", "--task", "cifar10"], "needs --data PATH"),
    (["train", "--task", "mnist"], "--task"),
    (["train", "--model", "vgg"], "--model"),
    (["train", "--optimizer", "lbfgs"], "--optimizer"),
    (["train", "--scheduler", "magic"], "--scheduler"),
    (["train", "--estimator", "zz"], "--estimator"),
    (["train", "--recipe", "other"], "--recipe"),
]
if not torch.cuda.is_available():
    TRAIN.append((["train", "--device", "cuda"], "--device 'cuda' is not usable here"))

DEMO = [
    (["demo", "--lr", "nan"], "--lr"),
    (["demo", "--mu", "inf"], "--mu"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--batch-size", "-3"], "--batch-size"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--device", "nonsense"], "--device 'nonsense'"),
    (["demo", "--device", ""], "--device ''"),
    (["demo", "--out", "{file}"], "--out"),
    (["demo", "--json", "{tmp}"], "--json"),
    (["demo", "--json", "{file}/s.json"], "--json"),
    (["demo", "--scheduler", "bogus"], "--scheduler"),
]

CERTIFY = [
    (["certify", "--sigma", "nan"], "--sigma"),
    (["certify", "--sigma", "0"], "--sigma"),
    (["certify", "--sigma", "-1"], "--sigma"),
    (["certify", "--n0", "0"], "--n0"),
    (["certify", "--n", "nan"], "--n"),
    (["certify", "--n", HUGE], "--n"),
    (["certify", "--alpha", "0"], "--alpha"),
    (["certify", "--alpha", "1"], "--alpha"),
    (["certify", "--alpha", "nan"], "--alpha"),
    (["certify", "--radii", "nan"], "--radii"),
    (["certify", "--radii", "0,-1"], "--radii"),
    (["certify", "--radii", "0,inf"], "--radii"),
    (["certify", "--num-images", "0"], "--num-images"),
    (["certify", "--noise-batch", "0"], "--noise-batch"),
    (["certify", "--epochs-factor", "inf"], "--epochs-factor"),
    (["certify", "--epochs-factor", "0"], "--epochs-factor"),
    (["certify", "--seed", "-1"], "--seed"),
    (["certify", "--seed", "1e3"], "--seed"),
    (["certify", "--threads", "0"], "--threads"),
    (["certify", "--json", "{tmp}"], "--json"),
    (["certify", "--json", "{file}/r.json"], "--json"),
    (["certify", "--pipeline", "bogus"], "--pipeline"),
]

PDE = [
    (["pde", "--seed", "-1"], "--seed"),
    (["pde", "--data-seed", str(2**63)], "--data-seed"),
    (["pde", "--n-train", "0"], "--n-train"),
    (["pde", "--n-test", "nan"], "--n-test"),
    (["pde", "--sim-steps", "0"], "--sim-steps"),
    (["pde", "--warmup", "-1"], "--warmup"),
    (["pde", "--factor", "0"], "--factor"),
    (["pde", "--sol-steps", "-1"], "--sol-steps"),
    (["pde", "--non-steps", "nan"], "--non-steps"),
    (["pde", "--unroll", "0"], "--unroll"),
    (["pde", "--batch-size", "0"], "--batch-size"),
    (["pde", "--lr", "nan"], "--lr"),
    (["pde", "--rge-lr", "inf"], "--rge-lr"),
    (["pde", "--mu", "0"], "--mu"),
    (["pde", "--q", "0"], "--q"),
    (["pde", "--scheme", "bogus"], "--scheme"),
    (["pde", "--warm-start", "x"], "--warm-start"),
    (["pde", "--scenario", "bogus"], "--scenario"),
    (["pde", "--method", "bogus"], "--method"),
    (["pde", "--threads", "0"], "--threads"),
    (["pde", "--json", "{tmp}"], "--json"),
    (["pde", "--json", "{file}/r.json"], "--json"),
]

MINIMIZE = [
    (["minimize", "--program", NOPROG, "--dim", "0", "--maxiter", "3"], "--dim"),
    (["minimize", "--program", NOPROG, "--dim", "nan", "--maxiter", "3"], "--dim"),
    (["minimize", "--program", NOPROG, "--dim", HUGE, "--maxiter", "3"], "--dim"),
    (["minimize", "--dim", "2", "--maxiter", "3"], "--program"),
    ([*MIN, "--budget", "0"], "--budget"),
    ([*MIN, "--maxiter", "-1"], "--maxiter"),
    ([*MIN, "--x0", "1", "nan"], "--x0"),
    ([*MIN, "--x0", "inf", "1"], "--x0"),
    ([*MIN, "--x0", "1", "2", "3"], "must be 2 numbers"),
    ([*MIN, "--x0-file", "{tmp}/missing.json"], "--x0-file"),
    ([*MIN, "--x0-file", "{tmp}"], "--x0-file"),
    ([*MIN, "--x0-file", "{nanfile}"], "finite"),
    ([*MIN, "--estimator", "bogus"], "--estimator"),
    ([*MIN, "--mu", "0"], "--mu"),
    ([*MIN, "--mu", "0.1"], "--mu needs an explicit --estimator"),
    ([*MIN, "--q", "0"], "--q"),
    ([*MIN, "--optimizer", "newton"], "--optimizer"),
    ([*MIN, "--lr", "nan"], "--lr"),
    ([*MIN, "--bounds", "nan", "1"], "--bounds"),
    ([*MIN, "--bounds", "1", "0"], "--bounds"),
    ([*MIN, "--workers", "0"], "--workers"),
    ([*MIN, "--timeout", "0"], "--timeout"),
    ([*MIN, "--timeout", "nan"], "--timeout"),
    ([*MIN, "--timeout", "inf"], "--timeout"),
    ([*MIN, "--on-failure", "ignore"], "--on-failure"),
    ([*MIN, "--checkpoint", "{file}"], "--checkpoint"),
    ([*MIN, "--checkpoint", "{file}/ck"], "--checkpoint"),
    ([*MIN, "--checkpoint-every", "0"], "--checkpoint-every"),
    ([*MIN, "--log", "{tmp}"], "--log"),
    ([*MIN, "--log", "{file}/log.jsonl"], "--log"),
    ([*MIN, "--json", "{file}/r.json"], "--json"),
    ([*MIN, "--seed", "-1"], "--seed"),
    ([*MIN, "--threads", "0"], "--threads"),
    (["minimize", "--program", "", "--dim", "2", "--maxiter", "3"], "--program is empty"),
    (["minimize", "--program", 'sim "unclosed', "--dim", "2", "--maxiter", "3"], "--program"),
    (["minimize", "--program", NOPROG, "--dim", "2"], "--budget"),
    (MIN, NOPROG),  # the program does not exist: one line, exit 2
]

CASES = TRAIN + DEMO + CERTIFY + PDE + MINIMIZE


def _fill(argv, tmp_path):
    file = tmp_path / "a-file"
    nanfile = tmp_path / "x0-nan.json"
    return [a.format(tmp=tmp_path, file=file, nanfile=nanfile) for a in argv]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (so relative defaults such as runs/train land in tmp) with one file in it."""
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "x0-nan.json").write_text("[1.0, NaN]")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("ZOBLACKBOX_DEBUG", raising=False)
    return tmp_path


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


def _snapshot(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_exits_2_with_one_line(argv, needle, workdir, capsys):
    before = _snapshot(workdir)
    threads = torch.get_num_threads()
    argv = _fill(argv, workdir)
    rc = _run(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err)
    assert "Traceback" not in err + captured.out
    lines = err.strip().splitlines()
    if lines[-1].startswith("zoblackbox: error:"):  # our own error: exactly one line
        assert len(lines) == 1, err
    else:  # argparse: usage lines, then "zoblackbox <command>: error: argument ...: expected ..., got ..."
        assert lines[0].startswith("usage: zoblackbox"), err
        assert lines[-1].startswith(f"zoblackbox {argv[0]}: error:"), err
    assert needle.format(tmp=workdir) in lines[-1], err
    assert _snapshot(workdir) == before, "a refused command created files"
    assert torch.get_num_threads() == threads


def test_output_path_errors_name_the_option_and_the_path(workdir, capsys):
    path = workdir / "a-file" / "sub" / "summary.json"
    assert main(["train", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--json" in err and str(path) in err and "is a file, not a directory" in err
    assert main(["demo", "--out", str(workdir / "a-file")]) == 2
    assert "is a file; expected a directory" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory_is_refused(workdir, capsys):
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["certify", "--json", str(locked / "r.json")]) == 2
        assert "is not writable" in capsys.readouterr().err
        assert main([*MIN, "--checkpoint", str(locked)]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_unwritable_locations_are_refused_even_as_root(workdir, monkeypatch, capsys):
    from zoblackbox import cli_args

    monkeypatch.setattr(cli_args.os, "access", lambda path, mode: False)
    assert main(["pde", "--json", str(workdir / "new" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json" in err and "is not writable" in err
    assert main(["demo", "--json", str(workdir / "a-file")]) == 2
    assert "--json" in capsys.readouterr().err
    assert main([*MIN, "--x0-file", str(workdir / "x0-nan.json")]) == 2
    err = capsys.readouterr().err
    assert "--x0-file" in err and "is not readable" in err


def test_errors_come_before_the_json_is_needed_at_the_end(workdir, monkeypatch, capsys):
    """--json is checked before training: _run_training is never reached."""
    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(cli, "_run_training", boom)
    assert main(["train", "--no-progress", "--json", str(workdir)]) == 2
    assert "--json" in capsys.readouterr().err


def test_debug_flag_and_environment_show_the_traceback(workdir, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="--device 'nonsense'"):
        main(["--debug", "train", "--device", "nonsense"])
    with pytest.raises(ConfigError, match="--device 'nonsense'"):
        main(["train", "--device", "nonsense", "--debug"])
    monkeypatch.setenv("ZOBLACKBOX_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "--device", "nonsense"])
    monkeypatch.setenv("ZOBLACKBOX_DEBUG", "0")
    assert main(["train", "--device", "nonsense"]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--debug" in out and "ZOBLACKBOX_DEBUG=1" in out and "130" in out


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130), (OSError(28, "No space left on device"), 2),
                                      (TypeError("bad\ntype"), 2), (RuntimeError("CUDA out of memory"), 1)])
def test_errors_escaping_a_command_print_one_line(exc, code, workdir, monkeypatch, capsys):
    def raise_it(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_certify", raise_it)
    assert main(["certify"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoblackbox:"), err
    assert "Traceback" not in err
    if code == 1:
        assert "--debug" in err


# --------------------------------------------------------------------------- non-finite final metrics


def _fake_result(loss, acc):
    return {"test_loss": loss, "test_acc": acc, "queries": 10, "steps": 1, "epochs": 1, "wall_s": 0.0,
            "stop_reason": "epochs", "params": 1, "split": "fake", "history": []}


@pytest.mark.parametrize("loss,acc", [(math.nan, 0.1), (math.inf, 0.1), (0.5, math.nan)])
def test_train_with_non_finite_final_metrics_exits_1(loss, acc, workdir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_run_training", lambda *a, **k: _fake_result(loss, acc))
    out = workdir / "run"
    assert main(["train", "--no-progress", "--out", str(out), "--json", str(workdir / "s.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoblackbox: error:")
    assert ("test_loss" in err[0]) == (not math.isfinite(loss))
    assert "learning rate" in err[0] and "--lr" in err[0]
    monkeypatch.setattr(cli, "_run_training", lambda *a, **k: _fake_result(0.5, 0.9))
    assert main(["train", "--no-progress", "--out", str(out)]) == 0


def test_demo_with_non_finite_final_metrics_exits_1(workdir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_run_training", lambda *a, **k: _fake_result(math.nan, 0.1))
    assert main(["demo", "--no-progress", "--no-fo"]) == 1
    assert "non-finite ZO test_loss = nan" in capsys.readouterr().err


def test_minimize_with_nan_final_fun_exits_1(workdir, monkeypatch, capsys):
    from zoblackbox import optim
    from zoblackbox.adapters import process

    class FakeOracle:
        def __init__(self, *a, **k):
            pass

        def close(self):
            pass

    result = types.SimpleNamespace(x=torch.zeros(2).numpy(), fun=math.nan, nfev=3, nit=1, success=True,
                                   message="done", failures={})
    monkeypatch.setattr(process, "ProcessOracle", FakeOracle)
    monkeypatch.setattr(optim, "minimize", lambda *a, **k: result)
    assert main([*MIN, "--json", str(workdir / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "zoblackbox: error: the run ended with non-finite fun = nan" in err and "--lr" in err
    assert json.loads((workdir / "r.json").read_text().replace("NaN", "null"))["fun"] is None


def test_pde_with_nan_mae_exits_1(workdir, monkeypatch, capsys):
    from zoblackbox import cli_pde

    problem = types.SimpleNamespace(train=types.SimpleNamespace(n_steps=1000, n_sims=20),
                                    test=types.SimpleNamespace(n_sims=1),
                                    step=types.SimpleNamespace(scenario="fake"), config={})
    row = {"mae": math.nan, "queries": 0, "solver_calls": 0, "train_wall_s": 0.0}
    monkeypatch.setattr(cli_pde, "make_problem", lambda *a, **k: problem)
    monkeypatch.setattr(cli_pde, "run_methods", lambda *a, **k: {"zo-sol": row})
    assert main(["pde"]) == 1
    assert "non-finite zo-sol test MAE = nan" in capsys.readouterr().err


def test_real_diverging_training_exits_1(workdir, capsys):
    """The smallest real run: an absurd learning rate makes the weights overflow."""
    rc = main(["train", "--method", "fo", "--model", "mlp", "--epochs", "1", "--batch-size", "512", "--lr", "1e30",
               "--optimizer", "sgd", "--no-progress", "--out", str(workdir / "run")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "non-finite" in err and "--lr" in err


# --------------------------------------------------------------------------- real processes


@pytest.mark.parametrize("argv", [
    ["train", "--optimizer", "sgd", "--momentum", "nan"],
    ["train", "--device", "nonsense", "--json", "{file}/x.json"],
])
def test_console_process_prints_no_traceback(argv, workdir):
    env = {k: v for k, v in os.environ.items() if k != "ZOBLACKBOX_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "zoblackbox.cli", *_fill(argv, workdir)], cwd=workdir / "cwd",
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and ("--momentum" in last or "--json" in last)
    assert list((workdir / "cwd").iterdir()) == []
