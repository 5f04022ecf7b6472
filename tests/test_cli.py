"""The ``zoblackbox`` command line (run in-process and as the installed console script)."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from zoblackbox.cli import main


def test_train_writes_metrics_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "mlp", "--epochs", "2", "--batch-size", "256", "--lr", "0.05", "--out", str(out),
               "--json", str(tmp_path / "s.json"), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["queries"] == 2 * 6 * (summary["params"] + 1)  # 1,437 images / 256 = 6 steps an epoch
    assert 0 < summary["test_acc"] <= 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "test acc" in capsys.readouterr().out


def test_train_rge_with_budget_and_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--estimator", "rge", "--q", "10", "--epochs", "2", "--batch-size", "512",
            "--out", str(out), "--no-progress", "--json", str(tmp_path / "a.json")]
    assert main(args) == 0
    assert main(args + ["--resume", "--epochs", "3"]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["epochs"] == 3 and first["queries"] == 3 * 3 * 11


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--mu", "-1"])
    assert info.value.code == 2
    assert "expected a positive finite number, got -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--optimizer", "lbfgs"])


def test_demo_json_fields(tmp_path):
    path = tmp_path / "demo.json"
    assert main(["demo", "--epochs", "1", "--batch-size", "512", "--no-progress", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert set(data) >= {"test_acc", "fo_test_acc", "queries", "wall_s", "params"}
    assert data["params"] == 3658 and data["queries"] == 3 * 3659
    assert 0 <= data["test_acc"] <= 1 and 0 <= data["fo_test_acc"] <= 1


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "zoblackbox"  # installed beside the interpreter running the tests
    assert exe.exists(), exe
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.startswith("zoblackbox ")


def test_sparse_training_from_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--epochs", "2", "--batch-size", "512", "--sparsity", "0.9", "--ratios",
            "uniform", "--mask-interval", "1", "--out", str(out), "--no-progress", "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    # mlp: weights 64x32 and 32x10 keep 10% (205 + 32), biases (32 + 10) stay dense -> 279 coords
    assert summary["queries"] == 2 * 3 * (279 + 1)
    assert "uniform ratios (sparsity 0.90)" in capsys.readouterr().out
    # --sparse-biases: the biases keep 10% too (3 of 32, 1 of 10) -> 241 coords
    assert main([*args[:-5], "--out", str(tmp_path / "b"), "--no-progress", "--sparse-biases", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["queries"] == 2 * 3 * (241 + 1)


def test_ratio_file_that_does_not_match_the_model_is_refused(tmp_path, capsys):
    bad = tmp_path / "ratios.json"
    bad.write_text(json.dumps({"conv1.weight": 0.5}))
    rc = main(["train", "--model", "mlp", "--sparsity", "0.5", "--ratios", str(bad), "--out", str(tmp_path / "r"),
               "--no-progress"])
    assert rc == 2
    assert "do not match the model's layers" in capsys.readouterr().err
    assert main(["train", "--sparsity", "1.0", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert "sparsity must be a number in [0, 1), got 1.0" in capsys.readouterr().err


def test_cifar10_task_needs_local_data(tmp_path, capsys):
    assert main(["train", "--task", "cifar10", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert "needs --data PATH" in capsys.readouterr().err
    assert main(["train", "--task", "cifar10", "--data", str(tmp_path / "none"), "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cifar10_resnet20_recipe_runs_on_generated_files(tmp_path):
    """The DeepZero recipe end to end (ZO-GraSP ratios, sparse CGE, SGD + cosine) on tiny
    generated CIFAR-format files: 1 epoch, 1 step, sparsity raised to 0.995 to keep it short."""
    import numpy as np

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 4)]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, n)]}, f, protocol=2)
    rc = main(["train", "--task", "cifar10", "--data", str(tmp_path), "--recipe", "deepzero", "--epochs", "1",
               "--sparsity", "0.995", "--out", str(tmp_path / "run"), "--no-progress",
               "--json", str(tmp_path / "s.json")])
    assert rc == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["params"] == 269722 and summary["steps"] == 1
    assert 0 < summary["queries"] < 269722 / 20  # sparse: a small fraction of the 269,722 coordinates


def test_bad_numbers_devices_and_paths_are_refused_before_training(tmp_path, capsys):
    """The bad-input contract (tests/test_cli_bad_input.py has the full table): argparse or one line, exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "--optimizer", "sgd", "--momentum", "nan", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "argument --momentum: expected a number in [0, 1), got nan" in capsys.readouterr().err
    assert main(["train", "--device", "nonsense", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("zoblackbox: error: --device 'nonsense' is not usable here: ")
    (tmp_path / "f").write_text("")
    assert main(["train", "--json", str(tmp_path / "f" / "s.json"), "--out", str(tmp_path / "r")]) == 2
    assert "--json" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
