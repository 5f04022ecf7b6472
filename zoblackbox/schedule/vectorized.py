"""The vectorized scheduler: many queries of a plan in one batched forward.

For a torch model (:class:`~zoblackbox.torch_module.ModuleOracle`) a chunk of queries is one call of
``torch.func.vmap`` over ``functional_call``. Only the parameter tensors the chunk perturbs are
batched -- for a coordinate plan, one tensor per chunk -- so layers before the perturbed one run
once per chunk, and layers after it run with shared weights on the stacked ``K x B`` batch
instead of as ``K`` grouped convolutions. Any other oracle is evaluated through its own
:meth:`~zoblackbox.oracle.Oracle.raw_evaluate`, chunk by chunk.

Chunk sizes come from a memory budget: the scheduler estimates the bytes one query needs (the
batched parameter tensors plus ``ACTIVATION_FACTOR`` times the largest activation from the
perturbed layer on, measured once per batch shape by a probing forward) and fits as many queries
in the budget as it can; on a CPU it also keeps a chunk's activations near cache size. Losses are
recorded with the oracle in plan order (:class:`PlanRecorder`), so query counts, budgets and
failure handling are those of :class:`~zoblackbox.schedule.SerialScheduler`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..errors import ConfigError, OracleError
from ..oracle import Oracle, RawResult, iter_chunks
from ..plan import QueryPlan
from ..staged import is_plain_module_oracle
from .base import Scheduler

__all__ = [
    "ACTIVATION_FACTOR",
    "DEFAULT_MEMORY_BUDGET",
    "VECTORIZED_CPU_CACHE_BYTES",
    "PlanRecorder",
    "QueryLoss",
    "VectorizedScheduler",
]

#: default bytes a chunk of queries may use (512 MiB)
DEFAULT_MEMORY_BUDGET = 512 * 2**20
#: live activations per query, in units of the model's largest activation (input, output, temporaries)
ACTIVATION_FACTOR = 4
#: default most queries per chunk: small chunks stay in cache on a CPU, a GPU wants large ones
DEFAULT_MAX_CHUNK = {"cpu": 256, "cuda": 4096}
#: default bytes of a vectorized chunk's largest activation on a CPU (measured best on a 2-core
#: EPYC for ResNet-20 and the digits CNN, see docs/schedulers.md)
VECTORIZED_CPU_CACHE_BYTES = 8 * 2**20


def check_memory_budget(memory_budget) -> int:
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ConfigError(f"memory_budget must be a positive number of bytes (int), got {memory_budget!r}")
    return memory_budget


def check_max_chunk(max_chunk) -> int | None:
    if max_chunk is not None and (isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1):
        raise ConfigError(f"max_chunk must be an int >= 1 or None, got {max_chunk!r}")
    return max_chunk


def check_cache_bytes(cpu_cache_bytes) -> int | None:
    if cpu_cache_bytes is not None and (isinstance(cpu_cache_bytes, bool) or not isinstance(cpu_cache_bytes, int)
                                        or cpu_cache_bytes < 1):
        raise ConfigError(f"cpu_cache_bytes must be a positive int or None, got {cpu_cache_bytes!r}")
    return cpu_cache_bytes


def chunk_capacity(memory_budget: int, per_query: int, device: torch.device, max_chunk: int | None, what: str,
                   *, cache_bytes: int | None = None, activation_bytes: int = 0) -> int:
    """How many queries of ``per_query`` bytes fit in the budget (and, on CUDA, in free memory).

    On a CPU the chunk is also kept to ``cache_bytes`` of its largest activation
    (``activation_bytes`` per query), because stacked batches that spill out of the cache run
    slower per query than small ones.
    """
    limit = memory_budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        limit = min(limit, int(0.9 * free))
    if per_query > limit:
        where = (f"memory_budget={memory_budget} bytes ({memory_budget / 2**20:.2f} MiB)" if limit == memory_budget
                 else f"the free memory of {device} ({limit / 2**20:.2f} MiB usable)")
        raise ConfigError(
            f"{where} is too small for a single query: {what} needs about {per_query} bytes "
            f"({per_query / 2**20:.2f} MiB) per query; raise memory_budget to at least {per_query}"
        )
    cap = max_chunk if max_chunk is not None else DEFAULT_MAX_CHUNK.get(device.type, DEFAULT_MAX_CHUNK["cpu"])
    if device.type == "cpu" and cache_bytes is not None and activation_bytes > 0:
        cap = min(cap, max(1, cache_bytes // activation_bytes))
    return max(1, min(cap, limit // per_query))


def module_batch(oracle) -> tuple:
    """The ``(inputs, targets)`` batch of a ModuleOracle (error naming the fix if none is set)."""
    batch = oracle.batch
    if batch is None:
        raise ConfigError(f"{type(oracle).__name__} has no data batch; call set_batch(inputs, targets) first")
    return batch


def is_vmap_error(exc: BaseException) -> bool:
    """Whether ``exc`` says that an operation cannot run under ``vmap``."""
    text = str(exc)
    return any(word in text for word in ("vmap", "functorch", "batched", "Batched"))


class QueryLoss:
    """``loss_fn(outputs, targets)`` for one query, and for a stack of ``K`` queries' outputs.

    The stacked form is ``vmap(loss_fn)``, except for ``F.cross_entropy`` /
    ``nn.CrossEntropyLoss`` with default options and class-index targets: vmap evaluates that one
    query by query, so it is computed with the equivalent batched formula
    ``mean_b(logsumexp(o_b) - o_b[t_b])`` (equal to rounding).
    """

    def __init__(self, loss_fn: Callable, targets):
        self.loss_fn, self.targets = loss_fn, targets
        self.fast_cross_entropy = _plain_cross_entropy(loss_fn, targets)

    def __call__(self, outputs):
        return self.loss_fn(outputs, self.targets)

    def stacked(self, outputs) -> torch.Tensor:
        """Losses ``(K,)`` of stacked outputs ``(K, ...)``."""
        t = self.targets
        if self.fast_cross_entropy and isinstance(outputs, torch.Tensor) and outputs.dim() == 3 \
                and outputs.shape[1] == t.shape[0]:
            picked = outputs.gather(2, t.to(outputs.device).expand(outputs.shape[0], -1).unsqueeze(2))
            return (torch.logsumexp(outputs, 2) - picked.squeeze(2)).mean(1)
        return vmap(self)(outputs)

    def single(self, outputs) -> torch.Tensor:
        """The loss ``(1,)`` of one query's outputs, by the same formula as :meth:`stacked`."""
        if isinstance(outputs, torch.Tensor) and self.fast_cross_entropy:
            return self.stacked(outputs.unsqueeze(0)).reshape(1)
        return torch.as_tensor(self(outputs)).reshape(-1)


