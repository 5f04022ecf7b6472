"""Update rules: what the ask/tell engine does with the losses it is told.

An update rule is a small state machine driven by :class:`~zoblackbox.engine.AskTell`. Each
iteration is a generator: it *yields* a :class:`~zoblackbox.plan.QueryPlan` (what to evaluate),
receives the plan's losses back, and *returns* a record of the finished iteration. A rule keeps its
committed state (iterate, optimizer moments, curvature memory) unchanged until the iteration ends,
so the engine can checkpoint at any moment: the committed state plus the losses told since the
iteration began replay the iteration exactly.

* :class:`FirstOrderRule` -- one gradient estimate, then one step of any ``torch.optim`` optimizer
  (``sgd``, ``adam``, ``adamw``, ``signsgd`` or a class), with an optional LR multiplier per
  iteration applied through ``torch.optim.lr_scheduler.LambdaLR``;
* :class:`LBFGSRule` -- zoblackbox's L-BFGS for estimated gradients (:mod:`zoblackbox.lbfgs`): a
  line search on function values is a sequence of one-point asks;
* :class:`ClosureRule` -- optimizers that need a closure (``torch.optim.LBFGS``): the optimizer runs
  in a helper thread and each closure call becomes an ask.

To add an update rule: subclass :class:`UpdateRule`, implement ``start``, ``iteration``,
``state_dict``/``load_state_dict`` (and ``finish`` when the returned point is not the iterate), and
add it to :func:`make_rule` (``docs/architecture.md``).
"""

from __future__ import annotations

import inspect
import math
import queue
import threading
import types
import typing
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .estimators import StepUnderflow
from .lbfgs import _ACCEPT, _GROW, _SHRINK, check_lbfgs_kwargs, lbfgs_direction
from .plan import QueryPlan

__all__ = ["OPTIMIZERS", "ClosureRule", "FirstOrderRule", "LBFGSRule", "SignSGD", "Stop", "UpdateRule",
           "make_optimizer", "make_rule", "value_plan"]


class SignSGD(torch.optim.Optimizer):
    """Sign-SGD as a ``torch.optim.Optimizer``: ``p -= lr * sign(grad)``.

    Robust to the scale of noisy ZO estimates: every coordinate moves by ``lr`` in the direction
    of its estimated descent. ``optimizer="signsgd"`` selects it in :func:`minimize`,
    :class:`AskTell` and the :class:`Trainer`.

    Parameters
    ----------
    params : iterable of torch.Tensor or of dict
        Parameters (or parameter groups), as for any ``torch.optim`` optimizer.
    lr : float, default 1e-3
        Step per coordinate, a positive finite number.

    Raises
    ------
    ConfigError
        ``lr`` is not a positive finite number.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import SignSGD
    >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    >>> opt = SignSGD([p], lr=0.1)
    >>> p.grad = torch.tensor([3.0, -1e-6, 0.0])
    >>> _ = opt.step()
    >>> p.data
    tensor([ 0.9000, -1.9000,  0.5000])
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3):
        super().__init__(params, {"lr": check_lr(lr)})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch overloads step
        """One step on every parameter with a gradient.

        Parameters
        ----------
        closure : callable or None, default None
            Re-evaluates the loss and returns it, as for ``torch.optim``.

        Returns
        -------
        float or None
            The closure's loss, or ``None``.
        """
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
    "lbfgs": torch.optim.LBFGS,  # the name selects zoblackbox's own L-BFGS (LBFGSRule); the class, torch's
}


def check_lr(lr) -> float:
    """``lr`` if it is a positive finite number, else ConfigError naming it."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    return lr


def optimizer_class(name_or_cls) -> type:
    """The ``torch.optim`` class of a name in :data:`OPTIMIZERS` or of a class."""
    if isinstance(name_or_cls, str):
        if name_or_cls.lower() not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name_or_cls!r}; expected one of {sorted(OPTIMIZERS)}")
        return OPTIMIZERS[name_or_cls.lower()]
    if isinstance(name_or_cls, type) and issubclass(name_or_cls, torch.optim.Optimizer):
        return name_or_cls
    if isinstance(name_or_cls, torch.optim.Optimizer):  # an instance holds parameters of its own: not ours to step
        cls = type(name_or_cls)
        raise ConfigError(f"optimizer must be a name or a torch.optim.Optimizer class, got a {cls.__module__}."
                          f"{cls.__qualname__} instance; pass the class (optimizer={cls.__qualname__}) and its "
                          "arguments as optimizer_kwargs")
    raise ConfigError(f"optimizer must be a name or a torch.optim.Optimizer class, got {name_or_cls!r}")


