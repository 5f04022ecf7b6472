"""The old home of :class:`ModuleOracle`; it now lives in :mod:`zoblackbox.torch_module`.

Kept so that ``zoblackbox.adapters.torch_module.ModuleOracle`` and the other names imported from
here keep working; new code imports from ``zoblackbox.torch_module`` (or ``zoblackbox.adapters``).
"""

from __future__ import annotations

# the private names too: code written against the old module may import them
from zoblackbox.torch_module import _BN_TYPES, BN_POLICIES, ModuleOracle, ZOGradient, _to, resolve_params  # noqa: F401

__all__ = ["BN_POLICIES", "ModuleOracle", "ZOGradient", "resolve_params"]
