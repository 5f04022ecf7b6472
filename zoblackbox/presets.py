"""Named recipes from the literature, as keyword arguments of ``minimize`` and ``AskTell``.

A preset is a :class:`Preset`: a ``dict`` of ``estimator``, ``optimizer``, ``lr`` (and
``optimizer_kwargs`` when a recipe needs them), so it unpacks into
``zoblackbox.minimize(oracle, x0, budget=..., **preset)`` or ``zoblackbox.AskTell(x0, **preset)``.
Its ``repr`` names the recipe and its parameters; ``preset.name`` and ``preset.params`` hold them.

The estimator in a preset is one object with its own random generator: a second run from the same
preset continues that generator's stream. Call the preset function again for a fresh, identically
seeded run.

Example:
    >>> import torch
    >>> from zoblackbox import FunctionOracle, minimize
    >>> from zoblackbox.presets import ars_v2t
    >>> oracle = FunctionOracle(lambda x: ((x - 1) ** 2).sum(), 4, dtype=torch.float64)
    >>> preset = ars_v2t(n_directions=8, top_b=4, step_size=0.02, noise=0.03)
    >>> preset
    ars_v2t(n_directions=8, top_b=4, step_size=0.02, noise=0.03, seed=0)
    >>> res = minimize(oracle, torch.zeros(4, dtype=torch.float64), budget=2_000, **preset)
"""

from __future__ import annotations

import math

import numpy as np

from .directions import GaussianDirections
from .errors import ConfigError
from .estimators import MAX_MU, MAX_Q, RandomEstimator
from .shaping import RankShaping, StdShaping

__all__ = ["PRESETS", "Preset", "ars_v2t", "openai_es"]


class Preset(dict):
    """Keyword arguments of ``minimize`` / ``AskTell`` built by a named recipe.

    A ``dict`` (so ``**preset`` works) that remembers the recipe: ``name`` and ``params`` (the
    arguments it was built from), shown by ``repr`` as ``name(param=value, ...)``. Built by the
    preset functions (:func:`ars_v2t`, :func:`openai_es`); it pickles with its name and parameters.

    Parameters
    ----------
    name : str
        The recipe's name (positional only).
    params : dict
        The arguments the recipe was built from (positional only; copied).
    **kwargs
        The keyword arguments of ``minimize``/``AskTell``: ``estimator``, ``optimizer``, ``lr``,
        ``optimizer_kwargs``.

    See Also
    --------
    ars_v2t, openai_es

    Examples
    --------
    >>> from zoblackbox import Preset
    >>> p = Preset("plain_sgd", {"lr": 0.1}, optimizer="sgd", lr=0.1)
    >>> p, dict(p)
    (plain_sgd(lr=0.1), {'optimizer': 'sgd', 'lr': 0.1})
    """

    def __init__(self, name: str, params: dict, /, **kwargs):
        super().__init__(**kwargs)
        self.name = name
        self.params = dict(params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"

    def __reduce__(self):  # dict subclasses pickle their items but not these attributes
        return (_rebuild, (self.name, self.params, dict(self)))


def _rebuild(name, params, items):
    return Preset(name, params, **items)


def _positive_int(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what} must be an int >= 1, got {value!r}")
    return int(value)


def _positive_float(value, what: str) -> float:
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _at_most(value, limit, what: str, why: str):
    """``value`` if ``<= limit``, else ConfigError naming the preset's own argument (not the estimator's)."""
    if value > limit:
        shown = limit if isinstance(limit, int) else f"{limit:g}"
        raise ConfigError(f"{what}={value!r} is too large (at most {shown}: {why})")
    return value


def _seed(value):
    # RandomEstimator checks the range; the preset refuses the wrong kinds under its own name
    if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))):
        raise ConfigError(f"seed must be an int or None, got {value!r}")
    return value


