"""Inputs that used to give a silent wrong result: each is now a clear error or a counted failure."""

import json
import math

import numpy as np
import pytest
import torch

from zoblackbox import CheckpointError, ConfigError, CoordinateEstimator, FunctionOracle, RandomEstimator
from zoblackbox.checkpoint import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("estimator", [CoordinateEstimator(), RandomEstimator(q=3)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_an_estimate_at_a_non_finite_point_is_refused_before_any_query(estimator, bad):
    oracle = FunctionOracle(lambda x: min(10.0, float((x ** 2).sum())), 4, dtype=torch.float64)  # ignores NaN
    x = np.zeros(4)
    x[2] = bad
    with pytest.raises(ConfigError, match=r"x must be finite to estimate a gradient; 1 non-finite entries, at "
                                          r"indices \[2\]"):
        estimator.estimate(oracle, x)
    assert oracle.nfev == 0


def test_a_save_that_fails_keeps_the_last_good_checkpoint_of_the_same_tag(tmp_path):
    good = {"w": torch.arange(3.0)}
    save_checkpoint(tmp_path, good, {"step": 1}, tag=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for meta in ({"step": object()}, {"step": math.nan}, {"bad": {1, 2}}):
        with pytest.raises(CheckpointError, match="metadata must be JSON"):
            save_checkpoint(tmp_path, {"w": torch.zeros(3)}, meta, tag=1)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(CheckpointError, match="not plain tensors"):
        save_checkpoint(tmp_path, {"w": object()}, {"step": 1}, tag=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    state, meta = load_checkpoint(tmp_path)
    assert torch.equal(state["w"], good["w"]) and meta["step"] == 1 and json.loads(
        (tmp_path / "latest.json").read_text())["checkpoint"] == "ckpt-000000001.json"


@pytest.mark.parametrize("flag", ["vectorized", "numpy"])
@pytest.mark.parametrize("value", ["False", "True", 0, 1, None])
def test_string_and_int_flags_are_not_taken_as_booleans(flag, value):
    with pytest.raises(TypeError, match=flag):
        FunctionOracle(lambda x: 0.0, 3, **{flag: value})


def test_gym_policy_with_non_finite_parameters_is_a_failed_query():
    pytest.importorskip("gymnasium")
    from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy

    oracle = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, seed=0, on_failure="inf")
    X = np.zeros((3, oracle.dim))
    X[1, 0] = math.nan
    X[2, -1] = math.inf
    losses = oracle.evaluate(X)
    assert math.isfinite(float(losses[0])) and losses[1] == math.inf and losses[2] == math.inf
    assert [f.kind for f in oracle.failures] == ["nonfinite", "nonfinite"] and oracle.nfev == 3


def test_minimize_checks_vectorized_for_oracles_too():
    from zoblackbox import minimize

    oracle = FunctionOracle(lambda x: float((x ** 2).sum()), 3)
    with pytest.raises(TypeError, match="vectorized must be a bool, got str: 'False'"):
        minimize(oracle, np.zeros(3), maxiter=1, vectorized="False")
    with pytest.raises(ConfigError, match="vectorized=True applies to plain callables"):
        minimize(oracle, np.zeros(3), maxiter=1, vectorized=True)
    assert oracle.nfev == 0


@pytest.mark.parametrize("fail_on", [".pt", ".json", "latest.json"])
def test_a_same_tag_save_that_dies_at_any_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fail_on):
    """A full disk (an OSError) at any of the writes of a same-tag save leaves the previous pair of
    that tag loadable and named by latest.json."""
    import zoblackbox.checkpoint as ck

    save_checkpoint(tmp_path, {"w": torch.arange(3.0)}, {"step": 1}, tag=1)
    real = ck._atomic_write

    def full_disk(path, data):
        if path.name.endswith(fail_on) and not (fail_on == ".json" and path.name == "latest.json"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ck, "_atomic_write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {"step": 2}, tag=1)
    monkeypatch.setattr(ck, "_atomic_write", real)
    state, meta = load_checkpoint(tmp_path)
    if fail_on == "latest.json":  # the new pair was complete before latest.json was touched
        assert meta["step"] == 2 and torch.equal(state["w"], torch.zeros(3))
    else:
        assert meta["step"] == 1 and torch.equal(state["w"], torch.arange(3.0))
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 3}, tag=1)  # and the next save cleans up
    assert load_checkpoint(tmp_path)[1]["step"] == 3 and len(list(tmp_path.glob("ckpt-*.pt"))) == 1
