"""Trainer on the real digits data, checkpoints (safe, versioned, atomic) and resume."""

import json

import pytest
import torch

from zoblackbox import CheckpointError, ConfigError, CoordinateEstimator, Trainer
from zoblackbox.checkpoint import load_checkpoint, save_checkpoint
from zoblackbox.data import load_digits_split, make_loader
from zoblackbox.models import count_params, digits_cnn, digits_mlp


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


def _trainer(digits, out=None, epochs=2, method="zo", **kw):
    torch.manual_seed(0)
    model = digits_mlp(hidden=16)
    tr = make_loader(digits.x_train[:512], digits.y_train[:512], 64, shuffle=True, seed=1)
    te = make_loader(digits.x_test, digits.y_test, 512, shuffle=False)
    return Trainer(model, tr, te, method=method, lr=0.05, epochs=epochs, output_dir=out, progress=False, **kw)


def test_digits_split_is_fixed_and_stratified(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert float(digits.x_train.max()) == 1.0 and float(digits.x_train.min()) == 0.0
    assert torch.bincount(digits.y_test).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    again = load_digits_split(seed=0)
    assert torch.equal(again.x_test, digits.x_test)


def test_digits_cnn_has_the_documented_size():
    assert count_params(digits_cnn()) == 3658


def test_zo_training_learns_and_logs(digits, tmp_path):
    t = _trainer(digits, tmp_path, epochs=5)
    before = t.evaluate(t.test_loader)["acc"]
    res = t.fit()
    assert before < 0.2 and res["test_acc"] > 0.8  # measured 0.88 (first-order: 0.87)
    assert res["queries"] == 5 * 8 * (count_params(t.model) + 1)  # epochs * steps * (d + 1)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[-1]["test_acc"] == res["test_acc"] and lines[-1]["queries"] == res["queries"]


def test_fo_reference_and_budget_stop(digits):
    fo = _trainer(digits, method="fo", epochs=5).fit()
    assert fo["queries"] == 0 and fo["test_acc"] > 0.8
    cost = count_params(digits_mlp(hidden=16)) + 1
    t = _trainer(digits, budget=5 * cost + 3)
    res = t.fit()
    assert res["queries"] == 5 * cost and res["steps"] == 5 and "budget" in res["stop_reason"]


def test_resume_reproduces_the_uninterrupted_run_bitwise(digits, tmp_path):
    full = _trainer(digits, tmp_path / "a", epochs=3)
    full.fit()
    first = _trainer(digits, tmp_path / "b", epochs=3)
    first.epochs = 2  # "killed" after two epochs: only their checkpoints exist
    first.fit()
    resumed = _trainer(digits, tmp_path / "b", epochs=3)
    res = resumed.fit(resume=True)
    assert res["epochs"] == 3 and res["queries"] == full.queries
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    state = {"w": torch.arange(4.0), "n": 3, "nested": {"s": "text", "l": [1, 2.5]}}
    pt = save_checkpoint(tmp_path, state, {"epoch": 1}, tag=7)
    loaded, meta = load_checkpoint(tmp_path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"] == state["nested"] and meta["epoch"] == 1
    pt.write_bytes(pt.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CheckpointError, match="corrupt: SHA-256"):
        load_checkpoint(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    pt = save_checkpoint(tmp_path, {"w": torch.zeros(1)}, {}, tag=1)
    meta_path = pt.with_suffix(".json")
    # a payload with an arbitrary object, and metadata whose checksum matches it
    torch.save({"w": _Evil()}, pt)
    import hashlib

    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(pt.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(tmp_path)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="not plain tensors"):
        save_checkpoint(tmp_path, {"obj": _Evil()}, {}, tag=2)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_foreign_files_give_clear_errors(tmp_path):
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-1.json"}))
    (tmp_path / "ckpt-1.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="is not a zoblackbox-checkpoint file"):
        load_checkpoint(tmp_path)
    (tmp_path / "ckpt-1.json").write_text(json.dumps({"format": "zoblackbox-checkpoint", "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path)


def test_trainer_bad_arguments(digits):
    model = digits_mlp()
    tr = make_loader(digits.x_train[:64], digits.y_train[:64], 32, shuffle=False)
    for kwargs, match in (({"method": "sgd"}, "method must be one of"), ({"epochs": 0}, "epochs must be an int >= 1"),
                          ({"budget": 10}, "below the cost of one step"),
                          ({"lr_schedule": "step"}, "lr_schedule must be one of")):
        with pytest.raises(ConfigError, match=match):
            Trainer(model, tr, estimator=CoordinateEstimator(), progress=False, **kwargs)
