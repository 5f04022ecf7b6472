"""Automatic staging of an ordinary ``nn.Module`` from its ``torch.fx`` graph.

:meth:`zoblackbox.staged.Staging.from_model` calls :func:`fx_staging` for a module that is not an
``nn.Sequential``, :class:`~zoblackbox.staged.StagedModel` or :class:`~zoblackbox.staged.Residual`.
The module is traced with ``torch.fx.symbolic_trace`` and its graph is cut into a chain of units:

* **plain units**: a leaf module of a kind the reuse scheduler knows (``Linear``, ``Conv``,
  ``BatchNorm``, elementwise activations, pooling, ``Flatten``; also ``F.relu``, ``torch.flatten(x, 1)``
  and a few other functions of one tensor) applied to the *main* value -- the output of the unit
  before. These are exactly the units of a staged ``nn.Sequential``, so explicit deltas start and
  travel through them.
* **segment units** (kind ``"fx"``): a run of the other graph nodes (attention arithmetic, residual
  additions, ``cat``, reshapes, ``get_attr`` parameters such as a positional embedding, leaf modules
  like ``LayerNorm`` or ``Embedding``), or a *move* with no node that puts another live value in
  the main slot.

Values that stay live across units (the input of a residual block, the normalized tokens that feed
query, key and value, a shape read once and used later) travel in the units' ``skips`` list, the
mechanism :class:`~zoblackbox.staged.Residual` blocks use: at the input of unit ``u`` it holds, in a
fixed order, the values ``acts[e]`` for ``e in staging.enclosing[u]`` -- the inputs of earlier units,
which the reuse scheduler caches at the base point anyway. Only segment units read or rewrite that
list; a plain unit reads the main value alone and leaves the list alone, so a perturbation carried
as an explicit delta through plain units never has to be copied into a live value. Every segment's
nodes except its last are dead after the segment, so every value that is live at a cut is the
input of some earlier unit, and the cache of unit inputs is sufficient to restart anywhere.

Each unit that owns an optimized parameter (a leaf module's parameters, or a parameter read with
``get_attr``) starts a stage. A parameter used in two places (shared or tied weights), an in-place
operation on a value that is used afterwards, an untraceable forward (data-dependent control flow)
or any other problem stops the automatic staging; the caller then keeps the model as one stage and
warns with the reason.
"""

from __future__ import annotations

import builtins
import copy
import functools
import importlib
import inspect
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call, vmap
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from .errors import ConfigError
from .params import ParamLayout

__all__ = ["NotStaged", "fx_staging"]

# unit kinds that run as plain (main value in, main value out) units: the reuse fast paths
PLAIN_KINDS = ("linear", "conv", "batchnorm", "elementwise", "pool", "flatten")


class NotStaged(Exception):
    """The module cannot be staged automatically; ``str(exc)`` says why."""


# ----------------------------------------------------------------------------- graph analysis
_INPLACE_OPERATORS: dict[Callable, Callable] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.imatmul: operator.matmul, operator.iand: operator.and_,
    operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
    operator.irshift: operator.rshift,
}
# operations whose result may share memory with their first argument (a view, or the argument itself)
_ALIAS_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "expand_as", "narrow", "select", "unbind", "split", "chunk", "tensor_split",
    "split_with_sizes", "__getitem__", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "contiguous",
    "detach", "as_strided", "unfold", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu",
    "cuda", "requires_grad_", "view_as_real", "real", "imag",
})
_ALIAS_FUNCTIONS = frozenset({
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.select, torch.unbind, torch.split, torch.chunk, torch.tensor_split, torch.movedim,
    torch.moveaxis, torch.swapaxes, torch.swapdims, torch.diagonal, torch.t, torch.detach, torch.as_strided,
    torch.view_as_real, torch.view_as_complex, operator.getitem, builtins.getattr, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout,
})
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout)
# methods that return data-dependent Python values: the graph would bake them in or vmap cannot run them
_DATA_METHODS = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"})


