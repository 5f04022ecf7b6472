"""``minimize``: the scipy-style driver of the ask/tell engine.

* :func:`minimize` -- ``minimize(fun, x0, ...) -> ZOResult`` with ``x, fun, nfev, nit, success,
  message, history``; ``fun`` is a plain callable (numpy or torch) or an
  :class:`~zoblackbox.oracle.Oracle`; budgets are exact; runs can show progress, log every
  iteration and resume from a checkpoint after a kill.
* :class:`ZOGradient` (re-exported) -- the ZO analogue of ``loss.backward()`` for a torch module.

The loop itself is :class:`zoblackbox.engine.AskTell`'s; this module only builds the engine,
attaches the pieces the user asked for (:mod:`zoblackbox.callbacks`) and runs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._types import ArrayLike, BoundsLike, SchedulerLike
from .callbacks import Checkpointer, JSONLinesLog, ProgressBar, ScipyCallback, default_progress
from .engine import AUTO_MIN_CGE_STEPS, AUTO_RGE_Q, AskTell, auto_estimator, start_point
from .errors import ConfigError
from .estimators import Estimator
from .oracle import FunctionOracle, Oracle, as_vector, short_repr
from .result import ZOResult
from .rules import OPTIMIZERS, SignSGD, make_optimizer
from .torch_module import ZOGradient

if TYPE_CHECKING:
    from .rules import UpdateRule

__all__ = ["AUTO_MIN_CGE_STEPS", "AUTO_RGE_Q", "OPTIMIZERS", "SignSGD", "ZOGradient", "as_oracle", "auto_estimator",
           "make_optimizer", "minimize"]


def as_oracle(fun, x0, *, vectorized: bool = False) -> tuple[Oracle, torch.Tensor]:
    """``fun`` as an oracle and ``x0`` as its starting point.

    An :class:`~zoblackbox.oracle.Oracle` is used as it is (``x0`` converted to its dtype and
    device). A plain callable gets a :class:`~zoblackbox.oracle.FunctionOracle` whose computation
    dtype follows ``x0`` (:func:`~zoblackbox.engine.start_point`): a numpy array or a list is handed
    to ``fun`` as numpy (float64 for integers and lists), a torch tensor as torch in its own dtype
    and device. ``vectorized=True``:
    ``fun`` takes a ``(K, dim)`` batch and returns ``K`` losses.
    """
    if not isinstance(vectorized, (bool, np.bool_)):
        raise TypeError(f"vectorized must be a bool, got {type(vectorized).__name__}: {vectorized!r}")
    if isinstance(fun, Oracle):
        if vectorized:  # silently ignoring it would hide a misunderstanding
            raise ConfigError(f"vectorized=True applies to plain callables; the oracle {fun!r} evaluates batches its "
                              "own way (FunctionOracle(fn, dim, vectorized=True) for a batched function)")
        x = as_vector(x0, dim=fun.dim, dtype=fun.dtype, device=fun.device, name="x0").clone()
        return fun, x
    if not callable(fun):
        raise TypeError(f"fun must be a callable or a zoblackbox Oracle, got {type(fun).__name__}: {short_repr(fun)}")
    x, numpy = start_point(x0)  # the engine's one rule for the computation dtype
    oracle = FunctionOracle(fun, int(x.shape[0]), vectorized=bool(vectorized), numpy=numpy, dtype=x.dtype,
                            device=None if numpy else x.device)
    return oracle, x


def minimize(
    fun: Callable[..., Any] | Oracle,
    x0: ArrayLike,
    *,
    estimator: Estimator | str = "auto",
    optimizer: str | type[torch.optim.Optimizer] | UpdateRule = "auto",
    lr: float | None = None,
    budget: int | None = None,
    maxiter: int | None = None,
    callback: Callable | None = None,
    scheduler: SchedulerLike | None = None,
    optimizer_kwargs: dict | None = None,
    vectorized: bool = False,
    bounds: BoundsLike | None = None,
    seed: int | None = 0,
    lr_schedule: Callable[[int], float] | None = None,
    progress: bool | None = False,
    log: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
) -> ZOResult:
    """Minimize a black-box function with zeroth-order gradient estimates.

    With nothing but ``fun``, ``x0`` and ``budget``, the run needs no tuning: the default
    ``optimizer="auto"`` (``zoblackbox.strategy.AutoStrategy``) measures the noise of ``fun``
    (ECNoise on 7 queries), runs L-BFGS on coordinate-wise finite differences whose step follows
    the dtype, the scale of ``x`` and the noise (forward, then central once the line search
    stalls; central with the noise-aware L-BFGS on noisy functions), then spends what is left of
    the budget on IPOP-CMA-ES (pycma) for multimodal functions. ``result.strategy`` says what it
    chose and why; ``docs/minimize.md`` ("How minimize chooses") has the measurements on COCO BBOB.
    Give an ``estimator``, ``lr``, ``optimizer_kwargs`` or ``lr_schedule`` (or an explicit
    ``optimizer``) and you get exactly those instead: ``optimizer="auto"`` with any of them means
    ``"adam"``, the first-order default for neural networks (lr ``1e-2``, DeepZero's ``mu=5e-3``).

    Parameters
    ----------
    fun : callable or Oracle
        The function: a plain callable ``fun(x) -> float`` (numpy in, as scipy does, or torch when
        ``x0`` is a tensor; with ``vectorized=True``, ``fun(X) -> K losses`` for a ``(K, dim)``
        batch) or a zoblackbox :class:`Oracle`.
    x0 : array_like or torch.Tensor
        Starting point, 1-D, finite. With a callable, the computation dtype follows ``x0``
        (float64 for numpy float64 arrays, ints and lists).
    estimator : Estimator or "auto", default "auto"
        Gradient estimator. ``"auto"`` lets the default strategy choose, or picks CGE or RGE from
        the dimension and the budget for a first-order ``optimizer`` (CGE when ``dim <= 20``, no
        budget, or at least 100 CGE iterations fit; else RGE with ``q=20``), and forward CGE for
        ``"lbfgs"`` (curvature pairs from random-direction estimates would be noise).
    optimizer : str or type, default "auto"
        ``"auto"`` (above), ``"sgd"``, ``"adam"``, ``"adamw"``, ``"signsgd"``, ``"lbfgs"`` or a
        ``torch.optim.Optimizer`` class. ``"lbfgs"`` is zoblackbox's L-BFGS for estimated
        gradients: line searches on function values only (one query per trial), the gradient
        estimated only at accepted points, about ``d + 2`` queries per forward-CGE iteration;
        ``optimizer_kwargs`` ``history_size``, ``max_ls``, ``c1`` and ``noise`` (the evaluation
        noise's standard deviation, for noisy targets). The class ``torch.optim.LBFGS`` runs
        torch's L-BFGS with a strong-Wolfe search instead, one estimate per function-and-gradient
        evaluation (the estimator must query the base point), returning the best point evaluated.
    lr : float or None, default None
        Learning rate, positive and finite; ``None`` means ``1e-2``, and ``1`` (the quasi-Newton
        step) for ``"lbfgs"``.
    budget : int or None, default None
        Maximum queries this run may spend (exact, retries included). The default strategy needs
        at least 7 (its noise probe) and uses all of it unless the run is stopped. Each iteration
        costs ``estimator.num_queries(dim)``; one more query is kept for the value at the returned
        point, so ``budget`` must be at least that cost + 1 (``"lbfgs"`` reports the value its line
        search measured at the returned point instead). At least one of ``budget`` and ``maxiter``
        is required.
    maxiter : int or None, default None
        Maximum iterations, ``>= 1``.
    callback : callable or None, default None
        ``callback(intermediate_result)`` after every iteration (``x``, ``fun``, ``nit``, ``nfev``,
        ``grad``); returning ``True`` (or raising ``StopIteration``) stops the run cleanly.
    scheduler : zoblackbox.schedule.Scheduler or None, default None
        Evaluates query plans (``zoblackbox.schedule``); default: the oracle itself.
    optimizer_kwargs : dict or None, default None
        Extra keyword arguments of the optimizer (e.g. ``momentum``), checked when the run is built.
    vectorized : bool, default False
        ``fun`` takes a 2-D batch (plain callables only).
    bounds : scipy.optimize.Bounds or tuple or sequence or None, default None
        A box, for every optimizer: scipy's ``Bounds``, ``(lower, upper)`` (scalars or arrays) or
        scipy's sequence of ``dim`` ``(min, max)`` pairs (``None`` = unbounded). No query is made
        outside it (finite-difference steps that would cross it go the other way).
    seed : int or None, default 0
        Seed of the default strategy's probe and CMA-ES sampling, or of the estimator ``"auto"``
        picks.
    lr_schedule : callable or None, default None
        ``lr_schedule(iteration) -> factor`` (first-order rules), e.g. :class:`WarmupCosine`; a
        factor must be a finite number ``>= 0``.
    progress : bool or None, default False
        A tqdm bar with the loss, the queries and the queries per second (``None``: on when
        standard error is a terminal).
    log : str or os.PathLike or None, default None
        A file to which one JSON line per iteration is written (a resumed run rewrites it with the
        records its checkpoint has seen; a fresh run refuses a file that already holds records).
    checkpoint : str or os.PathLike or None, default None
        A directory for checkpoints of the engine and the oracle's counters, written atomically
        every ``checkpoint_every`` iterations and at the end. Calling ``minimize`` again with the
        same directory (after a crash or a kill) continues the run and ends with the same
        parameters, bitwise, as an uninterrupted run; a finished run returns its result without
        querying again.
    checkpoint_every : int, default 1
        Iterations between checkpoints, ``>= 1``.

    Returns
    -------
    ZOResult
        ``x`` (numpy when ``x0`` was numpy), ``fun`` (loss at ``x``), ``nfev`` (queries this run
        spent), ``nit``, ``success``, ``message``, ``history`` (one dict per iteration: ``nit``,
        ``nfev``, ``f0``, ``grad_norm``, ``n_failed``, ``time``), ``failures`` and, under the
        default strategy, ``strategy`` (the measured noise, the phases and why each was chosen).
        The default strategy returns the best point it evaluated, with its measured loss (a noisy
        function: its final estimate of the optimum, evaluated once). An update that would make
        ``x`` non-finite (a divergent run) stops the run with ``success=False`` and returns the
        last finite iterate; so does an iterate so large that ``x + mu == x``.

    Raises
    ------
    ConfigError
        A bad value (the message names it), before any query: a non-finite ``x0``, neither
        ``budget`` nor ``maxiter``, a budget too small for one iteration, a bad ``lr``, bound,
        optimizer name or keyword, ``lr_schedule`` factor or ``checkpoint_every``.
    TypeError
        An argument of the wrong kind: ``fun`` not callable, ``estimator`` not an
        :class:`Estimator`, ``scheduler`` without ``run``, ``callback`` not callable,
        ``optimizer_kwargs`` not a mapping, ``progress`` not a bool or ``None``.
    OracleError
        A query failed under the oracle's ``"raise"`` policy.
    CheckpointError
        ``checkpoint`` holds a corrupt checkpoint or one of another run.

    See Also
    --------
    AskTell : the same engine, driven by hand (points evaluated outside Python).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.optimize import rosen
    >>> from zoblackbox import minimize
    >>> res = minimize(rosen, np.zeros(4), budget=600)
    >>> bool(res.fun < 1e-8), res.nfev <= 600, res.strategy["decisions"][1]["phase"]
    (True, True, 'local')

    Explicit settings are used exactly as given:

    >>> from zoblackbox import CoordinateEstimator
    >>> res = minimize(rosen, np.zeros(4), optimizer="lbfgs", estimator=CoordinateEstimator(mu=1e-6),
    ...                budget=600)
    >>> bool(res.fun < 1e-3)
    True

    A bounded run never queries outside the box:

    >>> res = minimize(lambda x: float(((x - 3) ** 2).sum()), np.zeros(2), bounds=(-1, 1), budget=300)
    >>> res.x.round(3)
    array([1., 1.])
    """
    oracle, x = as_oracle(fun, x0, vectorized=vectorized)
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero().flatten()[:5].tolist()
        raise ConfigError(f"x0 must be finite; non-finite entries at indices {bad}: {x[bad].tolist()}")
    if budget is None and maxiter is None:
        raise ConfigError("give a budget (queries) or maxiter (iterations), or both")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}: {callback!r}")
    if scheduler is not None and not callable(getattr(scheduler, "run", None)):
        raise TypeError(f"scheduler must be a zoblackbox Scheduler or None, got {type(scheduler).__name__}: "
                        f"{short_repr(scheduler)}")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
        raise TypeError(f"optimizer_kwargs must be a mapping or None, got {type(optimizer_kwargs).__name__}: "
                        f"{optimizer_kwargs!r}")
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    engine = AskTell(x, estimator=estimator, optimizer=optimizer, lr=lr, budget=budget, maxiter=maxiter,
                     optimizer_kwargs=optimizer_kwargs, seed=seed, bounds=bounds, lr_schedule=lr_schedule)
    logger = JSONLinesLog(log) if log is not None else None
    saver = Checkpointer(checkpoint, checkpoint_every, oracle=oracle) if checkpoint is not None else None
    if saver is not None and saver.exists():
        state, _ = saver.load()
        engine.load_state_dict(state["engine"])  # checked against this run's problem first
        if "oracle" in state:
            oracle.load_state_dict(state["oracle"])
        if logger is not None:
            logger.rewrite(engine.history)
    elif logger is not None:
        if logger.path.exists() and logger.path.stat().st_size > 0:  # another run's records: never overwritten
            raise ConfigError(f"log file {str(logger.path)!r} already holds another run's records and there is no "
                              "checkpoint to resume from; choose another path or remove it")
        logger.rewrite([])
    if callback is not None:
        engine.observers.append(ScipyCallback(callback))
    for piece in (logger, saver):
        if piece is not None:
            engine.observers.append(piece)
    bar = None
    if progress or (progress is None and default_progress()):
        bar = ProgressBar(engine.budget, engine.maxiter, start_nfev=engine.nfev)
        engine.observers.append(bar)
    try:
        result = engine.run(oracle, scheduler)
    finally:
        if bar is not None:
            bar.close()
    if saver is not None:
        saver.save(engine)
    return result
