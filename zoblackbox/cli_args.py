"""Argument types of the ``zoblackbox`` command line, shared by its sub-commands.

``argparse`` calls them on the option's text; each returns the parsed value or raises
``argparse.ArgumentTypeError`` naming the bad text. They live here, below ``cli`` and ``cli_pde``,
so that the sub-command modules need not import ``cli`` (which imports them to register them).
"""

from __future__ import annotations

import argparse

__all__ = ["positive_float", "positive_int", "probability", "radii_list"]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def probability(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def radii_list(text: str) -> list[float]:
    """Comma-separated non-negative finite radii, e.g. ``0,0.25,0.5``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated radii such as 0,0.25,0.5, got {text!r}") from None
    if not values or any(not v >= 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative finite radii, got {text!r}")
    return values
