"""Learning-rate schedules: one implementation, used by every driver.

A schedule is a small callable ``schedule(step) -> factor`` (the multiplier of the peak learning
rate at optimizer step ``step``, counted from 0), the contract of torch's
``torch.optim.lr_scheduler.LambdaLR``, which applies it: pass it as ``lr_schedule=`` to
:func:`~zoblackbox.minimize`, :class:`~zoblackbox.AskTell` or the :class:`~zoblackbox.Trainer`, or
to ``LambdaLR`` in a loop of your own. Schedules describe themselves (:meth:`config`), so a
checkpoint can say which one a run used.
"""

from __future__ import annotations

import math

from .errors import ConfigError

__all__ = ["Constant", "WarmupCosine", "schedule_from"]


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class WarmupCosine:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_fraction`` at ``total_steps``.

    ``factor(step) = (step + 1) / warmup_steps`` during the warm-up; afterwards, with
    ``t = min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps))``,
    ``factor = final_fraction + (1 - final_fraction) * (1 + cos(pi t)) / 2``; it stays at
    ``final_fraction`` past ``total_steps``. Call it with a step to get the factor.

    Parameters
    ----------
    total_steps : int
        The step at which the decay reaches ``final_fraction``; an int ``>= 0``.
    warmup_steps : int, default 0
        Steps of linear warm-up from ``1 / warmup_steps`` to 1; an int ``>= 0``.
    final_fraction : float, default 0.0
        The factor at and after ``total_steps``, in ``[0, 1]``.

    Raises
    ------
    ConfigError
        ``total_steps`` or ``warmup_steps`` is not an int ``>= 0`` (a bool is not an int), or
        ``final_fraction`` is not a number in ``[0, 1]``.

    See Also
    --------
    Constant : factor 1 throughout.

    Examples
    --------
    >>> from zoblackbox import WarmupCosine
    >>> s = WarmupCosine(total_steps=10, final_fraction=0.1)
    >>> s(0), round(s(5), 3), s(10)
    (1.0, 0.55, 0.1)
    >>> WarmupCosine(total_steps=10, warmup_steps=2)(0)
    0.5
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0):
        self.total_steps = _int("total_steps", total_steps, 0)
        self.warmup_steps = _int("warmup_steps", warmup_steps, 0)
        if isinstance(final_fraction, bool) or not isinstance(final_fraction, (int, float)) \
                or not 0 <= final_fraction <= 1:
            raise ConfigError(f"final_fraction must be a number in [0, 1], got {final_fraction!r}")
        self.final_fraction = float(final_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    def config(self) -> dict:
        """The schedule as a JSON-able dict (what a checkpoint records)."""
        return {"schedule": "WarmupCosine", "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "final_fraction": self.final_fraction}

    def __repr__(self) -> str:
        return (f"WarmupCosine(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"final_fraction={self.final_fraction})")


class Constant:
    """The peak learning rate throughout: factor 1 at every step.

    Takes no parameters; the drivers' ``lr_schedule="constant"`` is this schedule.

    See Also
    --------
    WarmupCosine : linear warm-up, then cosine decay.

    Examples
    --------
    >>> from zoblackbox import Constant
    >>> Constant()(0), Constant()(10_000)
    (1.0, 1.0)
    >>> Constant().config()
    {'schedule': 'Constant'}
    """

    def __call__(self, step: int) -> float:
        return 1.0

    def config(self) -> dict:
        """The schedule as a JSON-able dict (what a checkpoint records)."""

        return {"schedule": "Constant"}

    def __repr__(self) -> str:
        return "Constant()"


def schedule_from(name: str, total_steps: int, *, warmup_steps: int = 0, final_fraction: float = 0.0):
    """The schedule for the string shorthands ``"cosine"`` and ``"constant"`` of the drivers' options."""
    if name == "cosine":
        return WarmupCosine(total_steps, warmup_steps, final_fraction)
    if name == "constant":
        return Constant()
    raise ConfigError(f"lr schedule must be 'cosine' or 'constant', got {name!r}")
