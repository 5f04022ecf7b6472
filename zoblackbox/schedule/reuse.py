"""The feature-reuse scheduler: queries restart the forward at the stage they perturb.

Per plan, the scheduler runs the model once at the base point and caches the input of every unit
(:mod:`zoblackbox.staged`). A chunk of queries that perturb one parameter tensor of unit ``u``
then only runs units ``u..L``, on the stacked ``K x B`` batch, with shared weights after ``u``
(DeepZero's feature reuse). ``vmap`` over the chunk keeps every per-query quantity per query --
in particular BatchNorm batch statistics are taken over each query's own ``B`` samples.

With ``explicit_deltas`` (default) known layers go further. ``Linear``, ``Conv2d`` and
``BatchNorm`` are affine in their own parameters, so perturbing one weight changes one output
channel (feature) by an explicit delta: ``h * input[:, j]`` for ``Linear`` weight ``W[i, j]``, ``h``
times a shifted input channel for a convolution weight, ``h`` for a bias, ``h * x_hat`` for a
BatchNorm scale. The changed channel -- a *band* -- is carried through the channel-wise layers
that follow (activations, pooling, ``Flatten``, BatchNorm with per-query statistics) without
touching the other channels, and the next ``Linear``/``Conv`` absorbs it as a low-rank update of
its cached output: ``out + W[:, band] @ delta``. Only the layers after that one run densely.

Everything is exact up to floating-point rounding (tests: float64 equality to 1e-10 with
:class:`~zoblackbox.schedule.SerialScheduler`). Direction plans cannot use deltas; they start at
the first stage their directions touch. Oracles that are not module oracles are evaluated by
:class:`~zoblackbox.schedule.VectorizedScheduler`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from ..oracle import Oracle
from ..plan import QueryPlan
from ..staged import Staging, Unit, staging_of, unit_kind
from .base import Scheduler
from .vectorized import (
    ACTIVATION_FACTOR,
    DEFAULT_MEMORY_BUDGET,
    PlanRecorder,
    QueryLoss,
    VectorizedScheduler,
    check_cache_bytes,
    check_max_chunk,
    check_memory_budget,
    chunk_capacity,
    guarded_losses,
    is_vmap_error,
    known_unvmappable,
    module_batch,
    perturbed_tensors,
    query_groups,
    query_losses,
)

__all__ = ["AUTO", "REUSE_CPU_CACHE_BYTES", "FeatureReuseScheduler"]

#: default bytes of a reuse chunk's largest activation on a CPU: about a core's L2 cache. Reuse
#: runs shared-weight layers on the stacked K x B batch, which slows down per query once it spills
#: out of L2 (measured on a 2-core EPYC: ResNet-20 best at 1-2 MiB, the digits CNN at 2-4 MiB).
REUSE_CPU_CACHE_BYTES = 2 * 2**20
#: ``cpu_cache_bytes=AUTO`` (the default): on a CPU, chunk sizes of explicit-delta queries are measured
#: per stage (a short calibration, cached per model shape, batch shape, dtype, device and thread count);
#: queries restarted with batched parameters keep the ``REUSE_CPU_CACHE_BYTES`` cap
AUTO = "auto"
#: chunk sizes the calibration times (up to the scheduler's ``max_chunk`` and memory budget)
CALIBRATION_CHUNKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: a calibration stops growing a stage's chunk once one timing takes longer than this (seconds)
CALIBRATION_MAX_SECONDS = 0.25
_CALIBRATIONS: dict = {}  # key -> _Calibration (see _Calibration.key)

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FeatureReuseScheduler(Scheduler):
    """Evaluates coordinate plans from the perturbed stage on, reusing everything before it.

    For staged models (an ``nn.Sequential``, or ``zoblackbox.staged.StagedModel``) behind a
    :class:`~zoblackbox.adapters.ModuleOracle`: every stage's input is computed once per plan, and
    each query restarts at the layer it perturbs; the fastest path for torch models on a CPU.
    Anything else falls back to :class:`VectorizedScheduler`.

    Parameters
    ----------
    memory_budget : int, default 536870912
        Bytes one chunk of queries may use (512 MiB), ``>= 1``; chunk sizes follow from the
        estimated bytes per query of the stage the chunk starts at.
    max_chunk : int or None, default None
        Most queries per chunk, ``>= 1`` (``None``: 256 on a CPU, 4096 on CUDA).
    cpu_cache_bytes : int, None or "auto", default "auto"
        On a CPU, how big a chunk is. ``"auto"``: queries with explicit deltas run in the chunk size
        measured fastest per stage by a short calibration (a few stacked forwards of every stage at
        1, 2, 4, ... queries; cached per model shape, batch shape, dtype, device and thread count),
        other queries keep a chunk's largest activation to 2 MiB (``REUSE_CPU_CACHE_BYTES``). An int:
        most bytes of a chunk's largest activation, no calibration; ``None``: no limit.
    explicit_deltas : bool, default True
        Form the outputs of perturbed ``Linear``/``Conv2d``/``BatchNorm`` layers from explicit
        deltas; ``False`` restarts the forward at the perturbed layer with batched weights instead.

    Raises
    ------
    ConfigError
        A budget, chunk or cache size that is not a positive int; at run time, a budget too small
        for a single query.

    See Also
    --------
    VectorizedScheduler

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from zoblackbox import CoordinateEstimator
    >>> from zoblackbox.adapters import ModuleOracle
    >>> from zoblackbox.schedule import FeatureReuseScheduler, SerialScheduler
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    >>> oracle = ModuleOracle(model, F.cross_entropy, batch=batch)
    >>> x, cge = oracle.get_params(), CoordinateEstimator()
    >>> fast = cge.estimate(oracle, x, scheduler=FeatureReuseScheduler()).grad
    >>> reference = cge.estimate(oracle, x, scheduler=SerialScheduler()).grad
    >>> bool(torch.allclose(fast, reference, atol=1e-4))
    True
    """

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET, *, max_chunk: int | None = None,
                 cpu_cache_bytes: int | None | str = AUTO, explicit_deltas: bool = True):
        self.memory_budget = check_memory_budget(memory_budget)
        self.max_chunk = check_max_chunk(max_chunk)
        self.cpu_cache_bytes = cpu_cache_bytes if cpu_cache_bytes == AUTO else check_cache_bytes(cpu_cache_bytes)
        self.explicit_deltas = bool(explicit_deltas)

    def __repr__(self) -> str:
        return (f"FeatureReuseScheduler(memory_budget={self.memory_budget}, max_chunk={self.max_chunk}, "
                f"cpu_cache_bytes={self.cpu_cache_bytes}, explicit_deltas={self.explicit_deltas})")

    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        staging = staging_of(oracle)
        fallback = VectorizedScheduler(self.memory_budget, max_chunk=self.max_chunk)
        if staging is None:
            return fallback.run(oracle, plan)
        module: Any = oracle  # a ModuleOracle, or the engine's counting view of one (attributes forwarded)
        oracle.reserve(len(plan))
        inputs, targets = module_batch(oracle)
        base = module.layout.unflatten(plan.base.to(device=oracle.device, dtype=oracle.dtype))
        with torch.no_grad(), module.query_mode():
            try:
                step = _StepCache(staging, oracle, base, inputs, targets)
            except Exception:  # noqa: BLE001 - the base forward failed: let every query fail on its own
                step = None
            if step is not None:
                return self._run_cached(oracle, plan, staging, step)
        return fallback.run(oracle, plan)

    def _run_cached(self, oracle, plan, staging: Staging, step: _StepCache) -> torch.Tensor:
        """Every query from the cache (the base query is the cached forward's own loss)."""
        base_idx, jobs = self._jobs(oracle, plan, staging, step)  # sized first: a too small budget fails early
        recorder = PlanRecorder(oracle, plan)
        if base_idx is not None:
            recorder.put(base_idx, step.base_loss, {})
        for job in jobs:
            for chunk, compute in job.chunks(step, plan, oracle):
                values, errors = guarded_losses(compute, chunk.shape[0])
                recorder.put(chunk, values, errors)
        return recorder.result()

    def _jobs(self, oracle, plan, staging: Staging, step: _StepCache) -> tuple[torch.Tensor | None, list]:
        """The plan's queries as jobs: explicit deltas grouped by where their dense forward starts,
        and restarts with batched parameters (opaque units, direction plans, no deltas)."""
        layout = oracle.layout
        itemsize = torch.empty((), dtype=oracle.dtype).element_size()
        base_idx: torch.Tensor | None = None
        by_start: dict[tuple[int, int | None], list] = {}
        jobs: list[_RestartJob | _DeltaJob] = []
        for tensors, idx in query_groups(plan, layout):
            if not tensors:
                base_idx = idx
                continue
            unit = min(staging.tensor_unit[t] for t in tensors)
            route = step.route(unit, layout.names[tensors[0]]) if (
                self.explicit_deltas and plan.coords is not None) else None
            if route is None:
                batched = sum(layout.numels[t] for t in tensors)
                size = self._capacity(oracle, staging, step.peak_from(unit), batched, itemsize, unit)
                jobs.append(_RestartJob(tensors, unit, idx, size))
            else:
                by_start.setdefault((_dense_start(route), _skip_entry(route)), []).append((unit, route, idx))
        calibrated = self.cpu_cache_bytes == AUTO and oracle.device.type == "cpu"
        for (start, _), members in sorted(by_start.items(), key=lambda item: (item[0][0], item[0][1] or -1)):
            # per query: the band (one channel of the perturbed layer's output), then the dense forward
            band = max(step.band_numel(unit) for unit, _, _ in members)
            first = min(unit for unit, _, _ in members)
            activation = max(band, step.peak_from(start))
            size = self._capacity(oracle, staging, activation, 0, itemsize, first, cache=not calibrated)
            if calibrated and start < len(staging.units):
                size = min(size, self.calibration(oracle, staging, step).chunk(staging.units[start].stage, size))
            jobs.append(_DeltaJob(start, members, size))
        return base_idx, jobs

    def _capacity(self, oracle, staging: Staging, activation: int, batched: int, itemsize: int, unit: int,
                  cache: bool = True) -> int:
        """Queries per chunk whose largest activation has ``activation`` elements per query, with
        ``batched`` batched parameters per query (``unit``: where the queries start, for messages);
        ``cache``: also keep to the CPU cache size (``cpu_cache_bytes``, or its default for ``"auto"``)."""
        act_bytes = itemsize * activation
        cache_bytes = REUSE_CPU_CACHE_BYTES if isinstance(self.cpu_cache_bytes, str) else self.cpu_cache_bytes
        return chunk_capacity(self.memory_budget, itemsize * batched + ACTIVATION_FACTOR * act_bytes,
                              oracle.device, self.max_chunk, f"stage {staging.stages[staging.units[unit].stage].name!r}",
                              cache_bytes=cache_bytes if cache else None, activation_bytes=act_bytes)

    def calibration(self, oracle, staging: Staging, step: _StepCache) -> _Calibration:
        """The measured per-query cost of every stage at several chunk sizes (cached; see ``AUTO``)."""
        itemsize = torch.empty((), dtype=oracle.dtype).element_size()
        caps = []  # per stage: the largest chunk the memory budget and max_chunk allow
        for stage in staging.stages:
            first = stage.units[0]
            activation = step.peak_from(first)
            caps.append(self._capacity(oracle, staging, activation, 0, itemsize, first, cache=False))
        key = _Calibration.key(step, oracle, tuple(caps))
        if key not in _CALIBRATIONS:
            _CALIBRATIONS[key] = _Calibration(step, caps)
        return _CALIBRATIONS[key]


class _Calibration:
    """Seconds per query of every stage's stacked forward at the chunk sizes ``CALIBRATION_CHUNKS``.

    Measured once per key (model shape, batch shape, dtype, device, threads, chunk caps) on the
    cached base-point activations: per stage (stages of the same shape once), the faster of two
    stacked forwards at 1, 2, 4, ... queries, stopping at the first chunk size that is not cheaper
    per query than the one before or when one forward takes more than ``CALIBRATION_MAX_SECONDS``. A chunk that
    starts in stage ``s`` runs stages ``s..L`` with one chunk size: the one with the least summed
    cost.
    """

    def __init__(self, step: _StepCache, caps: list[int]):
        staging = step.staging
        self.per_query: list[dict[int, float]] = []
        measured: dict = {}  # stages of the same shape (the repeated blocks of a ResNet) are timed once
        begin = time.perf_counter()
        for stage, cap in zip(staging.stages, caps):
            first, stop = stage.units[0], stage.units[-1] + 1
            h0 = step.acts[first]
            shape = (tuple(staging.units[u].kind for u in stage.units), cap, staging.enclosing[first],
                     tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in step.acts[first:stop + 1]))
            if shape in measured:
                self.per_query.append(measured[shape])
                continue
            costs: dict[int, float] = {}
            if isinstance(h0, torch.Tensor):
                best = math.inf
                for k in (c for c in CALIBRATION_CHUNKS if c <= cap):
                    h = h0.unsqueeze(0).expand(k, *h0.shape).contiguous()
                    run = partial(step.stacked_forward, first, h, stop=stop)
                    times = [_timed(run) for _ in range(2)]
                    costs[k] = min(times) / k
                    if costs[k] >= best or max(times) > CALIBRATION_MAX_SECONDS:
                        break  # doubling the chunk no longer pays (or takes too long)
                    best = costs[k]
            measured[shape] = costs or {1: 0.0}
            self.per_query.append(measured[shape])
        self.seconds = time.perf_counter() - begin

    @staticmethod
    def key(step: _StepCache, oracle, caps: tuple[int, ...]) -> tuple:
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in step.acts)
        kinds = tuple(u.kind for u in step.staging.units)
        return (shapes, kinds, oracle.dtype, str(oracle.device), torch.get_num_threads(), caps)

    def chunk(self, stage: int, cap: int) -> int:
        """The chunk size (at most ``cap``) with the least measured cost for stages ``stage..L``."""
        tail = self.per_query[stage:]
        common = set(tail[0]).intersection(*tail[1:])
        sizes = sorted(k for k in common if k <= cap) or [1]
        return min(sizes, key=lambda k: sum(costs.get(k, 0.0) for costs in tail))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class _RestartJob:
    """Queries that perturb ``tensors`` (owned by units from ``unit`` on), restarted at ``unit``
    with the perturbed tensors batched."""

    tensors: tuple[int, ...]
    unit: int
    idx: torch.Tensor
    size: int

    def chunks(self, step: _StepCache, plan: QueryPlan, oracle):
        for chunk in self.idx.split(self.size):
            batched = perturbed_tensors(plan, oracle.layout, self.tensors, chunk, step.base, oracle.dtype)
            yield chunk, lambda b=batched: step.generic_losses(self.unit, b)