def ars_v2t(n_directions: int, top_b: int, step_size: float, noise: float, seed: int | None = 0) -> Preset:
    """ARS V2-t, Augmented Random Search (Mania, Guy & Recht 2018, arXiv:1803.07055, Algorithm 1).

    Each step draws ``N = n_directions`` Gaussian directions ``delta_k``, queries ``x +- nu delta_k``
    (``nu = noise``), keeps the ``b = top_b`` pairs whose better side is best, and moves::

        x <- x - alpha / (b sigma_R) * sum_k (f(x + nu delta_k) - f(x - nu delta_k)) delta_k

    with ``alpha = step_size`` and ``sigma_R`` the standard deviation of the ``2b`` losses kept
    (losses are negated rewards, so this is the paper's ascent on rewards). It is built as::

        RandomEstimator(mu=nu, q=N, antithetic=True, top_b=b, fitness_shaping=StdShaping(),
                        directions=GaussianDirections(), seed=seed)
        optimizer="sgd", lr=2 * nu * alpha

    The estimator averages ``(f+ - f-) / sigma_R / (2 nu) * delta`` over the ``b`` pairs, hence
    ``lr = 2 nu alpha`` gives the paper's step. The "V2" state normalization is the oracle's
    business (``GymPolicyOracle(..., obs_norm="running")``). One step costs ``2N`` queries.

    Parameters
    ----------
    n_directions : int
        ``N``, directions per step; ``1 <= N <= 2**24``.
    top_b : int
        ``b``, pairs kept; ``1 <= b <= N`` (``b = N`` is ARS V2).
    step_size : float
        ``alpha``; a positive finite number.
    noise : float
        ``nu``, the exploration radius; positive, finite, at most ``1e30``.
    seed : int or None, default 0
        Seed of the directions (``None`` means 0).

    Returns
    -------
    Preset
        ``estimator``, ``optimizer="sgd"`` and ``lr = 2 nu alpha``.

    Raises
    ------
    ConfigError
        An argument of the wrong kind (a bool is not an int) or out of its range above, or
        ``top_b > n_directions``.

    See Also
    --------
    openai_es

    Examples
    --------
    >>> from zoblackbox import ars_v2t
    >>> preset = ars_v2t(8, 4, step_size=0.02, noise=0.03)
    >>> preset["optimizer"], round(preset["lr"], 6)
    ('sgd', 0.0012)
    >>> preset["estimator"]
    RandomEstimator(mu=0.03, q=8, directions='gaussian', antithetic=True, top_b=4, fitness_shaping='std')

    The preset unpacks into :func:`minimize`:

    >>> import numpy as np
    >>> from zoblackbox import minimize
    >>> res = minimize(lambda x: float(((x - 1) ** 2).sum()), np.zeros(4), budget=400, **preset)
    >>> res.nfev <= 400, res.fun < 4.0
    (True, True)
    """
    n = _at_most(_positive_int(n_directions, "n_directions"), MAX_Q, "n_directions", "the estimator's MAX_Q directions")
    b = _positive_int(top_b, "top_b")
    if b > n:
        raise ConfigError(f"top_b must be at most n_directions={n} (the pairs it keeps), got {top_b!r}")
    alpha = _positive_float(step_size, "step_size")
    nu = _at_most(_positive_float(noise, "noise"), MAX_MU, "noise", "the perturbed points would overflow float32")
    seed = _seed(seed)
    estimator = RandomEstimator(mu=nu, q=n, antithetic=True, top_b=b, fitness_shaping=StdShaping(),
                                directions=GaussianDirections(), seed=seed)
    params = {"n_directions": n_directions, "top_b": top_b, "step_size": step_size, "noise": noise, "seed": seed}
    return Preset("ars_v2t", params, estimator=estimator, optimizer="sgd", lr=2 * nu * alpha)