# ---------------------------------------------------------------------------------------- optimizer arguments
def _kinds(annotation, default) -> tuple | None:
    """The kinds of value a keyword of an optimizer's ``__init__`` takes, from its annotation (torch's
    optimizers annotate every keyword: ``float``, ``bool``, ``int``, ``tuple[float, float]``,
    ``bool | None``...) or else its default; ``None`` when neither says (anything is let through)."""
    if isinstance(annotation, (type, types.UnionType)) or typing.get_origin(annotation) is not None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            kinds = [_kinds(a, inspect.Parameter.empty) for a in args]
            return None if any(k is None for k in kinds) else tuple(x for k in kinds if k is not None for x in k)
        if origin is tuple and args and Ellipsis not in args:
            elements = [_kinds(a, inspect.Parameter.empty) for a in args]
            return None if any(k is None for k in elements) else (tuple(elements),)
        if annotation is bool:
            return ("bool",)
        if annotation is int:
            return ("int",)
        if annotation is float:
            return ("real",)
        if annotation is str:
            return ("str",)
        if annotation is type(None):
            return ("none",)
        if isinstance(annotation, type) and issubclass(annotation, torch.Tensor):
            return ("tensor",)
        return None
    if isinstance(default, (bool, np.bool_)):
        return ("bool",)
    if isinstance(default, (int, float)):
        return ("real",)
    if isinstance(default, str):
        return ("str",)
    if isinstance(default, tuple) and default and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in default):
        return (tuple(("real",) for _ in default),)
    return None


_KIND_WORDS = {"bool": "a bool", "int": "an int", "real": "a finite real number", "str": "a string",
               "none": "None", "tensor": "a tensor"}


def _matches(value, kind) -> bool:
    if isinstance(kind, tuple):  # a tuple of the given element kinds
        return (isinstance(value, (tuple, list)) and len(value) == len(kind)
                and all(any(_matches(v, k) for k in ks) for v, ks in zip(value, kind)))
    if kind == "bool":
        return isinstance(value, (bool, np.bool_))
    if kind == "int":
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if kind == "real":
        return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
                and math.isfinite(value))
    if kind == "str":
        return isinstance(value, str)
    if kind == "none":
        return value is None
    if kind == "tensor":
        return isinstance(value, torch.Tensor)
    return False


def _describe(kind) -> str:
    if isinstance(kind, tuple):
        return f"a tuple of {len(kind)} ({', '.join(' or '.join(_describe(k) for k in ks) for ks in kind)})"
    return _KIND_WORDS[kind]


