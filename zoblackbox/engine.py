"""The ask/tell engine: the one optimization loop under every driver.

:class:`AskTell` owns the iterate, the gradient estimator, the update rule, the query budget and
the random state. It is driven in one of two ways:

* **ask/tell**, when the points are evaluated outside Python's control (a cluster queue, a lab
  instrument, a co-simulation)::

      solver = AskTell(x0, budget=2_000)
      while not solver.done:
          X = solver.ask()                 # 2-D: one row per point to evaluate
          solver.tell([f(x) for x in X])   # one loss per row
      result = solver.result()

* **against an oracle**: :meth:`AskTell.step` runs one iteration (asks evaluated through the
  oracle, or a scheduler of ``zoblackbox.schedule`` that keeps the plan's structure), and
  :meth:`AskTell.run` runs to the end. :func:`zoblackbox.minimize`, the :class:`~zoblackbox.Trainer`
  and the PDE, certify and gym recipes are thin drivers of this.

The run's budget belongs to the engine: evaluated through an oracle, queries go through a
:class:`BudgetView` (a counting view with the run's limit), so the user's oracle is never changed.
:meth:`AskTell.state_dict` is exact at any moment, in the middle of a line search too: it holds the
rule's committed state at the start of the current iteration plus the losses told since, which
:meth:`AskTell.from_state_dict` replays (tensors and plain containers only; no pickle).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ._types import ArrayLike, BoundsLike, SchedulerLike
from .errors import BudgetExhaustedError, CheckpointError, ConfigError, OracleError
from .estimators import CoordinateEstimator, Estimate, Estimator, RandomEstimator, StepUnderflow
from .oracle import BudgetView, FailurePolicy, Oracle, short_repr
from .plan import QueryPlan, _is_int
from .result import ZOResult
from .rules import LBFGSRule, Stop, UpdateRule, clone_tree, make_rule
from .strategy import PROBE_POINTS, AutoStrategy

__all__ = ["AUTO_MIN_CGE_STEPS", "AUTO_RGE_Q", "AskTell", "BudgetView", "auto_estimator"]

STATE_FORMAT = "zoblackbox-asktell"
STATE_VERSION = 1

#: below this many full CGE iterations within the budget, ``estimator="auto"`` picks RGE
AUTO_MIN_CGE_STEPS = 100
AUTO_RGE_Q = 20


def auto_estimator(dim: int, budget: int | None, seed: int | None = 0) -> Estimator:
    """The default estimator for a ``dim``-vector and a query budget.

    CGE (forward, mu=5e-3) when it is cheap (``dim <= 20``: no more queries per step than RGE with
    q=20), when there is no budget, or when the budget affords at least ``AUTO_MIN_CGE_STEPS``
    full CGE iterations; otherwise RGE with q=20 Gaussian directions, which takes ``(dim+1)/21``
    times more (noisier) steps for the same queries. Rationale, measured on a 1.7k-parameter digits
    CNN with 30k queries: CGE + Adam got 17 steps and 48% test accuracy, RGE (q=20) + Adam 1,430
    steps and 93% (docs/benchmarks.md).
    """
    if dim <= AUTO_RGE_Q or budget is None or budget >= AUTO_MIN_CGE_STEPS * (dim + 1):
        return CoordinateEstimator()
    return RandomEstimator(q=AUTO_RGE_Q, seed=seed)


# ------------------------------------------------------------------------------------------ the engine
class AskTell:
    """The ask/tell engine: the one optimization loop under every driver.

    Driven by hand (:meth:`ask` the points, evaluate them anywhere, :meth:`tell` their losses) or
    against an oracle (:meth:`step`, :meth:`run`); :func:`minimize` and the :class:`Trainer` are
    drivers of it. :meth:`state_dict` is exact at any moment, in the middle of a line search too.

    Parameters
    ----------
    x0 : array_like or torch.Tensor
        The starting point, 1-D, finite. :meth:`ask` returns numpy arrays when ``x0`` is numpy (or
        a list), torch tensors otherwise; the computation dtype is ``x0``'s floating dtype (float64
        for numpy ints, lists and float64 arrays).
    estimator : Estimator or "auto", default "auto"
        The gradient estimator; ``"auto"`` picks from the dimension and the budget (forward CGE
        when ``dim <= 20``, no budget, or at least 100 CGE iterations fit; else RGE with
        ``q=20``; forward CGE for ``"lbfgs"``).
    optimizer : str or type or UpdateRule, default "auto"
        ``"auto"`` (the default strategy when no ``estimator``, ``lr``, ``optimizer_kwargs`` or
        ``lr_schedule`` is given, else ``"adam"``; see :func:`minimize`), ``"sgd"``, ``"adam"``,
        ``"adamw"``, ``"signsgd"``, ``"lbfgs"`` (zoblackbox's L-BFGS for estimated gradients), a
        ``torch.optim`` class, or an update rule of ``zoblackbox.rules``.
    lr : float or None, default None
        Learning rate, positive and finite (``None``: 1e-2; 1 for ``"lbfgs"``, its first trial step).
    budget : int or None, default None
        The most queries the run may use, ``>= 0`` (exact: asks never exceed it, retries included).
    seed : int or None, default 0
        Seed of the estimator chosen by ``"auto"`` and of the default strategy (a given estimator
        keeps its own seed).
    bounds : tuple or scipy.optimize.Bounds or sequence or None, default None
        ``(lower, upper)``, scalars or arrays of length ``dim`` (``-inf``/``inf`` allowed), scipy's
        ``Bounds`` or ``dim`` ``(min, max)`` pairs: iterates and line-search trials are projected
        into the box, and a forward-CGE step that would leave it is taken backwards. Other
        estimators' perturbations may leave the box by their step ``mu``.
    maxiter : int or None, default None
        The most iterations, ``>= 1``.
    optimizer_kwargs : dict or None, default None
        Extra arguments of the optimizer (``momentum``...; L-BFGS's ``history_size``, ``max_ls``,
        ``c1``, ``noise``).
    lr_schedule : callable or None, default None
        ``lr_schedule(iteration) -> factor`` for first-order rules (torch's ``LambdaLR``).
    on_failure : {"raise", "inf", "skip"} or FailurePolicy, default "raise"
        What :meth:`tell` does with a non-finite loss: ``"raise"`` (:class:`OracleError` naming the
        row, and nothing is changed, so the losses can be told again), ``"inf"`` (taken as
        ``+inf``) or ``"skip"`` (left out of the estimate). Runs driven through an oracle use the
        oracle's own policy instead.
    evaluate_final : bool, default True
        Whether the run ends by evaluating the returned point (one query kept for it); drivers
        that train on minibatches switch it off.
    dtype : torch.dtype or None, default None
        The computation dtype (default: ``x0``'s; drivers pass the oracle's).
    device : str or torch.device or None, default None
        The computation device (default: ``x0``'s).

    Attributes
    ----------
    done : bool
        Whether the run has ended (:meth:`result` is then final).
    nit : int
        Iterations finished so far.
    nfev : int
        Queries used so far.
    coords : torch.Tensor or None
        The coordinates the next gradient estimate covers (``None`` = all); drivers with sparse
        masks set it between iterations.
    freeze : torch.Tensor or None
        A boolean mask of coordinates an update may not change.
    observers : list of callable
        ``observer(engine, record)`` run after every iteration (callbacks, progress, logs,
        checkpoints); one returning ``True`` stops the run.
    gradient_hooks : list of callable
        ``hook(x, grad) -> grad`` applied to the estimate before a first-order step (e.g. adding a
        white-box term computed by autograd).

    Raises
    ------
    ConfigError
        A bad value, before any query: non-finite ``x0`` (or one that overflows ``dtype``), a
        negative ``budget``, a bad ``lr``, ``maxiter``, bound, optimizer name or keyword,
        ``lr_schedule`` factor, failure policy, ``dtype`` or ``device``; a ``budget`` too small for
        one iteration.
    TypeError
        ``estimator`` not an :class:`Estimator` or ``"auto"``, ``optimizer_kwargs`` not a mapping.

    See Also
    --------
    minimize : the driver for a Python function.

    Examples
    --------
    >>> import numpy as np
    >>> from zoblackbox import AskTell
    >>> solver = AskTell(np.array([2.0, -1.0]), budget=300)
    >>> while not solver.done:
    ...     X = solver.ask()                               # one row per point
    ...     solver.tell([float(x @ x) for x in X])         # one loss per row
    >>> res = solver.result()
    >>> res.nfev <= 300, bool(res.fun < 1e-8)
    (True, True)

    The state can be saved at any moment and the run continued from it:

    >>> solver = AskTell(np.array([2.0, -1.0]), optimizer="adam", lr=0.1, budget=60)
    >>> X = solver.ask(); solver.tell([float(x @ x) for x in X])
    >>> resumed = AskTell.from_state_dict(solver.state_dict())
    >>> np.array_equal(resumed.ask(), solver.ask())
    True
    """

    # the state machine (set by _begin_iteration / _begin_final; annotations only)
    _pending: QueryPlan | None
    _send: torch.Tensor | None
    _gen: Generator[QueryPlan, torch.Tensor, Any]
    _log: list[tuple[torch.Tensor, int]]

    def __init__(self, x0: ArrayLike, *, estimator: Estimator | str = "auto",
                 optimizer: str | type[torch.optim.Optimizer] | UpdateRule = "auto", lr: float | None = None,
                 budget: int | None = None, seed: int | None = 0, bounds: BoundsLike | None = None,
                 maxiter: int | None = None,
                 optimizer_kwargs: Mapping | None = None, lr_schedule: Callable[[int], float] | None = None,
                 on_failure: FailurePolicy | str = "raise", evaluate_final: bool = True,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None):
        x, self._numpy = start_point(x0, dtype, device)
        self.dim, self.dtype, self.device = int(x.shape[0]), x.dtype, x.device
        if budget is not None and (not _is_int(budget) or budget < 0):
            raise ConfigError(f"budget must be a non-negative int or None, got {budget!r}")
        if maxiter is not None and (not _is_int(maxiter) or maxiter < 0):
            raise ConfigError(f"maxiter must be a non-negative int, got {maxiter!r}")
        if seed is not None and (not _is_int(seed) or not -2**63 <= int(seed) < 2**64):
            raise ConfigError(f"seed must be an int in [-2**63, 2**64) (torch's seed range) or None, got {seed!r}")
        if not isinstance(evaluate_final, (bool, np.bool_)):
            raise TypeError(f"evaluate_final must be a bool, got {evaluate_final!r}")
        self.budget = None if budget is None else int(budget)
        self.maxiter = None if maxiter is None else int(maxiter)
        self.seed = seed
        self.evaluate_final = bool(evaluate_final)
        self.policy = FailurePolicy.coerce(on_failure)
        if self.policy.retries:
            raise ConfigError(f"on_failure={on_failure!r}: retries need an oracle to re-evaluate the point; tell() "
                              "cannot retry (use 'raise', 'inf' or 'skip', or pass retries to the oracle)")
        auto_estimator_asked = isinstance(estimator, str) and estimator == "auto" or estimator is None
        if isinstance(optimizer, str) and optimizer.lower() == "auto":
            # the zero-configuration strategy decides estimator and rule itself; a run that sets either
            # (an estimator, lr, optimizer_kwargs, an lr_schedule) keeps the first-order default, Adam
            tuned = not auto_estimator_asked or lr is not None or optimizer_kwargs or lr_schedule is not None
            optimizer = "adam" if tuned else AutoStrategy()
        is_lbfgs_name = isinstance(optimizer, str) and optimizer.lower() == "lbfgs"
        if auto_estimator_asked:
            # quasi-Newton needs consistent gradients: forward CGE for L-BFGS
            estimator = CoordinateEstimator() if is_lbfgs_name else auto_estimator(self.dim, self.budget, seed)
        if not isinstance(estimator, Estimator):
            raise TypeError(f"estimator must be a zoblackbox Estimator or 'auto', got {short_repr(estimator)}")
        self.estimator = estimator
        self.lower, self.upper = _check_bounds(bounds, self.dim, self.dtype, self.device, x)
        if self.lower is not None and bool(((x < self.lower) | (x > self.upper)).any()):
            bad = ((x < self.lower) | (x > self.upper)).nonzero().flatten()[:5].tolist()
            raise ConfigError(f"x0 lies outside the bounds at indices {bad}: {x[bad].tolist()}")
        self.rule: UpdateRule = make_rule(optimizer, lr, optimizer_kwargs, lr_schedule=lr_schedule,
                                          budget_bound=self.budget is not None)
        self._init = {"optimizer": optimizer, "lr": lr, "optimizer_kwargs": dict(optimizer_kwargs or {}),
                      "lr_schedule": lr_schedule, "bounds": bounds, "on_failure": on_failure}
        step_cost = estimator.num_queries(self.dim)
        final = 1 if self.evaluate_final else 0
        if isinstance(self.rule, AutoStrategy) and self.budget is not None and self.budget < PROBE_POINTS + 1:
            raise ConfigError(f"budget={budget!r} is below the cost of the default strategy's first step "
                              f"({PROBE_POINTS + 1} queries: the loss at x0 and its noise probe)")
        if self.budget is not None and not isinstance(self.rule, (LBFGSRule, AutoStrategy)) \
                and self.budget < step_cost + final:
            raise ConfigError(
                f"budget={budget!r} is below the cost of one iteration ({step_cost} queries for {estimator!r} "
                f"at dim={self.dim})" + (" plus the final evaluation (1 query)" if final else ""))
        self.x0 = x.clone()
        self._coords = None
        self.freeze: torch.Tensor | None = None
        self.observers: list[Callable] = []
        self.gradient_hooks: list[Callable] = []
        self.rule.start(x.clone(), self)
        self.nfev = 0
        self.nit = 0
        self.n_failed = 0
        self.history: list[dict] = []
        self.message, self.success = "", True
        self.phase = "run"
        self._final: tuple | None = None
        self._t0 = time.perf_counter()
        self._wall_offset = 0.0
        self._iterations = 0  # iterations finished (L-BFGS's first one included)
        self._replaying = False
        self._begin_iteration()  # lazy: the first plan is built at the first ask

    # ------------------------------------------------------------------ public protocol
    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        self._settle()
        return self.phase == "done"

    @property
    def x(self):
        """The current iterate (numpy when ``x0`` was numpy)."""
        return self._out(self.rule.x)

    def ask_plan(self) -> QueryPlan:
        """The pending queries as a :class:`~zoblackbox.plan.QueryPlan` (keeps the structure that
        schedulers exploit: coordinate steps or directions around a base point)."""
        self._settle()
        if self.phase == "done":
            raise ConfigError(f"the run is done ({self.message}); nothing more to ask: call result()")
        self._asked = True
        assert self._pending is not None  # _settle() leaves a pending ask unless the run is done
        return self._pending

    def ask(self) -> np.ndarray | torch.Tensor:
        """The points to evaluate next: a 2-D array, one row per point (numpy when ``x0`` was numpy).

        Asking again before :meth:`tell` returns the same points.
        """
        return self._out(self.ask_plan().points())

    def tell(self, losses: ArrayLike, *, nfev: int | None = None) -> None:
        """Report the losses of the points of the last :meth:`ask`, one per row, in order.

        Parameters
        ----------
        losses : sequence of float or array_like
            Real numbers, one per asked row. Non-finite values follow ``on_failure``.
        nfev : int or None, default None
            Queries these losses cost, when not one per row (retries of failed queries).

        Raises
        ------
        ConfigError
            The wrong number of losses, losses of points never asked, an ``nfev`` past the budget,
            or :meth:`tell` after the run ended; the engine is left unchanged.
        OracleError
            A non-finite loss under ``on_failure="raise"``; the engine is left unchanged.
        """
        self._settle()
        if self.phase == "done":
            raise ConfigError(f"tell() after the run ended ({self.message}): there is no pending ask; "
                              "call result()")
        plan = self._pending
        assert plan is not None  # _settle() leaves a pending ask unless the run is done
        if not self._asked:  # the losses cannot be of points the caller has not been given
            raise ConfigError(f"tell() before ask(): call ask() for the {len(plan)} points to evaluate, then "
                              "tell their losses")
        values = _as_losses(losses, len(plan))
        spent = len(plan) if nfev is None else nfev
        if not _is_int(spent) or spent < len(plan):
            raise ConfigError(f"nfev must be an int >= the {len(plan)} losses told, got {nfev!r}")
        keep = 0 if self.phase == "final" else self.rule.keep  # the query kept for the final evaluation
        if self.budget is not None and self.nfev + spent + keep > self.budget:
            kept = f", {keep} kept for the final evaluation" if keep else ""
            raise ConfigError(f"nfev={spent} would take the run past its budget of {self.budget} "
                              f"({self.nfev} used{kept})")
        bad = (~torch.isfinite(values)).nonzero().flatten()
        if bad.numel():
            if self.policy.action == "raise":
                i = int(bad[0])
                raise OracleError(f"tell(): loss #{i} of {len(plan)} is {float(values[i])!r} (not finite); pass "
                                  "on_failure='inf' or 'skip' to AskTell to keep going", query_index=i,
                                  value=float(values[i]), kind="nonfinite")
            values[bad] = math.inf if self.policy.action == "inf" else math.nan
        self.n_failed += int(bad.numel())
        self._accept(values, int(spent))
        self._settle(hold=True)  # the losses are used now; the next plan is built at the next ask

    def result(self) -> ZOResult:
        """The run's result (final once :attr:`done`; before that, the current iterate and its
        latest measured loss)."""
        done = self.done
        if self._final is not None:
            x, fun = self._final
        else:
            x, fun = self.rule.x, self._last_f0()
        fun = math.nan if fun is None else float(fun)
        return ZOResult(
            x=x.detach().to("cpu").numpy().copy(), fun=fun, nfev=self.nfev, nit=self._nit(),
            success=bool(self.success and math.isfinite(fun) and done), message=self.message,
            history=list(self.history), failures=self._failure_report(),
            wall_time=self._wall_offset + time.perf_counter() - self._t0,
            **({"strategy": self.rule.strategy} if hasattr(self.rule, "strategy") else {}),
        )

    # ------------------------------------------------------------------ driving through an oracle
    def step(self, oracle: Oracle, scheduler: SchedulerLike | None = None) -> dict | None:
        """Run one iteration against ``oracle`` (through ``scheduler`` if given); returns its
        history record, or ``None`` when the run ended without finishing another iteration.

        The next iteration's plan is not built before the next call, so what a driver sets in
        between (``oracle.set_batch(...)``, :attr:`coords`) applies to it."""
        view = self._view(oracle)
        self._limit_source = view.unwrapped
        finished = self._iterations
        while True:
            self._settle()
            if self.phase == "done" or self._iterations != finished:
                break
            plan = self._pending
            assert plan is not None  # _settle() leaves a pending ask unless the run is done
            keep = 0 if self.phase == "final" else self.rule.keep
            view.set_limit(None if self.budget is None else self.budget - self.nfev - keep)
            target = view if self.budget is not None else view.unwrapped  # no limit of the run's own: no view
            before = view.nfev
            try:
                losses = _evaluate(target, plan, scheduler)
            except BudgetExhaustedError as exc:
                self._cancel(f"the oracle's own budget ran out: {exc}")
                continue
            except OracleError as exc:
                if exc.kind == "nonfinite" and self.nit > 0 and hasattr(exc, "add_note"):
                    exc.add_note(self._divergence_hint())
                raise
            self._accept(losses.to(torch.float64), view.nfev - before)  # the oracle applied its failure policy
            self.n_failed += int((~torch.isfinite(losses)).sum())
            self._settle(hold=True)
            if self._iterations != finished:
                break
        return self.history[-1] if self._iterations != finished and self.history else None

    def step_gradient(self, grad: torch.Tensor, f0: float | None = None) -> dict | None:
        """One iteration whose gradient comes from elsewhere -- autograd, for the first-order
        reference a ZO run is compared with -- applied by the same update rule, schedule and
        bookkeeping as an estimated one. Only for first-order rules, between iterations."""
        from .rules import FirstOrderRule

        if not isinstance(self.rule, FirstOrderRule):
            raise ConfigError(f"step_gradient needs a first-order update rule, this run uses {type(self.rule).__name__}")
        if not (self.phase == "run" and self._fresh):  # a fresh iteration needs no plan: none is built
            self._settle()
        if self.phase == "done":
            return None
        if self._log:
            raise ConfigError("step_gradient() in the middle of an iteration: tell the pending ask first")
        grad = torch.as_tensor(grad).detach()
        if grad.shape != (self.dim,):
            raise ConfigError(f"step_gradient takes a gradient of shape ({self.dim},), got {tuple(grad.shape)}")
        if self.maxiter is not None and self.nit >= self.maxiter:
            self._gen.close()
            self._stop(f"maxiter={self.maxiter} iterations reached", True)
            self._settle()
            return None
        self._gen.close()  # the iteration's estimate is not needed: no query was asked for it yet
        self._pending = None
        try:
            self.rule.apply_gradient(grad.to(self.device), self)
        except Stop as stop:
            self._stop(stop.message, stop.success)
            self._settle()
            return None
        finished = self._iterations
        self._end_iteration({"f0": f0, "grad_norm": float(grad.norm()), "n_failed": 0, "_grad": grad})
        return self.history[-1] if self._iterations != finished else None

    def run(self, oracle: Oracle, scheduler: SchedulerLike | None = None) -> ZOResult:
        """Run to the end against ``oracle``; returns :meth:`result`."""
        self._limit_source = self._view(oracle).unwrapped  # before the first plan is built
        while not self.done:
            self.step(oracle, scheduler)
        return self.result()

    def _view(self, oracle: Oracle) -> BudgetView:
        if not isinstance(oracle, Oracle):
            raise TypeError(f"oracle must be a zoblackbox Oracle, got {type(oracle).__name__}: {short_repr(oracle)}")
        if isinstance(oracle, BudgetView):
            oracle = oracle.unwrapped
        if oracle.dim != self.dim:
            raise ConfigError(f"the oracle has dim {oracle.dim}, this run has dim {self.dim}")
        if self._views is None or self._views.unwrapped is not oracle:
            self._views = BudgetView(oracle)
        return self._views

    # ------------------------------------------------------------------ services for update rules
    def _own_left(self) -> float:
        """Queries the driving oracle's own budget still allows (``inf`` without one)."""
        return self._limit_source.remaining if self._limit_source is not None else math.inf

    def afford(self, n: int, keep: int = 0) -> None:
        """Raise ``Stop`` unless ``n`` more queries fit (``keep`` more kept aside)."""
        if self.budget is not None and self.nfev + n + keep > self.budget:
            raise Stop(f"query budget reached ({self.nfev} of {self.budget} spent)")
        own = self._own_left()
        if n > own:
            source = self._limit_source
            assert source is not None  # without one, _own_left() is inf
            raise Stop(f"the oracle's own budget ran out: a batch of {n} queries would exceed the budget of "
                       f"{source.budget} ({source.nfev} already spent, {own} left)", success=False)

    def can_afford(self, n: int) -> bool:
        """Whether ``n`` more queries fit in the budget."""
        return (self.budget is None or self.nfev + n <= self.budget) and n <= self._own_left()

    def gradient_estimate(self, x: torch.Tensor, *, keep: int = 0, f0: float | None = None,
                          checked: bool = False) -> Generator[QueryPlan, torch.Tensor, Estimate]:
        """A generator that asks for the estimator's plan at ``x`` and returns the
        :class:`~zoblackbox.estimators.Estimate`; with ``f0`` (the known loss at ``x``) a forward
        plan skips its base query. The budget is checked before the plan is built."""
        if not checked:
            if self.maxiter is not None and self.nit >= self.maxiter:
                raise Stop(f"maxiter={self.maxiter} iterations reached")
            n = None if self.coords is None else int(self.coords.numel())
            self.afford(self.estimator.num_queries(self.dim, n), keep)
        plan = self.bounded(self.estimator.plan(x, self.coords))
        if f0 is not None and plan.include_base:
            rest = dataclasses.replace(plan, include_base=False)  # the same kind of plan (seeded ones too)
            losses = yield rest
            losses = torch.cat([torch.tensor([float(f0)], dtype=torch.float64), losses.to(torch.float64)])
        else:
            losses = yield plan
        est = self.estimator.combine(plan, losses)
        est.nfev = len(plan) - (f0 is not None and plan.include_base)  # the known f0 cost no query
        return est

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clipped into the bounds (unchanged without bounds)."""
        if self.lower is None:
            return x
        return torch.maximum(torch.minimum(x, self.upper.to(x.dtype)), self.lower.to(x.dtype))

    def project_(self, x: torch.Tensor) -> None:
        """Clip ``x`` into the bounds in place."""
        if self.lower is not None:
            x.clamp_(min=self.lower.to(x.dtype), max=self.upper.to(x.dtype))

    def observe(self, record: dict, *, x: torch.Tensor, grad: torch.Tensor | None, nit: int,
                call_back: bool = True) -> Stop | None:
        """Record an intermediate point of a rule whose iteration spans many asks (closure
        optimizers); returns a ``Stop`` when an observer asks to stop."""
        self._append_history(record, nit=nit)
        self._last_grad, self._observed_x = grad, x
        try:
            if call_back and not self._replaying and self._notify(self.history[-1]):
                return Stop("stopped by the callback")
        finally:
            self._observed_x = None
        return None

    def intermediate_result(self, entry: dict) -> ZOResult:
        """scipy's ``intermediate_result`` for callbacks: ``x``, ``fun``, ``nit``, ``nfev``, ``grad_norm``."""
        grad = self._last_grad
        x = self.rule.x if self._observed_x is None else self._observed_x
        return ZOResult(x=x.detach().cpu().numpy().copy(), fun=entry.get("f0"), nit=entry["nit"],
                        nfev=entry["nfev"], grad_norm=entry.get("grad_norm"),
                        grad=None if grad is None else grad.detach().cpu().numpy())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The engine's exact state: configuration, the rule's committed state at the start of the
        current iteration, and the losses told since (tensors, numbers, strings, lists, dicts)."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": json.dumps(self._config(), sort_keys=True),
            "x0": self.x0.clone(), "bounds": [] if self.lower is None else [self.lower.clone(), self.upper.clone()],
            "boundary": clone_tree(self._boundary_state()),  # a rule may snapshot its iterate by reference
            "told": [v.clone() for v, _ in self._log], "told_nfev": [n for _, n in self._log],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping, **overrides) -> AskTell:
        """An engine in exactly the state :meth:`state_dict` captured.

        The estimator and update rule are rebuilt from the state's configuration when they are
        zoblackbox's own (``CoordinateEstimator``, ``RandomEstimator`` with built-in directions and
        shaping, named optimizers, ``torch.optim`` classes); pass ``estimator=``, ``optimizer=``,
        ``lr_schedule=``... for anything else. What is passed must match the state's configuration.
        """
        config = _check_state(state)
        kwargs = _rebuild_kwargs(config, state)
        kwargs.update(overrides)
        x0 = state["x0"]
        engine = cls(x0.numpy() if config["numpy"] else x0, **kwargs)
        engine.load_state_dict(state)
        return engine

    def load_state_dict(self, state: Mapping) -> None:
        """Load :meth:`state_dict` of a run of the same problem; everything is checked before
        anything changes (CheckpointError names the mismatch)."""
        config = _check_state(state)
        mine = self._config()
        for key, what in (("dim", "dimension"), ("dtype", "dtype"), ("estimator", "estimator"),
                          ("rule", "update rule"), ("budget", "budget"), ("maxiter", "maxiter"),
                          ("evaluate_final", "evaluate_final")):
            if config.get(key) != mine.get(key):
                raise CheckpointError(f"the state is of another run: its {what} is {config.get(key)!r}, this run's "
                                      f"is {mine.get(key)!r}")
        boundary, told, told_nfev = state["boundary"], list(state["told"]), list(state["told_nfev"])
        if not isinstance(boundary, Mapping) or len(told) != len(told_nfev) or not all(
                isinstance(v, torch.Tensor) and v.dim() == 1 for v in told) or not all(
                _is_int(n) and n >= 1 for n in told_nfev):
            raise CheckpointError("the state's boundary or told losses are malformed")
        _check_counters(boundary, self.budget, self.dim)
        previous = (self._boundary_state(), list(self._log))
        try:
            self._replay(boundary, told, told_nfev)
        except Exception as exc:
            self._replay(previous[0], [v for v, _ in previous[1]], [n for _, n in previous[1]])
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"the state does not replay on this run: {type(exc).__name__}: {exc}") from exc

    @property
    def coords(self) -> torch.Tensor | None:
        """The coordinates the next gradient estimate covers (``None``: all)."""
        return self._coords

    @coords.setter
    def coords(self, value) -> None:
        if value is not None:
            value = torch.as_tensor(value)
            if value.dtype == torch.bool:
                if value.shape != (self.dim,):
                    raise ConfigError(f"a boolean coordinate mask must have shape ({self.dim},), got "
                                      f"{tuple(value.shape)}")
                value = value.nonzero().flatten()
            value = value.to(device=self.device, dtype=torch.long).reshape(-1)
        self._coords = value
        if self.phase != "run" or self._log or self._replaying:
            return  # mid-iteration: the mask applies from the next iteration on
        if self._fresh:  # no plan built yet: the iteration starts with these coordinates
            self._boundary["coords"] = torch.empty(0, dtype=torch.long) if value is None else value.cpu().clone()
            self._boundary["has_coords"] = value is not None
            return
        # a plan was asked for but nothing told: draw it again with the new coordinates
        self._gen.close()
        if self._boundary["estimator"] and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(self._boundary["estimator"])
        self._begin_iteration()

    # ------------------------------------------------------------------ the state machine
    _fresh = True
    _asked = False
    _views: BudgetView | None = None
    _last_grad: torch.Tensor | None = None
    _observed_x: torch.Tensor | None = None
    _limit_source: Oracle | None = None

    def _replay(self, boundary: Mapping, told: list, told_nfev: list) -> None:
        self._replaying = True
        try:
            self._restore(boundary)
            for values, spent in zip(told, told_nfev):
                self._settle()
                if self.phase == "done":
                    raise CheckpointError("the state holds losses told after its run ended")
                pending = self._pending
                assert pending is not None  # _settle() leaves a pending ask unless the run is done
                if values.shape[0] != len(pending):
                    raise CheckpointError(f"the state's told losses ({values.shape[0]}) do not match the replayed "
                                          f"ask ({len(pending)} points)")
                self._accept(values.to(torch.float64), int(spent))
            self._settle()
        finally:
            self._replaying = False

    def _accept(self, values: torch.Tensor, spent: int) -> None:
        self._asked = False
        self.nfev += spent
        self._log.append((values.clone(), spent))
        self._pending = None
        self._send = values

    def _settle(self, hold: bool = False) -> None:
        """Advance the state machine until there is a pending ask or the run is done (with
        ``hold``, stop before building the first plan of a new iteration or of the final phase)."""
        while self.phase != "done" and self._pending is None:
            if hold and self._fresh:
                return
            self._fresh = False
            send, self._send = self._send, None
            try:
                plan = next(self._gen) if send is None else self._gen.send(send)
            except StopIteration as finished:
                if self.phase == "final":
                    self._finish(*finished.value)
                else:
                    self._end_iteration(finished.value)
                continue
            except Stop as stop:
                if self.phase == "run" and self.rule.stopped_after_a_step():
                    self.nit += 1
                self._stop(stop.message, stop.success)
                continue
            except StepUnderflow as exc:
                if self._iterations == 0 and self.phase == "run" and not getattr(self.rule, "started", False):
                    raise  # at x0: a configuration error, before the run could start
                self._stop(f"stopped at iteration {self.nit + 1}: {exc}", False)
                continue
            self._pending = plan

    def _begin_iteration(self) -> None:
        self._boundary = self._snapshot()
        self._log = []
        self._pending, self._send, self._fresh = None, None, True
        self._gen = self.rule.iteration(self)

    def _begin_final(self) -> None:
        self.phase = "final"
        self._boundary = self._snapshot()
        self._log = []
        self._pending, self._send, self._fresh = None, None, True
        if not self.evaluate_final:
            self._finish(self.rule.x, self._last_f0(), "")
            return
        self._gen = self.rule.finish(self)

    def _end_iteration(self, record: dict) -> None:
        self._last_grad = record.get("_grad")
        self._iterations += 1
        if self.rule.counts_iteration:
            self.nit += 1
        self._append_history(record, nit=self.nit)
        if not self._replaying and self._notify(self.history[-1]):
            self._stop("stopped by the callback", True)
            return
        self._begin_iteration()

    def _stop(self, message: str, success: bool) -> None:
        self.message, self.success = message, success
        self._begin_final()

    def _cancel(self, message: str) -> None:
        """The pending ask cannot be evaluated (the oracle's own budget ran out)."""
        if self.phase == "final":
            self._finish(self.rule.x, math.nan, "; no query left to evaluate the final point")
            self.success = False
            return
        self._gen.close()
        self._stop(message, False)

    def _finish(self, x, fun, note: str) -> None:
        self._final = (x, math.nan if fun is None else fun)
        self.message += note
        self.phase = "done"
        self._pending = None

    def _append_history(self, record: dict, *, nit: int) -> None:
        entry = {"nit": nit, "nfev": self.nfev, "f0": record.get("f0"), "grad_norm": record.get("grad_norm"),
                 "n_failed": record.get("n_failed", 0),
                 "time": self._wall_offset + time.perf_counter() - self._t0}
        for key, value in record.items():
            if key not in entry and not key.startswith("_"):
                entry[key] = value
        self.history.append(entry)

    def _notify(self, entry: dict) -> bool:
        """Call the observers (callbacks, loggers, checkpointers) with the iteration's record; true
        when one of them asks to stop (returns ``True``)."""
        halt = False
        for observer in list(self.observers):
            if observer(self, entry) is True:
                halt = True
        return halt

    def _divergence_hint(self) -> str:
        """A note for a non-finite loss during a run: how far the iterate has moved, and the likely cause."""
        now = float(self.rule.x.abs().max())
        start = float(self.x0.abs().max())
        lr = getattr(self.rule, "lr", None)
        grown = now > 1e3 * max(1.0, start)
        return (f"at iteration {self.nit} the iterate's largest entry is {now:.3g} (x0's: {start:.3g})"
                + (f"; it grew by orders of magnitude: the step size lr={lr!r} is the likely cause, lower it"
                   if grown else "; the function itself returned a non-finite value there")
                + " (or pass on_failure='inf'/'skip' to the oracle to step over such points)")

    def _nit(self) -> int:
        counted = self.rule.iterations()
        return self.nit if counted is None else counted

    def _last_f0(self):
        for h in reversed(self.history):
            if h.get("f0") is not None:
                return h["f0"]
        return math.nan

    def _config(self) -> dict:
        auto = getattr(self.rule, "chooses_estimator", False)  # the rule picks (and records) its estimators
        return {"dim": self.dim, "dtype": str(self.dtype).replace("torch.", ""), "numpy": self._numpy,
                "estimator": "auto" if auto else repr(self.estimator),
                "estimator_spec": None if auto else _estimator_spec(self.estimator),
                "rule": self.rule.config(), "budget": self.budget, "maxiter": self.maxiter, "seed": self.seed,
                "evaluate_final": self.evaluate_final, "on_failure": self.policy.action,
                "lr_schedule": self._init["lr_schedule"] is not None}

    def _snapshot(self) -> dict:
        """The committed state now (taken at iteration boundaries)."""
        est_state = self.estimator.state_dict() if hasattr(self.estimator, "state_dict") else {}
        return {"rule": self.rule.state_dict(), "estimator": est_state, "nfev": self.nfev, "nit": self.nit,
                "iterations": self._iterations, "n_failed": self.n_failed, "history_len": len(self.history),
                "phase": self.phase, "message": self.message, "success": self.success,
                "coords": torch.empty(0, dtype=torch.long) if self.coords is None else self.coords.cpu().clone(),
                "has_coords": self.coords is not None,
                "freeze": torch.empty(0, dtype=torch.bool) if self.freeze is None else self.freeze.cpu().clone(),
                "wall": self._wall_offset + time.perf_counter() - self._t0}

    def _boundary_state(self) -> dict:
        """The boundary snapshot with the history up to it (histories are append-only, so snapshots
        keep only their length: serializing the history at every iteration would cost O(n^2))."""
        state = {k: v for k, v in self._boundary.items() if k != "history_len"}
        state["history"] = json.dumps(self.history[:self._boundary["history_len"]])
        return state

    def _restore(self, snap: Mapping) -> None:
        self.rule.load_state_dict(snap["rule"])
        if snap["estimator"] and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(snap["estimator"])
        self.nfev, self.nit, self.n_failed = int(snap["nfev"]), int(snap["nit"]), int(snap["n_failed"])
        self._iterations = int(snap["iterations"])
        history = json.loads(snap["history"])
        if not isinstance(history, list):
            raise CheckpointError(f"the state's history is not a list: {short_repr(history)}")
        self.history = history
        self.message, self.success = str(snap["message"]), bool(snap["success"])
        self._coords = snap["coords"].to(self.device) if snap["has_coords"] else None
        self.freeze = snap["freeze"].to(self.device) if snap["freeze"].numel() else None
        self._wall_offset, self._t0 = float(snap["wall"]), time.perf_counter()
        self._final = None
        self.phase = "run"
        if snap["phase"] == "final":
            self._begin_final()
        else:
            self._begin_iteration()

    def bounded(self, plan: QueryPlan) -> QueryPlan:
        """``plan`` with every query inside the bounds (unchanged without bounds or when it fits).

        A forward coordinate step that would leave the box is taken backwards (when that fits,
        else clipped); other coordinate steps and direction perturbations are clipped to the box.
        Estimators combine the realized steps of the plan they get back, so a clipped step gives
        a one-sided (or shorter) difference, never a query outside the box."""
        if self.lower is None or plan.num_perturbations == 0 and not plan.include_base:
            return plan
        if plan.kind not in ("coordinate", "direction"):
            raise ConfigError(f"bounds cannot clip a {plan.kind} plan ({type(plan).__name__}); run its estimator "
                              "without bounds")
        assert self.upper is not None  # bounds are set together
        lower, upper = self.lower.to(plan.base.dtype), self.upper.to(plan.base.dtype)
        base = plan.base
        if plan.include_base and bool(((base < lower) | (base > upper)).any()):
            base = torch.maximum(torch.minimum(base, upper), lower)
        if plan.coords is None:
            if plan.num_perturbations == 0:
                return plan if base is plan.base else QueryPlan(base=base, include_base=True,
                                                                 directions=plan.directions, support=plan.support)
            assert plan.directions is not None  # a plan without coords has directions
            points = base.unsqueeze(0) + plan.directions.to(base.dtype)
            inside = torch.maximum(torch.minimum(points, upper), lower)
            if base is plan.base and bool(torch.equal(inside, points)):
                return plan
            return QueryPlan(base=base, include_base=plan.include_base, directions=inside - base,
                             support=plan.support)
        c = plan.coords
        assert plan.offsets is not None  # coordinate plans have offsets
        xc = base[c]
        target = xc + plan.offsets
        out = (target > upper[c]) | (target < lower[c])
        if base is plan.base and not bool(out.any()):
            return plan
        offsets = plan.offsets
        if plan.include_base:  # forward: the realized backward step where it fits
            back = (xc - offsets) - xc
            fits = ((xc + back) <= upper[c]) & ((xc + back) >= lower[c])
            offsets = torch.where(out & fits, back, offsets)
        clipped = torch.maximum(torch.minimum(xc + offsets, upper[c]), lower[c]) - xc
        return QueryPlan(base=base, include_base=plan.include_base, coords=c, offsets=clipped)


    def _failure_report(self) -> dict:
        if self._views is not None:
            return self._views.unwrapped.failure_report()
        return {"failed_queries": self.n_failed, "resolved_by_retry": 0,
                "by_kind": {"nonfinite": self.n_failed} if self.n_failed else {}}

    def _out(self, t: torch.Tensor):
        return t.detach().cpu().numpy().copy() if self._numpy else t.detach().clone()

    def __repr__(self) -> str:
        budget = "" if self.budget is None else f", budget={self.budget}"
        return (f"AskTell(dim={self.dim}, estimator={self.estimator!r}, rule={type(self.rule).__name__}, "
                f"nit={self.nit}, nfev={self.nfev}{budget}, phase={self.phase!r})")


