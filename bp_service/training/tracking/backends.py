"""Which tracker a job gets: the one place that names a tracking backend."""

from __future__ import annotations

import sys

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from bp_service.training.tracking.interface import Job, NoTracker, Tracker


def open_tracker(tracking: DictConfig, paths: DictConfig, job: Job) -> Tracker:
    """The job's record: an MLflow run when ``tracking.enabled`` (under DDP, in the first process only), else
    :class:`NoTracker`. A store that cannot be created (a full disk) is :class:`NoTracker` too, with a warning:
    as for a store lost mid-run, the training is worth more."""
    if not (tracking.enabled and rank_zero_only.rank == 0):
        return NoTracker()
    # Imported here: an untracked run never loads MLflow's store.
    from bp_service.training.store import StoreUnavailable
    from bp_service.training.tracking.run import MLflowTracker

    try:
        return MLflowTracker(tracking, paths, job)
    except StoreUnavailable as exc:
        print(f"bp-train: warning: MLflow tracking is off for this run: {exc}; "
              "training goes on without it", file=sys.stderr)  # fmt: skip
        return NoTracker()
