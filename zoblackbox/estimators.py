"""Zeroth-order gradient estimators: coordinate-wise (CGE) and random-direction (RGE).

Each estimator splits its work in two pure steps around the oracle (DESIGN.md, "data flow"):

* :meth:`Estimator.plan` decides *what* to query (a :class:`~zoblackbox.plan.QueryPlan`);
* :meth:`Estimator.combine` turns the losses into a gradient estimate.

:meth:`Estimator.estimate` runs both around ``oracle.evaluate_plan`` (or a scheduler's ``run``),
so a faster evaluator plugs in without touching the estimator. No estimator ever calls autograd
on the oracle: the queries run under ``torch.no_grad()``.

References: Chen et al., "DeepZero", ICLR 2024 (CGE for deep models; mu = 5e-3);
Nesterov & Spokoiny 2017 and Duchi et al. 2015 (Gaussian and spherical smoothing for RGE).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from . import directions as _directions
from . import shaping as _shaping
from ._types import ArrayLike, CoordsLike, SchedulerLike
from .directions import Directions, directions_from
from .errors import ConfigError
from .oracle import Oracle, as_vector, short_repr
from .plan import QueryPlan
from .shaping import FitnessShaping, shaping_from

__all__ = ["MAX_MU", "MAX_Q", "CoordinateEstimator", "Estimate", "Estimator", "RandomEstimator", "StepUnderflow"]


@dataclass
class Estimate:
    """A gradient estimate, as returned by :meth:`Estimator.estimate` and ``combine``.

    A dataclass; the parameters are its fields.

    Parameters
    ----------
    grad : torch.Tensor
        The estimate, same shape, dtype and device as ``x``; zero outside the estimated coordinates.
    f0 : float or None
        Loss at ``x`` when the plan queried it (``None`` for central/antithetic schemes).
    nfev : int
        Queries spent by this estimate (retries of failed queries included).
    n_failed : int, default 0
        Queries whose loss was non-finite and so left out of the differences.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import CoordinateEstimator, FunctionOracle
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=2, dtype=torch.float64)
    >>> est = CoordinateEstimator(mu=1e-3, scheme="central").estimate(oracle, torch.tensor([1.0, -2.0]))
    >>> est.grad.round(decimals=6), est.f0, est.nfev, est.n_failed
    (tensor([ 2., -4.], dtype=torch.float64), None, 4, 0)
    """

    grad: torch.Tensor
    f0: float | None
    nfev: int
    n_failed: int = 0


#: the largest ``mu``: a step ``mu * u`` stays finite in float32 (max 3.4e38) for any direction entry
#: ``|u_i| < 3e8``, so a perturbed point never overflows the narrowest usual dtype by ``mu`` alone; a
#: smoothing radius of 1e30 in the units of ``x`` is a mistake, not a setting
MAX_MU = 1e30
#: the most directions per estimate: a plan materializes a ``(q, n)`` direction matrix (128 MiB of
#: float64 at ``n = 1`` for 2**24 directions) and one estimate costs ``q + 1`` (or ``2 q``) queries;
#: beyond this, ``q`` is a typo (the literature uses tens to thousands). ``q * dim`` against the budget
#: is checked when the plan is built, before anything is allocated.
MAX_Q = 2**24


def _check_mu(mu) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
        raise ConfigError(f"mu must be a positive finite number, got {mu!r}")
    if mu > MAX_MU:
        raise ConfigError(f"mu={mu!r} is absurdly large (at most {MAX_MU:g}: the perturbed points x + mu * u would "
                          "overflow float32); mu is the finite-difference step, in the units of x")
    return float(mu)


def _check_coords(coords, dim: int, device) -> torch.Tensor:
    """All coordinates (``None``) or a validated 1-D tensor of distinct indices in ``[0, dim)``."""
    if coords is None:
        return torch.arange(dim, device=device)
    if isinstance(coords, (str, bytes)):
        raise ConfigError(f"coords must be integer indices or a boolean mask, got {coords!r}")
    try:
        c = torch.as_tensor(coords)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ConfigError(
            f"coords must be integer indices or a boolean mask, got {short_repr(coords)} ({exc})") from exc
    if c.numel() == 0:
        raise ConfigError(f"coords selects no coordinate (got {short_repr(coords)}); at least one is needed for an "
                          "estimate")
    if c.dtype == torch.bool:
        if c.shape != (dim,):
            raise ConfigError(f"a boolean coordinate mask must have shape ({dim},), got {tuple(c.shape)}")
        c = c.nonzero().flatten()
    elif c.is_floating_point() or c.is_complex():
        raise ConfigError(f"coords must be integer indices or a boolean mask, got dtype {c.dtype}: "
                          f"{short_repr(coords)}")
    c = c.reshape(-1).to(device=device, dtype=torch.long)
    if c.numel() == 0:
        raise ConfigError("coords selects no coordinate (an all-False mask); at least one is needed for an estimate")
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= dim:
        raise ConfigError(f"coords must lie in [0, {dim}), got an index {lo if lo < 0 else hi}")
    values, counts = torch.unique(c, return_counts=True)
    if values.numel() != c.numel():
        raise ConfigError(f"coords contains duplicate indices: {values[counts > 1][:5].tolist()}")
    return c


class StepUnderflow(ConfigError):
    """``mu`` is below the floating-point resolution at ``x``: a query would equal its base point
    (and its finite difference would be a silent zero), so the plan is refused."""


def _check_steps(steps: torch.Tensor, x: torch.Tensor, c: torch.Tensor, mu: float) -> None:
    """Refuse realized coordinate steps that rounded away (``x_i + mu == x_i``)."""
    zero = steps == 0
    if bool(zero.any()):
        i = int(c[zero.nonzero()[0, 0]])
        raise StepUnderflow(f"mu={mu!r} is below the {x.dtype} resolution at x[{i}]={float(x[i])!r}: "
                            "x + mu == x, so no difference can be measured; raise mu")


class Estimator(ABC):
    """Base class of gradient estimators: ``estimate = combine(plan, run(plan))``.

    A subclass says which queries it needs (:meth:`plan`), how it turns their losses into a
    gradient (:meth:`combine`) and what an estimate costs (:meth:`num_queries`); :meth:`estimate`
    runs the three against an oracle. The class takes no constructor parameters.

    See Also
    --------
    CoordinateEstimator, RandomEstimator : the built-ins.

    Examples
    --------
    A one-query-per-coordinate backward-difference estimator:

    >>> import torch
    >>> from zoblackbox import Estimate, Estimator, FunctionOracle, QueryPlan
    >>> class Backward(Estimator):
    ...     mu = 1e-4
    ...     def plan(self, x, coords=None):
    ...         c = torch.arange(x.numel()) if coords is None else torch.as_tensor(coords)
    ...         return QueryPlan(x, coords=c, offsets=torch.full(c.shape, -self.mu, dtype=x.dtype))
    ...     def combine(self, plan, losses):
    ...         g = torch.zeros_like(plan.base)
    ...         g[plan.coords] = (losses[0] - losses[1:]).to(g.dtype) / self.mu
    ...         return Estimate(g, float(losses[0]), len(plan))
    ...     def num_queries(self, dim, n_coords=None):
    ...         return (dim if n_coords is None else n_coords) + 1
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=2, dtype=torch.float64)
    >>> Backward().estimate(oracle, torch.tensor([1.0, 2.0])).grad.round(decimals=3)
    tensor([2., 4.], dtype=torch.float64)
    """

    @abstractmethod
    def plan(self, x: torch.Tensor, coords: CoordsLike | None = None) -> QueryPlan:
        """The queries needed to estimate the gradient at ``x`` (restricted to ``coords``)."""

    @abstractmethod
    def combine(self, plan: QueryPlan, losses: torch.Tensor) -> Estimate:
        """The gradient estimate from the plan's losses (in plan order)."""

    @abstractmethod
    def num_queries(self, dim: int, n_coords: int | None = None) -> int:
        """Queries one estimate costs for a ``dim``-vector (``n_coords`` estimated coordinates)."""

    @property
    def queries_base(self) -> bool:
        """Whether the estimator's plans query the base point (forward schemes): only those can
        use a known ``f0`` in :meth:`estimate`."""
        return True

    def noise_gain(self) -> float | None:
        """Standard deviation of one gradient coordinate per unit standard deviation of i.i.d.
        loss noise, where the estimator can say (``None`` otherwise)."""
        return None

    def estimate(self, oracle: Oracle, x: ArrayLike, coords: CoordsLike | None = None,
                 scheduler: SchedulerLike | None = None, f0: float | None = None) -> Estimate:
        """Estimate the gradient of ``oracle`` at ``x``.

        Parameters
        ----------
        oracle : Oracle
            The function to differentiate.
        x : torch.Tensor or numpy.ndarray
            The point, finite, 1-D of length ``oracle.dim``.
        coords : array_like or None, default None
            Distinct indices (or a boolean mask) of the coordinates to estimate; ``None`` = all.
        scheduler : zoblackbox.schedule.Scheduler or None, default None
            Evaluates the plan (``scheduler.run(oracle, plan)``); default: the oracle's own
            ``evaluate_plan``.
        f0 : float or None, default None
            The loss at ``x`` when the caller already has it: a plan that includes the base point
            then skips that query, so a forward-difference estimate costs one query less. Ignored
            by schemes that do not query the base point (central, antithetic).

        Returns
        -------
        Estimate
            The gradient and the queries it cost.

        Raises
        ------
        TypeError
            ``oracle`` is not an :class:`Oracle`, or ``scheduler`` has no ``run``.
        ConfigError
            ``x`` of the wrong length or not finite, bad ``coords``, ``f0`` not a number.
        BudgetExhaustedError
            The estimate would exceed the oracle's own budget (nothing is spent).
        OracleError
            A query failed under the oracle's ``"raise"`` policy.
        """
        if not isinstance(oracle, Oracle):
            raise TypeError(f"oracle must be a zoblackbox Oracle, got {type(oracle).__name__}: {short_repr(oracle)}")
        if scheduler is not None and not callable(getattr(scheduler, "run", None)):
            raise TypeError(f"scheduler must be a zoblackbox Scheduler or None, got {type(scheduler).__name__}: "
                            f"{short_repr(scheduler)}")
        x = as_vector(x, dim=oracle.dim, dtype=oracle.dtype)
        if not bool(torch.isfinite(x).all()):  # a NaN point would be queried and give a silent zero gradient
            bad = (~torch.isfinite(x)).nonzero().flatten()
            raise ConfigError(f"x must be finite to estimate a gradient; {bad.numel()} non-finite entries, at indices "
                              f"{bad[:5].tolist()}: {x[bad[:5]].tolist()}")
        # the budget is checked before the plan is built: a plan too large for it is never allocated
        if f0 is not None and (isinstance(f0, bool) or not isinstance(f0, (int, float, np.floating, np.integer))
                               or math.isnan(f0)):
            raise ConfigError(f"f0 must be a number (the loss at x) or None, got {f0!r}")
        n_coords = None if coords is None else int(_check_coords(coords, oracle.dim, x.device).shape[0])
        n_queries = self.num_queries(oracle.dim, n_coords)
        oracle.reserve(n_queries - (f0 is not None))
        plan = self.plan(x, coords)
        if f0 is not None and not plan.include_base:  # only a plan that queries the base point can use f0
            f0 = None
            oracle.reserve(n_queries)
        before = oracle.nfev
        if f0 is None:
            losses = scheduler.run(oracle, plan) if scheduler is not None else oracle.evaluate_plan(plan)
        else:  # the same plan without its base query; f0 stands for it
            rest = dataclasses.replace(plan, include_base=False)
            rest_losses = scheduler.run(oracle, rest) if scheduler is not None else oracle.evaluate_plan(rest)
            losses = torch.cat([torch.tensor([float(f0)], dtype=torch.float64), rest_losses.to(torch.float64)])
        est = self.combine(plan, losses)
        est.nfev = oracle.nfev - before
        return est