# ------------------------------------------------------------------------------------------ helpers
def _evaluate(oracle: Oracle, plan: QueryPlan, scheduler) -> torch.Tensor:
    """The losses of ``plan`` through ``oracle`` (a plan of value queries skips the scheduler)."""
    if plan.num_perturbations == 0:
        return oracle.evaluate(plan.points())
    if scheduler is not None:
        return scheduler.run(oracle, plan)
    return oracle.evaluate_plan(plan)


def start_point(x0, dtype=None, device=None) -> tuple[torch.Tensor, bool]:
    """``x0`` as a detached, checked 1-D floating tensor, and whether it came as numpy (a list or an
    array: asks are numpy then). Without ``dtype`` the computation dtype follows ``x0``: a floating
    ``x0`` keeps its dtype, integers become float64 (numpy, lists) or torch's default dtype (tensors)."""
    from .oracle import _real_tensor, check_overflow

    numpy = not isinstance(x0, torch.Tensor)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch.dtype or None, got {short_repr(dtype)}")
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"device must be a torch device (or its name) or None, got {short_repr(device)}") \
                from exc
    t = _real_tensor(x0, "x0 must be a 1-D array")
    if t.dim() != 1:
        raise ConfigError(f"x0 must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ConfigError("x0 must have at least one entry, got an empty array")
    if dtype is None:
        dtype = t.dtype if t.is_floating_point() else (torch.float64 if numpy else torch.get_default_dtype())
    source = t.detach()
    try:
        t = source.to(dtype=dtype, device=device).clone()
    except (RuntimeError, AssertionError) as exc:  # a device this torch build does not have
        raise ConfigError(f"device={str(device)!r} is not available for x0: {exc}") from exc
    check_overflow(source, t, "x0")
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero().flatten()[:5].tolist()
        raise ConfigError(f"x0 must be finite; non-finite entries at indices {bad}: {t[bad].tolist()}")
    return t, numpy


def _as_losses(losses, n: int) -> torch.Tensor:
    if isinstance(losses, (str, bytes)) or losses is None:
        raise ConfigError(f"tell() takes {n} losses (one per asked row), got {short_repr(losses)}")
    try:
        if isinstance(losses, torch.Tensor):
            t = losses
        else:
            a = np.asarray(losses)
            if a.dtype.kind not in "fiuO" or (a.dtype.kind == "O" and not all(
                    isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                    for v in a.reshape(-1))):  # complex, bool, strings: never cast silently
                raise ConfigError(f"tell() takes {n} real losses (one per asked row), got {short_repr(losses)} "
                                  f"(dtype {a.dtype})")
            t = torch.as_tensor(a.astype(np.float64))
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"tell() takes {n} real losses (one per asked row), got {short_repr(losses)} ({exc})") \
            from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"tell() takes real losses, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.float64).reshape(-1) if t.dim() <= 1 or t.numel() == n else t
    if t.dim() != 1 or t.shape[0] != n:
        raise ConfigError(f"tell() got {t.numel() if t.dim() <= 1 else tuple(t.shape)} losses for the {n} points "
                          f"of the last ask (one loss per row)")
    return t.clone()


