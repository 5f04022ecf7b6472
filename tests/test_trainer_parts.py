"""The pieces around the Trainer's loop (zoblackbox.trainer_parts), each in isolation, and user
parts attached to a real Trainer."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from zoblackbox import CheckpointError, ConfigError, RandomEstimator, Trainer
from zoblackbox.data import load_digits_split, make_loader
from zoblackbox.models import digits_mlp
from zoblackbox.oracle import FailurePolicy, QueryFailure
from zoblackbox.params import ParamLayout
from zoblackbox.sparsity import CoordinateSampler, SparseSchedule, uniform_ratios
from zoblackbox.trainer_parts import (
    EpochProgress,
    FailureLog,
    MaskRedraw,
    MetricsLog,
    TrainerCheckpoints,
    TrainerPart,
    check_parts,
)

LAYOUT = ParamLayout.from_tensors({"w": torch.zeros(4, 5), "b": torch.zeros(5)})


def _schedule(unit="epoch", interval=2, freeze=False, seed=1):
    return SparseSchedule(CoordinateSampler(LAYOUT, uniform_ratios(LAYOUT, 0.5), seed=seed), interval=interval,
                          unit=unit, freeze_inactive=freeze)


class _FakeTrainer(SimpleNamespace):
    """The attributes the parts read, and a loop that advances them like Trainer.fit."""

    def __init__(self, **kw):
        defaults = {"epoch": 0, "global_step": 0, "batch_in_epoch": 0, "epochs": 3, "steps_per_epoch": 3,
                    "method": "zo", "queries": 0, "history": [], "saved": [],
                    "engine": SimpleNamespace(coords=None, freeze=None)}
        super().__init__(**{**defaults, **kw})

    def flat_params(self):
        return torch.arange(float(LAYOUT.dim))

    def save_checkpoint(self):
        self.saved.append((self.epoch, self.global_step, self.batch_in_epoch))

    def run(self, part, steps, on_step=None):
        """``steps`` steps of the loop, calling the part's step hooks; epochs end after steps_per_epoch."""
        for _ in range(steps):
            part.before_step(self)
            if on_step is not None:
                on_step(self)
            self.global_step += 1
            self.batch_in_epoch += 1
            part.after_step(self, 0.5)
            if self.batch_in_epoch == self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                part.on_epoch_end(self, {"epoch": self.epoch})


def _draws(mask, trainer, steps):
    """The (epoch, batch, global_step) of every step that drew a new mask."""
    drawn = []
    count = [0]
    sample = mask.schedule.sampler.sample

    def counting(x=None):
        count[0] += 1
        return sample(x)

    mask.schedule.sampler.sample = counting

    def on_step(t):
        if count[0] != len(drawn):
            drawn.append((t.epoch, t.batch_in_epoch, t.global_step))
        assert torch.equal(t.engine.coords, mask.coords)

    trainer.run(mask, steps, on_step)
    return drawn


# ---------------------------------------------------------------------------------------------- MaskRedraw
def test_mask_redraws_at_epoch_interval_boundaries_only():
    mask = MaskRedraw(_schedule("epoch", 2), LAYOUT)
    t = _FakeTrainer()
    assert _draws(mask, t, 5 * 3) == [(0, 0, 0), (2, 0, 6), (4, 0, 12)]
    assert mask.drawn_at == 4


def test_mask_redraws_every_interval_steps():
    mask = MaskRedraw(_schedule("step", 3), LAYOUT)
    assert _draws(mask, _FakeTrainer(), 10) == [(0, 0, 0), (1, 0, 3), (2, 0, 6), (3, 0, 9)]
    mask = MaskRedraw(_schedule("step", 1), LAYOUT)
    assert len(_draws(mask, _FakeTrainer(), 7)) == 7


def test_mask_resumed_mid_epoch_keeps_its_mask_and_redraws_on_schedule():
    ref = MaskRedraw(_schedule("epoch", 1), LAYOUT)
    t = _FakeTrainer()
    t.run(ref, 4)  # epoch 1, batch 1: the mask of epoch 1 is drawn
    state = ref.state_dict()
    ref_next = _draws(ref, t, 6)
    coords_after = ref.coords.clone()

    mask = MaskRedraw(_schedule("epoch", 1), LAYOUT)  # a fresh sampler: its generator is restored
    mask.load_state_dict(state)
    assert torch.equal(mask.coords, torch.as_tensor(state["coords"])) and mask.drawn_at == 1
    resumed = _FakeTrainer(epoch=1, global_step=4, batch_in_epoch=1)
    assert _draws(mask, resumed, 6) == ref_next == [(2, 0, 6), (3, 0, 9)]
    assert torch.equal(mask.coords, coords_after)