@dataclass
class _DeltaJob:
    """Coordinate steps of several tensors (``members``: unit, route, plan indices) whose explicit
    deltas become dense at unit ``start``: their dense forwards run together."""

    start: int
    members: list
    size: int

    def chunks(self, step: _StepCache, plan: QueryPlan, oracle):
        idx = torch.cat([i for _, _, i in self.members])
        owner = torch.cat([torch.full((i.numel(),), m) for m, (_, _, i) in enumerate(self.members)])
        for lo in range(0, idx.numel(), self.size):
            chunk, own = idx[lo:lo + self.size], owner[lo:lo + self.size]
            present = torch.unique(own).tolist()
            parts = [(chunk[own == m] if len(present) > 1 else chunk, *self.members[m][:2]) for m in present]
            chunk = _cat([c for c, _, _ in parts])  # in the order the parts' losses come back

            def compute(parts=parts):
                inputs = [step.dense_input(plan, oracle.layout, c, unit, route) for c, unit, route in parts]
                skips = [skip for _, skip in inputs]
                skip = None if skips[0] is None else _cat_bands(skips)
                return step.dense_losses(self.start, _cat([h for h, _ in inputs]), skip)

            yield chunk, compute


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _cat_bands(bands: list) -> _Band:
    """Bands of the same activation (same width and dimension) of several query groups, stacked."""
    first = bands[0]
    if len(bands) == 1:
        return first
    return _Band(torch.cat([b.values for b in bands]), torch.cat([b.start for b in bands]), first.width, first.dim)


