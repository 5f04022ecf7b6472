"""Loading state: every field of a Trainer checkpoint and of the oracle, estimator, sampler and gym
states is checked (type, range, consistency) before anything changes, and a bad checkpoint file is
refused with a CheckpointError that names the file and the field."""

import copy
import hashlib
import io
import json
import math
import os
import pickle
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zoblackbox import CheckpointError, FunctionOracle, RandomEstimator, Trainer
from zoblackbox.checkpoint import load_checkpoint, save_checkpoint
from zoblackbox.data import load_digits_split, make_loader
from zoblackbox.models import digits_mlp
from zoblackbox.params import ParamLayout
from zoblackbox.sparsity import CoordinateSampler, uniform_ratios

BUDGET = 9  # 3 steps of 3 queries: the run stops after the first batch of its second epoch


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


def _trainer(digits, out=None, **kw):
    torch.manual_seed(0)
    model = digits_mlp(hidden=8)
    train = make_loader(digits.x_train[:128], digits.y_train[:128], 64, shuffle=True, seed=1)
    kw = {"estimator": RandomEstimator(q=2, seed=0), "lr": 0.05, "epochs": 2, "budget": BUDGET, **kw}
    return Trainer(model, train, None, output_dir=out, progress=False, **kw)


@pytest.fixture(scope="module")
def trained(digits):
    """A mid-epoch state (epoch 1, batch 1 of 2, 3 steps, 9 queries) with a failure record."""
    t = _trainer(digits)
    assert t.fit()["stop_reason"].startswith("query budget reached")
    state = t.state_dict()
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 1, 3)
    state["oracle"]["failures"] = [{"index": 4, "kind": "nonfinite", "message": "query #4 returned nan",
                                    "value": math.nan, "attempts": 2, "resolved": True}]
    return state


def _snapshot(t: Trainer):
    gen = t.train_loader.generator
    return {"params": [p.detach().clone() for p in t.model.parameters()], "epoch": t.epoch, "step": t.global_step,
            "batch": t.batch_in_epoch, "history": copy.deepcopy(t.history), "x": t.engine.rule.x.clone(),
            "engine_nfev": t.engine.nfev, "nfev": t.zo.oracle.nfev, "failures": list(t.zo.oracle.failures),
            "rng": torch.get_rng_state(), "loader_rng": gen.get_state(), "wall": t.elapsed}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "params":
            assert all(torch.equal(p, q) for p, q in zip(a[k], b[k]))
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _refused(digits, state, field):
    t = _trainer(digits)
    before = _snapshot(t)
    with pytest.raises(CheckpointError, match=rf"field {field}(?![\w.])") as info:
        t.load_state_dict(state)
    _same(_snapshot(t), before)  # nothing was applied
    return str(info.value)


def test_the_good_state_loads(digits, trained):
    t = _trainer(digits)
    t.load_state_dict(trained)
    assert (t.epoch, t.batch_in_epoch, t.global_step, t.queries) == (1, 1, 3, BUDGET)
    assert t.zo.oracle.failures[0].resolved and math.isnan(t.zo.oracle.failures[0].value)


TOP_FIELDS = ["model", "engine", "torch_rng", "epoch", "global_step", "wall_offset", "history", "batch_in_epoch",
              "epoch_losses", "loader_rng", "oracle"]


@pytest.mark.parametrize("field", TOP_FIELDS)
def test_each_missing_field_is_named(digits, trained, field):
    state = {k: v for k, v in trained.items() if k != field}
    assert "is missing" in _refused(digits, state, field)


@pytest.mark.parametrize("field", TOP_FIELDS)
@pytest.mark.parametrize("bad", ["x", None, 1.5, [1]], ids=["str", "None", "float", "list"])
def test_each_field_of_a_wrong_type_is_named(digits, trained, field, bad):
    if field == "epoch_losses" and bad == [1]:
        bad = [1, 2]  # a list of numbers, but not one per batch so far
    if field == "wall_offset" and bad == 1.5:
        bad = "1.5"  # (1.5 seconds is fine)
    _refused(digits, {**trained, field: bad}, field)


def _engine_with(trained, **boundary):
    engine = dict(trained["engine"])
    engine["boundary"] = {**engine["boundary"], **boundary}
    return engine


