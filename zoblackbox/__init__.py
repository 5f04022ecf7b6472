"""zoblackbox: zeroth-order optimization of black-box, non-differentiable pipelines.

Everything is written against one interface, the :class:`Oracle` (an opaque function of a flat
parameter vector that is only ever queried). Estimators (CGE, RGE) turn queries into gradients,
optimizers and the trainer turn gradients into progress. See ``docs/`` for the guide.
"""

from .errors import (
    BudgetExhaustedError,
    CheckpointError,
    ConfigError,
    MissingDependencyError,
    OracleError,
    ZOError,
)
from .engine import AskTell
from .estimators import CoordinateEstimator, Estimate, Estimator, RandomEstimator
from .optim import SignSGD, ZOGradient, minimize
from .oracle import FailurePolicy, FunctionOracle, Oracle, QueryFailure
from .params import ParamLayout
from .plan import QueryPlan
from .result import ZOResult

__version__ = "0.1.0"

__all__ = [
    "AskTell",
    "BudgetExhaustedError",
    "CheckpointError",
    "ConfigError",
    "CoordinateEstimator",
    "Estimate",
    "Estimator",
    "FailurePolicy",
    "FunctionOracle",
    "MissingDependencyError",
    "Oracle",
    "OracleError",
    "ParamLayout",
    "QueryFailure",
    "QueryPlan",
    "RandomEstimator",
    "SignSGD",
    "Trainer",
    "ZOError",
    "ZOGradient",
    "ZOResult",
    "__version__",
    "minimize",
]


def __getattr__(name):  # the trainer pulls in tqdm and the data helpers; import it on first use
    if name == "Trainer":
        from .train import Trainer

        return Trainer
    raise AttributeError(f"module 'zoblackbox' has no attribute {name!r}")
