"""PhiFlow solvers as black boxes, and the solver-in-the-loop oracle (DeepZero's PDE application).

A coarse PDE solver drifts from a finer reference; a small correction network applied after every
coarse step fixes it (Um et al., "Solver-in-the-Loop", NeurIPS 2020). Training the network well
needs the loss of several *unrolled* corrected solver steps. DeepZero (Chen et al., ICLR 2024,
Sec. 5) treats the solver as an opaque function and trains the network with CGE. This module
provides the pieces:

* :class:`PhiFlowStep` -- one step of a PhiFlow simulation as a black-box function of native torch
  tensors ``(B, C, *spatial)``. Every row of ``B`` goes into PhiFlow's batch dimension, so one
  solver call serves many queries. It runs without autodiff (``torch.no_grad()``) and
  ``phi.math.jit_compile``-d unless ``autodiff=True`` is asked for (the FO-SOL reference).
* :class:`CorrectionCNN` -- a small CNN with circular (or other) padding whose :meth:`~CorrectionCNN.batched`
  evaluates ``K`` parameter sets at once (one batched matrix product per layer).
* :class:`SolverInTheLoopOracle` -- network parameters -> loss of ``unroll`` corrected coarse
  steps against the downsampled reference; the ``K`` queries of a plan are ``K * batch_size`` rows
  of one batched solver call per unrolled step. Results do not depend on how queries are batched.
* :func:`rollout`, :func:`rollout_mae` -- the test metric; :func:`train_non`,
  :func:`train_fo_sol`, :func:`train_zo_sol` -- the methods SRC/NON/FO-SOL/ZO-SOL/RGE-SOL.

Scenarios (a solver at one resolution plus its data) live in :mod:`zoblackbox.adapters.burgers`
(1-D forced Burgers, the default) and :mod:`zoblackbox.adapters.wake` (2-D wake behind a cylinder).

**Finite-difference step.** Near a good solution the loss is small (~1e-5) and its gradient
tiny next to its curvature, so forward differences carry a bias ``mu/2 * H_ii`` that dominates:
at NON's parameters forward CGE at ``mu=1e-3`` and ``1e-4`` points *away* from the autograd
gradient (cosine -0.99 and -0.89 in ``tests/test_pde.py``), at ``mu=1e-6`` it matches (cosine
1.0000, 1.5% relative error), and so do central differences at ``1e-3``/``1e-4`` (twice the
queries). Hence the adapter's documented default :func:`default_estimator`: forward CGE,
``mu = DEFAULT_MU = 1e-6``, which needs the oracle's float64 and a solver without iterative
tolerances (the Burgers step is exact); with an iterative pressure solve (the wake scenario) use
central differences at a larger ``mu``.

PhiFlow is imported lazily; without it a :class:`~zoblackbox.errors.MissingDependencyError` names
the ``pde`` extra.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoblackbox.engine import AskTell
from zoblackbox.errors import ConfigError, MissingDependencyError
from zoblackbox.estimators import CoordinateEstimator, Estimator
from zoblackbox.oracle import Oracle, RawResult
from zoblackbox.params import ParamLayout
from zoblackbox.result import ZOResult
from zoblackbox.schedules import schedule_from

__all__ = [
    "DEFAULT_MU",
    "PDE_INSTALL_HINT",
    "CorrectionCNN",
    "PhiFlowStep",
    "SimulationSet",
    "SolverInTheLoopOracle",
    "TrainResult",
    "default_estimator",
    "require_phiflow",
    "rollout",
    "rollout_mae",
    "rollout_maes",
    "semi_lagrangian_1d",
    "solver_blackbox",
    "train_fo_sol",
    "train_hybrid_sol",
    "train_non",
    "train_zo_sol",
]

PDE_INSTALL_HINT = 'pip install "zoblackbox[pde]"  (the pde extra; or: pip install phiflow)'
#: CGE step of the adapter: forward differences at 1e-3 and 1e-4 are biased here (module docstring)
DEFAULT_MU = 1e-6


def default_estimator() -> CoordinateEstimator:
    """The adapter's documented default: forward-difference CGE with ``mu = DEFAULT_MU`` (1e-6, float64)."""
    return CoordinateEstimator(mu=DEFAULT_MU, scheme="forward")


def require_phiflow():
    """Import PhiFlow (with its torch backend) or raise ``MissingDependencyError`` naming the extra."""
    try:
        import phi
        import phi.torch  # registers PhiFlow's torch backend
    except ImportError as exc:
        raise MissingDependencyError(
            f"the PhiFlow adapter needs PhiFlow, which is not installed ({exc}); install it with {PDE_INSTALL_HINT}"
        ) from exc
    return phi


