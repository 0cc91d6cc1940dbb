"""The MLflow run of a bp-train job: what it records, how a lost server is survived, and where to see it.

:class:`MLflowTracker` is the :class:`~bp_service.training.tracking.interface.Tracker` of MLflow. The store is
:func:`bp_service.home.tracking_uri`'s; creating and checking it is :mod:`bp_service.training.store`'s job.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from omegaconf import DictConfig

import bp_service
from bp_service.files import atomic_path
from bp_service.home import default_uri, store_file
from bp_service.training.store import (
    FINISHED_BEFORE_TAG,
    TrackingError,
    check_reachable,
    close_run,
    ensure_experiment,
    owner_tags,
    prepare_store,
    quick_http,
    store_complete,
)
from bp_service.training.tracking.dashboard import NOTE_TAG, dashboard, run_note, share_view
from bp_service.training.tracking.interface import Job, WrittenTracker
from bp_service.training.tracking.names import experiment_name, resolve_uri, run_name
from bp_service.training.tracking.pictures import local_artifact_dir, render
from bp_service.training.tracking.sweep import parent_run_id, sweep_store
from bp_service.training.tracking.writer import RunWriter


@functools.cache  # the package's checkout does not change while a process runs
def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def run_tags(overrides: list[str], device: str, output_dir: str, pid: int) -> dict[str, str]:
    tags = {
        **owner_tags(pid),
        "hydra.overrides": " ".join(overrides),
        "bp.output_dir": output_dir,
        "device": device,
        "host.python": platform.python_version(),
        "version.torch": package_version("torch"),
        "version.lightning": package_version("lightning"),
        "version.bp_service": bp_service.__version__,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def package_version(name: str) -> str:
    """A package's version: as the loaded module says it, else as installed (MLflow's own process loads no torch)."""
    module = sys.modules.get(name)
    return getattr(module, "__version__", None) or metadata.version(name)


# --------------------------------------------------------------------------- one run
class MLflowTracker(WrittenTracker):
    """The MLflow run of one ``bp-train`` job: created (or continued) at start, closed with a status.

    Args:
        tracking: the ``tracking`` config; ``tracking.experiment`` is resolved in it (``auto``: the data's, or
            the sweep's parent run's), so that the params and the summary name the experiment the run is in.
        paths: the ``paths`` config: the home (the embedded store) and the run folder (a tag).
        job: the task, data, overrides, device, the run to continue, the sweep and where a resume came from.
    """

    name = "MLflow"

    def __init__(self, tracking: DictConfig, paths: DictConfig, job: Job) -> None:
        self.owner_pid = job.owner_pid or os.getpid()  # the process that trains: it holds the run
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
        experiment_id = ensure_experiment(self.uri, self.experiment, paths.root_dir)
        share_view(self.uri, experiment_id)
        tags = {**run_tags(job.overrides, job.device, paths.output_dir, self.owner_pid), **job.origin}
        if parent:
            tags["mlflow.parentRunId"] = parent
        self.writer = RunWriter(
            MlflowClient(self.uri),
            experiment_id,
            # MLflow's generated names come from `random`, which the run has just seeded: every run would
            # be called the same.
            run_name(tracking.run_name, job.task_name, job.overrides, paths.output_dir),
            tags,
            run_id=resume_run_id,
        )
        self.run_id: str = self.writer.run_id
        self.resumed = resume_run_id is not None
        self.finished_before: int | None = None  # end time of a FINISHED run this job continues
        self._pictures: list[str] = []
        self._artifact_uri: str | None = None  # where the pictures are written
        with contextlib.suppress(Exception):
            self._artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        if self.resumed:
            self._reopen()

    def close_abandoned(self) -> None:
        """FAILED for the runs of this experiment that this process holds RUNNING besides its own: one a tracking
        process created and died before it could answer (:func:`~.backends.open_tracker`), so that bp-train, which
        went on in this run, leaves none RUNNING. Held means all of :func:`owner_tags` equal: the same process."""
        mine = owner_tags(self.owner_pid)
        if not {"bp.pid_start", "bp.boot_id"} <= mine.keys():  # not enough to tell this process from a reused pid
            return
        with contextlib.suppress(Exception):  # a courtesy to the store: the job goes on in its own run whatever
            held = self.client.search_runs(
                [self.writer.experiment_id],
                f"tags.`bp.pid` = '{self.owner_pid}' and attributes.status = 'RUNNING'",
            )
            for run in held:
                if run.info.run_id != self.run_id and all(run.data.tags.get(k) == v for k, v in mine.items()):
                    why = f"its tracking process died before bp-train heard of it; the job went on in run {self.run_id}"
                    self.client.set_tag(run.info.run_id, "bp.abandoned", why)
                    self.client.set_terminated(run.info.run_id, "FAILED")

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
            run = self.client.get_run(self.run_id)
            before = run.data.tags.get(FINISHED_BEFORE_TAG, "")
            if run.info.status == "FINISHED":
                self.finished_before = run.info.end_time
            elif run.info.status == "RUNNING" and before.isdigit():  # a continuation killed with -9, continued
                self.finished_before = int(before)
        if self.finished_before is not None:  # kept in the record too: bp-runs stale --close restores it
            self.writer.call(
                "set_tag", self.client.set_tag, self.run_id, FINISHED_BEFORE_TAG, str(self.finished_before)
            )
        self.writer.call("reopen run", self.client.update_run, self.run_id, status="RUNNING")
        self.writer.call("set_tag", self.client.set_tag, self.run_id, "bp.resumed", "true")
        for key, value in owner_tags(self.owner_pid).items():  # this process holds the run now
            self.writer.call("set_tag", self.client.set_tag, self.run_id, key, value)
        self.writer.call("read metric history", self.writer.skip_replayed_steps)

    @property
    def client(self) -> MlflowClient:
        return self.writer.client

    @property
    def lost(self) -> str | None:
        return self.writer.lost

    @property
    def artifact_uri(self) -> str | None:
        return self._artifact_uri

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.resumed:  # params are immutable in MLflow: a resumed run keeps those it started with
            self.writer.log_params(params)

    def set_tag(self, key: str, value: str) -> None:
        self.writer.call("set_tag", self.client.set_tag, self.run_id, key, value)

    def flush(self) -> None:
        self.writer.flush()

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.writer.call(name, self.client.log_dict, self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        self.writer.call(name, self.client.log_text, self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        self.write_picture(render(figure, name), name)

    def write_picture(self, data: bytes, name: str) -> None:
        """Writes a picture's file, whole or not at all; :meth:`end` names the run's pictures on its page, in one
        write to the store rather than one per picture."""
        self.writer.call(name, self._write_picture, data, name)
        self._pictures.append(name)

    def _write_picture(self, data: bytes, name: str) -> None:
        folder = local_artifact_dir(self._artifact_uri)
        if folder is not None:  # a process stopped mid-write leaves the previous picture or none, never half a PNG
            with atomic_path(folder / name) as tmp:
                Path(tmp).write_bytes(data)
            return
        with tempfile.TemporaryDirectory() as tmp:  # a server's store: one upload, stored whole or not at all
            local = Path(tmp) / Path(name).name
            local.write_bytes(data)
            self.client.log_artifact(self.run_id, str(local), str(Path(name).parent) if "/" in name else None)

    def pictures_written(self, names: list[str]) -> None:
        self._pictures.extend(names)

    def lose(self, what: str, error: str) -> None:
        """Tracking lost for a reason found elsewhere (a picture's write failed in the drawing process)."""

        def fail() -> None:
            raise OSError(error)

        self.writer.call(what, fail)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.writer.call(str(path), self.client.log_artifact, self.run_id, str(path), folder)

    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Each metric's (step, value) pairs: as logged by this process, or for a resumed run read back whole."""
        if not self.resumed:
            return {key: self.writer.history[key] for key in keys if key in self.writer.history}
        history: dict[str, list[tuple[int, float]]] = {}
        self.writer.flush()
        if self.writer.lost:
            return history
        for key in keys:
            with contextlib.suppress(Exception):
                history[key] = [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
        return history

    def log_model(self, bundle_path: Path, input_example, register_as: str | None, step: int) -> None:
        """Log the pyfunc model (weights, scaling, labels) so MLflow's own tools load and serve it, with the run's
        metrics at ``step`` as its own (MLflow links those of one step; its default, 0, holds only the learning
        rate)."""
        import torch
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
            mlflow.set_tracking_uri(self.uri)  # a no-op where the head start set this URI (model_logging_steps)
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
                    step=step,
                )

        self.writer.call("log_model", log)

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED: never leave the run RUNNING, even after tracking calls failed."""
        with quick_http(retries=1):
            self.writer.flush()  # what the run measured before it stopped, whatever stopped it
            if self._pictures:  # shown on the run's Overview page, not one click each in the Artifacts tab
                self.set_tag(NOTE_TAG, run_note(self.run_id, self._pictures))
        try:
            with quick_http(retries=1):
                close_run(self.client, self.run_id, status, self.finished_before)
        except Exception as exc:
            warnings.warn(f"could not mark MLflow run {self.run_id} {status}: {str(exc)[:200]}", stacklevel=2)

    def link(self) -> str:
        """The run's page in MLflow's training-runs view: on the server that records it, else where ``make ui``
        serves the home's store (other stores need their own ``mlflow ui``, and the line says so)."""
        served = self.uri.startswith(("http:", "https:"))
        link = run_link(self.uri.rstrip("/") if served else dashboard(), self.writer.experiment_id, self.run_id)
        if served:
            return link
        if self.uri == f"sqlite:///{Path(self.root_dir).resolve() / 'mlflow.db'}":
            return f"{link}   (after `make ui`; store: {self.uri})"
        return f"{link}   (after `mlflow ui --backend-store-uri {self.uri}`)"


def run_link(base: str, experiment_id: str | None, run_id: str) -> str:
    """The run's page in MLflow's training-runs view: MLflow 3.x opens experiments in its GenAI view
    unless the URL (or the sidebar's switch, remembered by the browser) says ``workflowType=machine_learning``."""
    if experiment_id is None:  # MLflow's direct route finds the experiment itself
        return f"{base}/#/runs/{run_id}?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def opening_steps(uri: str) -> list[Callable[[], None]]:
    """What opening a run into ``uri`` builds first, as steps a tracking process takes ahead of it: the store's
    client (its engine and schema check, 0.04 s) when the embedded store exists whole (a new or half-made one is
    created at the run's opening, under :func:`~bp_service.training.store.prepare_store`'s lock), the git commit (a
    subprocess) and MLflow's context tags (its git context imports GitPython, 0.05 s). Reads only: a store that is
    not the one the run opens into is merely not used."""

    def store() -> None:
        db = store_file(uri)
        if db is not None and store_complete(db):  # else MLflow would create or migrate it in place
            MlflowClient(uri).search_experiments(max_results=1)  # MLflow keeps the client's store per URI

    return [store, git_commit, lambda: resolve_tags({})]


def model_logging_steps(uri: str) -> list[Callable[[], None]]:
    """What :meth:`MLflowTracker.log_model` loads, as steps a tracking process takes ahead of it: torch (the model
    is tried on its input example), MLflow's pyfunc flavor, MLflow's map of the installed packages, which its
    requirements check builds on first use (0.4 s), and the fluent API's tracking URI, whose setting rebuilds
    MLflow's tracer (0.03 s)."""

    def torch() -> None:
        import torch  # noqa: F401

        import bp_service.bundle  # noqa: F401

    def pyfunc() -> None:
        import mlflow.pyfunc  # noqa: F401
        from mlflow.models import infer_signature  # noqa: F401

    def packages() -> None:
        from mlflow.utils import requirements_utils

        with contextlib.suppress(Exception):  # a head start only: an MLflow without it builds the map when it logs
            requirements_utils._init_packages_to_modules_map()

    def tracking_uri() -> None:  # the job's store (a sweep's job logs into its parent's: log_model sets that one)
        mlflow.set_tracking_uri(uri)

    return [torch, pyfunc, packages, tracking_uri]
