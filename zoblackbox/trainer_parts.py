"""Pieces attached to the :class:`~zoblackbox.train.Trainer`'s loop: sparse masks, logs, checkpoints.

The Trainer's :meth:`~zoblackbox.train.Trainer.fit` is a short loop over epochs and batches (one
engine step per batch); everything around it is a *part* with a few hooks, called in the order the
parts were attached:

* :class:`MaskRedraw` -- the sparse coordinate mask of a :class:`~zoblackbox.sparsity.SparseSchedule`:
  when to redraw it, the current coordinates, the freeze mask; checkpointed under ``"sparse"``;
* :class:`EpochProgress` -- a tqdm bar per epoch and one summary line per epoch (``tqdm.write``);
* :class:`FailureLog` -- failed queries appended to ``failures.jsonl`` with their step, a warning
  for every epoch with failures and for the run, and the note on the error that stops a run;
* :class:`MetricsLog` -- one JSON line per epoch in ``metrics.jsonl``;
* :class:`TrainerCheckpoints` -- when to write a checkpoint (epoch ends, every N steps), saving
  and loading the newest one.

A part implements any of these hooks (:class:`TrainerPart` has no-op defaults; a duck-typed object
works too): ``on_fit_start(trainer)``, ``on_epoch_start(trainer)``, ``before_step(trainer)``,
``after_step(trainer, loss)``, ``on_step_error(trainer, exc)`` (a query failed under the ``raise``
policy; the error propagates after the hooks), ``on_epoch_end(trainer, record)`` (after the record
was added to ``trainer.history``), ``on_fit_end(trainer, summary)``, ``on_load(trainer)`` (after
:meth:`~zoblackbox.train.Trainer.load_state_dict`) and ``on_resume(trainer)`` (after ``resume``
loaded a checkpoint; logs are cut back here). A part with a ``state_key`` is checkpointed:
``state_dict()`` goes into the Trainer's state under that key and ``load_state_dict(state)`` gets
it back (tensors and plain containers only, see :mod:`zoblackbox.checkpoint`).

Hooks read the trainer's position and run: ``epoch``, ``global_step``, ``batch_in_epoch``,
``epochs``, ``steps_per_epoch``, ``method``, ``queries``, ``engine``, ``history``,
``flat_params()``, ``save_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import describe_value, latest_checkpoint, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError
from .params import ParamLayout
from .sparsity import SparseSchedule

__all__ = ["HOOKS", "EpochProgress", "FailureLog", "MaskRedraw", "MetricsLog", "TrainerCheckpoints", "TrainerPart",
           "check_parts", "format_record"]

logger = logging.getLogger("zoblackbox.train")  # the Trainer's logger: one place to configure

#: the hooks a part may implement, in no particular order
HOOKS = ("on_fit_start", "on_epoch_start", "before_step", "after_step", "on_step_error", "on_epoch_end",
         "on_fit_end", "on_load", "on_resume")


class TrainerPart:
    """Base of the Trainer's parts: every hook does nothing; no checkpointed state."""

    state_key: str | None = None

    def on_fit_start(self, trainer) -> None: ...

    def on_epoch_start(self, trainer) -> None: ...

    def before_step(self, trainer) -> None: ...

    def after_step(self, trainer, loss: float) -> None: ...

    def on_step_error(self, trainer, exc: BaseException) -> None: ...

    def on_epoch_end(self, trainer, record: dict) -> None: ...

    def on_fit_end(self, trainer, summary: dict) -> None: ...

    def on_load(self, trainer) -> None: ...

    def on_resume(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def check_parts(parts, reserved=frozenset()) -> list:
    """A list of the user's parts: each implements at least one hook; their ``state_key``s are
    strings, unique and not in ``reserved`` (the keys the Trainer's state already has)."""
    if parts is None:
        return []
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
        raise TypeError(f"parts must be a list of trainer parts, got {type(parts).__name__}")
    keys = set()
    for part in parts:
        if not any(callable(getattr(part, h, None)) for h in HOOKS):
            raise TypeError(f"a trainer part implements at least one of {', '.join(HOOKS)}; got "
                            f"{type(part).__name__}: {part!r}")
        key = getattr(part, "state_key", None)
        if key is None:
            continue
        if not isinstance(key, str) or key in reserved or key in keys:
            raise ConfigError(f"trainer part {type(part).__name__} has the state_key {key!r}, which is "
                              f"{'not a string' if not isinstance(key, str) else 'taken'}")
        keys.add(key)
    return list(parts)


# ------------------------------------------------------------------------------------------ sparse masks
class MaskRedraw(TrainerPart):
    """The sparse coordinate mask of a :class:`~zoblackbox.sparsity.SparseSchedule`.

    Before every step: the first step of the run draws a mask; after that a new one is drawn at the
    first step of every ``interval``-th epoch (``unit="epoch"``: epochs 0, interval, 2*interval...,
    not when a run resumes in the middle of such an epoch), or before every ``interval``-th step
    (``unit="step"``: global steps 0, interval, ...), once per boundary. The mask is set on the
    engine (``engine.coords``, and ``engine.freeze`` with ``freeze_inactive``).

    Args:
        schedule: the :class:`~zoblackbox.sparsity.SparseSchedule`.
        layout: the trainer's parameter layout (the sampler's must match it).
        device: where the coordinates live.
    """

    state_key = "sparse"

    def __init__(self, schedule: SparseSchedule, layout: ParamLayout, device: str | torch.device = "cpu"):
        if not isinstance(schedule, SparseSchedule):
            raise TypeError(f"sparse must be a SparseSchedule, got {type(schedule).__name__}")
        if schedule.sampler.layout != layout:
            raise ConfigError("the sparse sampler's layout does not match the model's trainable parameters")
        self.schedule, self.layout, self.device = schedule, layout, torch.device(device)
        self.drawn_at = -1  # the epoch or step counter of the last draw
        self._coords: torch.Tensor | None = None
        self._active: torch.Tensor | None = None

    @property
    def coords(self) -> torch.Tensor | None:
        """The sorted active coordinates (``None`` before the first draw)."""
        return self._coords

    @coords.setter
    def coords(self, value: torch.Tensor | None) -> None:
        self._coords = value
        self._active = None

    @property
    def active(self) -> torch.Tensor | None:
        """Boolean mask of the active coordinates (``None`` before the first draw)."""
        if self._coords is not None and self._active is None:
            self._active = torch.zeros(self.layout.dim, dtype=torch.bool, device=self.device)
            self._active[self._coords] = True
        return self._active

    @property
    def freeze(self) -> torch.Tensor | None:
        """The coordinates an update may not change (``freeze_inactive``), else ``None``."""
        if self._coords is None or not self.schedule.freeze_inactive:
            return None
        active = self.active
        return None if active is None else ~active

    def due(self, epoch: int, global_step: int, epoch_start: bool) -> bool:
        """Whether the step about to run draws a new mask."""
        sp = self.schedule
        counter = epoch if sp.unit == "epoch" else global_step
        at_boundary = sp.unit == "step" or epoch_start
        return self._coords is None or (at_boundary and counter % sp.interval == 0 and counter != self.drawn_at)

    def redraw(self, x: torch.Tensor | None, counter: int) -> torch.Tensor:
        """Draw a new mask (at ``x``, for magnitude masks) and remember the counter it was drawn at."""
        coords = self.schedule.sampler.sample(x).to(self.device)
        self.coords = coords
        self.drawn_at = counter
        return coords

    def before_step(self, trainer) -> None:
        if self.due(trainer.epoch, trainer.global_step, trainer.batch_in_epoch == 0):
            counter = trainer.epoch if self.schedule.unit == "epoch" else trainer.global_step
            self.redraw(trainer.flat_params(), counter)
        trainer.engine.coords = self._coords
        trainer.engine.freeze = self.freeze

    def mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """Zero the inactive coordinates of a flat gradient, in place (the FO sparse reference)."""
        active = self.active
        if active is not None:
            grad.mul_(active.to(grad.dtype))
        return grad

    def state_dict(self) -> dict:
        return {"sampler": self.schedule.sampler.state_dict(), "drawn_at": self.drawn_at,
                "coords": self._coords.cpu() if self._coords is not None else torch.empty(0)}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`; everything is checked (:meth:`check_state_dict`) before anything changes."""
        drawn_at, coords, sampler = self.check_state_dict(state)
        self.schedule.sampler.load_state_dict(sampler)
        self.drawn_at = drawn_at
        self.coords = coords.to(self.device) if coords.numel() else None

    def check_state_dict(self, state) -> tuple[int, torch.Tensor, dict]:
        """``(drawn_at, coords, sampler state)`` of a :meth:`state_dict`, checked against this mask's
        layout and sampler (CheckpointError naming the field ``sparse.*``); changes nothing."""
        if not isinstance(state, dict):
            raise CheckpointError(f"field sparse: the sparse-mask state must be a dict, got {type(state).__name__}")
        for key in ("drawn_at", "coords", "sampler"):
            if key not in state:
                raise CheckpointError(f"field sparse.{key} is missing: the sparse-mask state lacks {key!r}")
        drawn_at, coords, sampler = state["drawn_at"], state["coords"], state["sampler"]
        if isinstance(drawn_at, bool) or not isinstance(drawn_at, int) or drawn_at < -1:
            raise CheckpointError(f"field sparse.drawn_at: the sparse mask was drawn at counter {drawn_at!r}: "
                                  "not an int >= -1")
        if not isinstance(coords, torch.Tensor) or coords.dim() != 1 or (
                coords.numel() and (coords.dtype != torch.long or int(coords.min()) < 0
                                    or int(coords.max()) >= self.layout.dim)):
            raise CheckpointError(f"field sparse.coords: the sparse mask's coordinates are not indices into "
                                  f"{self.layout.dim} parameters: {describe_value(coords)}")
        n_active = self.schedule.sampler.n_active
        if coords.numel() not in (0, n_active):
            raise CheckpointError(f"field sparse.coords: the checkpoint's sparse mask has {coords.numel()} "
                                  f"coordinates, but this sampler draws {n_active}")
        if coords.numel() and not bool((coords[1:] > coords[:-1]).all()):
            raise CheckpointError("field sparse.coords: the sparse mask's coordinates are not sorted and distinct, "
                                  "as a drawn mask's are")
        try:
            check = getattr(self.schedule.sampler, "check_state_dict", None)
            if check is not None:
                check(sampler)
        except CheckpointError as exc:
            raise CheckpointError(f"field sparse.sampler: the sparse sampler's state does not load: {exc}") from exc
        return drawn_at, coords, sampler


# ------------------------------------------------------------------------------------------ progress
class EpochProgress(TrainerPart):
    """A tqdm bar over each epoch's batches (loss, queries) and one summary line per epoch."""

    def __init__(self):
        self.bar = None

    def on_epoch_start(self, trainer) -> None:
        self._close()
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.batch_in_epoch, leave=False,
                        desc=f"{trainer.method.upper()} epoch {trainer.epoch + 1}/{trainer.epochs}",
                        dynamic_ncols=True)

    def after_step(self, trainer, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", queries=trainer.queries, refresh=False)
        if trainer.batch_in_epoch == trainer.steps_per_epoch:
            self._close()  # before the epoch's evaluation

    def on_epoch_end(self, trainer, record: dict) -> None:
        self._close()
        tqdm.write(format_record(record, trainer.epochs))

    def on_step_error(self, trainer, exc: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_record(r: dict, epochs: int) -> str:
    """The one-line summary of an epoch record."""
    parts = [f"epoch {r['epoch']:>3}/{epochs}", f"train loss {r['train_loss']:.4f}", f"train acc {r['train_acc']:.3f}"]
    if "test_acc" in r:
        parts.append(f"test acc {r['test_acc']:.3f}")
    parts.append(f"queries {r['queries']:,}")
    if r.get("failures", {}).get("failed_queries"):
        parts.append(f"failed queries {r['failures']['failed_queries']:,}")
    parts.append(f"{r['wall_s']:.1f}s")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------ logs
class MetricsLog(TrainerPart):
    """Append every epoch record to ``path`` (``metrics.jsonl``) as one JSON line.

    On resume the file is rewritten with the records the checkpoint has seen (``trainer.history``),
    so the lines a killed run wrote after its last checkpoint are not duplicated.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_fit_start(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, trainer, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_resume(self, trainer) -> None:
        if self.path.exists():
            replace_text(self.path, "".join(json.dumps(r) + "\n" for r in trainer.history))


class FailureLog(TrainerPart):
    """Failed queries of ``oracle`` (``docs/failures.md``) are never dropped silently.

    After every step the failures recorded since the last one are logged (debug) and appended to
    ``path`` (``failures.jsonl``, if given) with the step and epoch they happened in; every epoch
    with failures and a run that ends with some log a warning; the error that stops a run under the
    ``raise`` policy gets a note naming the step. On resume, ``path`` is cut back to the steps the
    checkpoint has seen.
    """

    def __init__(self, oracle, path: str | os.PathLike | None = None):
        self.oracle = oracle
        self.path = Path(path) if path is not None else None
        self.logged = 0  # failures already written
        self._epoch_start_count = 0

    def log_new(self, step: int, epoch: int) -> None:
        """Log and append the failures recorded since the last call, as happened in ``step``."""
        new = self.oracle.failures[self.logged:]
        if not new:
            return
        self.logged += len(new)
        for f in new:
            logger.debug("step %d: %s", step, f.message)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"step": step, "epoch": epoch, **f.as_dict()}) + "\n" for f in new)
        with self.path.open("a") as fh:
            fh.write(lines)

    def on_epoch_start(self, trainer) -> None:
        self._epoch_start_count = len(self.oracle.failures)

    def after_step(self, trainer, loss: float) -> None:
        self.log_new(trainer.global_step, trainer.epoch + 1)

    def on_step_error(self, trainer, exc: BaseException) -> None:
        step = trainer.global_step + 1
        self.log_new(step, trainer.epoch + 1)
        note = (f"training stopped in step {step} (epoch {trainer.epoch + 1}) under the "
                f"'{self.oracle.policy.action}' failure policy; pass "
                "oracle_kwargs={'on_failure': 'retry' | 'inf' | 'skip'} to keep going")
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        logger.error("%s; %s", exc, note)

    def on_epoch_end(self, trainer, record: dict) -> None:
        new = len(self.oracle.failures) - self._epoch_start_count
        if new > 0:
            logger.warning("epoch %d: %d failed queries under %s; totals so far: %s", record["epoch"], new,
                           self.oracle.policy, record["failures"])

    def on_fit_end(self, trainer, summary: dict) -> None:
        failures = summary.get("failures")
        if failures and failures["failed_queries"]:
            logger.warning("training finished (%s) with %d failed queries: %s", summary["stop_reason"],
                           failures["failed_queries"], failures)

    def on_load(self, trainer) -> None:
        self.logged = len(self.oracle.failures)  # those were logged by the run that saved the state

    def on_resume(self, trainer) -> None:
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by the kill
            if step <= trainer.global_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        replace_text(self.path, "".join(kept))


def replace_text(path: Path, text: str) -> None:
    """Replace a file's contents atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ checkpoints
class TrainerCheckpoints(TrainerPart):
    """Checkpoints of a Trainer in ``directory`` (the safe format of :mod:`zoblackbox.checkpoint`).

    One is written after every ``every``-th epoch and after the last one, and, with ``every_steps``,
    after every ``every_steps``-th optimizer step in the middle of epochs (not when the epoch-end
    checkpoint follows anyway). Checkpoints are written by ``trainer.save_checkpoint()``, which
    calls :meth:`save`.
    """

    def __init__(self, directory: str | os.PathLike, every: int = 1, every_steps: int | None = None):
        self.directory = Path(directory)
        self.every, self.every_steps = every, every_steps

    def step_due(self, trainer) -> bool:
        """A mid-epoch checkpoint after the step that just ended."""
        if self.every_steps is None or trainer.global_step % self.every_steps != 0:
            return False
        if trainer.batch_in_epoch == trainer.steps_per_epoch:  # the last batch: does the epoch end save?
            ending = trainer.epoch + 1
            return not (ending % self.every == 0 or ending == trainer.epochs)
        return True

    def epoch_due(self, trainer) -> bool:
        """A checkpoint at the end of the epoch that just ended."""
        return trainer.epoch % self.every == 0 or trainer.epoch == trainer.epochs

    def after_step(self, trainer, loss: float) -> None:
        if self.step_due(trainer):
            trainer.save_checkpoint()

    def on_epoch_end(self, trainer, record: dict) -> None:
        if self.epoch_due(trainer):
            trainer.save_checkpoint()

    def save(self, trainer) -> Path:
        """Write ``trainer.state_dict()``; returns the ``.pt`` path."""
        meta = {"epoch": trainer.epoch, "step": trainer.global_step, "batch_in_epoch": trainer.batch_in_epoch,
                "method": trainer.method, "queries": trainer.queries}
        return save_checkpoint(self.directory, trainer.state_dict(), meta, tag=trainer.global_step)

    def exists(self) -> bool:
        return latest_checkpoint(self.directory) is not None

    def load(self, map_location="cpu") -> tuple[dict, dict]:
        """``(state, meta)`` of the newest checkpoint."""
        return load_checkpoint(self.directory, map_location=map_location)
