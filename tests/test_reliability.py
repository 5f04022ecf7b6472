"""Reliability and safety under faults: exact resume, fault injection, worker loss, safe loading.

Everything here uses the real components: a training run killed with SIGKILL in a real subprocess,
a real SIGKILL inside each file write of a checkpoint, worker processes of a real
ProcessPoolScheduler and of a real Dask LocalCluster killed with ``os.kill``, and an oracle that
really raises, returns NaN/inf and hangs. Random choices (the step a run is killed at) print
their seed in the assertion messages; set ``ZOBLACKBOX_TEST_SEED`` to replay one.
"""

import collections
import hashlib
import json
import logging
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zoblackbox import CheckpointError, ConfigError, CoordinateEstimator, OracleError, RandomEstimator, Trainer
from zoblackbox.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from zoblackbox.cli import main
from zoblackbox.data import load_digits_split, make_loader
from zoblackbox.models import digits_mlp
from zoblackbox.params import ParamLayout
from zoblackbox.schedule import ProcessPoolScheduler, SerialScheduler
from zoblackbox.sparsity import CoordinateSampler, SparseSchedule, uniform_ratios
from zoblackbox.testing import Beacon, FaultyLoss, WorkerKiller, injected_counts

SEED = int(os.environ.get("ZOBLACKBOX_TEST_SEED", random.SystemRandom().randrange(2 ** 31)))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolScheduler(n_workers=2, timeout=0.5) as scheduler:
        yield scheduler


def _trainer(digits, out=None, *, n=256, batch=64, epochs=2, seed=0, hidden=16, estimator=None, **kw):
    torch.manual_seed(seed)
    model = digits_mlp(hidden=hidden)
    train = make_loader(digits.x_train[:n], digits.y_train[:n], batch, shuffle=True, seed=1)
    test = make_loader(digits.x_test, digits.y_test, 512, shuffle=False)
    kw.setdefault("lr", 0.05)
    return Trainer(model, train, test, estimator=estimator, epochs=epochs, output_dir=out, progress=False, **kw)


def _same_tensors(a: dict, b: dict) -> list[str]:
    """Names of the entries of two state dicts (nested) that are not bitwise equal."""
    bad = []
    for k in a.keys() | b.keys():
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            bad += [f"{k}.{n}" for n in _same_tensors(x, y)]
        elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                bad.append(str(k))
        elif x != y:
            bad.append(str(k))
    return bad


def _jsonl(path: Path, drop=("wall_s",)) -> list[dict]:
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- exact resume
def _latest_step(directory: Path):
    """The step of the newest complete checkpoint, ``None`` if there is none yet."""
    for _ in range(100):
        try:
            meta = latest_checkpoint(directory)
            return None if meta is None else json.loads(meta.read_text())["step"]
        except FileNotFoundError:  # pruned between reading latest.json and the metadata: read again
            continue
    raise AssertionError(f"could not read the latest checkpoint of {directory}")


CLI_RUN = ["train", "--model", "mlp", "--epochs", "2", "--batch-size", "256", "--lr", "0.02",
           "--sparsity", "0.5", "--ratios", "uniform", "--mask-interval", "1", "--warmup-epochs", "0.5",
           "--checkpoint-every-steps", "1", "--threads", "1", "--no-progress"]