class CoordinateEstimator(Estimator):
    """Coordinate-wise gradient estimation (CGE): perturb one coordinate at a time.

    ``forward``: g_i = (f(x + mu e_i) - f(x)) / mu, costing ``n + 1`` queries for ``n``
    coordinates, with O(mu) bias. ``central``: g_i = (f(x + mu e_i) - f(x - mu e_i)) / (2 mu),
    costing ``2n`` queries, with O(mu^2) bias (exact for quadratics). The realized step
    ``fl(x_i + mu) - x_i`` is used as the divisor, so rounding of ``x_i + mu`` adds no error.

    Parameters
    ----------
    mu : float, default 5e-3
        Step size, positive and at most ``1e30`` (DeepZero's default, for neural-network weights).
    scheme : {"forward", "central"}, default "forward"
        Finite-difference scheme.
    relative : bool, default False
        Scale the step of coordinate ``i`` by ``max(1, |x_i|)`` (the classical finite-difference
        step of numerical analysis: with ``mu = sqrt(eps)`` forward and ``mu = cbrt(eps)`` central
        it balances truncation and rounding errors at any magnitude of ``x``;
        :func:`zoblackbox.minimize`'s default strategy uses it).

    Raises
    ------
    ConfigError
        ``mu`` not a positive finite number or above ``1e30``; an unknown ``scheme``; ``relative``
        not a bool. At estimation time, ``StepUnderflow`` (a ``ConfigError``) when ``x_i + mu``
        rounds to ``x_i``.

    See Also
    --------
    RandomEstimator : ``q + 1`` queries per estimate whatever the dimension.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import CoordinateEstimator, FunctionOracle
    >>> oracle = FunctionOracle(lambda x: float(x[0] ** 2 + 3 * x[1]), dim=2, dtype=torch.float64)
    >>> cge = CoordinateEstimator(mu=1e-6)
    >>> cge.num_queries(2), cge.estimate(oracle, torch.tensor([1.0, 0.0])).grad.round(decimals=4)
    (3, tensor([2., 3.], dtype=torch.float64))
    """

    def __init__(self, mu: float = 5e-3, scheme: str = "forward", relative: bool = False):
        self.mu = _check_mu(mu)
        if not isinstance(scheme, str) or scheme not in ("forward", "central"):
            raise ConfigError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        if not isinstance(relative, (bool, np.bool_)):
            raise ConfigError(f"relative must be a bool, got {relative!r}")
        self.scheme = scheme
        self.relative = bool(relative)

    def __repr__(self) -> str:
        rel = ", relative=True" if self.relative else ""
        return f"CoordinateEstimator(mu={self.mu}, scheme={self.scheme!r}{rel})"

    def _steps(self, xc: torch.Tensor):
        return self.mu * torch.clamp(xc.abs(), min=1.0) if self.relative else self.mu

    @property
    def queries_base(self) -> bool:
        return self.scheme == "forward"

    def noise_gain(self) -> float:
        """Standard deviation of one gradient coordinate per unit standard deviation of the loss
        noise: ``sqrt(2) / mu`` (forward), ``1 / (sqrt(2) mu)`` (central)."""
        return math.sqrt(2) / self.mu if self.scheme == "forward" else 1 / (math.sqrt(2) * self.mu)

    def num_queries(self, dim: int, n_coords: int | None = None) -> int:
        n = dim if n_coords is None else n_coords
        return 2 * n if self.scheme == "central" else n + 1

    def plan(self, x: torch.Tensor, coords: CoordsLike | None = None) -> QueryPlan:
        c = _check_coords(coords, x.shape[0], x.device)
        xc = x[c]
        h = self._steps(xc)
        up = (xc + h) - xc  # realized steps
        _check_steps(up, x, c, self.mu)
        if self.scheme == "forward":
            return QueryPlan(base=x, include_base=True, coords=c, offsets=up)
        down = (xc - h) - xc
        _check_steps(down, x, c, self.mu)
        return QueryPlan(base=x, include_base=False, coords=torch.cat([c, c]), offsets=torch.cat([up, down]))

    def combine(self, plan: QueryPlan, losses: torch.Tensor) -> Estimate:
        losses = losses.to(torch.float64)
        x = plan.base
        grad = torch.zeros(x.shape[0], dtype=torch.float64, device=losses.device)
        n_failed = int((~torch.isfinite(losses)).sum())
        assert plan.coords is not None and plan.offsets is not None  # a coordinate plan, as plan() builds
        steps = plan.offsets.to(losses.device, torch.float64)
        if plan.include_base:  # forward
            f0 = float(losses[0])
            c = plan.coords.to(losses.device)
            if math.isfinite(f0):
                g = (losses[1:] - f0) / steps
                grad[c] = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        else:  # central
            f0 = None
            n = plan.coords.shape[0] // 2
            c = plan.coords[:n].to(losses.device)
            g = (losses[:n] - losses[n:]) / (steps[:n] - steps[n:])
            grad[c] = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        return Estimate(grad.to(device=x.device, dtype=x.dtype), f0, len(plan), n_failed)


