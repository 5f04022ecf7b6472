"""Staged models: f = loss ∘ stage_L ∘ … ∘ stage_1, each stage owning one block of parameters.

Perturbing a parameter of stage k leaves the outputs of stages 1..k-1 unchanged, so a scheduler
can compute them once per step at the base point and run only stages k..L for the queries that
perturb stage k (feature reuse, DeepZero Sec. 4; :class:`~zoblackbox.schedule.FeatureReuseScheduler`).

How a model is staged (:meth:`Staging.from_model`):

* ``nn.Sequential`` (nested ones are flattened): every module with optimized parameters starts a
  stage; parameter-free modules (activations, pooling, ``Flatten``) join the stage before them
  (leading ones join the first stage).
* :class:`StagedModel`: each child is exactly one stage, whatever it contains (a residual block,
  a sub-network) -- the way to stage a model whose forward is not a plain chain of layers.
* :class:`Residual` (``activation(body(x) + shortcut(x))``), at the top or inside the above: unrolled,
  so reuse can restart inside the block.
* any other module that ``torch.fx.symbolic_trace`` accepts: staged from its graph
  (:mod:`zoblackbox.staged_fx`): every leaf module or ``get_attr`` parameter with optimized
  parameters starts a stage; residual branches and other values that stay live across layers are
  carried along. A module that cannot be traced or staged that way (data-dependent control flow,
  shared weights, an in-place write into a value used later) is a single stage -- a plain black
  box -- and a :class:`StagingWarning` says why.

Each stage runs as a chain of *units*: the modules of a flattened ``nn.Sequential``, the entry,
body and merge of a :class:`Residual`, the layers and graph segments of a traced module, or one
opaque module. Reuse restarts at the unit a query
perturbs. Units of a known kind (``Linear``, ``Conv2d``, ``BatchNorm``, elementwise activations,
pooling, ``Flatten``) let it go further: their outputs for many perturbed coordinates are formed
from the cached input plus an explicit delta (:mod:`zoblackbox.schedule.reuse`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import ConfigError
from .params import ParamLayout
from .torch_module import ModuleOracle

__all__ = ["Residual", "Stage", "StagedModel", "StagedOracle", "Staging", "StagingWarning", "Unit", "staging_of",
           "unit_kind"]


class StagingWarning(UserWarning):
    """A module could not be staged automatically and runs as one stage (no feature reuse).

    The message names the reason: the ``torch.fx`` error for a forward that cannot be traced
    (data-dependent control flow), shared or tied weights, an in-place write into a value that is
    used afterwards, or a traced graph that does not reproduce the module's output. Every query is
    still answered exactly; only the speed-up of feature reuse is lost.
    """

# Parameter-free modules that act on every element independently (in query mode dropout is off).
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
# Pooling acts on every channel independently.
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class StagedModel(nn.Sequential):
    """A model written as an explicit list of stages: ``forward(x) = stage_L(…stage_1(x))``.

    Unlike a plain ``nn.Sequential`` (which is split at every layer with parameters), each child
    is exactly one stage, so a stage may be any module -- a residual block, an attention layer --
    as long as the model is the composition of its stages in order. Inside a stage, an
    ``nn.Sequential`` or :class:`Residual` child is still unrolled into units (reuse may restart
    inside it); any other module runs whole.

    Args:
        stages: the stage modules in forward order, or an ordered mapping ``name -> module``.

    Example:
        >>> model = StagedModel({"features": nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
        ...                      "classifier": nn.Linear(8, 2)})
    """

    def __init__(self, stages: Sequence[nn.Module] | Mapping[str, nn.Module]):
        items = list(stages.items()) if isinstance(stages, Mapping) else [(str(i), m) for i, m in enumerate(stages)]
        if not items:
            raise ConfigError("a StagedModel needs at least one stage")
        for name, module in items:
            if not isinstance(module, nn.Module):
                raise TypeError(f"stage {name!r} must be an nn.Module, got {type(module).__name__}")
        super().__init__(OrderedDict(items))


class Residual(nn.Module):
    """``activation(body(x) + shortcut(x))``: a residual block that staging can look into.

    Feature reuse treats a plain module as one opaque unit; a ``Residual`` is unrolled instead --
    an entry that remembers ``x``, the modules of ``body`` (an ``nn.Sequential`` is flattened),
    and a merge that adds ``shortcut(x)`` and applies ``activation`` -- so a query that perturbs
    a layer of the body restarts at that layer, with explicit deltas where the layer allows.

    Args:
        body: the main branch.
        shortcut: the skip branch (default: identity); its parameters belong to the merge.
        activation: applied after the sum (default: none).
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, activation: nn.Module | None = None):
        super().__init__()
        for name, m in (("body", body), ("shortcut", shortcut), ("activation", activation)):
            if m is not None and not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module or None, got {type(m).__name__}")
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.body(x) + self.shortcut(x))

    def apply_shortcut(self, x, params: Mapping[str, torch.Tensor]):
        """``shortcut(x)`` with the parameters in ``params`` (local names ``"shortcut.*"``)."""
        return _call_part(self.shortcut, "shortcut.", x, params)

    def apply_activation(self, h, params: Mapping[str, torch.Tensor]):
        """``activation(h)`` with the parameters in ``params`` (local names ``"activation.*"``)."""
        return _call_part(self.activation, "activation.", h, params)


