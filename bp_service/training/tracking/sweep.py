"""Sweeps (Hydra multiruns) in MLflow: one parent run per sweep, each job's run its child, and a summary at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from bp_service.commands import first_line
from bp_service.training.tracking.names import best_name, dataset_name, experiment_name, resolve_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

# torch, MLflow and the store are imported where a sweep needs them: Hydra builds this callback for every run,
# single ones too, before bp-train has checked the config and the data (which it does without them).
log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"
STORE_FILE = "mlflow_store_uri"  # the store the driver chose: a job on another machine (Ray) lacks its environment
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
    import torch
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


def sweep_summary(
    sweep_dir: Path, jobs: list[dict[str, Any]], parent: str | None, experiment: str | None, failed: bool = False
) -> str:
    # What tells the jobs apart: the overrides they do not all share (a lone job, e.g. the one that finished in a
    # failed sweep, shows all of its own).
    shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if len(jobs) > 1 else set()
    for job in jobs:
        job["overrides"] = " ".join(o for o in job["overrides"] if o not in shared) or ("(the same)" if shared else "-")
    outcome = "FAILED; " if failed else "of "
    lines = [f"bp-train: sweep {outcome}{len(jobs)} job(s) finished ({sweep_dir})"]
    if parent:
        lines.append(f"  MLflow parent run {parent}  (experiment {experiment!r})")
    # Each job's best value, under the name its MLflow run records it by (not its last epoch's val/acc).
    named = {job["job"]: best_name(job["monitor"]) if job["monitor"] else "-" for job in jobs}
    width = max([len(name) for name in named.values()] + [6])
    lines.append(f"  {'job':<4} {'metric':<{width}} {'value':>8}  {'MLflow run':<32}  overrides")
    for job in jobs:
        value = f"{job['score']:.4f}" if job["score"] is not None else job["status"].lower()
        run = job["run_id"] or "-"
        lines.append(f"  {job['job']:<4} {named[job['job']]:<{width}} {value:>8}  {run:<32}  {job['overrides']}")
    for monitor, job in best_jobs(jobs).items():
        told_apart = "" if job["overrides"] in ("(the same)", "-") else f"  ({job['overrides']})"
        lines.append(f"  best: job {job['job']}, {best_name(monitor)} {job['score']:.4f}{told_apart}")
    return "\n".join(lines)


class MLflowSweepCallback(Callback):
    """One parent run per Hydra multirun; every job's run is its child (``mlflow.parentRunId``). At the end,
    a summary: each job's monitored metric and the best job, also recorded on the parent run
    (``best/<metric>``, tags ``bp.best_job`` and ``bp.best_run``). Without tracking, the summary alone.

    The experiment and parent are created here, once, before any job starts, so parallel jobs
    never race to create them. A sweep that fails as a whole (its launcher or sweeper raised, a job's
    process was killed) is closed by :func:`end_failed_sweep`: the parent FAILED, the finished jobs summarized.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _OPEN_SWEEPS.append(config)
        if not config.tracking.enabled:
            return
        from mlflow import MlflowClient

        from bp_service.training.store import check_reachable, ensure_experiment, owner_tags, prepare_store

        uri = resolve_uri(config.tracking, config.paths)
        try:
            check_reachable(uri)
            prepare_store(uri, config.paths.root_dir)
            experiment_id = ensure_experiment(uri, sweep_experiment(config), config.paths.root_dir)
            sweep_dir = Path(config.hydra.sweep.dir)
            run = MlflowClient(uri).create_run(
                experiment_id,
                run_name=f"sweep-{sweep_dir.name}",
                # the driver's process: bp-runs stale --close closes the parent of a driver killed with -9
                tags={"bp.sweep_dir": str(sweep_dir), "bp.role": "sweep", **owner_tags(os.getpid())},
            )
        except Exception as exc:  # the jobs will report the same problem with their own config
            log.warning("could not create the sweep's parent run: %s", first_line(exc))
            return
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / STORE_FILE).write_text(uri)
        (sweep_dir / PARENT_RUN_FILE).write_text(run.info.run_id)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # Hydra calls this for single runs too
            return
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank != 0:  # SLURM with several tasks per node: every rank runs the Hydra job
            return
        line = json.dumps(job_outcome(config, job_return)) + "\n"
        with open(Path(config.hydra.sweep.dir) / SWEEP_JOBS_FILE, "a") as f:  # one short write: appends stay whole
            f.write(line)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _OPEN_SWEEPS[:] = [c for c in _OPEN_SWEEPS if c is not config]
        finish_sweep(config, failed=False)