OUT_OF_RANGE = [
    ("epoch", -5), ("epoch", 3), ("epoch", 2), ("epoch", True), ("global_step", -1), ("global_step", 4),
    ("global_step", 10**9), ("batch_in_epoch", -1), ("batch_in_epoch", 3), ("wall_offset", -1.0),
    ("wall_offset", math.nan), ("wall_offset", math.inf), ("history", "[1, 2]"), ("history", "{]"),
    ("history", json.dumps({"epoch": 1})), ("epoch_losses", []), ("epoch_losses", ["a"]),
    ("torch_rng", torch.zeros(3, dtype=torch.uint8)), ("torch_rng", torch.zeros(5056, dtype=torch.uint8)),
    ("torch_rng", torch.zeros(5056)), ("loader_rng", torch.zeros(5056, dtype=torch.uint8)),
    ("loader_rng", torch.zeros(10, dtype=torch.uint8)),
    ("model", {}), ("model.1.weight", torch.zeros(3)), ("model.1.weight", torch.zeros(8, 64, dtype=torch.float64)),
    ("engine", {"format": "other"}),
]


@pytest.mark.parametrize(("field", "bad"), OUT_OF_RANGE, ids=[f"{f}={bad!r:.20}" for f, bad in OUT_OF_RANGE])
def test_each_out_of_range_field_is_named(digits, trained, field, bad):
    if field.startswith("model."):
        key = field.partition(".")[2]
        state = {**trained, "model": {**trained["model"], key: bad}}
    else:
        state = {**trained, field: bad}
    _refused(digits, state, field)


@pytest.mark.parametrize(("key", "bad"), [("nfev", -5), ("nit", "3"), ("nit", -1), ("iterations", 2),
                                          ("iterations", "3"), ("phase", "halfway"), ("nfev", 10**6)])
def test_the_engine_counters_are_checked(digits, trained, key, bad):
    _refused(digits, {**trained, "engine": _engine_with(trained, **{key: bad})}, r"engine(\.boundary\.iterations)?")


ORACLE_CASES = [
    ("oracle.nfev", {"nfev": -1000000}), ("oracle.nfev", {"nfev": 10**6}), ("oracle.nfev", {"nfev": 8}),
    ("oracle.nfev", {"nfev": "9"}), ("oracle.nfev", {"nfev": 9.0}), ("oracle.failures", {"failures": None}),
    ("oracle.failures", {"failures": "none"}),
]


@pytest.mark.parametrize(("field", "change"), ORACLE_CASES)
def test_the_oracle_counters_are_checked(digits, trained, field, change):
    msg = _refused(digits, {**trained, "oracle": {**trained["oracle"], **change}}, field)
    if change.get("nfev") == -1000000:
        assert "field oracle.nfev is -1000000, not an int >= 0" in msg


FAILURE_BAD = {"index": [-1, 9, "4", None], "kind": ["crash", 3, None], "message": [None, 3],
               "value": ["nan", [1.0], True], "attempts": [0, -1, 1.5, "2"], "resolved": [1, "yes", None]}


@pytest.mark.parametrize(("key", "bad"), [(k, v) for k, vs in FAILURE_BAD.items() for v in vs])
def test_each_failure_record_field_is_checked(digits, trained, key, bad):
    failure = {**trained["oracle"]["failures"][0], key: bad}
    oracle = {**trained["oracle"], "failures": [failure]}
    _refused(digits, {**trained, "oracle": oracle}, rf"oracle\.failures\[0\]\.{key}")


@pytest.mark.parametrize("key", ["index", "kind", "message", "value", "attempts", "resolved"])
def test_a_failure_record_without_a_field_or_with_an_extra_one_is_refused(digits, trained, key):
    failure = {k: v for k, v in trained["oracle"]["failures"][0].items() if k != key}
    msg = _refused(digits, {**trained, "oracle": {**trained["oracle"], "failures": [failure]}},
                   r"oracle\.failures\[0\]")
    assert f"no {key}" in msg
    failure = {**trained["oracle"]["failures"][0], "extra": 1}
    _refused(digits, {**trained, "oracle": {**trained["oracle"], "failures": [failure, 3]}}, r"oracle\.failures\[0\]")


