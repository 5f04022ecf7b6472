"""Pieces attached to the engine's loop: a callback, a progress bar, a log, a checkpointer.

Each is an *observer*: ``observer(engine, record) -> bool | None`` is called after every finished
iteration of an :class:`~zoblackbox.engine.AskTell` (``engine.observers``) with the iteration's
history record (``nit``, ``nfev``, ``f0``, ``grad_norm``, ``n_failed``, ``time``); returning
``True`` stops the run cleanly. Drivers (:func:`~zoblackbox.minimize`, the
:class:`~zoblackbox.Trainer`) attach what the user asked for; nothing here knows which driver runs.

* :class:`ScipyCallback` -- scipy's contract: ``callback(intermediate_result)``; returning ``True``
  or raising ``StopIteration`` stops the run;
* :class:`ProgressBar` -- a tqdm bar with the loss, the queries and the queries per second;
* :class:`JSONLinesLog` -- one JSON line per iteration;
* :class:`Checkpointer` -- the engine's state and the oracle's counters every ``every``
  iterations, in the safe checkpoint format of :mod:`zoblackbox.checkpoint` (atomic writes).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError

__all__ = ["Checkpointer", "JSONLinesLog", "ProgressBar", "ScipyCallback", "default_progress"]


class ScipyCallback:
    """Wrap ``callback(intermediate_result)`` as an observer (scipy's contract)."""

    def __init__(self, callback: Callable):
        if not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}: {callback!r}")
        self.callback = callback

    def __call__(self, engine, record: dict) -> bool:
        if not engine.rule.counts_iteration:  # L-BFGS's gradient at x0 is recorded, not an iteration
            return False
        try:
            return self.callback(engine.intermediate_result(record)) is True
        except StopIteration:
            return True


def default_progress() -> bool:
    """Progress bars are on by default when standard error is a terminal."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class ProgressBar:
    """A tqdm bar over the query budget (or the iterations) showing loss, queries and queries/s."""

    def __init__(self, total_queries: int | None = None, total_iterations: int | None = None, desc: str = "ZO",
                 start_nfev: int = 0):
        from tqdm.auto import tqdm

        self.by_queries = total_queries is not None
        total = total_queries if self.by_queries else total_iterations
        self.bar = tqdm(total=total, desc=desc, unit="query" if self.by_queries else "it", dynamic_ncols=True,
                        leave=False, initial=start_nfev if self.by_queries else 0)
        self._t0, self._n0, self._last = time.perf_counter(), start_nfev, start_nfev

    def __call__(self, engine, record: dict) -> None:
        now = record["nfev"]
        self.bar.update(now - self._last if self.by_queries else 1)
        self._last = now
        rate = (now - self._n0) / max(time.perf_counter() - self._t0, 1e-9)
        f0 = record.get("f0")
        self.bar.set_postfix(loss=f"{f0:.6g}" if isinstance(f0, float) and math.isfinite(f0) else f0,
                             queries=now, q_per_s=f"{rate:,.0f}", refresh=False)

    def close(self) -> None:
        self.bar.refresh()  # the last postfix, even when the run took less than tqdm's refresh interval
        self.bar.close()


class JSONLinesLog:
    """Append one JSON line per iteration (the history record) to ``path``.

    A resumed run first rewrites the file with the records the checkpoint has seen
    (:meth:`rewrite`), so the lines a killed run wrote after its last checkpoint are not duplicated.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"log must be a file path, got the directory {str(self.path)!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def rewrite(self, history: list[dict]) -> None:
        """Replace the file with ``history`` (atomically)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in history))
        os.replace(tmp, self.path)

    def __call__(self, engine, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_jsonable(record)) + "\n")


class Checkpointer:
    """Save ``{"engine": engine.state_dict(), "oracle": oracle.state_dict()}`` every ``every``
    iterations into ``directory`` (:func:`zoblackbox.checkpoint.save_checkpoint`: validated
    before anything is written, atomic renames, the previous checkpoint kept until the new one is
    complete)."""

    def __init__(self, directory: str | os.PathLike, every: int = 1, oracle=None, kind: str = "minimize"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"checkpoint_every must be an int >= 1, got {every!r}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"checkpoint must be a directory, got the file {str(self.directory)!r}")
        self.every, self.oracle, self.kind = every, oracle, kind
        self._since = 0

    def exists(self) -> bool:
        """Whether the directory holds a checkpoint to resume from."""
        return latest_checkpoint(self.directory) is not None

    def load(self) -> tuple[dict, dict]:
        """``(state, meta)`` of the newest checkpoint; CheckpointError for another kind of run."""
        state, meta = load_checkpoint(self.directory)
        if meta.get("kind") != self.kind or not isinstance(state, dict) or "engine" not in state:
            raise CheckpointError(f"{self.directory} holds a checkpoint of kind {meta.get('kind')!r}, not a "
                                  f"{self.kind} run")
        return state, meta

    def save(self, engine) -> Path:
        state = {"engine": engine.state_dict()}
        if self.oracle is not None:
            state["oracle"] = self.oracle.state_dict()
        meta = {"kind": self.kind, "nit": engine.nit, "nfev": engine.nfev, "done": engine.phase == "done"}
        return save_checkpoint(self.directory, state, meta, tag=engine._iterations + (engine.phase == "done"))

    def __call__(self, engine, record: dict) -> None:
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            self.save(engine)


def _jsonable(record: dict) -> dict:
    out: dict[str, object] = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = repr(v)  # JSON has no inf/nan
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        else:
            out[k] = repr(v)
    return out
