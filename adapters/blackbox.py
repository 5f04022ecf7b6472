"""A classifier that can only be queried, and denoisers trained in front of it (denoised smoothing).

The user owns a denoiser ``D`` (white box) placed in front of a classifier ``f`` they can only
query (logits, no gradients). Randomized smoothing of ``f ∘ D`` (:mod:`zoblackbox.smoothing`)
then certifies the whole pipeline. ``D`` is trained in one of four ways:

* ``mse`` -- denoising, ``||D(x + delta) - x||^2``; no query of ``f`` (Salman et al., NeurIPS 2020).
* ``fo-stability`` -- the stability loss ``CE(f(D(x + delta)), f(x))`` with autograd through
  ``f``; needs ``f`` as a white box, so it is the reference (upper bound), not a black-box method.
* ``zo-ae-ds`` -- ZO-AE-DS (Zhang et al., ICLR 2022): ``D`` and an encoder ``E`` are trained by
  backprop around a :class:`zoblackbox.nn.BlackBox` of ``f o decoder`` (frozen decoder) at the
  latent code ``z = E(D(x + delta))``: its backward is a ZO (CGE or RGE) vector-Jacobian product
  taken in the small latent space, and the stability loss is an ordinary ``loss.backward()``.
* ``zo-sparse`` -- DeepZero (Chen et al., ICLR 2024): sparse CGE over ``D``'s own parameters,
  layer-wise ratios from ZO-GraSP, a random coordinate mask redrawn every few steps.

:class:`BlackBoxClassifier` is the query-only wrapper every ZO method and the certification go
through; it counts queries (one per image classified). The ZO estimates are the library's own
estimators (:class:`~zoblackbox.estimators.CoordinateEstimator`,
:class:`~zoblackbox.estimators.RandomEstimator`) over :class:`~zoblackbox.oracle.Oracle`
subclasses (ZO-AE-DS: the :class:`~zoblackbox.nn.VectorOracle` of its BlackBox), so budgets and
failure policies (non-finite logits) are those of every oracle. :class:`LatentOracle` and
:func:`latent_zo_gradient` (per-image scalar-loss ZO gradients at a latent code) are kept for
compatibility; ``train_zo_ae_ds`` no longer uses them.

The digits recipe that trains every pipeline from these trainers (``DenoisingRecipe``,
``build_pipelines``, ``PIPELINES``) is in ``zoblackbox.recipes``, a layer above the adapters.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from zoblackbox.engine import AskTell
from zoblackbox.errors import BudgetExhaustedError, ConfigError, OracleError
from zoblackbox.estimators import CoordinateEstimator, Estimator, RandomEstimator
from zoblackbox.nn import BlackBox
from zoblackbox.oracle import Oracle, RawResult
from zoblackbox.params import ParamLayout
from zoblackbox.result import ZOResult
from zoblackbox.schedules import WarmupCosine
from zoblackbox.smoothing import check_sigma

from .torch_module import resolve_params

__all__ = [
    "BlackBoxClassifier",
    "DenoisedClassifier",
    "DenoiserOracle",
    "LatentOracle",
    "TrainingReport",
    "latent_zo_gradient",
    "stability_loss",
    "train_fo_stability",
    "train_mse_denoiser",
    "train_zo_ae_ds",
    "train_zo_sparse",
]


# --------------------------------------------------------------------------- the black box
def _sealed(classifier: Callable) -> Callable:
    """``classifier`` behind a closure: the wrapper keeps no attribute that refers to it."""

    def forward(x: torch.Tensor):
        with torch.no_grad():
            return classifier(x)

    return forward


class BlackBoxClassifier:
    """Query-only access to a classifier: logits and predictions, counted, never gradients.

    Every call of :meth:`logits` or :meth:`predict` on a batch of ``B`` images is ``B`` queries.
    Outputs are computed under ``torch.no_grad()`` and detached, so they never require grad, even
    for inputs that do; the wrapped model is held in a closure, not an attribute, and the wrapper
    is not an ``nn.Module`` (no ``parameters()``, no ``state_dict()``). This guards against
    accidental white-box use in the same process; it is not a security boundary (a remote API is).
    Calling the wrapper is :meth:`logits`.

    Parameters
    ----------
    classifier : callable
        ``classifier(x) -> logits`` of shape ``(B, num_classes)`` for ``x`` of shape
        ``(B, *input_shape)``: an ``nn.Module`` (put in eval mode) or any callable, e.g. a client
        of a remote service.
    num_classes : int
        Number of classes, ``>= 2``.
    input_shape : sequence of int
        Shape of one image, e.g. ``(1, 8, 8)``.
    budget : int or None, default None
        Most queries over the wrapper's lifetime, ``>= 0`` (``None``: unlimited); a batch that
        would exceed it is refused before it is sent.

    Raises
    ------
    TypeError
        ``classifier`` not callable; at query time, ``x`` not a tensor.
    ConfigError
        ``num_classes`` not an int ``>= 2``, ``budget`` not an int ``>= 0``; at query time, ``x``
        of the wrong shape or not floating point.
    BudgetExhaustedError
        At query time, a batch that would exceed ``budget`` (nothing is sent).
    OracleError
        At query time, the classifier returned logits of the wrong shape.

    See Also
    --------
    DenoisedClassifier : a white-box denoiser in front of it.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox.adapters import BlackBoxClassifier
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> f = BlackBoxClassifier(net, num_classes=10, input_shape=(1, 8, 8), budget=100)
    >>> x = torch.randn(5, 1, 8, 8, requires_grad=True)
    >>> f.predict(x).shape, f(x).requires_grad, f.queries
    (torch.Size([5]), False, 10)
    >>> hasattr(f, "parameters")
    False
    """

    def __init__(self, classifier: Callable, *, num_classes: int, input_shape: Sequence[int],
                 budget: int | None = None):
        if not callable(classifier):
            raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ConfigError(f"budget must be a non-negative int or None, got {budget!r}")
        if isinstance(classifier, nn.Module):
            classifier.eval()
        self._forward = _sealed(classifier)
        self.num_classes = num_classes
        self.input_shape = tuple(int(s) for s in input_shape)
        self.budget = budget
        self._queries = 0

    @property
    def queries(self) -> int:
        """Images classified so far."""
        return self._queries

    @property
    def remaining(self) -> float:
        """Queries left in the budget (``math.inf`` when unlimited)."""
        return math.inf if self.budget is None else self.budget - self._queries

    def reset_queries(self) -> int:
        """Set the counter to 0; returns the count it had."""
        n, self._queries = self._queries, 0
        return n

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of a batch ``x`` of shape ``(B, *input_shape)`` (B queries)."""
        x = self._check(x)
        k = x.shape[0]
        if self.budget is not None and self._queries + k > self.budget:
            raise BudgetExhaustedError(f"a batch of {k} images would exceed the classifier's budget of {self.budget} "
                                       f"queries ({self._queries} spent)")
        self._queries += k
        out = torch.as_tensor(self._forward(x.detach())).detach()
        if out.shape != (k, self.num_classes):
            raise OracleError(f"the classifier returned shape {tuple(out.shape)} for {k} images; expected "
                              f"({k}, {self.num_classes}) logits")
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels ``(B,)`` (B queries)."""
        return self.logits(x).argmax(1)

    __call__ = logits

    def _check(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, {_fmt(self.input_shape)}), got {type(x).__name__}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape or x.shape[0] == 0:
            raise ConfigError(f"x must have shape (B, {_fmt(self.input_shape)}) with B >= 1, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ConfigError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        return x

    def __repr__(self) -> str:
        budget = "" if self.budget is None else f", budget={self.budget}"
        return (f"BlackBoxClassifier(num_classes={self.num_classes}, input_shape={self.input_shape}, "
                f"queries={self._queries}{budget})")


def _fmt(shape) -> str:
    return ", ".join(str(s) for s in shape)



class _eval_mode:
    """Modules in eval mode inside the block, their own modes restored after."""

    def __init__(self, *modules: nn.Module | None):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.modes = [{s: s.training for s in m.modules()} for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for modes in self.modes:
            for s, training in modes.items():
                s.training = training


class DenoisedClassifier:
    """``x -> f(D(x))``: the white-box denoiser ``D`` (``None``: none) in front of the black box ``f``.

    This is the base classifier randomized smoothing certifies (``zoblackbox.smoothing``,
    docs/certify.md); each call on ``B`` images is ``B`` queries of ``f``.

    Parameters
    ----------
    blackbox : BlackBoxClassifier
        The black box ``f``.
    denoiser : torch.nn.Module or None, default None
        The white-box denoiser ``D``, run in eval mode under ``torch.no_grad()`` (``None``: none).

    Raises
    ------
    TypeError
        ``blackbox`` not a :class:`BlackBoxClassifier`, or ``denoiser`` not a module or ``None``.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox.adapters import BlackBoxClassifier, DenoisedClassifier
    >>> f = BlackBoxClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
    ...                        num_classes=10, input_shape=(1, 8, 8))
    >>> denoiser = torch.nn.Conv2d(1, 1, 3, padding=1)
    >>> g = DenoisedClassifier(f, denoiser)
    >>> g(torch.randn(4, 1, 8, 8)).shape, f.queries, denoiser.training
    (torch.Size([4, 10]), 4, True)
    """

    def __init__(self, blackbox: BlackBoxClassifier, denoiser: nn.Module | None = None):
        if not isinstance(blackbox, BlackBoxClassifier):
            raise TypeError(f"blackbox must be a BlackBoxClassifier, got {type(blackbox).__name__}")
        if denoiser is not None and not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser must be an nn.Module or None, got {type(denoiser).__name__}")
        self.blackbox = blackbox
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.denoiser is None:
            return self.blackbox.logits(x)
        with torch.no_grad(), _eval_mode(self.denoiser):
            return self.blackbox.logits(self.denoiser(x))


# --------------------------------------------------------------------------- oracles
class LatentOracle(Oracle):
    """The stability loss of one image at a latent code, through a frozen decoder and the black box.

    A query point is ``[z_1, ..., z_d, i]``: a latent code ``z`` scored for image ``i`` of the
    current batch, ``CE(f(decoder(z)), targets[i])``. One point is one query of ``f``. The image
    index rides along in the point (it is never perturbed: estimates pass ``coords=range(d)``) so
    that every query is self-contained -- a whole batch of images' queries is one vectorized
    evaluation, and a retried query re-scores the right image.

    Args:
        decoder: the frozen decoder (white box), latent ``(K, d)`` -> images ``(K, *input_shape)``.
        blackbox: the classifier.
        latent_dim: ``d``.
        **kwargs: ``budget``, ``on_failure`` as in :class:`~zoblackbox.oracle.Oracle`.
    """

    def __init__(self, decoder: nn.Module, blackbox: BlackBoxClassifier, latent_dim: int, **kwargs):
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ConfigError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
        super().__init__(latent_dim + 1, **kwargs)
        self.decoder, self.blackbox, self.latent_dim = decoder, blackbox, latent_dim
        self.targets: torch.Tensor | None = None

    def set_targets(self, targets: torch.Tensor) -> None:
        """Labels the current batch's images are scored against (query point index ``i`` -> ``targets[i]``)."""
        self.targets = torch.as_tensor(targets).long().reshape(-1)

    def reserve(self, n: int) -> None:
        if self.targets is None:
            raise ConfigError("LatentOracle has no targets; call set_targets(labels) first")
        super().reserve(n)

    def _evaluate_batch(self, X: torch.Tensor) -> torch.Tensor:
        z, idx = X[:, :-1], X[:, -1].round().long()
        if self.targets is None:  # reserve() refuses this before a query; a direct call gets the same error
            raise ConfigError("LatentOracle has no targets; call set_targets(labels) first")
        with _eval_mode(self.decoder):
            logits = self.blackbox.logits(self.decoder(z))
        return F.cross_entropy(logits.double(), self.targets[idx], reduction="none")


