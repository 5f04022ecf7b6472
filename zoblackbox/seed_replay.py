"""Memory-free random-direction estimates (seed replay, as in MeZO: Malladi et al., NeurIPS 2023).

A batched RGE plan holds a ``(q, d)`` matrix of directions, and its estimate a dense gradient: for a
model of 100M parameters that is gigabytes. Here each direction is an integer seed of a
:class:`~zoblackbox.SeededDirections`: a query point is built block by block in one scratch buffer
(``base + mu * u_k``, ``u_k`` regenerated from its seed), the estimate keeps the ``q`` seeds and
their weights (``SeededEstimate``), and :class:`SeedReplaySGD` applies the update from the same
seeds, block by block. Nothing of size ``q * d`` and no per-query copy of the model exists at any
time; the directions are the same numbers :class:`~zoblackbox.RandomEstimator` draws with the same
``SeededDirections`` and seed, so both give the same estimate (``tests/test_seed_replay.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ._types import CoordsLike
from .directions import SeededDirections
from .errors import ConfigError
from .estimators import Estimate, RandomEstimator, StepUnderflow, _check_coords
from .plan import QueryPlan, _is_int
from .rules import Stop, UpdateRule, check_lr

__all__ = ["SeedReplayEstimator", "SeedReplaySGD", "SeededEstimate", "SeededPlan"]


@dataclass
class SeededPlan(QueryPlan):
    """A direction plan whose directions are seeds: ``base + mu * u(seed_k)`` (then ``- mu * u``
    for the antithetic half), ``u`` a :class:`~zoblackbox.SeededDirections` on the coordinates
    ``on`` (all when ``None``). :meth:`chunks` yields one point at a time in one reused buffer;
    :meth:`points` materializes rows (for ask/tell by hand and for other schedulers)."""

    seeds: torch.Tensor | None = None
    source: SeededDirections | None = None
    mu: float = 0.0
    on: torch.Tensor | None = None
    antithetic: bool = False

    def __post_init__(self):
        if not isinstance(self.base, torch.Tensor) or self.base.dim() != 1 or not self.base.is_floating_point():
            raise ConfigError(f"SeededPlan.base must be a 1-D floating-point tensor, got {self.base!r}")
        if not isinstance(self.include_base, (bool, np.bool_)):
            raise ConfigError(f"SeededPlan.include_base must be a bool, got {self.include_base!r}")
        if self.coords is not None or self.offsets is not None or self.directions is not None:
            raise ConfigError("a SeededPlan has seeds, not coordinates or directions")
        if not isinstance(self.seeds, torch.Tensor) or self.seeds.dim() != 1 or self.seeds.dtype != torch.int64:
            raise ConfigError(f"SeededPlan.seeds must be a 1-D int64 tensor, got {self.seeds!r}")
        if not isinstance(self.source, SeededDirections):
            raise ConfigError(f"SeededPlan.source must be a SeededDirections, got {self.source!r}")
        if not math.isfinite(self.mu) or self.mu <= 0:
            raise ConfigError(f"SeededPlan.mu must be a positive finite number, got {self.mu!r}")
        if self.support is None:
            self.support = self.base.shape[0] if self.on is None else int(self.on.shape[0])
        if not _is_int(self.support) or not 0 <= self.support <= self.base.shape[0]:
            raise ConfigError(f"SeededPlan.support must be an int in [0, {self.base.shape[0]}], got {self.support!r}")

    @property
    def kind(self) -> str:
        return "seeded"

    @property
    def num_perturbations(self) -> int:
        assert self.seeds is not None  # __post_init__
        return int(self.seeds.shape[0]) * (2 if self.antithetic else 1)

    def perturb_into(self, k: int, out: torch.Tensor) -> torch.Tensor:
        """Write perturbation ``k`` (``base +- mu * u``) into ``out`` (same shape and dtype as
        ``base``), block by block; returns ``out``. A point that rounds to ``base`` is refused."""
        assert self.seeds is not None and self.source is not None  # __post_init__
        q = self.seeds.shape[0]
        seed, sign = int(self.seeds[k % q]), (-1.0 if k >= q else 1.0)
        base = self.base
        out.copy_(base)
        moved = False
        for j, start, stop in self.source.blocks(int(self.support or 0)):
            step = self.mu * self.source.block(seed, j, stop - start).to(base.device, base.dtype)
            if sign < 0:
                step = -step
            where = slice(start, stop) if self.on is None else self.on[start:stop]
            new = base[where] + step
            moved = moved or bool((new != base[where]).any())
            out[where] = new
        if not moved:
            raise StepUnderflow(f"mu={self.mu!r} is below the {base.dtype} resolution at x: x + mu * u == x for "
                                f"direction {k % q} (seed {seed}); raise mu")
        return out

    def points(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = len(self) if stop is None else stop
        if not (_is_int(start) and _is_int(stop)) or not 0 <= start <= stop <= len(self):
            raise IndexError(f"query range {start}:{stop} outside a plan of {len(self)} queries")
        X = self.base.unsqueeze(0).repeat(stop - start, 1)
        shift = int(self.include_base)
        for row, i in enumerate(range(start, stop)):
            if i >= shift:
                self.perturb_into(i - shift, X[row])
        return X

    def chunks(self, size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """One query at a time; every perturbed point is written into the same scratch buffer (a
        yielded point is valid until the next one is requested)."""
        shift = int(self.include_base)
        if shift:
            yield 0, 1, self.base.unsqueeze(0)
        scratch = torch.empty_like(self.base)
        for k in range(self.num_perturbations):
            yield k + shift, k + shift + 1, self.perturb_into(k, scratch).unsqueeze(0)


class SeededEstimate(Estimate):
    """An RGE estimate kept as ``q`` seeds and weights: ``grad = factor * sum_k w_k u(seed_k)``.

    :attr:`grad` materializes it (``d`` numbers); :meth:`apply_` adds ``alpha * grad`` to a vector
    block by block without ever holding it whole."""

    def __init__(self, plan: SeededPlan, seeds: torch.Tensor, weights: torch.Tensor, factor: float,
                 f0: float | None, nfev: int, n_failed: int = 0):
        self.plan, self.seeds, self.weights, self.factor = plan, seeds, weights, float(factor)
        self.f0, self.nfev, self.n_failed = f0, nfev, n_failed

    def __repr__(self) -> str:
        return (f"SeededEstimate(q={int(self.seeds.numel())}, dim={self.plan.dim}, f0={self.f0!r}, "
                f"nfev={self.nfev}, n_failed={self.n_failed})")

    def blocks(self) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]]:
        """``(where, g)``: the float64 gradient ``g`` on the coordinates ``where``, block by block."""
        plan = self.plan
        src, mu, dtype = plan.source, plan.mu, plan.base.dtype
        assert src is not None  # SeededPlan.__post_init__
        for j, start, stop in src.blocks(int(plan.support or 0)):
            where = slice(start, stop) if plan.on is None else plan.on[start:stop]
            if self.seeds.numel() == 0:
                yield where, torch.zeros(stop - start, dtype=torch.float64)
                continue
            # the same arithmetic as RandomEstimator.combine: U = (mu * u in x's dtype) / mu, in float64
            U = torch.stack([(mu * src.block(int(s), j, stop - start).to(dtype)).to(torch.float64) / mu
                             for s in self.seeds])
            yield where, self.factor * (self.weights @ U)

    @property
    def grad(self) -> torch.Tensor:  # type: ignore[override]
        base = self.plan.base
        out = torch.zeros(base.shape[0], dtype=torch.float64)
        for where, g in self.blocks():
            out[where] = g
        return out.to(device=base.device, dtype=base.dtype)

    def apply_(self, x: torch.Tensor, alpha: float) -> tuple[float, bool]:
        """``x += alpha * grad`` in place, block by block; returns the gradient's norm (in ``x``'s
        dtype, as ``grad.norm()``) and whether ``x`` stayed finite."""
        sq, finite = 0.0, True
        for where, g in self.blocks():
            g = g.to(device=x.device, dtype=x.dtype)
            sq += float(g.to(torch.float64).square().sum())
            if isinstance(where, slice):
                x[where].add_(g, alpha=alpha)
                finite = finite and bool(torch.isfinite(x[where]).all())
            else:
                x[where] = x[where].add(g, alpha=alpha)
                finite = finite and bool(torch.isfinite(x[where]).all())
        return math.sqrt(sq), finite


class SeedReplayEstimator(RandomEstimator):
    """Random-direction estimation (RGE) without a direction matrix: each direction is a seed.

    The same estimate as :class:`RandomEstimator` with ``directions=SeededDirections(...)`` and the
    same ``seed`` (same queries, same losses, same gradient up to summation order), computed in
    memory independent of ``q``: a plan holds ``q`` integers; evaluated through an oracle's
    ``evaluate_plan`` each query is built in one scratch buffer, the estimate is a
    ``SeededEstimate``, and :class:`SeedReplaySGD` applies it from the seeds. MeZO's scheme
    (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023) with
    zoblackbox's finite-difference conventions.

    Parameters
    ----------
    mu : float, default 5e-3
        Smoothing radius, positive and at most ``1e30``.
    q : int, default 20
        Directions per estimate, ``1 <= q <= 2**24``.
    directions : SeededDirections or None, default None
        The seeded distribution (``None``: ``SeededDirections()``, Gaussian).
    antithetic : bool, default False
        Two-sided scheme (``2 q`` queries).
    seed : int or None, default 0
        Seed of the generator that draws the directions' seeds.
    top_b, fitness_shaping
        As in :class:`RandomEstimator`.

    Raises
    ------
    ConfigError
        ``directions`` not a :class:`SeededDirections`; any other bad parameter as in
        :class:`RandomEstimator`.

    See Also
    --------
    SeedReplaySGD : the update rule that applies a seeded estimate without materializing it.
    RandomEstimator : the batched path it equals.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import FunctionOracle, RandomEstimator, SeededDirections, SeedReplayEstimator
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=30, dtype=torch.float64)
    >>> x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    >>> replay = SeedReplayEstimator(mu=1e-4, q=8, seed=3).estimate(oracle, x)
    >>> batched = RandomEstimator(mu=1e-4, q=8, seed=3, directions=SeededDirections()).estimate(oracle, x)
    >>> replay.nfev, bool(torch.allclose(replay.grad, batched.grad, rtol=1e-12, atol=0))
    (9, True)
    """

    def __init__(self, mu: float = 5e-3, q: int = 20, directions: SeededDirections | None = None,
                 antithetic: bool = False, seed: int | None = 0, top_b: int | None = None, fitness_shaping=None):
        directions = SeededDirections() if directions is None else directions
        if not isinstance(directions, SeededDirections):
            raise ConfigError(f"SeedReplayEstimator replays seeded directions: directions must be a SeededDirections "
                              f"(or None), got {directions!r}")
        super().__init__(mu=mu, q=q, directions=directions, antithetic=antithetic, seed=seed, top_b=top_b,
                         fitness_shaping=fitness_shaping)

    def __repr__(self) -> str:
        return "SeedReplay" + super().__repr__()

    def plan(self, x: torch.Tensor, coords: CoordsLike | None = None) -> SeededPlan:
        on = None if coords is None else _check_coords(coords, x.shape[0], x.device)
        assert isinstance(self.sampler, SeededDirections)  # __init__
        seeds = self.sampler.seeds(self.q, self.generator)  # the draw RandomEstimator.sample makes first
        return SeededPlan(base=x, include_base=not self.antithetic, seeds=seeds, source=self.sampler, mu=self.mu,
                          on=on, antithetic=self.antithetic)

    def combine(self, plan: QueryPlan, losses: torch.Tensor) -> Estimate:
        if not isinstance(plan, SeededPlan):
            raise ConfigError(f"SeedReplayEstimator combines its own SeededPlan, got a {plan.kind} plan")
        assert plan.seeds is not None
        f0, idx, diffs, factor, n_failed = self._weights(plan, losses, int(plan.seeds.shape[0]))
        return SeededEstimate(plan, plan.seeds[idx], diffs, factor, f0, len(plan), n_failed)


class SeedReplaySGD(UpdateRule):
    """Plain SGD that applies a ``SeededEstimate`` from its seeds: ``x -= lr * g``, block by block.

    The iterate is updated in place (no copy of it, no dense gradient); the engine's snapshot of
    the iterate at the start of an iteration is the iterate itself, which is exact because it
    changes only when the iteration ends (:meth:`AskTell.state_dict <zoblackbox.AskTell.state_dict>`
    copies it). Any other estimator's dense estimate is applied as it is. A step that makes ``x``
    non-finite is undone (by the opposite step) and stops the run.

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate, positive and finite.
    lr_schedule : callable or None, default None
        ``lr_schedule(iteration) -> factor`` (e.g. :class:`zoblackbox.schedules.WarmupCosine`).

    Raises
    ------
    ConfigError
        ``lr`` not a positive finite number; at run time, bounds or a ``freeze`` mask (not
        supported: pass ``coords`` instead).
    TypeError
        ``lr_schedule`` not callable.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import AskTell, FunctionOracle, SeedReplayEstimator, SeedReplaySGD
    >>> oracle = FunctionOracle(lambda x: float((x ** 2).sum()), dim=100, dtype=torch.float64)
    >>> engine = AskTell(torch.ones(100, dtype=torch.float64), estimator=SeedReplayEstimator(mu=1e-4, q=10),
    ...                  optimizer=SeedReplaySGD(lr=0.02), maxiter=200)
    >>> result = engine.run(oracle)
    >>> result.nit, bool(result.fun < 0.5 * 100)
    (200, True)
    """

    def __init__(self, lr: float = 1e-3, lr_schedule: Callable[[int], float] | None = None):
        self.lr = check_lr(lr)
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be callable (iteration -> LR factor) or None, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.steps = 0

    def start(self, x, engine) -> None:
        self.keep = 1 if engine.evaluate_final else 0
        self._x = x  # the engine passes its own copy
        self.steps = 0

    @property
    def x(self) -> torch.Tensor:
        return self._x

    @property
    def current_lr(self) -> float:
        """The learning rate of the next step (``lr`` times the schedule's factor)."""
        return self.lr * (1.0 if self.lr_schedule is None else float(self.lr_schedule(self.steps)))

    def iteration(self, engine):
        """One iteration: yields the seeded plan, receives its losses, applies ``x -= lr * g`` from the
        seeds; returns the record (``f0``, ``grad_norm``, ``n_failed``), or ends the run (the
        engine's ``Stop``) when the step makes ``x`` non-finite (the step is undone first)."""
        if engine.lower is not None or engine.freeze is not None:
            raise ConfigError("SeedReplaySGD updates from seeds: bounds and freeze masks are not supported (estimate "
                              "on a subset with coords instead)")
        est = yield from engine.gradient_estimate(self._x, keep=self.keep)
        lr = self.current_lr
        if isinstance(est, SeededEstimate) and not engine.gradient_hooks:
            norm, finite = est.apply_(self._x, -lr)
            undo: Callable[[], object] = lambda: est.apply_(self._x, lr)
        else:
            grad = est.grad
            for hook in engine.gradient_hooks:
                grad = hook(self._x, grad)
            g = grad.to(self._x.dtype)
            self._x.add_(g, alpha=-lr)
            norm, finite = float(g.norm()), bool(torch.isfinite(self._x).all())
            undo = lambda: self._x.add_(g, alpha=lr)
        if not finite:
            undo()
            raise Stop(f"iteration {engine.nit + 1} made x non-finite (gradient norm {norm!r}); returning the "
                       "iterate before it (lower lr?)", success=False)
        self.steps += 1
        return {"f0": est.f0, "grad_norm": norm, "n_failed": est.n_failed}

    def state_dict(self) -> dict:
        return {"x": self._x, "steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        x = state["x"]
        if x is not self._x:
            self._x.copy_(x)
        self.steps = int(state["steps"])

    def config(self) -> dict:
        return {"rule": "SeedReplaySGD", "lr": self.lr}

