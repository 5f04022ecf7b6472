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
from .estimators import CoordinateEstimator, Estimate, Estimator, RandomEstimator
from .oracle import FailurePolicy, FunctionOracle, Oracle, QueryFailure
from .optim import SignSGD, ZOGradient, minimize
from .params import ParamLayout
from .plan import QueryPlan

__version__ = "0.1.0"

__all__ = [
    "Oracle",
    "FunctionOracle",
    "FailurePolicy",
    "QueryFailure",
    "QueryPlan",
    "ParamLayout",
    "Estimator",
    "Estimate",
    "CoordinateEstimator",
    "RandomEstimator",
    "minimize",
    "SignSGD",
    "ZOGradient",
    "Trainer",
    "ZOError",
    "ConfigError",
    "OracleError",
    "BudgetExhaustedError",
    "CheckpointError",
    "MissingDependencyError",
    "__version__",
]


def __getattr__(name):  # the trainer pulls in tqdm and the data helpers; import it on first use
    if name == "Trainer":
        from .train import Trainer

        return Trainer
    raise AttributeError(f"module 'zoblackbox' has no attribute {name!r}")
