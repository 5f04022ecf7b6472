"""L-BFGS built for zeroth-order gradients: line searches on function values only.

With finite-difference gradients a gradient costs ``d`` queries and a function value costs one.
A line search that needs the gradient at every trial point (strong Wolfe, as in
``torch.optim.LBFGS`` or scipy's L-BFGS-B with ``approx_grad``) pays ``d + 1`` queries per trial;
this one pays one:

* every trial step is a single query; the gradient is estimated only at the accepted point, and
  the loss the line search measured there stands in for the estimate's base query
  (``Estimator.estimate(..., f0=)``), so a forward-difference iteration costs ``d + trials``;
* since trials are cheap, the search does not stop at the first sufficient decrease: a parabola
  through ``phi(0)``, ``phi'(0) = g.p`` and the latest trial proposes the next step until the
  trial sits within ``[0.8, 1.25]`` of the parabola's minimum. On a quadratic that is the exact
  line minimum after at most two trials, which makes the iteration conjugate-gradient-like;
* a curvature pair ``(s, y)`` enters the memory only when ``s.y > 0`` (no Wolfe curvature test is
  needed for that), and a direction that is not a descent direction resets the memory;
* ``noise`` (the standard deviation of one evaluation) relaxes the sufficient-decrease test by
  ``2 * noise`` (Berahas, Byrd & Nocedal, "Derivative-free optimization of noisy functions via
  quasi-Newton methods", SIAM J. Optim. 2019); where the predicted decrease is within the noise
  the first acceptable trial is taken instead of the lowest noisy value. With an estimator that
  knows its noise gain (CGE: ``sigma_g = noise * estimator.noise_gain()`` per coordinate), curvature
  pairs whose ``|y|`` is within 3x the noise's ``sqrt(2 d) sigma_g`` are left out of the memory, and
  Polyak-Ruppert averaging is on: the trailing run of iterates whose gradient estimate is mostly
  noise (``|g|^2 < 4 d sigma_g^2``) is averaged into the returned point, which cancels the
  gradient noise each of them carries (one query is kept aside to evaluate it; it is returned
  unless its loss is clearly, by more than ``3 * noise``, worse than the last iterate's).

The ask/tell state machine that runs it is :class:`zoblackbox.rules.LBFGSRule`; the line search is
a sequence of one-point asks. Used by :func:`zoblackbox.minimize` with ``optimizer="lbfgs"``.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

__all__ = ["LBFGS_DEFAULTS", "check_lbfgs_kwargs", "lbfgs_direction"]

#: keyword arguments of ``minimize(optimizer="lbfgs", optimizer_kwargs=...)`` and their defaults
LBFGS_DEFAULTS = {"history_size": 20, "max_ls": 10, "c1": 1e-4, "noise": 0.0}

_ACCEPT = (0.8, 1.25)  # a trial within this ratio of the parabola's minimum ends the line search
_SHRINK, _GROW = 0.1, 10.0  # limits of one line-search step change


def check_lbfgs_kwargs(kwargs: dict) -> dict:
    """``LBFGS_DEFAULTS`` updated with ``kwargs``; unknown names or bad values raise ConfigError."""
    unknown = sorted(set(kwargs) - set(LBFGS_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown L-BFGS option(s) {unknown}; expected some of {sorted(LBFGS_DEFAULTS)}")
    out = {**LBFGS_DEFAULTS, **kwargs}
    for name in ("history_size", "max_ls"):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"L-BFGS option {name} must be a positive int, got {v!r}")
    c1, noise = out["c1"], out["noise"]
    if isinstance(c1, bool) or not isinstance(c1, (int, float)) or not 0 < c1 < 1:
        raise ConfigError(f"L-BFGS option c1 must be in (0, 1), got {c1!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ConfigError(f"L-BFGS option noise must be a finite number >= 0 (the standard deviation of one "
                          f"evaluation), got {noise!r}")
    out["c1"], out["noise"] = float(c1), float(noise)
    return out


def lbfgs_direction(g: torch.Tensor, memory) -> torch.Tensor:
    """``-H g`` by the two-loop recursion, ``H0 = (s.y / y.y) I`` from the newest pair."""
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(memory):
        a = rho * torch.dot(s, q)
        q -= a * y
        alphas.append(a)
    if memory:
        s, y, _ = memory[-1]
        q *= torch.dot(s, y) / torch.dot(y, y)
    for (s, y, rho), a in zip(memory, reversed(alphas)):
        b = rho * torch.dot(y, q)
        q += (a - b) * s
    return -q
