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

from .errors import ConfigError
from .parts import is_builtin_part, resolve_part

__all__ = ["Directions", "GaussianDirections", "RademacherDirections", "SeededDirections", "SphereDirections",
           "directions_from"]


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


_MASK64 = 2**64 - 1


def _block_seed(seed: int, block: int) -> int:
    """A 64-bit seed for block ``block`` of the direction with seed ``seed`` (splitmix64 finalizer of
    ``seed + (block + 1) * golden``): nearby seeds and blocks give unrelated generator states."""
    z = (seed + (block + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SeededDirections(Directions):
    """Directions that can be regenerated piece by piece from one integer seed each.

    Row ``k`` of :meth:`sample` is the direction of a seed ``s_k`` drawn from the estimator's
    generator; its entries ``[j * block, (j + 1) * block)`` come from a generator seeded with a hash
    of ``(s_k, j)``, drawn from ``base`` (Gaussian or Rademacher entries, i.i.d., so ``phi`` is
    ``base``'s). Any block of any direction can therefore be rebuilt alone, without the rest: the
    memory-free estimator :class:`~zoblackbox.SeedReplayEstimator` keeps only the ``q`` seeds and
    regenerates each block when it perturbs a point or applies an update, while
    :class:`~zoblackbox.RandomEstimator` with these directions draws the same numbers as a dense
    ``(q, n)`` matrix (its reference, and the path to compare it with).

    Parameters
    ----------
    base : {"gaussian", "rademacher"} or GaussianDirections or RademacherDirections, default "gaussian"
        The distribution of the entries (an entry-wise i.i.d. built-in; the sphere is not, its rows
        are normalized as a whole).
    block : int, default 65536
        Entries per regenerated block, ``1 <= block <= 2**26``: the memory one regeneration needs
        (``8 * block`` bytes) against the cost of seeding a generator per block.

    Raises
    ------
    ConfigError
        ``base`` is not one of the two entry-wise built-ins, or ``block`` is not an int in range.

    See Also
    --------
    SeedReplayEstimator : the estimator that replays these directions from their seeds.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import SeededDirections
    >>> dirs = SeededDirections(block=4)
    >>> U = dirs.sample(2, 10, torch.Generator().manual_seed(0))
    >>> seeds = dirs.seeds(2, torch.Generator().manual_seed(0))
    >>> bool(torch.equal(U[1, 4:8], dirs.block(int(seeds[1]), 1, 4)))
    True
    """

    name = "seeded"

    def __init__(self, base: str | Directions = "gaussian", block: int = 65536):
        resolved = directions_from(base)
        if type(resolved) not in (GaussianDirections, RademacherDirections):
            raise ConfigError(f"SeededDirections needs entry-wise i.i.d. directions ('gaussian' or 'rademacher'), "
                              f"got base={base!r}")
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 2**26:
            raise ConfigError(f"block must be an int in [1, 2**26], got {block!r}")
        self.base: Directions = resolved
        self.block_size = block

    def seeds(self, q: int, generator: torch.Generator) -> torch.Tensor:
        """``q`` direction seeds (int64, in ``[0, 2**62)``) drawn from ``generator``."""
        return torch.randint(0, 2**62, (q,), generator=generator, dtype=torch.int64)

    def block(self, seed: int, j: int, length: int) -> torch.Tensor:
        """Entries ``[j * block, j * block + length)`` of the direction of ``seed`` (float64, CPU)."""
        g = torch.Generator().manual_seed(_block_seed(int(seed), int(j)))
        return self.base.sample(1, length, g)[0]

    def blocks(self, n: int):
        """``(j, start, stop)`` of the blocks that cover ``n`` entries."""
        for j, start in enumerate(range(0, n, self.block_size)):
            yield j, start, min(start + self.block_size, n)

    def row(self, seed: int, n: int) -> torch.Tensor:
        """The whole direction of ``seed`` over ``n`` entries (float64, CPU)."""
        out = torch.empty(n, dtype=torch.float64)
        for j, start, stop in self.blocks(n):
            out[start:stop] = self.block(seed, j, stop - start)
        return out

    def sample(self, q: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.stack([self.row(int(s), n) for s in self.seeds(q, generator)])

    def phi(self, n: int) -> float:
        return self.base.phi(n)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.base == self.base and other.block_size == self.block_size

    def __hash__(self) -> int:
        return hash((type(self), type(self.base), self.block_size))

    def __repr__(self) -> str:
        return f"SeededDirections(base={self.base.name!r}, block={self.block_size})"


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