def openai_es(population: int, sigma: float, lr: float, weight_decay: float = 0.0, seed: int | None = 0) -> Preset:
    """OpenAI ES (Salimans, Ho, Chen, Sidor & Sutskever 2017, arXiv:1703.03864) with Adam.

    Each step evaluates a population of ``population`` points ``x +- sigma eps_k`` in mirrored
    (antithetic) pairs, ``eps_k ~ N(0, I)``, replaces the losses by centered ranks in
    ``[-0.5, 0.5]`` and feeds ``sum_k (r+_k - r-_k) eps_k`` to Adam. It is built as::

        RandomEstimator(mu=sigma, q=population // 2, antithetic=True, fitness_shaping=RankShaping(),
                        directions=GaussianDirections(), seed=seed)
        optimizer="adam", lr=lr        # "adamw" with optimizer_kwargs={"weight_decay": ...} if > 0

    Mapping: the paper's code divides the weighted sum by the population size; this estimator
    divides by ``q = population / 2`` and by ``2 sigma``, i.e. it is the paper's gradient times
    ``1 / sigma``. Adam's step does not depend on the gradient's scale (up to its ``eps``), so
    ``lr`` is the paper's learning rate unchanged (0.01 in its MuJoCo experiments). Weight decay
    here is AdamW's decoupled decay (``x <- x - lr * weight_decay * x``), which does not depend on
    ``sigma``; the paper's code instead adds ``l2coeff * x`` to the gradient before Adam, which is
    ``optimizer="adam", optimizer_kwargs={"weight_decay": l2coeff / sigma}`` here. The paper's
    virtual batch normalization and observation normalization belong to the policy and the oracle.
    One step costs ``population`` queries.

    Parameters
    ----------
    population : int
        Points evaluated per step; an even int, ``2 <= population <= 2**25`` (mirrored pairs).
    sigma : float
        The noise standard deviation; positive, finite, at most ``1e30``.
    lr : float
        Adam's learning rate; a positive finite number.
    weight_decay : float, default 0.0
        Decoupled weight decay, finite and ``>= 0`` (0 = plain Adam, otherwise AdamW).
    seed : int or None, default 0
        Seed of the directions (``None`` means 0).

    Returns
    -------
    Preset
        ``estimator``, ``optimizer`` (``"adam"`` or ``"adamw"``), ``lr`` and, with weight decay,
        ``optimizer_kwargs``.

    Raises
    ------
    ConfigError
        ``population`` odd, below 2 or too large; ``sigma``, ``lr`` or ``weight_decay`` out of range
        or not a number; ``seed`` not an int or ``None``.

    See Also
    --------
    ars_v2t

    Examples
    --------
    >>> from zoblackbox import openai_es
    >>> openai_es(population=40, sigma=0.05, lr=0.01)["estimator"]
    RandomEstimator(mu=0.05, q=20, directions='gaussian', antithetic=True, fitness_shaping='rank')
    >>> openai_es(population=40, sigma=0.05, lr=0.01, weight_decay=1e-3)["optimizer"]
    'adamw'
    """

    if (isinstance(population, (bool, np.bool_)) or not isinstance(population, (int, np.integer)) or population < 2
            or population % 2):
        raise ConfigError(f"population must be an even int >= 2 (mirrored pairs), got {population!r}")
    _at_most(int(population), 2 * MAX_Q, "population", "two directions each for the estimator's MAX_Q")
    mu = _at_most(_positive_float(sigma, "sigma"), MAX_MU, "sigma", "the perturbed points would overflow float32")
    rate = _positive_float(lr, "lr")
    if (isinstance(weight_decay, (bool, np.bool_))
            or not isinstance(weight_decay, (int, float, np.integer, np.floating))
            or not math.isfinite(weight_decay) or weight_decay < 0):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    seed = _seed(seed)
    estimator = RandomEstimator(mu=mu, q=int(population) // 2, antithetic=True, fitness_shaping=RankShaping(),
                                directions=GaussianDirections(), seed=seed)
    params = {"population": population, "sigma": sigma, "lr": lr, "weight_decay": weight_decay, "seed": seed}
    if weight_decay > 0:
        return Preset("openai_es", params, estimator=estimator, optimizer="adamw", lr=rate,
                      optimizer_kwargs={"weight_decay": float(weight_decay)})
    return Preset("openai_es", params, estimator=estimator, optimizer="adam", lr=rate)


#: the presets by name
PRESETS = {"ars_v2t": ars_v2t, "openai_es": openai_es}