def _skip_entry(route: list) -> int | None:
    """The block entry whose skip input a route's band passes through (``None``: no skip band)."""
    return next((v for op, v in route[:-1] if op == "enter"), None)


def _dense_start(route: list) -> int:
    """The unit a route's dense forward starts at (after the receiving unit, or at the densified one)."""
    end, v = route[-1]
    return v + 1 if end == "receive" else v


@dataclass
class _Band:
    """Per-query values of a band of ``width`` features starting at ``start[k]`` along dim ``dim``.

    ``dim`` counts in the unbatched activation ``(B, ...)``; ``values`` has a leading query
    dimension, so the band lies along ``dim + 1`` there.
    """

    values: torch.Tensor
    start: torch.Tensor
    width: int
    dim: int


@dataclass
class _BandedSkip:
    """The skip input of a residual block for ``K`` queries: the cached one, differing by a band."""

    cached: torch.Tensor
    band: _Band


def _gather_band(a: torch.Tensor, dim: int, start: torch.Tensor, width: int) -> torch.Tensor:
    """``a[..., start[k]:start[k]+width, ...]`` (along ``dim``) for every k, stacked in front."""
    idx = (start[:, None] + torch.arange(width, device=start.device)).reshape(-1)
    # gathered along the leading dimension, so the result is laid out query-major (contiguous)
    return a.movedim(dim, 0)[idx].unflatten(0, (start.shape[0], width)).movedim(1, dim + 1)


