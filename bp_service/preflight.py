"""Checks that must pass before an MLflow run is opened: what the schema and ``validate`` cannot see.

Each raises :class:`~bp_service.config.ConfigError` (exit 2, nothing run) with one line naming the field:
keys added with ``+`` that the schema does not know, non-finite numbers, the seed's range, a precision
Lightning does not know, an accelerator this machine does not have, a monitored metric no run logs, and
``data.features`` that name the target or repeat a column.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig

from bp_service.config import AdamConfig, ConfigError, SchedulerConfig, SGDConfig, TrainConfig

SEED_MAX = 2**32 - 1  # what numpy's and Lightning's seeding accept
CONFIG_GROUPS = ("data", "model", "optimizer", "scheduler", "trainer", "experiment")


def _precisions() -> tuple[str, ...]:
    from lightning.fabric.plugins.precision import precision

    names = typing.get_args(precision._PRECISION_INPUT_STR) + typing.get_args(precision._PRECISION_INPUT_STR_ALIAS)
    ints = typing.get_args(precision._PRECISION_INPUT_INT)
    return tuple(dict.fromkeys(str(n) for n in (*names, *ints)))


def _schema_has(schema: Any, parts: list[str], cfg: DictConfig) -> bool:
    """Whether ``a.b.c`` is a field of the typed schema (optimizer and scheduler: of the chosen group's)."""
    if not parts:
        return True
    if schema is SchedulerConfig and parts[0] == "params":
        return True  # the scheduler's own keyword arguments: checked by the scheduler class
    if not dataclasses.is_dataclass(schema):
        return False
    fields = {f.name: f for f in dataclasses.fields(schema)}
    name = parts[0]
    if schema is TrainConfig and name == "optimizer":
        target = str(cfg.optimizer.get("_target_", "")) if cfg.get("optimizer") else ""
        return _schema_has(AdamConfig if target.endswith("Adam") else SGDConfig, parts[1:], cfg)
    if schema is TrainConfig and name == "scheduler":
        return _schema_has(SchedulerConfig, parts[1:], cfg)
    if name not in fields:
        return False
    default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
    return _schema_has(type(default) if default is not None else None, parts[1:], cfg)


def check_added_keys(overrides: Iterable[str], cfg: DictConfig) -> None:
    """``+key=value`` adds keys past the schema's closed set: refuse those the schema does not know."""
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").partition("=")[0].strip()
        if key.startswith("hydra.") or (key.split("/")[0].split("@")[0] in CONFIG_GROUPS and "." not in key):
            continue  # a Hydra setting, or a config group choice such as +experiment=digits
        if not _schema_has(TrainConfig, key.split("."), cfg):
            raise ConfigError(f"unknown key {key!r} (from {override!r}): not in the config schema; check its spelling")


def _finite(value: Any, name: str) -> None:
    if isinstance(value, int | float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")


def check_config(cfg: DictConfig, overrides: Iterable[str] = ()) -> None:
    """Everything about the config and this machine that can be known before the data is read."""
    check_added_keys(overrides, cfg)
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"seed must be in [0, {SEED_MAX}], got {cfg.seed}")
    for key, value in cfg.optimizer.items():
        if key == "betas":
            for beta in value:
                _finite(beta, "optimizer.betas")
                if not 0 <= beta < 1:
                    raise ConfigError(f"optimizer.betas must be in [0, 1), got {list(value)}")
        else:
            _finite(value, f"optimizer.{key}")
    for section in ("trainer", "early_stopping"):
        for key, value in cfg[section].items():
            _finite(value, f"{section}.{key}")
    precision = str(cfg.trainer.precision)
    if precision not in _precisions():
        raise ConfigError(f"trainer.precision must be one of {', '.join(_precisions())}, got {precision!r}")
    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA device; use trainer=cpu or trainer=default"
        )
    d = cfg.data
    if d.features:
        features = [str(f) for f in d.features]
        repeated = sorted({f for f in features if features.count(f) > 1})
        if repeated:
            raise ConfigError(f"data.features lists {', '.join(map(repr, repeated))} more than once")
        for name, what in ((d.target, "data.target"), (d.id_column, "data.id_column")):
            if name is not None and str(name) in features:
                raise ConfigError(f"data.features includes {name!r}, which is {what}: a model must not see it")


def check_monitor(cfg: DictConfig, task: str) -> None:
    """The metric checkpoints (and early stopping) follow must be one a run of this task logs."""
    logged = ["val/loss", "train/loss"] + (["val/acc"] if task == "classification" else [])
    monitor = cfg.checkpoint.monitor
    if monitor != "auto" and monitor not in logged:
        raise ConfigError(f"checkpoint.monitor must be auto or one of {', '.join(logged)} for {task}, got {monitor!r}")


def world_size(cfg: DictConfig) -> int:
    """How many processes will train, as far as the config says (``devices="auto"``: one per GPU, else one)."""
    devices = cfg.trainer.devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        n = torch.cuda.device_count() if devices == -1 else devices
    elif isinstance(devices, str):  # "auto", or "0,1"
        gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        n = (torch.cuda.device_count() if gpu else 1) if devices == "auto" else len(devices.strip(",").split(","))
    else:  # a list of device indices
        n = len(devices)
    return max(1, n) * max(1, int(cfg.trainer.num_nodes))


def check_rows(cfg: DictConfig, n_train: int, source: str) -> None:
    """Every training process needs at least one row: otherwise a rank runs zero steps and the run 'finishes'."""
    world = world_size(cfg)
    if n_train < world:
        raise ConfigError(
            f"{source}: {n_train} training rows for {world} training processes (trainer.devices x trainer.num_nodes); "
            "use fewer devices or more data"
        )
