"""Direction distributions for random-direction gradient estimation (RGE).

A :class:`Directions` object says how :class:`~zoblackbox.estimators.RandomEstimator` draws its
``q`` directions and how it scales them: ``sample(q, n, generator)`` and ``phi(n)``, with
``E[phi u u^T] = I`` so that the estimate is unbiased for the gradient of the smoothed function.
The built-ins are :class:`GaussianDirections` (``"gaussian"``), :class:`SphereDirections`
(``"sphere"``) and :class:`RademacherDirections` (``"rademacher"``); subclass :class:`Directions`
for another distribution (the example of :class:`Directions` writes one).

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
    The class takes no constructor parameters.

    See Also
    --------
    GaussianDirections, SphereDirections, RademacherDirections : the built-ins.
    zoblackbox.RandomEstimator : takes ``directions=`` an instance or a built-in's name.

    Examples
    --------
    A distribution of random signed coordinate axes (``u = +-e_i``, so ``E[u u^T] = I / n`` and
    ``phi = n``):

    >>> import torch
    >>> from zoblackbox import Directions, RandomEstimator
    >>> class Axes(Directions):
    ...     name = "axes"
    ...     def sample(self, q, n, generator):
    ...         i = torch.randint(0, n, (q,), generator=generator)
    ...         sign = torch.randint(0, 2, (q, 1), generator=generator) * 2 - 1
    ...         return torch.nn.functional.one_hot(i, n).to(torch.float64) * sign
    ...     def phi(self, n):
    ...         return float(n)
    >>> Axes().sample(4, 3, torch.Generator().manual_seed(0)).abs().sum(dim=1)
    tensor([1., 1., 1., 1.], dtype=torch.float64)
    >>> RandomEstimator(q=4, directions=Axes()).num_queries(3)
    5
    """

    #: short name; the estimator's ``directions`` attribute and ``repr`` show it for the built-ins
    name: str = "custom"

    @abstractmethod
    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``q`` directions of length ``n``.

        Parameters
        ----------
        q : int
            Number of directions, ``>= 1``.
        n : int
            Number of coordinates, ``>= 1``.
        generator : torch.Generator
            The estimator's generator; all randomness must come from it.

        Returns
        -------
        torch.Tensor
            A float64 CPU tensor of shape ``(q, n)``.
        """

    def phi(self, n: int) -> float:
        """The scaling that makes ``E[phi u u^T] = I`` for ``n`` coordinates.

        Parameters
        ----------
        n : int
            Number of coordinates.

        Returns
        -------
        float
            ``phi``; 1 unless overridden.
        """
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
    """Standard normal directions, ``u ~ N(0, I)``; ``phi = 1``.

    The default of :class:`~zoblackbox.RandomEstimator` (``directions="gaussian"``). Takes no
    parameters; all instances are equal.

    See Also
    --------
    SphereDirections, RademacherDirections

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import GaussianDirections
    >>> u = GaussianDirections().sample(1000, 4, torch.Generator().manual_seed(0))
    >>> u.shape, GaussianDirections().phi(4)
    (torch.Size([1000, 4]), 1.0)
    >>> bool(abs(u.pow(2).mean() - 1) < 0.1)
    True
    """

    name = "gaussian"

    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(q, n, generator=generator, dtype=torch.float64)


class SphereDirections(_Stateless, Directions):
    """Directions uniform on the unit sphere of the ``n`` coordinates; ``phi = n``.

    Normalized Gaussians (``directions="sphere"``). Takes no parameters; all instances are equal.

    See Also
    --------
    GaussianDirections, RademacherDirections

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import SphereDirections
    >>> u = SphereDirections().sample(3, 5, torch.Generator().manual_seed(0))
    >>> u.norm(dim=1)
    tensor([1.0000, 1.0000, 1.0000], dtype=torch.float64)
    >>> SphereDirections().phi(5)
    5.0
    """

    name = "sphere"

    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(q, n, generator=generator, dtype=torch.float64)
        return u / u.norm(dim=1, keepdim=True)

    def phi(self, n: int) -> float:
        return float(n)


class RademacherDirections(_Stateless, Directions):
    """Directions with independent entries ``+-1`` (probability 1/2 each); ``phi = 1``.

    As in SPSA (``directions="rademacher"``). Takes no parameters; all instances are equal.

    See Also
    --------
    GaussianDirections, SphereDirections

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import RademacherDirections
    >>> RademacherDirections().sample(2, 4, torch.Generator().manual_seed(0)).abs()
    tensor([[1., 1., 1., 1.],
            [1., 1., 1., 1.]], dtype=torch.float64)
    """


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