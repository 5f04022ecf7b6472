"""An example simulator: a Lotka-Volterra predator-prey model fitted to noisy observations.

The model (``scipy.integrate.solve_ivp``)::

    dprey/dt     = alpha * prey - beta * prey * predator
    dpredator/dt = delta * prey * predator - gamma * predator

has four positive rates; the parameter vector is their natural logarithms,
``x = log([alpha, beta, delta, gamma])``, so any real ``x`` is a valid model. The loss is the
mean squared error between the simulated populations at 40 time points in [0, 8] and
observations generated once from the true rates ``(1.0, 0.1, 0.075, 1.5)`` with 5% multiplicative
noise (seed 0; nothing is downloaded). Simulations that fail or blow up raise ``RuntimeError``.

Use it as a Python function::

    from ode_sim import loss, X_TRUE, X0
    loss(X_TRUE)              # 0.70 (the noise floor)

or as an external program speaking zoblackbox's JSON-lines protocol (one request per line on
stdin, one response per line on stdout; see ``zoblackbox.adapters.process``)::

    python docs/examples/ode_sim.py  <<< '{"id": 0, "x": [0, -2.3, -2.6, 0.4]}'

``python docs/examples/fit_ode.py`` fits it both ways with ``zoblackbox.minimize``.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
from scipy.integrate import solve_ivp

TRUE_RATES = (1.0, 0.1, 0.075, 1.5)
X_TRUE = [math.log(r) for r in TRUE_RATES]
X0 = [math.log(r) for r in (0.7, 0.15, 0.05, 1.0)]  # a starting guess 30-50% off
Y0 = (10.0, 5.0)
T = np.linspace(0.0, 8.0, 40)


def simulate(x) -> np.ndarray:
    """Populations (40, 2) at the observation times for log-rates ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (4,) or not np.all(np.isfinite(x)):
        raise ValueError(f"x must be 4 finite log-rates, got {x!r}")
    alpha, beta, delta, gamma = np.exp(np.clip(x, -20.0, 5.0))

    def rhs(_t, y):
        prey, pred = y
        return [alpha * prey - beta * prey * pred, delta * prey * pred - gamma * pred]

    sol = solve_ivp(rhs, (T[0], T[-1]), Y0, t_eval=T, method="LSODA", rtol=1e-6, atol=1e-8)
    if not sol.success or sol.y.shape[1] != T.size or not np.all(np.isfinite(sol.y)):
        raise RuntimeError(f"the ODE solver failed at x={list(map(float, x))}: {sol.message}")
    return sol.y.T


_rng = np.random.default_rng(0)
OBSERVED = simulate(X_TRUE) * (1.0 + 0.05 * _rng.standard_normal((T.size, 2)))


def loss(x) -> float:
    """Mean squared error between the simulation at ``x`` and the observations."""
    return float(np.mean((simulate(x) - OBSERVED) ** 2))


def main() -> None:
    """The external-program side of the protocol: one JSON request per stdin line."""
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            out = {"id": req["id"], "loss": loss(req["x"])}
        except Exception as exc:  # noqa: BLE001 - reported to the oracle, which applies its failure policy
            out = {"id": req.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
