"""Which tracker a job gets: the one place that names a tracking backend."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from bp_service.training.tracking.interface import Job, NoTracker, StoreUnavailable, Tracker

if TYPE_CHECKING:
    from bp_service.training.tracking.run import MLflowTracker


def open_tracker(tracking: DictConfig, paths: DictConfig, job: Job) -> Tracker:
    """The job's record: an MLflow run when ``tracking.enabled`` (under DDP, in the first process only), else
    :class:`NoTracker`. The run is written by the job's tracking process when ``bp-train`` started one
    (:mod:`.sidecar`), else from this process. A store that cannot be created (a full disk) is
    :class:`NoTracker` too, with a warning: as for a store lost mid-run, the training is worth more."""
    from lightning.pytorch.utilities import rank_zero_only

    import bp_service.training.tracking.sidecar as sidecar

    process = sidecar.take()
    if not (tracking.enabled and rank_zero_only.rank == 0):
        if process is not None:
            process.close(stop=True)
        return NoTracker()
    try:
        if process is not None:
            try:
                return sidecar.RemoteTracker(process, tracking, paths, job)
            except sidecar.TrackingProcessGone:  # it died before it answered: this process opens the run
                tracker = mlflow_tracker(tracking, paths, job)
                tracker.close_abandoned()  # the run it may have created first
                return tracker
        return mlflow_tracker(tracking, paths, job)
    except StoreUnavailable as exc:
        print(f"bp-train: warning: MLflow tracking is off for this run: {exc}; "
              "training goes on without it", file=sys.stderr)  # fmt: skip
        return NoTracker()


def mlflow_tracker(tracking: DictConfig, paths: DictConfig, job: Job) -> MLflowTracker:
    from bp_service.training.tracking.run import MLflowTracker

    return MLflowTracker(tracking, paths, job)


def start_tracking_process(cfg: DictConfig) -> None:
    """Fork the job's MLflow tracking process (:mod:`.sidecar`) before torch loads, if it will record."""
    import bp_service.training.tracking.sidecar as sidecar

    sidecar.start(cfg, mlflow_tracker, head_start)


def discard_tracking_process() -> None:
    """Stop a tracking process the job did not take (it stopped before its run opened)."""
    sidecar = sys.modules.get("bp_service.training.tracking.sidecar")
    if sidecar is not None:
        sidecar.discard()


def head_start(cfg: DictConfig) -> list[Callable[[], None]]:
    """Load MLflow and its SQL store now; return what else the tracking process (:mod:`.sidecar`) prepares before
    the run opens, step by step: the store's client (:func:`~.run.opening_steps`), then what logging the model
    needs (:func:`~.run.model_logging_steps`)."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - loaded by the first call to the store

    import bp_service.training.tracking.run as run
    from bp_service.training.tracking.names import resolve_uri

    uri = resolve_uri(cfg.tracking, cfg.paths)
    return run.opening_steps(uri) + (run.model_logging_steps(uri) if cfg.tracking.log_model else [])
