"""Randomized smoothing: certified L2 robustness of any classifier from noisy queries.

The smoothed classifier ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)``, is
robust in an L2 ball around ``x`` whose radius follows from a lower confidence bound on the top
class's probability (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
Smoothing", ICML 2019):

* :meth:`Smooth.predict` -- PREDICT: ``n`` noisy votes; abstain unless the top two counts differ
  significantly (two-sided binomial test at level ``alpha``).
* :meth:`Smooth.certify` -- CERTIFY: the top class is chosen from ``n0`` noisy votes, then its
  probability is bounded from ``n`` *fresh* votes by the one-sided Clopper--Pearson lower bound
  ``pA`` at level ``alpha``; the certified radius is ``sigma * Phi^-1(pA)``, and the classifier
  abstains when ``pA < 1/2``. With probability at least ``1 - alpha`` a returned class is
  ``g(x)`` and ``g`` is constant on the ball of that radius.

The base classifier is only ever queried (``classifier(batch) -> logits or labels``), so this
module works for black boxes as well as for torch models; :func:`max_certifiable_radius` is the
largest radius any input can get with ``n`` votes at level ``alpha``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from scipy.stats import beta, binomtest, norm

from .errors import ConfigError, OracleError

__all__ = [
    "ABSTAIN",
    "Certification",
    "Smooth",
    "certified_accuracy",
    "certified_radius",
    "check_alpha",
    "check_count",
    "check_sigma",
    "clopper_pearson_lower",
    "max_certifiable_radius",
]

#: the label :meth:`Smooth.predict` and :meth:`Smooth.certify` return when they abstain
ABSTAIN = -1


def check_sigma(sigma) -> float:
    """``sigma`` as a float, or a :class:`~zoblackbox.errors.ConfigError` naming the bad value."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ConfigError(f"sigma must be a positive finite number, got {sigma!r}")
    return float(sigma)