def _is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` writes into its first argument."""
    if node.op == "call_function":
        t = node.target
        if t in _INPLACE_OPERATORS or t is operator.setitem:
            return True
        if node.kwargs.get("inplace") is True:
            return True
        name = getattr(t, "__name__", "")
        return (name.endswith("_") and not name.startswith("_")
                and getattr(t, "__module__", "") not in ("_operator", "operator", "builtins"))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")  # type: ignore[union-attr]
    if node.op == "call_module":
        return getattr(modules[str(node.target)], "inplace", False) is True
    return False


def _may_alias(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node``'s value may share memory with its first argument."""
    if _is_inplace(node, modules):
        return True
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _ALIAS_MODULES)
    return False


def _where(node: fx.Node) -> str:
    """A node for messages: ``call_module 'layer1.0.conv1'``, ``call_method 'add_' (add_3)``."""
    if node.op in ("call_module", "get_attr"):
        return f"{node.op} {str(node.target)!r}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {name!r} ({node.name})"


def _first_node(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, fx.Node) else None


def _inplace_problem(node: fx.Node, pos: Mapping[fx.Node, int], modules: Mapping[str, nn.Module]) -> str:
    """Why the in-place ``node`` cannot run out of place ('' if it can): the value it writes into (or
    a view of it) is read afterwards, or is the input, a parameter or a buffer."""
    target = _first_node(node)
    if target is None:
        return ""
    what = f"in-place operation {_where(node)}"
    if node.op == "call_function" and node.target is operator.setitem:
        return f"{what}: item assignment into {target.name!r} is not supported"
    group, stack = {target}, [target]
    while stack:  # the values that share memory with the written one, found before the write
        a = stack.pop()
        related = []
        if _may_alias(a, modules) and a is not node:
            related.append(_first_node(a))
        related += [u for u in a.users if u is not node and _may_alias(u, modules) and _first_node(u) is a]
        for r in related:
            if r is not None and r not in group:
                group.add(r)
                stack.append(r)
    for a in group:
        if a.op in ("placeholder", "get_attr"):
            return f"{what} writes into the model's input or one of its parameters or buffers ({a.name!r})"
        later = [u.name for u in a.users if u is not node and pos[u] > pos[node]]
        if later:
            return f"{what} writes into {a.name!r}, which is used afterwards by {later}"
    return ""


def _out_of_place(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[Any, dict]:
    """The out-of-place ``(target, kwargs)`` of an in-place node (its target and kwargs otherwise)."""
    t, kwargs = node.target, dict(node.kwargs)
    if not _is_inplace(node, modules):
        return t, kwargs
    if node.op == "call_module":
        return t, kwargs  # the module itself is replaced by a copy with inplace=False
    if kwargs.get("inplace") is True:
        kwargs["inplace"] = False
        return t, kwargs
    if node.op == "call_function":
        if t in _INPLACE_OPERATORS:
            return _INPLACE_OPERATORS[t], kwargs
        name = getattr(t, "__name__", "")
        try:
            return getattr(importlib.import_module(t.__module__), name[:-1]), kwargs
        except (AttributeError, ImportError, TypeError):
            raise NotStaged(f"in-place operation {_where(node)} has no out-of-place form") from None
    name = str(t)[:-1]
    if not hasattr(torch.Tensor, name):
        raise NotStaged(f"in-place method {_where(node)} has no out-of-place form")
    return name, kwargs


def _not_inplace(module: nn.Module) -> nn.Module:
    if getattr(module, "inplace", False) is True:
        module = copy.copy(module)
        module.inplace = False  # type: ignore[assignment]
    return module


def _plain_module(node: fx.Node, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    """The module a plain unit runs for ``node`` (one tensor in, one out, a known kind), or ``None``."""
    from .staged import unit_kind

    args, kwargs = node.args, node.kwargs
    if not args or not isinstance(args[0], fx.Node):
        return None
    if node.op == "call_module":
        m = modules[str(node.target)]
        if len(args) == 1 and not kwargs and unit_kind(m) in PLAIN_KINDS:
            return _not_inplace(m)
        return None
    rest = args[1:]
    if node.op == "call_function":
        t = node.target
        kw = {k: v for k, v in kwargs.items() if k != "inplace"}
        if t in (F.relu, torch.relu, torch.relu_, F.relu_) and not rest and not kw:
            return nn.ReLU()
        if t in (torch.tanh, F.tanh) and not rest and not kw:
            return nn.Tanh()
        if t in (torch.sigmoid, F.sigmoid) and not rest and not kw:
            return nn.Sigmoid()
        if t is F.silu and not rest and not kw:
            return nn.SiLU()
        if t is F.gelu and not rest and set(kw) <= {"approximate"} and isinstance(kw.get("approximate", ""), str):
            return nn.GELU(str(kw.get("approximate", "none")))
        if t is torch.flatten and (rest == (1,) and not kw or not rest and kw == {"start_dim": 1}):
            return nn.Flatten()
        if t is F.adaptive_avg_pool2d and len(rest) == 1 and not kw and isinstance(rest[0], (int, tuple)):
            return nn.AdaptiveAvgPool2d(rest[0])
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and not rest and not kwargs:
            return nn.ReLU()
        if node.target == "tanh" and not rest and not kwargs:
            return nn.Tanh()
        if node.target == "sigmoid" and not rest and not kwargs:
            return nn.Sigmoid()
        if node.target == "flatten" and (rest == (1,) and not kwargs or not rest and kwargs == {"start_dim": 1}):
            return nn.Flatten()
    return None


def _fetch(root: nn.Module, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), root)


def _has(root: nn.Module, target: str) -> bool:
    try:
        _fetch(root, target)
    except AttributeError:
        return False
    return True


# ----------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """fx's tracer, with buffers as graph values (``self.mask[:, :T]`` with a traced ``T`` works, and
    buffers are read from the module at run time rather than fixed in the graph)."""

    proxy_buffer_attributes = True


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` for a forward of one input (other arguments: their defaults).

    Raises:
        ConfigError: the forward needs more than one input (a module oracle passes one).
        NotStaged: the forward takes ``*args``/``**kwargs`` or fx cannot trace it.
    """
    name = type(model).__name__
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError) as exc:
        raise NotStaged(f"the signature of {name}.forward is unknown ({exc})") from None
    params = list(sig.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise NotStaged(f"{name}.forward takes *args or **kwargs")
    required = [p.name for p in params if p.default is p.empty]
    if not params or params[0].kind is params[0].KEYWORD_ONLY or len(required) > 1 or (
            required and required[0] != params[0].name):
        raise ConfigError(f"{name}.forward takes the inputs {[p.name for p in params]} ({len(required)} required); "
                          "a module oracle calls the model with one input (its batch's inputs): write a module "
                          "whose forward takes one tensor (or a tuple it unpacks itself)")
    concrete = {p.name: p.default for p in params[1:]}
    try:
        tracer = _Tracer()
        graph = tracer.trace(model, concrete_args=concrete or None)
        return fx.GraphModule(tracer.root, graph, name)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no automatic staging
        raise NotStaged(f"torch.fx cannot trace {name}: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------- the staging
def fx_staging(model: nn.Module, layout: ParamLayout):
    """The :class:`~zoblackbox.staged.Staging` of ``model`` from its fx graph (module docstring).

    Raises:
        ConfigError: the forward needs more than one input.
        NotStaged: the model cannot be staged automatically (the message says why).
    """
    from .staged import Stage, Staging, Unit, unit_kind

    gm = trace(model)
    graph = gm.graph
    modules = dict(gm.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    nodes = [n for n in graph.nodes if n.op != "output" and n is not placeholders[0]]
    if not isinstance(output.args[0], fx.Node):
        raise NotStaged(f"{type(model).__name__}.forward returns {type(output.args[0]).__name__}, not one tensor")
    pos = {n: i for i, n in enumerate(nodes)}
    pos[placeholders[0]] = -1
    pos[output] = len(nodes)
    last_use = {n: max((pos[u] for u in n.users), default=-1) for n in [placeholders[0], *nodes]}

    wanted = set(layout.names)
    ids = {id(p): n for n, p in model.named_parameters() if n in wanted}
    owned: dict[fx.Node, list[tuple[str, str]]] = {}
    owner: dict[str, fx.Node] = {}
    for node in nodes:
        if node.op == "call_method" and node.target in _DATA_METHODS:
            raise NotStaged(f"{_where(node)} reads a tensor's data into Python")
        if node.op == "call_module":
            mine = [(lo, ids[id(p)]) for lo, p in modules[str(node.target)].named_parameters() if id(p) in ids]
        elif node.op == "get_attr":
            obj = _fetch(gm, str(node.target))
            mine = [(str(node.target), ids[id(obj)])] if id(obj) in ids else []
        else:
            mine = []
        for _, full in mine:
            if full in owner:
                raise NotStaged(f"parameter {full!r} is used in two places ({_where(owner[full])} and "
                                f"{_where(node)}): shared or tied weights")
            owner[full] = node
        if mine:
            owned[node] = mine
        if _is_inplace(node, modules):
            problem = _inplace_problem(node, pos, modules)
            if problem:
                raise NotStaged(problem)
    unused = [n for n in layout.names if n not in owner]  # the forward never reads them

    specs: list[dict] = []  # per unit: kind, name, module or segment parts, params
    act_of = {placeholders[0]: 0}  # value -> the first unit whose input (main) it is
    state: dict[str, Any] = {"main": placeholders[0], "env": []}

    def emit(spec: dict, out: fx.Node, after: int) -> None:
        """Append a unit; ``after``: position of the first node whose reads decide what stays live."""
        main, env = state["main"], state["env"]
        spec["main"], spec["env_in"] = main, tuple(env)
        if spec["kind"] == "fx":
            keep = [n for n in dict.fromkeys([*env, main]) if last_use[n] >= after]
            spec["env_out"] = tuple(sorted(keep, key=lambda n: act_of[n]))
        else:
            spec["env_out"] = tuple(env)
        specs.append(spec)
        state["main"], state["env"] = out, list(spec["env_out"])
        act_of.setdefault(out, len(specs))

    def emit_segment(segment: list[fx.Node]) -> None:
        """Segment nodes as units whose inner values die inside them (split where they do not)."""
        start = 0
        while start < len(segment):
            end = start
            for stop in range(len(segment) - 1, start - 1, -1):  # the longest valid piece
                piece = segment[start:stop + 1]
                if all(last_use[n] <= pos[piece[-1]] for n in piece[:-1]):
                    end = stop
                    break
            piece = segment[start:end + 1]
            emit({"kind": "fx", "nodes": tuple(piece), "out": piece[-1],
                  "params": [p for n in piece for p in owned.get(n, [])]}, piece[-1], pos[piece[-1]] + 1)
            start = end + 1

    segment: list[fx.Node] = []
    for node in nodes:
        plain = _plain_module(node, modules)
        if plain is None:
            if node in owned and segment:
                emit_segment(segment)
                segment = []
            segment.append(node)
            continue
        if segment:
            emit_segment(segment)
            segment = []
        value = node.args[0]
        assert isinstance(value, fx.Node)  # _plain_module checked it
        if state["main"] is not value or (last_use[value] > pos[node] and value not in state["env"]):
            emit({"kind": "fx", "nodes": (), "out": value, "params": []}, value, pos[node] + 1)  # a move
        emit({"kind": unit_kind(plain), "module": plain, "name": str(node.target) if node.op == "call_module"
              else node.name, "params": owned.get(node, [])}, node, pos[node] + 1)
    if segment:
        emit_segment(segment)
    result = output.args[0]
    if state["main"] is not result:
        emit({"kind": "fx", "nodes": (), "out": result, "params": []}, result, len(nodes) + 1)
    if unused:  # owned by a last unit that passes the output on: perturbing them changes nothing
        emit({"kind": "fx", "nodes": (), "out": result, "params": [(n, n) for n in unused]}, result, len(nodes) + 1)

    units, stages, enclosing = [], [0], []  # stages: the first unit of each
    seen_params = False
    for u, spec in enumerate(specs):
        if spec["params"]:
            if seen_params:
                stages.append(u)  # a unit with parameters starts a stage; the ones before join the first
            seen_params = True
        stage = len(stages) - 1
        enclosing.append(tuple(act_of[n] for n in spec["env_in"]))
        if spec["kind"] == "fx":
            segment_module = Segment(gm, model, spec["nodes"], spec["out"], spec["main"], spec["env_in"],
                                     spec["env_out"], dict(owned), modules,
                                     "<unused parameters>" if spec["params"] and not spec["nodes"] else "")
            params = tuple((full, full) for _, full in spec["params"])
            units.append(Unit(segment_module.label, segment_module, params, "fx", stage))
        else:
            units.append(Unit(spec["name"], spec["module"], tuple(spec["params"]), spec["kind"], stage))
    out_stages = []
    for s, first in enumerate(stages):
        last = stages[s + 1] if s + 1 < len(stages) else len(units)
        members = tuple(range(first, last))
        names = tuple(full for u in members for _, full in units[u].params)
        numel = sum(layout.numels[layout.names.index(n)] for n in names)
        label = next((units[u].name for u in members if units[u].params), units[first].name)
        out_stages.append(Stage(label, members, names, numel))
    return Staging(units, out_stages, layout, enclosing=tuple(enclosing))


# ----------------------------------------------------------------------------- segment units
class _Stacked:
    """A live value of a stacked K-query forward that differs between queries: a pytree whose tensor
    leaves have a leading query dimension ``K``."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _tensor_leaves(value) -> tuple[list, Callable[[list], Any]]:
    """The tensor leaves of a pytree, and a function that puts other tensors in their places."""
    leaves, spec = pytree.tree_flatten(value)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def rebuild(tensors: list):
        out = list(leaves)
        for i, t in zip(where, tensors):
            out[i] = t
        return pytree.tree_unflatten(out, spec)

    return [leaves[i] for i in where], rebuild


