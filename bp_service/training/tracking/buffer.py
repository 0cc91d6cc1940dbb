"""Metrics held for batched writes: what a run's logger records between two writes to the store.

No MLflow here: the buffer is filled where the Trainer runs, and written where the run's MLflow client is (the
same process, or the run's tracking process, :mod:`.sidecar`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping

Row = tuple[str, float, int, int]  # key, value, timestamp (ms), step: one metric as MLflow stores it


class MetricBuffer:
    """Metrics held in memory and handed to ``write`` in batches, every ``FLUSH_EVERY_S`` seconds and at the end,
    instead of one write per metric: a digits run logs about 670, and each SQLite commit takes tens of
    milliseconds. What is held when a checkpoint is written travels in it
    (:class:`~bp_service.training.tracking.logger.PendingMetrics`), so a run killed before the next write loses
    no metric its resume will not replay.

    Args:
        write: writes a batch of at most ``MAX_BATCH`` rows (one transaction).
        replayed_until: for a continued run, each metric's last step in the store: a replayed step is dropped.

    Attributes:
        pending: the rows not yet written.
        history: each metric's (step, value) pairs as recorded here (the curves).
    """

    FLUSH_EVERY_S = 5.0  # the live dashboard lags by at most this much
    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, write: Callable[[list[Row]], None], replayed_until: Mapping[str, int] | None = None) -> None:
        self._write = write
        self.replayed_until: dict[str, int] = dict(replayed_until or {})
        self.pending: list[Row] = []
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._flushed_at = time.monotonic()

    def record(self, metrics: Mapping[str, float | str], step: int | None) -> None:
        """Hold ``metrics`` at ``step`` (metrics replayed from a checkpoint keep the step they had)."""
        step = step or 0
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, str) or step <= self.replayed_until.get(key, -1):
                continue
            # MLflow's allowed characters, as Lightning's logger does (no newline: checkpoint_rows joins keys with one)
            key = re.sub("[^a-zA-Z0-9_/. -]+", "", key)
            self.pending.append((key, float(value), stamp, step))
            self.history.setdefault(key, []).append((step, float(value)))
        if len(self.pending) >= self.MAX_BATCH or time.monotonic() - self._flushed_at >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Write the held rows now, in batches of at most ``MAX_BATCH``."""
        batch, self.pending = self.pending, []
        self._flushed_at = time.monotonic()
        for start in range(0, len(batch), self.MAX_BATCH):
            self._write(batch[start : start + self.MAX_BATCH])