def test_a_bad_checkpoint_file_is_named_with_the_field(digits, trained, tmp_path):
    t = _trainer(digits, tmp_path)
    bad = {**trained, "oracle": {**trained["oracle"], "nfev": -1000000}}
    pt = save_checkpoint(tmp_path / "checkpoints", bad, {}, tag=3)
    before = _snapshot(t)
    with pytest.raises(CheckpointError) as info:
        t.resume()
    assert str(info.value).startswith(f"{pt}: field oracle.nfev is -1000000, not an int >= 0")
    _same(_snapshot(t), before)
    save_checkpoint(tmp_path / "checkpoints", trained, {}, tag=4)
    assert t.resume() and t.global_step == 3


def test_a_finished_run_state_is_not_rewound(digits, trained):
    """``epoch=-5`` used to train a finished run again."""
    msg = _refused(digits, {**trained, "epoch": -5}, "epoch")
    assert "field epoch is -5, not an int >= 0" in msg


def test_a_sparse_mask_state_is_checked(digits, tmp_path):
    layout = ParamLayout.from_tensors(list(digits_mlp(hidden=8).named_parameters()))

    def sparse():
        from zoblackbox.sparsity import SparseSchedule

        return SparseSchedule(CoordinateSampler(layout, uniform_ratios(layout, 0.5), seed=2), interval=1, unit="step")

    t = _trainer(digits, sparse=sparse(), budget=None)
    t.fit()
    state = t.state_dict()
    for change, field in (({"sampler": {}}, r"sparse\.sampler"), ({"drawn_at": "1"}, r"sparse\.drawn_at"),
                          ({"coords": state["sparse"]["coords"].flip(0)}, r"sparse\.coords"),
                          ({"sampler": {"generator": torch.zeros(5056, dtype=torch.uint8)}}, r"sparse\.sampler")):
        other = _trainer(digits, sparse=sparse(), budget=None)
        with pytest.raises(CheckpointError, match=field):
            other.load_state_dict({**state, "sparse": {**state["sparse"], **change}})
        assert other.coords is None and other.epoch == 0 and other.engine.nfev == 0
    other = _trainer(digits, sparse=sparse(), budget=None)
    with pytest.raises(CheckpointError, match="field sparse is missing"):
        other.load_state_dict({k: v for k, v in state.items() if k != "sparse"})


# ------------------------------------------------------------------------------------------ small objects
GEN_BAD = [({}, "is missing"), ([1], "not a dict"), ({"generator": torch.zeros(3, dtype=torch.uint8)}, "shape"),
           ({"generator": torch.zeros(5056)}, "float32 tensor"), ({"generator": "x"}, "'x'"),
           ({"generator": torch.zeros(5056, dtype=torch.uint8)}, "not a random generator's state")]


@pytest.mark.parametrize(("state", "match"), GEN_BAD)
def test_estimator_generator_state_is_checked(state, match):
    est = RandomEstimator(q=2, seed=3)
    before = est.generator.get_state()
    with pytest.raises(CheckpointError, match=r"field estimator(\.generator)?\b.*" + match):
        est.load_state_dict(state)
    assert torch.equal(est.generator.get_state(), before)
    est.load_state_dict(RandomEstimator(q=2, seed=4).state_dict())


@pytest.mark.parametrize(("state", "match"), GEN_BAD)
def test_sampler_generator_state_is_checked(state, match):
    layout = ParamLayout.from_tensors({"w": torch.zeros(20)})
    sampler = CoordinateSampler(layout, uniform_ratios(layout, 0.5), seed=1)
    before = sampler.generator.get_state()
    with pytest.raises(CheckpointError, match=r"field sampler(\.generator)?\b.*" + match):
        sampler.load_state_dict(state)
    assert torch.equal(sampler.generator.get_state(), before)


def _oracle(budget=10):
    o = FunctionOracle(lambda x: float(x.sum()), 3, budget=budget, on_failure="skip")
    o.evaluate(torch.ones(2, 3))
    return o


def _failure(**change):
    return {"index": 0, "kind": "exception", "message": "query #0 raised", "value": None, "attempts": 1,
            "resolved": False, **change}


