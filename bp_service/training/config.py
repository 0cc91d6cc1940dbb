"""Typed schema of ``conf/`` (Hydra structured configs), and the one place that instantiates what it names.

Hydra merges every YAML file onto these dataclasses, so a wrong type (``optimizer.lr=abc``) or an
unknown key fails with Hydra's own message before any code runs. Ranges and cross-field rules are
checked in :mod:`bp_service.training.preflight`. Config holds choices, code holds classes: the model,
the network, the optimizer, the scheduler and the callbacks are named by ``_target_`` and built by
:func:`instantiate`, which checks the allowlist first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from bp_service.training.guard import ConfigError, check_targets


@dataclass
class DataConfig:
    name: str = MISSING
    task: str = "auto"  # auto | classification | regression (auto: inferred from the target)
    path: str | None = None  # csv only
    target: str | None = None  # csv only: the target column
    features: list[str] | None = None  # csv only: feature columns (default: all but target and id)
    id_column: str | None = None  # csv only: carried through to predictions, never a feature
    missing: str = "error"  # csv only: error | drop (leave rows with an empty cell out) | mean (fill from train)
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
class NetConfig:
    _target_: str = "bp_service.layers.MLP"
    hidden: list[int] = field(default_factory=lambda: [16])  # widths between the data's input and output
    activation: str = "sigmoid"
    output_activation: str | None = "auto"  # auto: sigmoid for classification, none for regression
    fused: bool = True
    bias: bool = True


@dataclass
class ModelConfig:
    _target_: str = "bp_service.training.module.BPModule"
    net: NetConfig = field(default_factory=NetConfig)
    loss: str = "mse"
    compile: bool = False  # torch.compile the training cost (forward, cost, hand-written backward)
    capture: bool | None = None  # CUDA-graph training steps: null when possible, true says why not, false off
    gradient_clip_val: float | None = None  # manual optimization: the module clips, not the Trainer


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True  # the module passes its parameters
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    """Lightning's ``lr_scheduler`` config: the scheduler (a partial: the optimizer comes later) and when it steps."""

    scheduler: Any = MISSING
    interval: str = "epoch"


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
    enable_progress_bar: bool = True
    enable_model_summary: bool = True


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; default: sqlite:///<paths.root_dir>/mlflow.db
    experiment: str = "auto"  # auto: the data's name (CSV: the file's stem); a sweep's jobs share its parent's
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
    callbacks: Any = field(default_factory=dict)  # name -> _target_ node (conf/callbacks/)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_configs() -> None:
    """Put the schemas where ``conf/`` refers to them (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # Outside the groups (the group files include them with `/<name>@_here_`): not offered as choices
    # by `bp-train --help`, and `optimizer=adam_schema` is refused with the real options.
    cs.store(name="sgd_schema", node=SGDConfig)
    cs.store(name="adam_schema", node=AdamConfig)
    cs.store(name="scheduler_schema", node=SchedulerConfig)


def instantiate(node: DictConfig | dict[str, Any], field_name: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` once its ``_target_`` (and any nested one) is allowlisted.

    ``kwargs`` are what only the run knows (the data's widths, the metric to follow); a wrong argument
    in the config is reported as a ConfigError naming the field.
    """
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    check_targets(container, field_name)
    try:
        # _convert_="all": the built objects get plain lists and dicts, never OmegaConf containers (which a
        # checkpoint could then only load with weights_only=False).
        return hydra_instantiate(container, _convert_="all", **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, TypeError | ValueError):
            raise ConfigError(f"{field_name}: {cause}") from None
        raise
