"""Argument types of the ``zoblackbox`` command line, shared by its sub-commands.

``argparse`` calls them on the option's text; each returns the parsed value or raises
``argparse.ArgumentTypeError`` naming the bad text. They live here, below ``cli`` and ``cli_pde``,
so that the sub-command modules need not import ``cli`` (which imports them to register them).
"""

from __future__ import annotations

import argparse

__all__ = ["checked_number", "non_negative_int", "positive_float", "positive_int", "probability", "radii_list"]


def checked_number(text: str, convert, ok, expected: str):
    """``convert(text)`` if it parses and ``ok(value)``; else argparse's error ``expected <expected>, got ...``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return checked_number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return checked_number(text, int, lambda v: v >= 0, "a non-negative integer")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return checked_number(text, float, lambda v: 0 < v < float("inf"), "a positive finite number")


def probability(text: str) -> float:
    """A number strictly between 0 and 1."""
    return checked_number(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def radii_list(text: str) -> list[float]:
    """Comma-separated non-negative finite radii, e.g. ``0,0.25,0.5``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated radii such as 0,0.25,0.5, got {text!r}") from None
    if not values or any(not v >= 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative finite radii, got {text!r}")
    return values
