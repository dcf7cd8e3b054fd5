"""influence-dashboard's engine: influence functions for image classifiers, in PyTorch.

    import engine
    run = engine.build(data="digits", model="logreg", out="runs/x", weight_decay=0.01)
    run = engine.open_run("runs/x")
    run.scores(test_index=None, ihvp=None)   # (n_train, n_test_selected) I_up,loss
    run.self_influence()                     # (n_train,)
    run.explain(test_index, top=10)          # helpful / harmful training points

Pure PyTorch + NumPy: nothing here imports a web framework.
"""

from .build import build
from .config import BuildConfig, CGConfig, IHVPMethod, LissaConfig, ModelKind, TrainConfig
from .errors import (
                     DataError,
                     IndexOutOfRange,
                     InfluenceError,
                     ModelError,
                     QueryError,
                     RunError,
                     SolverError,
                     StaleRunError,
)
from .run import Run, open_run

__all__ = [
                     "BuildConfig",
                     "CGConfig",
                     "DataError",
                     "IHVPMethod",
                     "IndexOutOfRange",
                     "InfluenceError",
                     "LissaConfig",
                     "ModelError",
                     "ModelKind",
                     "QueryError",
                     "Run",
                     "RunError",
                     "SolverError",
                     "StaleRunError",
                     "TrainConfig",
                     "build",
                     "open_run",
]