def _pairs(bounds, dim: int):
    """``(lower, upper)`` of scipy's sequence of ``dim`` ``(min, max)`` pairs (``None`` = unbounded), or
    ``None`` when ``bounds`` is not such a sequence."""
    if isinstance(bounds, np.ndarray) or not isinstance(bounds, Sequence) or len(bounds) != dim or dim == 0:
        return None
    lower, upper = [], []
    for pair in bounds:
        if isinstance(pair, (str, bytes, np.ndarray, torch.Tensor)) or not isinstance(pair, Sequence) or len(pair) != 2:
            return None
        lo, hi = pair
        if not all(v is None or isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                   for v in (lo, hi)):
            return None
        lower.append(-math.inf if lo is None else float(lo))
        upper.append(math.inf if hi is None else float(hi))
    return lower, upper


def _check_bounds(bounds, dim: int, dtype, device, x0: torch.Tensor | None = None):
    """``(lower, upper)`` tensors from ``bounds``: ``None``, ``scipy.optimize.Bounds``, ``(lower, upper)``
    (scalars or arrays) or scipy's sequence of ``dim`` ``(min, max)`` pairs. With ``dim == 2`` a list of
    two pairs reads both ways; the reading that contains ``x0`` is taken, and when both do and they
    differ the bounds are refused as ambiguous."""
    if bounds is None:
        return None, None
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):  # scipy.optimize.Bounds
        bounds = (bounds.lb, bounds.ub)
    pairs = _pairs(bounds, dim)
    if pairs is not None and dim == 2 and len(bounds) == 2:
        readings = []
        for reading in (pairs, tuple(bounds)):
            try:
                low, high = _bounds_tensors(reading, dim, dtype, device)
            except ConfigError:
                continue
            if x0 is None or not bool(((x0 < low) | (x0 > high)).any()):
                readings.append((low, high))
        if len(readings) == 2 and not (torch.equal(*[r[0] for r in readings])
                                       and torch.equal(*[r[1] for r in readings])):
            raise ConfigError(f"bounds={short_repr(bounds)} is ambiguous for dim=2: it reads as two (min, max) pairs "
                              "and as (lower, upper); pass scipy.optimize.Bounds(lower, upper)")
        if readings:
            return readings[0]
    elif pairs is not None:
        bounds = pairs
    return _bounds_tensors(bounds, dim, dtype, device)