def check_optimizer_kwargs(cls: type, name: str, kwargs: Mapping) -> None:
    """Refuse an unknown keyword, or a value of the wrong kind, for the optimizer class ``cls`` with a
    :class:`ConfigError` naming the keyword and the value (torch would fail later, from inside a step,
    or say only ``'<=' not supported between instances of 'float' and 'str'``)."""
    try:
        params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]  # the class's own __init__
    except (TypeError, ValueError):  # no signature to check against: the dry step checks what it can
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = {n: p for n, p in params.items() if n not in ("self", "params")
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise ConfigError(f"optimizer_kwargs keys must be strings (keyword names), got {key!r}")
        if key == "lr":
            raise ConfigError(f"optimizer_kwargs['lr']={value!r}: pass the learning rate as lr=, not in optimizer_kwargs")
        if key not in known:
            if takes_any:
                continue
            raise ConfigError(f"optimizer {name!r} takes no keyword {key!r} (optimizer_kwargs {key}={value!r}); "
                              f"it takes {sorted(k for k in known if k != 'lr')}")
        kinds = _kinds(known[key].annotation, known[key].default)
        if kinds is not None and not any(_matches(value, k) for k in kinds):
            raise ConfigError(f"optimizer {name!r}: optimizer_kwargs {key}={value!r} must be "
                              f"{' or '.join(_describe(k) for k in kinds)}")


#: checks torch's LBFGS constructor leaves to its first step (a bad value fails there, after queries)
_LBFGS_RANGES = {"max_iter": (1, "an int >= 1"), "history_size": (1, "an int >= 1"),
                 "max_eval": (1, "an int >= 1 or None"), "tolerance_grad": (0, "a number >= 0"),
                 "tolerance_change": (0, "a number >= 0")}


def build_optimizer(cls: type, name: str, param: torch.Tensor, lr: float, kwargs: Mapping, *,
                    closure: bool = False) -> torch.optim.Optimizer:
    """``cls([param], lr=lr, **kwargs)``, every argument checked before any query.

    Three layers, each naming the argument and the value: :func:`check_optimizer_kwargs` (unknown
    keywords, wrong kinds: from the class's signature, which torch annotates); torch's own
    constructor checks (ranges: ``momentum >= 0``, ``0 <= beta < 1``..., re-raised as ConfigError);
    then one dry step with a zero gradient on a scratch copy of ``param`` (with a closure for closure
    optimizers) for what torch only checks inside ``step`` (``capturable``/``fused`` on the wrong
    device, a user class's own checks). The real parameter and optimizer state are untouched.
    """
    check_optimizer_kwargs(cls, name, kwargs)
    if issubclass(cls, torch.optim.LBFGS):
        for key, (low, what) in _LBFGS_RANGES.items():
            value = kwargs.get(key)
            if value is not None and value < low:
                raise ConfigError(f"optimizer {name!r}: optimizer_kwargs {key}={value!r} must be {what}")
        if kwargs.get("line_search_fn") not in (None, "strong_wolfe"):
            raise ConfigError(f"optimizer {name!r}: optimizer_kwargs line_search_fn={kwargs['line_search_fn']!r} "
                              "must be None or 'strong_wolfe'")

    def make(p):
        try:
            return cls([p], lr=lr, **kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"optimizer {name!r} refuses optimizer_kwargs {dict(kwargs)!r}: {exc}") from exc

    scratch = nn.Parameter(param.detach().clone())
    dry = make(scratch)
    try:
        if closure:
            def zero_loss():
                dry.zero_grad(set_to_none=False)
                scratch.grad = torch.zeros_like(scratch)
                return torch.zeros((), dtype=torch.float64)
            dry.step(zero_loss)
        else:
            scratch.grad = torch.zeros_like(scratch)
            dry.step()
    except Exception as exc:  # whatever the optimizer's step raises is a bad configuration
        raise ConfigError(f"optimizer {name!r} with lr={lr!r} and optimizer_kwargs {dict(kwargs)!r} fails on a "
                          f"dry step: {type(exc).__name__}: {exc}") from exc
    return make(param)


def check_lr_schedule(lr_schedule: Callable[[int], float]) -> Callable[[int], float]:
    """``lr_schedule`` wrapped so that a factor that is not a finite number >= 0 is a ConfigError naming
    the schedule, the step and the value (``LambdaLR`` would multiply it into the LR silently, or fail
    with a torch TypeError)."""
    def checked(step: int) -> float:
        factor = lr_schedule(step)
        if (isinstance(factor, (bool, np.bool_)) or not isinstance(factor, (int, float, np.integer, np.floating))
                or not math.isfinite(factor) or factor < 0):
            raise ConfigError(f"lr_schedule {lr_schedule!r} returned {factor!r} at step {step}; a schedule returns "
                              "a finite LR factor >= 0")
        return float(factor)

    return checked


def make_optimizer(name_or_cls, params, lr: float, **kwargs) -> torch.optim.Optimizer:
    """A torch optimizer from a name in :data:`OPTIMIZERS` or an optimizer class."""
    check_lr(lr)
    return optimizer_class(name_or_cls)(params, lr=lr, **kwargs)


class Stop(Exception):
    """Raised by a rule (from ``iteration``) to end the run; ``success`` says whether it ended well."""

    def __init__(self, message: str, success: bool = True):
        super().__init__(message)
        self.message, self.success = message, success


def clone_tree(value):
    """A copy of nested dicts/lists/tuples whose tensors are cloned (optimizer ``state_dict()``s hold
    references to tensors that the next step changes in place)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tree(v) for v in value)
    return value


def value_plan(x: torch.Tensor) -> QueryPlan:
    """A plan of one query: the loss at ``x``."""
    empty = torch.empty(0, dtype=torch.long, device=x.device)
    return QueryPlan(base=x, include_base=True, coords=empty, offsets=torch.empty(0, dtype=x.dtype, device=x.device))


class UpdateRule(ABC):
    """Base class: an update rule as an ask/tell state machine (see the module docstring).

    ``engine`` below is the :class:`~zoblackbox.engine.AskTell` driving the rule; rules read the
    estimator, the coordinate mask, the bounds and the budget from it (``engine.afford(n)`` raises
    :class:`Stop` when ``n`` more queries would not fit).
    """

    #: queries kept aside for :meth:`finish` (the value at the returned point)
    keep: int = 1

    @abstractmethod
    def start(self, x: torch.Tensor, engine) -> None:
        """Set up the state at the starting point ``x``."""

    @abstractmethod
    def iteration(self, engine) -> Generator[QueryPlan, torch.Tensor, dict]:
        """One iteration: yields plans, receives their losses, returns the iteration's record
        (``f0``, ``grad_norm``, ``n_failed``); raises :class:`Stop` to end the run."""

    @property
    @abstractmethod
    def x(self) -> torch.Tensor:
        """The current iterate."""

    @property
    def counts_iteration(self) -> bool:
        """Whether the last finished iteration advanced ``nit`` (L-BFGS's first one does not)."""
        return True

    def iterations(self) -> int | None:
        """The iteration count when the rule keeps its own (``None``: the engine counts)."""
        return None

    def stopped_after_a_step(self) -> bool:
        """Whether the iteration that raised :class:`Stop` had already moved the iterate (it then
        counts as an iteration: L-BFGS keeps the step its line search took when the budget ran out)."""
        return False

    def finish(self, engine) -> Generator[QueryPlan, torch.Tensor, tuple]:
        """The returned point: yields the plans it needs, returns ``(x, fun, note)``. Default: the
        loss at the iterate, one query."""
        x = self.x
        losses = yield value_plan(x)
        return x, float(losses[0]), ""

    @abstractmethod
    def state_dict(self) -> dict:
        """The committed state (tensors, numbers, strings and containers of them)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`."""

    def config(self) -> dict:
        """The rule's settings (JSON), checked when a state is loaded into another engine."""
        return {"rule": type(self).__name__}


# ---------------------------------------------------------------------------------------- first order
class FirstOrderRule(UpdateRule):
    """A gradient estimate, then one step of a ``torch.optim`` optimizer.

    Args:
        optimizer: a name in :data:`OPTIMIZERS` (not ``"lbfgs"``) or a ``torch.optim`` class that
            needs no closure.
        lr: the learning rate (peak, when ``lr_schedule`` is given).
        optimizer_kwargs: extra optimizer arguments (``momentum``, ``weight_decay``...).
        lr_schedule: ``lr_schedule(iteration) -> factor``, applied with ``LambdaLR`` (e.g.
            :class:`zoblackbox.schedules.WarmupCosine`); ``None`` keeps ``lr``.
    """

    def __init__(self, optimizer="adam", lr: float = 1e-2, optimizer_kwargs: Mapping | None = None,
                 lr_schedule: Callable[[int], float] | None = None):
        self.cls = optimizer_class(optimizer)
        self.name = optimizer if isinstance(optimizer, str) else f"{self.cls.__module__}.{self.cls.__qualname__}"
        self.lr = check_lr(lr)
        self.kwargs = dict(optimizer_kwargs or {})
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be callable (iteration -> LR factor) or None, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.param: nn.Parameter | None = None

    def start(self, x, engine) -> None:
        self.keep = 1 if engine.evaluate_final else 0
        self.param = nn.Parameter(x.clone())
        self.opt = build_optimizer(self.cls, self.name, self.param, self.lr, self.kwargs)
        self.sched = None
        if self.lr_schedule:
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, check_lr_schedule(self.lr_schedule))

    @property
    def x(self) -> torch.Tensor:
        assert self.param is not None, "start() first"
        return self.param.detach()

    def iteration(self, engine):
        est = yield from engine.gradient_estimate(self.x, keep=self.keep)
        grad = est.grad
        for hook in engine.gradient_hooks:  # e.g. a white-box term added by autograd
            grad = hook(self.x, grad)
        self.apply_gradient(grad, engine)
        return {"f0": est.f0, "grad_norm": float(est.grad.norm()), "n_failed": est.n_failed, "_grad": est.grad}

    def apply_gradient(self, grad: torch.Tensor, engine) -> None:
        """One optimizer step with ``grad``; a step that makes ``x`` non-finite is undone and stops."""
        param = self.param
        assert param is not None, "start() first"
        self.opt.zero_grad(set_to_none=True)
        param.grad = grad.to(param.dtype)
        previous = param.detach().clone()
        self.opt.step()
        with torch.no_grad():
            engine.project_(param)
            if engine.freeze is not None:  # coordinates outside the mask keep their value
                param[engine.freeze] = previous[engine.freeze]
        if not bool(torch.isfinite(param).all()):  # diverged: keep the last finite iterate, not inf/nan
            with torch.no_grad():
                param.copy_(previous)
            raise Stop(f"iteration {engine.nit + 1} made x non-finite (gradient norm {float(grad.norm())!r}); "
                       "returning the last finite iterate (lower lr?)", success=False)
        if self.sched is not None:
            self.sched.step()

    def state_dict(self) -> dict:
        state = {"x": self.x.clone(), "optimizer": clone_tree(self.opt.state_dict())}
        if self.sched is not None:
            state["lr_schedule"] = {"last_epoch": self.sched.last_epoch}
        return state

    def load_state_dict(self, state) -> None:
        assert self.param is not None, "start() first"
        with torch.no_grad():
            self.param.copy_(state["x"])
        self.opt.load_state_dict(clone_tree(state["optimizer"]))
        if self.sched is not None:
            assert self.lr_schedule is not None  # sched exists only with a schedule
            self.sched.last_epoch = int(state["lr_schedule"]["last_epoch"])
            factor = self.lr_schedule(self.sched.last_epoch)
            for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
                group["lr"] = base * factor

    def config(self) -> dict:
        return {"rule": "FirstOrderRule", "optimizer": self.name, "lr": self.lr,
                "optimizer_kwargs": {k: repr(v) for k, v in sorted(self.kwargs.items())}}


# ---------------------------------------------------------------------------------------- L-BFGS
class LBFGSRule(UpdateRule):
    """zoblackbox's L-BFGS for estimated gradients (algorithm: :mod:`zoblackbox.lbfgs`).

    The first iteration measures the loss and the gradient at ``x0`` (``nit`` stays 0); every
    later one is a direction, a line search (one ask per trial point) and a gradient estimate at
    the accepted point that reuses the loss the search measured there. The returned point is the
    last accepted iterate with the loss measured there (no extra query), or, under ``noise``, the
    mean of the trailing iterates whose gradient is mostly noise (one query kept aside for it).

    Args:
        lr: the first trial step (1 = the quasi-Newton step).
        options: ``history_size``, ``max_ls``, ``c1``, ``noise`` (:data:`zoblackbox.lbfgs.LBFGS_DEFAULTS`).
    """

    def __init__(self, lr: float = 1.0, options: Mapping | None = None):
        self.lr = check_lr(lr)
        self.options = check_lbfgs_kwargs(dict(options or {}))

    def start(self, x, engine) -> None:
        est = engine.estimator
        noise = self.options["noise"]
        gain = est.noise_gain() if noise > 0 else None
        self.keep = 1 if gain else 0
        self.with_base = est.queries_base
        self.n_grad = est.num_queries(engine.dim) - (1 if self.with_base else 0)
        first_cost = self.n_grad + 1 + self.keep
        if engine.budget is not None and engine.budget < first_cost:
            raise ConfigError(
                f"budget={engine.budget!r} is below the cost of the first L-BFGS gradient ({first_cost} queries: "
                f"{est!r} at dim={engine.dim}, the loss at x0{', one query for the averaged point' if self.keep else ''})")
        # with noisy losses, y = g_new - g carries noise of norm ~ sqrt(2 d) sigma_g: a pair whose y is
        # not clearly above it would teach the memory the noise's curvature, not the loss's
        self.y_floor = 3 * math.sqrt(2 * engine.dim) * noise * gain if gain else 0.0
        # iterates whose gradient estimate is mostly noise (|g|^2 below 4x its expected d sigma_g^2) are averaged
        self.noise_g2 = engine.dim * (noise * gain) ** 2 if gain else 0.0
        self.memory: deque = deque(maxlen=self.options["history_size"])
        self.stall: list[torch.Tensor] = []
        self.xd = x.to(torch.float64).clone()
        self.f = math.nan
        self.g: torch.Tensor | None = None
        self.dtype = x.dtype
        self.started = False
        self._advanced = False

    @property
    def x(self) -> torch.Tensor:
        return self.xd.to(self.dtype)

    @property
    def counts_iteration(self) -> bool:
        return self._advanced

    def stopped_after_a_step(self) -> bool:
        return self._advanced

    def _value(self, engine, point: torch.Tensor):
        engine.afford(1, keep=self.keep)
        losses = yield value_plan(point.to(self.dtype))
        v = float(losses[0])
        return v if math.isfinite(v) else math.inf

    def _gradient(self, engine, point: torch.Tensor, f: float):
        engine.afford(self.n_grad, keep=self.keep)
        est = yield from engine.gradient_estimate(point.to(self.dtype), keep=self.keep, f0=f, checked=True)
        return est

    def iteration(self, engine):
        self._advanced = False
        if not self.started:  # the loss and the gradient at x0
            f = yield from self._value(engine, self.xd)
            if not math.isfinite(f):
                self.f = f
                raise Stop(f"the loss at x0 is not finite ({f!r}): no line search can start there", success=False)
            est = yield from self._gradient(engine, self.xd, f)
            self.f, self.g, self.started = f, est.grad.to(torch.float64), True
            return {"f0": f, "grad_norm": float(self.g.norm()), "n_failed": est.n_failed}
        if engine.maxiter is not None and engine.nit >= engine.maxiter:
            raise Stop(f"maxiter={engine.maxiter} iterations reached")
        xd, f, g, memory = self.xd, self.f, self.g, self.memory
        if not bool(torch.any(g != 0)):
            raise Stop("the gradient estimate is zero: a stationary point (or mu too small to see a change)")
        while True:
            p = lbfgs_direction(g, memory)
            dphi0 = float(torch.dot(g, p))
            if not math.isfinite(dphi0) or dphi0 >= 0:  # not a descent direction: forget the curvature
                memory.clear()
                p = -g
                dphi0 = float(torch.dot(g, p))
            # a nonzero gradient of subnormal entries has a norm that underflows to 0: the step is then lr
            gnorm = float(g.norm())
            alpha = self.lr if memory else self.lr * (min(1.0, 1.0 / gnorm) if gnorm > 0 else 1.0)
            x_new, f_new, stop = yield from self._line_search(engine, xd, f, p, dphi0, alpha)
            if x_new is not None:
                break
            if stop is not None:
                raise stop
            if memory:  # one more try along the steepest descent
                memory.clear()
                continue
            raise Stop("the line search found no decrease along the steepest-descent direction "
                       "(converged to the gradient estimate's resolution; a noisy loss needs noise= and "
                       "a larger mu)")
        # the step is taken: commit it (a budget that runs out now still returns this point)
        self.xd, self.f, self._advanced = x_new, f_new, True
        if stop is not None:
            raise stop
        try:
            est = yield from self._gradient(engine, x_new, f_new)
        except StepUnderflow as exc:
            raise Stop(f"stopped at iteration {engine.nit + 1}: {exc}", success=False) from exc
        g_new = est.grad.to(torch.float64)
        s, y = x_new - xd, g_new - g
        sy = float(torch.dot(s, y))
        if sy > 1e-10 * float(s.norm() * y.norm()) and float(y.norm()) > self.y_floor:
            memory.append((s, y, 1.0 / sy))
        self.g = g_new
        if self.noise_g2:
            if float(torch.dot(g_new, g_new)) < 4 * self.noise_g2:
                self.stall.append(x_new)
            else:
                self.stall.clear()
        return {"f0": f_new, "grad_norm": float(g_new.norm()), "n_failed": est.n_failed, "_grad": g_new}

    def _line_search(self, engine, x, f, p, dphi0, alpha):
        """Function-value line search along ``p`` (:func:`zoblackbox.lbfgs` documents it):
        ``(x_new, f_new, stop)``; ``x_new`` None when no acceptable step was found, ``stop`` the
        budget's :class:`Stop` when it ran out during the search."""
        c1, noise, max_ls = self.options["c1"], self.options["noise"], self.options["max_ls"]
        best_x, best_f = None, math.inf
        for _ in range(max_ls):
            point = (x + alpha * p).to(self.dtype).to(torch.float64)  # exactly the point the oracle sees
            point = engine.project(point)
            if not bool(torch.isfinite(point).all()):  # a step so long that x overflows: shorter, no query
                alpha *= _SHRINK
                continue
            if bool(torch.equal(point, x)):
                break  # the step rounds away
            try:
                fa = yield from self._value(engine, point)
            except Stop as stop:
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

    def finish(self, engine):
        x_out, fun, note = self.xd, self.f, ""
        if len(self.stall) > 1 and engine.can_afford(1):
            x_avg = torch.stack(self.stall).mean(0)
            losses = yield value_plan(x_avg.to(self.dtype))
            f_avg = float(losses[0])
            if math.isfinite(f_avg) and f_avg <= fun + 3 * self.options["noise"]:  # not clearly worse
                x_out, fun = x_avg, f_avg
                note = f"; returned the mean of the last {len(self.stall)} iterates (noise={self.options['noise']})"
        return x_out.to(self.dtype), fun, note

    def state_dict(self) -> dict:
        return {"x": self.xd.clone(), "f": self.f, "g": self.g.clone() if self.g is not None else torch.empty(0),
                "started": self.started, "advanced": self._advanced,
                "memory": [[s, y, rho] for s, y, rho in self.memory], "stall": list(self.stall)}

    def load_state_dict(self, state) -> None:
        self.xd = state["x"].to(torch.float64).clone()
        self.f = float(state["f"])
        self.started = bool(state["started"])
        self._advanced = bool(state["advanced"])
        self.g = state["g"].to(torch.float64) if self.started else None
        self.memory.clear()
        self.memory.extend((s, y, float(rho)) for s, y, rho in state["memory"])
        self.stall = list(state["stall"])

    def config(self) -> dict:
        return {"rule": "LBFGSRule", "lr": self.lr, "options": dict(self.options)}


# ---------------------------------------------------------------------------------------- closure optimizers
class _Cancel(Exception):
    """Ends the helper thread of a :class:`ClosureRule` whose run was abandoned."""


class ClosureRule(UpdateRule):
    """An optimizer whose ``step`` needs a closure (``torch.optim.LBFGS``), as an ask/tell machine.

    The optimizer's ``step(closure)`` runs in a helper thread; each closure call asks for a gradient
    estimate at the optimizer's point and waits for it. The whole ``step`` is one engine iteration
    (torch's L-BFGS runs to its own tolerances inside it), so a checkpoint of this rule replays the
    losses told since the start. The best point whose loss was measured is returned (no extra query
    beyond the one kept for it).
    """

    def __init__(self, optimizer=torch.optim.LBFGS, lr: float = 1.0, optimizer_kwargs: Mapping | None = None,
                 budget_bound: bool = False):
        self.cls = optimizer_class(optimizer)
        self.name = f"{self.cls.__module__}.{self.cls.__qualname__}"
        self.lr = check_lr(lr)
        kwargs = dict(optimizer_kwargs or {})
        if self.cls is torch.optim.LBFGS or issubclass(self.cls, torch.optim.LBFGS):
            kwargs.setdefault("line_search_fn", "strong_wolfe")
            kwargs.setdefault("max_iter", 2**31 - 1)
            kwargs.setdefault("max_eval", 2**31 - 1)
            kwargs.setdefault("history_size", 20)
            if budget_bound:  # the budget is the stopping rule: do not stop early on torch's tolerances
                kwargs.setdefault("tolerance_grad", 0.0)
                kwargs.setdefault("tolerance_change", 0.0)
        self.kwargs = kwargs

    def start(self, x, engine) -> None:
        if not engine.estimator.queries_base:
            raise ConfigError(f"{self.name} needs the loss at x from each estimate; {engine.estimator!r} does not "
                              "query the base point (use forward differences, e.g. CoordinateEstimator(), or "
                              "optimizer='lbfgs')")
        self.param = nn.Parameter(x.clone())
        self.opt = build_optimizer(self.cls, self.name, self.param, self.lr, self.kwargs, closure=True)
        self.best_x, self.best_f, self.evals = x.clone(), math.inf, 0
        self.records: list[dict] = []

    @property
    def x(self) -> torch.Tensor:
        return self.best_x

    def _nit(self) -> int:
        return int(self.opt.state[self.param].get("n_iter", 0)) if self.param in self.opt.state else 0

    def iteration(self, engine) -> Generator[QueryPlan, torch.Tensor, dict]:
        requests: queue.Queue = queue.Queue()
        replies: queue.Queue = queue.Queue()
        done = object()

        def closure():
            if engine.maxiter is not None and self._nit() >= engine.maxiter:
                raise Stop(f"maxiter={engine.maxiter} iterations reached")
            x = self.param.detach().clone()
            if not bool(torch.isfinite(x).all()):
                raise Stop("the line search produced a non-finite x", success=False)
            requests.put(x)
            reply = replies.get()
            if isinstance(reply, BaseException):
                raise reply
            est, halt = reply
            if halt is not None:
                raise halt
            self.param.grad = est.grad.to(self.param.dtype)
            f0 = est.f0 if est.f0 is not None and math.isfinite(est.f0) else math.inf
            return torch.tensor(f0, dtype=torch.float64)  # a failed base query: +inf makes the search back off

        def run():
            try:
                self.opt.step(closure)
                requests.put(Stop("L-BFGS converged (gradient, step or loss change below its tolerances)"))
            except BaseException as exc:  # noqa: BLE001 - handed to the engine's thread
                requests.put(exc)
            requests.put(done)

        thread = threading.Thread(target=run, name="zoblackbox-closure-rule", daemon=True)
        thread.start()
        try:
            while True:
                item = requests.get()
                if isinstance(item, BaseException):
                    requests.get()  # done
                    if isinstance(item, _Cancel):
                        raise Stop("cancelled")
                    raise item
                x = item
                try:
                    est = yield from engine.gradient_estimate(x, keep=self.keep)
                except BaseException as exc:
                    replies.put(_Cancel() if isinstance(exc, GeneratorExit) else exc)
                    thread.join()
                    raise
                self.evals += 1
                f0 = est.f0 if est.f0 is not None and math.isfinite(est.f0) else math.inf
                if f0 < self.best_f:
                    self.best_f, self.best_x = f0, x.clone()
                record = {"f0": est.f0, "grad_norm": float(est.grad.norm()), "n_failed": est.n_failed,
                          "nit": self._nit()}
                halt = engine.observe(record, x=x, grad=est.grad, nit=self._nit(),
                                      call_back=self.evals > 1)
                replies.put((est, halt))
        finally:
            thread.join(timeout=0 if thread.is_alive() else None)

    @property
    def counts_iteration(self) -> bool:
        return False  # nit comes from torch's own counter

    def iterations(self) -> int:
        return self._nit()

    def state_dict(self) -> dict:
        return {"x": self.best_x.clone(), "best_f": self.best_f, "evals": self.evals,
                "param": self.param.detach().clone(), "optimizer": clone_tree(self.opt.state_dict())}

    def load_state_dict(self, state) -> None:
        self.best_x, self.best_f, self.evals = state["x"].clone(), float(state["best_f"]), int(state["evals"])
        with torch.no_grad():
            self.param.copy_(state["param"])
        self.opt.load_state_dict(clone_tree(state["optimizer"]))

    def config(self) -> dict:
        return {"rule": "ClosureRule", "optimizer": self.name, "lr": self.lr}


def make_rule(optimizer, lr: float | None, optimizer_kwargs: Mapping | None = None, *,
              lr_schedule: Callable[[int], float] | None = None, budget_bound: bool = False) -> UpdateRule:
    """The update rule for :func:`~zoblackbox.minimize`'s ``optimizer`` argument.

    ``"lbfgs"`` is :class:`LBFGSRule` (``lr`` default 1), a class whose ``step`` needs a closure
    (``torch.optim.LBFGS``) is :class:`ClosureRule` (``lr`` default 1e-2, as every ``torch.optim``
    class), an :class:`UpdateRule` instance is used as it is, anything else is
    :class:`FirstOrderRule` (``lr`` default 1e-2).
    """
    if isinstance(optimizer, UpdateRule):
        if lr is not None or optimizer_kwargs:
            raise ConfigError("lr and optimizer_kwargs belong to the UpdateRule instance passed as optimizer; "
                              f"got lr={lr!r}, optimizer_kwargs={optimizer_kwargs!r}")
        return optimizer
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
        raise TypeError(f"optimizer_kwargs must be a mapping or None, got {type(optimizer_kwargs).__name__}: "
                        f"{optimizer_kwargs!r}")
    if isinstance(optimizer, str) and optimizer.lower() == "lbfgs":
        if lr_schedule is not None:
            raise ConfigError("lr_schedule applies to first-order update rules; L-BFGS chooses its steps by line "
                              "search")
        return LBFGSRule(1.0 if lr is None else lr, optimizer_kwargs)
    cls = optimizer_class(optimizer)
    if issubclass(cls, torch.optim.LBFGS):
        return ClosureRule(cls, 1e-2 if lr is None else lr, optimizer_kwargs, budget_bound=budget_bound)
    return FirstOrderRule(optimizer, 1e-2 if lr is None else lr, optimizer_kwargs, lr_schedule)