# --------------------------------------------------------------------------- 1-D advection
def semi_lagrangian_1d(field, velocity, dt: float):
    """Semi-Lagrangian advection of a periodic 1-D ``CenteredGrid`` on every PhiFlow backend.

    The same scheme as PhiFlow's ``advect.semi_lagrangian`` (one backward Euler lookup, linear
    interpolation between the two neighbouring cell centres), written with ``phiml.math.gather``.
    PhiFlow 3.4's own function fails in 1-D on the torch backend: its ``grid_sample`` hands
    ``torch.nn.functional.grid_sample`` 3-D tensors, which torch rejects ("expected 4D or 5D
    input"). ``tests/test_pde.py`` checks this function against PhiFlow's on the numpy backend and
    checks that autograd flows through it on torch.

    Non-finite velocities do not index out of range: their cells come back as NaN, so a diverging
    row of a batch stays in its row.

    Args:
        field: the advected quantity, a periodic 1-D ``CenteredGrid`` (any batch dimensions).
        velocity: a ``CenteredGrid`` of the same resolution (scalar, or with a ``vector`` dim of 1).
        dt: time step.
    """
    require_phiflow()
    from phi import math
    from phi.math import channel, extrapolation, spatial

    if field.spatial_rank != 1 or not field.is_grid or not field.is_centered:
        raise ConfigError(f"semi_lagrangian_1d advects a 1-D CenteredGrid, got a field of shape {field.shape}")
    if field.extrapolation != extrapolation.PERIODIC:
        raise ConfigError(f"semi_lagrangian_1d supports periodic boundaries only, got {field.extrapolation}")
    if velocity.resolution != field.resolution:
        raise ConfigError(f"velocity resolution {velocity.resolution} differs from the field's {field.resolution}")
    dim = field.resolution.names[0]
    n = field.resolution.size
    dx = float(field.bounds.size.numpy().reshape(-1)[0]) / n
    v = velocity.values
    if "vector" in v.shape:
        v = v["vector", 0]
    finite = math.is_finite(v)
    shift = math.where(finite, v, 0) * (dt / dx)  # displacement in cells
    back = math.range(spatial(**{dim: n})) - shift
    lower = math.floor(back)
    w = back - lower
    i0 = math.to_int32(lower % n)  # float remainder first: always in [0, n)
    i0 = math.clip(i0, 0, n - 1)
    i1 = (i0 + 1) % n
    values = field.values
    v0 = math.gather(values, math.expand(i0, channel(index=dim)))
    v1 = math.gather(values, math.expand(i1, channel(index=dim)))
    out = (1 - w) * v0 + w * v1
    return field.with_values(math.where(finite, out, math.nan))


# --------------------------------------------------------------------------- the black-box step
class PhiFlowStep:
    """One solver step of a PhiFlow scenario as a black-box function of native torch tensors.

    ``step(state, aux)`` maps a ``(B, C, *spatial)`` state (and an optional ``(B, Ca, *spatial)``
    auxiliary input such as the forcing) to the next state. The ``B`` rows go into one PhiFlow
    batch dimension, so a single call advances many queries at once. The call runs under
    ``torch.no_grad()`` and through ``phi.math.jit_compile`` (one trace per batch size);
    ``autodiff=True`` turns autograd on (FO-SOL, the reference; the traced step is differentiable).

    Args:
        scenario: an object with ``state_shape`` and ``aux_shape`` (per-row shapes, ``aux_shape``
            ``None`` when there is no auxiliary input), ``wrap(state, aux)`` (native tensors ->
            ``phiml`` tensors with a batch dim ``b``), ``phi_step(state, aux)`` (``phiml`` tensors ->
            the next state's ``phiml`` tensor; it builds the PhiFlow fields and runs the solver)
            and ``unwrap(tensor)`` (-> native ``(B, C, *spatial)``). See the Burgers and wake
            scenarios. Jit-compiling a function of plain tensors, not of fields, keeps PhiFlow's
            per-call signature check cheap (comparing field geometries measured ~20 ms a call).
        jit: trace the step with ``phi.math.jit_compile`` (ignored for scenarios whose
            ``jit_supported`` is ``False``: PhiFlow 3.4 cannot trace the wake step's obstacle
            pressure solve on torch, its obstacle masks are numpy constants inside a custom
            autograd function).

    Attributes:
        calls: solver calls so far; ``rows``: batch rows advanced so far (``sum of B``).
    """

    def __init__(self, scenario, *, jit: bool = True):
        require_phiflow()
        from phi import math

        for attr in ("state_shape", "aux_shape", "wrap", "phi_step", "unwrap"):
            if not hasattr(scenario, attr):
                raise ConfigError(f"scenario {type(scenario).__name__} has no {attr!r}; see PhiFlowStep's docstring")
        self.scenario = scenario
        self.jit = bool(jit) and getattr(scenario, "jit_supported", True)
        self._jitted = math.jit_compile(scenario.phi_step) if self.jit else None
        self.calls = 0
        self.rows = 0

    def __call__(self, state: torch.Tensor, aux: torch.Tensor | None = None, *, autodiff: bool = False) -> torch.Tensor:
        from phi import math

        self._check(state, aux)
        precision = 64 if state.dtype == torch.float64 else 32
        grad_mode = torch.enable_grad() if autodiff else torch.no_grad()
        with grad_mode, math.precision(precision):
            phi_state, phi_aux = self.scenario.wrap(state, aux)
            fn = self._jitted if self._jitted is not None else self.scenario.phi_step
            out = self.scenario.unwrap(fn(phi_state, phi_aux))
        self.calls += 1
        self.rows += int(state.shape[0])
        return out.to(state.dtype)

    def _check(self, state, aux) -> None:
        sc = self.scenario
        if not isinstance(state, torch.Tensor) or tuple(state.shape[1:]) != tuple(sc.state_shape):
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ConfigError(f"state must have shape (B, {', '.join(map(str, sc.state_shape))}), got {shape}")
        if sc.aux_shape is None:
            return
        if aux is None or tuple(aux.shape) != (state.shape[0], *sc.aux_shape):
            got = None if aux is None else tuple(aux.shape)
            raise ConfigError(f"aux must have shape ({state.shape[0]}, {', '.join(map(str, sc.aux_shape))}), got {got}")


