"""
Sparse CGE with ZO-GraSP: queries per step and accuracy
=======================================================

DeepZero's sparse coordinate-wise estimation: each step estimates only a random subset of the
weights, drawn per layer with pruning ratios that ZO-GraSP computes from function values alone
(``zoblackbox.sparsity.zo_grasp``), and redraws the subset every few steps. A step then costs
``active coordinates + 1`` queries instead of ``d + 1``. Here the digits CNN is trained for the same
number of steps at several sparsities; the plot shows what a step costs and the accuracy reached.
"""

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from zoblackbox import CoordinateEstimator, Trainer
from zoblackbox.adapters import ModuleOracle
from zoblackbox.data import load_digits_split, make_loader
from zoblackbox.models import digits_cnn
from zoblackbox.schedule import FeatureReuseScheduler
from zoblackbox.sparsity import CoordinateSampler, SparseSchedule, zo_grasp

EPOCHS = 4
split = load_digits_split()
test = make_loader(split.x_test, split.y_test, 512, shuffle=False)
results = {}
for sparsity in (0.0, 0.5, 0.8, 0.9, 0.95):
    torch.manual_seed(0)
    model = digits_cnn()
    train = make_loader(split.x_train, split.y_train, 128, shuffle=True, seed=0)
    sparse = None
    if sparsity > 0:
        # layer-wise ratios from ZO-GraSP at initialization, on one batch, from queries only
        probe = ModuleOracle(model, F.cross_entropy, batch=(split.x_train[:256], split.y_train[:256]))
        ratios = zo_grasp(probe, probe.get_params(), probe.layout, sparsity, q=64, seed=0)
        sampler = CoordinateSampler(probe.layout, ratios, seed=0)
        sparse = SparseSchedule(sampler, interval=5, unit="step")
    trainer = Trainer(model, train, test, estimator=CoordinateEstimator(), optimizer="adam", lr=0.02,
                      epochs=EPOCHS, sparse=sparse, scheduler=FeatureReuseScheduler(), progress=False)
    out = trainer.fit()
    results[sparsity] = (out["queries"] / out["steps"], out["test_acc"])
    print(f"sparsity {sparsity:4.2f}: {results[sparsity][0]:7.0f} queries/step, test accuracy {out['test_acc']:.3f}")

# %%
# Queries per step (bars) and test accuracy after the same number of steps (line).
fig, ax = plt.subplots(figsize=(6, 4))
labels = [f"{s:.0%}" for s in results]
ax.bar(labels, [q for q, _ in results.values()], color="tab:blue", alpha=0.6)
ax.set_xlabel("sparsity (share of weights not estimated per step)")
ax.set_ylabel("queries per step", color="tab:blue")
acc_ax = ax.twinx()
acc_ax.plot(labels, [a for _, a in results.values()], "o-", color="tab:red")
acc_ax.set_ylabel(f"test accuracy after {EPOCHS} epochs", color="tab:red")
acc_ax.set_ylim(0, 1)
ax.set_title("Sparse CGE on the digits CNN, ZO-GraSP layer ratios")
fig.tight_layout()
plt.show()
