"""Recipes: the settings (and, for certify, the training sequence) behind the commands and benchmarks.

A recipe is a set of hyperparameters that a command or a benchmark runs with; the library below it
(estimators, engine, trainers, adapters) takes every value as an argument and has no defaults of
its own for them. Each recipe says where its numbers came from.

* :data:`DIGITS_CNN_RECIPE` -- ZO (CGE) training of the digits CNN: ``zoblackbox demo`` (its
  defaults, as ``zoblackbox.cli.DEMO_DEFAULTS`` with the thread count added) and the defaults
  ``zoblackbox train`` fills in for unset options.
* :data:`DEEPZERO_RECIPE` -- DeepZero's CIFAR-10 recipe: ``zoblackbox train --recipe deepzero``
  (:func:`zoblackbox.cli.resolve_train_args`; explicit options override it).
* :class:`Recipe` and :data:`RECIPES` -- network and training hyperparameters of the PDE methods
  per scenario: ``zoblackbox pde --scenario burgers1d|wake2d`` (options override single fields),
  or in code ``run_methods(make_problem(s), methods, RECIPES[s])`` from :mod:`zoblackbox.cli_pde`;
  ``benchmarks/pde_sil.py`` runs ``RECIPES["burgers1d"]``.
* :class:`DenoisingRecipe` and :func:`build_pipelines` -- the certified-defense (denoised
  smoothing) pipelines of the digits benchmark, trained with the trainers of
  :mod:`zoblackbox.adapters.blackbox`: ``zoblackbox certify --pipeline ... [--epochs-factor F]``
  (``DenoisingRecipe(sigma=..., seed=...).scaled(F)``), or in code
  ``build_pipelines(names, blackbox, images, DenoisingRecipe(), classifier=model)``;
  ``benchmarks/certify.py`` runs it (``--tune`` reruns the held-out selection).
* :data:`CNN_RECIPE` and :data:`CNN_BUDGET_SPARSITY` -- sparse CGE + AdamW on the digits CNN of the
  peers benchmark: ``benchmarks/peers_bbo.py`` (its ``run_cge_recipe``; ``--tune-cnn`` reruns the
  validation selection).

This module is at the top layer (with the CLI): it may import the adapters, and nothing below it
imports it. The adapters are imported on first use, so importing the recipes stays light.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .errors import ConfigError, OracleError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .adapters.blackbox import BlackBoxClassifier, DenoisedClassifier, TrainingReport

__all__ = [
    "CNN_BUDGET_SPARSITY",
    "CNN_RECIPE",
    "DEEPZERO_RECIPE",
    "DIGITS_CNN_RECIPE",
    "PIPELINES",
    "RECIPES",
    "REFERENCE_PIPELINES",
    "DenoisingRecipe",
    "Recipe",
    "TrainedPipeline",
    "build_pipelines",
]


# ----------------------------------------------------------------------------------- digits CNN (demo)
#: ``zoblackbox demo``: CGE (forward differences, ``mu``) + Adam with cosine decay on the digits CNN,
#: ``epochs`` epochs of batch ``batch_size``; the same Adam lr 0.02 / cosine / batch 128 / mu 5e-3
#: settings as the equal-queries view of ``benchmarks/cge_vs_rge.py`` (docs/benchmarks.md). Also the
#: defaults of ``zoblackbox train`` for options left unset. Measured results: README.md.
DIGITS_CNN_RECIPE = {"epochs": 12, "lr": 0.02, "batch_size": 128, "mu": 5e-3, "seed": 0}


# ----------------------------------------------------------------------------------- DeepZero CIFAR-10
#: DeepZero's CIFAR-10 recipe (Chen et al., ICLR 2024), for ``zoblackbox train --recipe deepzero``:
#: SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine with 3 warm-up epochs, batch 256, mu 5e-3,
#: sparsity 0.9 with ZO-GraSP ratios, masks redrawn every 5 epochs, 50 epochs. Explicit options
#: override any of it.
DEEPZERO_RECIPE = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256,
                   "mu": 5e-3, "sparsity": 0.9, "ratios": "zo-grasp", "mask_interval": 5, "warmup_epochs": 3,
                   "epochs": 50}


# ----------------------------------------------------------------------------------- PDE (zoblackbox pde)
@dataclass(frozen=True)
class Recipe:
    """Network and training hyperparameters of every method for one scenario of ``zoblackbox pde``.

    ``scenario`` holds the scenario's data settings (fields of ``BurgersConfig`` / ``WakeConfig``
    that differ from their defaults, and ``n_train``/``n_test``); the rest are the methods'.
    ``hybrid_q``: ``None`` -- HYBRID-SOL estimates the solver's Jacobian with forward CGE over the
    state (``mu``, ``n + 1`` rows per row); an int -- RGE with that many directions (``hybrid_mu``).
    ``hybrid_lr``: ``None`` -- the FO/ZO-SOL learning rate.
    ``validation_sims``: the last this many training simulations are held back as a validation set
    (every method trains on the others; its validation MAE is reported next to the test MAE), the
    split the recipe was chosen on; ``0`` trains on all of them.
    """

    hidden: tuple = (8, 8)
    kernel_size: int = 5
    activation: str = "relu"
    padding_mode: str = "circular"
    non_steps: int = 2000
    non_batch: int = 32
    non_lr: float = 3e-3
    sol_steps: int = 300
    unroll: int = 32
    batch_size: int = 1
    sol_lr: float = 3e-4
    mu: float = 1e-6
    scheme: str = "forward"
    rge_q: int | None = None  # None: q = dim, the queries per step of forward CGE
    rge_lr: float = 1e-4
    rge_mu: float = 1e-6
    hybrid_q: int | None = None
    hybrid_mu: float = 1e-6
    hybrid_lr: float | None = None
    warm_start: str = "non"
    validation_sims: int = 0
    scenario: tuple = ()  # ((field, value), ...): hashable, like the rest of the frozen recipe

    @property
    def scenario_config(self) -> dict:
        return dict(self.scenario)


#: Selected on training simulations only (docs/pde.md, "How the recipes were chosen"; the grid is in
#: benchmarks/pde_sil.py's ``TUNING`` and the JSON's ``tuning``). ``burgers1d``: a source solver 10x
#: coarser in time (dt 1.0, one step) and 4x in space than the reference (dt 0.1, 128 cells), 100
#: recorded steps; 20 training simulations: every method fits 0-13, 14-19 are the validation set the
#: recipe was chosen on (``validation_sims=6``) and are reported next to the 10 test simulations.
#: ``wake2d``: a CPU-sized wake (32 x 16 source cells, reference 2x finer), trained end to end; 6
#: training simulations (0-3 fit, 4-5 validation), 2 test; the network and NON's steps chosen on
#: validation, the SOL steps sized to the 30-minute budget.
RECIPES = {
    "burgers1d": Recipe(unroll=16, batch_size=4, sol_lr=1e-3, sol_steps=300, validation_sims=6,
                        scenario=(("dt", 1.0), ("ref_substeps", 10), ("steps", 100), ("n_train", 20),
                                  ("n_test", 10))),
    "wake2d": Recipe(hidden=(8, 8), kernel_size=3, padding_mode="replicate", non_steps=2000, non_batch=8, non_lr=3e-3,
                     sol_steps=20, unroll=2, batch_size=1, sol_lr=3e-4, mu=1e-3, scheme="central", rge_q=32,
                     rge_mu=1e-3, hybrid_q=16, hybrid_mu=1e-3, validation_sims=2,
                     scenario=(("x", 32), ("y", 16), ("cylinder", (8.0, 8.0, 2.0)), ("warmup", 20), ("steps", 40),
                               ("n_train", 6), ("n_test", 2))),
}


# ----------------------------------------------------------------------------------- certify (denoised smoothing)
PIPELINES = ("none", "mse", "fo-stability", "zo-ae-ds-cge", "zo-ae-ds-rge", "zo-sparse-cge")
#: ``ae-init``: the ZO-AE-DS architecture after its query-free pre-training (before any ZO step)
REFERENCE_PIPELINES = ("ae-init",)


@dataclass
class DenoisingRecipe:
    """Settings of the denoised-smoothing pipelines (defaults: the digits benchmark, chosen on a
    held-out part of the training split; see docs/certify.md).

    Every pipeline except ``none`` starts from the same MSE denoiser. ZO-AE-DS puts an
    encoder/decoder (``latent_dim``) after it, pre-trained together with MSE (no queries), then
    trains denoiser + encoder with ZO at the latent code; RGE uses ``q = 2 latent_dim - 1``
    directions so that it costs what central CGE costs (``q + 1 = 2 latent_dim`` per image).
    """

    sigma: float = 0.5
    batch_size: int = 64
    lr: float = 1e-3
    classifier_hidden: tuple[int, ...] = (256, 256)
    classifier_epochs: int = 40
    denoiser_hidden: tuple[int, ...] = (256, 256)
    mse_epochs: int = 1000
    fo_epochs: int = 100
    latent_dim: int = 16
    ae_hidden: int = 128
    ae_epochs: int = 300
    zo_ae_epochs: int = 30
    zo_mu: float = 0.05
    sparsity: float = 0.99
    sparse_epochs: int = 10
    sparse_batch_size: int = 16
    sparse_mu: float = 5e-3
    sparse_mask_interval: int = 10
    seed: int = 0

    def scaled(self, factor: float) -> DenoisingRecipe:
        """The same recipe with every epoch count multiplied by ``factor`` (at least 1 epoch)."""
        if not factor > 0:
            raise ConfigError(f"the epoch factor must be positive, got {factor!r}")
        out = DenoisingRecipe(**self.__dict__)
        for key in ("classifier_epochs", "mse_epochs", "fo_epochs", "ae_epochs", "zo_ae_epochs", "sparse_epochs"):
            setattr(out, key, max(1, round(getattr(self, key) * factor)))
        return out


@dataclass
class TrainedPipeline:
    """A certifiable pipeline and what training it cost."""

    name: str
    pipeline: DenoisedClassifier
    report: TrainingReport


def build_pipelines(names: Sequence[str], blackbox: BlackBoxClassifier, images: torch.Tensor,
                    recipe: DenoisingRecipe | None = None, *, classifier: nn.Module | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, TrainedPipeline]:
    """Train the requested pipelines (names from :data:`PIPELINES` and :data:`REFERENCE_PIPELINES`)
    in front of ``blackbox`` on the clean training ``images``.

    ``classifier`` -- the white-box module behind ``blackbox`` -- is needed by ``fo-stability``
    only (the first-order reference). Each report's ``queries`` counts the images ``f`` classified
    during that pipeline's training; the shared MSE pre-training costs none.
    """
    import torch
    from torch import nn

    from .adapters.blackbox import (
        DenoisedClassifier,
        TrainingReport,
        _check_images,
        mlp_autoencoder,
        mlp_denoiser,
        train_fo_stability,
        train_mse_denoiser,
        train_zo_ae_ds,
        train_zo_sparse,
    )
    from .estimators import CoordinateEstimator, RandomEstimator

    recipe = recipe or DenoisingRecipe()
    unknown = [n for n in names if n not in PIPELINES + REFERENCE_PIPELINES]
    if unknown:
        raise ConfigError(f"unknown pipeline(s) {unknown}; expected names from {PIPELINES + REFERENCE_PIPELINES}")
    if "fo-stability" in names and classifier is None:
        raise ConfigError("fo-stability trains through the classifier with autograd: pass the white-box "
                          "classifier module (classifier=...), or leave this reference out")
    images = _check_images(images)
    say = log or (lambda _msg: None)
    shape, r = tuple(images.shape[1:]), recipe
    out: dict[str, TrainedPipeline] = {}
    mse = None
    if any(n != "none" for n in names):
        torch.manual_seed(r.seed)
        mse = mlp_denoiser(shape, r.denoiser_hidden)
        say(f"MSE denoiser: {r.mse_epochs} epochs")
        mse_report = train_mse_denoiser(mse, images, sigma=r.sigma, epochs=r.mse_epochs, batch_size=r.batch_size,
                                        lr=r.lr, seed=r.seed)
    ae_init = None
    if any(n.startswith("zo-ae-ds") or n == "ae-init" for n in names):
        torch.manual_seed(r.seed + 1)
        encoder, decoder = mlp_autoencoder(shape, r.latent_dim, r.ae_hidden)
        ae_init = nn.Sequential(_copy(mse), encoder, decoder)
        say(f"ZO-AE-DS pre-training (MSE through denoiser + encoder + decoder): {r.ae_epochs} epochs")
        ae_report = train_mse_denoiser(ae_init, images, sigma=r.sigma, epochs=r.ae_epochs, batch_size=r.batch_size,
                                       lr=r.lr, seed=r.seed + 1)
    for name in names:
        q0 = blackbox.queries
        if name == "none":
            pipe, report = DenoisedClassifier(blackbox), TrainingReport("none")
        elif name == "mse":
            pipe, report = DenoisedClassifier(blackbox, mse), mse_report
        elif name == "ae-init":
            pipe, report = DenoisedClassifier(blackbox, ae_init), ae_report
        elif name == "fo-stability":
            den = _copy(mse)
            say(f"FO stability (white box): {r.fo_epochs} epochs")
            report = train_fo_stability(den, classifier, images, sigma=r.sigma, epochs=r.fo_epochs,
                                        batch_size=r.batch_size, lr=r.lr, seed=r.seed + 2)
            pipe = DenoisedClassifier(blackbox, den)
        elif name.startswith("zo-ae-ds"):
            model = _copy(ae_init)
            est: CoordinateEstimator | RandomEstimator
            if name.endswith("cge"):
                est = CoordinateEstimator(mu=r.zo_mu, scheme="central")
            else:
                est = RandomEstimator(mu=r.zo_mu, q=2 * r.latent_dim - 1, seed=r.seed)
            say(f"{name}: {r.zo_ae_epochs} epochs, {est!r}")
            report = train_zo_ae_ds(model[0], model[1], model[2], blackbox, images, sigma=r.sigma,
                                    latent_dim=r.latent_dim, estimator=est, epochs=r.zo_ae_epochs,
                                    batch_size=r.batch_size, lr=r.lr, seed=r.seed + 3)
            pipe = DenoisedClassifier(blackbox, model)
        else:  # zo-sparse-cge
            den = _copy(mse)
            say(f"{name}: sparsity {r.sparsity}, {r.sparse_epochs} epochs of batch {r.sparse_batch_size}")
            report = train_zo_sparse(den, blackbox, images, sigma=r.sigma, sparsity=r.sparsity,
                                     estimator=CoordinateEstimator(mu=r.sparse_mu), epochs=r.sparse_epochs,
                                     batch_size=r.sparse_batch_size, lr=r.lr,
                                     mask_interval=r.sparse_mask_interval, seed=r.seed + 4)
            pipe = DenoisedClassifier(blackbox, den)
        if name not in ("fo-stability",) and report.queries != blackbox.queries - q0:  # pragma: no cover
            raise OracleError(f"{name}: query count mismatch ({report.queries} vs {blackbox.queries - q0})")
        out[name] = TrainedPipeline(name, pipe, report)
    return out


_M = TypeVar("_M", bound="nn.Module")


def _copy(module: _M | None) -> _M:
    if module is None:  # pragma: no cover - the pipelines that need it build it first
        raise ConfigError("internal: a pipeline needs the MSE denoiser / AE initialisation, which was not built")
    return copy.deepcopy(module)


# ----------------------------------------------------------------------------------- peers benchmark CNN
#: The digits CNN of ``benchmarks/peers_bbo.py`` (part 2: 1,722 parameters, the full-batch loss on 512
#: training images, compared with nevergrad's NGOpt).
#:
#: zoblackbox on the CNN: DeepZero-style sparse CGE (a fresh random ``1 - sparsity`` of the coordinates,
#: biases included, estimated per step) feeding AdamW with a cosine schedule. lr and weight decay were
#: chosen with autograd (AdamW, cosine; validation accuracy over lr {0.01, 0.03, 0.1} x weight decay
#: {0.1, 0.3, 1, 3} x {150, 300, 500} steps, init seeds 0-2); sparsity and steps by CGE's own
#: validation accuracy (``--tune-cnn`` reruns that selection). Validation = the 925 training images
#: outside the 512-image batch; the test images are never used for a choice.
#:
#: CNN_RECIPE is the run compared with NGOpt in wall time; CNN_BUDGET_SPARSITY the sparsity of the
#: run held to NGOpt's 30,000 queries (steps = budget // queries per step).
CNN_RECIPE = {"optimizer": "AdamW", "lr": 0.03, "weight_decay": 0.3, "steps": 300, "schedule": "cosine",
              "mu": 5e-3, "sparsity": 0.75}
CNN_BUDGET_SPARSITY = 0.95
