"""L-BFGS built for zeroth-order gradients: line searches on function values only.

With finite-difference gradients a gradient costs ``d`` queries and a function value costs one.
A line search that needs the gradient at every trial point (strong Wolfe, as in
``torch.optim.LBFGS`` or scipy's L-BFGS-B with ``approx_grad``) pays ``d + 1`` queries per trial;
this one pays one:

* every trial step is a single query; the gradient is estimated only at the accepted point, and
  the loss the line search measured there stands in for the estimate's base query
  (``Estimator.estimate(..., f0=)``), so a forward-difference iteration costs ``d + trials``;
* since trials are cheap, the search does not stop at the first sufficient decrease: a parabola
  through ``phi(0)``, ``phi'(0) = g.p`` and the latest trial proposes the next step until the
  trial sits within ``[0.8, 1.25]`` of the parabola's minimum. On a quadratic that is the exact
  line minimum after at most two trials, which makes the iteration conjugate-gradient-like;
* a curvature pair ``(s, y)`` enters the memory only when ``s.y > 0`` (no Wolfe curvature test is
  needed for that), and a direction that is not a descent direction resets the memory;
* ``noise`` (the standard deviation of one evaluation) relaxes the sufficient-decrease test by
  ``2 * noise`` (Berahas, Byrd & Nocedal, "Derivative-free optimization of noisy functions via
  quasi-Newton methods", SIAM J. Optim. 2019); where the predicted decrease is within the noise
  the first acceptable trial is taken instead of the lowest noisy value. With an estimator that
  knows its noise gain (CGE: ``sigma_g = noise * estimator.noise_gain()`` per coordinate), curvature
  pairs whose ``|y|`` is within 3x the noise's ``sqrt(2 d) sigma_g`` are left out of the memory, and
  Polyak-Ruppert averaging is on: the trailing run of iterates whose gradient estimate is mostly
  noise (``|g|^2 < 4 d sigma_g^2``) is averaged into the returned point, which cancels the
  gradient noise each of them carries (one query is kept aside to evaluate it; it is returned
  unless its loss is clearly, by more than ``3 * noise``, worse than the last iterate's).

Used by :func:`zoblackbox.minimize` with ``optimizer="lbfgs"``.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
from scipy.optimize import OptimizeResult

from .errors import BudgetExhaustedError, ConfigError
from .estimators import Estimate, Estimator, StepUnderflow
from .oracle import Oracle
from .result import ZOResult

__all__ = ["LBFGS_DEFAULTS", "minimize_lbfgs"]

#: keyword arguments of ``minimize(optimizer="lbfgs", optimizer_kwargs=...)`` and their defaults
LBFGS_DEFAULTS = {"history_size": 20, "max_ls": 10, "c1": 1e-4, "noise": 0.0}

_ACCEPT = (0.8, 1.25)  # a trial within this ratio of the parabola's minimum ends the line search
_SHRINK, _GROW = 0.1, 10.0  # limits of one line-search step change


def check_lbfgs_kwargs(kwargs: dict) -> dict:
    """``LBFGS_DEFAULTS`` updated with ``kwargs``; unknown names or bad values raise ConfigError."""
    unknown = sorted(set(kwargs) - set(LBFGS_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown L-BFGS option(s) {unknown}; expected some of {sorted(LBFGS_DEFAULTS)}")
    out = {**LBFGS_DEFAULTS, **kwargs}
    for name in ("history_size", "max_ls"):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"L-BFGS option {name} must be a positive int, got {v!r}")
    c1, noise = out["c1"], out["noise"]
    if isinstance(c1, bool) or not isinstance(c1, (int, float)) or not 0 < c1 < 1:
        raise ConfigError(f"L-BFGS option c1 must be in (0, 1), got {c1!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ConfigError(f"L-BFGS option noise must be a finite number >= 0 (the standard deviation of one "
                          f"evaluation), got {noise!r}")
    out["c1"], out["noise"] = float(c1), float(noise)
    return out


def _direction(g: torch.Tensor, memory: deque) -> torch.Tensor:
    """``-H g`` by the two-loop recursion, ``H0 = (s.y / y.y) I`` from the newest pair."""
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(memory):
        a = rho * torch.dot(s, q)
        q -= a * y
        alphas.append(a)
    if memory:
        s, y, _ = memory[-1]
        q *= torch.dot(s, y) / torch.dot(y, y)
    for (s, y, rho), a in zip(memory, reversed(alphas)):
        b = rho * torch.dot(y, q)
        q += (a - b) * s
    return -q


class _Stop(Exception):
    def __init__(self, message: str, success: bool = True):
        super().__init__(message)
        self.message, self.success = message, success


def minimize_lbfgs(oracle: Oracle, x: torch.Tensor, *, estimator: Estimator, lr: float, budget: int | None,
                   maxiter: int | None, callback, scheduler, options: dict) -> OptimizeResult:
    """The L-BFGS loop of :func:`zoblackbox.minimize` (see the module docstring).

    ``budget`` binds every query (the caller has lowered ``oracle.budget`` accordingly). The
    returned ``fun`` is the loss the run measured at the returned ``x`` (no extra query), or, with
    averaging, the loss at the averaged point (one query, kept aside from the start). ``history``
    has an entry for x0 (``nit`` 0) and one for every iterate whose gradient was estimated.
    """
    t0 = time.perf_counter()
    start = oracle.nfev
    noise, c1, max_ls = options["noise"], options["c1"], options["max_ls"]
    gain = estimator.noise_gain() if noise > 0 else None
    keep = 1 if gain else 0  # one query for the value at an averaged point
    with_base = estimator.queries_base
    n_grad = estimator.num_queries(oracle.dim) - (1 if with_base else 0)  # the base value comes from the search
    first_cost = n_grad + 1 + keep
    if budget is not None and budget < first_cost:
        raise ConfigError(f"budget={budget!r} is below the cost of the first L-BFGS gradient ({first_cost} queries: "
                          f"{estimator!r} at dim={oracle.dim}, the loss at x0{', one query for the averaged point' if keep else ''})")
    # with noisy losses, y = g_new - g carries noise of norm ~ sqrt(2 d) sigma_g: a pair whose y is
    # not clearly above it would teach the memory the noise's curvature, not the loss's
    y_floor = 3 * math.sqrt(2 * oracle.dim) * noise * gain if gain else 0.0
    # iterates whose gradient estimate is mostly noise (|g|^2 below 4x its expected d sigma_g^2) are averaged
    noise_g2 = oracle.dim * (noise * gain) ** 2 if gain else 0.0
    memory: deque = deque(maxlen=options["history_size"])
    history: list[dict] = []
    stall: list[torch.Tensor] = []
    state = {"nit": 0, "x": x.to(torch.float64), "f": math.nan, "g": None}

    def spent() -> int:
        return oracle.nfev - start

    def left() -> float:
        return math.inf if budget is None else budget - spent() - keep

    def gradient(point: torch.Tensor, f: float) -> Estimate:
        if left() < n_grad:
            raise _Stop(f"query budget reached ({spent()} of {budget} spent)")
        try:
            return estimator.estimate(oracle, point.to(oracle.dtype), scheduler=scheduler, f0=f)
        except BudgetExhaustedError as exc:
            raise _Stop(f"the oracle's own budget ran out: {exc}", success=False) from exc

    def value(point: torch.Tensor) -> float:
        if left() < 1:
            raise _Stop(f"query budget reached ({spent()} of {budget} spent)")
        try:
            v = float(oracle.evaluate(point.to(oracle.dtype)[None])[0])
        except BudgetExhaustedError as exc:
            raise _Stop(f"the oracle's own budget ran out: {exc}", success=False) from exc
        return v if math.isfinite(v) else math.inf

    def record(est: Estimate) -> None:
        history.append({"nit": state["nit"], "nfev": spent(), "f0": state["f"], "grad_norm": float(state["g"].norm()),
                        "n_failed": est.n_failed, "time": time.perf_counter() - t0})

    message, success = "", True
    try:
        f = value(state["x"])
        state["f"] = f
        if not math.isfinite(f):
            raise _Stop(f"the loss at x0 is not finite ({f!r}): no line search can start there", success=False)
        est = gradient(state["x"], f)
        state["g"] = est.grad.to(torch.float64)
        record(est)
        while True:
            xd, f, g = state["x"], state["f"], state["g"]
            if maxiter is not None and state["nit"] >= maxiter:
                raise _Stop(f"maxiter={maxiter} iterations reached")
            if not bool(torch.any(g != 0)):
                raise _Stop("the gradient estimate is zero: a stationary point (or mu too small to see a change)")
            p = _direction(g, memory)
            dphi0 = float(torch.dot(g, p))
            if not math.isfinite(dphi0) or dphi0 >= 0:  # not a descent direction: forget the curvature
                memory.clear()
                p = -g
                dphi0 = float(torch.dot(g, p))
            alpha = lr if memory else lr * min(1.0, 1.0 / float(g.norm()))
            x_new, f_new, stop = _line_search(value, xd, f, p, dphi0, alpha, c1, noise, max_ls, oracle.dtype)
            if x_new is None:
                if stop is not None:
                    raise stop
                if memory:  # one more try along the steepest descent
                    memory.clear()
                    continue
                raise _Stop("the line search found no decrease along the steepest-descent direction "
                            "(converged to the gradient estimate's resolution; a noisy loss needs noise= and "
                            "a larger mu)")
            state["nit"] += 1
            state["x"], state["f"] = x_new, f_new
            if stop is not None:  # the budget ran out inside the search: keep its best point
                raise stop
            try:
                est = gradient(x_new, f_new)
            except StepUnderflow as exc:
                raise _Stop(f"stopped at iteration {state['nit']}: {exc}", success=False) from exc
            g_new = est.grad.to(torch.float64)
            s, y = x_new - xd, g_new - g
            sy = float(torch.dot(s, y))
            if sy > 1e-10 * float(s.norm() * y.norm()) and float(y.norm()) > y_floor:
                memory.append((s, y, 1.0 / sy))
            state["g"] = g_new
            if noise_g2:
                if float(torch.dot(g_new, g_new)) < 4 * noise_g2:
                    stall.append(x_new)
                else:
                    stall.clear()
            record(est)
            if callback is not None:
                try:
                    halt = callback(OptimizeResult(x=x_new.to(oracle.dtype).cpu().numpy(), nit=state["nit"],
                                                   nfev=spent(), fun=f_new, grad=g_new.cpu().numpy()))
                except StopIteration:
                    halt = True
                if halt:
                    raise _Stop("stopped by the callback")
    except _Stop as stop:
        message, success = stop.message, stop.success

    x_out, fun = state["x"], state["f"]
    if len(stall) > 1 and oracle.remaining >= 1:
        x_avg = torch.stack(stall).mean(0)
        f_avg = float(oracle.evaluate(x_avg.to(oracle.dtype)[None])[0])
        if math.isfinite(f_avg) and f_avg <= fun + 3 * noise:  # not clearly worse than the last iterate
            x_out, fun = x_avg, f_avg
            message += f"; returned the mean of the last {len(stall)} iterates (noise={noise})"
    return ZOResult(
        x=x_out.to(oracle.dtype).cpu().numpy(), fun=fun, nfev=spent(), nit=state["nit"],
        success=success and math.isfinite(fun), message=message, history=history,
        failures=oracle.failure_report(), wall_time=time.perf_counter() - t0,
    )


def _line_search(value, x, f, p, dphi0, alpha, c1, noise, max_ls, dtype):
    """Function-value line search along ``p``: ``(x_new, f_new, stop)``, ``x_new`` None when no
    acceptable step was found, ``stop`` the budget's :class:`_Stop` when it ran out during the search.

    Each trial costs one query; a trial is acceptable when it satisfies the Armijo condition
    relaxed by ``2 * noise``. A parabola through ``phi(0) = f``, ``phi'(0) = dphi0`` and the latest
    trial proposes the next step (within ``[0.1, 10]`` times the current one). The search ends at an
    acceptable trial within ``[0.8, 1.25]`` of the parabola's minimum, or after ``max_ls`` trials
    with the lowest acceptable one. Where the predicted decrease ``|dphi0| alpha`` is below
    ``20 * noise`` the parabola would be fitted to noise: the first acceptable trial is taken
    (choosing the lowest of several noisy values would pick the luckiest noise, not the best point).
    """
    best_x, best_f = None, math.inf
    for _ in range(max_ls):
        point = (x + alpha * p).to(dtype).to(torch.float64)  # exactly the point the oracle sees
        if not bool(torch.isfinite(point).all()):  # a step so long that x overflows: shorter, no query
            alpha *= _SHRINK
            continue
        if bool(torch.equal(point, x)):
            break  # the step rounds away
        try:
            fa = value(point)
        except _Stop as stop:
            return best_x, best_f, stop
        ok = fa <= f + c1 * alpha * dphi0 + 2 * noise
        if ok and noise > 0 and abs(dphi0) * alpha < 20 * noise:
            return point, fa, None
        if ok and fa < best_f:
            best_x, best_f = point, fa
        if not math.isfinite(fa):
            alpha *= _SHRINK
            continue
        curv = (fa - f - dphi0 * alpha) / (alpha * alpha)  # inf/nan (not OverflowError) for huge steps
        ratio = (-dphi0 / (2 * curv) if curv > 0 else math.inf) / alpha if math.isfinite(curv) else math.nan
        if math.isnan(ratio):  # no usable model of the line: plain backtracking or expansion
            ratio = _SHRINK if not ok else _GROW
        if ok and _ACCEPT[0] <= ratio <= _ACCEPT[1]:
            break
        alpha *= min(max(ratio, _SHRINK), _GROW if ok else 0.5)
    return best_x, best_f, None
