"""Fitness shaping for random-direction gradient estimation (RGE).

A :class:`FitnessShaping` object transforms the paired losses of an estimate before the
differences are taken: ``shaping(plus, minus, with_base=...) -> (plus, minus)``. ``plus[k]`` is
``f(x + mu u_k)``; ``minus[k]`` is ``f(x - mu u_k)`` (antithetic) or, when ``with_base`` is true,
the base loss ``f(x)`` repeated (forward scheme; it counts once among the losses used). The
estimator calls it after dropping non-finite pairs and after ``top_b`` selection, so the losses
are finite and are exactly those the estimate uses.

Built-ins: :class:`StdShaping` (``"std"``, ARS V2, Mania et al. 2018) and :class:`RankShaping`
(``"rank"``, centered ranks, Salimans et al. 2017). Shaping makes the estimate invariant to the
loss's scale, so it is a search direction rather than an unbiased gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .parts import is_builtin_part, resolve_part

__all__ = ["FitnessShaping", "RankShaping", "StdShaping", "average_ranks", "shaping_from"]


class FitnessShaping(ABC):
    """Transforms the paired losses of an RGE estimate: ``__call__(plus, minus, *, with_base)``.

    Subclasses implement ``__call__`` and return two 1-D tensors shaped like ``plus`` and
    ``minus``; the estimator then uses ``(plus - minus) / (2 mu)`` (or ``/ mu``) as usual. The
    class takes no constructor parameters.

    See Also
    --------
    StdShaping, RankShaping : the built-ins.
    zoblackbox.RandomEstimator : takes ``fitness_shaping=`` an instance or a built-in's name.

    Examples
    --------
    Shaping that keeps only the sign of each pair's difference:

    >>> import torch
    >>> from zoblackbox import FitnessShaping, RandomEstimator
    >>> class SignShaping(FitnessShaping):
    ...     name = "sign"
    ...     def __call__(self, plus, minus, *, with_base):
    ...         return torch.sign(plus - minus) / 2, -torch.sign(plus - minus) / 2
    >>> SignShaping()(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0]), with_base=False)
    (tensor([ 0.5000, -0.5000]), tensor([-0.5000,  0.5000]))
    >>> RandomEstimator(q=4, antithetic=True, fitness_shaping=SignShaping()).fitness_shaping
    SignShaping()
    """

    #: short name; the estimator's ``fitness_shaping`` attribute and ``repr`` show it for the built-ins
    name: str = "custom"

    @abstractmethod
    def __call__(self, plus: torch.Tensor, minus: torch.Tensor, *, with_base: bool):
        """Shape the paired losses.

        Parameters
        ----------
        plus : torch.Tensor
            1-D losses ``f(x + mu u_k)``.
        minus : torch.Tensor
            1-D losses ``f(x - mu u_k)``, or the base loss repeated when ``with_base``.
        with_base : bool
            Whether ``minus`` is the base loss repeated (forward scheme).

        Returns
        -------
        tuple of torch.Tensor
            The shaped ``(plus, minus)``, shaped like the inputs.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _used(plus: torch.Tensor, minus: torch.Tensor, with_base: bool) -> torch.Tensor:
    """The losses the estimate uses: the base loss counts once in the forward scheme."""
    return torch.cat([plus, minus[:1]]) if with_base else torch.cat([plus, minus])


class _Stateless:
    """Built-ins have no parameters: every instance of one class is the same transformation."""

    def __eq__(self, other) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class StdShaping(_Stateless, FitnessShaping):
    """Divide the losses by the standard deviation (population, ``ddof=0``) of the losses used.

    ARS V2 (Mania, Guy & Recht 2018): the step is divided by the standard deviation of the ``2b``
    rewards of the kept pairs. A zero standard deviation (all losses equal, or a single loss)
    leaves the losses unchanged, so the estimate is zero rather than NaN. Takes no parameters;
    ``fitness_shaping="std"`` is this shaping.

    See Also
    --------
    RankShaping

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import StdShaping
    >>> plus, minus = StdShaping()(torch.tensor([2.0, 4.0]), torch.tensor([0.0, 2.0]), with_base=False)
    >>> plus, minus
    (tensor([1.4142, 2.8284]), tensor([0.0000, 1.4142]))
    """

    name = "std"

    def __call__(self, plus: torch.Tensor, minus: torch.Tensor, *, with_base: bool):
        values = _used(plus, minus, with_base)
        sd = values.std(unbiased=False) if values.numel() > 1 else values.new_tensor(0.0)
        sd = sd if sd > 0 else values.new_tensor(1.0)
        return plus / sd, minus / sd


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ranks of a 1-D tensor, ties getting the mean of their ranks (float64).

    Equals ``scipy.stats.rankdata(values, method="average") - 1`` exactly (for finite values and
    fewer than 2**52 of them: every rank is an integer or a half, exact in float64), with torch
    only: the same stable sort and the same tie test (``!=`` between sorted neighbours, so
    ``-0.0`` and ``0.0`` tie).
    """
    v = values.reshape(-1)
    m = v.numel()
    if m == 0:
        return torch.zeros(0, dtype=torch.float64, device=values.device)
    order = torch.sort(v, stable=True).indices
    s = v[order]
    new = torch.ones(m, dtype=torch.bool, device=v.device)
    new[1:] = s[1:] != s[:-1]
    starts = new.nonzero().flatten()  # first sorted position of each group of equal values
    ends = torch.cat([starts[1:], starts.new_tensor([m])])
    # a group at sorted positions start .. end - 1 shares the mean rank (start + end - 1) / 2
    mean = (starts + ends - 1).to(torch.float64) / 2
    ranks = torch.empty(m, dtype=torch.float64, device=v.device)
    ranks[order] = mean[torch.cumsum(new.to(torch.long), 0) - 1]
    return ranks


class RankShaping(_Stateless, FitnessShaping):
    """Replace the losses by centered ranks in ``[-0.5, 0.5]``; ties get the mean of their ranks.

    Salimans et al. 2017 (OpenAI ES): rank ``r`` of ``m`` losses becomes ``r / (m - 1) - 0.5``, so
    the estimate depends only on the order of the losses. In the forward scheme the base loss is
    ranked once and its rank stands for every pair. Takes no parameters;
    ``fitness_shaping="rank"`` is this shaping.

    See Also
    --------
    StdShaping

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import RankShaping
    >>> RankShaping()(torch.tensor([10.0, 30.0]), torch.tensor([20.0, 1000.0]), with_base=False)
    (tensor([-0.5000,  0.1667]), tensor([-0.1667,  0.5000]))
    """


    name = "rank"

    def __call__(self, plus: torch.Tensor, minus: torch.Tensor, *, with_base: bool):
        values = _used(plus, minus, with_base)
        ranks = average_ranks(values).to(dtype=values.dtype, device=values.device)
        centered = ranks / max(values.numel() - 1, 1) - 0.5
        k = plus.numel()
        return centered[:k], (centered[k:].expand(k) if with_base else centered[k:])


_BUILTIN = {cls.name: cls for cls in (StdShaping, RankShaping)}


def shaping_from(spec) -> FitnessShaping | None:
    """A :class:`FitnessShaping` (or ``None``) from a spec: ``None``, a built-in's name or an instance.

    Raises:
        ConfigError: ``spec`` is none of these (the message names it and the allowed names).
    """
    return resolve_part(spec, FitnessShaping, _BUILTIN, "fitness_shaping", allow_none=True)


def is_builtin(obj: FitnessShaping) -> bool:
    """Whether ``obj`` is exactly one of the built-ins (a subclass of one may behave differently)."""
    return is_builtin_part(obj, _BUILTIN)