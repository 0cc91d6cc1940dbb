"""What an MLflow run is written through: metrics in batches, params, and any other call, surviving a lost server.

MLflow's half of the Lightning logger (:mod:`.logger`), without Lightning or torch: it runs wherever the run's
MLflow client is, in ``bp-train``'s own process or in its tracking process (:mod:`.sidecar`).
"""

from __future__ import annotations

import errno
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from bp_service.commands import first_line
from bp_service.training.tracking.buffer import MetricBuffer, Row


class RunWriter(MetricBuffer):
    """One MLflow run's writes: created (or continued) here, then every write survives losing the server.

    The first failed call is reported once as a warning and tracking stops for the rest of the run; training and
    checkpointing, which never depend on MLflow, go on (:attr:`lost` says why). Metrics are held and written in
    batches (:class:`~.buffer.MetricBuffer`).

    Args:
        client: the store's client.
        experiment_id: the experiment a new run is created in.
        run_name: a new run's name.
        tags: a new run's tags (MLflow's context tags, such as the user, are added).
        run_id: the run to continue instead of creating one.
    """

    MAX_PARAMS = 100  # MLflow's limit of params per log_batch
    PARAM_CHARS = 250  # a param's value is cut to this, as Lightning's MLflow logger does

    def __init__(
        self, client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str], run_id: str | None
    ) -> None:
        super().__init__(self.write_rows)
        self.client = client
        if run_id is None:
            tags = resolve_tags({**tags, MLFLOW_RUN_NAME: run_name})  # MLflow's context tags too, as Lightning's
            run_id = client.create_run(experiment_id, tags=tags).info.run_id
        else:
            experiment_id = client.get_run(run_id).info.experiment_id
        self.run_id: str = run_id
        self.experiment_id: str = experiment_id
        self.lost: str | None = None

    def skip_replayed_steps(self) -> None:
        """On resume, drop metrics at steps the run already has: a replayed step is logged once."""
        for key in self.client.get_run(self.run_id).data.metrics:
            self.replayed_until[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))

    def call(self, what: str, fn, *args: Any, **kwargs: Any) -> None:
        """Any tracking call, under the survival rule: the first failure stops tracking, with one warning."""
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

    def write_rows(self, rows: list[Row]) -> None:
        """One batch of metric rows (:class:`~.buffer.MetricBuffer`'s), in one transaction."""
        metrics = [Metric(key=k, value=v, timestamp=t, step=s) for k, v, t, s in rows]
        self.call("log_metrics", self.client.log_batch, self.run_id, metrics=metrics)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat params, each value cut to ``PARAM_CHARS``, in batches of ``MAX_PARAMS``."""
        rows = [Param(key=key, value=str(value)[: self.PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(rows), self.MAX_PARAMS):
            batch = rows[start : start + self.MAX_PARAMS]
            self.call("log_hyperparams", self.client.log_batch, self.run_id, params=batch)
