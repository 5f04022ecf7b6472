"""Training torch models with zeroth-order gradients (or first-order, for reference).

:class:`Trainer` runs epochs over a data loader with any ``torch.optim`` optimizer and a warm-up +
cosine (or constant) LR schedule. It is a driver of the ask/tell engine
(:class:`~zoblackbox.engine.AskTell`): each step sets the batch on the model's
:class:`~zoblackbox.torch_module.ModuleOracle` and runs one engine iteration (``method="zo"``), or
hands the engine an autograd gradient (``method="fo"``, the reference the ZO run is compared with),
so the update rule, the LR schedule, the query budget and the sparse mask are the engine's.
It shows a tqdm progress bar, appends one JSON line of metrics per epoch to
``<output_dir>/metrics.jsonl``, and writes a safe checkpoint (``zoblackbox.checkpoint``) every
``checkpoint_every`` epochs and, optionally, every ``checkpoint_every_steps`` steps, from which
:meth:`Trainer.fit` resumes with ``resume=True`` -- bitwise exactly, also in the middle of an epoch
(data order, RNG states, optimizer, LR schedule and sparse masks are all in the checkpoint).

Failed queries (see ``docs/failures.md``) are never dropped silently: each one is appended to
``<output_dir>/failures.jsonl`` with the step it happened in, every epoch's metrics carry the
running counts by kind, a warning is logged (logger ``zoblackbox.train``) for every epoch with
failures, and :meth:`Trainer.fit` returns the oracle's failure report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .engine import AskTell
from .errors import CheckpointError, ConfigError, OracleError
from .estimators import CoordinateEstimator, Estimator
from .optim import ZOGradient
from .params import ParamLayout
from .schedules import Constant, WarmupCosine
from .sparsity import SparseSchedule

__all__ = ["Trainer", "warmup_cosine"]

logger = logging.getLogger(__name__)

METHODS = ("zo", "fo")
LR_SCHEDULES = ("cosine", "constant")


def warmup_cosine(total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine decay to ``final_fraction``
    (:class:`zoblackbox.schedules.WarmupCosine`; kept under this name for existing code)."""
    return WarmupCosine(total_steps, warmup_steps, final_fraction)