# Sweeps started in this process and not yet ended: Hydra calls no callback when its sweeper or launcher raises.
_OPEN_SWEEPS: list[DictConfig] = []


def end_failed_sweep(reason: str, status: str = "FAILED") -> None:
    """Close the sweeps this process started and Hydra left open (an exception, Ctrl-C, SIGTERM, a killed job's
    process): the parent run ``status`` (FAILED, or KILLED when stopped), its children whose process is proven
    gone KILLED, the finished jobs summarized."""
    while _OPEN_SWEEPS:
        config = _OPEN_SWEEPS.pop()
        with contextlib.suppress(Exception):
            finish_sweep(config, failed=True, reason=reason, status=status)


def finish_sweep(config: DictConfig, failed: bool, reason: str = "", status: str = "FAILED") -> None:
    """The sweep's end: the best job recorded on the parent run, which ends FINISHED (``status`` if ``failed``,
    FAILED if a job already marked it so), and the summary of the jobs that finished."""
    sweep_dir = Path(config.hydra.sweep.dir)
    jobs_file = sweep_dir / SWEEP_JOBS_FILE
    jobs = [json.loads(line) for line in jobs_file.read_text().splitlines()] if jobs_file.is_file() else []
    jobs.sort(key=lambda job: job["job"])
    run_id, experiment = parent_run_id(sweep_dir), None
    if run_id:
        from mlflow import MlflowClient

        from bp_service.training.store import quick_http

        with contextlib.suppress(Exception), quick_http(retries=1):
            client = MlflowClient(sweep_store(sweep_dir) or resolve_uri(config.tracking, config.paths))
            experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
            record_best(client, run_id, best_jobs(jobs))
            if failed:
                client.set_tag(run_id, "bp.failure", reason[:500])
                close_dead_children(client, run_id)
            if client.get_run(run_id).info.status == "RUNNING":  # a failed job already marked it FAILED
                client.set_terminated(run_id, status if failed else "FINISHED")
    if jobs:
        print(sweep_summary(sweep_dir, jobs, run_id, experiment, failed), flush=True)


def close_dead_children(client: MlflowClient, parent: str) -> None:
    """A job whose process was killed (``kill -9``, the OOM killer) cannot close its own run: its run is
    marked KILLED here when its process is proven gone (the rule of ``bp-runs stale --close``)."""
    from bp_service.training.store import close_stale, owner_state

    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"
    )
    for run in children:
        state, why = owner_state(run.data.tags)
        if state == "gone":
            close_stale(client, run, why)


def record_best(client: MlflowClient, run_id: str, best: dict[str, dict[str, Any]]) -> None:
    """The sweep's best value of each monitored metric, and which job reached it, on the parent run."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [Metric(best_name(monitor), job["score"], stamp, 0) for monitor, job in best.items()]
    tags = {}
    for job in best.values():
        tags["bp.best_job"] = f"{job['job']}: {' '.join(job['overrides'])}"
        if job["run_id"]:
            tags["bp.best_run"] = job["run_id"]
    client.log_batch(run_id, metrics=metrics)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def parent_run_id(sweep_dir: str | Path | None) -> str | None:
    return _sweep_record(sweep_dir, PARENT_RUN_FILE)


def sweep_store(sweep_dir: str | Path | None) -> str | None:
    """The store of the sweep's parent run, where each of its jobs records its own run."""
    return _sweep_record(sweep_dir, STORE_FILE)


def _sweep_record(sweep_dir: str | Path | None, name: str) -> str | None:
    if sweep_dir is None:
        return None
    path = Path(sweep_dir) / name
    return path.read_text().strip() if path.is_file() else None


def mark_sweep_failed(tracking: DictConfig, paths: DictConfig, sweep_dir: str | Path) -> None:
    """A failed job fails its sweep: the parent run does not stay RUNNING or end FINISHED."""
    run_id = parent_run_id(sweep_dir)
    if run_id:
        from mlflow import MlflowClient

        from bp_service.training.store import quick_http

        with contextlib.suppress(Exception), quick_http(retries=1):
            MlflowClient(sweep_store(sweep_dir) or resolve_uri(tracking, paths)).set_terminated(run_id, "FAILED")