@dataclass(frozen=True)
class Unit:
    """One module of the staged chain, evaluated on explicitly given parameter tensors.

    Attributes:
        name: the module's path in the model (``"3"``, ``"stem.0"``; ``""`` for the whole model).
        module: the module.
        params: ``(local name, layout name)`` of the optimized parameters it owns.
        kind: ``"linear"``, ``"conv"``, ``"batchnorm"``, ``"elementwise"``, ``"pool"``,
            ``"flatten"``, ``"enter"``/``"merge"`` (the two ends of a :class:`Residual`), ``"fx"``
            (a segment of a traced module's graph, :class:`zoblackbox.staged_fx.Segment`) or
            ``"opaque"`` (anything else: run as a black box).
        stage: index of the stage the unit belongs to.
    """

    name: str
    # an nn.Module; typed Any because the code reads the attributes of the layer its ``kind`` names
    # (a Linear's in_features, a Conv's stride, a Residual's shortcut), which nn.Module does not declare
    module: Any
    params: tuple[tuple[str, str], ...]
    kind: str
    stage: int

    @property
    def inplace(self) -> bool:
        return bool(getattr(self.module, "inplace", False))

    def tensor(self, local: str, params: Mapping[str, torch.Tensor]) -> Any:
        """The unit's parameter ``local`` at the given values (frozen ones from the module; a tensor, or
        ``None`` for a module without that parameter, e.g. ``bias=False``)."""
        return params[local] if local in params else getattr(self.module, local)

    def __call__(self, h, params: Mapping[str, torch.Tensor]):
        """The unit's output for input ``h`` with parameters ``params`` (``local name -> tensor``)."""
        m: Any = self.module  # a Linear, Conv or BatchNorm by ``kind``: its attributes are read below
        if self.kind == "linear":
            return F.linear(h, self.tensor("weight", params), self.tensor("bias", params))
        if self.kind == "conv":
            conv = _CONV_FN[type(m)]
            return conv(h, self.tensor("weight", params), self.tensor("bias", params), m.stride, m.padding,
                        m.dilation, m.groups)
        if self.kind == "batchnorm" and not (m.training and m.track_running_stats):
            use_batch_stats = m.training or (m.running_mean is None and m.running_var is None)
            mean, var = (None, None) if m.training else (m.running_mean, m.running_var)
            return F.batch_norm(h, mean, var, self.tensor("weight", params), self.tensor("bias", params),
                                use_batch_stats, 0.0, m.eps)
        if self.kind in ("enter", "merge", "fx"):
            raise TypeError(f"the {self.kind} unit {self.name!r} is run with Unit.step")
        if not params:
            return m(h)
        return functional_call(m, dict(params), (h,))

    def step(self, h, params: Mapping[str, torch.Tensor], skips: list):
        """The unit's output for input ``h``; ``params`` maps layout names to tensors, ``skips`` is
        the stack of the inputs of the residual blocks open here (an entry pushes, a merge pops)."""
        local = {lo: params[full] for lo, full in self.params if full in params}
        if self.kind == "enter":
            skips.append(h)
            return h
        if self.kind == "merge":
            block: Any = self.module  # a Residual
            return block.apply_activation(h + block.apply_shortcut(skips.pop(), local), local)
        if self.kind == "fx":  # reads and rewrites the live values in ``skips`` itself
            return self.module.step(h, local, skips)
        return self(h, local)