def _to_main(t: torch.Tensor) -> torch.Tensor:
    """A ``(K, ...)`` tensor in the scheduler's stacked layout ``(K * B, ...)`` (``(K,)`` stays)."""
    return t.flatten(0, 1) if t.dim() >= 2 else t


class Segment(nn.Module):
    """A unit of kind ``"fx"``: some nodes of the traced graph, run on the main value and the live
    values of ``skips`` (see the module docstring); ``Unit.step`` calls :meth:`step`.

    With no node it is a *move*: its output is a live value (or the main value itself, kept live);
    the last unit may be a move that owns the parameters the forward never reads.
    """

    def __init__(self, gm: fx.GraphModule, model: nn.Module, nodes, out: fx.Node, main: fx.Node, env_in, env_out,
                 owned: Mapping[fx.Node, list[tuple[str, str]]], modules: Mapping[str, nn.Module],
                 label: str = ""):
        super().__init__()
        self.probe = nn.Identity()  # called on the largest tensor, so the scheduler's size hooks see it
        self.nodes, self.out, self.main = tuple(nodes), out, main
        self.env_in, self.env_out = tuple(env_in), tuple(env_out)
        inside = set(self.nodes)
        reads = {a for n in self.nodes for a in n.all_input_nodes if a not in inside}
        if not self.nodes:
            reads = {out}
        self.reads = tuple(n for n in (main, *self.env_in) if n in reads)
        self.ops = [self._compile(n, gm, model, owned.get(n, []), modules) for n in self.nodes]
        if self.nodes:
            self.label = self.nodes[0].name if len(self.nodes) == 1 else f"{self.nodes[0].name}..{self.nodes[-1].name}"
            first = self.nodes[0]
            if first in owned and first.op in ("call_module", "get_attr"):
                self.label = str(first.target)
        else:
            self.label = label or f"<{out.name}>"

    def extra_repr(self) -> str:
        return f"{self.label}: {len(self.nodes)} nodes"

    @staticmethod
    def _compile(node: fx.Node, gm, model, mine: list[tuple[str, str]], modules) -> Callable:
        """``run(values, params)`` for one node; ``values`` maps nodes to values, ``params`` layout
        names to tensors (missing ones: the module's own)."""
        target, kwargs = _out_of_place(node, modules)
        args = node.args

        def arg_values(values):
            return (map_arg(args, values.__getitem__), map_arg(kwargs, values.__getitem__))

        if node.op == "placeholder":  # an argument fixed to its default while tracing
            default = args[0] if args else None
            return lambda values, params: default
        if node.op == "get_attr":
            if mine:
                full = mine[0][1]
                root: nn.Module = model if _has(model, str(target)) else gm
                return lambda values, params: params[full] if full in params else _fetch(root, str(target))
            root = model if _has(model, str(target)) else gm
            return lambda values, params: _fetch(root, str(target))
        if node.op == "call_module":
            module = _not_inplace(modules[str(target)])

            def call_module(values, params):
                a, kw = arg_values(values)
                given = {lo: params[full] for lo, full in mine if full in params}
                return functional_call(module, given, a, kw) if given else module(*a, **kw)

            return call_module
        if node.op == "call_method":
            def call_method(values, params):
                a, kw = arg_values(values)
                return getattr(a[0], target)(*a[1:], **kw)

            return call_method

        def call_function(values, params):
            a, kw = arg_values(values)
            return target(*a, **kw)

        return call_function

    def _run(self, values: dict, params: Mapping[str, torch.Tensor]):
        largest = None
        for node, op in zip(self.nodes, self.ops):
            v = op(values, params)
            values[node] = v
            if isinstance(v, torch.Tensor) and (largest is None or v.numel() > largest.numel()):
                largest = v
        if largest is not None and self.probe._forward_hooks:
            self.probe(largest)
        return values[self.out]

    def step(self, h, params: Mapping[str, torch.Tensor], skips: list):
        """The segment's output for main value ``h``; ``skips`` holds the live values of ``env_in``
        and is rewritten to those of ``env_out``."""
        values = dict(zip(self.env_in, skips))
        values[self.main] = h
        out = self._run(values, params)
        skips[:] = [values[n] for n in self.env_out]
        return out

    def stacked_step(self, x, params: Mapping[str, torch.Tensor], skips: list, k: int, cached_in, cached_out):
        """:meth:`step` inside the reuse scheduler's stacked forward of ``k`` queries.

        ``x`` is the main value in the stacked layout (tensors ``(K * B, ...)``), ``skips`` holds
        values shared by all queries (cached) or :class:`_Stacked` ones; ``cached_in``/``cached_out``
        are the main value before and after this unit at the base point (their shapes are per query).
        The nodes run per query under ``vmap``; outputs without tensors (shapes) are the cached ones.
        """
        tensors, rebuild = _tensor_leaves(cached_in)
        if tensors:
            leaves, _ = _tensor_leaves(x)
            main = _Stacked(rebuild([t.reshape(k, *c.shape) for t, c in zip(leaves, tensors)]))
        else:
            main = cached_in
        values: dict[fx.Node, Any] = dict(zip(self.env_in, skips))
        values[self.main] = main
        skips[:] = [values[n] for n in self.env_out]
        out_tensors, out_rebuild = _tensor_leaves(cached_out)
        if not out_tensors:
            return cached_out  # shapes and other static values do not depend on the query
        if not self.nodes:  # a move
            value = values[self.out]
            if isinstance(value, _Stacked):
                batched, _ = _tensor_leaves(value.value)
            else:
                batched = [t.unsqueeze(0).expand(k, *t.shape) for t in _tensor_leaves(value)[0]]
            return out_rebuild([_to_main(t) for t in batched])
        stacked = [n for n in self.reads if isinstance(values[n], _Stacked)]
        shared = {n: values[n] for n in self.reads if not isinstance(values[n], _Stacked)}
        parts = [_tensor_leaves(values[n].value) for n in stacked]
        flat = [t for leaves, _ in parts for t in leaves]
        sizes = [len(leaves) for leaves, _ in parts]

        def per_query(*ts):
            local = dict(shared)
            i = 0
            for n, (_, rebuild_n), size in zip(stacked, parts, sizes):
                local[n] = rebuild_n(list(ts[i:i + size]))
                i += size
            return tuple(_tensor_leaves(self._run(local, params))[0])

        if not flat:  # nothing differs between the queries: once, for all of them
            batched = [t.unsqueeze(0).expand(k, *t.shape) for t in per_query()]
        else:
            batched = list(_vmapped(per_query, flat, k))
        return out_rebuild([_to_main(t) for t in batched])


def _vmapped(fn: Callable, flat: list[torch.Tensor], k: int) -> tuple:
    """``vmap(fn)(*flat)``, or query by query where vmap cannot run ``fn``."""
    try:
        return vmap(fn)(*flat)
    except RuntimeError as exc:
        if not any(word in str(exc) for word in ("vmap", "functorch", "batched", "Batched")):
            raise
    outs = [fn(*(t[i] for t in flat)) for i in range(k)]
    return tuple(torch.stack(parts) for parts in zip(*outs))
