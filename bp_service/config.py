"""Typed schema of ``conf/`` (Hydra structured configs) and the checks a schema cannot express.

Hydra merges every YAML file onto these dataclasses, so a wrong type (``optimizer.lr=abc``) or an
unknown key fails with Hydra's own message before any code runs. Ranges and cross-field rules live
in :func:`validate`, which raises :class:`ConfigError` with one line naming the field.
"""

from __future__ import annotations

import importlib
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from bp_service.layers import ACTIVATIONS


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


def full_error_requested() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``) rather than one-line errors.

    ``bp-train`` sets ``HYDRA_FULL_ERROR=1`` for Hydra itself and keeps the user's choice in
    ``BP_SERVICE_FULL_ERROR``, which child processes (DDP ranks) inherit.
    """
    return os.environ.get("BP_SERVICE_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


DATASETS = ("blog", "xor", "moons", "synthetic", "digits", "breast_cancer", "iris", "wine", "diabetes", "csv")
LOSSES = ("mse", "l1")
TASKS = ("auto", "classification", "regression")


@dataclass
class DataConfig:
    name: str = MISSING
    task: str = "auto"  # auto | classification | regression (auto: inferred from the target)
    path: str | None = None  # csv only
    target: str | None = None  # csv only: the target column
    features: list[str] | None = None  # csv only: feature columns (default: all but target and id)
    id_column: str | None = None  # csv only: carried through to predictions, never a feature
    n_samples: int = 1000  # generated datasets (blog, xor, moons, synthetic)
    noise: float = 0.1  # generated datasets (synthetic classification: fraction of labels flipped)
    n_features: int = 20  # synthetic only
    n_classes: int = 2  # synthetic classification only
    n_informative: int | None = None  # synthetic only (default: half the features)
    val_size: float = 0.15
    test_size: float = 0.15
    batch_size: int = 64  # per process, as in Lightning
    steps_per_execution: int = 1  # optimizer steps per Lightning step (amortizes per-step hooks)
    on_device: bool = True  # CUDA: keep the splits on the GPU, batches gathered there (no per-batch copy)


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [16])
    activation: str = "sigmoid"
    output_activation: str | None = "auto"  # auto: sigmoid for classification, none for regression
    loss: str = "mse"
    fused: bool = True
    bias: bool = True
    compile: bool = False  # torch.compile the training cost (forward, cost, hand-written backward)
    capture: bool | None = None  # CUDA-graph training steps: null when possible, true says why not, false off


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    _target_: str = MISSING
    interval: str = "epoch"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 20
    min_epochs: int | None = None
    deterministic: bool | None = None  # None: True on CPU, Lightning's default elsewhere
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    limit_test_batches: float | None = None
    fast_dev_run: bool = False
    gradient_clip_val: float | None = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True


@dataclass
class CheckpointConfig:
    monitor: str = "auto"  # auto: val/acc (max) for classification, val/loss (min) for regression
    save_last: bool = True
    save_top_k: int = 1
    every_n_train_steps: int | None = None  # also refresh last.ckpt every N optimizer steps (kill-safe resume)


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    patience: int = 10
    min_delta: float = 0.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; default: sqlite:///<paths.root_dir>/mlflow.db
    experiment: str = "bp-service"
    run_name: str | None = None
    required: bool = True  # fail fast when the server is unreachable at start
    log_model: bool = True
    register_model: str | None = None
    gradcheck: bool = True


@dataclass
class SlurmConfig:
    auto_requeue: bool = False  # on requeue_signal: save an HPC checkpoint and `scontrol requeue` the job
    requeue_signal: str = "SIGUSR1"  # pair with `#SBATCH --signal=SIGUSR1@90`


@dataclass
class PathsConfig:
    root_dir: str = MISSING  # stable home of mlflow.db, artifacts and outputs
    output_dir: str = MISSING  # this run's folder (Hydra's)
    ckpt_dir: str = MISSING


@dataclass
class TrainConfig:
    task_name: str = "train"
    seed: int = 42
    ckpt_path: str | None = None  # "last", or a path to a .ckpt, to resume
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: Any = MISSING  # SGDConfig | AdamConfig, typed by the group's schema
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_configs() -> None:
    """Put the schemas where ``conf/`` refers to them (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="optimizer", name="sgd_schema", node=SGDConfig)
    cs.store(group="optimizer", name="adam_schema", node=AdamConfig)
    cs.store(group="scheduler", name="scheduler_schema", node=SchedulerConfig)


# --------------------------------------------------------------------------- what instantiate may build
# hydra.utils.instantiate imports and calls whatever `_target_` names: on a config from elsewhere that
# is code execution. Only these prefixes are ever instantiated.
ALLOWED_TARGET_PREFIXES = ("bp_service.", "torch.optim.", "lightning.pytorch.callbacks.")


