"""The CIFAR-10 loader, tested on small files written in the standard python format."""

import os
import pickle

import numpy as np
import pytest
import torch

from zoblackbox import ConfigError
from zoblackbox.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10


def _write_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with open(path, "wb") as f:  # the real files are protocol-2 pickles of dicts with bytes keys
        pickle.dump({b"batch_label": b"testing", b"labels": labels, b"data": data, b"filenames": []}, f, protocol=2)
    return data, labels


@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    train = [_write_batch(root / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test = _write_batch(root / "test_batch", 3, 99)
    return tmp_path, train, test


def test_loads_standard_format_with_layout_and_normalization(cifar_dir):
    parent, train, _ = cifar_dir
    split = load_cifar10(parent)  # the parent of cifar-10-batches-py works too
    assert split.x_train.shape == (20, 3, 32, 32) and split.x_test.shape == (3, 3, 32, 32)
    assert split.y_train.tolist() == [v for _, labels in train for v in labels]
    # pixel (channel 1, row 2, col 5) of the first image, CHW layout of the 3072 bytes
    raw = train[0][0][0, 1 * 1024 + 2 * 32 + 5]
    expected = (raw / 255.0 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert float(split.x_train[0, 1, 2, 5]) == pytest.approx(expected, rel=1e-5)
    plain = load_cifar10(parent / "cifar-10-batches-py", normalize=False)
    assert float(plain.x_test.max()) <= 1.0 and plain.x_test.dtype == torch.float32


def test_missing_directory_and_files(tmp_path, cifar_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    parent, *_ = cifar_dir
    os.remove(parent / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(ConfigError, match=r"lacks \['data_batch_3'\]"):
        load_cifar10(parent)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_batch_file_is_refused(cifar_dir):
    parent, *_ = cifar_dir
    with open(parent / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(ConfigError, match="refusing to load posix.system"):
        load_cifar10(parent)


def test_malformed_batch(cifar_dir):
    parent, *_ = cifar_dir
    with open(parent / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ConfigError, match=r"shape \(N, 3072\)"):
        load_cifar10(parent)