def _plain_cross_entropy(loss_fn, targets) -> bool:
    """Whether ``loss_fn(outputs, targets)`` is mean cross-entropy over class indices, nothing else."""
    if not (isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point()
            and targets.numel() > 0):
        return False
    if loss_fn is F.cross_entropy:
        ignore = -100
    elif type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean" \
            and loss_fn.label_smoothing == 0.0:
        ignore = loss_fn.ignore_index
    else:
        return False
    return bool((targets >= 0).all()) and not bool((targets == ignore).any())


_UNVMAPPABLE: WeakSet = WeakSet()  # models vmap failed on: evaluated query by query from then on


def known_unvmappable(model: torch.nn.Module) -> bool:
    """Whether ``vmap`` already failed on ``model`` (its queries then run one by one)."""
    return model in _UNVMAPPABLE


def query_losses(forward: Callable, batched, loss: QueryLoss, model: torch.nn.Module) -> torch.Tensor:
    """Losses of ``K`` queries: ``loss(forward(item))`` for every item along the leading dimension
    of ``batched`` (a tensor or a dict of tensors).

    One ``vmap`` call for the forwards and one stacked loss. If ``model`` cannot be vmapped, a
    warning says so once and its queries are evaluated one by one from then on.
    """
    k = next(iter(batched.values())).shape[0] if isinstance(batched, dict) else batched.shape[0]
    if k == 1:  # nothing to vectorize: skip vmap's overhead
        one = {n: t[0] for n, t in batched.items()} if isinstance(batched, dict) else batched[0]
        return loss.single(forward(one))
    if model not in _UNVMAPPABLE:
        try:
            return loss.stacked(vmap(forward)(batched))
        except RuntimeError as exc:
            # vmap's own errors name it; others (an in-place ``out += f(x)`` whose left side is not
            # batched: "output with shape ... doesn't match the broadcast shape") show when the
            # first query alone runs: the model works, only not under vmap
            if not (is_vmap_error(exc) or _runs_alone(forward, batched, loss)):
                raise
            _UNVMAPPABLE.add(model)
            warnings.warn(f"{type(model).__name__} cannot be vmapped ({exc}); evaluating its queries one by one",
                          stacklevel=2)
    if isinstance(batched, dict):
        return torch.stack([loss(forward({n: t[i] for n, t in batched.items()})) for i in range(k)])
    return torch.stack([loss(forward(t)) for t in batched])


