"""Query plans: *what* an estimator wants evaluated, independent of *how* it is evaluated.

A :class:`QueryPlan` is a base point plus a list of perturbations, either coordinate steps
(``base + offsets[j] * e_{coords[j]}``, CGE) or dense direction vectors
(``base + directions[j]``, RGE). Keeping the structure (rather than a dense ``(K, d)`` matrix)
lets schedulers exploit it: a coordinate step touches one parameter block only, which is what
feature reuse needs, and a plan over 270k coordinates never has to be materialized at once.

Query order is fixed: the base point first (when ``include_base``), then the perturbations in
order. Losses come back in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["QueryPlan"]


def _tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"QueryPlan.{name} must be a tensor, got {type(value).__name__}: {value!r}")
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise TypeError(f"QueryPlan.{name} must be a tensor, got {type(value).__name__}: {exc}") from exc


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass
class QueryPlan:
    """A batch of queries around ``base``: what an estimator wants evaluated.

    Query 0 is ``base`` (when ``include_base``), then ``base + offsets[j] * e_{coords[j]}``
    (coordinate plans) or ``base + directions[j]`` (direction plans). A plan has either
    ``coords``/``offsets`` or ``directions``. Array-likes are converted to tensors and kept as the
    attributes of the same names; ``len(plan)`` is the number of queries.

    Parameters
    ----------
    base : torch.Tensor or array_like
        The base point, 1-D floating point, shape ``(d,)``.
    include_base : bool, default True
        Whether query 0 is the base point itself.
    coords : torch.Tensor or array_like or None, default None
        ``(m,)`` integer indices in ``[0, d)`` of the perturbed coordinates (coordinate plans).
    offsets : torch.Tensor or array_like or None, default None
        ``(m,)`` real signed steps added to ``base[coords[j]]`` (coordinate plans; required with
        ``coords``, forbidden otherwise).
    directions : torch.Tensor or array_like or None, default None
        ``(m, d)`` real perturbations added to ``base`` (direction plans).
    support : int or None, default None
        Number of coordinates the directions live on, in ``[0, d]`` (direction plans).

    Raises
    ------
    ConfigError
        Both or neither of ``coords`` and ``directions``; a field of the wrong shape or dtype;
        coordinates outside ``[0, d)``; ``include_base`` not a bool; ``support`` out of range.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import QueryPlan
    >>> plan = QueryPlan(torch.zeros(3), coords=torch.tensor([0, 2]), offsets=torch.tensor([0.1, 0.1]))
    >>> len(plan), plan.kind
    (3, 'coordinate')
    >>> plan.points()
    tensor([[0.0000, 0.0000, 0.0000],
            [0.1000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.1000]])
    """

    base: torch.Tensor
    include_base: bool = True
    coords: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    directions: torch.Tensor | None = None
    support: int | None = None  # coordinates the directions live on (direction plans)

    def __post_init__(self):
        if (self.coords is None) == (self.directions is None):
            raise ConfigError("a QueryPlan has either coordinate steps or directions, not both or neither")
        self.base = base = _tensor(self.base, "base")
        if base.dim() != 1 or not base.is_floating_point():
            raise ConfigError(f"QueryPlan.base must be a 1-D floating-point tensor, got shape {tuple(base.shape)} "
                              f"and dtype {base.dtype}")
        if not isinstance(self.include_base, (bool, np.bool_)):
            raise ConfigError(f"QueryPlan.include_base must be a bool, got {self.include_base!r}")
        d = base.shape[0]
        if self.coords is not None:
            self.coords = coords = _tensor(self.coords, "coords")
            if self.offsets is None:
                raise ConfigError("coordinate plans need one offset per coordinate, got offsets=None")
            self.offsets = offsets = _tensor(self.offsets, "offsets")
            if coords.dim() != 1 or coords.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
                raise ConfigError(f"QueryPlan.coords must be a 1-D tensor of integer indices, got shape "
                                  f"{tuple(coords.shape)} and dtype {coords.dtype}")
            if offsets.shape != coords.shape or offsets.is_complex() or offsets.dtype == torch.bool:
                raise ConfigError(f"coordinate plans need one real offset per coordinate: coords has shape "
                                  f"{tuple(coords.shape)}, offsets shape {tuple(offsets.shape)} and dtype "
                                  f"{offsets.dtype}")
            if coords.numel():
                lo, hi = int(coords.min()), int(coords.max())
                if lo < 0 or hi >= d:
                    raise ConfigError(f"QueryPlan.coords must lie in [0, {d}), got an index {lo if lo < 0 else hi}")
        else:
            if self.offsets is not None:
                raise ConfigError("offsets belong to coordinate plans; a direction plan has none")
            self.directions = directions = _tensor(self.directions, "directions")
            if directions.dim() != 2 or directions.shape[1] != d or directions.is_complex() \
                    or directions.dtype == torch.bool:
                raise ConfigError(f"QueryPlan.directions must be a real (m, {d}) tensor, got shape "
                                  f"{tuple(directions.shape)} and dtype {directions.dtype}")
        if self.support is not None and (not _is_int(self.support) or not 0 <= self.support <= d):
            raise ConfigError(f"QueryPlan.support must be an int in [0, {d}] or None, got {self.support!r}")

    @property
    def kind(self) -> str:
        """``"coordinate"`` or ``"direction"``."""
        return "coordinate" if self.coords is not None else "direction"

    @property
    def num_perturbations(self) -> int:
        rows = self.coords if self.coords is not None else self.directions
        assert rows is not None  # __post_init__: a plan has coordinates or directions
        return int(rows.shape[0])

    def __len__(self) -> int:
        return self.num_perturbations + int(self.include_base)

    @property
    def dim(self) -> int:
        """Length ``d`` of the base point."""
        return int(self.base.shape[0])

    def chunks(self, size: int):
        """``(start, stop, X)`` for the queries in runs of at most ``size``: ``X`` is
        :meth:`points(start, stop) <points>`. What :meth:`Oracle.evaluate_plan
        <zoblackbox.Oracle.evaluate_plan>` iterates; a plan that must not materialize many points at
        once (``SeededPlan``) yields one point at a time in a reused buffer instead."""
        n = len(self)
        for start in range(0, n, size):
            stop = min(start + size, n)
            yield start, stop, self.points(start, stop)

    def point(self, i: int) -> torch.Tensor:
        """The i-th query point, shape ``(d,)``."""
        if not _is_int(i):
            raise TypeError(f"a query index must be an int, got {i!r}")
        return self.points(i, i + 1)[0]

    def points(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Query points ``start..stop-1`` as a dense ``(k, d)`` tensor."""
        stop = len(self) if stop is None else stop
        if not (_is_int(start) and _is_int(stop)):
            raise TypeError(f"query range bounds must be ints, got {start!r}:{stop!r}")
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"query range {start}:{stop} outside a plan of {len(self)} queries")
        shift = int(self.include_base)
        rows = stop - start
        X = self.base.unsqueeze(0).repeat(rows, 1)
        lo, hi = max(start - shift, 0), stop - shift  # perturbation indices in this range
        if hi <= lo:
            return X
        first_row = lo + shift - start
        if self.coords is not None:
            assert self.offsets is not None  # __post_init__: coordinate plans have offsets
            r = torch.arange(first_row, first_row + hi - lo, device=X.device)
            c = self.coords[lo:hi].to(X.device)
            X[r, c] += self.offsets[lo:hi].to(X.device, X.dtype)
        else:
            assert self.directions is not None
            X[first_row:] += self.directions[lo:hi].to(X.device, X.dtype)
        return X
