"""Concrete targets behind the Oracle interface (installed as ``zoblackbox.adapters``).

The certified-defense pipeline (:mod:`zoblackbox.adapters.blackbox`, which pulls in
``scipy.stats`` through :mod:`zoblackbox.smoothing`) is imported on first use of its names, so
``import zoblackbox.adapters`` stays light. :class:`ModuleOracle` lives in
:mod:`zoblackbox.torch_module` and is re-exported here for the old import path.
"""

from zoblackbox.torch_module import BN_POLICIES, ModuleOracle

__all__ = ["BN_POLICIES", "BlackBoxClassifier", "DenoisedClassifier", "ModuleOracle"]

# name -> submodule that defines it, imported on first access
_LAZY = {"BlackBoxClassifier": "blackbox", "DenoisedClassifier": "blackbox"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
