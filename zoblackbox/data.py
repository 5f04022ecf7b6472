"""Datasets bundled or read from local files (nothing is ever downloaded).

* :func:`load_digits_split` -- scikit-learn's bundled 8x8 digits (1,797 images), fixed split.
* :func:`load_cifar10` -- CIFAR-10 in its standard python format from a local directory.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, MissingDependencyError

__all__ = ["Split", "load_cifar10", "load_digits_split", "make_loader"]


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


# --------------------------------------------------------------------------- CIFAR-10 (local files)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 python format that refuses every global except numpy's array
    reconstruction (the batches hold only dicts, lists, bytes, ints and uint8 arrays)."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles store array bytes as latin-1 text
    })

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise ConfigError(f"cannot read the CIFAR-10 batch file {path}: {exc}") from exc
    except Exception as exc:  # garbage bytes fail in many ways (Overflow, Memory, Lookup, Type...)
        raise ConfigError(f"{path} is not a CIFAR-10 python batch file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict):
        raise ConfigError(f"{path} is not a CIFAR-10 python batch file (top level is {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ConfigError(f"{path} lacks the 'data' or 'labels' entry of a CIFAR-10 batch")
    data = _integer_array(path, "data", data, 0, 255).astype(np.uint8)
    labels = _integer_array(path, "labels", labels, 0, 9).astype(np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or data.shape[0] != labels.shape[0]:
        raise ConfigError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and "
                          f"{labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _integer_array(path: Path, name: str, value, lo: int, hi: int) -> np.ndarray:
    """``value`` as an integer array with entries in ``lo..hi`` (no silent casting of other types)."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{path}: '{name}' is not an array of integers ({exc})") from exc
    if arr.size == 0 and arr.dtype.kind == "f":  # an empty list reads as float64
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ConfigError(f"{path}: '{name}' must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ConfigError(f"{path}: '{name}' must lie in {lo}..{hi}, got {arr.min()}..{arr.max()}")
    return arr


def load_cifar10(path: str | Path, *, normalize: bool = True) -> Split:
    """CIFAR-10 from a local directory in the standard python format (nothing is downloaded).

    Args:
        path: the ``cifar-10-batches-py`` directory (holding ``data_batch_1..5`` and
            ``test_batch``) or its parent.
        normalize: standardize channels with the usual CIFAR-10 mean/std (else scale to [0, 1]).

    Raises:
        ConfigError: the directory or a batch file is missing or malformed. Batch files are read
            with an unpickler that accepts nothing but numpy arrays and plain containers.
    """
    root = Path(path).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise ConfigError(f"CIFAR-10 directory {root} does not exist; download the python version of CIFAR-10 "
                          "yourself and pass the folder holding data_batch_1..5 and test_batch")
    missing = [n for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (root / n).is_file()]
    if missing:
        raise ConfigError(f"CIFAR-10 directory {root} lacks {missing}")
    parts = [_read_cifar_batch(root / n) for n in CIFAR10_TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(root / CIFAR10_TEST_FILE)

    def prep(x):
        t = torch.from_numpy(x.astype(np.float32) / 255.0)
        if normalize:
            mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
            t = (t - mean) / std
        return t

    desc = f"CIFAR-10 from {root}: {len(y_tr)} train / {len(y_te)} test images, 32x32x3, 10 classes"
    return Split(prep(x_tr), torch.from_numpy(y_tr), prep(x_te), torch.from_numpy(y_te), 10, desc)