def _bounds_tensors(bounds, dim: int, dtype, device):
    if not isinstance(bounds, Sequence) or isinstance(bounds, (str, bytes)) or len(bounds) != 2:
        raise ConfigError(f"bounds must be scipy.optimize.Bounds, a pair (lower, upper) or {dim} (min, max) pairs, "
                          f"got {short_repr(bounds)}")
    out = []
    for name, b in zip(("lower", "upper"), bounds):
        try:
            t = torch.as_tensor(np.asarray(b, dtype=np.float64)).to(dtype=dtype, device=device)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bounds {name} must be a number or an array of {dim} numbers, got {short_repr(b)}") \
                from exc
        if t.dim() == 0 or t.shape == (1,) and dim != 1:  # a scalar (scipy's Bounds(0, 1) holds arrays of one)
            t = t.reshape(()).expand(dim).clone()
        if t.shape != (dim,) or bool(torch.isnan(t).any()):
            raise ConfigError(f"bounds {name} must be a number or {dim} numbers (no NaN), got {short_repr(b)}")
        out.append(t)
    lower, upper = out
    if bool((lower > upper).any()):
        i = int((lower > upper).nonzero()[0, 0])
        raise ConfigError(f"bounds: lower[{i}]={float(lower[i])!r} exceeds upper[{i}]={float(upper[i])!r}")
    return lower, upper


