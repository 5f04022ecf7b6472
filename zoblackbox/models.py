"""Small reference models (``nn.Sequential``, so feature reuse can stage them automatically)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import ConfigError

__all__ = ["MODELS", "count_params", "digits_cnn", "digits_mlp"]


def digits_cnn(channels: tuple[int, int] = (8, 16), hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """CNN for 8x8 digits: conv 1->c1, pool, conv c1->c2, pool, fc 4*c2->hidden, fc hidden->classes.

    With the defaults it has 3,658 parameters (conv 1->8, conv 8->16, fc 64->32, fc 32->10).
    """
    c1, c2 = channels
    if min(c1, c2, hidden, num_classes) < 1:
        raise ConfigError(f"channels, hidden and num_classes must be >= 1, got {channels}, {hidden}, {num_classes}")
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * c2, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def digits_mlp(hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """MLP for 8x8 digits: 64 -> hidden -> classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


MODELS: dict[str, Callable[[], nn.Sequential]] = {"cnn": digits_cnn, "mlp": digits_mlp}
