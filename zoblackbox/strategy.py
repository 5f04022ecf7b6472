"""The zero-configuration strategy: what :func:`zoblackbox.minimize` does when told nothing but
``f``, ``x0`` and a budget (``optimizer="auto"``, the default).

One update rule, :class:`AutoStrategy`, run by the ask/tell engine like any other, in phases:

1. **probe** -- the loss at ``x0`` and ``m = 6`` more on a short line through it; ECNoise
   (:func:`zoblackbox.noise.ecnoise`) turns them into the noise level ``sigma`` of one
   evaluation. The function is *noisy* when ``sigma`` is clearly above the rounding error of
   ``f(x0)`` in the computation dtype (``sigma > 100 eps |f(x0)|``).
2. **local** -- zoblackbox's L-BFGS (:class:`~zoblackbox.rules.LBFGSRule`) on coordinate-wise
   finite differences whose step needs no tuning: ``h_i = sqrt(eps_r) max(1, |x_i|)`` (forward)
   where ``eps_r`` is the relative accuracy of ``f`` (the dtype's ``eps`` for a smooth function,
   ``sigma / |f(x0)|`` for a noisy one). Noisy functions get central differences with
   ``h_i = cbrt(eps_r) max(1, |x_i|)`` and the noise-aware L-BFGS (``noise=sigma``) instead.
   When the forward line search stalls on the estimate's resolution, the run switches to central
   differences once and continues from where it stopped.
3. **global** -- when the local phase has converged and budget is left, IPOP-CMA-ES (pycma's
   ``CMAEvolutionStrategy``; each restart doubles the population) spends the rest, started at
   the best point found with a step size from the distance the local phase travelled (at least
   1, the scale of a standardized variable; a quarter of the box's width with finite bounds).
   When the dimension is large for the budget (fewer than ``LOCAL_MIN_GRADIENTS`` gradient
   estimates affordable), the run skips the local phase and spends the budget on the diagonal
   CMA-ES variant (sep-CMA-ES), a random-direction method whose cost per sample is linear in ``d``.
   On a noisy function a CMA-ES run also restarts when the median loss of its generations has
   stopped falling (noise keeps pycma's own ``tolfun`` from firing in a local minimum).

The returned point is the best point evaluated (with its measured loss: no extra query) for a
deterministic function. For a noisy one it is the best estimate of the optimum over the phases
(the L-BFGS iterate scored by its loss, each CMA-ES run's mean scored by the median loss of its last
generations), evaluated once. ``result.strategy`` records every decision and
its reason. Settings were chosen once, on COCO BBOB instances 1-5 (``benchmarks/bbob.py``);
``docs/minimize.md`` has the measurements.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .estimators import CoordinateEstimator, StepUnderflow
from .noise import ecnoise
from .plan import QueryPlan
from .rules import LBFGSRule, Stop, UpdateRule

__all__ = ["LOCAL_MIN_GRADIENTS", "PROBE_POINTS", "AutoStrategy"]

#: extra evaluations of the noise probe (ECNoise on ``PROBE_POINTS + 1`` values, ``f(x0)`` included)
PROBE_POINTS = 6
#: the local phase runs only when the budget affords at least this many gradient estimates
LOCAL_MIN_GRADIENTS = 10
#: the local phases end (for the global phase) after this share of the budget, or LOCAL_MIN_QUERIES * (d + 2)
#: queries when that is more, if the global phase then keeps at least LOCAL_MIN_QUERIES * (d + 2) queries
LOCAL_SHARE = 0.25
LOCAL_MIN_QUERIES = 100
#: CMA-ES's initial step without finite bounds: the rms distance per coordinate the local phase travelled,
#: and at least this (twice the scale of a standardized variable)
CMA_MIN_SIGMA = 2.0
#: a relative noise level (sigma / |f(x0)|) above this makes the function "noisy": central differences,
#: the noise-aware L-BFGS until its iterates stall, then CMA-ES (below it, only the step adapts to the noise)
NOISY_RELATIVE = 1e-8
#: the noise-aware local phase ends after this many iterates whose gradient estimate is mostly noise
NOISY_STALL = 3
#: on a noisy function CMA-ES also restarts when the median loss of its generations has stopped falling: over the
#: last W = STAGNATION_BASE + STAGNATION_PER_DIM * d / popsize generations it is no lower than over the W before
#: (noise keeps pycma's tolfun from firing in a local minimum)
STAGNATION_BASE = 10
STAGNATION_PER_DIM = 30


class AutoStrategy(UpdateRule):
    """The default update rule of :func:`zoblackbox.minimize` (module docstring).

    Args:
        seed: seed of the noise probe's direction and of CMA-ES's sampling (default: the engine's).
    """

    chooses_estimator = True

    def __init__(self, seed: int | None = None):
        self.seed = seed

    # ------------------------------------------------------------------ set-up
    def start(self, x, engine) -> None:
        self.dtype = x.dtype
        self.eps = float(torch.finfo(x.dtype).eps)
        seed = engine.seed if self.seed is None else self.seed
        self._seed = 0 if seed is None else int(seed)
        self.x0 = x.clone()
        self.phase = "probe"
        self.keep = 0
        self.noisy = False
        self.sigma = 0.0
        self.best_x, self.best_f = x.clone(), math.inf
        self.local: LBFGSRule | None = None
        self.local_scheme = ""
        self.es: Any = None  # the pycma CMAEvolutionStrategy of the global phase
        self.restarts = 0
        self.cma_evals = 0
        self.rs = np.random.RandomState(self._seed % 2**32)  # CMA-ES's sampler: the user's global numpy RNG stays untouched
        self.decisions: list[dict] = []
        self.candidates: list[tuple[float, torch.Tensor]] = []  # noisy runs: (score, point) of each finished phase
        self._advanced = False
        self.engine = engine
        engine.estimator = CoordinateEstimator(mu=math.sqrt(self.eps), relative=True)

    @property
    def x(self) -> torch.Tensor:
        if self.phase in ("local", "local-central") and self.local is not None and self.noisy:
            return self.local.x
        return self.best_x

    @property
    def counts_iteration(self) -> bool:
        return self._advanced

    def stopped_after_a_step(self) -> bool:
        return self.local is not None and self.phase.startswith("local") and self.local.stopped_after_a_step()

    @property
    def strategy(self) -> dict:
        """What was chosen and why (``result.strategy``)."""
        return {"noise": {"sigma": self.sigma, "noisy": self.noisy}, "phase": self.phase,
                "cma_restarts": self.restarts, "decisions": list(self.decisions)}

    def _decide(self, phase: str, why: str, **details) -> None:
        self.decisions.append({"phase": phase, "at_nfev": self.engine.nfev, "why": why, **details})

    # ------------------------------------------------------------------ bookkeeping
    def _relay(self, gen):
        """``yield from gen``, recording the best point of every plan."""
        try:
            plan = next(gen)
            while True:
                losses = yield plan
                self._track(plan, losses)
                plan = gen.send(losses)
        except StopIteration as done:
            return done.value

    def _track(self, plan: QueryPlan, losses: torch.Tensor) -> None:
        values = losses.to(torch.float64)
        finite = torch.isfinite(values)
        if not bool(finite.any()):
            return
        i = int(torch.where(finite, values, torch.full_like(values, math.inf)).argmin())
        if float(values[i]) < self.best_f:
            self.best_f = float(values[i])
            self.best_x = plan.point(i).to(self.dtype).clone()

    # ------------------------------------------------------------------ phases
    def iteration(self, engine):
        self._advanced = False
        if self.phase == "probe":
            record = yield from self._probe(engine)
            return record
        while True:
            if self.phase in ("local", "local-central"):
                try:
                    record = yield from self._relay(self.local.iteration(engine))
                except (Stop, StepUnderflow) as stop:
                    if self._out_of_budget(engine, stop):
                        raise
                    self._next_after_local(engine, stop)
                    continue
                self._advanced = self.local.counts_iteration
                if engine.budget is not None:
                    cap = max(LOCAL_SHARE * engine.budget, LOCAL_MIN_QUERIES * (engine.dim + 2))
                    if self.noisy and len(self.local.stall) >= NOISY_STALL:
                        self._next_after_local(engine, Stop(f"{len(self.local.stall)} iterates in a row with a "
                                                            "gradient estimate within the noise"))
                    elif engine.nfev >= cap and engine.budget - engine.nfev > LOCAL_MIN_QUERIES * (engine.dim + 2):
                        self.phase = "local-central"  # no central restart: straight to the global phase
                        self._next_after_local(engine, Stop(f"the local phases used their share of the budget "
                                                            f"({engine.nfev} queries)"))
                return {**record, "f0": record.get("f0"), "best": self.best_f, "phase": self.phase}
            if self.phase == "global":
                record = yield from self._cma_generation(engine)
                self._advanced = True
                return record
            raise Stop(f"the {self.phase} phase has nothing more to do")

    def _out_of_budget(self, engine, stop) -> bool:
        if isinstance(stop, Stop) and not stop.success and "budget" in stop.message:
            return True
        if engine.maxiter is not None and engine.nit >= engine.maxiter:
            return True
        return engine.budget is None and self.phase == "local-central" or not engine.can_afford(2 * engine.dim + 2)

    def _probe(self, engine):
        """The loss at x0 and PROBE_POINTS more on a line through it; ECNoise decides the rest."""
        d = engine.dim
        engine.afford(PROBE_POINTS + 1)
        rng = torch.Generator().manual_seed(self._seed % 2**64)
        signs = torch.randint(0, 2, (d,), generator=rng).to(self.dtype) * 2 - 1
        h = self.eps ** (1 / 3)
        p = signs * torch.clamp(self.x0.abs(), min=1.0) * h
        m = PROBE_POINTS
        ts = [i - m // 2 for i in range(m + 1) if i != m // 2]
        directions = torch.stack([t * p for t in ts]).to(self.dtype)
        plan = engine.bounded(QueryPlan(base=self.x0, include_base=True, directions=directions))
        losses = yield plan
        self._track(plan, losses)  # the points queried (inside the bounds), not the unclipped line
        values = losses.to(torch.float64).tolist()
        f0 = values[0]
        line = values[1:1 + m // 2] + [f0] + values[1 + m // 2:]
        est = ecnoise(line)
        scale = max(abs(f0), float(np.median(np.abs(line)))) if math.isfinite(f0) else math.nan
        self.sigma = float(est.sigma) if math.isfinite(est.sigma) else 0.0
        if not math.isfinite(f0):
            raise Stop(f"the loss at x0 is not finite ({f0!r}): no search can start there", success=False)
        measured = est.status == "ok" and scale > 0
        self.eps_r = min(max(self.eps, self.sigma / scale if measured else self.eps), 0.1)
        self.noisy = bool(measured and self.eps_r > NOISY_RELATIVE)
        self._decide("probe", f"ECNoise on {m + 1} values: sigma={self.sigma:.3g} ({est.status}), "
                     f"{'noisy' if self.noisy else 'smooth'} relative to |f(x0)|={abs(f0):.3g} in {self.dtype}",
                     sigma=self.sigma, status=est.status)
        self._choose_first(engine)
        return {"f0": f0, "best": self.best_f, "phase": "probe", "noise": self.sigma}

    def _choose_first(self, engine) -> None:
        d = engine.dim
        left = math.inf if engine.budget is None else engine.budget - engine.nfev
        per_gradient = (2 * d if self.noisy else d + 1) + 2
        if left >= LOCAL_MIN_GRADIENTS * per_gradient:
            self._start_local(engine, "central" if self.noisy else "forward",
                              f"the budget affords {int(left // per_gradient) if math.isfinite(left) else 'unlimited'} "
                              f"gradient estimates (>= {LOCAL_MIN_GRADIENTS})")
        else:
            self._start_cma(engine, f"fewer than {LOCAL_MIN_GRADIENTS} gradient estimates fit in the {int(left)} "
                            f"queries left at dim={d}: a population method instead", sep=d > 40)

    def _start_local(self, engine, scheme: str, why: str) -> None:
        mu = self.eps_r ** (0.5 if scheme == "forward" else 1 / 3)
        engine.estimator = CoordinateEstimator(mu=mu, scheme=scheme, relative=True)
        options = {"noise": self.sigma} if self.noisy else {}
        self.local = LBFGSRule(1.0, options)
        start = self.x0 if self.noisy else self.best_x
        self.local.start(start.clone(), engine)
        self.local.keep = 0
        if self.noisy:
            self.keep = 1
        self.local_scheme = scheme
        self.phase = "local" if scheme == "forward" or self.noisy else "local-central"
        self._decide(self.phase, f"L-BFGS on {scheme} differences, step {mu:.3g} * max(1, |x_i|): {why}",
                     estimator=repr(engine.estimator))

    def local_x(self) -> torch.Tensor:
        return self.local.x if self.local is not None else self.x0

    def _next_after_local(self, engine, stop) -> None:
        reason = getattr(stop, "message", str(stop))
        if self.noisy and self.local is not None and math.isfinite(self.local.f):
            self.candidates.append((float(self.local.f), self.local.x.clone()))
        self.travel = float((self.local_x().to(torch.float64) - self.x0.to(torch.float64)).norm()) / math.sqrt(engine.dim)
        if self.phase == "local" and not self.noisy:
            self._start_local(engine, "central", f"the forward-difference search stopped ({reason}); central "
                              "differences resolve the gradient to eps^(2/3) instead of eps^(1/2)")
            return
        if engine.budget is None:
            raise Stop(f"the local search ended ({reason}); no budget was given for a global phase")
        self._start_cma(engine, f"the local search ended ({reason}) with {engine.budget - engine.nfev} "
                        "queries left: IPOP-CMA-ES for the rest", sep=False)

    # ------------------------------------------------------------------ CMA-ES (pycma)
    def _sigma0(self, engine) -> float:
        if engine.lower is not None:
            width = (engine.upper - engine.lower).to(torch.float64)
            finite = torch.isfinite(width)
            if bool(finite.all()):
                return max(float(width.mean()) / 4, 1e-12)
        return max(CMA_MIN_SIGMA, getattr(self, "travel", 0.0))

    def _start_cma(self, engine, why: str, sep: bool) -> None:
        import cma  # a dependency; imported here so that importing zoblackbox stays fast

        self.phase = "global"
        self.sep = bool(sep)
        self.sigma0 = self._sigma0(engine)
        popsize = (4 + int(3 * math.log(engine.dim))) * 2 ** self.restarts
        opts = {"popsize": popsize, "verbose": -9, "seed": math.nan, "randn": self.rs.randn, "CMA_diagonal": self.sep,
                "maxfevals": math.inf if engine.budget is None else engine.budget - engine.nfev}
        if engine.lower is not None:
            lo = engine.lower.to(torch.float64).cpu().numpy()
            hi = engine.upper.to(torch.float64).cpu().numpy()
            free = lo < hi  # pycma refuses lower == upper; a fixed coordinate is held by the engine's clipping
            if free.any():
                opts["bounds"] = [np.where(free, lo, -np.inf), np.where(free, hi, np.inf)]
        mean = self.x0.to(torch.float64).cpu().numpy()  # every IPOP run starts from the user's x0 (as pycma's fmin)
        self.medians: list[float] = []
        with contextlib.redirect_stdout(io.StringIO()):
            self.es = cma.CMAEvolutionStrategy(mean, self.sigma0, opts)
        self._decide("global", why, popsize=popsize, sigma0=self.sigma0, restart=self.restarts,
                     variant="sep-CMA-ES" if self.sep else "CMA-ES")

    def _cma_generation(self, engine):
        if engine.maxiter is not None and engine.nit >= engine.maxiter:
            raise Stop(f"maxiter={engine.maxiter} iterations reached")
        es = self.es
        left = math.inf if engine.budget is None else engine.budget - engine.nfev - self.keep
        if left < 1 or not engine.can_afford(1 + self.keep):
            raise Stop(f"query budget reached ({engine.nfev} of {engine.budget} spent)")
        X = np.asarray(es.ask(), dtype=np.float64)
        n = int(min(len(X), left))
        points = torch.as_tensor(X[:n], dtype=self.dtype, device=self.x0.device)
        plan = engine.bounded(QueryPlan(base=torch.zeros_like(self.x0), include_base=False, directions=points))
        losses = yield plan
        self._track(plan, losses)  # the clipped samples that were queried
        self.cma_evals += n
        if n < len(X):
            raise Stop(f"query budget reached ({engine.nfev} of {engine.budget} spent, during a CMA-ES generation)")
        fit = losses.to(torch.float64).numpy()
        fit = np.where(np.isfinite(fit), fit, np.inf)
        if not np.isfinite(fit).any():
            raise Stop("every point of a CMA-ES generation failed", success=False)
        worst = fit[np.isfinite(fit)].max()
        fit = np.where(np.isfinite(fit), fit, worst + 1.0 + abs(worst))  # failed points rank last
        with contextlib.redirect_stdout(io.StringIO()):
            es.tell(list(X), fit.tolist())
            stop = es.stop()
        record = {"f0": float(fit.min()), "best": self.best_f, "phase": "global", "sigma": float(es.sigma)}
        stop = {k: v for k, v in stop.items() if k not in ("maxfevals",)}
        if self.noisy:
            self.medians.append(float(np.median(fit)))
            w = int(STAGNATION_BASE + STAGNATION_PER_DIM * engine.dim / len(X))
            if len(self.medians) >= 2 * w and np.median(self.medians[-w:]) >= np.median(self.medians[-2 * w:-w]):
                stop["median stagnation"] = w
        if stop:
            if self.noisy:
                self.candidates.append(self._cma_candidate())
            self.restarts += 1
            self._start_cma(engine, f"CMA-ES run {self.restarts} ended ({', '.join(sorted(stop))}): IPOP restart "
                            "with a doubled population", sep=self.sep)
        return record

    def _cma_candidate(self) -> tuple[float, torch.Tensor]:
        """The current CMA-ES run's estimate of the optimum (its mean) scored by the median loss of its last
        generations (an average over many points near the mean: comparable between runs despite the noise)."""
        score = float(np.median(self.medians[-5:])) if self.medians else math.inf
        return score, torch.as_tensor(self.es.result.xfavorite, dtype=self.dtype, device=self.x0.device)

    # ------------------------------------------------------------------ end
    def finish(self, engine):
        if not self.noisy:
            return self.best_x.clone(), self.best_f, ""
        candidates = list(self.candidates)
        if self.phase == "global" and self.es is not None:
            candidates.append(self._cma_candidate())
        elif self.local is not None:
            candidates.append((float(self.local.f), self.local_x()))
        # the best-scored estimate of all phases and restarts (a restart's young run is rarely the best)
        x = min(candidates, key=lambda c: c[0])[1] if candidates else self.local_x()
        x = engine.project(x)
        if not engine.can_afford(1):
            return self.best_x.clone(), self.best_f, "; the best point measured (no query left to evaluate the estimate)"
        losses = yield engine.bounded(QueryPlan(base=x, include_base=True,
                                                directions=torch.empty(0, engine.dim, dtype=self.dtype)))
        return x, float(losses[0]), "; the noisy function's optimum estimate, evaluated once"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"phase": self.phase, "noisy": self.noisy, "sigma": self.sigma, "eps_r": getattr(self, "eps_r", 0.0),
                 "x": self.best_x.clone(), "best_f": self.best_f, "keep": self.keep,
                 "local_scheme": self.local_scheme, "restarts": self.restarts, "cma_evals": self.cma_evals,
                 "travel": getattr(self, "travel", 0.0), "decisions": [dict(d) for d in self.decisions],
                 "advanced": self._advanced,
                 "candidate_scores": torch.tensor([c[0] for c in self.candidates], dtype=torch.float64),
                 "candidate_points": (torch.stack([c[1] for c in self.candidates]) if self.candidates
                                      else torch.empty(0, self.x0.numel(), dtype=self.dtype))}
        if self.local is not None:
            state["local"] = self.local.state_dict()
        if self.es is not None:
            state["cma"] = torch.from_numpy(np.frombuffer(pickle.dumps(self.es), dtype=np.uint8).copy())
            state["sep"], state["sigma0"] = self.sep, self.sigma0
            state["medians"] = torch.tensor(self.medians, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        engine = self.engine
        self.phase, self.noisy, self.sigma = str(state["phase"]), bool(state["noisy"]), float(state["sigma"])
        self.eps_r = float(state["eps_r"])
        self.best_x, self.best_f = state["x"].to(self.dtype).clone(), float(state["best_f"])
        self.keep, self.local_scheme = int(state["keep"]), str(state["local_scheme"])
        self.restarts, self.cma_evals = int(state["restarts"]), int(state["cma_evals"])
        self.travel = float(state["travel"])
        self.decisions = [dict(d) for d in state["decisions"]]
        self._advanced = bool(state["advanced"])
        self.candidates = [(float(v), p.to(self.dtype).clone()) for v, p in
                           zip(state["candidate_scores"].tolist(), state["candidate_points"])]
        self.local, self.es = None, None
        if "local" in state:
            scheme = self.local_scheme
            mu = self.eps_r ** (0.5 if scheme == "forward" else 1 / 3)
            engine.estimator = CoordinateEstimator(mu=mu, scheme=scheme, relative=True)
            self.local = LBFGSRule(1.0, {"noise": self.sigma} if self.noisy else {})
            self.local.start(self.x0.clone(), engine)
            self.local.keep = 0
            self.local.load_state_dict(state["local"])
        else:
            engine.estimator = CoordinateEstimator(mu=math.sqrt(self.eps), relative=True)
        if "cma" in state:
            self.es = _load_cma(bytes(state["cma"].numpy().tobytes()))
            self.rs = self.es.opts["randn"].__self__  # the generator pickled with it, in the same state
            self.sep, self.sigma0 = bool(state["sep"]), float(state["sigma0"])
            self.medians = [float(v) for v in state["medians"].tolist()]

    def config(self) -> dict:
        return {"rule": "AutoStrategy", "seed": self.seed}


_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
                  "bytearray", "slice", "range", "object", "NoneType"}


#: the functions (not classes) pycma's pickle refers to: numpy's array, scalar and generator reconstructors and
#: the eigendecomposition pycma keeps as an option, pycma's own two option callables
_STATE_FUNCTIONS = {"numpy": {"_reconstruct", "scalar", "_frombuffer", "__randomstate_ctor", "__bit_generator_ctor",
                              "__generator_ctor", "eigh"},
                    "cma": {"_pass", "is_feasible"}}


class _CMAUnpickler(pickle.Unpickler):
    """Loads pycma's own pickle of a CMA-ES state and nothing else (a checkpoint is data, not code): classes
    of pycma, numpy and collections, numpy's array/generator reconstructors, copyreg's object protocol."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name == "getattr":  # pycma stores its sampler as a RandomState's method
            return _random_method
        root = module.split(".")[0]
        if root in ("cma", "numpy", "collections", "copyreg", "_codecs") or (
                module == "builtins" and name in _SAFE_BUILTINS):
            obj = super().find_class(module, name)
            if isinstance(obj, type) or root in ("copyreg", "_codecs", "builtins") or (
                    name in _STATE_FUNCTIONS.get(root, ())):
                return obj
        raise CheckpointError(f"the CMA-ES state refers to {module}.{name}, which is not part of pycma's state")


def _random_method(obj, name: str):
    if not isinstance(obj, np.random.RandomState) or name.startswith("_"):
        raise CheckpointError(f"the CMA-ES state asks for attribute {name!r} of a {type(obj).__name__}; only the "
                              "methods of numpy's RandomState belong to pycma's state")
    return getattr(obj, name)


def _load_cma(data: bytes):
    return _CMAUnpickler(io.BytesIO(data)).load()
