"""Flat parameter vectors <-> named blocks (layers, stages).

A :class:`ParamLayout` records, for an ordered list of named tensors, where each one lives in the
flat vector the oracle sees. It is the generic "stage map" that replaces model-specific index
arithmetic: the sparsity code asks it for per-layer slices, feature reuse for the block a
coordinate belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of tensors packed into one flat vector (in the given order).

    Tensor ``i`` occupies ``x[offsets[i]:offsets[i + 1]]`` of the flat vector ``x`` the oracle sees;
    ``dim`` is the total size. Frozen (hashable) dataclass; build it from a model's parameters with
    :meth:`from_tensors`.

    Parameters
    ----------
    names : tuple of str
        Distinct names, in vector order.
    shapes : tuple of tuple of int
        One shape per name; entries are ints ``>= 0``.

    Raises
    ------
    ConfigError
        ``names`` not a tuple of distinct strings, a different number of shapes, or a shape that is
        not a tuple of non-negative ints.

    Examples
    --------
    >>> import torch
    >>> from zoblackbox import ParamLayout
    >>> layout = ParamLayout.from_tensors(torch.nn.Linear(3, 2).named_parameters())
    >>> layout.names, layout.shapes, layout.dim
    (('weight', 'bias'), ((2, 3), (2,)), 8)
    >>> layout.slice("bias")
    slice(6, 8, None)
    >>> {k: tuple(v.shape) for k, v in layout.unflatten(torch.arange(8.0)).items()}
    {'weight': (2, 3), 'bias': (2,)}
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if not isinstance(self.names, tuple) or not all(isinstance(n, str) for n in self.names):
            raise ConfigError(f"ParamLayout.names must be a tuple of str, got {self.names!r}")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"ParamLayout.names must be distinct, got {self.names!r}")
        if not isinstance(self.shapes, tuple) or len(self.shapes) != len(self.names):
            raise ConfigError(f"ParamLayout needs one shape per name ({len(self.names)}), got {self.shapes!r}")
        for name, shape in zip(self.names, self.shapes):
            if not isinstance(shape, tuple) or not all(
                    isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in shape):
                raise ConfigError(f"the shape of {name!r} must be a tuple of non-negative ints, got {shape!r}")

    @classmethod
    def from_tensors(cls, named: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> ParamLayout:
        """The layout of named tensors (``model.named_parameters()`` or a dict), in their order.

        Raises :class:`~zoblackbox.ConfigError` when there are none.
        """
        items = list(named.items() if isinstance(named, Mapping) else named)
        if not items:
            raise ConfigError("a parameter layout needs at least one tensor")
        return cls(tuple(n for n, _ in items), tuple(tuple(t.shape) for _, t in items))

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of every tensor."""
        out = []
        for s in self.shapes:
            n = 1
            for k in s:
                n *= k
            out.append(n)
        return tuple(out)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start offset of every tensor; the last entry is the total size."""
        acc, out = 0, [0]
        for n in self.numels:
            acc += n
            out.append(acc)
        return tuple(out)

    @property
    def dim(self) -> int:
        """Length of the flat vector."""
        return self.offsets[-1]


    def slice(self, name: str) -> slice:
        """The slice of the flat vector holding ``name``."""
        try:
            i = self.names.index(name)
        except ValueError:
            raise ConfigError(f"no parameter named {name!r}; known: {list(self.names)}") from None
        off = self.offsets
        return slice(off[i], off[i + 1])

    def block_index(self, coords: torch.Tensor) -> torch.Tensor:
        """For each flat coordinate, the index of the tensor (block) that holds it."""
        bounds = torch.tensor(self.offsets[1:-1], dtype=torch.long, device=coords.device)
        return torch.bucketize(coords, bounds, right=True)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the named tensors (in layout order) into one flat vector."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ConfigError(f"missing tensors for {missing}")
        return torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat vector ``x`` with the layout's names and shapes."""
        self._check(x.shape[-1])
        off = self.offsets
        return {n: x[off[i]:off[i + 1]].view(s) for i, (n, s) in enumerate(zip(self.names, self.shapes))}

    def unflatten_batch(self, X: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like :meth:`unflatten` for a ``(K, dim)`` batch: tensors of shape ``(K, *shape)``."""
        self._check(X.shape[-1])
        off = self.offsets
        K = X.shape[0]
        return {n: X[:, off[i]:off[i + 1]].reshape(K, *s) for i, (n, s) in enumerate(zip(self.names, self.shapes))}

    def _check(self, d: int) -> None:
        if d != self.dim:
            raise ConfigError(f"vector length {d} does not match the layout's {self.dim} parameters")
