"""What a configuration may make bp-train build, run or write, checked before Hydra or bp-train acts on it.

A config names code in four places, and on an override pasted from elsewhere or a downloaded
``--config-dir`` each of them is code execution:

- ``_target_`` anywhere, at any depth, in dicts, lists and ``_args_``: ``hydra.utils.instantiate``
  imports and calls what it names (bp-train's model, optimizer, scheduler and callbacks);
- ``hydra.callbacks``, ``hydra.launcher`` and ``hydra.sweeper``, which Hydra builds itself, before the task;
- ``hydra.job_logging`` and ``hydra.hydra_logging``, given to ``logging.config.dictConfig``, which
  instantiates handler and formatter ``class`` paths and ``()`` factories and resolves ``ext://`` names;
- ``hydra.job.env_set``, copied into the process environment that later subprocesses (DDP's ranks,
  MLflow's git) inherit: ``LD_PRELOAD`` or ``PYTHONPATH`` there runs code.

Each is checked against exact names (classes only, never a prefix), and nothing is imported before its
name passed. Names that become folders (``task_name``, ``hydra.job.name``, ``hydra.output_subdir``,
``hydra.sweep.subdir``) may not leave their parent. :func:`install` puts the check where Hydra composes
every config, so the run's, each sweep job's (in whatever process a launcher runs it) and ``--cfg``'s
are all checked before Hydra builds anything from them.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is out of range or not allowed; the message names the field."""


_LIGHTNING_CALLBACKS = (
    "DeviceStatsMonitor EarlyStopping EMAWeightAveraging GradientAccumulationScheduler LearningRateMonitor "
    "ModelCheckpoint ModelSummary OnExceptionCheckpoint RichModelSummary RichProgressBar "
    "StochasticWeightAveraging Timer TQDMProgressBar"
)
_OPTIMIZERS = "ASGD Adadelta Adafactor Adagrad Adam AdamW Adamax NAdam RAdam RMSprop Rprop SGD"
_SCHEDULERS = (
    "ConstantLR CosineAnnealingLR CosineAnnealingWarmRestarts CyclicLR ExponentialLR LinearLR MultiStepLR "
    "OneCycleLR PolynomialLR ReduceLROnPlateau StepLR"
)

# The classes a run's config may name (data source, model, network, callbacks, optimizer, scheduler). Left out
# on purpose: classes that take a callable (LambdaCallback, LambdaLR, ModelPruning, ThroughputMonitor), bases
# and abstract classes, and anything that is not a class.
JOB_CLASSES = frozenset(
    {
        "bp_service.training.module.BPModule",
        "bp_service.layers.MLP",
        "bp_service.training.checkpoints.LastCheckpoint",
        "bp_service.training.callbacks.GradientFlow",
        "bp_service.training.callbacks.BestCheckpoint",
        "bp_service.training.callbacks.ProgressBar",
        "bp_service.training.callbacks.Summary",
        "bp_service.training.data.sources.BundledSource",
        "bp_service.training.data.sources.ToySource",
        "bp_service.training.data.sources.SyntheticSource",
        "bp_service.training.data.csv.CsvSource",
        *(f"lightning.pytorch.callbacks.{name}" for name in _LIGHTNING_CALLBACKS.split()),
        *(f"torch.optim.{name}" for name in _OPTIMIZERS.split()),
        *(f"torch.optim.lr_scheduler.{name}" for name in _SCHEDULERS.split()),
    }
)
# hydra.callbacks: the project's own (a sweep's parent MLflow run) and Hydra's job-return log.
HYDRA_CALLBACKS = frozenset(
    {"bp_service.training.tracking.sweep.MLflowSweepCallback", "hydra.experimental.callbacks.LogJobReturnCallback"}
)
# hydra.launcher / hydra.sweeper: Hydra's own and its official plugins; inside them, Optuna's samplers.
HYDRA_PLUGINS = frozenset(
    {
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
    }
)
SWEEPER_PARTS = frozenset(
    f"optuna.samplers.{name}"
    for name in ("TPESampler", "RandomSampler", "CmaEsSampler", "NSGAIISampler", "MOTPESampler", "GridSampler")
)
# logging.config.dictConfig: the handler and formatter classes, and ``()`` factories, a logging config may name.
LOG_CLASSES = frozenset(
    {
        "logging.StreamHandler",
        "logging.FileHandler",
        "logging.NullHandler",
        "logging.handlers.RotatingFileHandler",
        "logging.handlers.TimedRotatingFileHandler",
        "logging.handlers.WatchedFileHandler",
        "logging.Formatter",
        "colorlog.ColoredFormatter",  # hydra/job_logging=colorlog
    }
)
LOG_STREAMS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})
# What the run's folder reads as while a config is checked (it is claimed only when the run starts).
RUN_MARK = "<the run's folder>"
RUN_FOLDERS = ("${hydra:runtime.output_dir}/", "${hydra.runtime.output_dir}/")  # a log file's folder, as written
# hydra.job.env_set: variables that tune the libraries a run uses. Not the loader's or an interpreter's
# (LD_PRELOAD, PYTHONPATH, BASH_ENV, GIT_*...), which a subprocess would act on.
ENV_PREFIXES = (
    "CUDA_", "NCCL_", "GLOO_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "TORCH_", "PYTORCH_", "PL_", "MLFLOW_",
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "TOKENIZERS_PARALLELISM",
)  # fmt: skip


