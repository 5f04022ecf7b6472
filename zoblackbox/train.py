"""Training torch models with zeroth-order gradients (or first-order, for reference).

:class:`Trainer` runs epochs over a data loader with any ``torch.optim`` optimizer and a warm-up +
cosine (or constant) LR schedule. It is a driver of the ask/tell engine
(:class:`~zoblackbox.engine.AskTell`): each step sets the batch on the model's
:class:`~zoblackbox.torch_module.ModuleOracle` and runs one engine iteration (``method="zo"``), or
hands the engine an autograd gradient (``method="fo"``, the reference the ZO run is compared with),
so the update rule, the LR schedule, the query budget and the sparse mask are the engine's.
:meth:`Trainer.fit` is a short loop over epochs and batches; what surrounds it is attached as parts
(:mod:`zoblackbox.trainer_parts`, user parts via ``parts=[...]``): the sparse-mask redraws, a tqdm
progress bar, one JSON line of metrics per epoch in ``<output_dir>/metrics.jsonl``, the failure
log, and a safe checkpoint (``zoblackbox.checkpoint``) every ``checkpoint_every`` epochs and,
optionally, every ``checkpoint_every_steps`` steps, from which :meth:`Trainer.fit` resumes with
``resume=True`` -- bitwise exactly, also in the middle of an epoch (data order, RNG states,
optimizer, LR schedule and sparse masks are all in the checkpoint).

Failed queries (see ``docs/failures.md``) are never dropped silently: each one is appended to
``<output_dir>/failures.jsonl`` with the step it happened in, every epoch's metrics carry the
running counts by kind, a warning is logged (logger ``zoblackbox.train``) for every epoch with
failures, and :meth:`Trainer.fit` returns the oracle's failure report.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._types import SchedulerLike
from .checkpoint import check_int, check_rng_state, field_error
from .engine import AskTell
from .errors import CheckpointError, ConfigError, OracleError
from .estimators import CoordinateEstimator, Estimator
from .optim import ZOGradient
from .oracle import check_device
from .params import ParamLayout
from .result import ZOResult
from .rules import UpdateRule
from .schedules import Constant, WarmupCosine
from .sparsity import SparseSchedule
from .trainer_parts import HOOKS, EpochProgress, FailureLog, MaskRedraw, MetricsLog, TrainerCheckpoints, check_parts

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


__all__ = ["Trainer", "warmup_cosine"]

logger = logging.getLogger(__name__)

METHODS = ("zo", "fo")
LR_SCHEDULES = ("cosine", "constant")
#: the keys of a Trainer's state (parts with a ``state_key`` add theirs)
_STATE_KEYS = frozenset({"model", "engine", "torch_rng", "epoch", "global_step", "wall_offset", "history",
                         "batch_in_epoch", "epoch_losses", "loader_rng", "oracle", MaskRedraw.state_key})


def warmup_cosine(total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine decay to ``final_fraction``
    (:class:`zoblackbox.schedules.WarmupCosine`; kept under this name for existing code)."""
    return WarmupCosine(total_steps, warmup_steps, final_fraction)


