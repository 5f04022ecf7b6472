"""Scenario 1: 1-D forced viscous Burgers on a periodic domain, in PhiFlow.

``u_t + u u_x = nu u_xx + f(x, t)`` on ``[0, L)``, periodic. One step (operator splitting):
semi-Lagrangian self-advection (:func:`~zoblackbox.adapters.phiflow.semi_lagrangian_1d`, the
torch-safe 1-D version), diffusion, then ``u += dt f``. Diffusion is ``"fourier"`` by default
(PhiFlow's ``diffuse.fourier``: exact for periodic grids, unconditionally stable and cheap in a
large batch); ``"implicit"`` (PhiFlow's CG solve) and ``"explicit"`` are available, the latter
only when ``nu dt / dx^2 <= 0.5`` per substep -- beyond that it blows up, so it is refused.

Data (:func:`burgers_datasets`): the reference runs at ``n_ref`` cells (128), is averaged over
``n_ref / n_src`` cells (4) to the source grid (32), and drives the source solver. Each simulation
has a random smooth initial state and a random sine forcing whose phases drift in time,
``f(x, t) = sum_j A_j sin(2 pi k_j x / L + phi_j + omega_j t)``; ``warmup`` reference steps are
discarded, then ``steps`` are recorded. Everything is generated locally from a seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from zoblackbox.errors import ConfigError

from .phiflow import PhiFlowStep, SimulationSet, require_phiflow, semi_lagrangian_1d

__all__ = ["DIFFUSION_SCHEMES", "Burgers1D", "BurgersConfig", "burgers_datasets", "downsample_1d"]

DIFFUSION_SCHEMES = ("fourier", "implicit", "explicit")
EXPLICIT_LIMIT = 0.5  # stability limit of explicit diffusion, nu dt / dx^2


def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "int" if integer else "number"
        raise ConfigError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {value!r}")


class Burgers1D:
    """The Burgers solver at one resolution, as a scenario for :class:`PhiFlowStep`.

    States are ``(B, 1, n)`` (velocity), the auxiliary input ``(B, 1, n)`` (the forcing of the step).

    Args:
        n: cells.
        length: domain length L.
        nu: viscosity.
        dt: time step.
        diffusion: ``"fourier"``, ``"implicit"`` or ``"explicit"``.
        substeps: sub-steps per step (each of ``dt / substeps``).
    """

    def __init__(self, n: int = 32, length: float = 32.0, nu: float = 0.1, dt: float = 0.1,
                 diffusion: str = "fourier", substeps: int = 1):
        _positive("n", n, integer=True)
        _positive("length", length)
        _positive("nu", nu, allow_zero=True)
        _positive("dt", dt)
        _positive("substeps", substeps, integer=True)
        if diffusion not in DIFFUSION_SCHEMES:
            raise ConfigError(f"diffusion must be one of {DIFFUSION_SCHEMES}, got {diffusion!r}")
        self.n, self.length, self.nu, self.dt = n, float(length), float(nu), float(dt)
        self.diffusion, self.substeps = diffusion, substeps
        number = self.diffusion_number
        if diffusion == "explicit" and number > EXPLICIT_LIMIT:
            need = math.ceil(self.nu * self.dt / self.dx ** 2 / EXPLICIT_LIMIT)
            raise ConfigError(
                f"explicit diffusion is unstable here: nu*dt/dx^2 = {number:.3g} per substep > {EXPLICIT_LIMIT} "
                f"(nu={nu}, dt={dt}, dx={self.dx:.4g}, substeps={substeps}); use diffusion='fourier' or "
                f"'implicit', or substeps >= {need}")
        self.state_shape = (1, n)
        self.aux_shape = (1, n)

    @property
    def dx(self) -> float:
        return self.length / self.n

    @property
    def diffusion_number(self) -> float:
        """``nu dt / dx^2`` per substep."""
        return self.nu * self.dt / self.substeps / self.dx ** 2

    def cfl(self, u_max: float) -> float:
        """Advective CFL number ``u_max dt / dx`` per substep."""
        return u_max * self.dt / self.substeps / self.dx

    def __repr__(self) -> str:
        return (f"Burgers1D(n={self.n}, length={self.length}, nu={self.nu}, dt={self.dt}, "
                f"diffusion={self.diffusion!r}, substeps={self.substeps})")

    # ------------------------------------------------------------------ PhiFlow side
    def wrap(self, state: torch.Tensor, aux: torch.Tensor):
        from phi import math
        from phi.math import batch, spatial

        return math.wrap(state[:, 0], batch("b"), spatial("x")), math.wrap(aux[:, 0], batch("b"), spatial("x"))

    def unwrap(self, values) -> torch.Tensor:
        return values.native(["b", "x"]).unsqueeze(1)

    def grid(self, values):
        """A periodic ``CenteredGrid`` on ``[0, length)`` holding ``values`` (a ``phiml`` tensor)."""
        from phi.flow import Box, CenteredGrid
        from phi.math import extrapolation

        return CenteredGrid(values, extrapolation.PERIODIC, bounds=Box(x=self.length))

    def phi_step(self, u_values, forcing_values):
        """One step: advection, diffusion, forcing (``substeps`` times); values in, values out."""
        from phi.flow import Solve, diffuse

        u, forcing = self.grid(u_values), self.grid(forcing_values)
        h = self.dt / self.substeps
        for _ in range(self.substeps):
            u = semi_lagrangian_1d(u, u, h)
            if self.nu > 0:
                if self.diffusion == "fourier":
                    u = diffuse.fourier(u, self.nu, h)
                elif self.diffusion == "implicit":
                    u = diffuse.implicit(u, self.nu, h, solve=Solve("CG", 1e-10, 1e-10, max_iterations=1000))
                else:
                    u = diffuse.explicit(u, self.nu, h)
            u = u + h * forcing
        return u.values


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class BurgersConfig:
    """Scenario 1 (DeepZero / Um et al.-style): L=32, nu=0.1, dt=0.1, reference 128 cells, source 32.

    Attributes:
        init_amplitude: amplitude scale of the random initial state (3 sine modes).
        forcing_modes: sine terms of the forcing; ``forcing_amplitude`` their amplitude bound;
            ``max_wavenumber`` their largest wavenumber; ``drift`` the bound of their phase speeds.
        max_cfl: refuse data whose reference CFL ``max|u| dt / dx_ref`` exceeds it (the
            semi-Lagrangian step stays stable, but its interpolation then spans several cells).
    """

    length: float = 32.0
    nu: float = 0.1
    dt: float = 0.1
    n_ref: int = 128
    n_src: int = 32
    warmup: int = 30
    steps: int = 200
    diffusion: str = "fourier"
    substeps: int = 1
    ref_substeps: int = 1
    init_amplitude: float = 1.0
    forcing_modes: int = 4
    forcing_amplitude: float = 0.15
    max_wavenumber: int = 4
    drift: float = 0.4
    max_cfl: float = 1.0

    def __post_init__(self):
        for name in ("n_ref", "n_src", "steps", "forcing_modes", "max_wavenumber", "substeps", "ref_substeps"):
            _positive(name, getattr(self, name), integer=True)
        _positive("warmup", self.warmup, integer=True, allow_zero=True)
        for name in ("length", "dt", "max_cfl"):
            _positive(name, getattr(self, name))
        for name in ("nu", "init_amplitude", "forcing_amplitude", "drift"):
            _positive(name, getattr(self, name), allow_zero=True)
        if self.n_ref % self.n_src or self.n_ref < self.n_src:
            raise ConfigError(f"mismatched resolutions: the reference's {self.n_ref} cells must be a multiple of the "
                              f"source's {self.n_src} (each source cell averages n_ref/n_src reference cells)")

    @property
    def factor(self) -> int:
        return self.n_ref // self.n_src

    def solver(self, resolution: str = "source") -> Burgers1D:
        """The source (``"source"``) or reference (``"reference"``) solver."""
        if resolution not in ("source", "reference"):
            raise ConfigError(f"resolution must be 'source' or 'reference', got {resolution!r}")
        if resolution == "source":
            return Burgers1D(self.n_src, self.length, self.nu, self.dt, self.diffusion, self.substeps)
        return Burgers1D(self.n_ref, self.length, self.nu, self.dt, self.diffusion, self.substeps * self.ref_substeps)


def downsample_1d(values: torch.Tensor, factor: int) -> torch.Tensor:
    """Average blocks of ``factor`` cells along the last axis (the reference -> source map)."""
    if values.shape[-1] % factor:
        raise ConfigError(f"cannot average {values.shape[-1]} cells in blocks of {factor}")
    return values.reshape(*values.shape[:-1], values.shape[-1] // factor, factor).mean(dim=-1)


def _random_problems(config: BurgersConfig, n_sims: int, rng: np.random.Generator, x: np.ndarray):
    L = config.length
    u0 = np.zeros((n_sims, x.size))
    for k in range(1, 4):
        a = rng.uniform(-1, 1, n_sims) * config.init_amplitude / k
        p = rng.uniform(0, 2 * np.pi, n_sims)
        u0 += a[:, None] * np.sin(2 * np.pi * k * x[None] / L + p[:, None])
    J = config.forcing_modes
    amp = rng.uniform(-config.forcing_amplitude, config.forcing_amplitude, (n_sims, J))
    wav = rng.integers(1, config.max_wavenumber + 1, (n_sims, J))
    phase = rng.uniform(0, 2 * np.pi, (n_sims, J))
    omega = rng.uniform(-config.drift, config.drift, (n_sims, J))

    def forcing(t: float) -> np.ndarray:
        arg = 2 * np.pi * wav[:, :, None] * x[None, None] / L + (phase + omega * t)[:, :, None]
        return (amp[:, :, None] * np.sin(arg)).sum(axis=1)

    return u0, forcing


def burgers_datasets(config: BurgersConfig | None = None, *, n_train: int = 10, n_test: int = 5, seed: int = 0,
                     keep_reference: bool = False) -> tuple[SimulationSet, SimulationSet]:
    """Training and test simulations, generated locally (no download).

    The ``n_train + n_test`` simulations come from one seeded random stream and are split, so the
    test problems never appear in training. Returns coarse :class:`SimulationSet` s (float64):
    ``states (S, steps + 1, 1, n_src)`` and ``aux`` = the source-grid forcing ``(S, steps, 1, n_src)``.
    With ``keep_reference`` the fine trajectories are in ``info["reference"]``.
    """
    config = BurgersConfig() if config is None else config
    _positive("n_train", n_train, integer=True)
    _positive("n_test", n_test, integer=True)
    require_phiflow()
    S = n_train + n_test
    fine = PhiFlowStep(config.solver("reference"))
    x = (np.arange(config.n_ref) + 0.5) * config.length / config.n_ref
    u0, forcing = _random_problems(config, S, np.random.default_rng(seed), x)
    u = torch.tensor(u0, dtype=torch.float64).unsqueeze(1)
    states, aux = [], []
    for t in range(config.warmup + config.steps):
        f = torch.tensor(forcing(t * config.dt), dtype=torch.float64).unsqueeze(1)
        if t >= config.warmup:
            states.append(u)
            aux.append(f)
        u = fine(u, f)
    states.append(u)
    ref = torch.stack(states, dim=1)  # (S, T+1, 1, n_ref)
    if not torch.isfinite(ref).all():
        raise ConfigError(f"the reference simulation diverged (non-finite states) for {config}")
    cfl = fine.scenario.cfl(float(ref.abs().max()))
    if cfl > config.max_cfl:
        raise ConfigError(f"unstable parameters: the reference reaches CFL max|u|*dt/dx = {cfl:.3g} > max_cfl="
                          f"{config.max_cfl} (max|u| = {float(ref.abs().max()):.3g}, dt={config.dt}, "
                          f"dx={config.length / config.n_ref:.4g}); lower dt, the forcing or the initial amplitude")
    coarse = downsample_1d(ref, config.factor)
    coarse_aux = downsample_1d(torch.stack(aux, dim=1), config.factor)
    info = {"scenario": "burgers1d", "config": asdict(config), "seed": seed, "reference_cfl": cfl}
    sets = []
    for name, idx in (("train", slice(0, n_train)), ("test", slice(n_train, S))):
        extra = {"reference": ref[idx]} if keep_reference else {}
        sets.append(SimulationSet(coarse[idx].clone(), coarse_aux[idx].clone(), {**info, "split": name, **extra}))
    return sets[0], sets[1]
