import os
import subprocess
import sys
from pathlib import Path

import pytest
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