def _runs_alone(forward: Callable, batched, loss: QueryLoss) -> bool:
    """Whether the first query of ``batched`` evaluates without vmap."""
    one = {n: t[0] for n, t in batched.items()} if isinstance(batched, dict) else batched[0]
    try:
        loss.single(forward(one))
    except Exception:  # noqa: BLE001 - any failure: the error is the model's, not vmap's
        return False
    return True


class PlanRecorder:
    """Collects raw losses of a plan in any order and records them with the oracle in plan order.

    Every time a prefix of the plan is complete it goes to :meth:`Oracle.record` as one
    :class:`~zoblackbox.oracle.RawResult`, so query indices in failure records, retries and the
    ``raise`` policy are exactly those of a serial evaluation.
    """

    def __init__(self, oracle: Oracle, plan: QueryPlan):
        self.oracle, self.plan = oracle, plan
        n = len(plan)
        self.values = torch.full((n,), math.nan, dtype=torch.float64)
        self.errors: dict[int, BaseException] = {}
        self.done = torch.zeros(n, dtype=torch.bool)
        self.losses = torch.empty(n, dtype=torch.float64)
        self.recorded = 0

    def put(self, indices: torch.Tensor, values: torch.Tensor, errors: dict[int, BaseException]) -> None:
        """Raw losses of the plan queries ``indices``; ``errors`` maps positions in ``indices``."""
        indices = indices.cpu()
        self.values[indices] = values.detach().to("cpu", torch.float64).reshape(-1)
        for pos, exc in errors.items():
            self.errors[int(indices[pos])] = exc
        self.done[indices] = True
        self._flush()

    def _flush(self) -> None:
        start = self.recorded
        pending = (~self.done[start:]).nonzero()
        stop = start + int(pending[0]) if pending.numel() else self.done.shape[0]
        if stop == start:
            return
        errors = {i - start: e for i, e in self.errors.items() if start <= i < stop}
        oracle, plan = self.oracle, self.plan

        def point(i: int, s: int = start) -> torch.Tensor:
            return plan.point(s + i).to(device=oracle.device, dtype=oracle.dtype)

        self.losses[start:stop] = oracle.record(RawResult(self.values[start:stop].clone(), errors), point)
        self.recorded = stop

    def result(self) -> torch.Tensor:
        if self.recorded != self.done.shape[0]:
            raise RuntimeError(f"internal error: {self.done.shape[0] - self.recorded} queries were never evaluated")
        return self.losses