def check_target(target: str, field_name: str) -> type:
    """Resolve an allowlisted ``_target_`` to its class, or raise ConfigError naming the field."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES) or "__" in target:
        raise ConfigError(
            f"{field_name}._target_={target!r} is not allowed (allowed: {', '.join(ALLOWED_TARGET_PREFIXES)}*)"
        )
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{field_name}._target_={target!r} does not exist") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{field_name}._target_={target!r} is not a class")
    return obj


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_synthetic(d: DictConfig) -> None:
    """make_classification's own limits, checked here so that the error names the field."""
    _require(d.n_features >= 1, f"data.n_features must be >= 1, got {d.n_features}")
    _require(d.n_classes >= 2, f"data.n_classes must be >= 2, got {d.n_classes}")
    informative = d.n_informative
    if informative is not None:
        _require(
            1 <= informative <= d.n_features,
            f"data.n_informative must be in [1, data.n_features={d.n_features}], got {informative}",
        )
    if d.task != "regression":
        _require(d.noise <= 1, f"data.noise must be <= 1 for synthetic classification (labels flipped), got {d.noise}")
        n = informative if informative is not None else d.n_features
        _require(
            2 * d.n_classes <= 2**n,
            f"data.n_informative={n} is too small for data.n_classes={d.n_classes}: "
            f"needs 2 * n_classes <= 2 ** n_informative",
        )


def validate(cfg: DictConfig) -> None:
    """Range and cross-field checks; raises ConfigError naming the first bad field."""
    d, m, o, t = cfg.data, cfg.model, cfg.optimizer, cfg.trainer
    _require(d.name in DATASETS, f"data.name must be one of {', '.join(DATASETS)}, got {d.name!r}")
    _require(d.task in TASKS, f"data.task must be one of {', '.join(TASKS)}, got {d.task!r}")
    if d.name == "csv":
        _require(bool(d.path), "data.path is required for data=csv")
        _require(bool(d.target), "data.target is required for data=csv")
    _require(d.n_samples >= 20, f"data.n_samples must be >= 20, got {d.n_samples}")
    _require(d.noise >= 0, f"data.noise must be >= 0, got {d.noise}")
    if d.name == "synthetic":
        _validate_synthetic(d)
    for name in ("val_size", "test_size"):
        value = d[name]
        _require(0 < value < 1, f"data.{name} must be in (0, 1), got {value}")
    _require(
        d.val_size + d.test_size < 1, f"data.val_size + data.test_size must be < 1, got {d.val_size + d.test_size}"
    )
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _require(d.steps_per_execution >= 1, f"data.steps_per_execution must be >= 1, got {d.steps_per_execution}")

    _require(len(m.hidden) >= 1, "model.hidden must list at least one hidden width, got []")
    for width in m.hidden:
        _require(width > 0, f"model.hidden widths must be > 0, got {list(m.hidden)}")
    _require(
        m.activation in ACTIVATIONS, f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {m.activation!r}"
    )
    _require(
        m.output_activation in (None, "auto", *ACTIVATIONS),
        f"model.output_activation must be auto, null or one of {', '.join(ACTIVATIONS)}, got {m.output_activation!r}",
    )
    _require(m.loss in LOSSES, f"model.loss must be one of {', '.join(LOSSES)}, got {m.loss!r}")

    check_target(o._target_, "optimizer")
    _require(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr:g}")
    _require(o.get("weight_decay", 0) >= 0, f"optimizer.weight_decay must be >= 0, got {o.get('weight_decay')}")
    if "momentum" in o:
        _require(0 <= o.momentum < 1, f"optimizer.momentum must be in [0, 1), got {o.momentum}")
    if cfg.scheduler is not None:
        check_target(cfg.scheduler._target_, "scheduler")
        _require(cfg.scheduler.interval in ("epoch", "step"), "scheduler.interval must be epoch or step")

    _require(t.max_epochs >= 1, f"trainer.max_epochs must be >= 1, got {t.max_epochs}")
    _require(t.num_nodes >= 1, f"trainer.num_nodes must be >= 1, got {t.num_nodes}")
    _require(t.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {t.log_every_n_steps}")
    every = cfg.checkpoint.every_n_train_steps
    _require(every is None or every >= 1, f"checkpoint.every_n_train_steps must be >= 1, got {every}")
    _require(cfg.checkpoint.save_top_k >= -1, f"checkpoint.save_top_k must be >= -1, got {cfg.checkpoint.save_top_k}")
    _require(
        cfg.early_stopping.patience >= 1, f"early_stopping.patience must be >= 1, got {cfg.early_stopping.patience}"
    )
    _require(bool(cfg.tracking.experiment), "tracking.experiment must not be empty")
    _require(
        isinstance(getattr(signal, cfg.slurm.requeue_signal, None), signal.Signals),
        f"slurm.requeue_signal must be a signal name such as SIGUSR1, got {cfg.slurm.requeue_signal!r}",
    )
