"""Sweeps (Hydra multiruns) in MLflow: one parent run per sweep, each job's run its child, and a summary at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow import MlflowClient
from mlflow.entities import Metric
from omegaconf import DictConfig

from bp_service.commands import first_line
from bp_service.training.store import check_reachable, ensure_experiment, prepare_store, quick_http
from bp_service.training.tracking.names import dataset_name, experiment_name, resolve_uri

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEEP_JOBS_FILE = "bp_jobs.jsonl"  # one line per finished job, in the sweep's folder: any launcher can append


def sweep_experiment(config: DictConfig) -> str:
    """The experiment of a sweep: ``tracking.experiment``, else the data's; a sweep over the data itself
    compares datasets, so its runs stay together in ``bp-service``."""
    if config.tracking.experiment != "auto":
        return config.tracking.experiment
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    if any(o.is_sweep_override() and o.key_or_group.split(".")[0] in ("data", "experiment") for o in parsed):
        return "bp-service"
    return experiment_name(config.tracking.experiment, dataset_name(config.data))


def job_outcome(config: DictConfig, job_return: Any) -> dict[str, Any]:
    """What a finished job reached: its monitored metric and best value, read from its best checkpoint
    (tracked or not), and its MLflow run."""
    from hydra.core.utils import JobStatus

    from bp_service.training.checkpoints import read_checkpoint

    outcome: dict[str, Any] = {
        "job": config.hydra.job.num,
        "overrides": list(job_return.overrides or []),
        "status": job_return.status.name,
        "monitor": None,
        "mode": None,
        "score": None,
        "run_id": None,
    }
    best = sorted(Path(config.hydra.runtime.output_dir).glob("checkpoints/best-*.ckpt"), key=os.path.getmtime)
    if job_return.status != JobStatus.COMPLETED or not best:
        return outcome
    with contextlib.suppress(Exception):  # a summary line without the metric rather than a failed sweep
        outcome["run_id"] = read_checkpoint(best[-1])["meta"].get("mlflow_run_id")
        states = torch.load(best[-1], map_location="cpu", weights_only=True).get("callbacks", {})
        key, state = next((k, v) for k, v in states.items() if k.startswith("ModelCheckpoint"))
        outcome["monitor"] = state["monitor"]
        outcome["mode"] = "max" if "'mode': 'max'" in key else "min"
        score = state.get("best_model_score")
        outcome["score"] = float(score) if score is not None else None
    return outcome


def best_jobs(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The best job per monitored metric (a sweep over datasets may follow val/acc and val/loss)."""
    best: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if job["score"] is None:
            continue
        current = best.get(job["monitor"])
        better = current is None or (
            job["score"] > current["score"] if job["mode"] == "max" else job["score"] < current["score"]
        )
        if better:
            best[job["monitor"]] = job
    return best


def sweep_summary(sweep_dir: Path, jobs: list[dict[str, Any]], parent: str | None, experiment: str | None) -> str:
    shared = set.intersection(*(set(job["overrides"]) for job in jobs))
    for job in jobs:  # what tells the jobs apart: the overrides they do not all share
        job["overrides"] = " ".join(o for o in job["overrides"] if o not in shared) or "(the same)"
    lines = [f"bp-train: sweep of {len(jobs)} job(s) finished ({sweep_dir})"]
    if parent:
        lines.append(f"  MLflow parent run {parent}  (experiment {experiment!r})")
    width = max([len(j["monitor"] or "") for j in jobs] + [6])
    lines.append(f"  {'job':<4} {'metric':<{width}} {'value':>8}  {'MLflow run':<32}  overrides")
    for job in jobs:
        value = f"{job['score']:.4f}" if job["score"] is not None else job["status"].lower()
        run = job["run_id"] or "-"
        lines.append(f"  {job['job']:<4} {job['monitor'] or '-':<{width}} {value:>8}  {run:<32}  {job['overrides']}")
    for monitor, job in best_jobs(jobs).items():
        lines.append(f"  best: job {job['job']}, {monitor} {job['score']:.4f}  ({job['overrides']})")
    return "\n".join(lines)


class MLflowSweepCallback(Callback):
    """One parent run per Hydra multirun; every job's run is its child (``mlflow.parentRunId``). At the end,
    a summary: each job's monitored metric and the best job, also recorded on the parent run
    (``best/<metric>``, tags ``bp.best_job`` and ``bp.best_run``). Without tracking, the summary alone.

    The experiment and parent are created here, once, before any job starts, so parallel jobs
    never race to create them.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        uri = resolve_uri(config.tracking, config.paths)
        try:
            check_reachable(uri)
            prepare_store(uri, config.paths.root_dir)
            experiment_id = ensure_experiment(uri, sweep_experiment(config), config.paths.root_dir)
            sweep_dir = Path(config.hydra.sweep.dir)
            run = MlflowClient(uri).create_run(
                experiment_id,
                run_name=f"sweep-{sweep_dir.name}",
                tags={"bp.sweep_dir": str(sweep_dir), "bp.role": "sweep"},
            )
        except Exception as exc:  # the jobs will report the same problem with their own config
            log.warning("could not create the sweep's parent run: %s", first_line(exc))
            return
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(run.info.run_id)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # Hydra calls this for single runs too
            return
        line = json.dumps(job_outcome(config, job_return)) + "\n"
        with open(Path(config.hydra.sweep.dir) / SWEEP_JOBS_FILE, "a") as f:  # one short write: appends stay whole
            f.write(line)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs_file = sweep_dir / SWEEP_JOBS_FILE
        jobs = [json.loads(line) for line in jobs_file.read_text().splitlines()] if jobs_file.is_file() else []
        jobs.sort(key=lambda job: job["job"])
        run_id, experiment = parent_run_id(sweep_dir), None
        if run_id:
            with contextlib.suppress(Exception), quick_http(retries=1):
                client = MlflowClient(resolve_uri(config.tracking, config.paths))
                experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
                record_best(client, run_id, best_jobs(jobs))
                if client.get_run(run_id).info.status == "RUNNING":  # a failed job already marked it FAILED
                    client.set_terminated(run_id, "FINISHED")
        if jobs:
            print(sweep_summary(sweep_dir, jobs, run_id, experiment), flush=True)


def record_best(client: MlflowClient, run_id: str, best: dict[str, dict[str, Any]]) -> None:
    """The sweep's best value of each monitored metric, and which job reached it, on the parent run."""
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"best/{monitor}", job["score"], stamp, 0) for monitor, job in best.items()]
    tags = {}
    for job in best.values():
        tags["bp.best_job"] = f"{job['job']}: {' '.join(job['overrides'])}"
        if job["run_id"]:
            tags["bp.best_run"] = job["run_id"]
    client.log_batch(run_id, metrics=metrics)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def parent_run_id(sweep_dir: str | Path | None) -> str | None:
    if sweep_dir is None:
        return None
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


def mark_sweep_failed(tracking: DictConfig, paths: DictConfig, sweep_dir: str | Path) -> None:
    """A failed job fails its sweep: the parent run does not stay RUNNING or end FINISHED."""
    run_id = parent_run_id(sweep_dir)
    if run_id:
        with contextlib.suppress(Exception), quick_http(retries=1):
            MlflowClient(resolve_uri(tracking, paths)).set_terminated(run_id, "FAILED")
