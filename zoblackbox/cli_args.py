"""Argument types and pre-flight checks of the ``zoblackbox`` command line, shared by its sub-commands.

``argparse`` calls the types on the option's text; each returns the parsed value or raises
``argparse.ArgumentTypeError`` naming the bad text (argparse then exits 2 with ``expected ..., got ...``).
The ``check_*`` functions run after parsing and before any work; they raise
:class:`~zoblackbox.errors.ConfigError` naming the option and the value, which ``zoblackbox.cli.main``
prints as one line and exits 2. They live here, below ``cli`` and ``cli_pde``, so that the
sub-command modules need not import ``cli`` (which imports them to register them).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "MAX_INT",
    "bound_float",
    "check_device",
    "check_input_dir",
    "check_input_file",
    "check_output_dir",
    "check_output_file",
    "checked_number",
    "fail_nonfinite",
    "finite_float",
    "momentum_float",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "probability",
    "radii_list",
    "seed_int",
    "thread_count",
]

MAX_INT = 2**63 - 1  # the largest integer torch (and numpy) counters and seeds hold


def checked_number(text: str, convert, ok, expected: str):
    """``convert(text)`` if it parses and ``ok(value)``; else argparse's error ``expected <expected>, got ...``."""
    try:
        value = convert(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def _bounded_int(text: str, ok, expected: str) -> int:
    value = checked_number(text, int, ok, expected)
    if value > MAX_INT:
        raise argparse.ArgumentTypeError(f"expected an integer below 2**63, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (and below 2**63)."""
    return _bounded_int(text, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (and below 2**63)."""
    return _bounded_int(text, lambda v: v >= 0, "a non-negative integer")


def thread_count(text: str) -> int:
    """A torch thread count: an integer from 1 to 4096."""
    return checked_number(text, int, lambda v: 1 <= v <= 4096, "a thread count from 1 to 4096")


def seed_int(text: str) -> int:
    """A seed: an integer with 0 <= seed < 2**63."""
    return checked_number(text, int, lambda v: 0 <= v <= MAX_INT, "a seed in [0, 2**63)")


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf)."""
    return checked_number(text, float, math.isfinite, "a finite number")


def bound_float(text: str) -> float:
    """A box bound: a number, possibly -inf or inf, but not nan."""
    return checked_number(text, float, lambda v: not math.isnan(v), "a number or +-inf (not nan)")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return checked_number(text, float, lambda v: 0 < v < float("inf"), "a positive finite number")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return checked_number(text, float, lambda v: 0 <= v < float("inf"), "a non-negative finite number")


def momentum_float(text: str) -> float:
    """A momentum coefficient: a number in [0, 1)."""
    return checked_number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


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


# --------------------------------------------------------------------------- pre-flight checks


def check_device(text: str, option: str = "--device"):
    """``torch.device(text)`` if this process can put a tensor there and read it back; else ConfigError."""
    import torch

    def refuse(why: str):
        return ConfigError(f"{option} {text!r} is not usable here: {why}")

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise refuse(str(exc).splitlines()[0] if str(exc) else "not a torch device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise refuse("this torch build or machine has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise refuse(f"only {torch.cuda.device_count()} CUDA device(s) are visible")
    try:
        (torch.zeros(1, device=device) + 1).cpu()
    except Exception as exc:  # noqa: BLE001 -- any failure means the device cannot be used
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise refuse(msg) from None
    return device


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(option: str, path: Path, what: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable directory."""
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise ConfigError(f"{option} {str(path)!r}: cannot create the {what}, {str(anc)!r} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(path)!r}: cannot create the {what}, directory {str(anc)!r} is not writable")


def check_output_file(option: str, path: Path | None) -> None:
    """``path`` can be written as a file (creating its parents); nothing is created."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a directory; expected a file path")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{option} {str(path)!r} is not writable")
        return
    _check_creatable(option, path, "file")


def check_output_dir(option: str, path: Path | None) -> None:
    """``path`` is, or can be created as, a writable directory; nothing is created."""
    if path is None:
        return
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {str(path)!r} is a file; expected a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {str(path)!r}: directory is not writable")
        return
    _check_creatable(option, path, "directory")


def check_input_file(option: str, path: Path | None) -> None:
    """``path`` is an existing, readable file."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{option} {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{option} {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {str(path)!r} is not readable")


def check_input_dir(option: str, path: Path | None) -> None:
    """``path`` is an existing, readable directory."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{option} {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{option} {str(path)!r} is not readable")


# --------------------------------------------------------------------------- final metrics


def fail_nonfinite(metrics: dict, cause: str) -> int:
    """0 if every non-None value of ``metrics`` is finite; else print one error line naming them and return 1."""
    bad = []
    for name, value in metrics.items():
        try:
            if value is not None and not math.isfinite(float(value)):
                bad.append(f"{name} = {value}")
        except (TypeError, ValueError):
            bad.append(f"{name} = {value!r}")
    if not bad:
        return 0
    import sys

    print(f"zoblackbox: error: the run ended with non-finite {', '.join(bad)}; {cause}", file=sys.stderr)
    return 1