def latent_zo_gradient(oracle: LatentOracle, estimator: Estimator, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """ZO gradients of every image's loss w.r.t. its own latent code, in one batch of queries.

    Each row ``z[i]`` gets its own plan from ``estimator`` (CGE: ``2d`` or ``d + 1`` queries, RGE:
    ``q + 1`` or ``2q``); all plans' points are evaluated as one :meth:`Oracle.evaluate` call and
    each plan's losses are combined by the estimator. Non-finite losses (failed queries under the
    ``inf``/``skip`` policy) drop out of the differences.

    Returns:
        ``(grads (B, d), info)`` with ``info``: ``queries``, ``n_failed``, ``mean_loss`` (mean of
        the finite query losses: the stability loss near ``z``).
    """
    if z.dim() != 2 or z.shape[1] != oracle.latent_dim:
        raise ConfigError(f"z must have shape (B, {oracle.latent_dim}), got {tuple(z.shape)}")
    b, d = z.shape
    base = torch.cat([z.detach().to(oracle.dtype), torch.arange(b, dtype=oracle.dtype)[:, None]], 1)
    coords = torch.arange(d)
    plans = [estimator.plan(base[i], coords) for i in range(b)]
    before = oracle.nfev
    losses = oracle.evaluate(torch.cat([p.points() for p in plans]))
    grads, start, n_failed = [], 0, 0
    for p in plans:
        est = estimator.combine(p, losses[start:start + len(p)])
        grads.append(est.grad[:d])
        n_failed += est.n_failed
        start += len(p)
    finite = losses[torch.isfinite(losses)]
    info = {"queries": oracle.nfev - before, "n_failed": n_failed,
            "mean_loss": float(finite.mean()) if finite.numel() else math.nan}
    return torch.stack(grads).to(z.dtype), info


class DenoiserOracle(Oracle):
    """The stability loss ``mean_b CE(f(D(x_b)), t_b)`` of a batch as a function of ``D``'s parameters.

    One query (one parameter vector) classifies the whole batch: ``B`` queries of ``f``. A chunk
    of ``K`` parameter vectors runs the denoiser under ``vmap`` (``functional_call``, the module is
    never perturbed in place) and sends the ``K * B`` denoised images to ``f`` in one call.

    Args:
        denoiser: the module ``D``.
        blackbox: the classifier.
        params: which parameters the vector holds (names or parameters; default all trainable).
        **kwargs: ``budget``, ``on_failure`` as in :class:`~zoblackbox.oracle.Oracle`.
    """

    def __init__(self, denoiser: nn.Module, blackbox: BlackBoxClassifier, params=None, **kwargs):
        chosen = resolve_params(denoiser, params)
        self.layout = ParamLayout.from_tensors(chosen)
        super().__init__(self.layout.dim, dtype=chosen[0][1].dtype, **kwargs)
        self.denoiser, self.blackbox = denoiser, blackbox
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.chunk_size = 64

    def set_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.batch = (inputs.detach(), torch.as_tensor(targets).long())

    def get_params(self) -> torch.Tensor:
        named = dict(self.denoiser.named_parameters())
        return self.layout.flatten({n: named[n] for n in self.layout.names})

    def reserve(self, n: int) -> None:
        if self.batch is None:
            raise ConfigError("DenoiserOracle has no data batch; call set_batch(inputs, targets) first")
        super().reserve(n)

    def _evaluate_batch(self, X: torch.Tensor) -> torch.Tensor:
        return self._losses({}, self.layout.unflatten_batch(X), X.shape[0])

    def _losses(self, fixed: dict, varying: dict, k: int) -> torch.Tensor:
        """Losses of ``k`` parameter sets: ``fixed`` tensors shared, ``varying`` ones ``(k, *shape)``.

        vmap batches only the varying tensors, so the layers before the first of them run once.
        """
        if self.batch is None:  # reserve() refuses this before a query; a direct call gets the same error
            raise ConfigError("DenoiserOracle has no data batch; call set_batch(inputs, targets) first")
        inputs, targets = self.batch
        with torch.no_grad(), _eval_mode(self.denoiser):
            if varying:
                out = vmap(lambda p: functional_call(self.denoiser, {**fixed, **p}, (inputs,)))(varying)
            else:
                out = functional_call(self.denoiser, fixed, (inputs,)).unsqueeze(0)
            logits = self.blackbox.logits(out.flatten(0, 1))
        ce = F.cross_entropy(logits.double(), targets.repeat(k), reduction="none")
        return ce.view(k, inputs.shape[0]).mean(1)

    def evaluate_plan(self, plan, chunk_size: int | None = None) -> torch.Tensor:
        """Losses of a plan's queries. Coordinate plans (CGE) are evaluated tensor by tensor from
        the base parameters and the steps, without materializing ``(K, dim)`` points; counting,
        budget and failure policy are :meth:`Oracle.record`'s, as for any plan."""
        if plan.coords is None:
            return super().evaluate_plan(plan, chunk_size)
        n = len(plan)
        self.reserve(n)
        size = int(chunk_size or self.chunk_size)
        base = self.layout.unflatten(plan.base.to(self.dtype))
        values = torch.full((n,), math.nan, dtype=torch.float64)
        errors: dict[int, BaseException] = {}
        shift = int(plan.include_base)
        jobs = [(torch.tensor([0]), None, None)] if shift else []
        blocks = self.layout.block_index(plan.coords)
        for t in torch.unique(blocks).tolist():
            for chunk in (blocks == t).nonzero().flatten().split(size):
                jobs.append((chunk + shift, t, chunk))
        for rows, t, chunk in jobs:
            try:
                if t is None:
                    values[rows] = self._losses(base, {}, 1)
                    continue
                name, shape = self.layout.names[t], self.layout.shapes[t]
                flat = base[name].reshape(-1).repeat(chunk.numel(), 1)
                local = plan.coords[chunk] - self.layout.offsets[t]
                flat[torch.arange(chunk.numel()), local] += plan.offsets[chunk].to(flat.dtype)
                fixed = {k: v for k, v in base.items() if k != name}
                values[rows] = self._losses(fixed, {name: flat.view(chunk.numel(), *shape)}, chunk.numel())
            except OracleError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure goes to the policy
                errors.update({int(i): exc for i in rows})
        return self.record(RawResult(values, errors), lambda i: plan.point(i).to(self.device, self.dtype))


# --------------------------------------------------------------------------- training
class TrainingReport(ZOResult):
    """What training a denoiser cost: a :class:`~zoblackbox.result.ZOResult` (the library's one
    result type; ``nit``, ``nfev``, ``fun``, ``wall_time`` are views of the fields below).

    Attributes:
        method: ``mse``, ``fo-stability``, ``zo-ae-ds``, ``zo-sparse``.
        steps: optimizer steps.
        queries: images classified by ``f`` (for ``fo-stability``: forward/backward passes through
            the white-box ``f``).
        oracle_queries: loss evaluations of the ZO oracle (``zo-sparse``: each is a whole batch).
        wall_s: seconds.
        history: per-epoch ``{"epoch", "loss"}``.
        failures: the oracle's failure report (ZO methods).
        info: method details (estimator, active coordinates, ratios, ...).
    """

    def __init__(self, method: str, steps: int = 0, queries: int = 0, oracle_queries: int = 0, wall_s: float = 0.0,
                 history: list | None = None, failures: dict | None = None, info: dict | None = None):
        super().__init__(method=method, steps=steps, queries=queries, oracle_queries=oracle_queries, wall_s=wall_s,
                         history=[] if history is None else history, failures={} if failures is None else failures,
                         info={} if info is None else info)

    @property
    def nit(self) -> int:
        return self["steps"]

    @property
    def nfev(self) -> int:
        return self["oracle_queries"]

    @property
    def wall_time(self) -> float:
        return self["wall_s"]

    @property
    def fun(self) -> float:
        losses = [h["loss"] for h in self["history"] if h.get("loss") is not None]
        return losses[-1] if losses else math.nan

    def as_dict(self) -> dict:
        return {"method": self.method, "steps": self.steps, "queries": self.queries,
                "oracle_queries": self.oracle_queries, "wall_s": self.wall_s, "history": self.history,
                "failures": self.failures, "info": self.info}


def _check_images(images, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise ConfigError(f"{name} must be a non-empty tensor of shape (N, C, H, W), got "
                          f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ConfigError(f"{name} must hold finite floating-point values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ConfigError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return images


def _check_training(epochs, batch_size, lr) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")


def _batches(n: int, batch_size: int, epochs: int, generator: torch.Generator):
    """``(epoch, indices)`` of every mini-batch (a fresh shuffle per epoch, the last batch may be short)."""
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            yield epoch, idx


def _total_steps(images: torch.Tensor, epochs: int, batch_size: int) -> int:
    return epochs * math.ceil(images.shape[0] / batch_size)


def _epoch_loop(images, epochs, batch_size, seed, step_fn, report) -> TrainingReport:
    """Shuffled mini-batches (a ``torch.Generator`` seeded with ``seed``, which ``step_fn(idx, g)``
    also draws the noise from), the per-epoch mean loss in ``report.history``. ``step_fn`` returns
    the step's loss, or ``None`` when training has to stop (that batch is not counted)."""
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0, last_epoch = time.perf_counter(), 0
    for epoch, idx in _batches(images.shape[0], batch_size, epochs, g):
        if epoch != last_epoch:
            report.history.append({"epoch": last_epoch + 1, "loss": sum(losses) / max(1, len(losses))})
            losses, last_epoch = [], epoch
        loss = step_fn(idx, g)
        if loss is None:
            break
        losses.append(loss)
        report.steps += 1
    if losses:
        report.history.append({"epoch": last_epoch + 1, "loss": sum(losses) / max(1, len(losses))})
    report.wall_s += time.perf_counter() - t0
    return report


def _run_epochs(images, epochs, batch_size, seed, step_fn, params, lr, report) -> TrainingReport:
    """The first-order trainers' loop: :func:`_epoch_loop` around the ask/tell engine, which takes
    each step's autograd gradient (:meth:`~zoblackbox.AskTell.step_gradient`) and applies Adam with a
    cosine LR (:class:`~zoblackbox.schedules.WarmupCosine` over all steps) to the flat parameter
    vector; ``step_fn`` leaves the gradients in ``.grad`` and returns the loss. The modules' parameters
    are set from the engine's iterate after every step."""
    params = list(params)
    layout = ParamLayout.from_tensors([(str(i), p) for i, p in enumerate(params)])

    def flat(tensors) -> torch.Tensor:
        return layout.flatten({str(i): t for i, t in enumerate(tensors)})

    engine = AskTell(flat(p.detach() for p in params), optimizer="adam", lr=lr,
                     lr_schedule=WarmupCosine(total_steps=_total_steps(images, epochs, batch_size)),
                     evaluate_final=False)

    def step(idx, g):
        for p in params:
            p.grad = None
        loss = step_fn(idx, g)
        grad = flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in params)
        engine.step_gradient(grad, loss)
        with torch.no_grad():
            for p, value in zip(params, layout.unflatten(engine.rule.x).values()):
                p.copy_(value)
        return loss

    return _epoch_loop(images, epochs, batch_size, seed, step, report)


def _noisy(x: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)


def train_mse_denoiser(denoiser: nn.Module, images: torch.Tensor, *, sigma: float, epochs: int = 100,
                       batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> TrainingReport:
    """Train ``denoiser`` on ``||D(x + delta) - x||^2``, ``delta ~ N(0, sigma^2)``; no query of ``f``.

    ``sigma = 0`` trains a plain autoencoder (ZO-AE-DS pretrains its encoder/decoder that way).
    """
    images = _check_images(images)
    if sigma != 0:
        sigma = check_sigma(sigma)
    _check_training(epochs, batch_size, lr)
    denoiser.train()

    def step(idx, g):
        x = images[idx]
        loss = F.mse_loss(denoiser(_noisy(x, sigma, g) if sigma else x), x)
        loss.backward()
        return float(loss.detach())

    return _run_epochs(images, epochs, batch_size, seed, step, list(denoiser.parameters()), lr,
                       TrainingReport("mse", info={"sigma": sigma}))


def train_fo_stability(denoiser: nn.Module, classifier: nn.Module, images: torch.Tensor, *, sigma: float,
                       epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                       mse_weight: float = 0.0) -> TrainingReport:
    """First-order stability training: ``CE(f(D(x + delta)), f(x)) + mse_weight * ||D(x + delta) - x||^2``
    with autograd through the *white-box* ``classifier`` (Salman et al. 2020). A reference: a black
    box does not allow it. ``f``'s parameters are not changed."""
    images = _check_images(images)
    sigma = check_sigma(sigma)
    _check_training(epochs, batch_size, lr)
    frozen = [(p, p.requires_grad) for p in classifier.parameters()]
    report = TrainingReport("fo-stability", info={"sigma": sigma, "mse_weight": mse_weight})
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with _eval_mode(classifier), torch.no_grad():
            targets = classifier(images).argmax(1)
        report.queries += images.shape[0]
        denoiser.train()

        def step(idx, g):
            x = images[idx]
            out = denoiser(_noisy(x, sigma, g))
            with _eval_mode(classifier):
                loss = F.cross_entropy(classifier(out), targets[idx])
            report.queries += x.shape[0]
            total = loss + mse_weight * F.mse_loss(out, x) if mse_weight else loss
            total.backward()
            return float(loss.detach())

        return _run_epochs(images, epochs, batch_size, seed, step, list(denoiser.parameters()), lr, report)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)


def train_zo_ae_ds(denoiser: nn.Module, encoder: nn.Module, decoder: nn.Module, blackbox: BlackBoxClassifier,
                   images: torch.Tensor, *, sigma: float, latent_dim: int, estimator: Estimator | None = None,
                   epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                   mse_weight: float = 0.0, on_failure="skip", budget: int | None = None) -> TrainingReport:
    """ZO-AE-DS: train ``denoiser`` and ``encoder`` by backprop around a black box at the latent code.

    Per step: ``z = encoder(denoiser(x + delta))`` with autograd, then
    ``logits = BlackBox(f o decoder, n=latent_dim, m=num_classes, estimator)(z)`` (:class:`zoblackbox.nn.BlackBox`)
    and ``loss = CE(logits, f(x))`` (mean over the batch), ``loss.backward()``: ordinary backprop, whose
    vector-Jacobian product through the black box is the ZO estimate of the Jacobian of
    ``f(decoder(z_i))`` w.r.t. every ``z_i``, from queries only. The decoder is frozen and called inside
    the black box (under ``torch.no_grad()``; its autograd is not used there); it is white box, so
    ``mse_weight > 0`` adds ``||decoder(z) - x||^2`` by autograd. The certified pipeline is
    ``f(decoder(encoder(denoiser(x))))``.

    Args:
        estimator: the BlackBox's estimator; default central CGE with ``mu = 0.05``: ``2 * latent_dim + 1``
            queries per image and step (the ``+ 1`` is ``f(decoder(z_i))`` itself, which the loss needs;
            before the BlackBox refactor the ZO gradient of the scalar loss cost ``2 * latent_dim``). An
            RGE with ``q = 2 * latent_dim - 1`` costs ``q + 1 = 2 * latent_dim`` (antithetic: ``2 q + 1``).
        on_failure: the black box's failure policy for non-finite logits (default ``"skip"``: failed
            perturbed rows drop out of the finite differences; an image whose unperturbed row
            ``f(decoder(z_i))`` failed drops out of the step's loss, which is still divided by the whole
            batch size).
        budget: most queries of ``f`` for the ZO steps (the labels ``f(x)`` of the training images
            are queried once before; they are counted in the report but not in this budget). A step
            that would overrun it is refused before anything is queried
            (:class:`~zoblackbox.errors.BudgetExhaustedError`); a budget below the cost of one image's
            gradient is a :class:`~zoblackbox.errors.ConfigError` up front.

    Returns:
        A :class:`TrainingReport`: ``queries`` (images classified by ``f``, labels included),
        ``oracle_queries`` (rows of the black box), ``failures`` (its failure report), and per epoch
        the mean loss ``CE(f(decoder(z_i)), f(x_i))`` of the images that answered.
    """
    images = _check_images(images)
    sigma = check_sigma(sigma)
    _check_training(epochs, batch_size, lr)
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ConfigError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
    estimator = CoordinateEstimator(mu=0.05, scheme="central") if estimator is None else estimator
    if not isinstance(estimator, (CoordinateEstimator, RandomEstimator)):
        raise TypeError(f"estimator must be a CoordinateEstimator or RandomEstimator, got {estimator!r}")

    def classify_decoded(Z: torch.Tensor) -> torch.Tensor:  # f o decoder: (K, latent_dim) -> (K, num_classes)
        with _eval_mode(decoder):
            return blackbox.logits(decoder(Z))

    box = BlackBox(classify_decoded, n=latent_dim, m=blackbox.num_classes, estimator=estimator, budget=budget,
                   on_failure=on_failure)
    report = TrainingReport("zo-ae-ds", info={"sigma": sigma, "estimator": repr(estimator), "latent_dim": latent_dim,
                                              "mse_weight": mse_weight})
    q0 = blackbox.queries
    targets = _labels(blackbox, images)
    frozen = [(p, p.requires_grad) for p in decoder.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        denoiser.train()
        encoder.train()

        def step(idx, g):
            x = images[idx]
            z = encoder(denoiser(_noisy(x, sigma, g)))
            if z.shape != (x.shape[0], latent_dim):
                raise ConfigError(f"the encoder must return latent codes of shape (B, {latent_dim}), got "
                                  f"{tuple(z.shape)}")
            logits = box(z)  # one call of f o decoder; the backward is the black box's ZO VJP
            ok = torch.isfinite(logits).all(dim=1)  # "skip"/"inf": a failed f(decoder(z_i)) drops image i
            n_ok = int(ok.sum())
            loss = F.cross_entropy(logits[ok].double(), targets[idx][ok], reduction="sum") / x.shape[0]
            mean_loss = float(loss.detach()) * x.shape[0] / n_ok if n_ok else math.nan
            if mse_weight:
                with _eval_mode(decoder):
                    loss = loss + mse_weight * F.mse_loss(decoder(z), x)
            loss.backward()
            return mean_loss

        params = list(denoiser.parameters()) + list(encoder.parameters())
        _run_epochs(images, epochs, batch_size, seed, step, params, lr, report)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    report.queries = blackbox.queries - q0
    report.oracle_queries = box.oracle.nfev
    report.failures = box.oracle.failure_report()
    return report


def train_zo_sparse(denoiser: nn.Module, blackbox: BlackBoxClassifier, images: torch.Tensor, *, sigma: float,
                    sparsity: float = 0.9, ratios="zo-grasp", estimator: Estimator | None = None, epochs: int = 5,
                    batch_size: int = 64, lr: float = 1e-3, mask_interval: int = 20, seed: int = 0,
                    mse_weight: float = 0.0, grasp_q: int = 192, on_failure="skip",
                    budget: int | None = None) -> TrainingReport:
    """DeepZero's sparse CGE over the denoiser's own parameters, stability loss through the black box.

    Layer-wise pruning ratios come from ZO-GraSP (``ratios="zo-grasp"``, on the first batch,
    ``2 (grasp_q + 1)`` oracle queries), ``"uniform"``, or a
    :class:`~zoblackbox.sparsity.PruningRatios`; a :class:`~zoblackbox.sparsity.CoordinateSampler`
    redraws the active coordinates every ``mask_interval`` steps; each step estimates only those
    (``n_active + 1`` oracle queries with forward CGE, each classifying the batch) and Adam updates
    the dense denoiser. ``mse_weight > 0`` adds the (white-box, autograd) denoising loss.

    The loop is a driver of :class:`~zoblackbox.AskTell` over the flat parameter vector (the mask
    is the engine's ``coords``, the MSE term one of its ``gradient_hooks``); after every step the
    denoiser is loaded with the engine's iterate. ``budget`` bounds the oracle's queries, ZO-GraSP's
    included: training stops before a step that would exceed it (``report.info["stopped"]`` says so).
    """
    from zoblackbox.sparsity import CoordinateSampler, PruningRatios, uniform_ratios, zo_grasp

    images = _check_images(images)
    sigma = check_sigma(sigma)
    _check_training(epochs, batch_size, lr)
    if isinstance(mask_interval, bool) or not isinstance(mask_interval, int) or mask_interval < 1:
        raise ConfigError(f"mask_interval must be an int >= 1, got {mask_interval!r}")
    estimator = CoordinateEstimator() if estimator is None else estimator
    oracle = DenoiserOracle(denoiser, blackbox, budget=budget, on_failure=on_failure)
    q0 = blackbox.queries
    targets = _labels(blackbox, images)
    g = torch.Generator().manual_seed(seed)
    if isinstance(ratios, PruningRatios):
        pruning = ratios.validate(oracle.layout)
    elif ratios == "uniform":
        pruning = uniform_ratios(oracle.layout, sparsity)
    elif ratios == "zo-grasp":
        idx = torch.randperm(images.shape[0], generator=g)[:batch_size]
        oracle.set_batch(_noisy(images[idx], sigma, g), targets[idx])
        pruning = zo_grasp(oracle, oracle.get_params(), oracle.layout, sparsity, q=grasp_q, seed=seed)
    else:
        raise ConfigError(f"ratios must be 'zo-grasp', 'uniform' or PruningRatios, got {ratios!r}")
    sampler = CoordinateSampler(oracle.layout, pruning, seed=seed)
    report = TrainingReport("zo-sparse", info={"sigma": sigma, "estimator": repr(estimator), "sparsity": sparsity,
                                               "ratios": pruning.ratios, "ratios_method": pruning.method,
                                               "n_active": sampler.n_active, "params": oracle.layout.dim,
                                               "mask_interval": mask_interval, "mse_weight": mse_weight})
    named = dict(denoiser.named_parameters())
    trained = [named[n] for n in oracle.layout.names]
    total = _total_steps(images, epochs, batch_size)
    engine = AskTell(oracle.get_params(), estimator=estimator, optimizer="adam", lr=lr,
                     lr_schedule=WarmupCosine(total_steps=total), maxiter=total, evaluate_final=False)
    batch: dict = {}
    if mse_weight:
        def white_box_mse(x, grad):  # the denoiser holds x (loaded after every step)
            loss = mse_weight * F.mse_loss(denoiser(batch["noisy"]), batch["x"])
            grads = torch.autograd.grad(loss, trained, allow_unused=True)
            parts = {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(oracle.layout.names, trained, grads)}
            return grad + oracle.layout.flatten(parts).to(grad.dtype)

        engine.gradient_hooks.append(white_box_mse)
    denoiser.train()

    def step(idx, gen):
        x = images[idx]
        noisy = _noisy(x, sigma, gen)
        if report.steps % mask_interval == 0:
            engine.coords = sampler.sample()
        oracle.set_batch(noisy, targets[idx])
        batch.update(x=x, noisy=noisy)
        record = engine.step(oracle)
        if record is None:  # the engine stopped: the oracle's budget cannot pay for this step (or x diverged)
            report.info["stopped"] = engine.message
            return None
        with torch.no_grad():
            for p, value in zip(trained, oracle.layout.unflatten(engine.x).values()):
                p.copy_(value)
        return record["f0"] if record["f0"] is not None else math.nan

    _epoch_loop(images, epochs, batch_size, seed + 1, step, report)
    report.queries = blackbox.queries - q0
    report.oracle_queries = oracle.nfev
    report.failures = oracle.failure_report()
    return report


def _labels(blackbox: BlackBoxClassifier, images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``f(x)`` of every clean image (the stability loss's targets), one query each."""
    return torch.cat([blackbox.predict(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])


def stability_loss(pipeline: DenoisedClassifier, images: torch.Tensor, *, sigma: float, seed: int = 0,
                   targets: torch.Tensor | None = None) -> float:
    """Mean ``CE(f(D(x + delta)), f(x))`` over ``images`` with seeded noise (queries ``f``; twice
    per image unless ``targets`` are given)."""
    images = _check_images(images)
    sigma = check_sigma(sigma)
    if targets is None:
        targets = _labels(pipeline.blackbox, images)
    g = torch.Generator().manual_seed(seed)
    logits = pipeline(_noisy(images, sigma, g))
    return float(F.cross_entropy(logits.double(), targets))


# --------------------------------------------------------------------------- models and the recipe
def _mlp(sizes: Sequence[int], out_shape: Sequence[int] | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.pop()  # no activation after the last layer
    if out_shape is not None:
        layers.append(nn.Unflatten(1, tuple(out_shape)))
    return nn.Sequential(*layers)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def mlp_classifier(input_shape: Sequence[int] = (1, 8, 8), hidden: Sequence[int] = (256, 256),
                   num_classes: int = 10) -> nn.Sequential:
    """An MLP classifier (the digits benchmark's black box is 64-256-256-10)."""
    return _mlp([_numel(input_shape), *hidden, num_classes])


def mlp_denoiser(input_shape: Sequence[int] = (1, 8, 8), hidden: Sequence[int] = (256, 256)) -> nn.Sequential:
    """An MLP denoiser ``(B, *input_shape) -> (B, *input_shape)`` (64-256-256-64 for digits)."""
    return _mlp([_numel(input_shape), *hidden, _numel(input_shape)], input_shape)


def mlp_autoencoder(input_shape: Sequence[int] = (1, 8, 8), latent_dim: int = 16,
                    hidden: int = 128) -> tuple[nn.Sequential, nn.Sequential]:
    """``(encoder, decoder)``: images -> ``(B, latent_dim)`` codes -> images."""
    d = _numel(input_shape)
    return _mlp([d, hidden, latent_dim]), _mlp([latent_dim, hidden, d], input_shape)


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 40,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> float:
    """Ordinary supervised training (the classifier's owner does this; afterwards it is a black box).
    Returns the training accuracy."""
    _check_training(epochs, batch_size, lr)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _, idx in _batches(images.shape[0], batch_size, epochs, g):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[idx]), labels[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())
