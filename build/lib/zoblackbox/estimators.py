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

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .oracle import as_vector
from .plan import QueryPlan

__all__ = ["Estimate", "Estimator", "CoordinateEstimator", "RandomEstimator"]


@dataclass
class Estimate:
    """A gradient estimate.

    Attributes:
        grad: the estimate, same shape, dtype and device as ``x``; zero outside the estimated
            coordinates.
        f0: loss at ``x`` when the plan queried it (``None`` for central/antithetic schemes).
        nfev: queries spent by this estimate (retries of failed queries included).
        n_failed: queries whose loss was non-finite and so left out of the differences.
    """

    grad: torch.Tensor
    f0: float | None
    nfev: int
    n_failed: int = 0


def _check_mu(mu) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
        raise ConfigError(f"mu must be a positive finite number, got {mu!r}")
    return float(mu)


def _check_coords(coords, dim: int, device) -> torch.Tensor:
    """All coordinates (``None``) or a validated 1-D tensor of distinct indices in ``[0, dim)``."""
    if coords is None:
        return torch.arange(dim, device=device)
    c = torch.as_tensor(coords)
    if c.numel() == 0:
        raise ConfigError("coords selects no coordinate; at least one is needed for an estimate")
    if c.dtype == torch.bool:
        if c.shape != (dim,):
            raise ConfigError(f"a boolean coordinate mask must have shape ({dim},), got {tuple(c.shape)}")
        c = c.nonzero().flatten()
    elif c.is_floating_point() or c.is_complex():
        raise ConfigError(f"coords must be integer indices or a boolean mask, got dtype {c.dtype}")
    c = c.reshape(-1).to(device=device, dtype=torch.long)
    if c.numel() == 0:
        raise ConfigError("coords selects no coordinate; at least one is needed for an estimate")
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= dim:
        raise ConfigError(f"coords must lie in [0, {dim}), got an index {lo if lo < 0 else hi}")
    if torch.unique(c).numel() != c.numel():
        raise ConfigError("coords contains duplicate indices")
    return c


class Estimator(ABC):
    """Base class: ``estimate = combine(plan, run(plan))``."""

    @abstractmethod
    def plan(self, x: torch.Tensor, coords=None) -> QueryPlan:
        """The queries needed to estimate the gradient at ``x`` (restricted to ``coords``)."""

    @abstractmethod
    def combine(self, plan: QueryPlan, losses: torch.Tensor) -> Estimate:
        """The gradient estimate from the plan's losses (in plan order)."""

    @abstractmethod
    def num_queries(self, dim: int, n_coords: int | None = None) -> int:
        """Queries one estimate costs for a ``dim``-vector (``n_coords`` estimated coordinates)."""

    def estimate(self, oracle, x, coords=None, scheduler=None) -> Estimate:
        """Estimate the gradient of ``oracle`` at ``x``.

        Args:
            oracle: an :class:`~zoblackbox.oracle.Oracle`.
            x: the point, 1-D of length ``oracle.dim`` (tensor or numpy array).
            coords: indices (or a boolean mask) of the coordinates to estimate; ``None`` = all.
            scheduler: evaluates the plan (``scheduler.run(oracle, plan)``); default: the
                oracle's own ``evaluate_plan``.
        """
        x = as_vector(x, dim=oracle.dim, dtype=getattr(oracle, "dtype", None))
        plan = self.plan(x, coords)
        before = oracle.nfev
        losses = scheduler.run(oracle, plan) if scheduler is not None else oracle.evaluate_plan(plan)
        est = self.combine(plan, losses)
        est.nfev = oracle.nfev - before
        return est