def query_groups(plan: QueryPlan, layout) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Queries that batch the same parameter tensors: ``(tensor indices, plan indices)`` pairs.

    The base query batches nothing; a coordinate step batches the tensor holding its coordinate;
    a direction batches every tensor its plan's directions touch.
    """
    groups: list[tuple[tuple[int, ...], torch.Tensor]] = []
    shift = int(plan.include_base)
    if plan.include_base:
        groups.append(((), torch.zeros(1, dtype=torch.long)))
    m = plan.num_perturbations
    if plan.coords is not None:
        tensor = layout.block_index(plan.coords.cpu())
        for t in torch.unique(tensor).tolist():
            groups.append(((t,), (tensor == t).nonzero().flatten() + shift))
    elif m:
        assert plan.directions is not None  # a plan without coords has directions
        touched = plan.directions.ne(0).any(0).cpu()
        off = layout.offsets
        names = tuple(t for t in range(len(layout.names)) if bool(touched[off[t]:off[t + 1]].any()))
        groups.append((names, torch.arange(shift, shift + m)))
    return groups


def perturbed_tensors(plan: QueryPlan, layout, tensors: tuple[int, ...], idx: torch.Tensor,
                      base: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """Batched values ``(K, *shape)`` of the given parameter tensors for the plan queries ``idx``.

    The perturbed values are computed exactly as :meth:`QueryPlan.points` does (in the plan's
    dtype, then converted), so every query sees bit for bit the point a serial evaluation sees.
    """
    rows = idx.to(plan.base.device) - int(plan.include_base)
    off = layout.offsets
    out = {}
    for t in tensors:
        name, shape = layout.names[t], layout.shapes[t]
        lo, hi = off[t], off[t + 1]
        if plan.coords is not None:
            assert plan.offsets is not None  # coordinate plans have offsets
            coords = plan.coords[rows]
            values = (plan.base[coords] + plan.offsets[rows].to(plan.base.dtype)).to(dtype)
            flat = base[name].reshape(-1).to(values.device).expand(rows.shape[0], hi - lo).clone()
            flat[torch.arange(rows.shape[0], device=flat.device), coords - lo] = values
        else:
            assert plan.directions is not None
            flat = (plan.base[lo:hi] + plan.directions[rows, lo:hi].to(plan.base.dtype)).to(dtype)
        out[name] = flat.to(base[name].device).reshape(rows.shape[0], *shape)
    return out


_PROFILES: WeakKeyDictionary = WeakKeyDictionary()


class ActivationProfile:
    """Sizes of the module outputs of one forward, in execution order, and where each parameter
    tensor first matters -- so that a chunk's memory is estimated from the activations that are
    actually batched (those from the perturbed layer on)."""

    def __init__(self, oracle, base: dict, inputs):
        events: list[tuple[nn.Module, int]] = []

        def hook(module, _args, output):
            events.append((module, max((t.numel() for t in _tensors(output)), default=0)))

        handles = [m.register_forward_hook(hook) for m in oracle.model.modules()]
        try:
            with torch.no_grad(), oracle.query_mode():
                functional_call(oracle.model, base, (inputs,))
        finally:
            for h in handles:
                h.remove()
        self.numels = [inputs.numel() if isinstance(inputs, torch.Tensor) else 1] + [n for _, n in events]
        owner = {id(p): m for m in oracle.model.modules() for p in m.parameters(recurse=False)}
        named = dict(oracle.model.named_parameters())
        self.first = []  # per layout tensor: index in numels of the first output it can change
        for name in oracle.layout.names:
            inside = set(owner[id(named[name])].modules())  # the owner's outputs and those of its children
            hits = [i for i, (m, _) in enumerate(events) if m in inside]
            self.first.append(1 + hits[0] if hits else 0)

    @classmethod
    def of(cls, oracle, base: dict, inputs) -> ActivationProfile:
        """The profile for the oracle's current batch shape (one probing forward per shape)."""
        key = (tuple(inputs.shape), inputs.dtype) if isinstance(inputs, torch.Tensor) else None
        cache = _PROFILES.setdefault(getattr(oracle, "unwrapped", oracle), {})  # one profile per model oracle
        if key is None or key not in cache:
            profile = cls(oracle, base, inputs)
            if key is None:
                return profile
            cache[key] = profile
        return cache[key]

    def largest_after(self, tensors: tuple[int, ...]) -> int:
        """Elements of the largest output that depends on any of the given layout tensors."""
        start = min((self.first[t] for t in tensors), default=0)
        return max(self.numels[start:])


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