# --------------------------------------------------------------------------- _target_
def check_name(target: Any, field_name: str, allowed: frozenset[str] = JOB_CLASSES) -> str:
    """``target`` is one of the ``allowed`` names, else a ConfigError naming the field. Nothing is imported:
    importing a module runs it (and the allowlist holds only classes, which the tests check)."""
    if not isinstance(target, str) or target not in allowed:
        shown = target if isinstance(target, str) and len(target) <= 120 else f"{str(target)[:120]}…"
        raise ConfigError(
            f"{field_name}._target_={shown!r} is not allowed: only the classes bp-service lists by full name "
            "are built from a config (bp_service/training/guard.py)"
        )
    return target


def check_target(target: Any, field_name: str, allowed: frozenset[str] = JOB_CLASSES) -> type:
    """The class an allowlisted ``_target_`` names, imported once its name passed; else a ConfigError."""
    module_name, _, attr = check_name(target, field_name, allowed).rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise ConfigError(f"{field_name}._target_={target!r} is not installed here") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{field_name}._target_={target!r} is not a class")
    return obj


def check_targets(node: Any, field_name: str = "", allowed: frozenset[str] = JOB_CLASSES) -> None:
    """Every ``_target_`` in ``node``, at every depth, in dicts, lists and ``_args_``, names an allowed class."""
    node = _plain(node)
    if isinstance(node, dict):
        if "_target_" in node:
            check_name(node["_target_"], field_name or "<root>", allowed)
        for key, value in node.items():
            check_targets(value, f"{field_name}.{key}".lstrip("."), allowed)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{field_name}[{i}]", allowed)


def _plain(node: Any) -> Any:
    """``node`` as plain dicts and lists, each interpolation resolved where it can be now.

    Resolved, because ``${oc.create:...}`` turns a string into a node with a ``_target_``; as written where
    it needs what only the run knows (``${hydra:runtime.output_dir}`` while Hydra composes).
    """
    if not isinstance(node, DictConfig | ListConfig):
        return node
    raw = OmegaConf.to_container(node, resolve=False)
    keys: Iterable[Any] = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    out = {key: _resolved(node, key, raw) for key in keys}
    return list(out.values()) if isinstance(node, ListConfig) else out


def _resolved(node: DictConfig | ListConfig, key: Any, raw: Any) -> Any:
    try:
        return _plain(node[key])
    except OmegaConfBaseException:
        return raw[key]


