"""Time accounting of a run: what counts as training, and a time budget that sizes a run.

Owns: the seconds spent aside from training (previews, evaluations, checkpoints, the strip),
and `TimeBudget`, which turns "train for about S seconds" into a step count: steps BUDGET_PROBE
of a run are timed, and the count (and so the LR schedule) is fixed from their rate; the run
then trains that many steps, like one given the count up front, without looking at the clock
again.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from cfgdiff.config import MAX_STEPS

# Steps [5, 25) of a run are timed to size its schedule (the first steps warm up caches and
# cuDNN autotuning); presets warm the LR up for longer than that, so the LR of every step equals
# that of a run given the final step count up front.
BUDGET_PROBE = (5, 25)


def steps_for_budget(step: int, seconds_left: float, steps_per_s: float) -> int:
    """The step count of a time-budgeted run: the steps done plus those that fit in the time
    left at the measured rate (at least the steps done, at most MAX_STEPS)."""
    more = max(0, math.floor(seconds_left * steps_per_s))
    return int(min(MAX_STEPS, step + more))


class TimeBudget:
    """`seconds`: the budget (None: the run's step count stands); `began`: perf_counter() when
    the run started (its setup and compilation count)."""

    def __init__(self, seconds: float | None, began: float):
        self.seconds = seconds
        self.began = began
        self.aside_s = 0.0  # previews, evaluations, checkpoints, the strip
        self._probe: list[float] = []  # clock minus aside time at the BUDGET_PROBE steps
        self.rate: float | None = None  # steps per second over the probe
        self.fixed: int | None = None  # the step count, once the probe has fixed it

    def total(self, planned: int) -> int:
        """The steps to train: `planned` without a budget; with one, as many as a run may have
        until the probe fixes the count, then that count."""
        if self.seconds is None:
            return planned
        return self.fixed if self.fixed is not None else MAX_STEPS

    @contextlib.contextmanager
    def aside(self):
        """Time spent here is not training: a budget does not count it."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.aside_s += time.perf_counter() - t

    def training_seconds(self, now: float) -> float:
        return now - self.began - self.aside_s

    def observe(self, step: int, device: torch.device) -> int | None:
        """Called after each step; returns the run's step count when the probe has just ended,
        else None (always None without a budget)."""
        if self.seconds is None or step not in BUDGET_PROBE:
            return None
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # two host syncs in a budgeted run, no more
        self._probe.append(time.perf_counter() - self.aside_s)
        if step != BUDGET_PROBE[1]:
            return None
        p0, p1 = self._probe
        self.rate = (BUDGET_PROBE[1] - BUDGET_PROBE[0]) / max(p1 - p0, 1e-9)
        self.fixed = steps_for_budget(step, self.seconds - (p1 - self.began), self.rate)
        return self.fixed