def _call_part(module: nn.Module, prefix: str, h, params: Mapping[str, torch.Tensor]):
    own = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    return functional_call(module, own, (h,)) if own else module(h)


_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


@dataclass(frozen=True)
class Stage:
    """A parameter block and the units that compute it."""

    name: str
    units: tuple[int, ...]
    param_names: tuple[str, ...]
    numel: int


class Staging:
    """A model as a chain of units grouped into stages, with the map from coordinates to units.

    Build it with :meth:`from_model`; schedulers read it, nothing in it changes afterwards (but
    ``checked``, set once a traced staging was compared with the model's own forward).
    ``traced`` says whether it came from a ``torch.fx`` graph (:mod:`zoblackbox.staged_fx`), and
    ``reason`` why a model is a single stage (``""`` otherwise).
    """

    def __init__(self, units: Sequence[Unit], stages: Sequence[Stage], layout: ParamLayout, reason: str = "",
                 enclosing: Sequence[tuple[int, ...]] | None = None):
        self.units = tuple(units)
        self.stages = tuple(stages)
        self.layout = layout
        self.reason = reason  # why a model fell back to a single stage ("" otherwise)
        self.traced = enclosing is not None  # staged from a torch.fx graph (checked once against the model)
        self.checked = False
        owner = {full: u for u, unit in enumerate(self.units) for _, full in unit.params}
        self.tensor_unit = tuple(owner[name] for name in layout.names)
        if enclosing is not None:  # a traced module: the live values at each unit's input, given
            self.enclosing = tuple(tuple(e) for e in enclosing)
            return
        open_blocks: list[int] = []
        enclosing = []  # per unit: the entries of the residual blocks open at its input
        for u, unit in enumerate(self.units):
            enclosing.append(tuple(open_blocks))
            if unit.kind == "enter":
                open_blocks.append(u)
            elif unit.kind == "merge":
                open_blocks.pop()
        self.enclosing = tuple(enclosing)

    def run(self, h, params: Mapping[str, torch.Tensor], start: int = 0, stop: int | None = None,
            skips: Sequence = ()):
        """Output of units ``start..stop-1`` for input ``h``.

        Args:
            params: layout name -> tensor (missing ones: the module's own values).
            skips: the live values at ``start``: the inputs of the units ``enclosing[start]`` (of a
                Residual: the inputs of the blocks open there, outermost first).
        """
        stack = list(skips)
        for v in range(start, len(self.units) if stop is None else stop):
            h = self.units[v].step(h, params, stack)
        return h

    @classmethod
    def from_model(cls, model: nn.Module, layout: ParamLayout) -> Staging:
        """Stage ``model`` (module docstring) for the parameters of ``layout``.

        Any other module is traced with ``torch.fx`` in its current mode (:func:`staging_of` and
        :class:`StagedOracle` trace in the oracle's query mode); if that fails, it is one stage and a
        :class:`StagingWarning` names the reason (also kept in :attr:`reason`).

        Raises:
            ConfigError: a :class:`StagedModel` whose stages share a parameter, or that has
                optimized parameters outside its stages; a module whose forward needs more than
                one input.
        """
        if isinstance(model, StagedModel):
            groups = [(name, list(_chain(child, name))) for name, child in _applied(model)]
            staging, problem = _build(model, layout, groups)
            if problem:
                raise ConfigError(f"cannot stage the StagedModel: {problem}")
            assert staging is not None  # _build returns a staging or a problem
            return staging
        if type(model) in (nn.Sequential, Residual):
            staging, problem = _build(model, layout, _split_at_params(list(_chain(model, "")), model, layout))
            if not problem:
                assert staging is not None
                return staging
            reason = f"staged as one block: {problem}"
        else:
            from .staged_fx import NotStaged, fx_staging

            try:
                return fx_staging(model, layout)
            except NotStaged as exc:
                reason = f"{type(model).__name__} is staged as one block (no feature reuse): {exc}"
                warnings.warn(reason, StagingWarning, stacklevel=2)
        staging, problem = _build(model, layout, [("model", [("", model, None)])])
        assert staging is not None, problem  # one block holds every parameter
        staging.reason = reason
        return staging

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def unit_of(self, coords: torch.Tensor) -> torch.Tensor:
        """Index of the unit owning each flat coordinate."""
        table = torch.tensor(self.tensor_unit, dtype=torch.long, device=coords.device)
        return table[self.layout.block_index(coords)]

    def stage_of(self, coords: torch.Tensor) -> torch.Tensor:
        """Index of the stage owning each flat coordinate."""
        table = torch.tensor([u.stage for u in self.units], dtype=torch.long, device=coords.device)
        return table[self.unit_of(coords)]

    def summary(self) -> list[dict]:
        """One row per stage: name, units (with their kinds) and parameter count."""
        return [{"stage": s.name, "params": s.numel,
                 "units": [f"{self.units[u].name or 'model'}:{self.units[u].kind}" for u in s.units]}
                for s in self.stages]

    def __repr__(self) -> str:
        return f"Staging({self.num_stages} stages, {len(self.units)} units, {self.layout.dim} parameters)"