def test_mask_is_set_on_the_engine_with_its_freeze_mask():
    for freeze in (False, True):
        mask = MaskRedraw(_schedule("step", 2, freeze=freeze), LAYOUT)
        t = _FakeTrainer()
        mask.before_step(t)
        assert torch.equal(t.engine.coords, mask.coords) and mask.coords.numel() == mask.schedule.sampler.n_active
        if freeze:
            expected = torch.ones(LAYOUT.dim, dtype=torch.bool)
            expected[mask.coords] = False
            assert torch.equal(t.engine.freeze, expected)
        else:
            assert t.engine.freeze is None
        grad = torch.ones(LAYOUT.dim)
        mask.mask_gradient(grad)
        assert torch.equal(grad.nonzero().flatten(), mask.coords)


def test_mask_checks_its_schedule_and_its_state():
    with pytest.raises(TypeError, match="sparse must be a SparseSchedule"):
        MaskRedraw("every epoch", LAYOUT)
    other = ParamLayout.from_tensors({"w": torch.zeros(3)})
    with pytest.raises(ConfigError, match="does not match"):
        MaskRedraw(_schedule(), other)
    mask = MaskRedraw(_schedule("step", 1), LAYOUT)
    mask.before_step(_FakeTrainer())
    good = mask.state_dict()
    n = mask.schedule.sampler.n_active
    for change, match in (({"drawn_at": "3"}, "counter '3'"), ({"drawn_at": True}, "counter True"),
                          ({"drawn_at": -2}, "counter -2"),
                          ({"coords": torch.tensor([0, LAYOUT.dim])}, "not indices into 25"),
                          ({"coords": torch.tensor([0.0, 1.0])}, "not indices"),
                          ({"coords": torch.arange(n - 1)}, f"has {n - 1} coordinates, but this sampler draws {n}"),
                          ({"sampler": {"generator": torch.zeros(3, dtype=torch.uint8)}}, "sampler's state")):
        fresh = MaskRedraw(_schedule("step", 1), LAYOUT)
        with pytest.raises(CheckpointError, match=match):
            fresh.load_state_dict({**good, **change})
        assert fresh.coords is None and fresh.drawn_at == -1  # nothing half-loaded
    with pytest.raises(CheckpointError, match="lacks 'coords'"):
        mask.load_state_dict({"sampler": good["sampler"], "drawn_at": 0})
    fresh = MaskRedraw(_schedule("step", 1), LAYOUT)
    fresh.load_state_dict({**good, "coords": torch.empty(0)})  # saved before the first draw
    assert fresh.coords is None


# ---------------------------------------------------------------------------------------------- logs
def test_metrics_log_appends_and_is_cut_back_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    t = _FakeTrainer()
    log.on_fit_start(t)
    log.on_resume(t)  # nothing written yet: nothing created
    assert not log.path.exists()
    records = [{"epoch": i, "loss": 1.0 / i} for i in (1, 2, 3)]
    for r in records:
        log.on_epoch_end(t, r)
    assert [json.loads(line) for line in log.path.read_text().splitlines()] == records
    t.history = records[:2]  # the checkpoint saw two epochs; the third line is from after it
    log.on_resume(t)
    assert [json.loads(line) for line in log.path.read_text().splitlines()] == records[:2]
    assert not list(log.path.parent.glob("*.tmp"))


def _failure(i, kind="exception"):
    return QueryFailure(index=i, kind=kind, message=f"query #{i} failed", value=None)


def test_failure_log_writes_each_failure_once_with_its_step(tmp_path, caplog):
    oracle = SimpleNamespace(failures=[], policy=FailurePolicy("skip"))
    log = FailureLog(oracle, tmp_path / "failures.jsonl")
    t = _FakeTrainer()
    log.on_epoch_start(t)
    oracle.failures += [_failure(0), _failure(1)]
    t.global_step = 1
    log.after_step(t, 0.5)
    t.global_step = 2
    log.after_step(t, 0.5)  # nothing new
    oracle.failures.append(_failure(7, "nonfinite"))
    t.global_step, t.epoch = 3, 1
    log.after_step(t, 0.5)
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["index"], r["kind"]) for r in lines] == [
        (1, 1, 0, "exception"), (1, 1, 1, "exception"), (3, 2, 7, "nonfinite")]
    with caplog.at_level(logging.WARNING, logger="zoblackbox.train"):
        log.on_epoch_end(t, {"epoch": 2, "failures": {"failed_queries": 3}})
        log.on_fit_end(t, {"stop_reason": "completed", "failures": {"failed_queries": 3}})
    assert "epoch 2: 3 failed queries under" in caplog.text and "with 3 failed queries" in caplog.text

    # resume from a checkpoint of step 2: the records of step 3 (and a line cut short) go
    with log.path.open("a") as fh:
        fh.write('{"step": 4, "ind')
    t.global_step = 2
    log.on_resume(t)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 1]
    oracle.failures[:] = oracle.failures[:2]  # the oracle's state of the checkpoint
    log.on_load(t)
    assert log.logged == 2


