"""Training: the loop (loop.py), what it carries (state.py), the run folder's files
(run_folder.py), time budgets (budget.py) and a whole run from a preset and overrides (run.py).
This module only re-exports.
"""

from cfgdiff.train.budget import BUDGET_PROBE, TimeBudget, steps_for_budget
from cfgdiff.train.loop import TrainOptions, TrainResult, train
from cfgdiff.train.run_folder import RunLock, RunOutputs
from cfgdiff.train.state import TrainState, data_identity, lr_at, make_optimizer

__all__ = [
    "BUDGET_PROBE",
    "RunLock",
    "RunOutputs",
    "TimeBudget",
    "TrainOptions",
    "TrainResult",
    "TrainState",
    "data_identity",
    "lr_at",
    "make_optimizer",
    "steps_for_budget",
    "train",
]
