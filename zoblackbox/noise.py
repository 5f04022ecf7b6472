"""Estimating the noise level of a function from a few evaluations (ECNoise).

Moré & Wild, "Estimating computational noise", SIAM J. Sci. Comput. 33(3), 2011: evaluate the
function at ``m + 1`` equally spaced points along a line, ``f(x + (i - m/2) h p)``, and build the
table of finite differences. For a smooth function the ``k``-th differences shrink like ``h^k``;
for noise of standard deviation ``sigma`` they grow like ``sqrt(C(2k, k)) sigma``. So
``sigma_k = sqrt(gamma_k * mean(diff_k^2))`` with ``gamma_k = (k!)^2 / (2k)!`` estimates
``sigma`` at every order ``k`` where the noise dominates; the estimate is accepted at the first
order where three consecutive levels agree within a factor of 4 and the differences change sign
(noise, not a smooth trend).

:func:`ecnoise` is the estimator; :func:`zoblackbox.minimize`'s default strategy
(:mod:`zoblackbox.strategy`) calls it on ``m + 1 = 7`` evaluations on a line through ``x0`` (``f(x0)`` and 6 more), counted in the
budget, and picks its finite-difference scheme and step from the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["NoiseEstimate", "ecnoise"]


@dataclass(frozen=True)
class NoiseEstimate:
    """The result of :func:`ecnoise`.

    Attributes:
        sigma: the estimated standard deviation of one evaluation (``0.0`` when every value was
            identical: no noise visible at this step).
        status: ``"ok"`` (three difference orders agree), ``"constant"`` (all values equal: the
            step was too small to see any change, or the function is flat there), ``"h too large"``
            (the differences keep shrinking or never change sign: a smooth trend dominates; sigma
            is then the smallest level seen, an upper bound), or ``"not finite"``.
        levels: ``sigma_k`` for k = 1..m.
    """

    sigma: float
    status: str
    levels: tuple[float, ...]


def ecnoise(values) -> NoiseEstimate:
    """The noise level of ``m + 1`` function values at equally spaced points on a line (ECNoise).

    Args:
        values: ``f(x + (i - m/2) h p)`` for ``i = 0..m`` (``m >= 4``; Moré & Wild use ``m = 6..8``).

    Returns:
        :class:`NoiseEstimate`.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> t = np.linspace(-1e-3, 1e-3, 9)
        >>> est = ecnoise(np.cos(t) + 1e-6 * rng.standard_normal(9))
        >>> est.status, 3e-7 < est.sigma < 3e-6
        ('ok', True)
    """
    f = np.asarray(values, dtype=np.float64).reshape(-1)
    m = f.size - 1
    if m < 4:
        raise ValueError(f"ecnoise needs at least 5 values, got {f.size}")
    if not np.isfinite(f).all():
        return NoiseEstimate(math.nan, "not finite", ())
    if np.all(f == f[0]):
        return NoiseEstimate(0.0, "constant", (0.0,) * m)
    levels, sign_change = [], []
    diff = f
    for k in range(1, m + 1):
        diff = np.diff(diff)
        gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
        levels.append(math.sqrt(gamma * float(np.mean(diff * diff))))
        sign_change.append(bool(diff.max() > 0 > diff.min()))
    for k in range(m - 2):
        window = levels[k:k + 3]
        if min(window) > 0 and max(window) <= 4 * min(window) and sign_change[k]:
            return NoiseEstimate(levels[k], "ok", tuple(levels))
    positive = [v for v in levels if v > 0]
    return NoiseEstimate(min(positive) if positive else 0.0, "h too large", tuple(levels))
