"""MLflow: where runs go, what they record, and how a lost server is survived.

The store is ``MLFLOW_TRACKING_URI`` when set (as MLflow users expect), else ``tracking.uri``, else
an embedded SQLite file ``<paths.root_dir>/mlflow.db`` with artifacts beside it in ``mlartifacts/``:
absolute paths, so nothing depends on the working directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning
import mlflow
import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

import bp_service

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run_id"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


# --------------------------------------------------------------------------- where runs go
def resolve_uri(cfg: DictConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or default_uri(cfg.paths.root_dir)


def default_uri(root_dir: str | Path) -> str:
    return f"sqlite:///{Path(root_dir).resolve() / 'mlflow.db'}"


def is_local(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def artifact_location(uri: str, root_dir: str | Path) -> str | None:
    """Local stores get an absolute artifact folder; a server decides its own."""
    return (Path(root_dir).resolve() / "mlartifacts").as_uri() if is_local(uri) else None


@contextlib.contextmanager
def _quick_http(retries: int = 0, timeout: int = 5) -> Iterator[None]:
    """Answer within seconds rather than MLflow's default minutes of retries."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:`` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


def _store_problem(db: Path) -> tuple[str, int] | None:
    """(what is wrong, runs it holds) for a store left half-created; None for a usable one."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
            version = (
                con.execute("SELECT version_num FROM alembic_version").fetchone()
                if "alembic_version" in tables
                else None
            )
    except sqlite3.DatabaseError as exc:
        return f"not a readable SQLite database ({exc})", -1
    if leftovers:
        return f"a migration was interrupted (table {leftovers[0]} left behind)", runs
    if tables and version is None:
        return "its creation was interrupted (no schema version recorded)", runs
    return None


def prepare_store(uri: str, root_dir: str | Path) -> None:
    """Create the embedded SQLite store safely: complete or not at all, once, whoever starts first.

    MLflow creates a missing SQLite store by running its migrations in place: a signal in the middle leaves
    a half-migrated file every later run fails on, and two first runs at once migrate the same file twice
    (``duplicate column name``). Here the store is created and migrated in a temporary file, under a lock
    beside it, and renamed into place only when complete. A store an older version left half-created is
    moved aside and recreated when it holds no runs; with runs in it, the error says how to recover.
    """
    db = sqlite_path(uri)
    if db is None or (db.is_file() and db.stat().st_size > 0 and _store_problem(db) is None):
        return
    from filelock import FileLock
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db.with_name(db.name + ".lock")):
        if db.is_file() and db.stat().st_size > 0:
            problem = _store_problem(db)
            if problem is None:  # created meanwhile by another first run
                return
            what, runs = problem
            if runs != 0:
                raise TrackingError(
                    f"tracking store {db} is damaged: {what}; it holds runs, so it is left as it is: "
                    f"back it up, then repair it with `mlflow db upgrade sqlite:///{db}` or move it aside"
                )
            aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(db, aside)
            warnings.warn(
                f"tracking store {db} was half-created ({what}) and held no runs: moved to {aside}", stacklevel=2
            )
        for stale in db.parent.glob(f".{db.name}.*.tmp*"):  # left by a creator that was killed: we hold the lock
            stale.unlink(missing_ok=True)
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        tmp_uri = f"sqlite:///{tmp}"
        try:
            store = SqlAlchemyStore(tmp_uri, artifact_location(uri, root_dir))
            store.engine.dispose()
            SqlAlchemyStore._engine_map.pop(tmp_uri, None)
            os.replace(tmp, db)
        except BaseException:
            SqlAlchemyStore._engine_map.pop(tmp_uri, None)
            for leftover in db.parent.glob(f"{tmp.name}*"):  # with its -journal
                leftover.unlink(missing_ok=True)
            raise


def check_reachable(uri: str) -> None:
    """Fail fast, before any training, when a tracking server does not answer."""
    if is_local(uri):
        return
    with _quick_http():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise TrackingError(
                f"tracking server {uri} is unreachable ({reason}); set tracking.required=false to train anyway"
            ) from None


def ensure_experiment(uri: str, name: str, root_dir: str | Path) -> str:
    """Experiment id for ``name``, created with an absolute artifact location if new."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, root_dir))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        return client.get_experiment_by_name(name).experiment_id


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
    return {k: v for k, v in out.items() if not k.startswith("paths.")}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None where unknown or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_tags() -> dict[str, str]:
    """Which process holds a run RUNNING: host, pid and the pid's start time (a reused pid is another process)."""
    tags = {"bp.host": socket.gethostname(), "bp.pid": str(os.getpid())}
    started = process_start(os.getpid())
    if started:
        tags["bp.pid_start"] = started
    return tags


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


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger that survives losing the server mid-run.

    The first failed call is reported once as a warning and tracking stops for the rest of the
    run; training and checkpointing, which never depend on MLflow, go on. The run's final status
    is set by ``bp-train`` itself, so ``finalize`` only flushes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: str | None = None
        self._replayed_until: dict[str, int] = {}

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
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            self.lost = f"{what} failed: {reason}"
            warnings.warn(f"MLflow tracking lost, training goes on without it ({self.lost})", stacklevel=2)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._replayed_until:
            metrics = {k: v for k, v in metrics.items() if (step or 0) > self._replayed_until.get(k, -1)}
        if metrics:
            self._guard("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", super().log_hyperparams, params)

    def finalize(self, status: str = "success") -> None:
        pass

    def call(self, what: str, fn, *args: Any, **kwargs: Any) -> None:
        """Any other tracking call (artifacts, models), with the same survival rule."""
        self._guard(what, fn, *args, **kwargs)