# --------------------------------------------------------------------------- data
@dataclass
class SimulationSet:
    """Coarse trajectories: the reference downsampled to the source resolution.

    Attributes:
        states: ``(S, T + 1, C, *spatial)``, frame 0 is the first recorded state.
        aux: ``(S, T, Ca, *spatial)``, the auxiliary input (forcing, obstacle mask) of step ``t``,
            or ``None``.
        info: how the data were made (scenario, seeds, resolutions).
    """

    states: torch.Tensor
    aux: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.states.dim() < 4:
            raise ConfigError(f"states must have shape (S, T+1, C, *spatial), got {tuple(self.states.shape)}")
        if self.aux is not None and (self.aux.shape[:2] != (self.n_sims, self.n_steps)
                                     or self.aux.shape[3:] != self.states.shape[3:]):
            raise ConfigError(f"aux must have shape ({self.n_sims}, {self.n_steps}, Ca, "
                              f"{', '.join(map(str, self.states.shape[3:]))}), got {tuple(self.aux.shape)}")

    @property
    def n_sims(self) -> int:
        return int(self.states.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.states.shape[1]) - 1

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.states.shape[2:])

    def to(self, dtype: torch.dtype) -> SimulationSet:
        aux = None if self.aux is None else self.aux.to(dtype)
        return SimulationSet(self.states.to(dtype), aux, dict(self.info))

    def aux_at(self, sims: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        return None if self.aux is None else self.aux[sims, t]

    def split(self, n_first: int) -> tuple[SimulationSet, SimulationSet]:
        """The first ``n_first`` simulations and the rest, e.g. a fit and a validation set
        (``1 <= n_first < n_sims``; the ``info`` of each says which part it is)."""
        if isinstance(n_first, bool) or not isinstance(n_first, int) or not 1 <= n_first < self.n_sims:
            raise ConfigError(f"n_first must be an int in [1, {self.n_sims - 1}] to leave both parts of the "
                              f"{self.n_sims} simulations non-empty, got {n_first!r}")
        parts = []
        for name, idx in (("first", slice(0, n_first)), ("rest", slice(n_first, self.n_sims))):
            aux = None if self.aux is None else self.aux[idx].clone()
            parts.append(SimulationSet(self.states[idx].clone(), aux,
                                       {**self.info, "part": name, "of_sims": self.n_sims}))
        return parts[0], parts[1]


def _check_compatible(step: PhiFlowStep, net: CorrectionCNN, data: SimulationSet) -> None:
    sc = step.scenario
    if tuple(data.state_shape) != tuple(sc.state_shape):
        raise ConfigError(f"mismatched resolutions: the data's states have shape {data.state_shape}, the solver "
                          f"steps states of shape {tuple(sc.state_shape)}")
    n_aux = 0 if data.aux is None else int(data.aux.shape[2])
    if (sc.aux_shape is None) != (data.aux is None) or (sc.aux_shape is not None and sc.aux_shape[0] != n_aux):
        raise ConfigError(f"the data carry {n_aux} auxiliary channels, the solver expects "
                          f"{0 if sc.aux_shape is None else sc.aux_shape[0]}")
    if net.in_channels != sc.state_shape[0] + n_aux or net.out_channels != sc.state_shape[0]:
        raise ConfigError(f"the network maps {net.in_channels} -> {net.out_channels} channels; this solver needs "
                          f"{sc.state_shape[0] + n_aux} -> {sc.state_shape[0]} (state + aux -> state correction)")
    if net.spatial_rank != len(sc.state_shape) - 1:
        raise ConfigError(f"a {net.spatial_rank}-D network cannot correct a {len(sc.state_shape) - 1}-D state")


# --------------------------------------------------------------------------- correction network
_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


class CorrectionCNN(nn.Module):
    """A small CNN ``(state, aux) -> state correction``; all convolutions keep the spatial size.

    Args:
        in_channels: state + auxiliary channels.
        out_channels: state channels.
        hidden: channels of the hidden layers.
        kernel_size: odd kernel size.
        spatial_rank: 1 or 2.
        padding_mode: ``"circular"`` (periodic domains), ``"replicate"`` or ``"zeros"``.
        activation: ``"tanh"`` (default: smooth, so finite differences see no kinks), ``"relu"``, ``"gelu"``.
        out_scale: the last layer's initial weights are scaled by it, so training starts near "no correction".
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: Sequence[int] = (8, 8), kernel_size: int = 5,
                 spatial_rank: int = 1, padding_mode: str = "circular", activation: str = "tanh",
                 out_scale: float = 0.1):
        super().__init__()
        if spatial_rank not in (1, 2):
            raise ConfigError(f"spatial_rank must be 1 or 2, got {spatial_rank!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        if padding_mode not in ("circular", "replicate", "zeros"):
            raise ConfigError(f"padding_mode must be 'circular', 'replicate' or 'zeros', got {padding_mode!r}")
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        chans = [int(in_channels), *[int(h) for h in hidden], int(out_channels)]
        if min(chans) < 1:
            raise ConfigError(f"channel counts must be >= 1, got {chans}")
        conv = nn.Conv1d if spatial_rank == 1 else nn.Conv2d
        self.layers = nn.ModuleList(conv(a, b, kernel_size) for a, b in itertools.pairwise(chans))
        with torch.no_grad():
            self.layers[-1].weight.mul_(out_scale)
            self.layers[-1].bias.mul_(out_scale)
        self.in_channels, self.out_channels = chans[0], chans[-1]
        self.spatial_rank, self.kernel_size = spatial_rank, kernel_size
        self.padding_mode, self.activation = padding_mode, activation
        self.layout = ParamLayout.from_tensors(list(self.named_parameters()))

    def _pad(self, h: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size // 2
        if p == 0:
            return h
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(h, (p, p) * self.spatial_rank, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ordinary module forward, ``(N, in_channels, *spatial) -> (N, out_channels, *spatial)``."""
        act = _ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            x = layer(self._pad(x))
            if i < len(self.layers) - 1:
                x = act(x)
        return x

    def get_params(self) -> torch.Tensor:
        return self.layout.flatten(dict(self.named_parameters()))

    def set_params(self, x: torch.Tensor) -> None:
        named = dict(self.named_parameters())
        with torch.no_grad():
            for name, t in self.layout.unflatten(torch.as_tensor(x).to(named[self.layout.names[0]])).items():
                named[name].copy_(t)

    def batched(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``K`` parameter sets at once: ``params (K, dim)``, ``x (K, N, in, *spatial)`` ->
        ``(K, N, out, *spatial)``. Row ``k`` equals :meth:`forward` with the parameters
        ``params[k]``; rows never interact.

        Each convolution is one batched matrix product over the ``K`` parameter sets
        (``torch.baddbmm`` of the ``(K, out, in * k^r)`` weights with the ``N`` samples' unfolded
        inputs, laid out ``(K, C, N, *spatial)`` so no transpose is copied between layers). It
        computes the same as a grouped convolution with ``groups=K``, which torch runs as a
        Python-level loop over groups in float64 on the CPU (measured 2-4x slower here).
        """
        if params.dim() != 2 or params.shape[1] != self.layout.dim:
            raise ConfigError(f"params must have shape (K, {self.layout.dim}), got {tuple(params.shape)}")
        K = int(params.shape[0])
        if x.dim() != 3 + self.spatial_rank or x.shape[0] != K or x.shape[2] != self.in_channels:
            raise ConfigError(f"x must have shape ({K}, N, {self.in_channels}, <{self.spatial_rank} spatial dims>), "
                              f"got {tuple(x.shape)}")
        N, spatial = int(x.shape[1]), tuple(x.shape[3:])
        size = math.prod(spatial)
        k = self.kernel_size
        tensors = self.layout.unflatten_batch(params.to(x.dtype))
        act = _ACTIVATIONS[self.activation]
        h = x.transpose(1, 2)  # (K, C, N, *spatial): the layout every layer keeps
        for i in range(len(self.layers)):
            w, b = tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]
            c = h.shape[1]
            padded = self._pad(h.reshape(K, c * N, *spatial))
            padded = padded.reshape(K, c, N, *padded.shape[2:])
            if self.spatial_rank == 1:
                taps = [padded[..., j:j + spatial[0]] for j in range(k)]
            else:
                taps = [padded[..., dy:dy + spatial[0], dx:dx + spatial[1]] for dy in range(k) for dx in range(k)]
            cols = torch.stack(taps, dim=2).reshape(K, c * len(taps), N * size)  # (K, C*k^r, N*size)
            h = torch.baddbmm(b.unsqueeze(-1), w.reshape(K, w.shape[1], -1), cols).reshape(K, -1, N, *spatial)
            if i < len(self.layers) - 1:
                h = act(h)
        h = h.transpose(1, 2)
        return h.reshape(K, N, self.out_channels, *spatial)


def _correction(step: PhiFlowStep, net: CorrectionCNN, params: torch.Tensor, s: torch.Tensor,
                aux: torch.Tensor | None, K: int) -> torch.Tensor:
    """The network's correction of the ``K * N`` rows of ``s`` (row ``k * N + n``: parameter set
    ``k``, sample ``n``), zero where the scenario's ``state_mask`` marks padding."""
    inp = s if aux is None else torch.cat([s, aux], dim=1)
    corr = net.batched(params, inp.reshape(K, -1, *inp.shape[1:])).reshape(s.shape)
    mask = getattr(step.scenario, "state_mask", None)
    return corr if mask is None else corr * mask.to(corr)


# --------------------------------------------------------------------------- the oracle
class SolverInTheLoopOracle(Oracle):
    """Correction-network parameters -> loss of ``unroll`` corrected coarse solver steps.

    For a minibatch of ``batch_size`` (simulation, start frame) pairs of ``data``, each query
    starts from the reference state at the start frame and applies ``unroll`` times: a solver step
    (the black box), then the correction ``s <- s + net(s, aux)``. Its loss is the mean over the
    unrolled steps of each step's squared L2 error against the reference frame, normalized by the
    number of values (an MSE), averaged over the minibatch. The ``K`` queries of a batch are
    ``K * batch_size`` rows of one solver call per unrolled step.

    The minibatch is fixed until :meth:`sample_batch` or :meth:`set_batch` changes it, so all the
    queries of one gradient estimate see the same data.

    Args:
        step: the black-box solver step.
        net: the correction network (its current parameters are :meth:`get_params`).
        data: training trajectories (coarse, downsampled reference).
        unroll: solver steps per loss (``m``; 1 <= m <= data.n_steps).
        batch_size: (simulation, start) pairs per minibatch.
        seed: seed of the minibatch sampler.
        on_failure: failure policy; default ``"inf"`` -- a perturbed parameter set whose rollout
            diverges (NaN/inf states) is left out of the estimate and recorded in
            :meth:`failure_report` instead of stopping training.
        budget: query budget (exact).
        dtype: float64 by default (finite differences at ``mu = 1e-6`` need it).
        chunk_size: queries per batched evaluation.
    """

    def __init__(self, step: PhiFlowStep, net: CorrectionCNN, data: SimulationSet, *, unroll: int = 4,
                 batch_size: int = 4, seed: int = 0, on_failure="inf", budget: int | None = None,
                 dtype: torch.dtype = torch.float64, chunk_size: int = 4096):
        if not isinstance(step, PhiFlowStep):
            raise TypeError(f"step must be a PhiFlowStep, got {type(step).__name__}")
        if not isinstance(net, CorrectionCNN):
            raise TypeError(f"net must be a CorrectionCNN, got {type(net).__name__}")
        _check_compatible(step, net, data)
        for name, value, hi in (("unroll", unroll, data.n_steps), ("batch_size", batch_size, None),
                                ("chunk_size", chunk_size, None)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (hi is not None and value > hi):
                limit = f" and <= the data's {hi} steps" if hi is not None else ""
                raise ConfigError(f"{name} must be an int >= 1{limit}, got {value!r}")
        super().__init__(net.layout.dim, budget=budget, on_failure=on_failure, dtype=dtype)
        self.step, self.net, self.data = step, net, data.to(dtype)
        self.unroll, self.batch_size, self.chunk_size = unroll, batch_size, chunk_size
        self.generator = torch.Generator().manual_seed(int(seed))
        self.sims = self.starts = None
        self.sample_batch()

    # ------------------------------------------------------------------ minibatches
    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a new minibatch of (simulation, start frame) pairs from the oracle's generator."""
        g = self.generator
        sims = torch.randint(0, self.data.n_sims, (self.batch_size,), generator=g)
        starts = torch.randint(0, self.data.n_steps - self.unroll + 1, (self.batch_size,), generator=g)
        self.set_batch(sims, starts)
        return self.sims, self.starts

    def set_batch(self, sims, starts) -> None:
        """Use these (simulation, start frame) pairs for the following queries."""
        sims, starts = torch.as_tensor(sims, dtype=torch.long).reshape(-1), torch.as_tensor(starts, dtype=torch.long).reshape(-1)
        if sims.shape != starts.shape or sims.numel() == 0:
            raise ConfigError(f"sims and starts must be equally long and non-empty, got {sims.numel()} and {starts.numel()}")
        if int(sims.min()) < 0 or int(sims.max()) >= self.data.n_sims:
            raise ConfigError(f"simulation indices must lie in [0, {self.data.n_sims}), got {sims.tolist()}")
        last = self.data.n_steps - self.unroll
        if int(starts.min()) < 0 or int(starts.max()) > last:
            raise ConfigError(f"start frames must lie in [0, {last}] for unroll={self.unroll}, got {starts.tolist()}")
        self.sims, self.starts = sims, starts

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> torch.Tensor:
        return self.net.get_params().to(self.dtype)

    # ------------------------------------------------------------------ the loss
    def losses(self, X: torch.Tensor, *, autodiff: bool = False, step_fn=None) -> torch.Tensor:
        """The loss of each row of ``X`` (``(K, dim)``), one batched solver call per unrolled step.

        With ``autodiff=True`` gradients flow through the solver and the network (FO-SOL).
        ``step_fn(state, aux)`` replaces the solver step (HYBRID-SOL passes the solver wrapped as a
        :class:`~zoblackbox.nn.BlackBox`, so gradients reach the network through its estimated VJPs)."""
        data, sims, starts = self.data, self.sims, self.starts
        K, N = int(X.shape[0]), int(sims.shape[0])
        s = data.states[sims, starts].unsqueeze(0).expand(K, *([-1] * (data.states.dim() - 1)))
        s = s.reshape(K * N, *data.state_shape)
        total = torch.zeros(K, dtype=X.dtype)
        for j in range(self.unroll):
            aux = data.aux_at(sims, starts + j)
            aux_k = None if aux is None else aux.unsqueeze(0).expand(K, *aux.shape).reshape(K * N, *aux.shape[1:])
            s = self.step(s, aux_k, autodiff=autodiff) if step_fn is None else step_fn(s, aux_k)
            s = s + _correction(self.step, self.net, X, s, aux_k, K)
            ref = data.states[sims, starts + j + 1]
            err = (s.reshape(K, N, -1) - ref.reshape(1, N, -1)).pow(2).mean(dim=2)  # (K, N)
            total = total + err.mean(dim=1)
        return total / self.unroll

    def _evaluate_batch(self, X: torch.Tensor) -> torch.Tensor:
        return self.losses(X)

    def raw_evaluate(self, X: torch.Tensor) -> RawResult:
        """Batched evaluation; if the batch raises (e.g. a pressure solve diverging on one row),
        the queries are re-run one by one so the failure stays with the query that caused it."""
        raw = super().raw_evaluate(X)
        if not raw.errors or X.shape[0] == 1:
            return raw
        values = torch.empty(X.shape[0], dtype=torch.float64)
        errors: dict[int, BaseException] = {}
        for i in range(X.shape[0]):
            one = super().raw_evaluate(X[i:i + 1])
            values[i] = one.values[0]
            if one.errors:
                errors[i] = one.errors[0]
        return RawResult(values, errors)


# --------------------------------------------------------------------------- evaluation
def rollout(step: PhiFlowStep, net: CorrectionCNN | None, params: torch.Tensor | None, data: SimulationSet,
            steps: int | None = None) -> torch.Tensor:
    """Corrected coarse rollouts from every simulation's frame 0: ``(S, steps + 1, C, *spatial)``.

    ``params=None`` (or ``net=None``) rolls out the uncorrected source solver (SRC)."""
    steps = data.n_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= data.n_steps:
        raise ConfigError(f"steps must be an int in [1, {data.n_steps}], got {steps!r}")
    if net is not None and params is not None:
        _check_compatible(step, net, data)
    s = data.states[:, 0]
    out = [s]
    sims = torch.arange(data.n_sims)
    with torch.no_grad():
        for t in range(steps):
            aux = data.aux_at(sims, torch.full_like(sims, t))
            s = step(s, aux)
            if net is not None and params is not None:
                s = s + _correction(step, net, params.reshape(1, -1).to(s.dtype), s, aux, 1)
            out.append(s)
    return torch.stack(out, dim=1)


def rollout_mae(step: PhiFlowStep, net: CorrectionCNN | None, params: torch.Tensor | None, data: SimulationSet,
                steps: int | None = None) -> tuple[float, torch.Tensor]:
    """MAE of the rollouts against the reference over frames 1..steps (all simulations, values),
    and the per-frame MAE curve (length ``steps``)."""
    traj = rollout(step, net, params, data, steps)
    return _mae(traj, data.states[:, :traj.shape[1]])


def _mae(traj: torch.Tensor, ref: torch.Tensor) -> tuple[float, torch.Tensor]:
    """MAE of rollouts against reference frames over frames 1.., and the per-frame curve."""
    per_frame = (traj[:, 1:] - ref[:, 1:].to(traj.dtype)).abs().transpose(0, 1).reshape(traj.shape[1] - 1, -1)
    per_frame = per_frame.mean(dim=1)
    return float(per_frame.mean()), per_frame


def rollout_maes(step: PhiFlowStep, net: CorrectionCNN | None, params: torch.Tensor | None,
                 sets: Sequence[SimulationSet]) -> list[tuple[float, torch.Tensor]]:
    """:func:`rollout_mae` of several simulation sets of equal length from one batched rollout
    (one solver call per step for all of them; same values as separate calls)."""
    if not sets:
        raise ConfigError("sets must hold at least one SimulationSet")
    steps = {s.n_steps for s in sets}
    if len(steps) != 1:
        raise ConfigError(f"the sets must have equally many steps to share a rollout, got {sorted(steps)}")
    aux = None if sets[0].aux is None else torch.cat([s.aux for s in sets])
    joint = SimulationSet(torch.cat([s.states for s in sets]), aux)
    traj = rollout(step, net, params, joint)
    out, start = [], 0
    for s in sets:
        out.append(_mae(traj[start:start + s.n_sims], s.states))
        start += s.n_sims
    return out


# --------------------------------------------------------------------------- training
class TrainResult(ZOResult):
    """What a training method returns: a :class:`~zoblackbox.result.ZOResult` (the library's one
    result type: ``x``, ``fun``, ``nfev``, ``nit``, ``history``, ``failures``, ``wall_time``) with
    the PDE names as well.

    Attributes:
        params: final flat parameters (float64 tensor; ``x`` is the same as numpy).
        steps: optimizer steps taken (``nit``).
        queries: oracle queries spent (``nfev``; 0 for the autograd methods).
        solver_calls: batched PhiFlow calls; ``solver_rows``: rows advanced by them.
        wall_s: seconds (``wall_time``).
        history: ``{"step", "loss"}`` per logged step.
        failures: the oracle's failure report (ZO methods).
    """

    def __init__(self, params: torch.Tensor, steps: int, queries: int = 0, solver_calls: int = 0,
                 solver_rows: int = 0, wall_s: float = 0.0, history: list | None = None,
                 failures: dict | None = None):
        history = [] if history is None else history
        losses = [h["loss"] for h in history if h.get("loss") is not None]
        super().__init__(params=params, steps=steps, queries=queries, solver_calls=solver_calls,
                         solver_rows=solver_rows, wall_s=wall_s, history=history,
                         failures={} if failures is None else failures,
                         x=params.detach().cpu().numpy(), nit=steps, nfev=queries, wall_time=wall_s,
                         fun=losses[-1] if losses else math.nan, success=True, message=f"{steps} steps")


#: the PDE methods' cosine decays to this fraction of the peak learning rate at the last step
FINAL_LR_FRACTION = 0.1


def _lr_schedule(name: str, steps: int):
    """The LR factor per optimizer step: ``"cosine"`` from 1 at step 0 to :data:`FINAL_LR_FRACTION`
    at the last step (``steps - 1``), or ``"constant"``."""
    return schedule_from(name, max(1, steps - 1), final_fraction=FINAL_LR_FRACTION)


def _check_training(steps, lr, schedule) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    if schedule not in ("cosine", "constant"):
        raise ConfigError(f"lr schedule must be 'cosine' or 'constant', got {schedule!r}")


def _adam(x0: torch.Tensor, lr: float, schedule: str, steps: int) -> AskTell:
    """The engine for the first-order references (NON, FO-SOL): Adam on the flat float64 parameters,
    each step an autograd gradient handed to :meth:`AskTell.step_gradient`."""
    return AskTell(x0.detach().clone().to(torch.float64), estimator=default_estimator(), optimizer="adam", lr=lr,
                   lr_schedule=_lr_schedule(schedule, steps), maxiter=max(steps, 1), evaluate_final=False)


def train_non(step: PhiFlowStep, net: CorrectionCNN, data: SimulationSet, *, x0: torch.Tensor | None = None,
              steps: int = 2000, batch_size: int = 32, lr: float = 3e-3, lr_schedule: str = "cosine",
              seed: int = 0, log_every: int = 100) -> TrainResult:
    """NON: supervised on precomputed one-step pairs, no solver in the loop.

    Each reference frame ``r_t`` is stepped once by the source solver (one batched call,
    precomputed); the network learns ``P(r_t) + net(P(r_t), aux_t) ~ r_{t+1}`` with Adam."""
    _check_training(steps, lr, lr_schedule)
    _check_compatible(step, net, data)
    t0, calls0, rows0 = time.perf_counter(), step.calls, step.rows
    data = data.to(torch.float64)
    S, T = data.n_sims, data.n_steps
    inputs = data.states[:, :-1].reshape(S * T, *data.state_shape)
    aux = None if data.aux is None else data.aux.reshape(S * T, *data.aux.shape[2:])
    src = step(inputs, aux)  # one call: all pairs
    target = data.states[:, 1:].reshape(S * T, *data.state_shape)
    x0 = net.get_params() if x0 is None else x0
    engine = _adam(x0, lr, lr_schedule, steps)
    g = torch.Generator().manual_seed(int(seed))
    history = []
    for it in range(steps):
        idx = torch.randint(0, S * T, (batch_size,), generator=g)
        param = engine.x.requires_grad_(True)
        pred = src[idx] + _correction(step, net, param[None], src[idx], None if aux is None else aux[idx], 1)
        loss = (pred - target[idx]).pow(2).mean()
        (grad,) = torch.autograd.grad(loss, param)
        engine.step_gradient(grad, float(loss.detach()))
        if it % log_every == 0 or it == steps - 1:
            history.append({"step": it, "loss": float(loss.detach())})
    return TrainResult(engine.x, steps, 0, step.calls - calls0, step.rows - rows0,
                       time.perf_counter() - t0, history)


def train_fo_sol(oracle: SolverInTheLoopOracle, *, x0: torch.Tensor | None = None, steps: int = 1000,
                 lr: float = 1e-3, lr_schedule: str = "cosine", log_every: int = 50) -> TrainResult:
    """FO-SOL: the oracle's unrolled loss differentiated with autograd through PhiFlow (the
    reference a differentiable solver allows; no black box)."""
    _check_training(steps, lr, lr_schedule)
    return _train_unrolled(oracle, "FO-SOL", x0, steps, lr, lr_schedule, log_every,
                           lambda p: oracle.losses(p, autodiff=True)[0])


def _train_unrolled(oracle: SolverInTheLoopOracle, name: str, x0: torch.Tensor | None, steps: int, lr: float,
                    lr_schedule: str, log_every: int, loss_of, queries=None) -> TrainResult:
    """The loop of FO-SOL and HYBRID-SOL: per step a new minibatch, ``loss_of(params (1, d))``
    differentiated by autograd, an Adam step through the engine. ``queries()``: the black-box
    queries so far (HYBRID-SOL), logged and returned."""
    t0, calls0, rows0 = time.perf_counter(), oracle.step.calls, oracle.step.rows
    engine = _adam(oracle.get_params() if x0 is None else x0, lr, lr_schedule, steps)
    history = []
    for it in range(steps):
        oracle.sample_batch()
        param = engine.x.requires_grad_(True)
        loss = loss_of(param[None].to(oracle.dtype))
        (grad,) = torch.autograd.grad(loss, param)
        if not torch.isfinite(grad).all():
            raise ConfigError(f"{name} gradient is non-finite at step {it} (loss {float(loss)}); lower lr={lr}")
        engine.step_gradient(grad, float(loss.detach()))
        if it % log_every == 0 or it == steps - 1:
            row = {"step": it, "loss": float(loss.detach())}
            history.append(row if queries is None else {**row, "queries": queries()})
    return TrainResult(engine.x, steps, 0 if queries is None else queries(), oracle.step.calls - calls0,
                       oracle.step.rows - rows0, time.perf_counter() - t0, history)


def train_zo_sol(oracle: SolverInTheLoopOracle, *, estimator: Estimator | None = None,
                 x0: torch.Tensor | None = None, steps: int = 300, lr: float = 1e-3, lr_schedule: str = "cosine",
                 budget: int | None = None, scheduler=None, log_every: int = 10, callback=None) -> TrainResult:
    """ZO-SOL: Adam on ZO estimates of the oracle's gradient; the solver is only queried.

    A driver of :class:`~zoblackbox.AskTell`: each step draws a minibatch
    (:meth:`SolverInTheLoopOracle.sample_batch`) and runs one engine iteration against the oracle.

    Args:
        estimator: default :func:`default_estimator` (forward CGE, ``mu = 1e-6``); pass a
            ``RandomEstimator`` for RGE-SOL.
        x0: starting parameters (e.g. NON's, the warm start); default the network's.
        steps: optimizer steps (fewer if ``budget`` runs out first).
        budget: queries this run may spend (the engine's budget; the oracle's own ``budget`` is not
            changed); a step that would overrun it is not started.
        scheduler: a ``zoblackbox.schedule`` scheduler (default: the oracle's batched evaluation).
        callback: ``callback(step, params)`` after every step; returning ``True`` stops.
    """
    _check_training(steps, lr, lr_schedule)
    estimator = default_estimator() if estimator is None else estimator
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a zoblackbox Estimator, got {estimator!r}")
    cost = estimator.num_queries(oracle.dim)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < cost):
        raise ConfigError(f"budget must be an int >= one step's {cost} queries ({estimator!r}), got {budget!r}")
    t0, calls0, rows0, nfev0 = time.perf_counter(), oracle.step.calls, oracle.step.rows, oracle.nfev
    start = oracle.get_params() if x0 is None else x0
    engine = AskTell(start.detach().to(torch.float64), estimator=estimator, optimizer="adam", lr=lr,
                     lr_schedule=_lr_schedule(lr_schedule, steps), maxiter=steps, budget=budget,
                     evaluate_final=False)
    history = []
    while not engine.done:  # done before a step past maxiter or the budget: no minibatch is drawn for it
        oracle.sample_batch()
        record = engine.step(oracle, scheduler)
        if record is None:
            break
        it = engine.nit - 1
        if it % log_every == 0 or it == steps - 1:
            history.append({"step": it, "loss": record["f0"], "queries": oracle.nfev - nfev0,
                            "n_failed": record["n_failed"]})
        if callback is not None and callback(it, engine.x):
            break
    return TrainResult(engine.x, engine.nit, oracle.nfev - nfev0, oracle.step.calls - calls0,
                       oracle.step.rows - rows0, time.perf_counter() - t0, history, oracle.failure_report())


# --------------------------------------------------------------------------- HYBRID-SOL
class _SolverRows:
    """The solver step as a function of flat rows, for :class:`~zoblackbox.nn.BlackBox`:
    ``(K, state size)`` states and ``(K, aux size)`` auxiliary inputs -> ``(K, state size)``."""

    def __init__(self, step: PhiFlowStep):
        self.step = step

    def __call__(self, X: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
        sc = self.step.scenario
        K = int(X.shape[0])
        aux = None if sc.aux_shape is None else C.reshape(K, *sc.aux_shape)
        return self.step(X.reshape(K, *sc.state_shape), aux).reshape(K, -1)

    def __repr__(self) -> str:
        return f"solver step {self.step.scenario!r}"


def solver_blackbox(step: PhiFlowStep, estimator=None, **kwargs):
    """The solver step as a :class:`~zoblackbox.nn.BlackBox`: ``n = m =`` the state's size, the
    auxiliary input (forcing, masks) as its non-differentiated ``context``.

    ``box(s.flatten(1), aux.flatten(1))`` is one solver step of the ``B`` rows; with a gradient to
    compute it also evaluates the finite-difference rows of ``estimator`` in the same solver call
    (``B (n + 1)`` rows for forward CGE, ``B (q + 1)`` for RGE), and the backward returns their
    vector-Jacobian products. ``kwargs`` go to the BlackBox (``budget``, ``on_failure``, ``scheduler``).
    """
    from zoblackbox.nn import BlackBox

    sc = step.scenario
    n = math.prod(sc.state_shape)
    c = 0 if sc.aux_shape is None else math.prod(sc.aux_shape)
    return BlackBox(_SolverRows(step), n=n, m=n, estimator=estimator, context=c, **kwargs)


def train_hybrid_sol(oracle: SolverInTheLoopOracle, *, estimator=None, x0: torch.Tensor | None = None,
                     steps: int = 300, lr: float = 1e-3, lr_schedule: str = "cosine", budget: int | None = None,
                     log_every: int = 50) -> TrainResult:
    """HYBRID-SOL: backprop through the correction network, the solver step as a black box.

    The same unrolled loss, minibatches and Adam steps as :func:`train_fo_sol`, but every solver
    step of the rollout is :func:`solver_blackbox`: its Jacobian with respect to the state is
    estimated from solver queries (forward CGE over the state by default, ``n + 1`` rows per
    rolled-out row) while everything around it -- the network, the loss -- is ordinary autograd.
    The solver's own autograd is never used. It queries the solver ``n + 1`` times per row and step
    where ZO-SOL queries it ``d + 1`` times (``d`` network parameters).

    Args:
        estimator: the black box's estimator; default forward CGE with ``mu = DEFAULT_MU``
            (float64, like ZO-SOL's). For a large state use a ``RandomEstimator`` (``q + 1`` rows).
        budget: solver rows the black box may query (refused before a rollout that would overrun it).

    Returns:
        A :class:`TrainResult`; ``queries`` counts the black box's rows (= ``solver_rows`` minus
        nothing: every solver row of the training is a black-box query).
    """
    _check_training(steps, lr, lr_schedule)
    estimator = CoordinateEstimator(mu=DEFAULT_MU, scheme="forward") if estimator is None else estimator
    box = solver_blackbox(oracle.step, estimator, budget=budget, on_failure="raise")

    def step_fn(s, aux):
        out = box(s.reshape(s.shape[0], -1), None if aux is None else aux.reshape(aux.shape[0], -1))
        return out.reshape(s.shape)

    return _train_unrolled(oracle, "HYBRID-SOL", x0, steps, lr, lr_schedule, log_every,
                           lambda p: oracle.losses(p, step_fn=step_fn)[0], queries=lambda: box.oracle.nfev)
