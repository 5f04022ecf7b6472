"""Scenario 2: 2-D incompressible wake flow behind a cylinder, in PhiFlow.

A ``StaggeredGrid`` velocity on ``[0, 64] x [0, 32]`` (source: 64 x 32 cells), inflow ``U`` from
the left through a boundary mask, zero-gradient boundaries elsewhere, a cylinder obstacle. One
step: semi-Lagrangian self-advection (PhiFlow's own, 2-D works on every backend), explicit
viscosity in as many sub-steps as its stability limit needs (``nu dt / dx^2 <= 1/4`` per
sub-step in 2-D), the inflow mask, then ``fluid.make_incompressible`` (a CG pressure solve with
the cylinder as obstacle). Simulations differ by their viscosity (Reynolds number
``U * 2 radius / nu``) and a small random initial perturbation that starts the vortex shedding.

The state handed to the network is the staggered velocity as one uniform tensor
``(2, X + 1, Y + 1)`` (PhiFlow's ``staggered_tensor()``); the entries that pad the two components
to that shape are not velocities and are kept at zero (:attr:`WakeFlow2D.state_mask`). The
auxiliary input is ``(2, X + 1, Y + 1)``: the viscosity relative to ``nu_ref`` and the obstacle
mask. The reference runs ``factor`` times finer and is averaged over the fine faces that make up
each coarse face.

On a CPU this scenario is a smoke test (a few steps end to end); the pressure solve of every
query makes full training a job for an accelerator (``--device cuda`` in the benchmark).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from zoblackbox.errors import ConfigError

from .phiflow import PhiFlowStep, SimulationSet, require_phiflow

__all__ = ["WakeConfig", "WakeFlow2D", "downsample_staggered", "wake_datasets"]

DIFFUSION_LIMIT_2D = 0.25  # explicit diffusion in 2-D: nu dt / dx^2 <= 1/4


def _check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                          f"{'int' if integer else 'number'}, got {value!r}")


class WakeFlow2D:
    """The wake solver at one resolution, as a scenario for :class:`PhiFlowStep`.

    Args:
        x, y: cells (the domain is ``[0, width] x [0, height]``).
        width, height: domain size.
        dt: time step.
        inflow: inflow speed ``U``.
        cylinder: ``(center_x, center_y, radius)``.
        nu_max: the largest viscosity the solver will see (sets the diffusion sub-steps).
        nu_ref: viscosity scale of the auxiliary channel.
        pressure_tol: relative and absolute tolerance of the CG pressure solve.
    """

    def __init__(self, x: int = 64, y: int = 32, width: float = 64.0, height: float = 32.0, dt: float = 0.5,
                 inflow: float = 1.0, cylinder: tuple = (12.0, 16.0, 4.0), nu_max: float = 0.05,
                 nu_ref: float = 0.05, pressure_tol: float = 1e-6):
        for name, value in (("x", x), ("y", y)):
            _check_positive(name, value, integer=True)
        for name, value in (("width", width), ("height", height), ("dt", dt), ("pressure_tol", pressure_tol),
                            ("nu_ref", nu_ref)):
            _check_positive(name, value)
        _check_positive("nu_max", nu_max, allow_zero=True)
        _check_positive("inflow", inflow, allow_zero=True)
        cx, cy, radius = (float(c) for c in cylinder)
        if not (0 < cx - radius and cx + radius < width and 0 < cy - radius and cy + radius < height):
            raise ConfigError(f"the cylinder {cylinder} must lie inside the domain {width} x {height}")
        self.x, self.y, self.width, self.height = x, y, float(width), float(height)
        self.dt, self.inflow, self.cylinder = float(dt), float(inflow), (cx, cy, radius)
        self.nu_max, self.nu_ref, self.pressure_tol = float(nu_max), float(nu_ref), float(pressure_tol)
        dx = min(self.width / x, self.height / y)
        self.diffusion_substeps = max(1, math.ceil(self.nu_max * self.dt / dx ** 2 / DIFFUSION_LIMIT_2D))
        self.state_shape = (2, x + 1, y + 1)
        self.aux_shape = (2, x + 1, y + 1)
        mask = torch.ones(self.state_shape, dtype=torch.float64)
        mask[0, :, -1] = 0  # the x component has y cells, padded to y + 1
        mask[1, -1, :] = 0  # the y component has x cells, padded to x + 1
        self.state_mask = mask
        self._inflow_mask = None

    #: PhiFlow 3.4 cannot ``jit_compile`` this step on torch (see :class:`PhiFlowStep`)
    jit_supported = False

    @property
    def dx(self) -> float:
        return self.width / self.x

    def cfl(self, u_max: float) -> float:
        return u_max * self.dt / min(self.width / self.x, self.height / self.y)

    def __repr__(self) -> str:
        return (f"WakeFlow2D(x={self.x}, y={self.y}, dt={self.dt}, inflow={self.inflow}, cylinder={self.cylinder}, "
                f"nu_max={self.nu_max}, diffusion_substeps={self.diffusion_substeps})")

    # ------------------------------------------------------------------ PhiFlow side
    def _phi(self):
        require_phiflow()
        from phi import flow

        return flow

    def velocity(self, values):
        """A ``StaggeredGrid`` from a staggered tensor (``x``, ``y``, ``vector`` dims)."""
        flow = self._phi()
        return flow.StaggeredGrid(values, flow.extrapolation.BOUNDARY, bounds=flow.Box(x=self.width, y=self.height),
                                  x=self.x, y=self.y)

    def obstacle(self):
        flow = self._phi()
        cx, cy, radius = self.cylinder
        return flow.Obstacle(flow.geom.infinite_cylinder(x=cx, y=cy, radius=radius, inf_dim=None))

    def obstacle_mask(self) -> torch.Tensor:
        """``(X + 1, Y + 1)`` indicator of the cylinder at the cell centres (padded with 0)."""
        flow = self._phi()
        grid = flow.CenteredGrid(self.obstacle().geometry, 0, x=self.x, y=self.y,
                                 bounds=flow.Box(x=self.width, y=self.height))
        mask = torch.zeros(self.x + 1, self.y + 1, dtype=torch.float64)
        mask[:self.x, :self.y] = torch.as_tensor(grid.values.numpy("x,y"), dtype=torch.float64)
        return mask

    def wrap(self, state: torch.Tensor, aux: torch.Tensor):
        from phi import math
        from phi.math import batch, channel, spatial

        values = math.wrap(state.permute(0, 2, 3, 1), batch("b"), spatial("x,y"), channel(vector="x,y"))
        nu = math.wrap(aux[:, 0].mean(dim=(1, 2)) * self.nu_ref, batch("b"))
        return values, nu

    def unwrap(self, values) -> torch.Tensor:
        out = values.native(["b", "vector", "x", "y"])
        return out * self.state_mask.to(out)

    def inflow_mask(self):
        """The faces the inflow sets: the x faces on the left boundary and the y faces of the first
        column of cells (a ``StaggeredGrid`` of 0/1, built once per solver).

        The box is finite on purpose: PhiFlow 3.4 samples ``Box(x=(-INF, a), y=None)`` as 1 on every
        face, which replaced the whole velocity by the inflow each step, so the flow never evolved
        past the potential flow around the cylinder (the data of every run before 2026-12-08 were static)."""
        if self._inflow_mask is None:
            flow = self._phi()
            box = flow.Box(x=(-self.dx, 0.5 * self.dx), y=(-self.height, 2 * self.height))
            self._inflow_mask = flow.StaggeredGrid(box, flow.extrapolation.BOUNDARY,
                                                   bounds=flow.Box(x=self.width, y=self.height), x=self.x, y=self.y)
        return self._inflow_mask

    def phi_step(self, values, nu):
        """One step on PhiFlow fields: advection, viscosity, inflow, pressure projection."""
        flow = self._phi()
        v = self.velocity(values)
        v = flow.advect.semi_lagrangian(v, v, self.dt)
        v = flow.diffuse.explicit(v, nu, self.dt, substeps=self.diffusion_substeps)
        inflow_mask = self.inflow_mask()
        v = v * (1 - inflow_mask) + inflow_mask * flow.vec(x=self.inflow, y=0)
        solve = flow.Solve("CG", self.pressure_tol, self.pressure_tol, max_iterations=2000)
        v, _ = flow.fluid.make_incompressible(v, [self.obstacle()], solve)
        return v.staggered_tensor()


def downsample_staggered(values: torch.Tensor, factor: int) -> torch.Tensor:
    """Average a fine staggered tensor ``(..., 2, f X + 1, f Y + 1)`` to ``(..., 2, X + 1, Y + 1)``:
    each coarse face is the mean of the ``factor`` fine faces that make it up; padding entries 0."""
    fx, fy = values.shape[-2] - 1, values.shape[-1] - 1
    if fx % factor or fy % factor:
        raise ConfigError(f"mismatched resolutions: a {fx} x {fy} reference cannot be averaged by {factor}")
    X, Y = fx // factor, fy // factor
    lead = values.shape[:-3]
    out = torch.zeros(*lead, 2, X + 1, Y + 1, dtype=values.dtype)
    vx = values[..., 0, ::factor, :fy]  # x faces on coarse x positions
    out[..., 0, :, :Y] = vx.reshape(*lead, X + 1, Y, factor).mean(dim=-1)
    vy = values[..., 1, :fx, ::factor]
    out[..., 1, :X, :] = vy.reshape(*lead, X, factor, Y + 1).mean(dim=-2)
    return out


@dataclass(frozen=True)
class WakeConfig:
    """Scenario 2. ``factor`` 2 keeps the reference CPU-sized; DeepZero/Um et al. use 4.

    ``ref_substeps``: the reference advances each recorded step in that many steps of
    ``dt / ref_substeps``, so the source solver (one step of ``dt``) is coarse in time as well.
    """

    x: int = 64
    y: int = 32
    factor: int = 2
    dt: float = 0.5
    inflow: float = 1.0
    cylinder: tuple = (12.0, 16.0, 4.0)
    nu_range: tuple = (0.02, 0.05)
    warmup: int = 40
    steps: int = 200
    perturbation: float = 0.05
    max_cfl: float = 4.0
    pressure_tol: float = 1e-6
    ref_substeps: int = 1

    def __post_init__(self):
        for name in ("x", "y", "factor", "steps", "ref_substeps"):
            _check_positive(name, getattr(self, name), integer=True)
        _check_positive("warmup", self.warmup, integer=True, allow_zero=True)
        lo, hi = self.nu_range
        if not 0 <= lo <= hi:
            raise ConfigError(f"nu_range must be (low, high) with 0 <= low <= high, got {self.nu_range!r}")

    def solver(self, resolution: str = "source") -> WakeFlow2D:
        if resolution not in ("source", "reference"):
            raise ConfigError(f"resolution must be 'source' or 'reference', got {resolution!r}")
        f = 1 if resolution == "source" else self.factor
        dt = self.dt if resolution == "source" else self.dt / self.ref_substeps
        return WakeFlow2D(self.x * f, self.y * f, float(self.x), float(self.y), dt, self.inflow, self.cylinder,
                          nu_max=self.nu_range[1], nu_ref=self.nu_range[1], pressure_tol=self.pressure_tol)


def wake_datasets(config: WakeConfig | None = None, *, n_train: int = 4, n_test: int = 2, seed: int = 0,
                  jit: bool = True) -> tuple[SimulationSet, SimulationSet]:
    """Training and test wake simulations (viscosities spread over ``nu_range``), generated locally."""
    config = WakeConfig() if config is None else config
    _check_positive("n_train", n_train, integer=True)
    _check_positive("n_test", n_test, integer=True)
    require_phiflow()
    S = n_train + n_test
    rng = np.random.default_rng(seed)
    fine_solver = config.solver("reference")
    fine = PhiFlowStep(fine_solver, jit=jit)
    nus = torch.tensor(rng.uniform(*config.nu_range, S), dtype=torch.float64)
    shape = fine_solver.state_shape
    u = torch.zeros(S, *shape, dtype=torch.float64)
    u[:, 0] = config.inflow
    u = u + config.perturbation * torch.tensor(rng.standard_normal((S, *shape)), dtype=torch.float64)
    u = u * fine_solver.state_mask
    fine_aux = torch.zeros(S, 2, *shape[1:], dtype=torch.float64)
    fine_aux[:, 0] = (nus / fine_solver.nu_ref)[:, None, None]
    states = []
    for t in range(config.warmup + config.steps):
        if t >= config.warmup:
            states.append(u)
        for _ in range(config.ref_substeps):
            u = fine(u, fine_aux)
    states.append(u)
    ref = torch.stack(states, dim=1)
    if not torch.isfinite(ref).all():
        raise ConfigError(f"the reference wake simulation diverged (non-finite velocities) for {config}")
    cfl = fine_solver.cfl(float(ref.abs().max()))
    if cfl > config.max_cfl:
        raise ConfigError(f"unstable parameters: the reference reaches CFL {cfl:.3g} > max_cfl={config.max_cfl}; "
                          f"lower dt={config.dt} or the inflow speed {config.inflow}")
    coarse = downsample_staggered(ref, config.factor)
    src = config.solver("source")
    aux = torch.zeros(S, 2, *src.state_shape[1:], dtype=torch.float64)
    aux[:, 0] = (nus / src.nu_ref)[:, None, None]
    aux[:, 1] = src.obstacle_mask()
    aux = aux[:, None].expand(S, config.steps, *aux.shape[1:])
    info = {"scenario": "wake2d", "config": asdict(config), "seed": seed, "nu": nus.tolist(), "reference_cfl": cfl}
    sets = []
    for name, idx in (("train", slice(0, n_train)), ("test", slice(n_train, S))):
        sets.append(SimulationSet(coarse[idx].clone(), aux[idx].clone(), {**info, "split": name}))
    return sets[0], sets[1]
