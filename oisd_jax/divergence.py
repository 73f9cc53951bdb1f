"""Divergence on the host: consecutive skipped updates stop the run with a clear message.

The compiled step (rl/step.py) skips an update whose gradient norm, loss or new params
are not finite and counts it in `TrainState.skipped`. Skipping forever would train
nothing and still exit 0 (a NaN weight, an lr of 1e30), so the loop reads the two
counters once per RL step (no extra device round trip per micro-batch) and stops after
`limit` skipped updates in a row. The run is counted at RL-step granularity: a step in
which any update was applied resets the count.
"""
from __future__ import annotations

from oisd_jax.cli import UserError


class DivergenceError(UserError):
    """Too many consecutive updates were skipped for non-finite values."""


class SkipGuard:
    """Track `TrainState.step` / `.skipped` across RL steps; `observe` raises DivergenceError."""

    def __init__(self, limit: int, step: int = 0, skipped: int = 0):
        self.limit = int(limit)
        self.start_step, self.start_skipped = int(step), int(skipped)
        self.step, self.skipped, self.run = int(step), int(skipped), 0

    def observe(self, step: int, skipped: int, rl_step: int) -> None:
        d_step, d_skip = int(step) - self.step, int(skipped) - self.skipped
        self.step, self.skipped = int(step), int(skipped)
        self.run = self.run + d_skip if d_step and d_skip == d_step else 0
        if self.limit and self.run >= self.limit:
            raise DivergenceError(
                f"stopped at RL step {rl_step}: the last {self.run} optimizer updates were all skipped "
                f"(non-finite gradient norm, loss or params; {self.skipped} of {self.step} skipped in all). "
                "Lower optim.lr, check the model's weights, or raise train.max_skipped_updates")

    def summary(self) -> str:
        n, k = self.step - self.start_step, self.skipped - self.start_skipped
        return f"{k} of {n} optimizer updates skipped for non-finite values this run"