# --------------------------------------------------------------------------- hydra.*
def check_composed(cfg: DictConfig) -> None:
    """Everything in a composed config (``hydra.*`` included) that could run code or write outside the run."""
    if "hydra" in cfg:
        check_hydra_raw(OmegaConf.to_container(cfg.hydra, resolve=False))
    if "paths" in cfg:
        check_paths_raw(OmegaConf.to_container(cfg.paths, resolve=False))
    cfg = copy.deepcopy(cfg)
    if "hydra" in cfg:  # not claimed here: their resolver creates the run's folder
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.run.dir = cfg.hydra.sweep.dir = cfg.hydra.runtime.output_dir = RUN_MARK
    plain = _plain(cfg)
    for name, node in (plain.get("callbacks") or {}).items():
        if isinstance(node, dict) and "_args_" in node:  # the folder check reads arguments by name
            raise ConfigError(f"callbacks.{name}._args_ is not allowed: give a callback's arguments by name")
    hydra = plain.pop("hydra", None) or {}
    check_targets(plain)
    check_folder_name(plain.get("task_name", "train"), "task_name")
    for name, node in (hydra.get("callbacks") or {}).items():
        check_targets(node, f"hydra.callbacks.{name}", HYDRA_CALLBACKS)
    for key in ("launcher", "sweeper"):
        node = hydra.get(key)
        if isinstance(node, dict):
            check_name(node.get("_target_"), f"hydra.{key}", HYDRA_PLUGINS)
            check_targets({k: v for k, v in node.items() if k != "_target_"}, f"hydra.{key}", SWEEPER_PARTS)
    job = hydra.get("job") or {}
    check_folder_name(job.get("name"), "hydra.job.name", optional=True)
    check_env(job.get("env_set") or {}, set(job.get("env_copy") or ()))
    for key in ("job_logging", "hydra_logging"):
        check_logging(hydra.get(key), f"hydra.{key}")
    check_folder_name(hydra.get("output_subdir"), "hydra.output_subdir", optional=True)
    check_relative_path((hydra.get("sweep") or {}).get("subdir"), "hydra.sweep.subdir")


# Where Hydra builds or runs what a config holds. An interpolation there is resolved only when Hydra
# builds it, later than this check: a resolver could then turn text into a node with a _target_.
EXECUTED = ("callbacks", "launcher", "sweeper", "job_logging", "hydra_logging")
_INTERPOLATION = re.compile(r"(?<!\\)\$\{\s*([^:}\s]*)(:?)")
SAFE_RESOLVERS = ("now", "oc.env")  # text in, text out


def check_hydra_raw(hydra: dict[str, Any]) -> None:
    """``hydra.*`` as written: the run's folders claimed fresh, and no resolver that could build a node where
    Hydra builds things (node references and ``now``/``oc.env`` only; ``${hydra:runtime.output_dir}`` as a
    log file's folder)."""
    for key in ("run", "sweep"):
        folder = str((hydra.get(key) or {}).get("dir", ""))
        if key == "run" and _ddp_rank_of(folder):
            continue
        if not is_claimed_folder(folder):
            raise ConfigError(
                f"hydra.{key}.dir={folder[:120]!r} is not allowed: a run claims a new folder of its own; "
                f"write it as ${{bp_run_dir:<parent folder>}}, and nothing around it"
            )
    for key in EXECUTED:
        _check_interpolations(hydra.get(key), f"hydra.{key}")


def is_claimed_folder(folder: str) -> bool:
    """Whether ``folder`` is one ``${bp_run_dir:<parent>}`` and nothing else: text after it (``/../<a run>``)
    would lead from the new folder into one that exists. No quote or backslash inside, where OmegaConf could
    close the interpolation before its last brace; without them its braces nest as they are counted here."""
    if not folder.startswith("${bp_run_dir:") or any(c in folder for c in "'\"\\"):
        return False
    depth = 0
    for i, char in enumerate(folder):
        depth += (char == "{") - (char == "}")
        if depth == 0 and char == "}":
            return i == len(folder) - 1
    return False


def check_paths_raw(paths: dict[str, Any]) -> None:
    """``paths.output_dir`` as written: the run's own folder, the one Hydra's ``hydra.run.dir`` claimed. Set to
    another run's folder, the run would take it over (its ``last.ckpt`` resumed as a requeue, then replaced)."""
    output_dir = paths.get("output_dir")
    if output_dir is not None and str(output_dir) != "${hydra:runtime.output_dir}":
        raise ConfigError(
            f"paths.output_dir={str(output_dir)[:120]!r} is not allowed: it is the run's own new folder; "
            f"choose where runs go with hydra.run.dir='${{bp_run_dir:<parent folder>}}'"
        )


