"""The MLflow run of a bp-train job: what it records, how a lost server is survived, and sweeps' parent runs.

The store is :func:`bp_service.home.tracking_uri`'s; creating and checking it is :mod:`.store`'s job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import mlflow
import torch
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Metric
from omegaconf import DictConfig, OmegaConf

import bp_service
from bp_service.commands import first_line
from bp_service.home import default_uri, tracking_uri
from bp_service.training.store import (
    TrackingError,
    artifact_location,
    boot_id,
    check_reachable,
    ensure_experiment,
    pid_namespace,
    prepare_store,
    process_start,
    quick_http,
)

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"


def resolve_uri(cfg: DictConfig) -> str:
    """This job's store: ``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else ``<paths.root_dir>/mlflow.db``."""
    return tracking_uri(cfg.tracking.uri, cfg.paths.root_dir)


# --------------------------------------------------------------------------- what a run records
ENV_REDACTED = "<from the environment: not recorded>"


def recordable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config with every value taken from ``${oc.env:...}`` replaced by a marker.

    Environment values may be secrets (tokens, passwords in URIs): they never reach MLflow, neither as
    params nor inside the logged ``config.yaml``.
    """

    def walk(raw_node: Any, node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(raw_node.get(k) if isinstance(raw_node, Mapping) else None, v) for k, v in node.items()}
        if isinstance(raw_node, str) and "${oc.env:" in raw_node:
            return ENV_REDACTED
        return node

    return walk(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(cfg, resolve=True))


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config flattened to ``a.b.c`` keys, without environment values (see recordable_config)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif node != ENV_REDACTED:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, list | dict) else str(node)

    walk(recordable_config(cfg), "")
    # Where a run writes is not a hyperparameter: as params these would differ between every pair of
    # runs and crowd the dashboard's comparisons. They are tags instead (see run_tags).
    # The same goes for the callbacks' folders, and for Hydra's _partial_ markers, which say nothing.
    return {k: v for k, v in out.items() if not k.startswith("paths.") and not k.endswith(("._partial_", ".dirpath"))}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def owner_tags() -> dict[str, str]:
    """Which process holds a run RUNNING: host, the kernel's boot, the PID namespace its pid is counted in, the
    pid and its start time (a reused pid is another process). Containers on one host share its name and boot."""
    found = {
        "bp.pid_start": process_start(os.getpid()),
        "bp.pid_ns": pid_namespace(),
        "bp.boot_id": boot_id(),
    }
    return {"bp.host": socket.gethostname(), "bp.pid": str(os.getpid()), **{k: v for k, v in found.items() if v}}


def run_tags(overrides: list[str], device: str, output_dir: str) -> dict[str, str]:
    tags = {
        **owner_tags(),
        "hydra.overrides": " ".join(overrides),
        "bp.output_dir": output_dir,
        "device": device,
        "host.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.lightning": lightning.__version__,
        "version.bp_service": bp_service.__version__,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def experiment_name(cfg: DictConfig) -> str:
    """``tracking.experiment``; ``auto``: the data's name, for CSV data the file's stem.

    One experiment per dataset: the dashboard's charts share their axes within an experiment, so one
    diverged run of another dataset would flatten every curve of this one.
    """
    name = cfg.tracking.experiment
    if name != "auto":
        return name
    if cfg.data.get("path"):
        return Path(cfg.data.path).stem
    return cfg.data.name


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    """``tracking.run_name``, else what the run is and when: the task, its overrides with path values shortened
    to their last part (``data.path=cars.csv``), and the run folder's time stamp (``<sweep stamp>/<job>`` in a
    sweep), so that two runs of the same command still differ."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    shown = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and "/" in value.rstrip("/"):
            value = value.rstrip("/").rsplit("/", 1)[1]
        shown.append(f"{key}{sep}{value}")
    folder = Path(cfg.paths.output_dir)
    stamp = f"{folder.parent.name}/{folder.name}" if folder.name.isdigit() else folder.name
    return f"{' '.join([cfg.task_name, *shown])[:200]} @ {stamp}"


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
            self.logger.log_metrics({key: value}, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._armed = False


# --------------------------------------------------------------------------- sweeps
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
    return experiment_name(config)


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
        uri = resolve_uri(config)
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
                client = MlflowClient(resolve_uri(config))
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


# --------------------------------------------------------------------------- one run
class Tracker:
    """The MLflow run of one ``bp-train`` job: created (or continued) at start, closed with a status.

    Args:
        cfg: the job's resolved config.
        overrides: Hydra's override strings, recorded as a tag.
        device: what trains, recorded as a tag.
        resume_run_id: continue this run (read from the checkpoint being resumed) instead of starting one.
        parent_run_id: the sweep's parent run, for jobs of a multirun.
        origin: tags of a new run started from another run's checkpoint (where it came from).
    """

    def __init__(
        self,
        cfg: DictConfig,
        overrides: list[str],
        device: str,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        origin: dict[str, str] | None = None,
    ) -> None:
        self.uri = resolve_uri(cfg)
        # A server lost mid-run must cost seconds, not MLflow's default minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        resume_run_id = self._open_store(cfg, resume_run_id)
        # A sweep's jobs go where its parent run is; a run on its own to its data's experiment. Resolved in
        # the config, so that the params and the summary name the experiment the run is in.
        cfg.tracking.experiment = self._parent_experiment(parent_run_id) or experiment_name(cfg)
        self.experiment = cfg.tracking.experiment
        ensure_experiment(self.uri, self.experiment, cfg.paths.root_dir)
        tags = {**run_tags(overrides, device, cfg.paths.output_dir), **(origin or {})}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.logger = ResilientMLFlowLogger(
            experiment_name=self.experiment,
            # MLflow's generated names come from `random`, which the run has just seeded: every run would
            # be called the same.
            run_name=run_name(cfg, overrides),
            tracking_uri=self.uri,
            tags=tags,
            artifact_location=artifact_location(self.uri, cfg.paths.root_dir),
            run_id=resume_run_id,
        )
        self.run_id: str = self.logger.run_id
        self.resumed = resume_run_id is not None
        # For the Trainer: the metrics not yet written travel in checkpoints (see PendingMetrics).
        self.callbacks: list[pl.Callback] = [PendingMetrics(self.logger)]
        self.finished_before: int | None = None  # end time of a FINISHED run this job continues
        if self.resumed:
            self._reopen()
        else:  # params are immutable in MLflow: a resumed run keeps those it started with
            self.logger.log_hyperparams(flat_params(cfg))

    def _open_store(self, cfg: DictConfig, resume_run_id: str | None) -> str | None:
        """Reach (or create) the store; the run to continue, if it is there. An unreachable server that is not
        ``tracking.required`` is replaced by the embedded store, with a warning."""
        try:
            check_reachable(self.uri)
        except TrackingError as exc:
            if cfg.tracking.required:
                raise
            self.uri = default_uri(cfg.paths.root_dir)
            warnings.warn(f"{exc}; recording locally in {self.uri}", stacklevel=3)
            resume_run_id = None  # that run lives on the unreachable server
        prepare_store(self.uri, cfg.paths.root_dir)
        if resume_run_id is not None:
            try:
                MlflowClient(self.uri).get_run(resume_run_id)
            except mlflow.exceptions.MlflowException:
                print(
                    f"bp-train: note: MLflow run {resume_run_id} of the checkpoint is not in {self.uri} "
                    "(store deleted or replaced?); the training continues in a new MLflow run",
                    file=sys.stderr,
                )
                resume_run_id = None
        return resume_run_id

    def _parent_experiment(self, parent_run_id: str | None) -> str | None:
        if not parent_run_id:
            return None
        with contextlib.suppress(Exception):
            client = MlflowClient(self.uri)
            return client.get_experiment(client.get_run(parent_run_id).info.experiment_id).name
        return None

    def _reopen(self) -> None:
        """Continue the run: RUNNING again, held by this process, metrics of replayed steps skipped."""
        with contextlib.suppress(Exception):
            info = self.client.get_run(self.run_id).info
            if info.status == "FINISHED":
                self.finished_before = info.end_time
        self.logger.call("reopen run", self.client.update_run, self.run_id, status="RUNNING")
        self.logger.call("set_tag", self.client.set_tag, self.run_id, "bp.resumed", "true")
        for key, value in owner_tags().items():  # this process holds the run now
            self.logger.call("set_tag", self.client.set_tag, self.run_id, key, value)
        self.logger.call("read metric history", self.logger.skip_replayed_steps)

    @property
    def client(self) -> MlflowClient:
        return self.logger.experiment

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.logger.call(name, self.client.log_dict, self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.logger.call(name, self.client.log_text, self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        self.logger.call(name, self.client.log_figure, self.run_id, figure, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.logger.call(str(path), self.client.log_artifact, self.run_id, str(path), folder)

    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Each metric's (step, value) pairs: as logged by this process, or for a resumed run read back whole."""
        if not self.resumed:
            return {key: self.logger.history[key] for key in keys if key in self.logger.history}
        history: dict[str, list[tuple[int, float]]] = {}
        self.logger.flush()
        if self.logger.lost:
            return history
        for key in keys:
            with contextlib.suppress(Exception):
                history[key] = [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
        return history

    def log_model(self, bundle_path: Path, input_example, register_as: str | None) -> None:
        """Log the pyfunc model (weights, scaling, labels) so MLflow's own tools load and serve it."""
        from mlflow.models import infer_signature

        from bp_service.bundle import load_bundle, net_from_bundle, predict_frame
        from bp_service.tables import numeric_matrix

        bundle = load_bundle(bundle_path)
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
        output = predict_frame(
            net_from_bundle(bundle),
            bundle["meta"],
            numeric_matrix(input_example, bundle["meta"]["feature_names"], "example"),
        )
        package_dir = Path(bp_service.__file__).resolve().parent

        def log() -> None:
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(package_dir / "serving" / "pyfunc_model.py"),  # models from code: nothing pickled
                    artifacts={"bundle": str(bundle_path)},
                    code_paths=[str(package_dir)],  # the model loads without bp-service installed
                    signature=infer_signature(input_example, output),
                    input_example=input_example,
                    pip_requirements=[
                        f"torch=={torch.__version__.split('+')[0]}",
                        f"mlflow=={mlflow.__version__}",
                        "pandas",
                        "numpy",
                    ],
                    registered_model_name=register_as,
                )

        self.logger.call("log_model", log)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED: never leave the run RUNNING, even after tracking calls failed."""
        with quick_http(retries=1):
            self.logger.flush()  # what the run measured before it stopped, whatever stopped it
        try:
            with quick_http(retries=1):
                if self.finished_before is not None and status != "FINISHED":
                    # A finished run's record is never rewritten by a later failure: the continuation's
                    # outcome is a tag, the run stays FINISHED as it was.
                    self.client.set_tag(self.run_id, "bp.resume_status", status)
                    self.client.set_terminated(self.run_id, "FINISHED", end_time=self.finished_before)
                    return
                self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            warnings.warn(f"could not mark MLflow run {self.run_id} {status}: {str(exc)[:200]}", stacklevel=2)


def mark_sweep_failed(cfg: DictConfig, sweep_dir: str | Path) -> None:
    """A failed job fails its sweep: the parent run does not stay RUNNING or end FINISHED."""
    run_id = parent_run_id(sweep_dir)
    if run_id:
        with contextlib.suppress(Exception), quick_http(retries=1):
            MlflowClient(resolve_uri(cfg)).set_terminated(run_id, "FAILED")
