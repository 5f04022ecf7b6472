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

import torch

__all__ = ["QueryPlan"]


@dataclass
class QueryPlan:
    """A batch of queries around ``base``.

    Attributes:
        base: the base point, shape ``(d,)``.
        include_base: whether query 0 is the base point itself.
        coords: ``(m,)`` long tensor of perturbed coordinates (coordinate plans), else ``None``.
        offsets: ``(m,)`` signed step added to ``base[coords[j]]`` for query j (coordinate plans).
        directions: ``(m, d)`` dense perturbations added to ``base`` (direction plans), else ``None``.
        support: number of coordinates the directions live on (direction plans).
    """

    base: torch.Tensor
    include_base: bool = True
    coords: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    directions: torch.Tensor | None = None
    support: int | None = None  # coordinates the directions live on (direction plans)

    def __post_init__(self):
        if (self.coords is None) == (self.directions is None):
            raise ValueError("a QueryPlan has either coordinate steps or directions, not both or neither")
        if self.coords is not None and (self.offsets is None or self.offsets.shape != self.coords.shape):
            raise ValueError("coordinate plans need one offset per coordinate")

    @property
    def kind(self) -> str:
        return "coordinate" if self.coords is not None else "direction"

    @property
    def num_perturbations(self) -> int:
        return int(self.coords.shape[0] if self.coords is not None else self.directions.shape[0])

    def __len__(self) -> int:
        return self.num_perturbations + int(self.include_base)

    @property
    def dim(self) -> int:
        return int(self.base.shape[0])

    def point(self, i: int) -> torch.Tensor:
        """The i-th query point, shape ``(d,)``."""
        return self.points(i, i + 1)[0]

    def points(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Query points ``start..stop-1`` as a dense ``(k, d)`` tensor."""
        stop = len(self) if stop is None else stop
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
            r = torch.arange(first_row, first_row + hi - lo, device=X.device)
            c = self.coords[lo:hi].to(X.device)
            X[r, c] += self.offsets[lo:hi].to(X.device, X.dtype)
        else:
            X[first_row:] += self.directions[lo:hi].to(X.device, X.dtype)
        return X
