"""
Zeroth-order training of a CNN with torch.optim
===============================================

:class:`zoblackbox.ZOGradient` is the zeroth-order counterpart of ``loss.backward()``: it queries
the model as a black box (coordinate-wise finite differences, CGE) and accumulates the estimate
into ``p.grad``, so an ordinary ``torch.optim`` optimizer and LR scheduler do the rest. Here it
trains the 3,658-parameter digits CNN on scikit-learn's bundled 8x8 digits, next to the same loop
with autograd. The feature-reuse scheduler evaluates each step's 3,659 queries.
"""

import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from zoblackbox import CoordinateEstimator, ZOGradient
from zoblackbox.data import load_digits_split, make_loader
from zoblackbox.models import count_params, digits_cnn
from zoblackbox.schedule import FeatureReuseScheduler

EPOCHS, BATCH, LR = 6, 128, 0.02
split = load_digits_split()
test_x, test_y = split.x_test, split.y_test


def accuracy(model):
    model.eval()
    with torch.no_grad():
        acc = (model(test_x).argmax(1) == test_y).float().mean().item()
    model.train()
    return acc


def train(method):
    torch.manual_seed(0)
    model = digits_cnn()
    loader = make_loader(split.x_train, split.y_train, BATCH, shuffle=True, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * len(loader))
    zo = ZOGradient(model, F.cross_entropy, estimator=CoordinateEstimator(mu=5e-3), scheduler=FeatureReuseScheduler())
    accs, t0 = [accuracy(model)], time.perf_counter()
    for _ in range(EPOCHS):
        for inputs, targets in loader:
            optimizer.zero_grad()
            if method == "zo":
                zo.backward(inputs, targets)  # queries only: no autograd through the model
            else:
                F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            scheduler.step()
        accs.append(accuracy(model))
    return accs, zo.nfev, time.perf_counter() - t0


print(f"digits CNN: {count_params(digits_cnn())} parameters, {len(split.y_train)} training images")
zo_acc, queries, zo_s = train("zo")
fo_acc, _, fo_s = train("fo")
print(f"ZO (CGE):  test accuracy {zo_acc[-1]:.3f}, {queries:,} queries, {zo_s:.1f} s")
print(f"autograd:  test accuracy {fo_acc[-1]:.3f}, {fo_s:.1f} s")

# %%
# Test accuracy after each epoch.
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(range(EPOCHS + 1), zo_acc, "o-", label="ZO: CGE + Adam (ZOGradient)")
ax.plot(range(EPOCHS + 1), fo_acc, "s--", label="autograd + Adam")
ax.set_xlabel("epoch")
ax.set_ylabel("test accuracy")
ax.set_ylim(0, 1)
ax.set_title("Digits CNN (3,658 parameters)")
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()