@pytest.mark.parametrize(("state", "field"), [
    ({"failures": []}, "oracle.nfev"), ({"nfev": 1}, "oracle.failures"), ({"nfev": -1, "failures": []}, "oracle.nfev"),
    ({"nfev": 11, "failures": []}, "oracle.nfev"), ({"nfev": True, "failures": []}, "oracle.nfev"),
    ({"nfev": 2, "failures": [_failure(index=2)]}, r"oracle.failures\[0\].index"),
    ({"nfev": 0, "failures": [_failure()]}, r"oracle.failures\[0\].index"),
    ({"nfev": 2, "failures": [_failure(kind="boom")]}, r"oracle.failures\[0\].kind"),
    ({"nfev": 2, "failures": [_failure(), _failure(attempts=0)]}, r"oracle.failures\[1\].attempts"),
    ({"nfev": 2, "failures": [_failure(resolved=None)]}, r"oracle.failures\[0\].resolved"),
    ({"nfev": 2, "failures": [{**_failure(), "extra": 1}]}, r"oracle.failures\[0\]"),
    ([], "oracle"),
])
def test_oracle_state_is_checked(state, field):
    o = _oracle()
    with pytest.raises(CheckpointError, match=rf"field {field}(?![\w.])"):
        o.load_state_dict(state)
    assert o.nfev == 2 and o.failures == []
    o.load_state_dict({"nfev": 5, "failures": [_failure(index=4, value=math.inf, kind="nonfinite")]})
    assert o.nfev == 5 and o.failures[0].value == math.inf


_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 20), st.floats(allow_nan=True), st.text(max_size=3),
                    st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nfev=_values, failure=st.dictionaries(st.sampled_from(["index", "kind", "message", "value", "attempts",
                                                              "resolved", "other"]), _values))
@example(nfev=3, failure=_failure())
def test_any_oracle_state_loads_or_is_refused_with_a_checkpoint_error(nfev, failure):
    o = _oracle()
    try:
        o.load_state_dict({"nfev": nfev, "failures": [failure]})
    except CheckpointError as exc:
        assert "field oracle" in str(exc)
        assert o.nfev == 2 and o.failures == []
    else:
        assert o.nfev == nfev and o.failures[0].as_dict() == failure


# ------------------------------------------------------------------------------------------ gym
def _gym():
    pytest.importorskip("gymnasium")
    from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy

    return GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, seed=0, obs_norm="running", max_episodes=50)


GYM_FIELDS = ["env_id", "seed", "episodes_per_query", "batch", "batch_used", "extra_episodes", "env_steps",
              "vector_steps", "eval_episodes", "eval_env_steps", "obs_norm", "obs_stats", "pending_obs_stats",
              "nfev", "failures"]
GYM_BAD = [("env_id", "Pendulum-v1"), ("episodes_per_query", 2), ("obs_norm", None), ("seed", -1), ("batch", "1"),
           ("batch_used", 1), ("env_steps", -3), ("nfev", 51), ("extra_episodes", 1.0),
           ("obs_stats.count", -1), ("obs_stats.mean", [0.0] * 3), ("obs_stats.mean", [math.nan] * 4),
           ("obs_stats.m2", [-1.0] * 4), ("obs_stats.m2", "abcd"), ("pending_obs_stats.count", 2.5)]


@pytest.fixture(scope="module")
def gym_state():
    o = _gym()
    o.evaluate(torch.zeros(2, o.dim))
    o.evaluate(torch.zeros(2, o.dim))
    return o.state_dict()


def _gym_refused(state, field):
    o = _gym()
    before = (o.nfev, o.seed, o.obs_stats.count, o.obs_stats.mean.copy(), o._batch, o.env_steps)
    with pytest.raises(CheckpointError, match=rf"field (oracle\.)?{field}\b"):
        o.load_state_dict(state)
    after = (o.nfev, o.seed, o.obs_stats.count, o.obs_stats.mean.copy(), o._batch, o.env_steps)
    assert all(bool((a == b).all()) if hasattr(a, "all") else a == b for a, b in zip(before, after))


@pytest.mark.parametrize("field", GYM_FIELDS)
def test_gym_state_without_a_field_is_refused(gym_state, field):
    _gym_refused({k: v for k, v in gym_state.items() if k != field}, field)


@pytest.mark.parametrize(("field", "bad"), GYM_BAD)
def test_gym_state_with_a_bad_field_is_refused(gym_state, field, bad):
    state = copy.deepcopy(gym_state)
    top, _, sub = field.partition(".")
    if sub:
        state[top][sub] = bad
    else:
        state[top] = bad
    _gym_refused(state, field.replace(".", r"\."))


def test_gym_state_roundtrip(gym_state):
    o = _gym()
    o.load_state_dict(gym_state)
    assert o.nfev == gym_state["nfev"] and o.obs_stats.count == gym_state["obs_stats"]["count"]


