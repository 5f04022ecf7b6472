"""Type aliases of the public signatures (for annotations; nothing here is called).

A point ``x`` may be a torch tensor, a numpy array or a sequence of numbers; a batch of points is
the same with two dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np
import torch
from scipy.optimize import Bounds

if TYPE_CHECKING:
    from .oracle import Oracle
    from .plan import QueryPlan

__all__ = ["ArrayLike", "BatchLike", "BoundsLike", "CoordsLike", "SchedulerLike"]

#: a 1-D point: a tensor, a numpy array, or a sequence of real numbers
ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float]
#: a 2-D batch of points, one per row
BatchLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Sequence[float]]
#: coordinate indices or a boolean mask
CoordsLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[int]
#: scipy ``Bounds``, ``(lower, upper)`` (scalars or arrays) or ``dim`` ``(min, max)`` pairs
BoundsLike: TypeAlias = Bounds | tuple | Sequence[tuple]


class SchedulerLike(Protocol):
    """What evaluates a query plan (``scheduler=``): any object with this ``run`` (the schedulers of
    ``zoblackbox.schedule`` are such objects)."""

    def run(self, oracle: Oracle, plan: QueryPlan) -> torch.Tensor:
        """Losses of every query of ``plan``, in plan order (float64, length ``len(plan)``)."""
        ...
