"""Concrete targets behind the Oracle interface (installed as ``zoblackbox.adapters``)."""

from .blackbox import BlackBoxClassifier, DenoisedClassifier
from .torch_module import BN_POLICIES, ModuleOracle

__all__ = ["BN_POLICIES", "BlackBoxClassifier", "DenoisedClassifier", "ModuleOracle"]
