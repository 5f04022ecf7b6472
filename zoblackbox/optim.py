"""Optimizing with zeroth-order gradients: a functional ``minimize`` and a bridge to torch.optim.

* :func:`minimize` -- scipy-style: ``minimize(oracle, x0, ...) -> OptimizeResult`` with
  ``x, fun, nfev, nit, success, message, history``; budgets are exact.
* :class:`ZOGradient` -- the ZO analogue of ``loss.backward()`` for a torch module: it fills
  ``p.grad`` from a ZO estimate, so every ``torch.optim`` optimizer and LR scheduler works
  unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from torch import nn

from .errors import BudgetExhaustedError, ConfigError
from .estimators import CoordinateEstimator, Estimate, Estimator, RandomEstimator, StepUnderflow
from .lbfgs import check_lbfgs_kwargs, minimize_lbfgs
from .oracle import Oracle, as_vector
from .result import ZOResult

__all__ = ["OPTIMIZERS", "SignSGD", "ZOGradient", "make_optimizer", "minimize"]


class SignSGD(torch.optim.Optimizer):
    """Sign-SGD: ``p -= lr * sign(grad)`` (robust to the scale of noisy ZO estimates)."""

    def __init__(self, params, lr: float = 1e-3):
        super().__init__(params, {"lr": _check_lr(lr)})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return loss


OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "signsgd": SignSGD,
    "lbfgs": torch.optim.LBFGS,
}


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    return lr


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_optimizer(name_or_cls, params, lr: float, **kwargs) -> torch.optim.Optimizer:
    """A torch optimizer from a name in :data:`OPTIMIZERS` or an optimizer class."""
    _check_lr(lr)
    if isinstance(name_or_cls, str):
        if name_or_cls.lower() not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name_or_cls!r}; expected one of {sorted(OPTIMIZERS)}")
        cls = OPTIMIZERS[name_or_cls.lower()]
    elif isinstance(name_or_cls, type) and issubclass(name_or_cls, torch.optim.Optimizer):
        cls = name_or_cls
    else:
        raise ConfigError(f"optimizer must be a name or a torch.optim.Optimizer class, got {name_or_cls!r}")
    return cls(params, lr=lr, **kwargs)


#: below this many full CGE iterations within the budget, ``estimator="auto"`` picks RGE
AUTO_MIN_CGE_STEPS = 100
AUTO_RGE_Q = 20


def auto_estimator(dim: int, budget: int | None) -> Estimator:
    """The default estimator of :func:`minimize` for a ``dim``-vector and a query budget.

    CGE (forward, mu=5e-3) when it is cheap (``dim <= 20``: no more queries per step than RGE with
    q=20), when there is no budget, or when the budget affords at least ``AUTO_MIN_CGE_STEPS``
    full CGE iterations; otherwise RGE with q=20 Gaussian directions, which takes ``(dim+1)/21``
    times more (noisier) steps for the same queries. Rationale, measured on a 1.7k-parameter digits
    CNN with 30k queries: CGE + Adam got 17 steps and 48% test accuracy, RGE (q=20) + Adam 1,430
    steps and 93% (docs/benchmarks.md).
    """
    if dim <= AUTO_RGE_Q or budget is None or budget >= AUTO_MIN_CGE_STEPS * (dim + 1):
        return CoordinateEstimator()
    return RandomEstimator(q=AUTO_RGE_Q)


def minimize(
    oracle: Oracle,
    x0,
    *,
    estimator: Estimator | str = "auto",
    optimizer: str | type = "adam",
    lr: float | None = None,
    budget: int | None = None,
    maxiter: int | None = None,
    callback: Callable[[OptimizeResult], bool | None] | None = None,
    scheduler=None,
    optimizer_kwargs: dict | None = None,
) -> OptimizeResult:
    """Minimize a black-box oracle with ZO gradient estimates and a first-order update rule.

    Args:
        oracle: the function to minimize.
        x0: starting point, 1-D of length ``oracle.dim``, finite.
        estimator: gradient estimator; ``"auto"`` (default) picks CGE or RGE from the dimension
            and the budget (:func:`auto_estimator`), and forward CGE for ``"lbfgs"`` (curvature
            pairs from random-direction estimates would be noise).
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"signsgd"``, ``"lbfgs"`` or a
            ``torch.optim`` class. ``"lbfgs"`` is zoblackbox's L-BFGS for estimated gradients
            (:mod:`zoblackbox.lbfgs`): line searches on function values only (one query per
            trial), the gradient estimated only at accepted points, about ``d + 2`` queries per
            forward-CGE iteration; ``optimizer_kwargs`` ``history_size``, ``max_ls``, ``c1`` and
            ``noise`` (the evaluation noise's standard deviation, for noisy targets). The class
            ``torch.optim.LBFGS`` runs torch's L-BFGS with a strong-Wolfe search instead, one
            estimate per function-and-gradient evaluation (the estimator must query the base point),
            returning the best point evaluated.
        lr: learning rate; default ``1e-2``, and ``1`` (the quasi-Newton step) for ``"lbfgs"``.
        budget: maximum queries this run may spend (exact, retries included). Each iteration
            costs ``estimator.num_queries(dim)``; one more query is kept for the value at the
            returned point, so ``budget`` must be at least that cost + 1 (``"lbfgs"`` reports the
            value its line search measured at the returned point instead, and keeps a query only
            to evaluate an averaged point under ``noise``).
        maxiter: maximum iterations.
        callback: ``callback(intermediate_result)`` after every iteration; returning ``True``
            (or raising ``StopIteration``) stops the run cleanly.
        scheduler: evaluates query plans (``zoblackbox.schedule``); default the oracle itself.
        optimizer_kwargs: extra keyword arguments of the optimizer (e.g. ``momentum``).

    Returns:
        ``scipy.optimize.OptimizeResult`` with ``x`` (numpy), ``fun`` (loss at ``x``), ``nfev``
        (queries this run spent), ``nit``, ``success``, ``message``, ``history`` (one dict per
        iteration: ``nit``, ``nfev``, ``f0``, ``grad_norm``) and ``failures``. An update that
        would make ``x`` non-finite (a divergent run) stops the run with ``success=False`` and
        returns the last finite iterate; so does an iterate so large that ``x + mu == x`` (the
        estimator could measure no difference there).

    Raises:
        ConfigError: a bad argument (the message names it), before any query.
        TypeError: an argument of the wrong kind (oracle, estimator, scheduler, callback...).
        OracleError: a query failed under the oracle's ``raise`` policy.
    """
    if not isinstance(oracle, Oracle):
        raise TypeError(f"oracle must be a zoblackbox Oracle, got {type(oracle).__name__}; wrap functions with FunctionOracle")
    x = as_vector(x0, dim=oracle.dim, dtype=oracle.dtype, device=oracle.device, name="x0").clone()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero().flatten()[:5].tolist()
        raise ConfigError(f"x0 must be finite; non-finite entries at indices {bad}: {x[bad].tolist()}")
    if budget is not None and not _is_int(budget):
        raise ConfigError(f"budget must be an int, got {budget!r}")
    if isinstance(estimator, str) and estimator == "auto" or estimator is None:
        if isinstance(optimizer, str) and optimizer.lower() == "lbfgs":  # quasi-Newton needs consistent gradients
            estimator = CoordinateEstimator()
        else:
            estimator = auto_estimator(oracle.dim, None if budget is None else int(budget))
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a zoblackbox Estimator or 'auto', got {estimator!r}")
    step_cost = estimator.num_queries(oracle.dim)
    if budget is not None and budget < step_cost + 1:
        raise ConfigError(
            f"budget={budget!r} is below the cost of one iteration ({step_cost} queries for {estimator!r} "
            f"at dim={oracle.dim}) plus the final evaluation (1 query)"
        )
    if maxiter is not None and (not _is_int(maxiter) or maxiter < 0):
        raise ConfigError(f"maxiter must be a non-negative int, got {maxiter!r}")
    if budget is None and maxiter is None:
        raise ConfigError("give a budget (queries) or maxiter (iterations), or both")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}: {callback!r}")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
        raise TypeError(f"optimizer_kwargs must be a mapping or None, got {type(optimizer_kwargs).__name__}: "
                        f"{optimizer_kwargs!r}")

    budget = None if budget is None else int(budget)
    kwargs = dict(optimizer_kwargs or {})
    native_lbfgs = isinstance(optimizer, str) and optimizer.lower() == "lbfgs"
    if lr is None:
        lr = 1.0 if native_lbfgs else 1e-2
    if native_lbfgs:
        _check_lr(lr)
        options = check_lbfgs_kwargs(kwargs)
        own_budget = oracle.budget
        if budget is not None:  # the run's budget binds every query, retries included
            limit = oracle.nfev + budget
            oracle.budget = limit if own_budget is None else min(own_budget, limit)
        try:
            return minimize_lbfgs(oracle, x, estimator=estimator, lr=lr, budget=budget, maxiter=maxiter,
                                  callback=callback, scheduler=scheduler, options=options)
        finally:
            oracle.budget = own_budget
    param = nn.Parameter(x)
    is_lbfgs = isinstance(optimizer, type) and issubclass(optimizer, torch.optim.LBFGS)
    if is_lbfgs:
        if not estimator.queries_base:
            raise ConfigError(f"torch.optim.LBFGS needs the loss at x from each estimate; {estimator!r} does not "
                              "query the base point (use forward differences, e.g. CoordinateEstimator(), or "
                              "optimizer='lbfgs')")
        kwargs.setdefault("line_search_fn", "strong_wolfe")
        kwargs.setdefault("max_iter", 2**31 - 1)
        kwargs.setdefault("max_eval", 2**31 - 1)
        kwargs.setdefault("history_size", 20)
        if budget is not None:  # the budget is the stopping rule: do not stop early on torch's tolerances
            kwargs.setdefault("tolerance_grad", 0.0)
            kwargs.setdefault("tolerance_change", 0.0)
    opt = make_optimizer(optimizer, [param], lr, **kwargs)
    start_nfev, own_budget = oracle.nfev, oracle.budget
    loop = _minimize_lbfgs if is_lbfgs else _minimize_loop
    try:
        return loop(oracle, param, opt, estimator, step_cost, budget, maxiter, callback, scheduler,
                    start_nfev, own_budget)
    finally:
        oracle.budget = own_budget


def _minimize_loop(oracle, param, opt, estimator, step_cost, budget, maxiter, callback, scheduler, start_nfev,
                   own_budget) -> OptimizeResult:
    """The iterations of :func:`minimize`; the caller restores ``oracle.budget``."""
    t0 = time.perf_counter()
    history: list[dict] = []
    nit, message, success = 0, "", True

    def spent() -> int:
        return oracle.nfev - start_nfev

    def cap(kept: int) -> None:
        """Lower the oracle's budget to this run's, less ``kept`` queries: retries of failed
        queries then stay within ``budget`` too."""
        if budget is not None:
            limit = start_nfev + budget - kept
            oracle.budget = limit if own_budget is None else min(own_budget, limit)

    cap(1)  # one query is kept for the value at the returned point
    while True:
        if maxiter is not None and nit >= maxiter:
            message = f"maxiter={maxiter} iterations reached"
            break
        if budget is not None and spent() + step_cost + 1 > budget:
            message = f"query budget reached ({spent()} of {budget} spent)"
            break
        try:
            est: Estimate = estimator.estimate(oracle, param.detach(), scheduler=scheduler)
        except BudgetExhaustedError as exc:
            message, success = f"the oracle's own budget ran out: {exc}", False
            break
        except StepUnderflow as exc:
            if nit == 0:  # x0 itself: a configuration error
                raise
            message, success = f"stopped at iteration {nit + 1}: {exc}", False
            break
        opt.zero_grad(set_to_none=True)
        param.grad = est.grad.to(param.dtype)
        previous = param.detach().clone()
        opt.step()
        if not torch.isfinite(param).all():  # diverged: return the last finite iterate, not inf/nan
            with torch.no_grad():
                param.copy_(previous)
            message, success = (f"iteration {nit + 1} made x non-finite (gradient norm {float(est.grad.norm())!r}); "
                                "returning the last finite iterate (lower lr?)"), False
            break
        nit += 1
        history.append({"nit": nit, "nfev": spent(), "f0": est.f0, "grad_norm": float(est.grad.norm()),
                        "n_failed": est.n_failed, "time": time.perf_counter() - t0})
        if callback is not None:
            try:
                stop = callback(OptimizeResult(x=param.detach().cpu().numpy().copy(), nit=nit, nfev=spent(),
                                               fun=est.f0, grad=est.grad.detach().cpu().numpy()))
            except StopIteration:
                stop = True
            if stop:
                message = "stopped by the callback"
                break

    x_final = param.detach()
    cap(0)
    if oracle.remaining >= 1:
        fun = oracle(x_final)
    else:
        fun, success = math.nan, False
        message += "; no query left to evaluate the final point"
    return ZOResult(
        x=x_final.cpu().numpy(), fun=fun, nfev=spent(), nit=nit, success=success and math.isfinite(fun),
        message=message, history=history, failures=oracle.failure_report(),
        wall_time=time.perf_counter() - t0,
    )


class ZOGradient:
    """Fill ``p.grad`` of a module's parameters with a zeroth-order estimate.

    The ZO counterpart of ``loss.backward()``: the model is queried as a black box through a
    :class:`~zoblackbox.adapters.torch_module.ModuleOracle` (``functional_call``, never an in-place
    perturbation), and the estimate is *accumulated* into ``p.grad`` as autograd would, so any
    ``torch.optim`` optimizer, gradient clipping and LR scheduler work unchanged::

        zo = ZOGradient(model, F.cross_entropy, estimator=CoordinateEstimator())
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = zo.backward(inputs, targets)
            optimizer.step()

    Args:
        model: the module.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        estimator: default ``CoordinateEstimator()``.
        params: parameter names or parameters to estimate (default: all trainable).
        bn_policy: BatchNorm handling during queries (``"batch"`` or ``"eval"``).
        scheduler: evaluates query plans (``zoblackbox.schedule``); default the oracle itself.
        **oracle_kwargs: passed to the ``ModuleOracle`` (``chunk_size``, ``budget``, ``on_failure``...).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, estimator: Estimator | None = None,
                 params: Iterable | None = None, bn_policy: str = "batch", scheduler=None, **oracle_kwargs):
        from zoblackbox.adapters.torch_module import ModuleOracle

        self.estimator = CoordinateEstimator() if estimator is None else estimator
        if not isinstance(self.estimator, Estimator):
            raise TypeError(f"estimator must be a zoblackbox Estimator, got {self.estimator!r}")
        self.oracle = ModuleOracle(model, loss_fn, params, bn_policy=bn_policy, **oracle_kwargs)
        self.scheduler = scheduler
        self.model = model
        self.last: Estimate | None = None

    @property
    def nfev(self) -> int:
        """Queries spent so far (all batches)."""
        return self.oracle.nfev

    def backward(self, inputs, targets, coords=None) -> float | None:
        """Estimate the gradient on this batch, accumulate it into ``p.grad``; returns the loss
        at the current parameters (``None`` for schemes that do not query it)."""
        self.oracle.set_batch(inputs, targets)
        x = self.oracle.get_params()
        est = self.estimator.estimate(self.oracle, x, coords=coords, scheduler=self.scheduler)
        named = dict(self.model.named_parameters())
        for name, g in self.oracle.layout.unflatten(est.grad).items():
            p = named[name]
            g = g.to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g
        self.oracle.update_bn_stats(x)
        self.last = est
        return est.f0


