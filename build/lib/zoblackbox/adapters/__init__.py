"""Concrete targets behind the Oracle interface (installed as ``zoblackbox.adapters``)."""

from .torch_module import BN_POLICIES, ModuleOracle

__all__ = ["ModuleOracle", "BN_POLICIES"]