# --------------------------------------------------------------------------- sweeps
class MLflowSweepCallback(Callback):
    """One parent run per Hydra multirun; every job's run is its child (``mlflow.parentRunId``).

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
            experiment_id = ensure_experiment(uri, config.tracking.experiment, config.paths.root_dir)
            sweep_dir = Path(config.hydra.sweep.dir)
            run = MlflowClient(uri).create_run(
                experiment_id,
                run_name=f"sweep-{sweep_dir.name}",
                tags={"bp.sweep_dir": str(sweep_dir), "bp.role": "sweep"},
            )
        except Exception as exc:  # the jobs will report the same problem with their own config
            log.warning("could not create the sweep's parent run: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / PARENT_RUN_FILE
        if path.is_file():
            with contextlib.suppress(Exception):
                client, run_id = MlflowClient(resolve_uri(config)), path.read_text().strip()
                if client.get_run(run_id).info.status == "RUNNING":  # a failed job already marked it FAILED
                    client.set_terminated(run_id, "FINISHED")


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
    """

    def __init__(
        self,
        cfg: DictConfig,
        overrides: list[str],
        device: str,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.uri = resolve_uri(cfg)
        # A server lost mid-run must cost seconds, not MLflow's default minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            check_reachable(self.uri)
        except TrackingError as exc:
            if cfg.tracking.required:
                raise
            self.uri = default_uri(cfg.paths.root_dir)
            warnings.warn(f"{exc}; recording locally in {self.uri}", stacklevel=2)
            resume_run_id = None  # that run lives on the unreachable server
        prepare_store(self.uri, cfg.paths.root_dir)
        if resume_run_id is not None:
            try:
                MlflowClient(self.uri).get_run(resume_run_id)
            except mlflow.exceptions.MlflowException:
                warnings.warn(
                    f"run {resume_run_id} of the checkpoint is not in {self.uri}; starting a new run", stacklevel=2
                )
                resume_run_id = None
        self.experiment = cfg.tracking.experiment
        ensure_experiment(self.uri, self.experiment, cfg.paths.root_dir)
        tags = run_tags(overrides, device, cfg.paths.output_dir)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.logger = ResilientMLFlowLogger(
            experiment_name=self.experiment,
            # MLflow's generated names come from `random`, which the run has just seeded: every run would
            # be called the same. The task and its overrides say what the run is.
            run_name=cfg.tracking.run_name or " ".join([cfg.task_name, *overrides])[:200],
            tracking_uri=self.uri,
            tags=tags,
            artifact_location=artifact_location(self.uri, cfg.paths.root_dir),
            run_id=resume_run_id,
        )
        self.run_id: str = self.logger.run_id
        self.resumed = resume_run_id is not None
        self.finished_before: int | None = None  # end time of a FINISHED run this job continues
        if self.resumed:
            with contextlib.suppress(Exception):
                info = self.client.get_run(self.run_id).info
                if info.status == "FINISHED":
                    self.finished_before = info.end_time
            self.logger.call("reopen run", self.client.update_run, self.run_id, status="RUNNING")
            self.logger.call("set_tag", self.client.set_tag, self.run_id, "bp.resumed", "true")
            for key, value in owner_tags().items():  # this process holds the run now
                self.logger.call("set_tag", self.client.set_tag, self.run_id, key, value)
            self.logger.call("read metric history", self.logger.skip_replayed_steps)
        else:  # params are immutable in MLflow: a resumed run keeps those it started with
            self.logger.log_hyperparams(flat_params(cfg))

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
        history: dict[str, list[tuple[int, float]]] = {}
        if self.logger.lost:
            return history
        for key in keys:
            with contextlib.suppress(Exception):
                history[key] = [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
        return history

    def log_model(self, bundle_path: Path, input_example, register_as: str | None) -> None:
        """Log the pyfunc model (weights, scaling, labels) so MLflow's own tools load and serve it."""
        from mlflow.models import infer_signature

        from bp_service.serving import features_matrix, load_bundle, net_from_bundle, predict_frame

        bundle = load_bundle(bundle_path)
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
        output = predict_frame(
            net_from_bundle(bundle), bundle["meta"], features_matrix(input_example, bundle["meta"], "example")
        )
        package_dir = Path(bp_service.__file__).resolve().parent

        def log() -> None:
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(package_dir / "pyfunc_model.py"),  # models from code: nothing pickled
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
        try:
            with _quick_http(retries=1):
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
        with contextlib.suppress(Exception), _quick_http(retries=1):
            MlflowClient(resolve_uri(cfg)).set_terminated(run_id, "FAILED")


# --------------------------------------------------------------------------- signals while a run opens
@contextlib.contextmanager
def signals_deferred(*signums: int) -> Iterator[None]:
    """Hold these signals for the block, then deliver each once to the handler in force after it.

    Around the creation of a run: a SIGTERM (or Ctrl-C) between the moment the store records the run
    and the moment its id is known here would leave it RUNNING for good. Held, it arrives when the id
    is known, and the run is closed KILLED like any stopped run.
    """
    pending: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, lambda s, f: pending.append(s))
    except ValueError:  # not the main thread: signals are not ours to handle
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


# --------------------------------------------------------------------------- runs left RUNNING
def _owner_gone(tags: Mapping[str, str]) -> str | None:
    """Why the process holding a run is known to be gone; None when it may be alive (or is elsewhere)."""
    if tags.get("bp.host") != socket.gethostname() or not tags.get("bp.pid", "").isdigit():
        return None
    pid = int(tags["bp.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:  # alive, another user's
        pass
    started = process_start(pid)
    if tags.get("bp.pid_start") and started and started != tags["bp.pid_start"]:
        return f"process {pid} is gone (the pid now belongs to another process)"
    return None


def stale_runs(uri: str) -> list[tuple[Any, str | None]]:
    """Every RUNNING run in the store with why its process is known gone (None: alive, or on another host)."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=10_000) if experiments else []
    return [(run, _owner_gone(run.data.tags)) for run in runs]


def close_stale_main(argv: list[str]) -> int:
    """``bp-train --stale-runs [--close]``: list runs left RUNNING by a killed process; close them KILLED.

    Only runs whose process is known to be gone are closed: recorded on this host, and its pid no longer
    runs (or now belongs to a process started later). Runs of other hosts are listed, never touched.
    The store is ``MLFLOW_TRACKING_URI``, else the embedded one under ``BP_SERVICE_HOME``.
    """
    from bp_service.train import project_root

    close = "--close" in argv
    unknown = [a for a in argv if a != "--close"]
    if unknown:
        print(
            f"bp-train: error: unknown option {unknown[0]!r}; usage: bp-train --stale-runs [--close]", file=sys.stderr
        )
        return 2
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri(project_root())
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        print(f"no store at {db}: no runs")
        return 0
    with _quick_http():
        found = stale_runs(uri)
    closed = 0
    for run, gone in found:
        name = run.info.run_name or ""
        where = f"{run.data.tags.get('bp.host', '?')} pid {run.data.tags.get('bp.pid', '?')}"
        if gone and close:
            client = MlflowClient(uri)
            client.set_tag(run.info.run_id, "bp.closed_as_stale", gone)
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
            state = f"closed KILLED ({gone})"
        elif gone:
            state = f"stale ({gone}): close with --close"
        else:
            state = "running, or on another host: left as it is"
        print(f"{run.info.run_id}  {name[:40]:<40}  {where:<28}  {state}")
    print(f"{len(found)} RUNNING run(s) in {uri}; {closed} closed")
    return 0
