"""The Lightning side of a tracked run: the Trainer's logger, and the callbacks that carry the metrics not yet
written in every checkpoint and give every metric the optimizer step.

The logger hands everything to a :class:`~bp_service.training.tracking.writer.RunWriter`, in this process or in
the run's tracking process (:mod:`.sidecar`): both answer the same calls.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from bp_service.bundle import stored_table
from bp_service.training.tracking.buffer import Row


class RunLogger(Logger):
    """The Trainer's logger of a tracked run: metrics at the optimizer step, params flattened, both to ``writer``.

    Lightning's own MLFlowLogger writes one ``log_batch`` per call and stops the training when the server is lost;
    the writer holds metrics for batched writes and survives a lost server. The run's final status is set by
    ``bp-train`` itself, so :meth:`finalize` only flushes.

    Args:
        writer: the run's writer (:class:`~bp_service.training.tracking.writer.RunWriter` or its stand-in in
            :mod:`.sidecar`), with ``run_id``, ``experiment_id``, ``record``, ``flush``, ``log_params`` and
            ``pending`` (the rows not yet written).
    """

    def __init__(self, writer: Any) -> None:
        super().__init__()
        self.writer = writer
        self.optimizer_steps: Callable[[], int] | None = None  # the Trainer's global_step (:class:`OptimizerSteps`)

    @property
    def name(self) -> str:
        return self.writer.experiment_id

    @property
    def version(self) -> str:
        return self.writer.run_id

    @property
    def run_id(self) -> str:
        return self.writer.run_id

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Every metric at the run's optimizer step. Lightning gives validation, test and the learning-rate monitor
        its count of Lightning steps, which is another number when a Lightning step runs several optimizer steps
        (``data.steps_per_execution``): the curves would not line up with ``train/loss``."""
        step = self.optimizer_steps() if self.optimizer_steps is not None else step
        self.writer.record({k: v if isinstance(v, str) else float(v) for k, v in metrics.items()}, step)

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """The run's params as given (bp-train gives them flat, :func:`~.params.flat_params`)."""
        params = vars(params) if isinstance(params, Namespace) else dict(params or {})
        if params:
            self.writer.log_params(params)

    def finalize(self, status: str = "success") -> None:
        self.writer.flush()


class PendingMetrics(pl.Callback):
    """The logger's metrics not yet written, saved with every checkpoint and logged again on resume.

    Without it a run killed between a checkpoint and the next flush would resume past metrics that
    were never written, and the replay does not log them again.
    """

    def __init__(self, logger: RunLogger) -> None:
        self.logger = logger
        self._armed = True  # only the restore before training: test() restoring the best checkpoint is not a resume

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.logger.run_id, "metrics": checkpoint_rows(self.logger.writer.pending)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._armed or state_dict.get("run_id") != self.logger.run_id:
            return
        self._armed = False
        for key, value, _, step in rows_of(state_dict.get("metrics", [])):
            self.logger.writer.record({key: value}, step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._armed = False


def checkpoint_rows(rows: list[Row]) -> dict[str, Any]:
    """Metric rows as a checkpoint keeps them (read back by :func:`rows_of`): the keys as one string, and value,
    timestamp and step as one float64 tensor (exact for both integers: a step, and milliseconds since 1970, stay
    far under 2^53). Not a list per row: torch.save's pickler runs a Python hook for every object it writes, and
    until the first write every checkpoint of a short run carries all of its metrics (a digits run: 666 rows, 0.9
    ms of each of its last checkpoints, against 0.3 ms this way)."""
    return {
        "keys": "\n".join(row[0] for row in rows),  # MLflow's characters only (MetricBuffer.record): no newline
        "numbers": torch.tensor([row[1:] for row in rows], dtype=torch.float64).reshape(-1, 3),
    }


def rows_of(saved: Any) -> list[Row]:
    """The rows of :func:`checkpoint_rows`, or of the list of ``[key, value, timestamp, step]`` that checkpoints
    held before it. Checked first, as everything read from a checkpoint: the numbers as a tensor stored whole (a
    few bytes of a crafted file could otherwise declare rows by the billion), one key per row."""
    refused = ValueError(
        "checkpoint: callbacks.PendingMetrics.metrics is not the metric rows bp-train writes (keys, one per row, "
        "and a (rows, 3) float64 tensor stored whole): refused"
    )
    if not isinstance(saved, Mapping):
        try:
            return [(str(key), float(value), int(stamp), int(step)) for key, value, stamp, step in saved]
        except (TypeError, ValueError, OverflowError):
            raise refused from None
    keys, numbers = saved.get("keys"), stored_table(saved.get("numbers"), 3)
    # "".split("\n") is [""]: no rows, or one whose key lost every character
    if not isinstance(keys, str) or numbers is None or (keys.count("\n") + 1 if numbers else 0) != len(numbers):
        raise refused
    keys = keys.split("\n") if numbers else []
    return [(key, value, int(stamp), int(step)) for key, (value, stamp, step) in zip(keys, numbers)]


class OptimizerSteps(pl.Callback):
    """Gives the logger the Trainer's optimizer step (``global_step``) to record every metric at."""

    def __init__(self, logger: RunLogger) -> None:
        self.logger = logger

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.logger.optimizer_steps = lambda: trainer.global_step


def run_logger(writer: Any) -> tuple[RunLogger, list[pl.Callback]]:
    """The Trainer's logger over ``writer``, and the callbacks it needs."""
    logger = RunLogger(writer)
    return logger, [PendingMetrics(logger), OptimizerSteps(logger)]
