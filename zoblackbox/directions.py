"""Direction distributions for random-direction gradient estimation (RGE).

A :class:`Directions` object says how :class:`~zoblackbox.estimators.RandomEstimator` draws its
``q`` directions and how it scales them: ``sample(q, n, generator)`` and ``phi(n)``, with
``E[phi u u^T] = I`` so that the estimate is unbiased for the gradient of the smoothed function.
The built-ins are :class:`GaussianDirections` (``"gaussian"``), :class:`SphereDirections`
(``"sphere"``) and :class:`RademacherDirections` (``"rademacher"``); subclass :class:`Directions`
for another distribution.

Example:
    >>> import torch
    >>> class CoordinateDirections(Directions):
    ...     '''Random signed coordinate axes: u = +-e_i, E[u u^T] = I / n, so phi = n.'''
    ...     name = "coordinate"
    ...     def sample(self, q, n, generator):
    ...         i = torch.randint(0, n, (q,), generator=generator)
    ...         return torch.nn.functional.one_hot(i, n).to(torch.float64)
    ...     def phi(self, n):
    ...         return float(n)
    >>> CoordinateDirections().sample(2, 3, torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3])

References: Nesterov & Spokoiny 2017 (Gaussian smoothing); Duchi et al. 2015 (uniform on the
sphere); Rademacher directions as in SPSA (Spall 1992).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .parts import is_builtin_part, resolve_part

__all__ = ["Directions", "GaussianDirections", "RademacherDirections", "SphereDirections", "directions_from"]


class Directions(ABC):
    """How an RGE draws its directions: ``sample(q, n, generator)`` and the scaling ``phi(n)``.

    Subclasses override :meth:`sample` (and :meth:`phi` unless ``E[u u^T] = I`` already). All
    randomness must come from ``generator`` (the estimator's own), so the directions are
    reproducible from the estimator's seed and restored by its ``load_state_dict``.
    """

    #: short name; the estimator's ``directions`` attribute and ``repr`` show it for the built-ins
    name: str = "custom"

    @abstractmethod
    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``q`` directions of length ``n``: a float64 CPU tensor of shape ``(q, n)``."""

    def phi(self, n: int) -> float:
        """The scaling that makes ``E[phi u u^T] = I`` for ``n`` coordinates (1 by default)."""
        return 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Stateless:
    """Built-ins have no parameters: every instance of one class is the same distribution."""

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class GaussianDirections(_Stateless, Directions):
    """``u ~ N(0, I)``; ``phi = 1``."""

    name = "gaussian"

    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(q, n, generator=generator, dtype=torch.float64)


class SphereDirections(_Stateless, Directions):
    """``u`` uniform on the unit sphere of the ``n`` coordinates (normalized Gaussians); ``phi = n``."""

    name = "sphere"

    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(q, n, generator=generator, dtype=torch.float64)
        return u / u.norm(dim=1, keepdim=True)

    def phi(self, n: int) -> float:
        return float(n)


class RademacherDirections(_Stateless, Directions):
    """``u`` with independent entries ``+-1`` (probability 1/2 each); ``phi = 1``."""

    name = "rademacher"

    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, (q, n), generator=generator, dtype=torch.float64) * 2 - 1


_BUILTIN = {cls.name: cls for cls in (GaussianDirections, SphereDirections, RademacherDirections)}


def directions_from(spec) -> Directions:
    """A :class:`Directions` from a spec: an instance (returned as is) or a built-in's name.

    Raises:
        ConfigError: ``spec`` is neither (the message names it and the allowed names).
    """
    return resolve_part(spec, Directions, _BUILTIN, "directions")


def is_builtin(obj: Directions) -> bool:
    """Whether ``obj`` is exactly one of the built-ins (a subclass of one may behave differently)."""
    return is_builtin_part(obj, _BUILTIN)