"""The Lightning side of an MLflow run: a logger that survives a lost server and writes metrics in batches, and
the callback that carries the metrics not yet written in every checkpoint."""

from __future__ import annotations

import errno
import re
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Metric

from bp_service.commands import first_line


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger that survives losing the server mid-run, and writes metrics in batches.

    The first failed call is reported once as a warning and tracking stops for the rest of the
    run; training and checkpointing, which never depend on MLflow, go on. The run's final status
    is set by ``bp-train`` itself, so ``finalize`` only flushes.

    Metrics are held in memory and written as one ``log_batch`` (one transaction) every
    ``FLUSH_EVERY_S`` seconds and at the end, instead of one round trip per ``log_metrics`` call: a
    digits run makes about 480 such calls, each a SQLite commit of tens of milliseconds. What is held when
    a checkpoint is written travels in it (:class:`PendingMetrics`), so a run killed before the next write
    loses no metric its resume will not replay. ``history`` keeps what this process logged (the curves).
    """

    FLUSH_EVERY_S = 5.0  # the live dashboard lags by at most this much
    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: str | None = None
        self._replayed_until: dict[str, int] = {}
        self.pending: list[Metric] = []
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._flushed_at = time.monotonic()
        self.optimizer_steps: Callable[[], int] | None = None  # the Trainer's global_step (:class:`OptimizerSteps`)

    def skip_replayed_steps(self) -> None:
        """On resume, drop metrics at steps the run already has: a replayed step is logged once."""
        client, run_id = self.experiment, self.run_id
        for key in client.get_run(run_id).data.metrics:
            self._replayed_until[key] = max(m.step for m in client.get_metric_history(run_id, key))

    def _guard(self, what: str, fn, *args: Any, **kwargs: Any) -> None:
        if self.lost:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                where = Path(exc.filename).parent if exc.filename else "the artifact store"
                reason = f"no space left on {where}"
            else:
                reason = first_line(exc)[:200]
            self.lost = f"{what} failed: {reason}"
            warnings.warn(f"MLflow tracking lost, training goes on without it ({self.lost})", stacklevel=2)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Every metric at the run's optimizer step. Lightning gives validation, test and the learning-rate monitor
        its count of Lightning steps, which is another number when a Lightning step runs several optimizer steps
        (``data.steps_per_execution``): the curves would not line up with ``train/loss``."""
        self.record(metrics, self.optimizer_steps() if self.optimizer_steps is not None else step)

    def record(self, metrics: Mapping[str, float], step: int | None) -> None:
        """Hold ``metrics`` at ``step`` as given (metrics replayed from a checkpoint keep the step they had)."""
        step = step or 0
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, str) or step <= self._replayed_until.get(key, -1):
                continue
            key = re.sub("[^a-zA-Z0-9_/. -]+", "", key)  # MLflow's allowed characters, as Lightning's logger does
            self.pending.append(Metric(key=key, value=float(value), timestamp=stamp, step=step))
            self.history.setdefault(key, []).append((step, float(value)))
        if len(self.pending) >= self.MAX_BATCH or time.monotonic() - self._flushed_at >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Write the held metrics now, in batches of at most ``MAX_BATCH`` (one transaction each)."""
        batch, self.pending = self.pending, []
        self._flushed_at = time.monotonic()
        for start in range(0, len(batch), self.MAX_BATCH):
            self._guard(
                "log_metrics", self.experiment.log_batch, self.run_id, metrics=batch[start : start + self.MAX_BATCH]
            )

    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", super().log_hyperparams, params)

    def finalize(self, status: str = "success") -> None:
        self.flush()

    def call(self, what: str, fn, *args: Any, **kwargs: Any) -> None:
        """Any other tracking call (artifacts, models), with the same survival rule."""
        self._guard(what, fn, *args, **kwargs)


class PendingMetrics(pl.Callback):
    """The logger's metrics not yet written, saved with every checkpoint and logged again on resume.

    Without it a run killed between a checkpoint and the next flush would resume past metrics that
    were never written, and the replay does not log them again.
    """

    def __init__(self, logger: ResilientMLFlowLogger) -> None:
        self.logger = logger
        self._armed = True  # only the restore before training: test() restoring the best checkpoint is not a resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.logger.run_id,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self.logger.pending],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._armed or state_dict.get("run_id") != self.logger.run_id:
            return
        self._armed = False
        for key, value, _, step in state_dict.get("metrics", []):
            self.logger.record({key: value}, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._armed = False


class OptimizerSteps(pl.Callback):
    """Gives the logger the Trainer's optimizer step (``global_step``) to record every metric at."""

    def __init__(self, logger: ResilientMLFlowLogger) -> None:
        self.logger = logger

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.logger.optimizer_steps = lambda: trainer.global_step
