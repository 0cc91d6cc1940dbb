"""Typed schema of ``conf/`` (Hydra structured configs), and the one place that instantiates what it names.

Hydra merges every YAML file onto these dataclasses, so a wrong type (``optimizer.lr=abc``) or an
unknown key fails with Hydra's own message before any code runs. Ranges and cross-field rules are
checked in :mod:`bp_service.training.preflight`. Config holds choices, code holds classes: the model,
the network, the optimizer, the scheduler and the callbacks are named by ``_target_`` and built by
:func:`instantiate`, which checks the allowlist first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from bp_service.activations import HIDDEN
from bp_service.training.guard import ConfigError, check_targets

CONF_DIR = Path(os.environ.get("BP_SERVICE_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))


class Choice(str, Enum):
    """A closed set of names (a field Hydra checks): each member equals its name as a string and prints as it."""

    def __str__(self) -> str:
        return self.value


class Task(Choice):
    """``data.task``: what the target is (auto: inferred from it)."""

    auto = "auto"
    classification = "classification"
    regression = "regression"


class Missing(Choice):
    """``data.missing`` (CSV): what an empty cell does: fail naming it, leave its row out, or fill it from train."""

    error = "error"
    drop = "drop"
    mean = "mean"


# The core's cost names (bp_service.functions.LOSSES), spelled out here so that
# composing a config never imports torch; tests/test_schema.py keeps them equal.
class Loss(Choice):
    """``model.loss``: the worked example's two costs, and cross-entropy (auto: cross_entropy for
    classification, mse for regression; not a cost of the core, so not in ``LOSSES``)."""

    auto = "auto"
    mse = "mse"
    l1 = "l1"
    cross_entropy = "cross_entropy"


# ``model.net.activation``: generated from the activation records, whose module imports no torch.
Activation = Choice("Activation", {name: name for name in HIDDEN}, module=__name__, qualname="Activation")


class Interval(Choice):
    """``scheduler.interval``: when the learning-rate scheduler steps."""

    epoch = "epoch"
    step = "step"


@dataclass
class DataSettings:
    """The split and loader settings every ``data=`` option shares (its source's own fields are its schema's)."""

    val_size: float = 0.15
    test_size: float = 0.15
    batch_size: int = 64  # per process, as in Lightning
    # Optimizer steps per Lightning step (amortizes Lightning's per-step hooks; the same weights whatever it is).
    # auto: steps over up to 65,536 rows (a small table's whole epoch), 1 where a setting counts Lightning steps.
    steps_per_execution: Any = "auto"
    on_device: bool = True  # CUDA: keep the splits on the GPU, batches gathered there (no per-batch copy)


@dataclass
class DataSourceConfig(DataSettings):
    """What every source takes: the class (``_target_``), the option's name, and what its target is."""

    _target_: str = MISSING
    name: str = MISSING
    task: Task = Task.auto  # auto: inferred from the target


@dataclass
class BundledDataConfig(DataSourceConfig):
    """A table that ships with scikit-learn (``sklearn.datasets.load_<name>``)."""

    _target_: str = "bp_service.training.data.sources.BundledSource"


@dataclass
class ToyDataConfig(DataSourceConfig):
    """A small problem generated from the seed (blog, xor, moons)."""

    _target_: str = "bp_service.training.data.sources.ToySource"
    n_samples: int = 1000
    noise: float = 0.1


@dataclass
class SyntheticDataConfig(DataSourceConfig):
    """scikit-learn's ``make_classification`` / ``make_regression`` of any size."""

    _target_: str = "bp_service.training.data.sources.SyntheticSource"
    n_samples: int = 10000
    n_features: int = 20
    n_classes: int = 2  # classification only
    n_informative: int | None = None  # default: half the features
    noise: float = 0.01  # classification: fraction of labels flipped; regression: the target's noise std


@dataclass
class CsvDataConfig(DataSourceConfig):
    """Your own CSV file."""

    _target_: str = "bp_service.training.data.csv.CsvSource"
    path: str = MISSING
    target: str = MISSING  # the target column
    features: list[str] | None = None  # feature columns (default: all but target and id)
    id_column: str | None = None  # carried through to predictions, never a feature
    missing: Missing = Missing.error  # error | drop (leave rows with an empty cell out) | mean (fill from train)


# Each data schema under the name conf/data/*.yaml include it by (`/<name>@_here_` in their defaults).
DATA_SCHEMAS = {
    "bundled_data_schema": BundledDataConfig,
    "toy_data_schema": ToyDataConfig,
    "synthetic_data_schema": SyntheticDataConfig,
    "csv_data_schema": CsvDataConfig,
}


@dataclass
class NetConfig:
    _target_: str = "bp_service.layers.MLP"
    hidden: list[int] = field(default_factory=lambda: [16])  # widths between the data's input and output
    activation: Activation = Activation.sigmoid
    output_activation: str | None = "auto"  # auto: softmax (sigmoid: one output, mse, l1); none for regression
    fused: bool = True
    bias: bool = True


@dataclass
class ModelConfig:
    _target_: str = "bp_service.training.module.BPModule"
    net: NetConfig = field(default_factory=NetConfig)
    loss: Loss = Loss.auto  # auto: cross_entropy for classification, mse for regression
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
    interval: Interval = Interval.epoch


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 300  # a cap: early stopping usually ends a run first
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
    data: DataSourceConfig = field(default_factory=DataSourceConfig)  # typed by the chosen option's schema
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
    for name, schema in DATA_SCHEMAS.items():
        cs.store(name=name, node=schema)


def instantiate(node: DictConfig | dict[str, Any], field_name: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` once its ``_target_`` (and any nested one) is allowlisted.

    ``kwargs`` are what only the run knows (the data's widths, the metric to follow); a wrong argument
    in the config is reported as a ConfigError naming the field.
    """
    container = plain(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node))
    check_targets(container, field_name)
    try:
        # _convert_="all": the built objects get plain lists and dicts, never OmegaConf containers (which a
        # checkpoint could then only load with weights_only=False).
        return hydra_instantiate(container, _convert_="all", **kwargs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ConfigError):  # a constructor that checks its own fields already names the field
            raise cause from None
        if isinstance(cause, TypeError | ValueError):
            raise ConfigError(f"{field_name}: {cause}") from None
        raise


def plain(value: Any) -> Any:
    """``value`` with every enum member (a :class:`Choice`) replaced by its plain value, at any depth.

    What is built from the config gets plain strings: a checkpoint (loaded with ``weights_only=True``)
    or an MLflow param may never hold an Enum.
    """
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def data_config(name: str, **fields: Any) -> DictConfig:
    """The ``data`` node of ``data=<name>`` built in code: ``conf/data/<name>.yaml`` on its schema, ``fields`` on top.

    For callers outside a Hydra run (benchmarks, notebooks); a run composes the same node through Hydra.
    """
    file = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
    schemas = [str(entry).lstrip("/").partition("@")[0] for entry in file.pop("defaults", [])]
    schema = next((DATA_SCHEMAS[s] for s in schemas if s in DATA_SCHEMAS), DataSourceConfig)
    return OmegaConf.merge(OmegaConf.structured(schema), file, fields)


# The name callers used when one flat dataclass held every source's fields: same call, same node.
DataConfig = data_config
