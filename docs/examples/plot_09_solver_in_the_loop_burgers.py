"""
Solver-in-the-loop on the 1-D Burgers scenario
==============================================

A coarse Burgers solver (32 cells, one step of dt = 1.0) drifts from a reference that is 4x finer
in space and 10x in time. A small CNN applied after every coarse step corrects it. NON learns the
correction from one-step pairs; SOL trains it on the loss of several *unrolled* corrected solver
steps. Here the solver is a black box: HYBRID-SOL backpropagates through the network and treats
each solver step as a ``zoblackbox.nn.BlackBox`` (docs/pde.md), whose vector-Jacobian products come from
finite differences of solver queries (33 rows per rolled-out row). A small version of
``benchmarks/pde_sil.py`` (docs/pde.md has the full comparison, with ZO-SOL and FO-SOL).
"""

import matplotlib.pyplot as plt
import torch

from zoblackbox.adapters.burgers import BurgersConfig, burgers_datasets
from zoblackbox.adapters.phiflow import (
    CorrectionCNN,
    PhiFlowStep,
    SolverInTheLoopOracle,
    rollout,
    rollout_mae,
    train_hybrid_sol,
    train_non,
)

torch.set_num_threads(1)
config = BurgersConfig(dt=1.0, ref_substeps=10, steps=40)
train, test = burgers_datasets(config, n_train=8, n_test=1, seed=0)
solver = PhiFlowStep(config.solver("source"))
torch.manual_seed(0)
net = CorrectionCNN(2, 1, activation="relu")

non = train_non(solver, net, train, steps=600, seed=0)
oracle = SolverInTheLoopOracle(solver, net, train, unroll=8, batch_size=2, seed=0)
sol = train_hybrid_sol(oracle, x0=non.params, steps=60, lr=1e-3)
print(f"HYBRID-SOL: {sol.steps} steps, {sol.queries:,} solver rows queried, gradients through the black box")

runs = {"SRC (no correction)": None, "NON": non.params, "HYBRID-SOL": sol.params}
fields, curves = {}, {}
for name, params in runs.items():
    fields[name] = rollout(solver, net, params, test)[0, :, 0]  # (steps + 1, 32)
    mae, curves[name] = rollout_mae(solver, net, params, test)
    print(f"{name:>20}: test MAE {mae:.4f}")

# %%
# One seed and a small training budget: the corrections differ little here, and which one wins
# changes with the seed. docs/pde.md reports 5 seeds of every method on the full scenario.
#
# The test simulation's space-time fields (time down) and the error over rollout time.
reference = test.states[0, :, 0]
fig, axes = plt.subplots(1, 5, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.6]})
for ax, (name, field) in zip(axes, [("reference", reference), *fields.items()]):
    ax.imshow(field, aspect="auto", cmap="RdBu_r", vmin=-1.5, vmax=1.5)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("x (cell)")
axes[0].set_ylabel("source step (dt = 1.0)")
for name, curve in curves.items():
    axes[4].plot(range(1, len(curve) + 1), curve, label=name)
axes[4].set_xlabel("rollout step")
axes[4].set_ylabel("MAE vs reference")
axes[4].legend(fontsize=8)
fig.tight_layout()
plt.show()