class Trainer:
    """Epoch-based training of a torch model with a ZO (or, for reference, FO) gradient.

    A driver of :class:`AskTell`: each step sets the batch on the model's oracle and runs one
    engine iteration (``method="zo"``), or hands the engine the autograd gradient
    (``method="fo"``). :meth:`fit` trains; checkpoints (with ``output_dir``) resume bitwise exactly.

    Parameters
    ----------
    model : torch.nn.Module
        The module to train (moved to ``device``).
    train_loader : torch.utils.data.DataLoader
        Yields ``(inputs, targets)`` and has a length of at least 1; its ``generator`` (if any) is
        checkpointed so a resumed run sees the same shuffles.
    test_loader : torch.utils.data.DataLoader or None, default None
        Evaluated after every epoch.
    loss_fn : callable, default torch.nn.functional.cross_entropy
        ``loss_fn(outputs, targets) -> scalar tensor``.
    method : {"zo", "fo"}, default "zo"
        Zeroth-order, or the autograd reference.
    estimator : Estimator or None, default None
        ZO estimator (``None``: ``CoordinateEstimator()``).
    optimizer : str or type or UpdateRule, default "adam"
        A name (``"sgd"``, ``"adam"``, ``"adamw"``, ``"signsgd"``), a ``torch.optim`` class, or an
        update rule such as :class:`~zoblackbox.SeedReplaySGD` (which then holds its own ``lr`` and
        schedule: ``lr``, ``optimizer_kwargs`` and ``lr_schedule`` are not used).
    lr : float, default 1e-3
        Peak learning rate, positive and finite.
    optimizer_kwargs : dict or None, default None
        E.g. ``{"momentum": 0.9, "weight_decay": 5e-4}``.
    lr_schedule : {"cosine", "constant"}, default "cosine"
        Warm-up then cosine decay per step (:class:`WarmupCosine`), or :class:`Constant`.
    warmup_steps : int, default 0
        Linear warm-up length in steps, ``>= 0``.
    epochs : int, default 10
        Number of epochs, ``>= 1``.
    budget : int or None, default None
        Maximum ZO queries, ``>= 1``; training stops cleanly before a step would exceed it.
    bn_policy : {"batch", "eval"}, default "batch"
        BatchNorm handling during ZO queries.
    scheduler : zoblackbox.schedule.Scheduler or None, default None
        Query scheduler for the ZO estimates (``zoblackbox.schedule``).
    device : str or torch.device, default "cpu"
        ``"cpu"``, ``"cuda"``, ...
    output_dir : str or pathlib.Path or None, default None
        Where ``metrics.jsonl``, ``failures.jsonl`` and checkpoints go (``None``: nothing written).
    checkpoint_every : int, default 1
        Epochs between checkpoints, ``>= 1`` (needs ``output_dir``).
    progress : bool, default True
        Show tqdm progress bars.
    oracle_kwargs : dict or None, default None
        Extra arguments of the :class:`~zoblackbox.adapters.ModuleOracle` (``on_failure``,
        ``chunk_size``, ...).
    sparse : zoblackbox.sparsity.SparseSchedule or None, default None
        Each step estimates (ZO) or keeps (FO, sparse-gradient reference) only the coordinates of
        the current mask, redrawn every ``interval`` epochs or steps; the model stays dense.
    checkpoint_every_steps : int or None, default None
        Also write a checkpoint every this many optimizer steps, ``>= 1``, in the middle of epochs
        (``None``: only at epoch ends). A run killed at any moment resumes from the last one and
        ends with the same parameters, bitwise, as an uninterrupted run (on the same device and
        torch build).
    parts : sequence or None, default None
        Extra pieces around the loop (``zoblackbox.trainer_parts``: hooks called before and after
        every step, at epoch ends...; a part with a ``state_key`` is checkpointed). They run after
        the built-in ones and before the checkpoints.

    Attributes
    ----------
    parts : list
        Every attached part, in the order their hooks run: the sparse-mask redraw (with
        ``sparse``), the progress bar, the failure log (ZO), the metrics log (with
        ``output_dir``), the user's ``parts``, and the checkpoints (with ``output_dir``).
    epoch : int
        Epochs finished.
    global_step : int
        Optimizer steps taken.
    history : list of dict
        The epoch records.

    Raises
    ------
    ConfigError
        An unknown ``method``, ``lr_schedule`` or ``bn_policy``; ``epochs``, ``warmup_steps``,
        ``checkpoint_every``, ``checkpoint_every_steps`` or ``budget`` out of range; a
        ``train_loader`` without a length or without batches; a device torch cannot use; a bad
        ``lr`` or optimizer setting.
    TypeError
        ``estimator`` not an :class:`Estimator`, ``model`` not a module, ``loss_fn`` not callable.

    Examples
    --------
    Three epochs of ZO training (RGE with Adam) of a small MLP on the bundled digits:

    >>> import torch
    >>> from zoblackbox import RandomEstimator, Trainer
    >>> from zoblackbox.data import load_digits_split, make_loader
    >>> from zoblackbox.models import digits_mlp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> split = load_digits_split()
    >>> train = make_loader(split.x_train, split.y_train, 64, shuffle=True)
    >>> test = make_loader(split.x_test, split.y_test, 256, shuffle=False)
    >>> trainer = Trainer(digits_mlp(hidden=16), train, test, estimator=RandomEstimator(q=10, seed=0),
    ...                   lr=3e-2, epochs=3, progress=False)
    >>> result = trainer.fit()
    >>> result["epochs"], result["steps"], result["queries"]
    (3, 69, 759)
    >>> bool(result["test_acc"] > 0.3)
    True
    """

    def __init__(self, model: nn.Module, train_loader: DataLoader, test_loader: DataLoader | None = None, *,
                 loss_fn: Callable = F.cross_entropy,
                 method: str = "zo", estimator: Estimator | None = None,
                 optimizer: str | type[torch.optim.Optimizer] | UpdateRule = "adam", lr: float = 1e-3,
                 optimizer_kwargs: dict | None = None, lr_schedule: str = "cosine", warmup_steps: int = 0,
                 epochs: int = 10, budget: int | None = None, bn_policy: str = "batch",
                 scheduler: SchedulerLike | None = None,
                 device: str | torch.device = "cpu", output_dir: str | Path | None = None,
                 checkpoint_every: int = 1, progress: bool = True, oracle_kwargs: dict | None = None,
                 sparse: SparseSchedule | None = None, checkpoint_every_steps: int | None = None,
                 parts: Sequence | None = None):
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
        self.device = check_device(device)  # a device torch cannot parse or use: ConfigError naming it
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
        self.mask = MaskRedraw(sparse, self.layout, self.device) if sparse is not None else None
        if method == "zo":
            self.zo = ZOGradient(model, loss_fn, estimator=estimator, bn_policy=bn_policy, scheduler=scheduler,
                                 **(oracle_kwargs or {}))
            n_coords = sparse.sampler.n_active if sparse is not None else None
            self.step_cost = self.zo.estimator.num_queries(self.zo.oracle.dim, n_coords)
            if budget is not None and budget < self.step_cost:
                raise ConfigError(f"budget={budget} is below the cost of one step ({self.step_cost} queries)")
        # the one loop: the engine owns the update rule, the LR schedule and the query budget
        rule_given = isinstance(optimizer, UpdateRule)  # e.g. SeedReplaySGD: it holds its own lr and schedule
        self.engine = AskTell(self._flat_params().detach(), estimator=self.zo.estimator if self.zo else
                              CoordinateEstimator(), optimizer=optimizer, lr=None if rule_given else lr,
                              optimizer_kwargs=None if rule_given else optimizer_kwargs,
                              lr_schedule=None if rule_given else schedule, budget=budget if method == "zo" else None,
                              evaluate_final=False)
        self.checkpoints = TrainerCheckpoints(self.output_dir / "checkpoints", checkpoint_every,
                                              checkpoint_every_steps) if self.output_dir is not None else None
        self.parts = self._attach(progress, check_parts(parts, reserved=_STATE_KEYS))
        # the loop's position (a mid-epoch checkpoint holds it, to resume exactly)
        self.epoch = 0
        self.global_step = 0
        self._batch_in_epoch = 0
        self.history: list[dict] = []
        self._wall_offset = 0.0
        self._t0: float | None = None  # set while fit() runs
        self._epoch_losses: list[float] = []
        self._epoch_loader_rng: torch.Tensor | None = None  # loader generator state at the epoch start

    def _attach(self, progress: bool, extra: list) -> list:
        """The parts around the loop, in the order their hooks run: the mask first (it sets up the
        step), the built-in logs, the user's parts, and the checkpoints last (they see the rest)."""
        out = self.output_dir
        parts = [self.mask, EpochProgress() if progress else None,
                 FailureLog(self.zo.oracle, out / "failures.jsonl" if out is not None else None) if self.zo else None,
                 MetricsLog(out / "metrics.jsonl") if out is not None else None, *extra, self.checkpoints]
        parts = [p for p in parts if p is not None]
        self._hooks = {h: [getattr(p, h) for p in parts if callable(getattr(p, h, None))] for h in HOOKS}
        return parts

    # ------------------------------------------------------------------ run state
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The engine's ``torch.optim`` optimizer (over the flat parameter vector)."""
        return self.engine.rule.opt  # type: ignore[attr-defined]  # the Trainer's rule is first-order

    def _current_lr(self) -> float:
        """The learning rate of the next step (a rule without a ``torch.optim`` optimizer says its own)."""
        rule = self.engine.rule
        opt = getattr(rule, "opt", None)
        return opt.param_groups[0]["lr"] if opt is not None else float(rule.current_lr)  # type: ignore[attr-defined]

    @property
    def lr_schedule(self):
        """The engine's ``LambdaLR`` over :attr:`optimizer`."""
        return self.engine.rule.sched

    @property
    def queries(self) -> int:
        """ZO queries spent so far (0 for first-order training)."""
        return self.zo.nfev if self.zo is not None else 0

    @property
    def coords(self) -> torch.Tensor | None:
        """The current sparse mask's coordinates (``None``: dense training, or before the first draw)."""
        return self.mask.coords if self.mask is not None else None

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already trained on."""
        return self._batch_in_epoch

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of training, over all the runs a resumed training consists of."""
        return self._wall_offset if self._t0 is None else time.perf_counter() - self._t0

    @torch.no_grad()
    def evaluate(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
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

    def flat_params(self) -> torch.Tensor:
        """The trainable parameters as one flat vector (in ``layout`` order)."""
        named = dict(self.model.named_parameters())
        return self.layout.flatten({n: named[n] for n in self.layout.names})

    _flat_params = flat_params

    def _set_flat_params(self, x: torch.Tensor) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in self.layout.unflatten(x).items():
                named[n].copy_(t)

    # ------------------------------------------------------------------ training
    def fit(self, resume: bool = False) -> ZOResult:
        """Train for the configured epochs (continuing from the last checkpoint with ``resume``).

        Returns:
            a :class:`~zoblackbox.result.ZOResult` (a dict): ``test_acc``, ``test_loss``,
            ``train_acc``, ``queries``, ``steps``, ``epochs``, ``wall_s``, ``stop_reason``,
            ``failures`` (the oracle's :meth:`~zoblackbox.oracle.Oracle.failure_report`, ``None``
            for first-order training) and the per-epoch ``history``; under scipy's names too:
            ``fun`` (the last train loss), ``nfev``, ``nit``, ``message``, ``success``, ``wall_time``.

        Raises:
            OracleError: a query failed under the ``raise`` failure policy (the default); the
                message names the query, a note names the training step, and the failure is in
                ``failures.jsonl``.
        """
        if resume:
            self.resume()
        self._t0 = time.perf_counter() - self._wall_offset
        try:
            return self._fit()
        finally:
            self._wall_offset, self._t0 = self.elapsed, None

    def _fit(self) -> ZOResult:
        stop_reason = "completed"
        self.model.train()
        self._emit("on_fit_start")
        while self.epoch < self.epochs and stop_reason == "completed":
            skip = self._start_epoch()
            self._emit("on_epoch_start")
            for xb, yb in self._batches(skip):
                self._emit("before_step")
                try:
                    loss = self._step(xb, yb)
                except OracleError as exc:
                    self._emit("on_step_error", exc)
                    raise
                if loss is None:  # the engine stopped: the query budget, or a step that failed
                    stop_reason = self._engine_stop_reason()
                    break
                self._epoch_losses.append(loss)
                self._batch_in_epoch += 1
                self._emit("after_step", loss)
            if stop_reason == "completed":
                self.epoch += 1
                self._batch_in_epoch = 0
            record = self._epoch_record(self._epoch_losses, self.elapsed)
            self.history.append(record)
            self._emit("on_epoch_end", record)
        last = self.history[-1] if self.history else {}
        train_loss = last.get("train_loss")
        diverged = stop_reason != "completed" and not self.engine.success
        summary = ZOResult(
            test_acc=last.get("test_acc"), test_loss=last.get("test_loss"), train_acc=last.get("train_acc"),
            queries=self.queries, steps=self.global_step, epochs=self.epoch, wall_s=self.elapsed,
            stop_reason=stop_reason, history=self.history,
            failures=self.zo.oracle.failure_report() if self.zo is not None else None,
            # the library's one result type: the same run under scipy's names (the parameters are the model's)
            fun=math.nan if train_loss is None else train_loss, nfev=self.queries, nit=self.global_step,
            message=stop_reason, success=not diverged and train_loss is not None and math.isfinite(train_loss),
            wall_time=self.elapsed,
        )
        self._emit("on_fit_end", summary)
        return summary

    def _engine_stop_reason(self) -> str:
        """Why the engine ended the run: the query budget (a clean stop), or the message of the step
        that failed (e.g. the parameters became non-finite), logged as an error."""
        eng = self.engine
        if eng.success:
            return f"query budget reached ({self.queries} of {self.budget})"
        lr = self._current_lr()
        if "non-finite" in eng.message:
            reason = (f"training diverged after step {self.global_step}: step {self.global_step + 1} made the "
                      f"parameters non-finite and was undone; the step size (lr={lr!r}) is the likely cause, lower "
                      f"lr [engine: {eng.message}]")
        else:
            reason = f"training stopped after step {self.global_step}: {eng.message} (lr={lr!r})"
        logger.error("%s", reason)
        return reason

    def _emit(self, hook: str, *args) -> None:
        for fn in self._hooks[hook]:
            fn(self, *args)

    def _start_epoch(self) -> int:
        """Prepare the data of the current epoch; returns the batches to skip. A resumed epoch
        replays its shuffle (the loader's generator state at its start), and the batches used before
        the checkpoint are read again, not trained on."""
        generator = self._loader_generator()
        if self._batch_in_epoch == 0:
            self._epoch_losses = []
            self._epoch_loader_rng = generator.get_state() if generator is not None else None
        elif generator is not None and self._epoch_loader_rng is not None:
            generator.set_state(self._epoch_loader_rng)
        return self._batch_in_epoch

    def _batches(self, skip: int):
        """The epoch's batches after the first ``skip``. One loader iterator is made and dropped
        first: the loop used to iterate through a ``tqdm.auto`` bar, whose constructor makes one,
        and a ``DataLoader`` iterator draws its base seed from the loader's generator. Kept so that
        data orders, and the mid-epoch checkpoints written before, stay the same."""
        iter(self.train_loader)
        return itertools.islice(self.train_loader, skip, None)

    def _step(self, xb, yb) -> float | None:
        """One engine iteration on this batch; ``None`` when the engine's budget ended the run."""
        eng = self.engine
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
            loss_t = self.loss_fn(self.model(xb.to(self.device)), yb.to(self.device))
            loss_t.backward()
            loss = float(loss_t.detach())
            named = dict(self.model.named_parameters())
            grad = self.layout.flatten({n: g if (g := named[n].grad) is not None else torch.zeros_like(named[n])
                                        for n in self.layout.names})
            if self.mask is not None:
                grad = self.mask.mask_gradient(grad)
            if eng.step_gradient(grad, loss) is None:
                return None
        self._set_flat_params(eng.rule.x)
        self.global_step += 1
        return loss

    def _loader_generator(self) -> torch.Generator | None:
        generator = getattr(self.train_loader, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def _epoch_record(self, losses: list[float], wall: float) -> dict:
        finite = [v for v in losses if math.isfinite(v)]
        record = {"epoch": self.epoch, "step": self.global_step, "method": self.method,
                  "train_batch_loss": sum(finite) / len(finite) if finite else None,
                  "lr": self._current_lr(), "queries": self.queries, "wall_s": round(wall, 3)}
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
            "wall_offset": self.elapsed,
            "history": json.dumps(self.history),
            "batch_in_epoch": self._batch_in_epoch,
            "epoch_losses": [float(v) for v in self._epoch_losses] if self._batch_in_epoch else [],
        }
        generator = self._loader_generator()
        if generator is not None:
            # mid-epoch: the state the epoch's shuffle was drawn from (resume replays it)
            mid_epoch = self._batch_in_epoch > 0 and self._epoch_loader_rng is not None
            state["loader_rng"] = self._epoch_loader_rng if mid_epoch else generator.get_state()
        for part in self.parts:
            if getattr(part, "state_key", None) is not None:
                state[part.state_key] = part.state_dict()
        if self.zo is not None:
            state["oracle"] = self.zo.oracle.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`. Every field is checked against what this trainer's run could have
        written (types, ranges, sizes, and the counters against each other) before anything changes;
        a failure is a :class:`~zoblackbox.errors.CheckpointError` naming the field."""
        checked = self._check_state(state)
        # the engine checks its own state and is left as it was when that fails; nothing else is set yet
        try:
            self.engine.load_state_dict(state["engine"])
        except CheckpointError as exc:
            raise CheckpointError(f"field engine: {exc}") from exc
        self.model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self._wall_offset = float(state["wall_offset"])
        self.history = checked["history"]
        self._batch_in_epoch = state["batch_in_epoch"]
        self._epoch_losses = [float(v) for v in state["epoch_losses"]]
        generator = self._loader_generator()
        if generator is not None:
            generator.set_state(state["loader_rng"])
            self._epoch_loader_rng = state["loader_rng"] if self._batch_in_epoch else None
        if self.mask is not None:
            self.mask.load_state_dict(state[self.mask.state_key])
        if self.zo is not None:
            self.zo.oracle.load_state_dict(state["oracle"])
        for part in self.parts:  # the user's parts (they check their own states)
            key = getattr(part, "state_key", None)
            if key is not None and part is not self.mask and key in state:
                part.load_state_dict(state[key])
        self._emit("on_load")

    def _check_state(self, state) -> dict:
        """Check every field of a Trainer state; returns the decoded ones. Changes nothing."""
        if not isinstance(state, dict):
            raise CheckpointError(f"a Trainer state must be a dict, got {type(state).__name__}")
        required = ["model", "engine", "torch_rng", "epoch", "global_step", "wall_offset", "history",
                    "batch_in_epoch", "epoch_losses"]
        generator = self._loader_generator()
        if generator is not None:
            required.append("loader_rng")
        if self.mask is not None:
            required.append(self.mask.state_key)
        if self.zo is not None:
            required.append("oracle")
        for key in required:
            if key not in state:
                raise CheckpointError(f"field {key} is missing; a state of this trainer has "
                                      f"{', '.join(required)}")
        spe = self.steps_per_epoch
        batch_in_epoch = state["batch_in_epoch"]
        if isinstance(batch_in_epoch, bool) or not isinstance(batch_in_epoch, int) or not 0 <= batch_in_epoch <= spe:
            raise CheckpointError(f"field batch_in_epoch: the checkpoint was taken after batch {batch_in_epoch!r} of "
                                  f"an epoch, but this train_loader has {spe} batches per epoch")
        for key in ("epoch", "global_step"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise field_error(key, value, "an int >= 0")
        epoch, global_step = state["epoch"], state["global_step"]
        check_int(epoch, "epoch", 0, self.epochs, f"this run has {self.epochs} epochs")
        if epoch == self.epochs and batch_in_epoch:
            raise CheckpointError(f"field epoch is {epoch} with batch_in_epoch={batch_in_epoch}: a run of "
                                  f"{self.epochs} epochs trains no batch after its last epoch")
        if global_step != epoch * spe + batch_in_epoch:
            # the three counters contradict each other: name all of them, any may be the wrong one
            raise field_error("global_step", global_step, f"epoch * steps_per_epoch + batch_in_epoch = {epoch} * "
                                                          f"{spe} + {batch_in_epoch} (the steps a run has taken then, "
                                                          f"from field epoch and field batch_in_epoch)")
        wall = state["wall_offset"]
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not (math.isfinite(wall) and wall >= 0):
            raise field_error("wall_offset", wall, "a finite number of seconds >= 0")
        history = state["history"]
        if not isinstance(history, str):
            raise field_error("history", history, "a JSON string of the epoch records")
        try:
            history = json.loads(history)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"field history is not JSON: {exc}") from exc
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise field_error("history", history, "a list of epoch records (dicts)")
        losses = state["epoch_losses"]
        if not isinstance(losses, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses):
            raise field_error("epoch_losses", losses, "a list of floats (the losses of the epoch's steps so far)")
        if len(losses) != batch_in_epoch:
            raise field_error("epoch_losses", losses, f"a list of {batch_in_epoch} losses (one per batch of the "
                                                      "epoch so far)")
        check_rng_state(state["torch_rng"], "torch_rng", torch.get_rng_state())
        if generator is not None:
            check_rng_state(state["loader_rng"], "loader_rng", generator.get_state(), generator.device)
        self._check_model_state(state["model"])
        engine_state = state["engine"]
        boundary = engine_state.get("boundary") if isinstance(engine_state, dict) else None
        if not isinstance(boundary, dict):
            raise field_error("engine", engine_state, "an AskTell state (a dict with a 'boundary')")
        iterations = boundary.get("iterations")
        if iterations != global_step or isinstance(iterations, bool):
            raise field_error("engine.boundary.iterations", iterations, f"global_step ({global_step}): one engine "
                                                                        "iteration per training step")
        if self.mask is not None:
            self.mask.check_state_dict(state[self.mask.state_key])
        if self.zo is not None:
            oracle = state["oracle"]
            nfev, _ = self.zo.oracle.check_state_dict(oracle)
            check_int(nfev, "oracle.nfev", 0, self.budget, "the run's budget" if self.budget is not None else "")
            told = engine_state.get("told_nfev")
            engine_nfev = boundary.get("nfev")
            counted = isinstance(engine_nfev, int) and not isinstance(engine_nfev, bool) and engine_nfev >= 0 and (
                self.budget is None or engine_nfev <= self.budget) and isinstance(told, list) and all(
                isinstance(n, int) and n >= 1 for n in told)  # else the engine's own check names it
            if counted and nfev != engine_nfev + sum(told):
                raise CheckpointError(f"field oracle.nfev is {nfev}, but the engine counted {engine_nfev + sum(told)} "
                                      "queries (field engine.boundary.nfev): every query of a training run is the "
                                      "engine's")
        return {"history": history}

    def _check_model_state(self, model_state) -> None:
        mine = self.model.state_dict()
        if not isinstance(model_state, dict):
            raise field_error("model", model_state, "a dict of tensors (the model's state_dict)")
        missing, extra = sorted(set(mine) - set(model_state)), sorted(map(str, set(model_state) - set(mine)))
        if missing or extra:
            raise CheckpointError(f"field model does not match this model: missing {missing}, unexpected {extra}")
        for key, ref in mine.items():
            value = model_state[key]
            if not isinstance(value, torch.Tensor) or value.shape != ref.shape or value.dtype != ref.dtype:
                raise field_error(f"model.{key}", value, f"a {str(ref.dtype).replace('torch.', '')} tensor of shape "
                                                         f"{tuple(ref.shape)}")

    def save_checkpoint(self) -> Path:
        if self.checkpoints is None:
            raise ConfigError("save_checkpoint needs an output_dir")
        return self.checkpoints.save(self)

    def resume(self) -> bool:
        """Load the newest checkpoint in ``output_dir/checkpoints``; ``False`` if there is none.

        ``metrics.jsonl`` and ``failures.jsonl`` are cut back to what the checkpoint has seen, so
        the records a killed run wrote after its last checkpoint are not duplicated when the
        resumed run repeats those steps.
        """
        if self.checkpoints is None:
            raise ConfigError("resume needs an output_dir")
        if not self.checkpoints.exists():
            return False
        state, meta = self.checkpoints.load(map_location=self.device)
        try:
            self.load_state_dict(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{self.checkpoints.directory / str(meta.get('file', ''))}: {exc}") from exc
        self._emit("on_resume")
        logger.info("resumed from %s: step %d, epoch %d + %d batches, %d queries spent",
                    meta.get("file", self.checkpoints.directory), self.global_step, self.epoch,
                    self._batch_in_epoch, self.queries)
        return True