def _ddp_rank_of(folder: str) -> bool:
    """Whether this process is another rank Lightning's DDP started, given rank 0's run folder, which exists:
    Lightning passes it as ``hydra.run.dir=<folder>`` (and the rank as ``LOCAL_RANK`` in the environment)."""
    return os.environ.get("LOCAL_RANK", "0") not in ("", "0") and os.path.isdir(folder)


def _check_interpolations(node: Any, field_name: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _check_interpolations(value, f"{field_name}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_interpolations(value, f"{field_name}[{i}]")
    elif isinstance(node, str):
        for name, colon in _INTERPOLATION.findall(node):
            log_folder = field_name.endswith(".filename") and name == "hydra" and node.startswith(RUN_FOLDERS)
            if colon and name not in SAFE_RESOLVERS and not log_folder:
                raise ConfigError(
                    f"{field_name}={node[:120]!r}: the resolver {name!r} is not allowed here (only node "
                    f"references and {', '.join(SAFE_RESOLVERS)}): it could build what Hydra then runs"
                )


def check_logging(conf: Any, field_name: str) -> None:
    """A ``logging.config.dictConfig`` dict names only allowed classes, standard streams, files in the run."""
    if not isinstance(conf, dict):
        return
    _check_log_names(conf, field_name)
    for section in ("formatters", "filters", "handlers"):
        for name, entry in (conf.get(section) or {}).items():
            where = f"{field_name}.{section}.{name}"
            if not isinstance(entry, dict):
                continue
            for key in ("class", "()"):
                if key in entry and entry[key] not in LOG_CLASSES:
                    shown = str(entry[key])[:120]
                    raise ConfigError(
                        f"{where}.{key}={shown!r} is not allowed: only logging's own handlers and formatters"
                    )
            if "." in entry:  # dictConfig sets these as attributes of what it built: a method replaced by a name
                raise ConfigError(f"{where}.'.' is not allowed: no attributes are set on logging's objects")
            if "filename" in entry:
                check_run_file(entry["filename"], f"{where}.filename")


def _check_log_names(node: Any, field_name: str) -> None:
    """dictConfig imports what an ``ext://`` value names, at any depth: only the standard streams; no ``_target_``."""
    if isinstance(node, dict):
        check_targets(node, field_name, frozenset())
        for key, value in node.items():
            _check_log_names(value, f"{field_name}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_log_names(value, f"{field_name}[{i}]")
    elif isinstance(node, str) and node.startswith("ext://") and node not in LOG_STREAMS:
        streams = " or ".join(sorted(LOG_STREAMS))
        raise ConfigError(f"{field_name}={node[:120]!r} is not allowed: only {streams}")


def check_run_file(value: Any, field_name: str) -> None:
    """A log file lies in the run's own folder (``${hydra.runtime.output_dir}/<name>``), no ``..`` in it."""
    value = str(value)
    for folder in (f"{RUN_MARK}/", "${hydra:runtime.output_dir}/"):
        if value.startswith(folder):
            check_relative_path(value[len(folder) :], field_name)
            return
    raise ConfigError(
        f"{field_name}={value[:120]!r} is outside the run's folder: write it as ${{hydra:runtime.output_dir}}/<name>"
    )


def check_env(env_set: dict[str, Any], copied: set[str]) -> None:
    for name, value in env_set.items():
        if name in copied and os.environ.get(name) == value:
            continue  # hydra.job.env_copy: this process's own value, passed on unchanged
        if not str(name).startswith(ENV_PREFIXES):
            shown = ", ".join(p + "*" if p.endswith("_") else p for p in ENV_PREFIXES)
            raise ConfigError(f"hydra.job.env_set.{name} is not allowed: a config may set only {shown}")


_UNSAFE_NAME = re.compile(r"[/\\\x00]|^\.{1,2}$|^~|(^|[/\\])\.\.($|[/\\])")


def check_folder_name(value: Any, field_name: str, optional: bool = False) -> None:
    """A name that becomes a folder stays one folder inside its parent: no separator, no ``..``, not empty."""
    if value is None and optional:
        return
    text = str(value)
    if not text.strip() or _UNSAFE_NAME.search(text) or ".." in text:
        raise ConfigError(f"{field_name}={text[:120]!r} is not a folder name (no '/', '\\', '..', not empty)")


def check_relative_path(value: Any, field_name: str) -> None:
    """A path that stays inside the folder it is relative to: not absolute, no ``..`` part."""
    if value is None:
        return
    text = str(value)
    if text.startswith(("/", "\\", "~")) or ".." in re.split(r"[/\\]", text):
        raise ConfigError(f"{field_name}={text[:120]!r} leads outside its folder (absolute, or with '..')")


def check_callback_paths(args: dict[str, Any], field_name: str, folders: Iterable[str | os.PathLike]) -> None:
    """A callback writes only into the run: its ``dirpath`` inside one of ``folders``, its ``filename`` relative."""
    dirpath = args.get("dirpath")
    if dirpath is not None:
        real = os.path.realpath(dirpath)
        inside = any(os.path.commonpath([real, os.path.realpath(f)]) == os.path.realpath(f) for f in folders)
        if not inside:
            raise ConfigError(f"{field_name}.dirpath={str(dirpath)[:120]!r} is outside the run's folder")
    check_relative_path(args.get("filename"), f"{field_name}.filename")


# What an override may remove (``~key``) besides anything under callbacks and hydra: the optional groups.
REMOVABLE = ("scheduler", "experiment")


def check_removals(overrides: Iterable[str]) -> None:
    """``~key`` removes a key: only those a run can do without, else one line naming it (not a failure later)."""
    for override in overrides:
        if not override.startswith("~"):
            continue
        key = override[1:].partition("=")[0].strip()
        head = key.partition(".")[0]
        if head in ("hydra", "callbacks") or key in REMOVABLE:
            continue
        raise ConfigError(
            f"{override!r}: {key} cannot be removed, a run needs it; set it instead ({key}=...). "
            "Removable: callbacks.<name>, callbacks, scheduler, experiment, hydra.*"
        )


# --------------------------------------------------------------------------- where Hydra composes
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


# Checks run on every composed config after the guard's own, handed in by install()'s caller: a search's direction
# (preflight.check_sweep_direction) must be refused where the sweep is composed, before its first trial.
_COMPOSED_CHECKS: list[Callable[[DictConfig], None]] = []


def install(*checks: Callable[[DictConfig], None]) -> None:
    """Check every config Hydra composes, in this process, before Hydra uses it (idempotent).

    Hydra has no hook between composing a config and building its callbacks, launcher, sweeper and
    logging from it, so the check wraps the one place every composition passes through: the config
    loader's ``load_configuration`` (the run's, ``--cfg``'s, and each sweep job's ``load_sweep_config``
    in a launcher's worker process, which imports this module to unpickle the task). A Hydra release
    that renames it fails ``tests/test_guard.py`` loudly.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import ConfigCompositionException

    _COMPOSED_CHECKS.extend(check for check in checks if check not in _COMPOSED_CHECKS)
    load = ConfigLoaderImpl.load_configuration
    if getattr(load, "bp_guarded", False):
        return

    @functools.wraps(load)
    def guarded(self: Any, config_name: str | None, overrides: list[str], *args: Any, **kwargs: Any) -> DictConfig:
        try:
            check_removals(overrides)
            cfg = load(self, config_name, overrides, *args, **kwargs)
            check_composed(cfg)
            for check in _COMPOSED_CHECKS:
                check(cfg)
        except ConfigError as exc:  # a composition error like Hydra's own: one line, exit 2
            raise ConfigCompositionException(str(exc)) from None
        return cfg

    guarded.bp_guarded = True  # type: ignore[attr-defined]
    ConfigLoaderImpl.load_configuration = guarded  # type: ignore[method-assign]