def test_failure_log_notes_the_step_that_raised(tmp_path):
    oracle = SimpleNamespace(failures=[_failure(3)], policy=FailurePolicy("raise"))
    log = FailureLog(oracle)  # no file: failures are only logged
    exc = RuntimeError("query #3 failed")
    log.on_step_error(_FakeTrainer(global_step=5, epoch=1), exc)
    assert log.logged == 1
    assert any("training stopped in step 6 (epoch 2) under the 'raise' failure policy" in n for n in exc.__notes__)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_due_at_epoch_ends_and_every_n_steps():
    ck = TrainerCheckpoints("unused", every=2, every_steps=3)
    t = _FakeTrainer(epochs=3, steps_per_epoch=4)
    t.run(ck, 12)
    # steps 3, 6, 9 mid-epoch; epoch 2 (every=2) and epoch 3 (the last) at their ends; step 12 is the
    # last step of the last epoch, whose epoch-end checkpoint follows: not saved twice
    assert t.saved == [(0, 3, 3), (1, 6, 2), (2, 8, 0), (2, 9, 1), (3, 12, 0)]
    ck = TrainerCheckpoints("unused", every=2, every_steps=4)
    t = _FakeTrainer(epochs=3, steps_per_epoch=4)
    t.run(ck, 12)  # step 4 ends epoch 1, which has no epoch checkpoint: the step one is written
    assert t.saved == [(0, 4, 4), (2, 8, 0), (3, 12, 0)]
    t = _FakeTrainer(epochs=3, steps_per_epoch=4)
    TrainerCheckpoints("unused").on_epoch_end(t, {})
    t.run(TrainerCheckpoints("unused"), 8)
    assert t.saved == [(0, 0, 0), (1, 4, 0), (2, 8, 0)]


def test_checkpoints_save_and_load_the_trainer_state(tmp_path):
    ck = TrainerCheckpoints(tmp_path / "ckpt")
    assert not ck.exists()
    t = _FakeTrainer(epoch=1, global_step=5, batch_in_epoch=2, queries=40)
    t.state_dict = lambda: {"w": torch.arange(3.0), "epoch": 1}
    ck.save(t)
    state, meta = ck.load()
    assert ck.exists() and torch.equal(state["w"], torch.arange(3.0))
    assert (meta["epoch"], meta["step"], meta["batch_in_epoch"], meta["method"], meta["queries"]) == (1, 5, 2, "zo", 40)


# ---------------------------------------------------------------------------------------------- on a Trainer
@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


class Recorder(TrainerPart):
    """Counts every hook, and is checkpointed under "recorder"."""

    state_key = "recorder"

    def __init__(self):
        self.calls, self.steps, self.resumed = [], 0, 0

    def on_fit_start(self, trainer):
        self.calls.append("fit")

    def on_epoch_start(self, trainer):
        self.calls.append(("epoch", trainer.epoch, trainer.batch_in_epoch))

    def before_step(self, trainer):
        self.before = (trainer.global_step, trainer.batch_in_epoch)

    def after_step(self, trainer, loss):
        assert (trainer.global_step - 1, trainer.batch_in_epoch - 1) == self.before
        assert isinstance(loss, float)
        self.steps += 1
        self.calls.append(("step", trainer.global_step))

    def on_epoch_end(self, trainer, record):
        assert trainer.history[-1] is record
        self.calls.append(("end", record["epoch"]))

    def on_fit_end(self, trainer, summary):
        self.calls.append(("done", summary["steps"]))

    def on_resume(self, trainer):
        self.resumed += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def _trainer(digits, out=None, parts=None, epochs=2, progress=False, **kw):
    torch.manual_seed(0)
    model = digits_mlp(hidden=8)
    train = make_loader(digits.x_train[:128], digits.y_train[:128], 64, shuffle=True, seed=1)
    return Trainer(model, train, None, estimator=RandomEstimator(q=2, seed=0), lr=0.05, epochs=epochs,
                   output_dir=out, progress=progress, parts=parts, **kw)


