"""Experiment tracking: the :class:`Tracker` interface a run records through, and its backends.

- :mod:`.interface`: :class:`Tracker`, :class:`NoTracker` (tracking off), :class:`Job`;
- :mod:`.backends`: :func:`open_tracker`, the one place that names a backend;
- :mod:`.params` and :mod:`.names`: what of the config a run records, and the names it goes by;
- MLflow's backend: :mod:`.run` (the run), :mod:`.logger` (Lightning's side), :mod:`.sweep` (multiruns).

Only the interface is imported here: MLflow loads when a tracked run opens. The interface and the backends
(Lightning) load when first named: Hydra builds the sweep callback (:mod:`.sweep`) for every run, before
bp-train has checked the config and the data, which it does without torch, Lightning or MLflow.
"""

from __future__ import annotations

from typing import Any

from bp_service.training.tracking.names import best_name, dataset_name
from bp_service.training.tracking.params import flat_params, recordable_config

__all__ = [
    "Job",
    "NoTracker",
    "Tracker",
    "best_name",
    "dataset_name",
    "flat_params",
    "open_tracker",
    "recordable_config",
]


def __getattr__(name: str) -> Any:
    if name == "open_tracker":
        from bp_service.training.tracking.backends import open_tracker

        return open_tracker
    if name in ("Job", "NoTracker", "Tracker"):
        from bp_service.training.tracking import interface

        return getattr(interface, name)
    # The sweep callback's older address, bp_service.training.tracking.MLflowSweepCallback, still imports.
    if name == "MLflowSweepCallback":
        from bp_service.training.tracking.sweep import MLflowSweepCallback

        return MLflowSweepCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
