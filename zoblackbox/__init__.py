"""zoblackbox: zeroth-order optimization of black-box, non-differentiable pipelines.

Everything is written against one interface, the :class:`Oracle` (an opaque function of a flat
parameter vector that is only ever queried), and one loop, the ask/tell engine :class:`AskTell`.
Estimators (CGE, RGE) turn queries into gradients, update rules turn gradients into progress;
:func:`minimize` and the :class:`Trainer` drive the engine. See ``docs/`` for the guide and
``docs/architecture.md`` for the layers.
"""

from .directions import Directions, GaussianDirections, RademacherDirections, SeededDirections, SphereDirections
from .engine import AskTell
from .errors import (
    BudgetExhaustedError,
    CheckpointError,
    ConfigError,
    MissingDependencyError,
    OracleError,
    ZOError,
)
from .estimators import CoordinateEstimator, Estimate, Estimator, RandomEstimator
from .optim import SignSGD, ZOGradient, minimize
from .oracle import FailurePolicy, FunctionOracle, Oracle, QueryFailure
from .params import ParamLayout
from .plan import QueryPlan
from .presets import Preset, ars_v2t, openai_es
from .result import ZOResult
from .schedules import Constant, WarmupCosine
from .seed_replay import SeedReplayEstimator, SeedReplaySGD
from .shaping import FitnessShaping, RankShaping, StdShaping

__version__ = "0.1.0"

__all__ = [
    "AskTell",
    "BudgetExhaustedError",
    "CheckpointError",
    "ConfigError",
    "Constant",
    "CoordinateEstimator",
    "Directions",
    "Estimate",
    "Estimator",
    "FailurePolicy",
    "FitnessShaping",
    "FunctionOracle",
    "GaussianDirections",
    "MissingDependencyError",
    "Oracle",
    "OracleError",
    "ParamLayout",
    "Preset",
    "QueryFailure",
    "QueryPlan",
    "RademacherDirections",
    "RandomEstimator",
    "RankShaping",
    "SeedReplayEstimator",
    "SeedReplaySGD",
    "SeededDirections",
    "SignSGD",
    "SphereDirections",
    "StdShaping",
    "Trainer",
    "WarmupCosine",
    "ZOError",
    "ZOGradient",
    "ZOResult",
    "__version__",
    "ars_v2t",
    "minimize",
    "openai_es",
]


def __getattr__(name):  # the trainer pulls in tqdm and the data helpers; import it on first use
    if name == "Trainer":
        from .train import Trainer

        return Trainer
    raise AttributeError(f"module 'zoblackbox' has no attribute {name!r}")
