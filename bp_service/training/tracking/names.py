"""The names a job's record goes by: its store, its experiment and its run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from bp_service.home import tracking_uri


def best_name(monitor: str) -> str:
    """The name of the best value a run's monitored metric reached (its best checkpoint's): ``best/val/acc``.
    Apart from ``val/acc`` itself, which MLflow shows at its last epoch; a sweep's parent uses it too."""
    return f"best/{monitor}"


def resolve_uri(tracking: DictConfig, paths: DictConfig) -> str:
    """This job's store: ``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else ``<paths.root_dir>/mlflow.db``."""
    return tracking_uri(tracking.uri, paths.root_dir)


def dataset_name(data: DictConfig) -> str:
    """The data's name; for CSV data the file's stem (``data.path=/data/cars.csv``: ``cars``)."""
    if data.get("path"):
        return Path(data.path).stem
    return data.name


def experiment_name(experiment: str, dataset: str) -> str:
    """``tracking.experiment``; ``auto``: the data's (:func:`dataset_name`).

    One experiment per dataset: the dashboard's charts share their axes within an experiment, so one
    diverged run of another dataset would flatten every curve of this one.
    """
    return dataset if experiment == "auto" else experiment


def run_name(chosen: str | None, task_name: str, overrides: list[str], output_dir: str) -> str:
    """``tracking.run_name`` (``chosen``), else what the run is and when: the task, its overrides with path values
    shortened to their last part (``data.path=cars.csv``), and the run folder's time stamp (``<sweep stamp>/<job>``
    in a sweep), so that two runs of the same command still differ."""
    if chosen:
        return chosen
    shown = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and "/" in value.rstrip("/"):
            value = value.rstrip("/").rsplit("/", 1)[1]
        shown.append(f"{key}{sep}{value}")
    folder = Path(output_dir)
    stamp = f"{folder.parent.name}/{folder.name}" if folder.name.isdigit() else folder.name
    return f"{' '.join([task_name, *shown])[:200]} @ {stamp}"
