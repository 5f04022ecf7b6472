"""Fit the Lotka-Volterra example (``ode_sim.py``) with zoblackbox, as a Python function and as
an external program, and check that both give the same answer.

    python docs/examples/fit_ode.py            # about 20-40 s on 2 CPU cores
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ode_sim

from zoblackbox import CoordinateEstimator, FunctionOracle, minimize
from zoblackbox.adapters.process import ProcessOracle

BUDGET = 1500


def fit(oracle, label: str):
    t0 = time.perf_counter()
    res = minimize(oracle, ode_sim.X0, estimator=CoordinateEstimator(mu=1e-4, scheme="central"), optimizer="adam", lr=0.05, budget=BUDGET)
    rates = np.exp(res.x)
    print(f"{label:<18} loss {res.fun:9.4f}  rates {np.round(rates, 3)}  queries {res.nfev}  "
          f"{time.perf_counter() - t0:5.1f} s")
    return res


def main() -> None:
    print(f"true rates {ode_sim.TRUE_RATES}; loss at the truth {ode_sim.loss(ode_sim.X_TRUE):.4f}, "
          f"at the start {ode_sim.loss(ode_sim.X0):.2f}")
    a = fit(FunctionOracle(ode_sim.loss, dim=4, numpy=True, on_failure="inf", dtype=torch.float64), "python function")
    with ProcessOracle([sys.executable, str(HERE / "ode_sim.py")], dim=4, timeout=30,
                       on_failure="inf", dtype=torch.float64) as oracle:
        b = fit(oracle, "external program")
        print(f"program started {oracle.starts} time(s) for {oracle.nfev} queries")
    print("same result both ways:", bool(np.allclose(a.x, b.x, rtol=1e-9, atol=1e-12)))


if __name__ == "__main__":
    main()
