"""The MLflow run of a bp-train job: what it records, how a lost server is survived, and where to see it.

:class:`MLflowTracker` is the :class:`~bp_service.training.tracking.interface.Tracker` of MLflow. The store is
:func:`bp_service.home.tracking_uri`'s; creating and checking it is :mod:`bp_service.training.store`'s job.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import lightning
import lightning.pytorch as pl
import mlflow
import torch
from mlflow import MlflowClient
from omegaconf import DictConfig

import bp_service
from bp_service.commands import first_line
from bp_service.files import atomic_path
from bp_service.home import default_uri
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
from bp_service.training.tracking.dashboard import NOTE_TAG, dashboard, run_note, share_view
from bp_service.training.tracking.interface import Job, Tracker
from bp_service.training.tracking.logger import OptimizerSteps, PendingMetrics, ResilientMLFlowLogger
from bp_service.training.tracking.names import experiment_name, resolve_uri, run_name
from bp_service.training.tracking.sweep import parent_run_id, sweep_store


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


# --------------------------------------------------------------------------- one run
class MLflowTracker(Tracker):
    """The MLflow run of one ``bp-train`` job: created (or continued) at start, closed with a status.

    Args:
        tracking: the ``tracking`` config; ``tracking.experiment`` is resolved in it (``auto``: the data's, or
            the sweep's parent run's), so that the params and the summary name the experiment the run is in.
        paths: the ``paths`` config: the home (the embedded store) and the run folder (a tag).
        job: the task, data, overrides, device, the run to continue, the sweep and where a resume came from.
    """

    name = "MLflow"

    def __init__(self, tracking: DictConfig, paths: DictConfig, job: Job) -> None:
        self.uri = sweep_store(job.sweep_dir) or resolve_uri(tracking, paths)  # a sweep's jobs: its parent's store
        # A server lost mid-run must cost seconds, not MLflow's default minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.root_dir = paths.root_dir
        resume_run_id = self._open_store(tracking.required, job.resume_id)
        # A sweep's jobs go where its parent run is; a run on its own to its data's experiment.
        parent = parent_run_id(job.sweep_dir)
        tracking.experiment = self._parent_experiment(parent) or experiment_name(tracking.experiment, job.dataset)
        self.experiment = tracking.experiment
        share_view(self.uri, ensure_experiment(self.uri, self.experiment, paths.root_dir))
        tags = {**run_tags(job.overrides, job.device, paths.output_dir), **job.origin}
        if parent:
            tags["mlflow.parentRunId"] = parent
        self.logger = ResilientMLFlowLogger(
            experiment_name=self.experiment,
            # MLflow's generated names come from `random`, which the run has just seeded: every run would
            # be called the same.
            run_name=run_name(tracking.run_name, job.task_name, job.overrides, paths.output_dir),
            tracking_uri=self.uri,
            tags=tags,
            artifact_location=artifact_location(self.uri, paths.root_dir),
            run_id=resume_run_id,
        )
        self.run_id: str = self.logger.run_id
        self.resumed = resume_run_id is not None
        # For the Trainer: the metrics not yet written travel in checkpoints (see PendingMetrics), and every metric
        # is recorded at the optimizer step.
        self._callbacks: list[pl.Callback] = [PendingMetrics(self.logger), OptimizerSteps(self.logger)]
        self.finished_before: int | None = None  # end time of a FINISHED run this job continues
        self._pictures: list[str] = []
        self._artifact_uri: str | None = None  # where the pictures are written
        with contextlib.suppress(Exception):
            self._artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        if self.resumed:
            self._reopen()

    def _open_store(self, required: bool, resume_run_id: str | None) -> str | None:
        """Reach (or create) the store; the run to continue, if it is there. An unreachable server that is not
        ``tracking.required`` is replaced by the embedded store, with a warning."""
        try:
            check_reachable(self.uri)
        except TrackingError as exc:
            if required:
                raise
            self.uri = default_uri(self.root_dir)
            warnings.warn(f"{exc}; recording locally in {self.uri}", stacklevel=3)
            resume_run_id = None  # that run lives on the unreachable server
        prepare_store(self.uri, self.root_dir)
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

    @property
    def lost(self) -> str | None:
        return self.logger.lost

    @property
    def trainer_logger(self) -> ResilientMLFlowLogger:
        return self.logger

    @property
    def trainer_callbacks(self) -> list[pl.Callback]:
        return self._callbacks

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.resumed:  # params are immutable in MLflow: a resumed run keeps those it started with
            self.logger.log_hyperparams(params)

    def set_tag(self, key: str, value: str) -> None:
        self.logger.call("set_tag", self.client.set_tag, self.run_id, key, value)

    def flush(self) -> None:
        self.logger.flush()

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.logger.call(name, self.client.log_dict, self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.logger.call(name, self.client.log_text, self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        """Writes the picture, whole or not at all; :meth:`end` names the run's pictures on its page, in one write
        to the store rather than one per picture."""
        self.logger.call(name, self._write_figure, figure, name)
        self._pictures.append(name)

    def log_figures(self, drawn: Mapping[str, Callable[[], Any]]) -> Callable[[], None]:
        """Into a store on this machine, the pictures are drawn by a forked process while this one goes on (the
        model's logging): matplotlib's work, about half a second, then runs on another core. Python threads would
        not do: both sides hold the GIL, and together took longer than one after the other. The child writes
        files only (each whole or not at all), never the store's database; the returned wait names them."""
        folder = local_artifact_dir(self._artifact_uri)
        if folder is None or not drawn or self.lost or "fork" not in multiprocessing.get_all_start_methods():
            return super().log_figures(drawn)
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_draw_apart, args=(drawn, folder, send), name="bp-train pictures")
        child.start()
        send.close()

        def wait() -> None:
            try:
                written, failed, error = receive.recv()
            except EOFError:  # it ended without a word (a signal)
                child.join()
                written, failed, error = [], "pictures", f"the drawing process ended with code {child.exitcode}"
            finally:
                child.join()
                receive.close()
            self._pictures.extend(written)
            if failed is None:
                return
            if failed == "draw":
                raise RuntimeError(f"drawing {error}")

            def lose() -> None:
                raise OSError(error)

            self.logger.call(failed, lose)  # a full disk: tracking lost, with its warning; the run stands

        return wait

    def _write_figure(self, figure, name: str) -> None:
        folder = local_artifact_dir(self._artifact_uri)
        if folder is None:  # a server's store: one upload, stored whole or not at all
            self.client.log_figure(self.run_id, figure, name)
            return
        # A process stopped mid-write leaves the previous picture or none, never half a PNG.
        with atomic_path(folder / name) as tmp:
            figure.savefig(tmp, format=Path(name).suffix.lstrip(".") or "png")

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
            if self._pictures:  # shown on the run's Overview page, not one click each in the Artifacts tab
                self.set_tag(NOTE_TAG, run_note(self.run_id, self._pictures))
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

    def link(self) -> str:
        """The run's page in MLflow's training-runs view: on the server that records it, else where ``make ui``
        serves the home's store (other stores need their own ``mlflow ui``, and the line says so)."""
        served = self.uri.startswith(("http:", "https:"))
        link = run_link(self.uri.rstrip("/") if served else dashboard(), self.logger.experiment_id, self.run_id)
        if served:
            return link
        if self.uri == f"sqlite:///{Path(self.root_dir).resolve() / 'mlflow.db'}":
            return f"{link}   (after `make ui`; store: {self.uri})"
        return f"{link}   (after `mlflow ui --backend-store-uri {self.uri}`)"