def test_a_part_attached_to_a_trainer_sees_every_step_and_is_checkpointed(digits, tmp_path):
    rec = Recorder()
    t = _trainer(digits, tmp_path, parts=[rec], checkpoint_every_steps=3)
    assert t.parts[-2] is rec and t.parts[-1] is t.checkpoints  # after the built-in parts, before checkpoints
    summary = t.fit()
    assert rec.calls == ["fit", ("epoch", 0, 0), ("step", 1), ("step", 2), ("end", 1),
                         ("epoch", 1, 0), ("step", 3), ("step", 4), ("end", 2), ("done", 4)]
    assert rec.steps == summary["steps"] == 4

    # killed after the mid-epoch checkpoint of step 3: the part's state comes back with the run
    again = Recorder()
    resumed = _trainer(digits, tmp_path, parts=[again], checkpoint_every_steps=3)
    state = resumed.checkpoints.load()[0]
    assert state["recorder"] == {"steps": 4}
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000000003.json"}))
    assert resumed.resume() and again.steps == 3 and again.resumed == 1
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.global_step) == (1, 1, 3)
    resumed.fit()
    assert again.calls == ["fit", ("epoch", 1, 1), ("step", 4), ("end", 2), ("done", 4)] and again.steps == 4
    for p, q in zip(t.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_parts_are_checked(digits):
    class NoHooks:
        pass

    with pytest.raises(TypeError, match="implements at least one of"):
        _trainer(digits, parts=[NoHooks()])
    with pytest.raises(TypeError, match="parts must be a list"):
        _trainer(digits, parts="recorder")
    for key in ("model", "sparse", 3):
        part = Recorder()
        part.state_key = key
        with pytest.raises(ConfigError, match=f"state_key {key!r}"):
            _trainer(digits, parts=[part])
    with pytest.raises(ConfigError, match="'recorder', which is taken"):
        check_parts([Recorder(), Recorder()])
    duck = SimpleNamespace(steps=0)
    duck.after_step = lambda trainer, loss: setattr(duck, "steps", duck.steps + 1)  # no base class needed
    _trainer(digits, parts=[duck], epochs=1).fit()
    assert duck.steps == 2


def test_trainer_state_with_bad_counters_is_refused(digits, tmp_path):
    t = _trainer(digits, tmp_path)
    t.fit()
    state = t.state_dict()
    for key, bad in (("epoch", -1), ("epoch", "2"), ("global_step", True), ("global_step", 2.0)):
        with pytest.raises(CheckpointError, match=rf"{key} is {bad!r}, not an int >= 0"):
            _trainer(digits).load_state_dict({**state, key: bad})
    with pytest.raises(CheckpointError, match="after batch 7 of an epoch"):
        _trainer(digits).load_state_dict({**state, "batch_in_epoch": 7})
    with pytest.raises(CheckpointError, match="must be a dict"):
        _trainer(digits).load_state_dict([state])


def test_sparse_trainer_checkpoints_its_mask(digits, tmp_path):
    torch.manual_seed(0)
    layout = ParamLayout.from_tensors(list(digits_mlp(hidden=8).named_parameters()))

    def sparse():
        return SparseSchedule(CoordinateSampler(layout, uniform_ratios(layout, 0.5), seed=2), interval=1, unit="step")

    t = _trainer(digits, tmp_path, sparse=sparse())
    t.fit()
    assert t.mask in t.parts and torch.equal(t.engine.coords, t.coords)
    state = t.state_dict()
    assert torch.equal(state["sparse"]["coords"], t.coords) and state["sparse"]["drawn_at"] == 3
    other = _trainer(digits, sparse=sparse())
    other.load_state_dict(state)
    assert torch.equal(other.coords, t.coords)
    bad = {**state, "sparse": {**state["sparse"], "coords": t.coords[:-1]}}
    with pytest.raises(CheckpointError, match="sampler draws"):
        _trainer(digits, sparse=sparse()).load_state_dict(bad)


def test_progress_prints_one_line_per_epoch(digits, capsys):
    t = _trainer(digits, epochs=2, progress=True)
    progress = t.parts[0]
    assert isinstance(progress, EpochProgress)
    t.fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"] and "queries 6" in lines[0]
    assert progress.bar is None  # closed
    assert not any(isinstance(p, EpochProgress) for p in _trainer(digits).parts)
