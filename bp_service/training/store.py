"""The MLflow store itself: created safely, checked for reachability, and cleared of runs left RUNNING.

Which store: :func:`bp_service.home.tracking_uri` (``MLFLOW_TRACKING_URI``, else ``tracking.uri``, else
the embedded ``<home>/mlflow.db``, with artifacts beside it in ``mlartifacts/``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
from mlflow import MlflowClient

from bp_service.commands import first_line
from bp_service.home import store_file
from bp_service.training.tracking.interface import StoreUnavailable, TrackingError  # raised in the tracking process


def _disk_full(exc: BaseException | None) -> bool:
    """Whether a full disk (or quota) is behind ``exc``: an OSError, or SQLite's SQLITE_FULL under SQLAlchemy's."""
    import sqlite3

    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # sqlite_errorname is Python 3.11's; SQLITE_FULL's own message before that
        if isinstance(exc, sqlite3.Error) and (
            getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or str(exc) == "database or disk is full"
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_local(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def artifact_location(uri: str, root_dir: str | Path) -> str | None:
    """Local stores get an absolute artifact folder; a server decides its own."""
    return (Path(root_dir).resolve() / "mlartifacts").as_uri() if is_local(uri) else None


@contextlib.contextmanager
def quick_http(retries: int = 0, timeout: int = 5) -> Iterator[None]:
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


def store_complete(db: Path) -> bool:
    """Whether the embedded store's file exists, created whole (read only)."""
    return db.is_file() and db.stat().st_size > 0 and _store_problem(db) is None


def prepare_store(uri: str, root_dir: str | Path) -> None:
    """Create the embedded SQLite store safely: complete or not at all, once, whoever starts first.

    MLflow creates a missing SQLite store by running its migrations in place: a signal in the middle leaves
    a half-migrated file every later run fails on, and two first runs at once migrate the same file twice
    (``duplicate column name``). Here the store is created and migrated in a temporary file, under a lock
    beside it, and renamed into place only when complete. A store an older version left half-created is
    moved aside and recreated when it holds no runs; with runs in it, the error says how to recover.
    A full disk raises :class:`StoreUnavailable`, naming the folder, with nothing left behind.
    """
    db = store_file(uri)
    if db is None or store_complete(db):
        return
    try:
        _create_store(db, uri, root_dir)
    except Exception as exc:
        if not _disk_full(exc):
            raise
        # SQLAlchemy's message is the whole CREATE TABLE statement; the folder is what the user can act on
        raise StoreUnavailable(f"the tracking store {db} could not be created (no space left on {db.parent})") from None


def _create_store(db: Path, uri: str, root_dir: str | Path) -> None:
    """:func:`prepare_store`'s work, under the lock: a store left half-created moved aside, then a new one."""
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
                f"tracking store {db} was half-created ({what}) and held no runs: moved to {aside}", stacklevel=3
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
    with quick_http():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingError.unreachable(uri, first_line(exc)[:200]) from None