def _estimator_spec(est: Estimator) -> dict | None:
    """A JSON description of zoblackbox's own estimators (``None`` when it cannot be rebuilt)."""
    if type(est) is CoordinateEstimator:
        spec = {"class": "CoordinateEstimator", "mu": est.mu, "scheme": est.scheme}
        if est.relative:
            spec["relative"] = True
        return spec
    if type(est) is RandomEstimator:
        directions = getattr(est, "directions", None)
        shaping = getattr(est, "fitness_shaping", None)
        if not isinstance(directions, str) or not (shaping is None or isinstance(shaping, str)):
            return None
        return {"class": "RandomEstimator", "mu": est.mu, "q": est.q, "directions": directions,
                "antithetic": est.antithetic, "top_b": est.top_b, "fitness_shaping": shaping}
    return None


def _rebuild_kwargs(config: dict, state: Mapping) -> dict:
    kwargs: dict = {"budget": config["budget"], "maxiter": config["maxiter"], "seed": config["seed"],
                    "evaluate_final": config["evaluate_final"], "on_failure": config["on_failure"],
                    "dtype": getattr(torch, config["dtype"])}
    spec = config.get("estimator_spec")
    if spec is not None:
        spec = dict(spec)
        cls = {"CoordinateEstimator": CoordinateEstimator, "RandomEstimator": RandomEstimator}[spec.pop("class")]
        kwargs["estimator"] = cls(**spec)
    rule = config["rule"]
    if rule.get("rule") == "FirstOrderRule":
        kwargs["optimizer"] = _optimizer_from_name(rule["optimizer"])
        kwargs["lr"] = rule["lr"]
    elif rule.get("rule") == "LBFGSRule":
        kwargs["optimizer"], kwargs["lr"], kwargs["optimizer_kwargs"] = "lbfgs", rule["lr"], rule["options"]
    elif rule.get("rule") == "AutoStrategy":  # its own seed, when it was given one, drives the probe and CMA-ES
        kwargs["optimizer"] = "auto" if rule.get("seed") is None else AutoStrategy(seed=rule["seed"])
    elif rule.get("rule") == "ClosureRule":
        kwargs["optimizer"] = _optimizer_from_name(rule["optimizer"])
        kwargs["lr"] = rule["lr"]
    if state["bounds"]:
        kwargs["bounds"] = (state["bounds"][0].numpy(), state["bounds"][1].numpy())
    return kwargs


