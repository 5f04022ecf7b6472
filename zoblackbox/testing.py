"""Test helpers: fault injection, for testing that a ZO pipeline survives its black box failing.

The library's own reliability tests (``tests/test_reliability.py``) and the fault benchmark
(``benchmarks/faults.py``) use these; they work as well for a user's own training setup:

* :class:`FaultyLoss` -- a loss function (``loss(outputs, targets)``, the ``loss_fn`` of a
  :class:`~zoblackbox.torch_module.ModuleOracle`) that raises, returns NaN/inf or hangs on a chosen
  fraction of queries, deterministically per query point, and logs every fault it injects to a
  file (from whichever process evaluates the query, pool and Dask workers included);
* :func:`injected_counts` -- the faults of such a log by kind;
* :class:`Beacon` and :class:`WorkerKiller` -- SIGKILL the worker processes of a
  ``ProcessPoolScheduler`` or ``DaskScheduler`` in the middle of training steps.

All of them pickle, so they travel to workers like any loss function. (``zoblackbox.faults``, their
first home, re-exports them.)
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["FAULT_KINDS", "Beacon", "FaultyLoss", "InjectedFault", "Kill", "WorkerKiller", "injected_counts"]

#: the kinds of fault :class:`FaultyLoss` injects, as they are written to its log
FAULT_KINDS = ("exception", "nonfinite", "timeout")


class InjectedFault(RuntimeError):
    """What :class:`FaultyLoss` raises."""


class FaultyLoss:
    """Cross-entropy (or ``loss_fn``) behind a faulty black box.

    Each call raises :class:`InjectedFault` (probability ``raise_p``), returns NaN or +inf
    (``nonfinite_p``, half each) or sleeps ``hang_s`` seconds before answering (``hang_p``: a hang
    only a per-query timeout ends). The draw is a hash of the model outputs (so of the query point),
    of ``seed`` and, when ``transient``, of a per-process call counter, so a retry of the same point
    may then succeed; without ``transient`` a failing point always fails. Every fault is appended
    to the file ``log`` (one kind per line) before it happens.
    """

    def __init__(self, log, *, raise_p: float = 0.05, nonfinite_p: float = 0.05, hang_p: float = 0.01,
                 transient: bool = True, seed: int = 0, hang_s: float = 60.0, loss_fn=F.cross_entropy):
        probs = (raise_p, nonfinite_p, hang_p)
        if any(not 0 <= p <= 1 for p in probs) or sum(probs) > 1:
            raise ValueError(f"fault probabilities must lie in [0, 1] and sum to at most 1, got {probs}")
        self.log = str(log)
        self.thresholds = (raise_p, raise_p + nonfinite_p, raise_p + nonfinite_p + hang_p)
        self.transient, self.seed, self.hang_s, self.loss_fn = transient, seed, hang_s, loss_fn
        self.calls = 0

    def __call__(self, outputs, targets):
        loss = self.loss_fn(outputs, targets)
        self.calls += 1
        salt = f"{self.seed}:{self.calls if self.transient else 0}".encode()[:16]
        digest = hashlib.blake2b(outputs.detach().cpu().numpy().tobytes(), digest_size=8, salt=salt).digest()
        u = int.from_bytes(digest, "little") / 2.0**64
        kind = next((k for k, t in zip(FAULT_KINDS, self.thresholds) if u < t), None)
        if kind is None:
            return loss
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{kind}\n".encode())
        finally:
            os.close(fd)
        if kind == "exception":
            raise InjectedFault(f"injected fault (u={u:.6f})")
        if kind == "nonfinite":
            middle = 0.5 * (self.thresholds[0] + self.thresholds[1])
            return torch.full_like(loss, math.nan if u < middle else math.inf)
        time.sleep(self.hang_s)  # a hang: only a per-query timeout (the pool's SIGALRM) ends it early
        return loss


def injected_counts(log) -> collections.Counter:
    """Faults a :class:`FaultyLoss` logged to ``log``, by kind (empty if it injected none)."""
    path = Path(log)
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


class Beacon:
    """Cross-entropy (or ``loss_fn``); its first call in a process other than the one that made it
    drops an empty file named ``<pid>-<random>`` in ``directory``, so a watcher knows which worker
    process is evaluating queries right now."""

    def __init__(self, directory, loss_fn=F.cross_entropy):
        self.directory, self.main_pid, self.announced, self.loss_fn = str(directory), os.getpid(), False, loss_fn

    def __call__(self, outputs, targets):
        if not self.announced and os.getpid() != self.main_pid:
            self.announced = True
            open(os.path.join(self.directory, f"{os.getpid()}-{uuid.uuid4().hex}"), "w").close()
        return self.loss_fn(outputs, targets)


class Kill(NamedTuple):
    """One SIGKILL of :class:`WorkerKiller`: the trainer's ``global_step`` when it was sent, the
    pid, and whether the trainer was still in that step afterwards (the kill landed mid-step)."""

    step: int
    pid: int
    mid_step: bool


class WorkerKiller(threading.Thread):
    """SIGKILLs a worker process as soon as a :class:`Beacon` shows it started on a step, from
    ``trainer.global_step >= first`` on and then every ``every`` steps, until ``n`` are dead.

    Start it before ``trainer.fit()``; set ``finished`` and ``join()`` after. ``kills`` lists
    :class:`Kill` records; ``pids`` every worker process that announced itself.
    """

    def __init__(self, trainer, directory, *, n: int, first: int = 1, every: int = 2):
        super().__init__(daemon=True)
        self.trainer, self.directory, self.n, self.first, self.every = trainer, str(directory), n, first, every
        self.kills: list[Kill] = []
        self.pids: set[int] = set()
        self.finished = threading.Event()

    def run(self):
        seen, target = set(os.listdir(self.directory)), self.first
        while not self.finished.is_set():
            new = [name for name in os.listdir(self.directory) if name not in seen]
            step = self.trainer.global_step  # read after listing: a new beacon is from this step or earlier
            seen.update(new)
            self.pids.update(int(name.split("-")[0]) for name in new)
            if new and step >= target and len(self.kills) < self.n:
                pid = int(new[0].split("-")[0])
                os.kill(pid, signal.SIGKILL)
                self.kills.append(Kill(step, pid, self.trainer.global_step == step))
                target = step + self.every
            time.sleep(0.001)