def ensure_experiment(uri: str, name: str, root_dir: str | Path) -> str:
    """Experiment id for ``name``, created with an absolute artifact location if new; an existing one of the
    home's own store must keep its artifacts in this home (see :func:`check_artifacts_home`)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        check_artifacts_home(uri, experiment, root_dir)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, root_dir))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        return client.get_experiment_by_name(name).experiment_id


def check_artifacts_home(uri: str, experiment: Any, root_dir: str | Path) -> None:
    """Refuse an experiment of the home's own store whose artifacts are in another folder.

    MLflow fixes an experiment's artifact location, absolute, when it creates it. In a home that was moved
    or copied, the store still names the old home's ``mlartifacts``: a run would write its artifacts there
    (recreating a moved home's old path, or writing into the original of a copy). A store of another place
    (``MLFLOW_TRACKING_URI``, a server) keeps its artifacts where it was set up to.
    """
    home, db = Path(root_dir).resolve(), store_file(uri)
    location = urlparse(experiment.artifact_location or "")
    if db is None or not db.is_relative_to(home) or location.scheme not in ("", "file"):
        return
    folder = Path(url2pathname(location.path)).resolve()
    if not folder.is_relative_to(home):
        raise TrackingError(
            f"experiment {experiment.name!r} of {db} keeps its artifacts in {folder}, outside this home {home} "
            "(was the home moved or copied?): nothing was run; record in a new experiment with "
            "tracking.experiment=<name>, or use the home from its old place"
        )


def pid_namespace() -> str | None:
    """The PID namespace this process's pid is counted in (``pid:[inode]``); None where unknown (not Linux)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def boot_id() -> str | None:
    """This boot of the kernel (a new one at each restart; shared by every container on it); None where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None where unknown or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# --------------------------------------------------------------------------- runs left RUNNING
def owner_tags(pid: int) -> dict[str, str]:
    """Which process holds a run RUNNING: host, the kernel's boot, the PID namespace its pid is counted in, the
    pid and its start time (a reused pid is another process). Containers on one host share its name and boot."""
    found = {
        "bp.pid_start": process_start(pid),
        "bp.pid_ns": pid_namespace(),
        "bp.boot_id": boot_id(),
    }
    return {"bp.host": socket.gethostname(), "bp.pid": str(pid), **{k: v for k, v in found.items() if v}}


FINISHED_BEFORE_TAG = "bp.finished_before"  # on a FINISHED run a job continues: the end time it had, in ms


def close_run(client: MlflowClient, run_id: str, status: str, finished_before: int | None = None) -> str:
    """End a run ``status`` (FINISHED, FAILED or KILLED); returns the status its record shows.

    A FINISHED run that a job continued (``finished_before``, its end time then) is never rewritten by the
    continuation's failure: it stays FINISHED at that time, and the continuation's outcome is a tag,
    ``bp.resume_status``. Whoever closes it, the job itself or ``bp-runs stale --close`` after a ``kill -9``."""
    if finished_before is not None and status != "FINISHED":
        client.set_tag(run_id, "bp.resume_status", status)
        client.set_terminated(run_id, "FINISHED", end_time=finished_before)
        return "FINISHED"
    client.set_terminated(run_id, status)
    return status


def close_stale(client: MlflowClient, run: Any, why: str) -> str:
    """Close a RUNNING run whose process is proven gone (:func:`owner_state`): KILLED, as :func:`close_run`
    closes it (a FINISHED run it continued stays FINISHED). Returns the status its record shows."""
    client.set_tag(run.info.run_id, "bp.closed_as_stale", why)
    before = run.data.tags.get(FINISHED_BEFORE_TAG, "")
    return close_run(client, run.info.run_id, "KILLED", int(before) if before.isdigit() else None)


def owner_state(tags: Mapping[str, str]) -> tuple[str, str]:
    """(state, why) of the process that holds a run: ``gone`` only when proven, else ``alive``, ``elsewhere``
    (another host name) or ``cannot tell``.

    A pid means something only in the PID namespace it was counted in: another container on this host (a
    host-network stack, Kubernetes' hostNetwork) shares the host name but not the namespace, and there its
    pid is someone else's. A new boot id under the same host name means the host restarted since.
    """
    if tags.get("bp.host") != socket.gethostname():
        return "elsewhere", f"on host {tags.get('bp.host', '?')}"
    pid, ns, boot = tags.get("bp.pid", ""), tags.get("bp.pid_ns"), tags.get("bp.boot_id")
    here_ns, here_boot = pid_namespace(), boot_id()
    if not (pid.isdigit() and ns and boot and here_ns and here_boot):
        return "cannot tell", "its PID namespace or boot is not recorded"
    if boot != here_boot:
        return "gone", "this host has restarted since"
    if ns != here_ns:
        return "cannot tell", f"pid {pid} of another PID namespace, {ns}: another container?"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "gone", f"process {pid} is gone"
    except PermissionError:  # alive, another user's
        pass
    started = process_start(int(pid))
    if tags.get("bp.pid_start") and started and started != tags["bp.pid_start"]:
        return "gone", f"process {pid} is gone (the pid now belongs to another process)"
    return "alive", f"process {pid} is running"


def stale_runs(uri: str) -> list[tuple[Any, str, str]]:
    """Every RUNNING run in the store with the state of its process and why (see :func:`owner_state`)."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=10_000) if experiments else []
    return [(run, *owner_state(run.data.tags)) for run in runs]