def _optimizer_from_name(name: str):
    if "." not in name:
        return name
    module, _, qualname = name.rpartition(".")
    if not module.startswith(("torch.optim", "zoblackbox.")):
        raise CheckpointError(f"the state's optimizer {name!r} is not one zoblackbox can rebuild; pass optimizer=")
    return getattr(importlib.import_module(module), qualname)


def _check_state(state) -> dict:
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        fmt = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"not an AskTell state (format {fmt!r}, expected {STATE_FORMAT!r})")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"AskTell state version {state.get('version')!r}; this zoblackbox reads {STATE_VERSION}")
    for key in ("config", "x0", "boundary", "told", "told_nfev", "bounds"):
        if key not in state:
            raise CheckpointError(f"the AskTell state has no {key!r}")
    try:
        config = json.loads(state["config"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the AskTell state's config is not JSON: {exc}") from exc
    if not isinstance(state["x0"], torch.Tensor) or state["x0"].dim() != 1:
        raise CheckpointError(f"the AskTell state's x0 is not a 1-D tensor: {short_repr(state['x0'])}")
    if not isinstance(config, dict):
        raise CheckpointError(f"the AskTell state's config is {short_repr(config)}; a run writes a JSON object")
    bounds, n = state["bounds"], state["x0"].shape[0]
    if not isinstance(bounds, (list, tuple)) or len(bounds) not in (0, 2) or not all(
            isinstance(b, torch.Tensor) and b.shape == (n,) for b in bounds) or (
            len(bounds) == 2 and bool((bounds[0] > bounds[1]).any())):
        raise CheckpointError(f"the AskTell state's bounds are {short_repr(bounds)}; a run writes [] or "
                              f"[lower, upper] of shape ({n},) with lower <= upper")
    return config


def _check_counters(boundary: Mapping, budget: int | None, dim: int) -> None:
    """Every field of a boundary snapshot, against what a run could have written (CheckpointError
    naming the field; nothing is changed before all of them pass)."""
    for key in ("nfev", "nit", "n_failed", "iterations"):
        v: Any = boundary.get(key)  # _is_int checks it before the comparison
        if not _is_int(v) or v < 0:
            raise CheckpointError(f"the state's {key} is {v!r}; a run writes a non-negative int")
    if budget is not None and boundary["nfev"] > budget:
        raise CheckpointError(f"the state's nfev={boundary['nfev']} exceeds the run's budget of {budget}")
    if boundary["nit"] > boundary["iterations"] + 1:  # L-BFGS may count one partial iteration at its end
        raise CheckpointError(f"the state's nit={boundary['nit']} exceeds its {boundary['iterations']} iterations")
    if boundary["n_failed"] > boundary["nfev"]:
        raise CheckpointError(f"the state's n_failed={boundary['n_failed']} exceeds its nfev={boundary['nfev']}")
    if boundary.get("phase") not in ("run", "final"):
        raise CheckpointError(f"the state's phase is {boundary.get('phase')!r}; a run writes 'run' or 'final'")
    if not isinstance(boundary.get("message"), str):
        raise CheckpointError(f"the state's message is {short_repr(boundary.get('message'))}; a run writes a str")
    if not isinstance(boundary.get("success"), bool):
        raise CheckpointError(f"the state's success is {short_repr(boundary.get('success'))}; a run writes a bool")
    wall = boundary.get("wall")
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0:
        raise CheckpointError(f"the state's wall is {wall!r}; a run writes a finite number >= 0")
    try:
        history = json.loads(boundary.get("history"))  # type: ignore[arg-type]  # None: the TypeError below
    except (TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the state's history is not JSON text: {exc}") from exc
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"the state's history is {short_repr(history)}; a run writes a list of records")
    coords, has_coords = boundary.get("coords"), boundary.get("has_coords")
    if not isinstance(has_coords, bool):
        raise CheckpointError(f"the state's has_coords is {has_coords!r}; a run writes a bool")
    if not isinstance(coords, torch.Tensor) or coords.dim() != 1 or coords.dtype != torch.long or (
            coords.numel() and (int(coords.min()) < 0 or int(coords.max()) >= dim)) or (
            not has_coords and coords.numel()):
        raise CheckpointError(f"the state's coords are {short_repr(coords)}; a run writes a 1-D long tensor of "
                              f"indices in [0, {dim})")
    freeze = boundary.get("freeze")
    if not isinstance(freeze, torch.Tensor) or (freeze.numel() and (freeze.dtype != torch.bool
                                                                     or freeze.shape != (dim,))):
        raise CheckpointError(f"the state's freeze mask is {short_repr(freeze)}; a run writes an empty tensor or a "
                              f"bool tensor of shape ({dim},)")
    if not isinstance(boundary.get("estimator"), Mapping):
        raise CheckpointError(f"the state's estimator is {short_repr(boundary.get('estimator'))}; a run writes a dict")
    rule = boundary.get("rule")
    x = rule.get("x") if isinstance(rule, Mapping) else None
    if not isinstance(x, torch.Tensor) or x.shape != (dim,):
        raise CheckpointError(f"the state's iterate has shape {tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}, "
                              f"this run's dimension is {dim}")
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise CheckpointError(f"the state's iterate is not finite floats ({x.dtype}); a run keeps a finite iterate")