class CoordinateEstimator(Estimator):
    """Coordinate-wise gradient estimation (CGE): perturb one coordinate at a time.

    ``forward``: g_i = (f(x + mu e_i) - f(x)) / mu, costing ``n + 1`` queries for ``n``
    coordinates, with O(mu) bias. ``central``: g_i = (f(x + mu e_i) - f(x - mu e_i)) / (2 mu),
    costing ``2n`` queries, with O(mu^2) bias (exact for quadratics). The realized step
    ``fl(x_i + mu) - x_i`` is used as the divisor, so rounding of ``x_i + mu`` adds no error.

    Args:
        mu: step size (DeepZero's default 5e-3).
        scheme: ``"forward"`` or ``"central"``.
    """

    def __init__(self, mu: float = 5e-3, scheme: str = "forward"):
        self.mu = _check_mu(mu)
        if scheme not in ("forward", "central"):
            raise ConfigError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        self.scheme = scheme

    def __repr__(self) -> str:
        return f"CoordinateEstimator(mu={self.mu}, scheme={self.scheme!r})"

    def num_queries(self, dim: int, n_coords: int | None = None) -> int:
        n = dim if n_coords is None else n_coords
        return 2 * n if self.scheme == "central" else n + 1

    def plan(self, x, coords=None) -> QueryPlan:
        c = _check_coords(coords, x.shape[0], x.device)
        xc = x[c]
        up = (xc + self.mu) - xc  # realized steps
        if self.scheme == "forward":
            return QueryPlan(base=x, include_base=True, coords=c, offsets=up)
        down = (xc - self.mu) - xc
        return QueryPlan(base=x, include_base=False, coords=torch.cat([c, c]), offsets=torch.cat([up, down]))

    def combine(self, plan, losses) -> Estimate:
        losses = losses.to(torch.float64)
        x = plan.base
        grad = torch.zeros(x.shape[0], dtype=torch.float64, device=losses.device)
        n_failed = int((~torch.isfinite(losses)).sum())
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


_DIRECTIONS = ("gaussian", "sphere", "rademacher")


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

    Args:
        mu: smoothing radius.
        q: number of directions per estimate (>= 1).
        directions: ``"gaussian"``, ``"sphere"`` or ``"rademacher"``.
        antithetic: use the two-sided (antithetic) scheme.
        seed: seed of the estimator's own generator (directions are reproducible from it).
    """

    def __init__(self, mu: float = 5e-3, q: int = 20, directions: str = "gaussian", antithetic: bool = False,
                 seed: int | None = 0):
        self.mu = _check_mu(mu)
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ConfigError(f"q must be an int >= 1, got {q!r}")
        if directions not in _DIRECTIONS:
            raise ConfigError(f"directions must be one of {_DIRECTIONS}, got {directions!r}")
        self.q = q
        self.directions = directions
        self.antithetic = bool(antithetic)
        self.generator = torch.Generator()
        self.generator.manual_seed(0 if seed is None else int(seed))

    def __repr__(self) -> str:
        return (f"RandomEstimator(mu={self.mu}, q={self.q}, directions={self.directions!r}, "
                f"antithetic={self.antithetic})")

    def num_queries(self, dim: int, n_coords: int | None = None) -> int:
        return 2 * self.q if self.antithetic else self.q + 1

    def phi(self, n: int) -> float:
        """The scaling factor for ``n`` estimated coordinates."""
        return float(n) if self.directions == "sphere" else 1.0

    def sample(self, n: int) -> torch.Tensor:
        """``q`` directions of length ``n`` (float64, CPU), drawn from the estimator's generator."""
        g = self.generator
        if self.directions == "rademacher":
            return torch.randint(0, 2, (self.q, n), generator=g, dtype=torch.float64) * 2 - 1
        u = torch.randn(self.q, n, generator=g, dtype=torch.float64)
        if self.directions == "sphere":
            u = u / u.norm(dim=1, keepdim=True)
        return u

    def plan(self, x, coords=None) -> QueryPlan:
        c = _check_coords(coords, x.shape[0], x.device)
        u = torch.zeros(self.q, x.shape[0], dtype=x.dtype, device=x.device)
        u[:, c] = self.sample(c.shape[0]).to(device=x.device, dtype=x.dtype)
        steps = self.mu * u
        if self.antithetic:
            return QueryPlan(base=x, include_base=False, directions=torch.cat([steps, -steps]),
                             support=c.shape[0])
        return QueryPlan(base=x, include_base=True, directions=steps, support=c.shape[0])

    def combine(self, plan, losses) -> Estimate:
        losses = losses.to(torch.float64)
        x = plan.base
        U = plan.directions.to(losses.device, torch.float64) / self.mu
        n_failed = int((~torch.isfinite(losses)).sum())
        if plan.include_base:
            f0 = float(losses[0])
            diffs = (losses[1:] - f0) / self.mu
        else:
            f0 = None
            q = U.shape[0] // 2
            diffs = (losses[:q] - losses[q:]) / (2 * self.mu)
            U = U[:q]
        n = plan.support if plan.support is not None else x.shape[0]
        ok = torch.isfinite(diffs)
        q_ok = int(ok.sum())
        grad = torch.zeros(x.shape[0], dtype=torch.float64, device=losses.device)
        if q_ok:
            grad = self.phi(n) / q_ok * (diffs[ok] @ U[ok])
        return Estimate(grad.to(device=x.device, dtype=x.dtype), f0, len(plan), n_failed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])