class _StopLBFGS(Exception):
    """Raised from the L-BFGS closure to end the run (budget, maxiter, callback, failure)."""


def _minimize_lbfgs(oracle, param, opt, estimator, step_cost, budget, maxiter, callback, scheduler, start_nfev,
                    own_budget) -> OptimizeResult:
    """:func:`minimize` with ``torch.optim.LBFGS``: one estimate per closure call, best point kept."""
    t0 = time.perf_counter()
    history: list[dict] = []
    state = {"message": "", "success": True, "best_f": math.inf, "best_x": param.detach().clone(), "evals": 0}

    def spent() -> int:
        return oracle.nfev - start_nfev

    if budget is not None:  # one query is kept for the value at the returned point
        limit = start_nfev + budget - 1
        oracle.budget = limit if own_budget is None else min(own_budget, limit)

    def nit() -> int:
        return int(opt.state[param].get("n_iter", 0)) if param in opt.state else 0

    def closure():
        if maxiter is not None and nit() >= maxiter:
            state["message"] = f"maxiter={maxiter} iterations reached"
            raise _StopLBFGS
        if budget is not None and spent() + step_cost + 1 > budget:
            state["message"] = f"query budget reached ({spent()} of {budget} spent)"
            raise _StopLBFGS
        x = param.detach()
        if not torch.isfinite(x).all():
            state["message"], state["success"] = "the line search produced a non-finite x", False
            raise _StopLBFGS
        try:
            est: Estimate = estimator.estimate(oracle, x, scheduler=scheduler)
        except BudgetExhaustedError as exc:
            state["message"], state["success"] = f"the oracle's own budget ran out: {exc}", False
            raise _StopLBFGS from exc
        except StepUnderflow as exc:
            if state["evals"] == 0:
                raise
            state["message"], state["success"] = f"stopped: {exc}", False
            raise _StopLBFGS from exc
        state["evals"] += 1
        f0 = est.f0 if est.f0 is not None and math.isfinite(est.f0) else math.inf
        if f0 < state["best_f"]:
            state["best_f"], state["best_x"] = f0, x.clone()
        history.append({"nit": nit(), "nfev": spent(), "f0": est.f0, "grad_norm": float(est.grad.norm()),
                        "n_failed": est.n_failed, "time": time.perf_counter() - t0})
        if callback is not None and state["evals"] > 1:
            try:
                stop = callback(OptimizeResult(x=x.cpu().numpy().copy(), nit=nit(), nfev=spent(), fun=est.f0,
                                               grad=est.grad.detach().cpu().numpy()))
            except StopIteration:
                stop = True
            if stop:
                state["message"] = "stopped by the callback"
                raise _StopLBFGS
        param.grad = est.grad.to(param.dtype)
        # a failed base query: +inf makes the line search back off
        return torch.tensor(f0 if math.isfinite(f0) else math.inf, dtype=torch.float64)

    try:
        opt.step(closure)  # runs until a tolerance of torch's L-BFGS is met or the closure stops it
        state["message"] = "L-BFGS converged (gradient, step or loss change below its tolerances)"
    except _StopLBFGS:
        pass

    x_final = state["best_x"]
    oracle.budget = own_budget
    if budget is not None:
        limit = start_nfev + budget
        oracle.budget = limit if own_budget is None else min(own_budget, limit)
    if oracle.remaining >= 1:
        fun = oracle(x_final)
    else:
        fun, state["success"] = math.nan, False
        state["message"] += "; no query left to evaluate the final point"
    return ZOResult(
        x=x_final.cpu().numpy(), fun=fun, nfev=spent(), nit=nit(), success=state["success"] and math.isfinite(fun),
        message=state["message"], history=history, failures=oracle.failure_report(),
        wall_time=time.perf_counter() - t0,
    )