def _draw_apart(drawn: Mapping[str, Callable[[], Any]], folder: Path, send) -> None:
    """The forked child of :meth:`MLflowTracker.log_figures`: draws and writes, and sends back (names written,
    None | "draw" | the picture whose write failed, what went wrong)."""
    written: list[str] = []
    for name, draw in drawn.items():
        try:
            figure = draw()
            with atomic_path(folder / name) as tmp:
                figure.savefig(tmp, format=Path(name).suffix.lstrip(".") or "png")
        except OSError as exc:  # the disk, not the drawing
            send.send((written, name, first_line(exc)))
            return
        except BaseException as exc:
            send.send((written, "draw", f"{name}: {type(exc).__name__}: {first_line(exc)}"))
            return
        written.append(name)
    send.send((written, None, None))


def local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The folder of a run's artifacts when it is on this machine (``file:`` or a plain path), else None."""
    if not artifact_uri:
        return None
    location = urlparse(artifact_uri)
    if location.scheme not in ("", "file") or location.netloc not in ("", "localhost"):
        return None
    return Path(url2pathname(location.path))


def run_link(base: str, experiment_id: str | None, run_id: str) -> str:
    """The run's page in MLflow's training-runs view: MLflow 3.x opens experiments in its GenAI view
    unless the URL (or the sidebar's switch, remembered by the browser) says ``workflowType=machine_learning``."""
    if experiment_id is None:  # MLflow's direct route finds the experiment itself
        return f"{base}/#/runs/{run_id}?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