def _chain(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str | None]]:
    """``(path, module, role)`` of the modules a (nested) plain ``nn.Sequential`` or
    :class:`Residual` applies in order; ``role`` is ``"enter"``/``"merge"`` for a Residual's ends."""
    if type(module) is nn.Sequential:
        for name, child in _applied(module):
            yield from _chain(child, f"{prefix}.{name}" if prefix else name)
    elif type(module) is Residual:
        yield prefix, module, "enter"
        yield from _chain(module.body, f"{prefix}.body" if prefix else "body")
        yield prefix, module, "merge"
    else:
        yield prefix, module, None


def _applied(seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs a Sequential applies, in order -- a module used twice appears
    twice (``named_children`` would list it once)."""
    return list(seq._modules.items())


def _optimized_params(module: nn.Module, ids: Mapping[int, str], role: str | None = None) -> list[tuple[str, str]]:
    """``(local name, layout name)`` of the optimized parameters a unit owns."""
    if role == "enter":
        return []
    if role == "merge":  # the body's parameters belong to the body's units
        return [(f"{part}.{local}", full) for part in ("shortcut", "activation")
                for local, full in _optimized_params(getattr(module, part), ids)]
    return [(local, ids[id(p)]) for local, p in module.named_parameters() if id(p) in ids]


def _split_at_params(chain, model, layout) -> list[tuple[str, list]]:
    """Groups of a Sequential chain: each module with optimized parameters starts a stage."""
    ids = _layout_ids(model, layout)
    groups: list[tuple[str, list]] = []
    pending: list = []  # parameter-free modules before the first parameterized one
    for item in chain:
        if _optimized_params(item[1], ids, item[2]):
            groups.append((item[0], pending + [item]))
            pending = []
        elif groups:
            groups[-1][1].append(item)
        else:
            pending.append(item)
    if pending:  # a chain without any optimized parameter cannot occur for an oracle; keep it whole
        groups.append(("0", pending))
    return groups


def _layout_ids(model: nn.Module, layout: ParamLayout) -> dict[int, str]:
    wanted = set(layout.names)
    return {id(p): n for n, p in model.named_parameters() if n in wanted}


def _build(model, layout, groups) -> tuple[Staging | None, str]:
    """Units and stages from ``(stage name, [(unit path, module, role), ...])`` groups; a problem or ''."""
    ids = _layout_ids(model, layout)
    units: list[Unit] = []
    stages: list[Stage] = []
    seen: dict[str, str] = {}
    for s, (stage_name, members) in enumerate(groups):
        first = len(units)
        for path, module, role in members:
            params = tuple(_optimized_params(module, ids, role))
            for _, full in params:
                if full in seen:
                    return None, f"parameter {full!r} is used by both {seen[full]!r} and {path!r}"
                seen[full] = path
            units.append(Unit(path, module, params, role or unit_kind(module), s))
        names = tuple(full for u in units[first:] for _, full in u.params)
        numel = sum(layout.numels[layout.names.index(n)] for n in names)
        stages.append(Stage(stage_name, tuple(range(first, len(units))), names, numel))
    missing = [n for n in layout.names if n not in seen]
    if missing:
        return None, f"parameters {missing} are not used by any stage module"
    return Staging(units, stages, layout), ""


def unit_kind(m: nn.Module) -> str:
    """The kind of unit a module is (see :class:`Unit`); exact types only, subclasses are opaque."""
    t = type(m)
    if t is nn.Linear:
        return "linear"
    if t in _CONVS:
        return "conv" if m.padding_mode == "zeros" else "opaque"
    if t in _BATCHNORMS:
        return "batchnorm"
    if t in _ELEMENTWISE:
        return "elementwise"
    if t in _POOLS:
        return "opaque" if getattr(m, "return_indices", False) else "pool"
    if t is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
        return "flatten"
    return "opaque"


_STAGINGS: WeakKeyDictionary = WeakKeyDictionary()


def staging_of(oracle) -> Staging | None:
    """The staging of an oracle whose answer is its module's forward, else ``None``.

    A :class:`StagedOracle` carries its own; a plain :class:`~zoblackbox.torch_module.ModuleOracle` is
    staged on first use (and remembered). Oracles of other kinds -- and ``ModuleOracle``
    subclasses that change how a query is evaluated -- are black boxes to the scheduler.
    """
    oracle = getattr(oracle, "unwrapped", oracle)  # the engine's counting view: stage the oracle it wraps
    if not is_plain_module_oracle(oracle):
        return None
    if isinstance(oracle, StagedOracle):
        oracle.staging = _checked(oracle.staging, oracle)
        return oracle.staging
    if oracle not in _STAGINGS:
        with oracle.query_mode():  # traced as queries run: dropout off, BatchNorm per bn_policy
            _STAGINGS[oracle] = Staging.from_model(oracle.model, oracle.layout)
    _STAGINGS[oracle] = _checked(_STAGINGS[oracle], oracle)
    return _STAGINGS[oracle]


def _checked(staging: Staging, oracle) -> Staging:
    """``staging``, or the one-stage staging (with a :class:`StagingWarning`) if a traced graph does
    not reproduce the model's output on the oracle's batch (checked once, when a batch is set)."""
    if not staging.traced or staging.checked or oracle.batch is None:
        return staging
    model, inputs = oracle.model, oracle.batch[0]
    params = dict(model.named_parameters())
    base = {n: params[n] for n in oracle.layout.names}
    problem = ""
    with torch.no_grad(), oracle.query_mode():
        try:
            expected = model(inputs)
        except Exception:  # noqa: BLE001 - the model itself fails: every query fails on its own
            return staging
        try:
            got = staging.run(inputs, base)
        except Exception as exc:  # noqa: BLE001 - any failure of the traced graph means: do not use it
            problem = f"the traced graph fails ({type(exc).__name__}: {exc})"
        else:
            problem = _output_difference(got, expected)
    if not problem:
        staging.checked = True
        return staging
    reason = f"{type(model).__name__} is staged as one block (no feature reuse): {problem}"
    warnings.warn(reason, StagingWarning, stacklevel=3)
    fallback, _ = _build(model, oracle.layout, [("model", [("", model, None)])])
    assert fallback is not None  # one block holds every parameter
    fallback.reason = reason
    return fallback


def _output_difference(got, expected) -> str:
    """Why the traced graph's output ``got`` is not the model's ``expected`` ('' if it is, to rounding)."""
    if not isinstance(expected, torch.Tensor):
        return f"the model returns {type(expected).__name__}, not a tensor"
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        return "the traced graph's output has another type or shape than the model's"
    finite = expected.isfinite()
    if not torch.equal(got.isfinite(), finite) or not torch.equal(got.isinf(), expected.isinf()) or not torch.equal(
            got[expected.isinf()], expected[expected.isinf()]):
        return "the traced graph's output differs from the model's (where it is not finite)"
    scale = float(expected[finite].abs().max()) if bool(finite.any()) else 0.0
    tol = 64 * torch.finfo(expected.dtype).eps * (1.0 + scale) if expected.is_floating_point() else 0.0
    diff = float((got[finite] - expected[finite]).abs().max()) if bool(finite.any()) else 0.0
    if diff > tol:
        return (f"the traced graph's output differs from the model's by {diff:.3g} (the forward depends on "
                "something the trace fixed, e.g. an in-place update or a Python attribute)")
    return ""


def is_plain_module_oracle(oracle) -> bool:
    """Whether ``oracle`` is a ``ModuleOracle`` whose loss is ``loss_fn(model(inputs), targets)`` (looking
    through the engine's counting view, whose queries are the wrapped oracle's)."""
    oracle = getattr(oracle, "unwrapped", oracle)
    if not isinstance(oracle, ModuleOracle):
        return False
    cls = type(oracle)
    return cls._evaluate_batch is ModuleOracle._evaluate_batch and cls._loss is ModuleOracle._loss


class StagedOracle(ModuleOracle):
    """A :class:`~zoblackbox.torch_module.ModuleOracle` evaluated as a chain of stages.

    The answer of every query is exactly the module oracle's (same loss, same ``bn_policy``); the
    staging is computed once at construction so that a wrong staging fails early and
    :attr:`staging` can be inspected (``oracle.staging.summary()``). Any ``ModuleOracle`` also
    works with :class:`~zoblackbox.schedule.FeatureReuseScheduler` (it is staged on first use).

    Args:
        model: an ``nn.Sequential``, a :class:`StagedModel`, a :class:`Residual`, or any module
            (staged from its ``torch.fx`` graph; one stage where it cannot be traced).
        loss_fn, params, **kwargs: as in :class:`~zoblackbox.torch_module.ModuleOracle`.
    """

    def __init__(self, model: nn.Module, loss_fn, params=None, **kwargs):
        super().__init__(model, loss_fn, params, **kwargs)
        with self.query_mode():  # a traced module is traced as queries run
            staging = Staging.from_model(model, self.layout)
        self.staging = _checked(staging, self)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if self.staging.traced:  # fx graphs do not pickle: traced again when unpickled
            state["staging"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.staging is None:
            with self.query_mode():
                self.staging = Staging.from_model(self.model, self.layout)

    def __repr__(self) -> str:
        budget = "" if self.budget is None else f", budget={self.budget}"
        return f"StagedOracle(dim={self.dim}, stages={self.staging.num_stages}, nfev={self.nfev}{budget})"