def _spec(obj, builtin: bool):
    """What ``directions=`` / ``fitness_shaping=`` shows: a built-in's name, else the object itself."""
    return obj.name if builtin else obj


class RandomEstimator(Estimator):
    """Random-direction gradient estimation (RGE) with ``q`` directions.

    Forward scheme (``q + 1`` queries)::

        g = phi / q * sum_k (f(x + mu u_k) - f(x)) / mu * u_k

    Antithetic scheme (``2 q`` queries)::

        g = phi / q * sum_k (f(x + mu u_k) - f(x - mu u_k)) / (2 mu) * u_k

    The scaling ``phi`` makes ``E[phi u u^T] = I``: ``phi = 1`` for Gaussian ``u ~ N(0, I)`` and
    Rademacher ``u`` (entries +-1), ``phi = n`` for ``u`` uniform on the unit sphere of the ``n``
    estimated coordinates. With it the estimate is unbiased for the gradient of the smoothed
    function ``f_mu(x) = E_v f(x + mu v)`` (v Gaussian, resp. uniform in the unit ball), and
    therefore, for a quadratic ``f``, unbiased for the true gradient. (DeepZero's public code
    normalizes per tensor without the factor, a silent per-layer scale bias; this one is explicit.)
    When ``coords`` is given, directions live on those coordinates only and ``n = len(coords)``.

    Parameters
    ----------
    mu : float, default 5e-3
        Smoothing radius, positive and at most ``1e30``.
    q : int, default 20
        Directions per estimate, ``1 <= q <= 2**24``.
    directions : Directions or {"gaussian", "sphere", "rademacher"}, default "gaussian"
        How the directions are drawn and scaled (:class:`Directions`) or a built-in's name.
    antithetic : bool, default False
        Use the two-sided (antithetic) scheme.
    seed : int or None, default 0
        Seed of the estimator's own generator, in ``[-2**63, 2**64)`` (``None`` means 0); the
        directions are reproducible from it.
    top_b : int or None, default None
        Keep only the ``b`` antithetic pairs whose better side has the lowest loss
        (``min(f(x + mu u), f(x - mu u))``; Mania et al. 2018, ARS "V-t"); ``1 <= b <= q``, needs
        ``antithetic=True``; the estimate averages over the ``b`` kept pairs.
    fitness_shaping : FitnessShaping or {"std", "rank"} or None, default None
        ``None`` (raw loss differences), a :class:`FitnessShaping`, or a built-in's name:
        ``"std"`` (:class:`StdShaping`, ARS "V2") or ``"rank"`` (:class:`RankShaping`, centered
        ranks, Salimans et al. 2017). Shaping makes the estimate invariant to the loss's scale, so
        it is a search direction rather than an unbiased gradient (:func:`ars_v2t` builds ARS V2-t
        from it).

    Attributes
    ----------
    sampler : Directions
        The direction distribution in use.
    shaping : FitnessShaping or None
        The shaping in use.

    Raises
    ------
    ConfigError
        Any parameter of the wrong kind or outside its range above; ``top_b`` without
        ``antithetic=True``; an unknown ``directions`` or ``fitness_shaping`` name.

    See Also
    --------
    CoordinateEstimator, ars_v2t, openai_es

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import FunctionOracle, RandomEstimator
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=50, dtype=torch.float64)
    >>> rge = RandomEstimator(mu=1e-3, q=10, antithetic=True, seed=0)
    >>> est = rge.estimate(oracle, torch.ones(50))
    >>> est.nfev, tuple(est.grad.shape)
    (20, (50,))
    >>> bool(torch.nn.functional.cosine_similarity(est.grad, 2 * torch.ones(50), dim=0) > 0)
    True
    """


    def __init__(self, mu: float = 5e-3, q: int = 20, directions: str | Directions = "gaussian",
                 antithetic: bool = False, seed: int | None = 0, top_b: int | None = None,
                 fitness_shaping: str | FitnessShaping | None = None):
        self.mu = _check_mu(mu)
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ConfigError(f"q must be an int >= 1, got {q!r}")
        if q > MAX_Q:
            raise ConfigError(f"q={q!r} directions per estimate is absurd (at most {MAX_Q} = 2**24: a plan holds a "
                              "(q, dim) matrix of directions and costs q + 1 queries)")
        self.sampler: Directions = directions_from(directions)
        if not isinstance(antithetic, (bool, np.bool_)):
            raise ConfigError(f"antithetic must be a bool, got {antithetic!r}")
        if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))
                                 or not -2**63 <= seed < 2**64):
            raise ConfigError(f"seed must be an int in [-2**63, 2**64) or None, got {seed!r}")
        if top_b is not None:
            if isinstance(top_b, bool) or not isinstance(top_b, int) or not 1 <= top_b <= q:
                raise ConfigError(f"top_b must be None or an int in [1, q={q}], got {top_b!r}")
            if not antithetic:
                raise ConfigError(f"top_b={top_b} selects antithetic pairs: it needs antithetic=True")
        self.shaping: FitnessShaping | None = shaping_from(fitness_shaping)
        self.q = q
        self.antithetic = bool(antithetic)
        self.top_b = top_b
        self.generator = torch.Generator()
        self.generator.manual_seed(0 if seed is None else int(seed))

    # the specs stay readable, and equal to the names older code passed, for the built-ins
    @property
    def directions(self):
        """The directions as a spec: a built-in's name (``"gaussian"``...) or the user's object.
        Setting it (a name or a :class:`~zoblackbox.directions.Directions`) replaces ``sampler``."""
        return _spec(self.sampler, _directions.is_builtin(self.sampler))

    @directions.setter
    def directions(self, spec) -> None:
        self.sampler = directions_from(spec)

    @property
    def fitness_shaping(self):
        """The shaping as a spec: ``None``, a built-in's name (``"std"``, ``"rank"``) or the user's
        object. Setting it replaces ``shaping``."""
        return None if self.shaping is None else _spec(self.shaping, _shaping.is_builtin(self.shaping))

    @fitness_shaping.setter
    def fitness_shaping(self, spec) -> None:
        self.shaping = shaping_from(spec)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("top_b", self.top_b), ("fitness_shaping", self.fitness_shaping))
                        if v is not None)
        return (f"RandomEstimator(mu={self.mu}, q={self.q}, directions={self.directions!r}, "
                f"antithetic={self.antithetic}{extra})")

    @property
    def queries_base(self) -> bool:
        return not self.antithetic

    def num_queries(self, dim: int, n_coords: int | None = None) -> int:
        return 2 * self.q if self.antithetic else self.q + 1

    def phi(self, n: int) -> float:
        """The scaling factor for ``n`` estimated coordinates (``self.sampler.phi(n)``)."""
        return float(self.sampler.phi(n))

    def sample(self, n: int) -> torch.Tensor:
        """``q`` directions of length ``n`` (float64, CPU), drawn by ``self.sampler`` from the
        estimator's generator."""
        u = self.sampler.sample(self.q, n, self.generator)
        # a user-defined sampler's mistake is reported here, not as a broadcasting error in plan()
        if not isinstance(u, torch.Tensor) or tuple(u.shape) != (self.q, n):
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ConfigError(f"{self.sampler!r}.sample(q={self.q}, n={n}) must return a tensor of shape "
                              f"({self.q}, {n}), got {got}")
        return u.to(device="cpu", dtype=torch.float64)

    def plan(self, x: torch.Tensor, coords: CoordsLike | None = None) -> QueryPlan:
        c = _check_coords(coords, x.shape[0], x.device)
        u = torch.zeros(self.q, x.shape[0], dtype=x.dtype, device=x.device)
        u[:, c] = self.sample(c.shape[0]).to(device=x.device, dtype=x.dtype)
        steps = self.mu * u
        vanished = ((x + steps) == x).all(dim=1)  # a direction that rounds away would be a silent zero
        if bool(vanished.any()):
            raise StepUnderflow(f"mu={self.mu!r} is below the {x.dtype} resolution at x: x + mu * u == x for "
                                f"{int(vanished.sum())} of {self.q} directions; raise mu")
        if self.antithetic:
            return QueryPlan(base=x, include_base=False, directions=torch.cat([steps, -steps]),
                             support=c.shape[0])
        return QueryPlan(base=x, include_base=True, directions=steps, support=c.shape[0])

    def _weights(self, plan: QueryPlan, losses: torch.Tensor, q: int):
        """What the estimate is made of: ``(f0, idx, diffs, factor, n_failed)`` with
        ``grad = factor * diffs @ U[idx]`` (``U``: the plan's ``q`` directions over ``mu``)."""
        losses = losses.to(torch.float64)
        n_failed = int((~torch.isfinite(losses)).sum())
        if plan.include_base:
            f0 = float(losses[0])
            plus, minus, scale = losses[1:], losses[:1].expand(q), self.mu
        else:
            f0 = None
            plus, minus, scale = losses[:q], losses[q:], 2 * self.mu
        n = plan.support if plan.support is not None else plan.base.shape[0]
        ok = torch.isfinite(plus) & torch.isfinite(minus)
        idx = ok.nonzero().flatten().to(losses.device)
        plus, minus = plus[ok], minus[ok]
        if self.top_b is not None and plus.numel() > self.top_b:
            keep = torch.topk(torch.minimum(plus, minus), self.top_b, largest=False).indices
            plus, minus, idx = plus[keep], minus[keep], idx[keep]
        if self.shaping is not None and plus.numel():
            plus, minus = self.shaping(plus, minus, with_base=plan.include_base)
        diffs = (plus - minus) / scale
        factor = self.phi(n) / max(int(diffs.numel()), 1)
        return f0, idx, diffs, factor, n_failed

    def combine(self, plan: QueryPlan, losses: torch.Tensor) -> Estimate:
        x = plan.base
        assert plan.directions is not None  # a direction plan, as plan() builds
        losses = losses.to(torch.float64)
        U = plan.directions.to(losses.device, torch.float64) / self.mu
        q = U.shape[0] if plan.include_base else U.shape[0] // 2
        f0, idx, diffs, factor, n_failed = self._weights(plan, losses, q)
        grad = torch.zeros(x.shape[0], dtype=torch.float64, device=losses.device)
        if diffs.numel():
            grad = factor * (diffs @ U[idx])
        return Estimate(grad.to(device=x.device, dtype=x.dtype), f0, len(plan), n_failed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        """Load :meth:`state_dict`; a state that is not this generator's (a uint8 tensor of its size that
        torch accepts) is a CheckpointError naming ``estimator.generator``, and nothing changes."""
        from .checkpoint import check_rng_state, field_of

        value = field_of(state, "generator", "estimator.generator")
        check_rng_state(value, "estimator.generator", self.generator.get_state(), self.generator.device)
        self.generator.set_state(value)
