"""Small named parts passed into estimators (RGE's directions, fitness shaping): resolving a
string shorthand or an instance, one rule for every kind of part."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import ConfigError

__all__ = ["is_builtin_part", "resolve_part"]


def resolve_part(spec, base: type, builtins: Mapping[str, type], what: str, *, allow_none: bool = False):
    """``spec`` as an instance of ``base``: an instance passes through, a built-in's name is
    instantiated, ``None`` passes when ``allow_none``; anything else is a ConfigError naming it."""
    if (spec is None and allow_none) or isinstance(spec, base):
        return spec
    if isinstance(spec, str) and spec in builtins:
        return builtins[spec]()
    if isinstance(spec, type) and issubclass(spec, base):
        raise ConfigError(f"{what} must be an instance, got the class {spec!r}: pass {spec.__name__}()")
    allowed = ("None, " if allow_none else "") + f"one of {tuple(builtins)}"
    raise ConfigError(f"{what} must be {allowed} or a zoblackbox {base.__name__} instance, got {spec!r}")


def is_builtin_part(obj, builtins: Mapping[str, type]) -> bool:
    """Whether ``obj`` is exactly one of the built-ins (a subclass of one may behave differently)."""
    name = getattr(obj, "name", None)
    return isinstance(name, str) and type(obj) is builtins.get(name)
