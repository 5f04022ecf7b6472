"""
Certifying a black-box classifier with denoised smoothing
=========================================================

A classifier ``f`` that can only be queried (:class:`zoblackbox.adapters.BlackBoxClassifier`) is
made provably robust by randomized smoothing: classify many Gaussian-noised copies of an input and
certify the majority vote within an L2 radius. ``f`` was not trained on noisy inputs, so a
denoiser ``D`` is put in front of it (:class:`zoblackbox.adapters.DenoisedClassifier`). Three
pipelines on the digits: no denoiser, a denoiser trained to reconstruct images (no query of
``f``), and that denoiser fine-tuned through the black box with sparse zeroth-order gradients
(stability loss: ``f(D(x + noise))`` should keep ``f(x)``'s label). A tiny setting (64 test images,
200 noise samples each), so the curves are coarse.
"""

import matplotlib.pyplot as plt
import torch

from zoblackbox.adapters import BlackBoxClassifier, DenoisedClassifier
from zoblackbox.adapters.blackbox import (
    mlp_classifier,
    mlp_denoiser,
    train_classifier,
    train_mse_denoiser,
    train_zo_sparse,
)
from zoblackbox.data import load_digits_split
from zoblackbox.smoothing import Smooth

torch.set_flush_denormal(True)  # denormal activations slow the denoisers down many times
SIGMA, N0, N, ALPHA = 0.5, 20, 200, 0.01
split = load_digits_split()

# %%
# The classifier's owner trains it (ordinary autograd); afterwards it is only queried.
torch.manual_seed(0)
classifier = mlp_classifier(hidden=(128,))
train_acc = train_classifier(classifier, split.x_train, split.y_train, epochs=15)
blackbox = BlackBoxClassifier(classifier, num_classes=10, input_shape=(1, 8, 8))
print(f"black box: training accuracy {train_acc:.3f}")

# %%
# The denoisers: reconstruction only, then fine-tuned through the black box with ZO gradients.
torch.manual_seed(0)
mse = mlp_denoiser(hidden=(128,))
train_mse_denoiser(mse, split.x_train, sigma=SIGMA, epochs=30)
zo = mlp_denoiser(hidden=(128,))
zo.load_state_dict(mse.state_dict())
report = train_zo_sparse(zo, blackbox, split.x_train, sigma=SIGMA, sparsity=0.95, epochs=1, lr=1e-3,
                         mse_weight=1.0, grasp_q=32, seed=0)
print(f"ZO fine-tuning: {blackbox.queries:,} black-box queries in {report.wall_time:.1f} s")

# %%
# Certify each pipeline on the same test images.
images, labels = split.x_test[:64], split.y_test[:64]
radii = [i * 0.05 for i in range(31)]
curves = {}
for name, denoiser in (("no denoiser", None), ("reconstruction denoiser", mse), ("+ ZO fine-tuning", zo)):
    smooth = Smooth(DenoisedClassifier(blackbox, denoiser), num_classes=10, sigma=SIGMA, input_shape=(1, 8, 8),
                    seed=0)
    cert = smooth.certify_dataset(images, labels, n0=N0, n=N, alpha=ALPHA)
    curves[name] = cert.certified_accuracy(radii)
    print(f"{name:>24}: certified accuracy at r=0: {curves[name][0.0]:.2f}, at r=0.5: {curves[name][0.5]:.2f}")

# %%
# Certified accuracy: the share of test images classified correctly with a certificate of at
# least the radius on the x axis. With n = 200 samples no radius above ``cert.max_radius`` can be
# certified.
fig, ax = plt.subplots(figsize=(6, 4))
for name, curve in curves.items():
    ax.step(list(curve), list(curve.values()), where="post", label=name)
ax.axvline(cert.max_radius, color="gray", ls=":", label=f"largest certifiable radius ({cert.max_radius:.2f})")
ax.set_xlabel("L2 radius")
ax.set_ylabel("certified accuracy")
ax.set_title(f"Denoised smoothing of a black-box digits classifier, sigma = {SIGMA}")
ax.legend()
fig.tight_layout()
plt.show()