class Trainer:
    """Epoch-based training with a ZO (or FO) gradient.

    Args:
        model: the module to train (moved to ``device``).
        train_loader: yields ``(inputs, targets)``; its ``generator`` (if any) is checkpointed so a
            resumed run sees the same shuffles.
        test_loader: optional, evaluated after every epoch.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (default cross-entropy).
        method: ``"zo"`` (zeroth-order, default) or ``"fo"`` (autograd reference).
        estimator: ZO estimator (default ``CoordinateEstimator()``).
        optimizer: a name (``sgd``, ``adam``, ``adamw``, ``signsgd``) or a ``torch.optim`` class.
        lr: peak learning rate.
        optimizer_kwargs: e.g. ``{"momentum": 0.9, "weight_decay": 5e-4}``.
        lr_schedule: ``"cosine"`` (warm-up then cosine decay, per step) or ``"constant"``.
        warmup_steps: linear warm-up length (steps).
        epochs: number of epochs.
        budget: maximum ZO queries; training stops cleanly before a step would exceed it.
        bn_policy: BatchNorm handling during ZO queries (``"batch"`` or ``"eval"``).
        scheduler: query scheduler for the ZO estimates (``zoblackbox.schedule``).
        device: ``"cpu"``, ``"cuda"``, ...
        output_dir: where ``metrics.jsonl`` and checkpoints go (``None``: nothing written).
        checkpoint_every: epochs between checkpoints (needs ``output_dir``).
        checkpoint_every_steps: also write a checkpoint every this many optimizer steps, in the
            middle of epochs (``None``: only at epoch ends). A run killed at any moment resumes
            from the last one and ends with the same parameters, bitwise, as an uninterrupted run
            (on the same device and torch build); the batches of the interrupted epoch that were
            already used are replayed from the loader (read, not trained on) to restore its order.
        progress: show tqdm progress bars.
        oracle_kwargs: extra arguments of the :class:`~zoblackbox.torch_module.ModuleOracle`
            (``on_failure``, ``chunk_size``, ...).
        sparse: a :class:`~zoblackbox.sparsity.SparseSchedule`: each step estimates (ZO) or keeps
            (FO, sparse-gradient reference) only the coordinates of the current mask, redrawn
            every ``interval`` epochs or steps; the model stays dense.
    """

    def __init__(self, model: nn.Module, train_loader, test_loader=None, *, loss_fn: Callable = F.cross_entropy,
                 method: str = "zo", estimator: Estimator | None = None, optimizer="adam", lr: float = 1e-3,
                 optimizer_kwargs: dict | None = None, lr_schedule: str = "cosine", warmup_steps: int = 0,
                 epochs: int = 10, budget: int | None = None, bn_policy: str = "batch", scheduler=None,
                 device: str | torch.device = "cpu", output_dir: str | Path | None = None,
                 checkpoint_every: int = 1, progress: bool = True, oracle_kwargs: dict | None = None,
                 sparse: SparseSchedule | None = None, checkpoint_every_steps: int | None = None):
        if method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        for name, value, low in (("epochs", epochs, 1), ("warmup_steps", warmup_steps, 0),
                                 ("checkpoint_every", checkpoint_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ConfigError(f"budget must be a positive int or None, got {budget!r}")
        if checkpoint_every_steps is not None and (isinstance(checkpoint_every_steps, bool)
                                                   or not isinstance(checkpoint_every_steps, int)
                                                   or checkpoint_every_steps < 1):
            raise ConfigError(f"checkpoint_every_steps must be an int >= 1 or None, got {checkpoint_every_steps!r}")
        try:
            self.steps_per_epoch = len(train_loader)
        except TypeError:
            raise ConfigError("train_loader must have a length (a DataLoader over a map-style dataset)") from None
        if self.steps_per_epoch < 1:
            raise ConfigError("train_loader yields no batch")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.loss_fn, self.method, self.epochs = loss_fn, method, epochs
        self.budget, self.output_dir = budget, Path(output_dir) if output_dir is not None else None
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.checkpoint_every_steps = checkpoint_every_steps
        total = epochs * self.steps_per_epoch
        schedule = WarmupCosine(total, warmup_steps) if lr_schedule == "cosine" else Constant()
        self.zo = None
        self.layout = ParamLayout.from_tensors([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.sparse = sparse
        if sparse is not None:
            if not isinstance(sparse, SparseSchedule):
                raise TypeError(f"sparse must be a SparseSchedule, got {type(sparse).__name__}")
            if sparse.sampler.layout != self.layout:
                raise ConfigError("the sparse sampler's layout does not match the model's trainable parameters")
        self.coords: torch.Tensor | None = None
        if method == "zo":
            self.zo = ZOGradient(model, loss_fn, estimator=estimator, bn_policy=bn_policy, scheduler=scheduler,
                                 **(oracle_kwargs or {}))
            n_coords = sparse.sampler.n_active if sparse is not None else None
            self.step_cost = self.zo.estimator.num_queries(self.zo.oracle.dim, n_coords)
            if budget is not None and budget < self.step_cost:
                raise ConfigError(f"budget={budget} is below the cost of one step ({self.step_cost} queries)")
        # the one loop: the engine owns the update rule, the LR schedule and the query budget
        self.engine = AskTell(self._flat_params().detach(), estimator=self.zo.estimator if self.zo else
                              CoordinateEstimator(), optimizer=optimizer, lr=lr, optimizer_kwargs=optimizer_kwargs,
                              lr_schedule=schedule, budget=budget if method == "zo" else None,
                              evaluate_final=False)
        self.epoch = 0
        self.global_step = 0
        self._epoch_start = True
        self._mask_drawn_at = -1
        self.history: list[dict] = []
        self._wall_offset = 0.0
        # position inside the current epoch (what a mid-epoch checkpoint needs to resume exactly)
        self._batch_in_epoch = 0
        self._epoch_losses: list[float] = []
        self._epoch_loader_rng: torch.Tensor | None = None  # loader generator state at the epoch start
        self._failures_logged = 0  # oracle failures already written to failures.jsonl

    # ------------------------------------------------------------------ metrics
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The engine's ``torch.optim`` optimizer (over the flat parameter vector)."""
        return self.engine.rule.opt

    @property
    def lr_schedule(self):
        """The engine's ``LambdaLR`` over :attr:`optimizer`."""
        return self.engine.rule.sched

    @property
    def queries(self) -> int:
        """ZO queries spent so far (0 for first-order training)."""
        return self.zo.nfev if self.zo is not None else 0

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Mean loss and accuracy over a loader (a white-box metric, not counted as queries)."""
        was_training = self.model.training
        self.model.eval()
        total, loss_sum, correct = 0, 0.0, 0
        try:
            for xb, yb in loader:
                xb, yb = xb.to(self.device), yb.to(self.device)
                out = self.model(xb)
                loss_sum += float(self.loss_fn(out, yb)) * len(yb)
                if out.dim() == 2 and yb.dim() == 1:
                    correct += int((out.argmax(1) == yb).sum())
                total += len(yb)
        finally:
            self.model.train(was_training)
        return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1)}

    # ------------------------------------------------------------------ training
    def _flat_params(self) -> torch.Tensor:
        named = dict(self.model.named_parameters())
        return self.layout.flatten({n: named[n] for n in self.layout.names})

    def _set_flat_params(self, x: torch.Tensor) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in self.layout.unflatten(x).items():
                named[n].copy_(t)

    def _maybe_redraw_mask(self) -> None:
        sp = self.sparse
        if sp is None:
            return
        counter = self.epoch if sp.unit == "epoch" else self.global_step
        at_boundary = sp.unit == "step" or self._epoch_start
        if self.coords is None or (at_boundary and counter % sp.interval == 0 and counter != self._mask_drawn_at):
            self.coords = sp.sampler.sample(self._flat_params()).to(self.device)
            self._mask_drawn_at = counter

    def _step(self, xb, yb) -> float | None:
        """One engine iteration on this batch; ``None`` when the engine's budget ended the run."""
        self._maybe_redraw_mask()
        eng = self.engine
        eng.coords = self.coords
        eng.freeze = None
        if self.coords is not None and self.sparse.freeze_inactive:
            eng.freeze = torch.ones(self.layout.dim, dtype=torch.bool, device=self.device)
            eng.freeze[self.coords] = False
        if self.zo is not None:
            oracle = self.zo.oracle
            oracle.set_batch(xb, yb)
            x = eng.rule.x.clone()
            record = eng.step(oracle, self.zo.scheduler)
            if record is None:
                return None
            oracle.update_bn_stats(x)
            loss = math.nan if record["f0"] is None else record["f0"]
        else:
            for p in self.model.parameters():
                p.grad = None
            out = self.model(xb.to(self.device))
            loss_t = self.loss_fn(out, yb.to(self.device))
            loss_t.backward()
            loss = float(loss_t.detach())
            if self.coords is not None:
                self._mask_grads()
            named = dict(self.model.named_parameters())
            grad = self.layout.flatten({n: named[n].grad if named[n].grad is not None else torch.zeros_like(named[n])
                                        for n in self.layout.names})
            if eng.step_gradient(grad, loss) is None:
                return None
        self._set_flat_params(eng.rule.x)
        self.global_step += 1
        return loss

    def _mask_grads(self) -> None:
        named = dict(self.model.named_parameters())
        keep = torch.zeros(self.layout.dim, dtype=torch.bool, device=self.device)
        keep[self.coords] = True
        for n, m in self.layout.unflatten(keep).items():
            if named[n].grad is not None:
                named[n].grad.mul_(m.to(named[n].grad.dtype))

    def fit(self, resume: bool = False) -> dict:
        """Train for the configured epochs (continuing from the last checkpoint with ``resume``).

        Returns:
            a summary: ``test_acc``, ``test_loss``, ``train_acc``, ``queries``, ``steps``,
            ``epochs``, ``wall_s``, ``stop_reason``, ``failures`` (the oracle's
            :meth:`~zoblackbox.oracle.Oracle.failure_report`, ``None`` for first-order training)
            and the per-epoch ``history``.

        Raises:
            OracleError: a query failed under the ``raise`` failure policy (the default); the
                message names the query, a note names the training step, and the failure is in
                ``failures.jsonl``.
        """
        if resume:
            self.resume()
        t0 = time.perf_counter() - self._wall_offset
        stop_reason = "completed"
        metrics_file = None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            metrics_file = self.output_dir / "metrics.jsonl"
        self.model.train()
        generator = self._loader_generator()
        while self.epoch < self.epochs and stop_reason == "completed":
            skip = self._batch_in_epoch
            if skip == 0:
                self._epoch_losses = []
                self._epoch_loader_rng = generator.get_state() if generator is not None else None
            elif generator is not None and self._epoch_loader_rng is not None:
                generator.set_state(self._epoch_loader_rng)  # the interrupted epoch's shuffle, again
            self._epoch_start = skip == 0
            failed_before = len(self.zo.oracle.failures) if self.zo is not None else 0
            bar = tqdm(self.train_loader, desc=f"{self.method.upper()} epoch {self.epoch + 1}/{self.epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
            for i, (xb, yb) in enumerate(bar):
                if i < skip:  # used before the checkpoint this run resumed from
                    continue
                try:
                    loss = self._step(xb, yb)
                except OracleError as exc:
                    self._log_failures(self.global_step + 1)
                    note = (f"training stopped in step {self.global_step + 1} (epoch {self.epoch + 1}) under the "
                            f"'{self.zo.oracle.policy.action}' failure policy; pass "
                            "oracle_kwargs={'on_failure': 'retry' | 'inf' | 'skip'} to keep going")
                    if hasattr(exc, "add_note"):
                        exc.add_note(note)
                    logger.error("%s; %s", exc, note)
                    raise
                if loss is None:  # the engine stopped: the next step would overrun the query budget
                    stop_reason = f"query budget reached ({self.queries} of {self.budget})"
                    break
                self._epoch_losses.append(loss)
                self._batch_in_epoch += 1
                self._epoch_start = False
                self._log_failures(self.global_step)
                bar.set_postfix(loss=f"{loss:.4f}", queries=self.queries, refresh=False)
                if self._step_checkpoint_due():
                    self._wall_offset = time.perf_counter() - t0
                    self.save_checkpoint()
            bar.close()
            if stop_reason == "completed":
                self.epoch += 1
                self._batch_in_epoch = 0
            record = self._epoch_record(self._epoch_losses, time.perf_counter() - t0)
            self.history.append(record)
            if self.zo is not None and len(self.zo.oracle.failures) > failed_before:
                logger.warning("epoch %d: %d failed queries under %s; totals so far: %s", record["epoch"],
                               len(self.zo.oracle.failures) - failed_before, self.zo.oracle.policy,
                               record["failures"])
            if self.progress:
                tqdm.write(_format_record(record, self.epochs))
            if metrics_file is not None:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.output_dir is not None and (self.epoch % self.checkpoint_every == 0 or self.epoch == self.epochs):
                self._wall_offset = time.perf_counter() - t0
                self.save_checkpoint()
        wall = time.perf_counter() - t0
        last = self.history[-1] if self.history else {}
        failures = self.zo.oracle.failure_report() if self.zo is not None else None
        if failures and failures["failed_queries"]:
            logger.warning("training finished (%s) with %d failed queries: %s", stop_reason,
                           failures["failed_queries"], failures)
        return {
            "test_acc": last.get("test_acc"), "test_loss": last.get("test_loss"), "train_acc": last.get("train_acc"),
            "queries": self.queries, "steps": self.global_step, "epochs": self.epoch, "wall_s": wall,
            "stop_reason": stop_reason, "history": self.history, "failures": failures,
        }

    def _loader_generator(self) -> torch.Generator | None:
        generator = getattr(self.train_loader, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def _step_checkpoint_due(self) -> bool:
        """A mid-epoch checkpoint after this step (not when the epoch-end checkpoint follows anyway)."""
        if self.output_dir is None or self.checkpoint_every_steps is None:
            return False
        if self.global_step % self.checkpoint_every_steps != 0:
            return False
        if self._batch_in_epoch == self.steps_per_epoch:
            ending = self.epoch + 1
            return not (ending % self.checkpoint_every == 0 or ending == self.epochs)
        return True

    def _log_failures(self, step: int) -> None:
        """Append the oracle's failures recorded since the last call to ``failures.jsonl``."""
        if self.zo is None:
            return
        new = self.zo.oracle.failures[self._failures_logged:]
        if not new:
            return
        self._failures_logged += len(new)
        for f in new:
            logger.debug("step %d: %s", step, f.message)
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"step": step, "epoch": self.epoch + 1, **f.as_dict()}) + "\n" for f in new)
        with (self.output_dir / "failures.jsonl").open("a") as fh:
            fh.write(lines)

    def _epoch_record(self, losses: list[float], wall: float) -> dict:
        finite = [v for v in losses if math.isfinite(v)]
        record = {"epoch": self.epoch, "step": self.global_step, "method": self.method,
                  "train_batch_loss": sum(finite) / len(finite) if finite else None,
                  "lr": self.optimizer.param_groups[0]["lr"], "queries": self.queries, "wall_s": round(wall, 3)}
        if self.zo is not None:
            record["failures"] = self.zo.oracle.failure_report()
        train = self.evaluate(self.train_loader)
        record.update(train_loss=train["loss"], train_acc=train["acc"])
        if self.test_loader is not None:
            test = self.evaluate(self.test_loader)
            record.update(test_loss=test["loss"], test_acc=test["acc"])
        return record

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "engine": self.engine.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "wall_offset": self._wall_offset,
            "history": json.dumps(self.history),
            "batch_in_epoch": self._batch_in_epoch,
            "epoch_losses": [float(v) for v in self._epoch_losses] if self._batch_in_epoch else [],
        }
        generator = self._loader_generator()
        if generator is not None:
            # mid-epoch: the state the epoch's shuffle was drawn from (resume replays it)
            mid_epoch = self._batch_in_epoch > 0 and self._epoch_loader_rng is not None
            state["loader_rng"] = self._epoch_loader_rng if mid_epoch else generator.get_state()
        if self.sparse is not None:
            state["sparse"] = {"sampler": self.sparse.sampler.state_dict(), "drawn_at": self._mask_drawn_at,
                               "coords": self.coords.cpu() if self.coords is not None else torch.empty(0)}
        if self.zo is not None:
            state["oracle"] = self.zo.oracle.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        batch_in_epoch = state.get("batch_in_epoch", 0)
        if isinstance(batch_in_epoch, bool) or not isinstance(batch_in_epoch, int) or not (
                0 <= batch_in_epoch <= self.steps_per_epoch):
            raise CheckpointError(f"the checkpoint was taken after batch {batch_in_epoch!r} of an epoch, but this "
                                  f"train_loader has {self.steps_per_epoch} batches per epoch")
        try:
            self.engine.load_state_dict(state["engine"])  # checked against this trainer's run first
            self.model.load_state_dict(state["model"])
            torch.set_rng_state(state["torch_rng"])
            self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
            self._wall_offset = float(state["wall_offset"])
            self.history = json.loads(state["history"])
            self._batch_in_epoch = batch_in_epoch
            self._epoch_losses = [float(v) for v in state.get("epoch_losses", [])]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint does not match this trainer/model: {exc}") from exc
        generator = self._loader_generator()
        if "loader_rng" in state and generator is not None:
            generator.set_state(state["loader_rng"])
            self._epoch_loader_rng = state["loader_rng"] if self._batch_in_epoch else None
        if self.sparse is not None and "sparse" in state:
            self.sparse.sampler.load_state_dict(state["sparse"]["sampler"])
            self._mask_drawn_at = int(state["sparse"]["drawn_at"])
            coords = state["sparse"]["coords"]
            self.coords = coords.to(self.device) if coords.numel() else None
        if self.zo is not None:
            if "oracle" in state:
                self.zo.oracle.load_state_dict(state["oracle"])
            self._failures_logged = len(self.zo.oracle.failures)

    def save_checkpoint(self) -> Path:
        if self.output_dir is None:
            raise ConfigError("save_checkpoint needs an output_dir")
        meta = {"epoch": self.epoch, "step": self.global_step, "batch_in_epoch": self._batch_in_epoch,
                "method": self.method, "queries": self.queries}
        return save_checkpoint(self.output_dir / "checkpoints", self.state_dict(), meta, tag=self.global_step)

    def resume(self) -> bool:
        """Load the newest checkpoint in ``output_dir/checkpoints``; ``False`` if there is none.

        ``metrics.jsonl`` and ``failures.jsonl`` are cut back to what the checkpoint has seen, so
        the records a killed run wrote after its last checkpoint are not duplicated when the
        resumed run repeats those steps.
        """
        if self.output_dir is None:
            raise ConfigError("resume needs an output_dir")
        directory = self.output_dir / "checkpoints"
        if latest_checkpoint(directory) is None:
            return False
        state, meta = load_checkpoint(directory, map_location=self.device)
        self.load_state_dict(state)
        self._truncate_logs()
        logger.info("resumed from %s: step %d, epoch %d + %d batches, %d queries spent",
                    meta.get("file", directory), self.global_step, self.epoch, self._batch_in_epoch, self.queries)
        return True

    def _truncate_logs(self) -> None:
        metrics = self.output_dir / "metrics.jsonl"
        if metrics.exists():
            _replace_text(metrics, "".join(json.dumps(r) + "\n" for r in self.history))
        failures = self.output_dir / "failures.jsonl"
        if failures.exists():
            kept = []
            for line in failures.read_text().splitlines(keepends=True):
                try:
                    step = json.loads(line)["step"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the kill
                if step <= self.global_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            _replace_text(failures, "".join(kept))


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _format_record(r: dict, epochs: int) -> str:
    parts = [f"epoch {r['epoch']:>3}/{epochs}", f"train loss {r['train_loss']:.4f}", f"train acc {r['train_acc']:.3f}"]
    if "test_acc" in r:
        parts.append(f"test acc {r['test_acc']:.3f}")
    parts.append(f"queries {r['queries']:,}")
    if r.get("failures", {}).get("failed_queries"):
        parts.append(f"failed queries {r['failures']['failed_queries']:,}")
    parts.append(f"{r['wall_s']:.1f}s")
    return "  ".join(parts)