def _densify(a: torch.Tensor, band: _Band) -> torch.Tensor:
    """``K`` copies of ``a`` with each query's band replaced by its values."""
    k = band.start.shape[0]
    full = a.unsqueeze(0).expand(k, *a.shape).clone()
    shape = [k] + [1] * band.dim + [band.width] + [1] * (a.dim() - band.dim - 1)
    idx = (band.start[:, None] + torch.arange(band.width, device=a.device)).reshape(shape)
    return full.scatter_(band.dim + 1, idx.expand_as(band.values), band.values)


class _StepCache:
    """One base-point forward, its cached activations, and the per-chunk evaluations built on it."""

    def __init__(self, staging: Staging, oracle, base, inputs, targets):
        self.staging, self.base, self.model = staging, base, oracle.model
        self.loss = QueryLoss(oracle.loss_fn, targets)
        skips: list = []
        self.acts, self.peaks = [inputs], []
        for unit in staging.units:
            sizes: list[int] = []

            def hook(_m, _a, out, sizes=sizes):
                if isinstance(out, torch.Tensor):
                    sizes.append(out.numel())

            handles = [m.register_forward_hook(hook) for m in unit.module.modules()] if unit.kind != "enter" else []
            try:
                h = self.acts[-1]
                out = unit.step(h.clone() if unit.inplace and isinstance(h, torch.Tensor) else h, base, skips)
            finally:
                for handle in handles:
                    handle.remove()
            self.acts.append(out)
            self.peaks.append(max(sizes + [out.numel() if isinstance(out, torch.Tensor) else 1]))
        # the base loss by the same formula as the perturbed ones, so that float32 differences cancel
        self.base_loss = self.loss.single(self.acts[-1])
        if self.base_loss.numel() != 1:  # the vectorized fallback reports the bad loss as the serial path does
            raise ValueError(f"loss_fn returned {self.base_loss.numel()} values, not a scalar")
        self._extras: dict = {}

    def peak_from(self, u: int) -> int:
        """Elements of the largest activation of a forward from unit ``u`` on (for one query)."""
        last = self.acts[-1].numel() if isinstance(self.acts[-1], torch.Tensor) else 1
        return max(self.peaks[u:], default=last)

    def band_numel(self, u: int) -> int:
        """Elements of one channel of unit ``u``'s output (the band a perturbed parameter changes)."""
        y = self.acts[u + 1]
        return y.numel() // max(1, y.shape[-1] if self.staging.units[u].kind == "linear" else y.shape[1])

    # ------------------------------------------------------------------ dense evaluation
    def tail(self, start: int, h, overrides: dict, innermost_skip: torch.Tensor | None = None):
        """Model output after running units ``start..`` on ``h`` (parameters: base, or ``overrides``
        by layout name); residual blocks open at ``start`` take their skip input from the cache
        (the innermost one ``innermost_skip`` if given)."""
        params = {**self.base, **overrides} if overrides else self.base
        skips = [self.acts[e] for e in self.staging.enclosing[start]]
        if innermost_skip is not None:
            skips[-1] = innermost_skip
        return self.staging.run(h, params, start, skips=skips)

    def generic_losses(self, u: int, batched: dict) -> torch.Tensor:
        """Losses of queries that perturb the given tensors (batched, by layout name), from unit ``u`` on."""
        return query_losses(lambda p: self.tail(u, self.acts[u], p), batched, self.loss, self.model)

    def dense_losses(self, start: int, h: torch.Tensor, skip: _Band | None = None) -> torch.Tensor:
        """Losses of stacked inputs ``h`` (``(K, ...)``) of unit ``start``, run to the end; ``skip``:
        the band by which the innermost open residual block's skip input differs from the cached one."""
        if start == len(self.staging.units):
            return self.loss.stacked(h)
        unvmappable = known_unvmappable(self.model)
        if skip is not None and not unvmappable:  # a banded skip: added where needed, never copied whole
            return self.loss.stacked(self.stacked_forward(start, h, skip))
        if h.shape[0] == 1 or unvmappable:
            if skip is None:
                return query_losses(lambda x: self.tail(start, x, {}), h, self.loss, self.model)
            entry = self.staging.enclosing[start][-1]
            both = {"h": h, "skip": _densify(self.acts[entry], skip)}
            return query_losses(lambda d: self.tail(start, d["h"], {}, d["skip"]), both, self.loss, self.model)
        return self.loss.stacked(self.stacked_forward(start, h, skip))

    # ------------------------------------------------------------------ the stacked K x B forward
    def stacked_forward(self, start: int, h: torch.Tensor, skip: _Band | None = None,
                        stop: int | None = None) -> torch.Tensor:
        """Units ``start..`` on ``K`` queries' inputs ``h`` (``(K, B, ...)``) run as one ``K * B`` batch.

        Layers that treat every sample alike (convolutions, linear layers, activations, pooling)
        run on the ``K * B`` batch directly; BatchNorm with batch statistics normalizes each query
        over its own ``B`` samples; anything else runs per query under ``vmap``. Faster on a CPU
        than one ``vmap`` over the whole tail, which transposes the batch around every BatchNorm.
        """
        k = h.shape[0]
        x = h.flatten(0, 1)
        skips: list = [self.acts[e] for e in self.staging.enclosing[start]]  # cached: (B, ...), shared by all queries
        if skip is not None:
            skips[-1] = _BandedSkip(skips[-1], skip)
        for v in range(start, len(self.staging.units) if stop is None else stop):
            unit, params = self.staging.units[v], self._local(v)
            if unit.kind == "enter":
                skips.append(x)
            elif unit.kind == "merge":
                x = self._stacked_merge(unit, x, skips.pop(), params, k)
            elif unit.kind in ("conv", "linear", "elementwise", "pool", "flatten"):
                x = unit(x, params)
            elif unit.kind == "batchnorm" and _batchnorm_is_stateless(unit):
                x = self._stacked_batchnorm(v, unit, x, params, k)
            elif unit.kind == "fx":  # a traced graph segment: reads and rewrites the live values itself
                x = unit.module.stacked_step(x, params, skips, k, self.acts[v], self.acts[v + 1])
            else:
                x = _per_query(lambda t, u=unit, p=params: u(t, p), x, k)
        return x.unflatten(0, (k, -1))

    def _stacked_batchnorm(self, v: int, unit: Unit, x: torch.Tensor, params: dict, k: int) -> torch.Tensor:
        m = unit.module
        if not (m.training or (m.running_mean is None and m.running_var is None)):
            return unit(x, params)  # running statistics: the same affine map for every sample
        weight, bias = unit.tensor("weight", params), unit.tensor("bias", params)
        if k == 1:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, m.eps)
        # per query and channel over (B, ...): sums of the values shifted by the base point's channel
        # means (so that E[d^2] - E[d]^2 does not cancel), then d * scale + shift in place (large
        # fresh buffers are expensive on a CPU: every one is new pages)
        d = x.unflatten(0, (k, -1)) - self._channel_mean(v)  # (K, B, C, ...)
        dims = [1] + list(range(3, d.dim()))
        mean = d.mean(dims, keepdim=True)
        var = (d.square().mean(dims, keepdim=True) - mean.square()).clamp_min_(0)
        scale = torch.rsqrt(var + m.eps)
        if weight is not None:
            scale = scale * weight.view([1, 1, -1] + [1] * (d.dim() - 3))
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.view([1, 1, -1] + [1] * (d.dim() - 3))
        return d.mul_(scale).add_(shift).flatten(0, 1)  # in place: d is this function's own buffer

    def _channel_mean(self, v: int) -> torch.Tensor:
        """Per-channel mean of unit ``v``'s cached input, shaped ``(1, 1, C, 1...)``."""
        key = ("channel_mean", v)
        if key not in self._extras:
            a = self.acts[v]
            mean = a.mean([0] + list(range(2, a.dim())))
            self._extras[key] = mean.view([1, 1, -1] + [1] * (a.dim() - 2))
        return self._extras[key]

    @staticmethod
    def _stacked_merge(unit: Unit, x: torch.Tensor, skip: torch.Tensor | _BandedSkip, params: dict,
                       k: int) -> torch.Tensor:
        """``activation(x + shortcut(skip))`` of a residual block; ``skip`` is cached (shared) or stacked."""
        block = unit.module
        if isinstance(skip, _BandedSkip):
            if type(block.shortcut) is not nn.Identity:  # the shortcut of every query's own skip input
                skip = _densify(skip.cached, skip.band).flatten(0, 1)
            else:  # cached skip for all, plus each query's band
                out = x.unflatten(0, (k, -1)) + skip.cached
                band = skip.band
                delta = band.values - _gather_band(skip.cached, 1, band.start, band.width)
                idx = (band.start[:, None] + torch.arange(band.width, device=x.device))
                idx = idx.reshape(k, 1, band.width, *[1] * (delta.dim() - 3)).expand_as(delta)
                out = out.scatter_add_(2, idx, delta).flatten(0, 1)
                act = block.activation
                return act(out) if unit_kind(act) == "elementwise" else _per_query(
                    lambda t: block.apply_activation(t, params), out, k)
        shared = skip.shape[0] != x.shape[0]
        if type(block.shortcut) is nn.Identity:
            s = skip
        elif shared:
            s = block.apply_shortcut(skip, params)
        else:
            s = _per_query(lambda t: block.apply_shortcut(t, params), skip, k)
        out = (x.unflatten(0, (k, -1)) + s).flatten(0, 1) if shared else x + s
        act = block.activation
        if unit_kind(act) == "elementwise":
            return act(out)
        return _per_query(lambda t: block.apply_activation(t, params), out, k)

    # ------------------------------------------------------------------ explicit deltas
    def route(self, u: int, name: str) -> list | None:
        """How a band started at unit ``u`` (perturbing tensor ``name``) travels, or ``None``.

        A list of ``(op, unit)`` steps ending in ``("receive", v)`` (unit ``v`` absorbs the band
        into its dense output) or ``("densify", v)`` (the band is written into unit ``v``'s input).
        """
        units, acts = self.staging.units, self.acts
        unit = units[u]
        local = next(lo for lo, full in unit.params if full == name)
        if local not in ("weight", "bias") or not all(isinstance(a, torch.Tensor) for a in acts[u:u + 2]):
            return None
        dim = _band_start_dim(unit, acts[u], acts[u + 1])
        if dim is None:
            return None
        steps: list = []
        entered = None  # position in steps of the block entry the band passed (its skip carries the band)
        for v in range(u + 1, len(units)):
            if not isinstance(acts[v], torch.Tensor):
                return None
            kind = units[v].kind
            if kind == "elementwise" or (kind in ("pool", "flatten") and dim == 1) or (
                    kind == "batchnorm" and dim == 1 and _batchnorm_is_stateless(units[v])):
                steps.append((kind, v))
            elif kind == "merge" and dim == 1 and entered is None and _merge_carries(units[v]):
                steps.append((kind, v))  # the block's own skip input is cached: the band stays a band
            elif kind == "enter" and dim == 1 and entered is None:
                entered = len(steps)
                steps.append((kind, v))
            elif _receives(units[v], acts[v], dim):
                return steps + [("receive", v)]
            else:
                break
        else:
            if not isinstance(acts[-1], torch.Tensor):
                return None
            v = len(units)
        if entered is not None:  # the skip holds the band until the block's merge: densify at the entry
            return steps[:entered] + [("densify", steps[entered][1])]
        return steps + [("densify", v)]

    def dense_input(self, plan: QueryPlan, layout, chunk: torch.Tensor, u: int,
                    route: list) -> tuple[torch.Tensor, _Band | None]:
        """The stacked input ``(K, ...)`` of unit ``_dense_start(route)`` for coordinate steps (plan
        queries ``chunk``) that all perturb one tensor of unit ``u`` (explicit delta, carried band),
        and the band of the skip input of the residual block the route entered (or ``None``)."""
        rows = chunk.to(plan.base.device) - int(plan.include_base)
        assert plan.coords is not None and plan.offsets is not None  # a coordinate plan
        coords = plan.coords[rows]
        t = int(layout.block_index(coords[:1]))
        name, lo = layout.names[t], layout.offsets[t]
        dtype = self.acts[u + 1].dtype
        moved = (plan.base[coords] + plan.offsets[rows].to(plan.base.dtype)).to(dtype)
        h = (moved - plan.base[coords].to(dtype)).to(self.acts[u].device)
        flat = (coords - lo).to(self.acts[u].device)
        band = self._start(u, name, flat, h)
        skip = None
        for op, v in route[:-1]:
            if op == "enter":
                skip = band  # the block's skip input: the cached one with this band
            else:
                band = self._carry(op, v, band)
        end, v = route[-1]
        return (self._receive(v, band) if end == "receive" else _densify(self.acts[v], band)), skip

    def _start(self, u: int, name: str, flat: torch.Tensor, h: torch.Tensor) -> _Band:
        unit = self.staging.units[u]
        local = next(lo for lo, full in unit.params if full == name)
        x, y = self.acts[u], self.acts[u + 1]
        k = flat.shape[0]
        hb = h.view(k, *[1] * y.dim())
        m = unit.module
        if unit.kind == "linear":
            dim = y.dim() - 1
            if local == "bias":
                return _Band(_gather_band(y, dim, flat, 1) + hb, flat, 1, dim)
            i, j = flat // m.in_features, flat % m.in_features
            return _Band(_gather_band(y, dim, i, 1) + hb * _gather_band(x, dim, j, 1), i, 1, dim)
        if local == "bias":
            return _Band(_gather_band(y, 1, flat, 1) + hb, flat, 1, 1)
        if unit.kind == "batchnorm":
            return _Band(_gather_band(y, 1, flat, 1) + hb * _gather_band(self._xhat(u), 1, flat, 1), flat, 1, 1)
        kh, kw = m.kernel_size
        per_out = m.weight.shape[1] * kh * kw  # weights of one output channel
        o, r = flat // per_out, flat % per_out
        channel = (o // (m.out_channels // m.groups)) * m.weight.shape[1] + r // (kh * kw)
        shifted = self._shifted_inputs(u, channel, r % (kh * kw))
        return _Band(_gather_band(y, 1, o, 1) + hb * shifted.unsqueeze(2), o, 1, 1)

    def _shifted_inputs(self, u: int, channel: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        """For each query, input channel ``channel[k]`` of conv unit ``u`` as seen by kernel tap
        ``tap[k]`` (the window the weight ``W[:, c, i, j]`` multiplies): ``(K, B, H_out, W_out)``."""
        m, y = self.staging.units[u].module, self.acts[u + 1]
        key = ("padded", u)
        if key not in self._extras:
            ph, pw = m.padding
            self._extras[key] = F.pad(self.acts[u], (pw, pw, ph, ph))
        x = self._extras[key]
        (_, kw), (dh, dw), (sh, sw) = m.kernel_size, m.dilation, m.stride
        ho, wo = y.shape[2:]
        out = y.new_empty(channel.shape[0], y.shape[0], ho, wo)
        for t in torch.unique(tap).tolist():
            sel = (tap == t).nonzero().flatten()
            i, j = divmod(t, kw)
            window = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            out[sel] = window.index_select(1, channel[sel]).movedim(1, 0)
        return out

    def _carry(self, op: str, v: int, band: _Band) -> _Band:
        """The band after a channel-wise unit."""
        unit, values = self.staging.units[v], band.values
        if op == "elementwise":
            return _Band(unit.module(values), band.start, band.width, band.dim)
        k, b = values.shape[:2]
        if op == "pool":
            out = unit.module(values.reshape(k * b, *values.shape[2:]))
            return _Band(out.reshape(k, b, *out.shape[1:]), band.start, band.width, band.dim)
        if op == "flatten":
            per_channel = math.prod(values.shape[3:])
            return _Band(values.reshape(k, b, -1), band.start * per_channel, band.width * per_channel, 1)
        if op == "merge":  # activation(band + shortcut(cached skip)[band])
            shortcut = _gather_band(self._shortcut(v), 1, band.start, band.width)
            return _Band(unit.module.activation(values + shortcut), band.start, band.width, band.dim)
        return _Band(self._batchnorm_band(v, values, band), band.start, band.width, band.dim)

    def _local(self, v: int) -> dict:
        """Base values of unit ``v``'s parameters by local name."""
        return {local: self.base[full] for local, full in self.staging.units[v].params}

    def _batchnorm_band(self, v: int, values: torch.Tensor, band: _Band) -> torch.Tensor:
        """BatchNorm unit ``v`` applied to the band alone (per-query batch statistics, or running ones)."""
        unit = self.staging.units[v]
        m, params = unit.module, self._local(v)
        k = values.shape[0]
        shape = [k, 1, band.width] + [1] * (values.dim() - 3)
        idx = (band.start[:, None] + torch.arange(band.width, device=values.device)).reshape(-1)

        def per_query(t):
            return t.index_select(0, idx).reshape(shape)

        if m.training or (m.running_mean is None and m.running_var is None):
            dims = [1] + list(range(3, values.dim()))
            mean = values.mean(dims, keepdim=True)
            var = (values - mean).square().mean(dims, keepdim=True)
        else:
            mean, var = per_query(m.running_mean), per_query(m.running_var)
        out = (values - mean) * torch.rsqrt(var + m.eps)
        weight, bias = unit.tensor("weight", params), unit.tensor("bias", params)
        if weight is not None:
            out = out * per_query(weight)
        return out + per_query(bias) if bias is not None else out

    def _receive(self, v: int, band: _Band) -> torch.Tensor:
        """Dense output ``(K, ...)`` of linear unit ``v`` whose input differs from the cached one in the band."""
        unit = self.staging.units[v]
        a, y = self.acts[v], self.acts[v + 1]
        delta = band.values - _gather_band(a, band.dim, band.start, band.width)
        k, w = band.start.shape[0], band.width
        idx = (band.start[:, None] + torch.arange(w, device=a.device)).reshape(-1)
        weight = unit.tensor("weight", self._local(v))
        wb = weight.index_select(1, idx).unflatten(1, (k, w)).movedim(1, 0)  # (K, out, w, *kernel)
        if unit.kind == "linear":
            out = delta.reshape(k, -1, w).bmm(wb.transpose(1, 2)).reshape(k, *y.shape)
            return out.add_(y)
        m = unit.module
        if len(m.kernel_size) == 2 and not isinstance(m.padding, str):  # one small GEMM per query over im2col
            kb = delta.shape[:2]
            cols = _im2col(delta.reshape(k * kb[1], w, *delta.shape[3:]), m)  # (K*B, w*kh*kw, L)
            cols = cols.unflatten(0, kb).movedim(2, 1).reshape(k, cols.shape[1], -1)  # (K, w*kh*kw, B*L)
            out = wb.reshape(k, wb.shape[1], -1).bmm(cols)  # (K, out, B*L)
            out = out.unflatten(2, (kb[1], -1)).movedim(1, 2).reshape(k, *y.shape)  # (K, B, out, ...)
            return out.add_(y)
        x = delta.movedim(0, 1).reshape(a.shape[0], k * w, *delta.shape[3:])
        conv = _CONV_FN[len(m.kernel_size)]
        out = conv(x, wb.reshape(-1, w, *wb.shape[3:]), None, m.stride, m.padding, m.dilation, k)
        return out.reshape(y.shape[0], k, *y.shape[1:]).movedim(1, 0).contiguous().add_(y)

    def _shortcut(self, v: int) -> torch.Tensor:
        """``shortcut(skip)`` of merge unit ``v`` at the base point (the skip is the block's cached input)."""
        key = ("shortcut", v)
        if key not in self._extras:
            entry = self.staging.enclosing[v][-1]
            self._extras[key] = self.staging.units[v].module.apply_shortcut(self.acts[entry], self._local(v))
        return self._extras[key]

    def _xhat(self, u: int) -> torch.Tensor:
        """The normalized (pre-affine) output of BatchNorm unit ``u`` at the base point."""
        key = ("xhat", u)
        if key not in self._extras:
            m = self.staging.units[u].module
            use_batch = m.training or (m.running_mean is None and m.running_var is None)
            mean, var = (None, None) if m.training else (m.running_mean, m.running_var)
            self._extras[key] = F.batch_norm(self.acts[u], mean, var, None, None, use_batch, 0.0, m.eps)
        return self._extras[key]


def _per_query(fn, x: torch.Tensor, k: int) -> torch.Tensor:
    """``fn`` applied to each query's ``B`` samples of the stacked batch ``x`` (``(K * B, ...)``)."""
    h = x.unflatten(0, (k, -1))
    try:
        out = vmap(fn)(h)
    except RuntimeError as exc:
        if not is_vmap_error(exc):
            raise
        out = torch.stack([fn(t) for t in h])
    return out.flatten(0, 1)


def _im2col(x: torch.Tensor, conv) -> torch.Tensor:
    """``F.unfold(x, ...)`` for the 2-D convolution ``conv``: ``(N, C * kh * kw, L)``.

    Built from ``kh * kw`` strided slices of the padded input; ``F.unfold`` loops over the ``N``
    images, which is slow for the many small images of a stacked ``K x B`` batch.
    """
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    ph, pw = conv.padding
    x = F.pad(x, (pw, pw, ph, ph))
    ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, 2).reshape(x.shape[0], -1, ho * wo)


def _band_start_dim(unit: Unit, x: torch.Tensor, y: torch.Tensor) -> int | None:
    """The dimension a perturbed parameter of ``unit`` changes one slice of, or ``None``."""
    if unit.kind == "linear" and x.dim() >= 2:
        return y.dim() - 1
    conv_ok = unit.kind == "conv" and x.dim() == 4 and not isinstance(unit.module.padding, str)
    if conv_ok or (unit.kind == "batchnorm" and x.dim() >= 2 and _batchnorm_is_stateless(unit)):
        return 1
    return None


def _receives(unit: Unit, a: torch.Tensor, dim: int) -> bool:
    """Whether linear ``unit`` can absorb a band along ``dim`` of its input ``a``."""
    if unit.kind == "linear":
        return dim == a.dim() - 1
    m = unit.module
    return unit.kind == "conv" and dim == 1 and m.groups == 1 and a.dim() == len(m.kernel_size) + 2


def _merge_carries(unit: Unit) -> bool:
    """Whether a band of a residual block's body passes its merge as a band (elementwise activation)."""
    return unit_kind(unit.module.activation) == "elementwise"


def _batchnorm_is_stateless(unit: Unit) -> bool:
    """Whether a BatchNorm unit's forward leaves its running statistics alone (always in query mode)."""
    return not (unit.module.training and unit.module.track_running_stats)
