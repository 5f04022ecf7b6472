"""
Ask/tell with an external program, interrupted and resumed
==========================================================

The simulator here is a separate program, ``ode_sim.py`` (a Lotka-Volterra predator-prey model fitted
to noisy observations), that answers one JSON line per query on stdin/stdout;
``zoblackbox.adapters.process.ProcessOracle`` starts it once and keeps it running. The
optimization loop is :class:`zoblackbox.AskTell` driven by hand: ask for points, have them
evaluated, tell the losses -- the loop you write when the points are evaluated by a cluster queue
or a lab instrument.

Halfway through, the engine's state is saved to a file and the engine is thrown away; a new engine
built from that file finishes the run. It ends exactly where an uninterrupted run ends.
"""

import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from zoblackbox import AskTell, CoordinateEstimator
from zoblackbox.adapters.process import ProcessOracle

try:
    HERE = Path(__file__).resolve().parent
except NameError:  # the documentation build runs the example from its folder, without __file__
    HERE = Path.cwd()
sys.path.insert(0, str(HERE))
import ode_sim

SETTINGS = {"estimator": CoordinateEstimator(mu=1e-4, scheme="central"), "optimizer": "adam", "lr": 0.05, "budget": 321}


def new_engine():
    return AskTell(np.array(ode_sim.X0), **SETTINGS)


def advance(engine, oracle, losses, iterations=None):
    """Ask, evaluate in the external program, tell; record the loss at each iterate."""
    while not engine.done and (iterations is None or iterations > 0):
        X = engine.ask()
        values = oracle.evaluate(torch.as_tensor(X))
        nit = engine.nit
        engine.tell(values.numpy())
        if engine.nit > nit:  # an iteration finished
            losses.append(engine.history[-1]["f0"])
            iterations = None if iterations is None else iterations - 1


with ProcessOracle([sys.executable, str(HERE / "ode_sim.py")], dim=4, timeout=30) as oracle:
    # %%
    # An uninterrupted run.
    straight: list = []
    engine = new_engine()
    advance(engine, oracle, straight)
    uninterrupted = engine.result()

    # %%
    # The same run, stopped after 15 iterations: the state goes to a file (tensors and plain
    # containers; ``torch.load(..., weights_only=True)`` reads it back), the engine is discarded.
    first: list = []
    engine = new_engine()
    advance(engine, oracle, first, iterations=15)
    path = Path(tempfile.mkdtemp()) / "asktell.pt"
    torch.save(engine.state_dict(), path)
    del engine

    # %%
    # A new engine from the file finishes the run.
    second: list = []
    engine = AskTell.from_state_dict(torch.load(path, weights_only=True))
    advance(engine, oracle, second)
    resumed = engine.result()
    print(f"program started {oracle.starts} time(s); {oracle.nfev} queries answered")

print("uninterrupted:", np.round(np.exp(uninterrupted.x), 4), f"loss {uninterrupted.fun:.4f}")
print("resumed:      ", np.round(np.exp(resumed.x), 4), f"loss {resumed.fun:.4f}")
print("same final point:", np.array_equal(uninterrupted.x, resumed.x), "| true rates:", ode_sim.TRUE_RATES)

# %%
# Loss at each iterate: the resumed run (two engines) retraces the uninterrupted one.
fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogy(range(1, len(straight) + 1), straight, lw=3, alpha=0.4, label="uninterrupted")
ax.semilogy(range(1, len(first) + 1), first, "o-", ms=3, label="first engine")
ax.semilogy(range(len(first) + 1, len(first) + len(second) + 1), second, "s-", ms=3, label="resumed from the file")
ax.axvline(len(first) + 0.5, color="gray", ls=":")
ax.set_xlabel("iteration")
ax.set_ylabel("loss (mean squared error)")
ax.set_title("Lotka-Volterra fit through an external program")
ax.legend()
fig.tight_layout()
plt.show()
