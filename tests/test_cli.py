"""The ``zoblackbox`` command line (run in-process and as the installed console script)."""

import json
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
