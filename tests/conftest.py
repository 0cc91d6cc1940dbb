import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from bp_service.config import register_configs
from bp_service.train import CONF_DIR, project_root

# Quiet and quick defaults for every test run of bp-train.
FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


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
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
        full_env.update({"BP_SERVICE_HOME": str(tmp_path), **(env or {})})
        exe = Path(sys.executable).parent / command
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, timeout=timeout)

    return run


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
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner and Huey workers
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
