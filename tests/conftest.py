import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# pytest-xdist's workers (make test: one per core) each get their share of the cores, as joblib gives a sweep's
# workers: torch's second OpenMP thread spins between products too small to split, on the core the other worker
# needs. Set before torch loads; the commands the tests start inherit it. The slow tests run alone, on torch's own.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # as -n auto
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest
import requests
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from bp_service.home import project_root
from bp_service.training.cli import CONF_DIR
from bp_service.training.config import register_configs

# Quiet and quick defaults for every test run of bp-train.
FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
COMPOSE = Path(__file__).resolve().parent.parent / "docker" / "compose.yaml"

# The variables that steer bp-service, MLflow and Hydra (a tracking server, a home folder, traceback modes):
# a test sets the ones it means to and inherits none from the shell that runs pytest, nor from another test.
STEERING = ("MLFLOW_", "HYDRA_", "BP_SERVICE_")


def clean_env(*, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """An environment for a subprocess: this one without the STEERING variables (and ``drop``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((*STEERING, *drop))}
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """The same for this process: no STEERING variable during a test, and none it set left after it.

    Not monkeypatch: the code under test sets some itself (bp-train's ``HYDRA_FULL_ERROR``), which
    monkeypatch would not undo.
    """
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(STEERING)}
    yield
    for key in [k for k in os.environ if k.startswith(STEERING)]:
        del os.environ[key]
    os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose conf/train.yaml as bp-train would, with its root and run folder under tmp_path."""
    register_configs()
    if not OmegaConf.has_resolver("bp_root"):
        OmegaConf.register_new_resolver("bp_root", project_root)

    def make(*overrides: str, run_dir: str = "run") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "train", overrides=[f"paths.root_dir={tmp_path}", *FAST, *overrides], return_hydra_config=True
            )
        cfg.hydra.runtime.output_dir = str(tmp_path / run_dir)
        (tmp_path / run_dir).mkdir(parents=True, exist_ok=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
        return cfg

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def cli(tmp_path):
    """Run a console script of this venv as a user would, with BP_SERVICE_HOME=tmp_path."""

    def run(command: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        full_env = clean_env(BP_SERVICE_HOME=str(tmp_path), **(env or {}))
        exe = Path(sys.executable).parent / command
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, timeout=timeout)

    return run


def store_statuses(home: Path) -> list[tuple[str, str]]:
    """(run id, status) straight from the embedded store's table, without MLflow's client, as fast as it can
    be polled."""
    try:
        with sqlite3.connect(f"file:{home / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as con:
            return list(con.execute("SELECT run_uuid, status FROM runs"))
    except sqlite3.Error:  # not created yet, or busy
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` process on loopback."""

    def __init__(self, root: Path, backend_uri: str | None = None, extra: tuple[str, ...] = ()) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner and Huey workers
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", backend_uri or f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *extra,
        ]  # fmt: skip
        with open(self.log, "w") as log:
            # Its own process group: stop() ends the server and every worker it started.
            self.proc = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=5).ok:
                    return
            except requests.RequestException:  # not listening yet, or busy starting
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    yield server.url
    server.stop()


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` as `docker compose up` with none of them set: the default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


# --------------------------------------------------------------------------- PostgreSQL
def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict]:
    """{"uri", "bindir"}: the CI's PostgreSQL, or a throwaway cluster with compose's user, password and db."""
    bindir = _pg_bindir()
    if os.environ.get("BP_TEST_POSTGRES_URI"):
        yield {"uri": os.environ["BP_TEST_POSTGRES_URI"], "bindir": bindir}
        return
    if bindir is None:
        pytest.fail(
            "no PostgreSQL for the compose stack test: set BP_TEST_POSTGRES_URI=postgresql://user:pass@host:port/db "
            "(.ci/run does) or install the server binaries (apt-get install postgresql)"
        )
    service_env = yaml.safe_load(COMPOSE.read_text())["services"]["postgres"]["environment"]
    pg_env = {k: interpolate(str(v)) for k, v in service_env.items()}
    user, password, db = pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"]
    # not under pytest's tmp_path (mode 0700, root's): the postgres user must reach it
    root = Path(tempfile.mkdtemp(prefix="bp-test-postgres-"))
    (root / "password").write_text(password + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(root / "password", "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, check=False)

    try:
        proc = run(str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={root / 'password'}",
                   "-A", "scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        proc = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                   "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")  # fmt: skip
        assert proc.returncode == 0, proc.stderr + (root / "server.log").read_text()
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()
        yield {"uri": f"postgresql://{user}:{password}@127.0.0.1:{port}/{db}", "bindir": bindir}
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
