"""Datasets bundled or read from local files (nothing is ever downloaded).

* :func:`load_digits_split` -- scikit-learn's bundled 8x8 digits (1,797 images), fixed split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError, MissingDependencyError

__all__ = ["Split", "load_digits_split", "make_loader"]


@dataclass
class Split:
    """Train/test tensors: images ``(N, C, H, W)`` float32 in [0, 1], integer labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    description: str

    def __str__(self) -> str:
        return self.description


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` images scaled to [0, 1], split stratified by class.

    The split is a fixed function of ``(test_fraction, seed)``: with the defaults, 1,437 training
    and 360 test images.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a core dependency
        raise MissingDependencyError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    desc = (f"digits split (sklearn load_digits, stratified, seed={seed}): {len(y_tr)} train / {len(y_te)} test "
            f"images, 8x8, 10 classes")
    return Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te),
                 10, desc)


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over tensors whose shuffling is a function of ``seed`` (reproducible)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    g = torch.Generator()
    g.manual_seed(seed)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)
