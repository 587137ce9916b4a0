"""The batch engine's counters since it started, and its current load (read by the server's /metrics)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineMetrics:
    """Counters since the engine started, and the current load."""

    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    row_passes: int = 0  # sum over steps of the batch size: target passes as each request sees them
    batch_passes: int = 0  # batched target forward passes
    busy_seconds: float = 0.0
    running: int = 0
    waiting: int = 0

    @property
    def mean_accepted(self) -> float:
        return self.tokens_generated / self.row_passes if self.row_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / self.busy_seconds if self.busy_seconds else 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.row_passes / self.batch_passes if self.batch_passes else 0.0
