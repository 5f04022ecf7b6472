"""A vectorized simulator: a mass-spring-damper whose stiffness and damping are fitted to a noisy trajectory.

The simulator advances all K parameter rows of a batch at once (numpy broadcasting), so one call
answers a whole CGE plan; ``FunctionOracle(..., vectorized=True)`` hands it the ``(K, 2)`` batch.
Parameters are log-rates, so any real vector is a valid spring. Run::

    python docs/examples/fit_spring.py
"""

from __future__ import annotations

import numpy as np
import torch

from zoblackbox import CoordinateEstimator, FunctionOracle, minimize

T, DT = 400, 0.01
TRUE = (4.0, 0.3)  # stiffness, damping


def trajectories(P: np.ndarray) -> np.ndarray:
    """Positions ``(K, T)`` of K springs (rows of log-parameters ``P``), all released from 1 at rest."""
    k, c = np.exp(P[:, 0]), np.exp(P[:, 1])
    pos, vel = np.ones(len(P)), np.zeros(len(P))
    out = np.empty((len(P), T))
    for t in range(T):  # semi-implicit Euler, vectorized over the K rows
        vel += DT * (-k * pos - c * vel)
        pos += DT * vel
        out[:, t] = pos
    return out


OBSERVED = trajectories(np.log([TRUE]))[0] + 0.01 * np.random.default_rng(0).standard_normal(T)


def loss(P: np.ndarray) -> np.ndarray:
    """Mean squared error to the observed trajectory, one loss per row: ``(K, 2) -> (K,)``."""
    return ((trajectories(P) - OBSERVED) ** 2).mean(axis=1)


def fit(budget: int = 300):
    oracle = FunctionOracle(loss, dim=2, vectorized=True, numpy=True, dtype=torch.float64)
    return minimize(oracle, np.log([1.0, 1.0]), estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs",
                    budget=budget)


if __name__ == "__main__":
    res = fit()
    print(f"true (stiffness, damping) {TRUE}; fitted {tuple(float(v) for v in np.exp(res.x).round(3))}; "
          f"loss {res.fun:.2e} "
          f"(noise floor 1e-4); {res.nfev} queries")