def check_count(n, name: str = "n") -> int:
    """A number of noise draws: an int >= 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {n!r}")
    return n


def check_alpha(alpha) -> float:
    """A failure probability strictly between 0 and 1."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` Clopper--Pearson lower bound on a binomial proportion.

    The ``alpha`` quantile of ``Beta(k, n - k + 1)`` (0 when ``k = 0``): the same number as the
    lower end of ``scipy.stats.binomtest(k, n).proportion_ci(1 - 2 alpha, "exact")`` and of
    statsmodels' ``proportion_confint(k, n, 2 alpha, method="beta")`` that Cohen et al. use.
    """
    n = check_count(n, "n")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ConfigError(f"k must be an int in [0, n={n}], got {k!r}")
    alpha = check_alpha(alpha)
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_lower)`` for ``p_lower >= 1/2``; 0 below (no certificate)."""
    sigma = check_sigma(sigma)
    if not 0 <= p_lower <= 1:
        raise ConfigError(f"p_lower must be a probability, got {p_lower!r}")
    return sigma * float(norm.ppf(p_lower)) if p_lower >= 0.5 else 0.0


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with ``n`` votes at level ``alpha``.

    All ``n`` votes for one class give ``pA = alpha^(1/n)``, so no input is certified beyond
    ``sigma * Phi^-1(alpha^(1/n))`` (about 2.7 sigma at n = 2,000 and alpha = 0.001).
    """
    return certified_radius(check_alpha(alpha) ** (1.0 / check_count(n)), sigma)


class Smooth:
    """A Gaussian-smoothed classifier around any base classifier that can be queried.

    Args:
        classifier: ``classifier(x) -> logits (B, num_classes)`` or labels ``(B,)`` for a batch
            ``x`` of shape ``(B, *input_shape)``. It is only called, never differentiated.
        num_classes: number of classes (>= 2).
        sigma: standard deviation of the Gaussian noise (> 0), in input units.
        input_shape: shape of one input; inputs of another shape are refused.
        input_range: ``(low, high)`` every clean input must lie in (``None``: unchecked). Noisy
            inputs leave it, as they must.
        batch_size: noisy copies per classifier call.
        seed: seed of the noise generator (every draw is fresh; the sequence is reproducible).

    Attributes:
        samples: noisy inputs classified so far (the base classifier's queries).

    Example:
        >>> smooth = Smooth(classify, num_classes=10, sigma=0.5, input_shape=(1, 8, 8))
        >>> label, radius = smooth.certify(x, n0=100, n=2000, alpha=0.001)
    """

    def __init__(self, classifier: Callable, num_classes: int, sigma: float, *,
                 input_shape: Sequence[int], input_range: tuple[float, float] | None = (0.0, 1.0),
                 batch_size: int = 1000, seed: int = 0):
        if not callable(classifier):
            raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.classifier = classifier
        self.num_classes = num_classes
        self.sigma = check_sigma(sigma)
        self.input_shape = tuple(int(s) for s in input_shape)
        if input_range is not None:
            lo, hi = (float(v) for v in input_range)
            if not lo < hi:
                raise ConfigError(f"input_range must be (low, high) with low < high, got {input_range!r}")
            input_range = (lo, hi)
        self.input_range = input_range
        self.batch_size = check_count(batch_size, "batch_size")
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        self.samples = 0

    # ------------------------------------------------------------------ Cohen et al.'s algorithms
    def predict(self, x: torch.Tensor, n: int, alpha: float) -> int:
        """PREDICT: the top class of ``n`` noisy votes, or :data:`ABSTAIN` when a two-sided
        binomial test cannot tell the top two counts apart at level ``alpha``."""
        n, alpha = check_count(n, "n"), check_alpha(alpha)
        counts = self.vote_counts(x, n)
        top2 = torch.topk(counts, 2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float) -> tuple[int, float]:
        """CERTIFY: ``(class, radius)``, or ``(ABSTAIN, 0.0)``.

        The class is the top one of ``n0`` selection votes; its lower bound ``pA`` comes from
        ``n`` fresh estimation votes (never the selection ones).
        """
        n0, n, alpha = check_count(n0, "n0"), check_count(n, "n"), check_alpha(alpha)
        c_a = int(self.vote_counts(x, n0).argmax())
        n_a = int(self.vote_counts(x, n)[c_a])
        p_lower = clopper_pearson_lower(n_a, n, alpha)
        if p_lower < 0.5:
            return ABSTAIN, 0.0
        return c_a, certified_radius(p_lower, self.sigma)

    # ------------------------------------------------------------------ sampling
    def vote_counts(self, x: torch.Tensor, num: int) -> torch.Tensor:
        """How often each class wins on ``num`` noisy copies of ``x`` (drawn ``batch_size`` at a time)."""
        x = self.check_input(x)
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        left = check_count(num, "num")
        while left:
            m = min(left, self.batch_size)
            noise = torch.randn((m, *self.input_shape), generator=self.generator, dtype=x.dtype)
            counts += torch.bincount(self._labels(x + self.sigma * noise.to(x.device)), minlength=self.num_classes)
            left -= m
        return counts

    def _labels(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.classifier(batch)
        out = torch.as_tensor(out).detach()
        self.samples += batch.shape[0]
        if out.dim() == 2 and out.shape == (batch.shape[0], self.num_classes):
            if not torch.isfinite(out).all():
                raise OracleError("the base classifier returned non-finite logits during certification; "
                                  "a smoothed prediction needs a class for every noisy input",
                                  kind="nonfinite")
            labels = out.argmax(1)
        elif out.dim() == 1 and out.shape[0] == batch.shape[0] and not out.is_floating_point():
            labels = out
        else:
            raise OracleError(f"the base classifier must return logits of shape ({batch.shape[0]}, "
                              f"{self.num_classes}) or {batch.shape[0]} integer labels, got {tuple(out.shape)} "
                              f"({out.dtype})")
        labels = labels.to("cpu", torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise OracleError(f"the base classifier returned a label outside [0, {self.num_classes})")
        return labels

    def check_input(self, x) -> torch.Tensor:
        """One clean input of shape ``input_shape`` inside ``input_range``, as a float tensor."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {self.input_shape}, got {type(x).__name__}")
        if tuple(x.shape) != self.input_shape:
            raise ConfigError(f"x must have shape {self.input_shape} (one input), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ConfigError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ConfigError("x holds non-finite values")
        if self.input_range is not None:
            lo, hi = self.input_range
            xmin, xmax = float(x.min()), float(x.max())
            if xmin < lo - 1e-6 or xmax > hi + 1e-6:
                raise ConfigError(f"x must lie in [{lo:g}, {hi:g}] (clean inputs; noise is added here), "
                                  f"got values in [{xmin:.4g}, {xmax:.4g}]")
        return x

    # ------------------------------------------------------------------ a data set
    def certify_dataset(self, images: torch.Tensor, labels, n0: int, n: int, alpha: float,
                        progress: Callable[[int, int], None] | None = None) -> Certification:
        """CERTIFY on every image of ``images`` (shape ``(N, *input_shape)``) with its true label."""
        n0, n, alpha = check_count(n0, "n0"), check_count(n, "n"), check_alpha(alpha)
        if not isinstance(images, torch.Tensor) or images.dim() != len(self.input_shape) + 1:
            raise ConfigError(f"images must be a tensor of shape (N, {', '.join(map(str, self.input_shape))}), "
                              f"got {tuple(getattr(images, 'shape', ()))}")
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ConfigError(f"got {images.shape[0]} images but {labels.shape[0]} labels")
        for i in range(images.shape[0]):  # every input is checked before any query is spent
            try:
                self.check_input(images[i])
            except ConfigError as exc:
                raise ConfigError(f"image #{i}: {exc}") from None
        preds, radii, t0, before = [], [], time.perf_counter(), self.samples
        for i in range(images.shape[0]):
            c, r = self.certify(images[i], n0, n, alpha)
            preds.append(c)
            radii.append(r)
            if progress is not None:
                progress(i + 1, images.shape[0])
        return Certification(preds, radii, [int(v) for v in labels], sigma=self.sigma, n0=n0, n=n, alpha=alpha,
                             samples=self.samples - before, seconds=time.perf_counter() - t0)


@dataclass
class Certification:
    """CERTIFY's output on a data set.

    Attributes:
        predictions: certified class per input (:data:`ABSTAIN` = -1 when it abstained).
        radii: certified L2 radius per input (0 when it abstained).
        labels: true labels.
        sigma, n0, n, alpha: the settings used.
        samples: noisy inputs classified (base-classifier queries).
        seconds: wall time.
    """

    predictions: list[int]
    radii: list[float]
    labels: list[int]
    sigma: float
    n0: int
    n: int
    alpha: float
    samples: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def max_radius(self) -> float:
        """The largest radius these settings can certify (:func:`max_certifiable_radius`)."""
        return max_certifiable_radius(self.sigma, self.n, self.alpha)

    def certified_accuracy(self, radii: Iterable[float]) -> dict[float, float]:
        """Fraction of inputs certified correct with a radius of at least ``r``, for every ``r``."""
        return certified_accuracy(self.predictions, self.radii, self.labels, radii)

    @property
    def abstain_rate(self) -> float:
        return sum(p == ABSTAIN for p in self.predictions) / max(1, len(self.predictions))


def certified_accuracy(predictions: Sequence[int], radii: Sequence[float], labels: Sequence[int],
                       at: Iterable[float]) -> dict[float, float]:
    """``{r: fraction of inputs whose certified class is correct with radius >= r}``.

    Abstentions count as wrong (Cohen et al.'s convention). A radius above
    :func:`max_certifiable_radius` is certified for no input.
    """
    if not len(predictions) == len(radii) == len(labels):
        raise ConfigError(f"predictions, radii and labels must have one entry per input, got "
                          f"{len(predictions)}, {len(radii)} and {len(labels)}")
    out = {}
    for r in at:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0:
            raise ConfigError(f"radii must be non-negative numbers, got {r!r}")
        hits = sum(p == y and p != ABSTAIN and rad >= r for p, rad, y in zip(predictions, radii, labels))
        out[float(r)] = hits / max(1, len(labels))
    return out
