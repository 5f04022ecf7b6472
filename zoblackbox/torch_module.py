"""A torch module, a loss and a data batch as an oracle over (a subset of) the module's parameters.

:class:`ModuleOracle` is the oracle; :class:`ZOGradient` fills ``p.grad`` from its ZO estimates (the
bridge to ``torch.optim``). This is the library's torch layer: the schedulers, the staged models and
the trainer build on it, and it depends only on the core (``zoblackbox.adapters.torch_module`` is
the old import path and re-exports it).

The module is treated as a black box that can be *evaluated* at any parameter values: every query
goes through ``torch.func.functional_call`` with the perturbed tensors, so the module itself is
never perturbed in place (no perturb-and-restore drift) and no ``state_dict`` is swapped. Batches
of queries are evaluated in one vectorized call (``torch.func.vmap``) when the model allows it.

BatchNorm during queries (``bn_policy``):

* ``"batch"`` (default): queries normalize with the statistics of the current data batch, exactly
  as a training-mode forward does, but do **not** update the running statistics (one update per
  query would make the model drift with every query). :meth:`ModuleOracle.update_bn_stats`
  performs the single update per step at the unperturbed parameters.
* ``"eval"``: queries use the frozen running statistics (``model.eval()``).

Dropout and other train-time randomness are off during queries (finite differences of two noisy
forwards would be noise).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from ._types import ArrayLike, CoordsLike, SchedulerLike
from .errors import ConfigError
from .estimators import CoordinateEstimator, Estimate, Estimator
from .oracle import Oracle
from .params import ParamLayout

__all__ = ["BN_POLICIES", "ModuleOracle", "ZOGradient", "resolve_params"]

BN_POLICIES = ("batch", "eval")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def resolve_params(model: nn.Module, params=None) -> list[tuple[str, torch.Tensor]]:
    """The (name, parameter) pairs an oracle optimizes: all trainable ones, or the chosen subset.

    ``params`` may be ``None``, an iterable of names, or an iterable of the module's parameters.
    """
    named = list(model.named_parameters())
    chosen: list[tuple[str, torch.Tensor]]
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        params = list(params)
        if not params:
            raise ConfigError("params selects no parameter; pass None for all trainable parameters")
        by_name = dict(named)
        by_id = {id(p): n for n, p in named}
        chosen = []
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ConfigError(f"the model has no parameter named {item!r}; known: {list(by_name)}")
                chosen.append((item, by_name[item]))
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                chosen.append((by_id[id(item)], item))
            else:
                raise ConfigError(f"params items must be parameter names or the model's parameters, got {item!r}")
        order = {n: i for i, (n, _) in enumerate(named)}
        chosen = sorted(dict(chosen).items(), key=lambda kv: order[kv[0]])
    if not chosen:
        raise ConfigError("the model has no trainable parameters")
    return chosen


class ModuleOracle(Oracle):
    """A torch module's loss as an oracle: ``x -> loss_fn(model(inputs; params=x), targets)``.

    The flat vector ``x`` holds the chosen parameters (``layout``, a :class:`~zoblackbox.ParamLayout`);
    queries use ``torch.func.functional_call`` on the current batch, so the module itself is never
    perturbed in place.

    Parameters
    ----------
    model : torch.nn.Module
        Any module.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar tensor`` (e.g. ``nn.functional.cross_entropy``).
    params : iterable of str or of torch.nn.Parameter, or None, default None
        The parameters the vector ``x`` holds (names or parameters); ``None``: all trainable ones.
    batch : tuple or None, default None
        ``(inputs, targets)``; set or change it with :meth:`set_batch`.
    bn_policy : {"batch", "eval"}, default "batch"
        BatchNorm during queries: batch statistics (``"batch"``, as in training) or the running
        statistics (``"eval"``); see :data:`BN_POLICIES`.
    vectorize : bool or "auto", default "auto"
        Evaluate query batches with ``vmap`` (falls back to a loop, with a warning, if the model
        cannot be vmapped). ``"auto"`` vmaps on accelerators and loops on the CPU, where a plain
        loop of ordinary forwards measured faster for small CNNs (the fast CPU paths are the
        schedulers in ``zoblackbox.schedule``).
    chunk_size : int, default 128
        Queries per vectorized call, ``>= 1`` (bounds memory: activations scale with
        ``chunk_size * batch size``).
    **kwargs
        ``budget`` and ``on_failure`` as in :class:`~zoblackbox.Oracle`.

    Raises
    ------
    TypeError
        ``model`` is not a module, or ``loss_fn`` is not callable.
    ConfigError
        An unknown ``bn_policy`` or ``vectorize``, ``chunk_size`` not an int ``>= 1``, ``params``
        selecting nothing or naming a parameter the model does not have, or a bad ``budget`` or
        ``on_failure``.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from zoblackbox.adapters import ModuleOracle
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(4, 3)
    >>> inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> oracle = ModuleOracle(model, F.cross_entropy, batch=(inputs, targets))
    >>> oracle.dim, oracle.param_names
    (15, ('weight', 'bias'))
    >>> x = oracle.get_params()
    >>> abs(oracle(x) - F.cross_entropy(model(inputs), targets).item()) < 1e-6
    True
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, params: Iterable | None = None, *,
                 batch: Sequence | None = None, bn_policy: str = "batch", vectorize: bool | str = "auto",
                 chunk_size: int = 128, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if bn_policy not in BN_POLICIES:
            raise ConfigError(f"bn_policy must be one of {BN_POLICIES}, got {bn_policy!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        chosen = resolve_params(model, params)
        self.model = model
        self.loss_fn = loss_fn
        self.layout = ParamLayout.from_tensors([(n, p) for n, p in chosen])
        first = chosen[0][1]
        super().__init__(self.layout.dim, dtype=first.dtype, device=first.device, **kwargs)
        self.bn_policy = bn_policy
        if vectorize not in (True, False, "auto"):
            raise ConfigError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
        self.vectorize = (self.device.type != "cpu") if vectorize == "auto" else vectorize
        self.chunk_size = chunk_size
        self.aux_forwards = 0  # forwards that are not loss queries (BatchNorm statistics updates)
        self._batch: tuple | None = None
        if batch is not None:
            self.set_batch(*batch)

    # ------------------------------------------------------------------ parameters and data
    @property
    def param_names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def batch(self) -> tuple | None:
        """The current ``(inputs, targets)``, or ``None`` before :meth:`set_batch`."""
        return self._batch

    def set_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """The data batch the loss is computed on (moved to the parameters' device)."""
        self._batch = (_to(inputs, self.device), _to(targets, self.device))

    def get_params(self) -> torch.Tensor:
        """The module's current values of the chosen parameters as a flat vector."""
        named = dict(self.model.named_parameters())
        return self.layout.flatten({n: named[n] for n in self.layout.names})

    def set_params(self, x: ArrayLike) -> None:
        """Copy the flat vector ``x`` into the module's parameters."""
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in self.layout.unflatten(torch.as_tensor(x, device=self.device, dtype=self.dtype)).items():
                named[n].copy_(t)

    # ------------------------------------------------------------------ evaluation
    def _loss(self, tensors: dict, inputs, targets):
        return self.loss_fn(functional_call(self.model, tensors, (inputs,)), targets)

    def reserve(self, n: int) -> None:
        if self._batch is None:  # a usage error, raised before any query rather than as a failure
            raise ConfigError("ModuleOracle has no data batch; call set_batch(inputs, targets) first")
        super().reserve(n)

    def _evaluate_batch(self, X: torch.Tensor) -> torch.Tensor:
        if self._batch is None:  # reserve() refuses this before a query; a direct call gets the same error
            raise ConfigError("ModuleOracle has no data batch; call set_batch(inputs, targets) first")
        inputs, targets = self._batch
        with self.query_mode():
            if self.vectorize:
                try:
                    return self._vmapped(X, inputs, targets)
                except RuntimeError as exc:
                    if "vmap" not in str(exc) and "functorch" not in str(exc) and "batched" not in str(exc):
                        raise
                    warnings.warn(f"model cannot be vmapped ({exc}); evaluating queries one by one", stacklevel=2)
                    self.vectorize = False
            return torch.stack([self._loss(self.layout.unflatten(x), inputs, targets) for x in X])

    def _vmapped(self, X, inputs, targets):
        batched = self.layout.unflatten_batch(X)
        fn = vmap(lambda p: self._loss(p, inputs, targets), chunk_size=self.chunk_size)
        return fn(batched)

    @contextlib.contextmanager
    def query_mode(self) -> Iterator[None]:
        """Modules in query mode: dropout off; BatchNorm per ``bn_policy``, running stats untouched."""
        modes = {m: m.training for m in self.model.modules()}
        tracking = {}
        try:
            self.model.eval()
            if self.bn_policy == "batch":
                for m in self.model.modules():
                    if isinstance(m, _BN_TYPES):
                        tracking[m] = m.track_running_stats
                        m.train()
                        m.track_running_stats = False  # batch statistics, no running-stat update
            yield
        finally:
            for m, t in tracking.items():
                m.track_running_stats = t
            for m, training in modes.items():
                m.training = training

    def has_batchnorm(self) -> bool:
        return any(isinstance(m, _BN_TYPES) for m in self.model.modules())

    def update_bn_stats(self, x: torch.Tensor | None = None) -> None:
        """One training-mode forward at ``x`` (default: the module's values) to update BatchNorm
        running statistics; a no-op for models without BatchNorm or with ``bn_policy="eval"``."""
        if self.bn_policy != "batch" or not self.has_batchnorm() or self._batch is None:
            return
        x = self.get_params() if x is None else x
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            for m in self.model.modules():
                if isinstance(m, _BN_TYPES):
                    m.train()
            with torch.no_grad():
                functional_call(self.model, self.layout.unflatten(x), (self._batch[0],))
            self.aux_forwards += 1
        finally:
            for m, training in modes.items():
                m.training = training


class ZOGradient:
    """Fill ``p.grad`` of a module's parameters with a zeroth-order estimate.

    The ZO counterpart of ``loss.backward()``: the model is queried as a black box through a
    :class:`~zoblackbox.adapters.ModuleOracle` (``functional_call``, never an in-place perturbation), and the estimate is *accumulated* into ``p.grad`` as autograd would, so any
    ``torch.optim`` optimizer, gradient clipping and LR scheduler work unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        The module.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar tensor``.
    estimator : Estimator or None, default None
        The gradient estimator (``None``: ``CoordinateEstimator()``).
    params : iterable of str or of torch.nn.Parameter, or None, default None
        Parameter names or parameters to estimate (``None``: all trainable).
    bn_policy : {"batch", "eval"}, default "batch"
        BatchNorm handling during queries.
    scheduler : zoblackbox.schedule.Scheduler or None, default None
        Evaluates query plans (``zoblackbox.schedule``); default: the oracle itself.
    **oracle_kwargs
        Passed to the :class:`~zoblackbox.adapters.ModuleOracle` (``chunk_size``, ``budget``,
        ``on_failure``, ``vectorize``).

    Raises
    ------
    TypeError
        ``estimator`` is not an :class:`Estimator`, or as :class:`~zoblackbox.adapters.ModuleOracle`.
    ConfigError
        As :class:`~zoblackbox.adapters.ModuleOracle` (``bn_policy``, ``params``, ``budget``...).

    Examples
    --------
    One ZO step of a torch optimizer on a small regression:

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from zoblackbox import RandomEstimator, ZOGradient
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 1)
    >>> inputs = torch.randn(32, 3)
    >>> targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5]])
    >>> zo = ZOGradient(model, F.mse_loss, estimator=RandomEstimator(q=8, seed=0))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> losses = []
    >>> for _ in range(60):
    ...     optimizer.zero_grad()
    ...     losses.append(zo.backward(inputs, targets))
    ...     optimizer.step()
    >>> zo.nfev, bool(losses[-1] < 0.5 * losses[0])
    (540, True)
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, estimator: Estimator | None = None,
                 params: Iterable | None = None, bn_policy: str = "batch", scheduler: SchedulerLike | None = None,
                 **oracle_kwargs):
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

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                 coords: CoordsLike | None = None) -> float | None:
        """Estimate the gradient on this batch and accumulate it into ``p.grad``.

        Parameters
        ----------
        inputs : torch.Tensor
            The batch's inputs.
        targets : torch.Tensor
            The batch's targets.
        coords : array_like or None, default None
            Coordinates of the flat parameter vector to estimate (``None``: all).

        Returns
        -------
        float or None
            The loss at the current parameters (``None`` for schemes that do not query it).
        """
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


def _to(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t