class VectorizedScheduler(Scheduler):
    """Evaluates a plan's queries many at a time in one batched forward.

    For module oracles (:class:`~zoblackbox.adapters.ModuleOracle`): many parameter sets in one
    ``vmap``'d ``functional_call``, in chunks sized from the memory budget. Other oracles are
    evaluated through their own batch evaluation. Losses equal the serial reference's up to
    floating-point reassociation (docs/schedulers.md).

    Parameters
    ----------
    memory_budget : int, default 536870912
        Bytes one chunk of queries may use (512 MiB), ``>= 1``. The chunk size is the budget
        divided by the estimated bytes per query; on CUDA the budget is further capped at 90% of
        the free device memory.
    max_chunk : int or None, default None
        Most queries per chunk, ``>= 1`` (``None``: 256 on a CPU, 4096 on CUDA).
    cpu_cache_bytes : int or None, default 8388608
        On a CPU, most bytes of a chunk's largest activation (8 MiB): stacked batches that spill
        out of the cache run slower per query. ``None``: no limit.

    Raises
    ------
    ConfigError
        A budget, chunk or cache size that is not a positive int; at run time, a budget too small
        for a single query.

    See Also
    --------
    FeatureReuseScheduler : also reuses the activations before the perturbed layer.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from zoblackbox import CoordinateEstimator
    >>> from zoblackbox.adapters import ModuleOracle
    >>> from zoblackbox.schedule import SerialScheduler, VectorizedScheduler
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    >>> oracle = ModuleOracle(model, F.cross_entropy, batch=batch)
    >>> x, cge = oracle.get_params(), CoordinateEstimator()
    >>> fast = cge.estimate(oracle, x, scheduler=VectorizedScheduler()).grad
    >>> reference = cge.estimate(oracle, x, scheduler=SerialScheduler()).grad
    >>> oracle.dim, bool(torch.allclose(fast, reference, atol=1e-4))
    (83, True)
    """

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET, *, max_chunk: int | None = None,
                 cpu_cache_bytes: int | None = VECTORIZED_CPU_CACHE_BYTES):
        self.memory_budget = check_memory_budget(memory_budget)
        self.max_chunk = check_max_chunk(max_chunk)
        self.cpu_cache_bytes = check_cache_bytes(cpu_cache_bytes)

    def __repr__(self) -> str:
        return (f"VectorizedScheduler(memory_budget={self.memory_budget}, max_chunk={self.max_chunk}, "
                f"cpu_cache_bytes={self.cpu_cache_bytes})")

    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        oracle.reserve(len(plan))
        if not is_plain_module_oracle(oracle):
            return self._run_black_box(oracle, plan)
        module: Any = oracle  # a ModuleOracle, or the engine's counting view of one (attributes forwarded)
        inputs, targets = module_batch(oracle)
        base = module.layout.unflatten(plan.base.to(device=oracle.device, dtype=oracle.dtype))
        itemsize = torch.empty((), dtype=oracle.dtype).element_size()
        recorder = PlanRecorder(oracle, plan)
        with torch.no_grad(), module.query_mode():
            profile = ActivationProfile.of(oracle, base, inputs)
            groups = query_groups(plan, module.layout)
            sizes = []
            for tensors, _ in groups:  # every chunk size first: a too small budget fails before any query
                numel = sum(module.layout.numels[t] for t in tensors)
                activation = itemsize * profile.largest_after(tensors)
                sizes.append(chunk_capacity(self.memory_budget, itemsize * numel + ACTIVATION_FACTOR * activation,
                                            oracle.device, self.max_chunk, f"{type(oracle).__name__} (dim {oracle.dim})",
                                            cache_bytes=self.cpu_cache_bytes, activation_bytes=activation))

            loss = QueryLoss(module.loss_fn, targets)

            def forward(params):
                return functional_call(module.model, {**base, **params}, (inputs,))

            for (tensors, idx), size in zip(groups, sizes):
                for chunk in idx.split(size):
                    batched = perturbed_tensors(plan, module.layout, tensors, chunk, base, oracle.dtype)
                    def evaluate(b=batched):
                        return query_losses(forward, b, loss, module.model) if b else loss.single(forward({}))

                    values, errors = guarded_losses(evaluate, chunk.shape[0])
                    recorder.put(chunk, values, errors)
        return recorder.result()

    def _run_black_box(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        itemsize = torch.empty((), dtype=oracle.dtype).element_size()
        size = chunk_capacity(self.memory_budget, 2 * itemsize * oracle.dim, oracle.device, self.max_chunk,
                              f"{type(oracle).__name__} (dim {oracle.dim})")
        recorder = PlanRecorder(oracle, plan)
        for start, stop in iter_chunks(len(plan), size):
            raw = oracle.raw_evaluate(plan.points(start, stop).to(device=oracle.device, dtype=oracle.dtype))
            recorder.put(torch.arange(start, stop), raw.values, raw.errors)
        return recorder.result()


def guarded_losses(compute: Callable[[], torch.Tensor], k: int) -> tuple[torch.Tensor, dict]:
    """Losses of a chunk of ``k`` queries from ``compute()``; if it raises, every query of the chunk
    fails with that exception (the oracle's failure policy decides what happens next)."""
    try:
        values = compute().detach().to("cpu", torch.float64).reshape(-1)
    except Exception as exc:  # noqa: BLE001 - every failure goes to the oracle's failure policy
        return torch.full((k,), math.nan, dtype=torch.float64), {i: exc for i in range(k)}
    if values.shape[0] != k:
        raise OracleError(f"the loss returned {values.shape[0]} values for a chunk of {k} queries; "
                          "loss_fn must return one scalar per query")
    return values, {}