CLI_STEPS = 2 * 6  # 1,437 training images in batches of 256: 6 steps an epoch


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, caplog):
    """`zoblackbox train` (CGE on the MLP, sparse masks redrawn every epoch, Adam, warm-up + cosine LR,
    a checkpoint every step) is killed with SIGKILL at a random moment after a random step; the
    same command with --resume continues from its last checkpoint and ends with parameters,
    optimizer state and metrics bitwise identical to an uninterrupted run."""
    rng = random.Random(SEED)
    after_step, delay = rng.randint(1, CLI_STEPS - 5), rng.uniform(0.0, 0.15)
    where = f"(seed {SEED}: kill {delay:.3f} s after checkpoint {after_step})"
    run, ref = tmp_path / "killed", tmp_path / "reference"
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "zoblackbox.cli", *CLI_RUN, "--out", str(run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while (_latest_step(run / "checkpoints") or 0) < after_step:
            assert proc.poll() is None, f"the run ended before step {after_step} {where}: " \
                                        f"{(tmp_path / 'stderr.txt').read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no checkpoint of step {after_step} after 240 s {where}"
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed {where}"
    killed_at = _latest_step(run / "checkpoints")
    assert after_step <= killed_at < CLI_STEPS, f"killed after checkpoint {killed_at} {where}"

    assert main([*CLI_RUN, "--out", str(ref)]) == 0
    with caplog.at_level(logging.INFO, logger="zoblackbox.train"):
        assert main([*CLI_RUN, "--out", str(run), "--resume"]) == 0
    assert f"step {killed_at}," in caplog.text, f"did not resume from the last checkpoint {where}"

    (done, meta), (expected, ref_meta) = load_checkpoint(run / "checkpoints"), load_checkpoint(ref / "checkpoints")
    assert meta["step"] == ref_meta["step"] == CLI_STEPS
    assert _same_tensors(done["model"], expected["model"]) == [], where
    assert _same_tensors(done["engine"]["boundary"]["rule"]["optimizer"],
                         expected["engine"]["boundary"]["rule"]["optimizer"]) == [], where
    assert done["oracle"]["nfev"] == expected["oracle"]["nfev"]
    assert _jsonl(run / "metrics.jsonl") == _jsonl(ref / "metrics.jsonl"), where  # no duplicated epoch records


class _Crash(Exception):
    """Stands for a crash of the training process (the subprocess test above uses a real SIGKILL)."""


def _sparse(layout, unit, interval, freeze=False):
    return SparseSchedule(CoordinateSampler(layout, uniform_ratios(layout, 0.5), seed=1), interval=interval,
                          unit=unit, freeze_inactive=freeze)


def _layout():
    torch.manual_seed(0)
    model = digits_mlp(hidden=16)
    return ParamLayout.from_tensors(list(model.named_parameters()))


CONFIGS = {
    # RGE (its own RNG), SGD + momentum, warm-up, step-wise masks with frozen inactive coordinates, and
    # epoch checkpoints every 2 epochs: an epoch record written after the last checkpoint must not repeat
    "rge-step-masks-sgd": {"estimator": lambda: RandomEstimator(q=10, seed=3), "optimizer": "sgd",
                           "optimizer_kwargs": {"momentum": 0.9}, "warmup_steps": 3, "every": 3,
                           "checkpoint_every": 2, "sparse": lambda: _sparse(_layout(), "step", 3, freeze=True),
                           "lose": "epoch-record"},
    # CGE, Adam + cosine, masks redrawn at epoch starts; step checkpoints that fall on the last batch of
    # an epoch (epoch checkpoints only every 3 epochs): the epoch is closed after the resume
    "cge-epoch-masks-adam": {"estimator": CoordinateEstimator, "every": 2, "checkpoint_every": 3,
                             "sparse": lambda: _sparse(_layout(), "epoch", 1), "lose": "epoch-record"},
    # autograd reference training
    "fo-adamw": {"method": "fo", "optimizer": "adamw", "every": 3},
    # a faulty black box under the skip policy: failure records and failures.jsonl resume exactly too
    "rge-faults-skip": {"estimator": lambda: RandomEstimator(q=20, seed=5), "every": 2, "lose": "failures",
                        "scheduler": SerialScheduler, "oracle_kwargs": {"on_failure": "skip"}},
}
STEPS_PER_EPOCH, EPOCHS = 4, 3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_after_a_crash_mid_epoch_is_bitwise_exact(digits, tmp_path, name):
    """A run with a checkpoint every few steps crashes after a random step chosen so that its last
    checkpoint is in the middle of an epoch and work was done after it (for two configurations:
    an epoch record, resp. failure records, written after it); a new Trainer resumes from that
    checkpoint and ends bitwise equal to an uninterrupted run: parameters, optimizer state, query
    count, failure records, metrics.jsonl and failures.jsonl (nothing written after the checkpoint
    is duplicated)."""
    cfg = dict(CONFIGS[name])
    every, lose = cfg.pop("every"), cfg.pop("lose", None)

    def build(out):
        kw = {k: (v() if callable(v) and k in ("estimator", "sparse", "scheduler") else v) for k, v in cfg.items()}
        t = _trainer(digits, out, epochs=EPOCHS, checkpoint_every_steps=every, **kw)
        if lose == "failures":
            t.zo.oracle.loss_fn = FaultyLoss(out / "injected.txt", hang_p=0.0, transient=False)
        return t

    ref = build(tmp_path / "ref")
    saved = []  # (step, batch_in_epoch) of every checkpoint the uninterrupted run writes
    save = ref.save_checkpoint
    ref.save_checkpoint = lambda: saved.append(json.loads(save().with_suffix(".json").read_text())) or None
    ref_summary = ref.fit()
    failed_steps = {r["step"] for r in _jsonl(tmp_path / "ref" / "failures.jsonl")}

    def last_checkpoint(k):
        return max(((m["step"], m["batch_in_epoch"]) for m in saved if m["step"] <= k), default=(0, 0))

    candidates = []
    for k in range(1, STEPS_PER_EPOCH * EPOCHS):
        last, batch = last_checkpoint(k)
        if not (0 < batch and last < k):
            continue
        if lose == "epoch-record" and k < last - batch + STEPS_PER_EPOCH:
            continue
        if lose == "failures" and not any(last < s <= k for s in failed_steps):
            continue
        candidates.append(k)
    assert candidates, saved
    crash_after = random.Random(f"{SEED}-{name}").choice(candidates)
    where = f"(seed {SEED}: crash after step {crash_after}, last checkpoint {last_checkpoint(crash_after)})"

    first = build(tmp_path / "run")
    step = first._step

    def crashing(xb, yb):
        if first.global_step == crash_after:
            raise _Crash
        return step(xb, yb)

    first._step = crashing
    with pytest.raises(_Crash):
        first.fit()
    resumed = build(tmp_path / "run")
    summary = resumed.fit(resume=True)

    assert _same_tensors(resumed.model.state_dict(), ref.model.state_dict()) == [], where
    assert _same_tensors(resumed.optimizer.state_dict()["state"], ref.optimizer.state_dict()["state"]) == [], where
    assert (summary["queries"], summary["steps"], summary["failures"]) == (
        ref_summary["queries"], ref_summary["steps"], ref_summary["failures"]), where
    assert _jsonl(tmp_path / "run" / "metrics.jsonl") == _jsonl(tmp_path / "ref" / "metrics.jsonl"), where
    assert len(_jsonl(tmp_path / "ref" / "metrics.jsonl")) == EPOCHS
    assert _jsonl(tmp_path / "run" / "failures.jsonl") == _jsonl(tmp_path / "ref" / "failures.jsonl"), where
    if lose == "failures":
        assert ref_summary["failures"]["failed_queries"] > 0  # the faults really happened
        records = [json.dumps([f.as_dict() for f in t.zo.oracle.failures]) for t in (resumed, ref)]
        assert records[0] == records[1]  # (as JSON: NaN values compare equal)


WRITER = textwrap.dedent("""
    import itertools, json, os, signal, sys
    import torch
    from zoblackbox.checkpoint import save_checkpoint

    root = sys.argv[1]
    saves = [(1, "A"), (2, "B"), (2, "C")]  # the third rewrites tag 2
    real_replace, real_fsync = os.replace, os.fsync
    out = []
    for point in itertools.count():
        for phase in ("in-write", "after-rename"):
            directory = os.path.join(root, f"{point:02d}-{phase}")
            pid = os.fork()
            if pid == 0:
                renames = [0]
                log = os.open(directory + ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)

                def fsync(fd):
                    if renames[0] == point and phase == "in-write":  # temp file written, not yet renamed
                        os.kill(os.getpid(), signal.SIGKILL)
                    real_fsync(fd)

                def replace(src, dst):
                    real_replace(src, dst)
                    renames[0] += 1
                    if renames[0] == point + 1 and phase == "after-rename":
                        os.kill(os.getpid(), signal.SIGKILL)

                os.fsync, os.replace = fsync, replace
                for tag, label in saves:
                    os.write(log, f"start {tag} {label}\\n".encode())
                    state = {"w": torch.full((4096,), float(ord(label))), "label": label}
                    save_checkpoint(directory, state, {"label": label}, tag=tag)
                    os.write(log, f"done {tag} {label}\\n".encode())
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            out.append([directory, killed])
        if not killed:  # the kill point lies past the last write of the sequence
            break
    print(json.dumps(out))
""")


def test_sigkill_inside_any_checkpoint_write_keeps_the_last_good_checkpoint(tmp_path):
    """Three saves (tag 1 = A, tag 2 = B, then tag 2 rewritten with C), each file written to a
    temporary name and renamed. A process is SIGKILLed inside every write (temporary file written,
    not yet renamed) and right after every rename. Afterwards the directory always loads, without
    error, a complete checkpoint, never a mix of two: the last completed save, or the one in
    flight; while tag 2 is being rewritten, possibly the previous tag (A), since B's files are
    being replaced. The next save works and removes the killed writer's temporary files."""
    proc = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(proc.stdout)
    killed = [directory for directory, was_killed in cases if was_killed]
    # every write (at least 3 files a save) was hit in both phases; past the last one, no kill
    assert len(killed) == len(cases) - 2 >= 2 * 9 and cases[-1][1] is cases[-2][1] is False, cases
    for directory in killed:
        events = [line.split() for line in Path(directory + ".log").read_text().splitlines()]
        done = [(int(tag), label) for what, tag, label in events if what == "done"]
        started = [(int(tag), label) for what, tag, label in events if what == "start"]
        in_flight = started[-1] if len(started) > len(done) else None
        allowed = {in_flight[1]} if in_flight else set()
        if done:
            last_tag, last_label = done[-1]
            allowed.add(last_label)
            if in_flight and in_flight[0] == last_tag:  # a rewrite: the files of last_tag are being replaced
                allowed |= {label for tag, label in done if tag < last_tag}
        if latest_checkpoint(directory) is None:
            assert not done, (directory, events)
            continue
        state, meta = load_checkpoint(directory)  # never a CheckpointError
        assert state["label"] == meta["label"] and state["label"] in allowed, (directory, events, state["label"])
        assert torch.equal(state["w"], torch.full((4096,), float(ord(state["label"]))))
        save_checkpoint(directory, {"w": torch.zeros(1)}, {}, tag=3)
        assert not list(Path(directory).glob("*.tmp")), directory
        assert load_checkpoint(directory)[0]["w"].tolist() == [0.0]


def test_checkpoint_every_steps_is_validated(digits, tmp_path, capsys):
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match=rf"checkpoint_every_steps must be an int >= 1 or None, got {bad!r}"):
            _trainer(digits, tmp_path, checkpoint_every_steps=bad)
    with pytest.raises(SystemExit):
        main(["train", "--checkpoint-every-steps", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    # a mid-epoch checkpoint cannot be resumed with a loader that has fewer batches per epoch
    t = _trainer(digits, tmp_path / "r", estimator=RandomEstimator(q=4), checkpoint_every_steps=3)
    t.epochs = 1
    t.fit()  # 4 steps an epoch: a checkpoint after step 3, then the epoch-end one
    state, _ = load_checkpoint(tmp_path / "r" / "checkpoints" / "ckpt-000000003.json")
    assert state["batch_in_epoch"] == 3
    other = _trainer(digits, tmp_path / "o", batch=128, estimator=RandomEstimator(q=4))
    with pytest.raises(CheckpointError, match="after batch 3 of an epoch, but this train_loader has 2 batches"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- failure policies
@pytest.mark.parametrize("policy", ["retry", "inf", "skip"])
def test_failure_policies_under_load_complete_and_account_for_every_failure(digits, pool, tmp_path, caplog, policy):
    """Digits training (RGE, q=20) through the 2-worker process pool with a 0.5 s per-query
    timeout, the black box raising on 5% of queries, returning NaN/inf on 5% and hanging on 1%:
    the run completes and learns; every injected fault is a counted query and a failure record
    (by kind for inf/skip; failed attempts for retry), a line of failures.jsonl, part of the epoch
    metrics, a logged warning and the final report. With retry, when every failure was resolved,
    the parameters are bitwise those of the same run without faults."""
    out = tmp_path / policy
    t = _trainer(digits, out, n=512, estimator=RandomEstimator(q=20, seed=0), lr=0.1, lr_schedule="constant",
                 scheduler=pool, oracle_kwargs={"on_failure": policy})
    t.zo.oracle.loss_fn = FaultyLoss(out / "injected.txt", transient=policy == "retry")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="zoblackbox.train"):
        summary = t.fit()
    injected = injected_counts(out / "injected.txt")
    failures = t.zo.oracle.failures

    assert summary["stop_reason"] == "completed" and summary["steps"] == 16
    # it learns: the test loss falls and accuracy is above twice chance. Which queries fail depends on
    # the low bits of the model outputs (the fault draw hashes them), so the training path differs
    # across CPUs: 0.40-0.45 on one machine, 0.275 on another (fault-free runs of this recipe over 8
    # RGE seeds: 0.29-0.52)
    epochs = [r for r in _jsonl(out / "metrics.jsonl") if "test_loss" in r]
    assert epochs[-1]["test_loss"] < epochs[0]["test_loss"] - 0.1, epochs
    assert summary["test_acc"] > 0.2
    assert time.monotonic() - started < 60  # each hang was cut at the timeout, not after 60 s
    assert sum(injected.values()) >= 16, injected  # 11% of 336+ queries
    # every failed attempt is a counted query with a record: nothing dropped, nothing invented
    assert sum(f.attempts - f.resolved for f in failures) == sum(injected.values())
    assert summary["queries"] == t.zo.oracle.nfev == 16 * 21 + sum(f.attempts - 1 for f in failures)
    if policy == "retry":
        assert summary["failures"]["resolved_by_retry"] == sum(f.resolved for f in failures) >= 0.9 * len(failures)
        if all(f.resolved for f in failures):  # (measured: all) then every loss is the fault-free one
            clean = _trainer(digits, n=512, estimator=RandomEstimator(q=20, seed=0), lr=0.1, lr_schedule="constant")
            clean.fit()
            assert _same_tensors(t.model.state_dict(), clean.model.state_dict()) == []
    else:
        assert collections.Counter(f.kind for f in failures) == injected and all(f.attempts == 1 for f in failures)
    report = summary["failures"]
    assert report == t.zo.oracle.failure_report() and report["failed_queries"] == len(failures)
    logged = _jsonl(out / "failures.jsonl", drop=())
    assert json.dumps([{k: v for k, v in r.items() if k not in ("step", "epoch")} for r in logged]) == json.dumps(
        [f.as_dict() for f in failures])  # (compared as JSON: NaN values are equal there)
    assert all(1 <= r["step"] <= 16 for r in logged)
    assert _jsonl(out / "metrics.jsonl")[-1]["failures"] == report
    assert "failed queries" in caplog.text and f"with {len(failures)} failed queries" in caplog.text
    INJECTED_KINDS.update(injected)


INJECTED_KINDS: collections.Counter = collections.Counter()  # filled by the three runs above


def test_the_policy_runs_exercised_every_kind_of_fault():
    """The three runs above injected exceptions, non-finite losses and hangs (timeouts)."""
    kinds = INJECTED_KINDS
    if not kinds:
        pytest.skip("the failure-policy runs did not run in this session")
    assert set(kinds) == {"exception", "nonfinite", "timeout"}, kinds


@pytest.mark.parametrize("where", ["serial", "pool"])
def test_default_policy_stops_the_run_naming_the_query(digits, pool, tmp_path, where):
    """Under the default 'raise' policy, the first failed query stops training with an
    OracleError naming the query (index, exception type and message) and the step; the failure is
    in failures.jsonl before the error propagates."""
    t = _trainer(digits, tmp_path, estimator=RandomEstimator(q=20, seed=0),
                 scheduler=SerialScheduler() if where == "serial" else pool)
    t.zo.oracle.loss_fn = FaultyLoss(tmp_path / "injected.txt", raise_p=0.05, nonfinite_p=0.0, hang_p=0.0)
    with pytest.raises(OracleError) as info:
        t.fit()
    err = info.value
    assert err.kind == "exception" and isinstance(err.query_index, int)
    assert str(err).startswith(f"query #{err.query_index} raised InjectedFault: injected fault (u=")
    assert any(f"training stopped in step {t.global_step + 1}" in n for n in getattr(err, "__notes__", [""]))
    logged = _jsonl(tmp_path / "failures.jsonl", drop=())
    assert [(r["index"], r["step"], r["message"]) for r in logged] == [(err.query_index, t.global_step + 1, str(err))]
    assert sum(injected_counts(tmp_path / "injected.txt").values()) >= 1


# ---------------------------------------------------------------------------------------------- worker loss
def _worker_loss_run(digits, tmp_path, scheduler, n_kills):
    reference = _trainer(digits, hidden=8, estimator=CoordinateEstimator())  # in-process, fault-free
    ref_summary = reference.fit()
    beacons = tmp_path / "beacons"
    beacons.mkdir()
    t = _trainer(digits, hidden=8, estimator=CoordinateEstimator(), scheduler=scheduler)
    t.zo.oracle.loss_fn = Beacon(beacons)
    killer = WorkerKiller(t, beacons, n=n_kills)
    killer.start()
    try:
        summary = t.fit()
    finally:
        killer.finished.set()
        killer.join()
    assert len(killer.kills) == n_kills and all(in_step for *_, in_step in killer.kills), killer.kills
    assert len(killer.pids) >= 2 + 1  # a replacement worker process did work after a kill
    assert summary["stop_reason"] == "completed" and summary["queries"] == ref_summary["queries"]
    assert t.zo.oracle.failures == []
    assert _same_tensors(t.model.state_dict(), reference.model.state_dict()) == [], killer.kills
    return killer


def test_pool_workers_killed_mid_step_repeatedly_give_the_fault_free_result(digits, pool, tmp_path):
    """CGE training of a digits MLP (611 queries a step, 8 steps) on the 2-worker pool; a worker
    process is SIGKILLed in the middle of a step, twice, at different steps: training finishes with
    parameters bitwise equal to a fault-free in-process run, no failed query, the same query count."""
    _worker_loss_run(digits, tmp_path, pool, n_kills=2)


def test_dask_workers_killed_mid_step_repeatedly_give_the_fault_free_result(digits, tmp_path):
    """The same on a 2-worker Dask LocalCluster (worker processes under nannies): each killed
    worker's tasks are rescheduled, the nanny restarts it, and the result is bitwise the fault-free
    one."""
    dask_cluster = pytest.importorskip("zoblackbox.schedule.dask_cluster")
    with dask_cluster.DaskScheduler(n_workers=2) as scheduler:
        _worker_loss_run(digits, tmp_path, scheduler, n_kills=2)


# ---------------------------------------------------------------------------------------------- safe loading
class _Touch:
    """A pickle that creates a file when unpickled (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_resume_refuses_a_malicious_checkpoint(digits, tmp_path, capsys, fmt):
    """A checkpoint whose payload was replaced by a malicious pickle (and its checksum updated, as an
    attacker who can write the directory would) is refused by Trainer.fit(resume=True) and by
    `zoblackbox train --resume`; the payload's code never runs (the file it would create does not
    appear), although an unsafe torch.load really runs it."""
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--epochs", "1", "--batch-size", "512", "--estimator", "rge", "--q", "4",
                 "--out", str(out), "--no-progress"]) == 0
    meta_path = latest_checkpoint(out / "checkpoints")
    pt = meta_path.with_suffix(".pt")
    marker = tmp_path / "pwned"
    if fmt == "torch-zip":
        torch.save({"model": _Touch(marker)}, pt)
    else:
        pt.write_bytes(pickle.dumps({"model": _Touch(marker)}, protocol=2))
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(pt.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))

    if fmt == "torch-zip":  # proof that the payload is live: an unsafe load runs it
        torch.load(pt, weights_only=False)
    else:
        pickle.loads(pt.read_bytes())
    assert marker.exists()
    marker.unlink()

    t = _trainer(digits, out)
    with pytest.raises(CheckpointError, match="refusing to load .*ckpt-.*pt"):
        t.fit(resume=True)
    assert main(["train", "--model", "mlp", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_faulty_loss_injects_logs_and_is_deterministic_per_point(tmp_path):
    """zoblackbox.faults.FaultyLoss: every kind it draws happens and is logged; without
    ``transient`` a point's fate never changes, with it a retry of the same point is a new draw."""
    from zoblackbox.testing import InjectedFault

    outputs, targets = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    log = tmp_path / "log.txt"
    with pytest.raises(InjectedFault, match="injected fault"):
        FaultyLoss(log, raise_p=1.0, nonfinite_p=0.0, hang_p=0.0)(outputs, targets)
    value = FaultyLoss(log, raise_p=0.0, nonfinite_p=1.0, hang_p=0.0)(outputs, targets)
    assert not torch.isfinite(value)
    hang = FaultyLoss(log, raise_p=0.0, nonfinite_p=0.0, hang_p=1.0, hang_s=0.01)(outputs, targets)
    assert hang == pytest.approx(float(F.cross_entropy(outputs, targets)))
    assert injected_counts(log) == collections.Counter({"exception": 1, "nonfinite": 1, "timeout": 1})
    assert injected_counts(tmp_path / "none.txt") == collections.Counter()

    def fates(loss, n=40):
        out = []
        for _ in range(n):
            try:
                out.append(math.isfinite(float(loss(outputs, targets))))
            except InjectedFault:
                out.append("raised")
        return out

    steady = fates(FaultyLoss(tmp_path / "a.txt", raise_p=0.3, nonfinite_p=0.3, hang_p=0.0, transient=False))
    assert len(set(steady)) == 1  # the same point, the same fate, every time
    varied = fates(FaultyLoss(tmp_path / "b.txt", raise_p=0.3, nonfinite_p=0.3, hang_p=0.0))
    assert {True, False, "raised"} <= set(varied)
    with pytest.raises(ValueError, match=r"got \(0.6, 0.6, 0.0\)"):
        FaultyLoss(log, raise_p=0.6, nonfinite_p=0.6, hang_p=0.0)
