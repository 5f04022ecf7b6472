"""Type aliases of the public signatures (for annotations; nothing here is called).

A point ``x`` may be a torch tensor, a numpy array or a sequence of numbers; a batch of points is
the same with two dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch
from scipy.optimize import Bounds

__all__ = ["ArrayLike", "BatchLike", "BoundsLike", "CoordsLike"]

#: a 1-D point: a tensor, a numpy array, or a sequence of real numbers
ArrayLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[float]
#: a 2-D batch of points, one per row
BatchLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Sequence[float]]
#: coordinate indices or a boolean mask
CoordsLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[int]
#: scipy ``Bounds``, ``(lower, upper)`` (scalars or arrays) or ``dim`` ``(min, max)`` pairs
BoundsLike: TypeAlias = Bounds | tuple | Sequence[tuple]