# ------------------------------------------------------------------------------------------ checkpoint files
class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _payloads():
    good = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, good)
    good = good.getvalue()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("hello.txt", "hi")
    listed = io.BytesIO()
    torch.save([1, 2], listed)
    return {"empty": b"", "truncated": good[: len(good) // 2], "random": os.urandom(256), "one byte": b"\x80",
            "text": b"hello world", "json": b'{"w": [1, 2]}', "foreign zip": archive.getvalue(),
            "pickle of None": pickle.dumps(None), "a list": listed.getvalue()}


def _write_payload(directory, payload):
    pt = save_checkpoint(directory, {"w": torch.zeros(3)}, {}, tag=1)
    pt.write_bytes(payload)
    js = pt.parent / "ckpt-000000001.json"  # a same-tag save names its payload ckpt-000000001.<sha>.pt
    meta = json.loads(js.read_text())
    js.write_text(json.dumps({**meta, "sha256": hashlib.sha256(payload).hexdigest()}))
    return pt


@pytest.mark.parametrize("name", list(_payloads()))
def test_corrupt_or_foreign_payloads_are_named_so(tmp_path, name):
    pt = _write_payload(tmp_path, _payloads()[name])
    with pytest.raises(CheckpointError, match=f"{pt} is corrupt or not a zoblackbox checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL, "torch"])
def test_pickled_objects_are_still_refused_as_such(tmp_path, protocol, capsys):
    if protocol == "torch":
        buf = io.BytesIO()
        torch.save({"w": _Evil()}, buf)
        payload = buf.getvalue()
    else:
        payload = pickle.dumps({"w": _Evil()}, protocol=protocol)
    pt = _write_payload(tmp_path, payload)
    with pytest.raises(CheckpointError, match=f"refusing to load {pt}: it holds objects other than tensors"):
        load_checkpoint(tmp_path)
    assert "pwned" not in capsys.readouterr().out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=80))
@example(payload=b"N.")
@example(payload=b"PK\x03\x04")
def test_any_garbage_payload_is_a_checkpoint_error_naming_the_file(tmp_path, payload):
    pt = _write_payload(tmp_path, payload)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    msg = str(info.value)
    assert str(pt) in msg and ("corrupt or not a zoblackbox checkpoint" in msg or "holds objects other" in msg)


# ------------------------------------------------------------------------------------------ divergence
def test_a_divergent_run_says_so_and_names_the_step_size(digits, caplog):
    t = _trainer(digits, optimizer="adam", lr=1e308, budget=None)
    summary = t.fit()
    reason = summary["stop_reason"]
    assert "query budget" not in reason
    assert "non-finite" in reason and f"after step {summary['steps']}" in reason and "lr=1e+308" in reason
    assert "step size" in reason and summary["success"] is False and summary["message"] == reason
    assert all(torch.isfinite(p).all() for p in t.model.parameters())  # the last finite parameters are kept


_any = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=4), st.lists(st.floats(allow_nan=False, width=32), max_size=3),
                 st.dictionaries(st.sampled_from(["nfev", "failures", "x"]), st.integers(-2, 20), max_size=3),
                 st.builds(lambda n, dt: torch.zeros(n, dtype=dt), st.integers(0, 6),
                           st.sampled_from([torch.uint8, torch.float32, torch.long])))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(TOP_FIELDS), value=_any)
def test_any_value_of_a_trainer_field_loads_or_is_refused_naming_it(digits, trained, field, value):
    t = _trainer(digits)
    before = _snapshot(t)
    try:
        t.load_state_dict({**trained, field: value})
    except CheckpointError as exc:
        assert f"field {field}" in str(exc)
        _same(_snapshot(t), before)


@pytest.mark.parametrize("field, delta", [("epoch", -1), ("batch_in_epoch", -1), ("global_step", 1)])
def test_contradicting_counters_name_the_changed_field(digits, trained, field, delta):
    """Hypothesis found it: a changed epoch was refused naming only global_step. Any of the three
    counters may be the wrong one, so the message names all three."""
    t = _trainer(digits)
    before = _snapshot(t)
    value = trained[field] + delta
    assert value >= 0
    with pytest.raises(CheckpointError, match=f"field {field}"):
        t.load_state_dict({**trained, field: value})
    _same(_snapshot(t), before)
