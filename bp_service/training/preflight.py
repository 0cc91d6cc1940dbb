"""Checks that must pass before an MLflow run is opened: what the schema and ``validate`` cannot see.

Each raises :class:`~bp_service.training.config.ConfigError` (exit 2, nothing run) with one line naming the field:
keys added with ``+`` that the schema does not know, non-finite numbers, the seed's range, a precision
Lightning does not know (or one that needs CUDA on a run that trains on the CPU), an accelerator this machine
does not have, generated data or hidden widths beyond this machine's memory, a monitored metric no run logs,
and ``data.features`` that name the target or repeat a column.

:func:`precheck` runs first, before bp-train imports torch, Lightning or MLflow (this module imports none of
them at import time): every problem of the config's fields, of a CSV's data and of a ``ckpt_path`` that names no
file, found at once, in one error. Then :func:`check_server_answers`: a tracking server that refuses the connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import socket
import threading
import typing
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from omegaconf import DictConfig, OmegaConf

# ACTIVATIONS: the names of bp_service.layers.OUTPUT_ACTIVATIONS, without importing torch.
from bp_service.activations import ACTIVATIONS as OUTPUT_ACTIVATIONS
from bp_service.activations import CROSS_ENTROPY_OUTPUTS
from bp_service.tables import DataError, several
from bp_service.training.config import (
    AdamConfig,
    ConfigError,
    SchedulerConfig,
    SGDConfig,
    TrainConfig,
)
from bp_service.training.data import build_source
from bp_service.training.guard import OPTUNA_SWEEPER, check_targets
from bp_service.training.resume import checkpoint_file, claim_checkpoint_folder
from bp_service.training.spelling import nearest_keys
from bp_service.training.tracking.interface import TrackingError, another_rank
from bp_service.training.tracking.names import resolve_uri

SEED_MAX = 2**32 - 1  # what numpy's and Lightning's seeding accept
CONFIG_GROUPS = ("data", "model", "optimizer", "scheduler", "callbacks", "trainer", "experiment", "hparams_search")


def _precisions() -> tuple[str, ...]:
    from lightning.fabric.plugins.precision import precision

    names = typing.get_args(precision._PRECISION_INPUT_STR) + typing.get_args(precision._PRECISION_INPUT_STR_ALIAS)
    ints = typing.get_args(precision._PRECISION_INPUT_INT)
    return tuple(dict.fromkeys(str(n) for n in (*names, *ints)))


def _schema_has(schema: Any, parts: list[str], cfg: DictConfig) -> bool:
    """Whether ``a.b.c`` is a field of the typed schema (optimizer and scheduler: of the chosen group's)."""
    if not parts:
        return True
    if schema is SchedulerConfig and parts[0] == "scheduler":
        return True  # the scheduler's own keyword arguments: checked by the scheduler class
    if not dataclasses.is_dataclass(schema):
        return False
    fields = {f.name: f for f in dataclasses.fields(schema)}
    name = parts[0]
    if schema is TrainConfig and name == "optimizer":
        target = str(cfg.optimizer.get("_target_", "")) if cfg.get("optimizer") else ""
        return _schema_has(AdamConfig if target.endswith("Adam") else SGDConfig, parts[1:], cfg)
    if schema is TrainConfig and name == "data":
        return _schema_has(OmegaConf.get_type(cfg.data), parts[1:], cfg)  # the chosen option's schema
    if schema is TrainConfig and name == "scheduler":
        return _schema_has(SchedulerConfig, parts[1:], cfg)
    if schema is TrainConfig and name == "callbacks":
        return True  # each callback's own keyword arguments: checked by its class
    if name not in fields:
        return False
    default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
    return _schema_has(type(default) if default is not None else None, parts[1:], cfg)


def added_key_problems(overrides: Iterable[str], cfg: DictConfig) -> list[str]:
    """``+key=value`` adds keys past the schema's closed set: those the schema does not know, one line each."""
    found = []
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").partition("=")[0].strip()
        if key.startswith("hydra.") or (key.split("/")[0].split("@")[0] in CONFIG_GROUPS and "." not in key):
            continue  # a Hydra setting, or a config group choice such as +experiment=digits
        if not _schema_has(TrainConfig, key.split("."), cfg):
            close = nearest_keys(key, cfg)
            hint = f"did you mean {close[0]!r}?" if close else "check its spelling"
            found.append(f"unknown key {key!r} (from {override!r}): not in the config schema; {hint}")
    return found


def check_added_keys(overrides: Iterable[str], cfg: DictConfig) -> None:
    """``+key=value`` adds keys past the schema's closed set: refuse those the schema does not know."""
    found = added_key_problems(overrides, cfg)
    if found:
        raise ConfigError(several(found))


def _finite(value: Any, name: str, found: list[str]) -> bool:
    if isinstance(value, int | float) and not math.isfinite(value):
        found.append(f"{name} must be a finite number, got {value}")
        return False
    return True


def config_problems(cfg: DictConfig, overrides: Iterable[str] = ()) -> list[str]:
    """Every problem of the config's own fields, one line each, found without torch, Lightning or the data:
    keys added with ``+``, ranges, cross-field rules, the data source's fields."""
    found = added_key_problems(overrides, cfg)
    if any(problem.startswith("unknown key 'data.") for problem in found):
        return found  # the data source would be built with it, and refuse it less clearly
    _validate(cfg, found)
    if not 0 <= cfg.seed <= SEED_MAX:
        found.append(f"seed must be in [0, {SEED_MAX}], got {cfg.seed}")
    for key, value in cfg.optimizer.items():
        if key == "betas":
            betas = [beta for beta in value if _finite(beta, "optimizer.betas", found)]
            if not all(0 <= beta < 1 for beta in betas):
                found.append(f"optimizer.betas must be in [0, 1), got {list(value)}")
        else:
            _finite(value, f"optimizer.{key}", found)
    for key, value in cfg.trainer.items():
        _finite(value, f"trainer.{key}", found)
    return list(dict.fromkeys(found))  # a non-finite value can fail its range check too: said once


def precheck(cfg: DictConfig, overrides: Iterable[str] = ()) -> None:
    """What bp-train refuses before it imports torch, Lightning or MLflow: every problem of the config's fields
    and of the data source's own data (a CSV's columns, rows and cells), all of them in one error.

    A ``ckpt_path`` that names no file (``last`` with no earlier run of the same overrides) is one of them, and a
    ``paths.ckpt_dir`` that holds another run's checkpoints.

    Raises DataError when the data has a problem (else ConfigError): both exit 2, naming each field, column and row.
    """
    found = config_problems(cfg, overrides)
    data_found: list[str] = []
    if not any(problem.startswith("data") for problem in found):  # a data source that could be built
        source = build_source(cfg.data)
        data_found = source.problems()
    try:
        if cfg.ckpt_path is not None:
            checkpoint_file(cfg.ckpt_path)  # read and checked after the imports, where torch can load it
        else:  # a resume may continue in its own run's folder: which one is known once the file is read
            claim_checkpoint_folder(cfg.paths.ckpt_dir, cfg.paths.output_dir, create=False)  # claimed by the run
    except (FileNotFoundError, FileExistsError) as exc:
        found.append(str(exc))
    if found or data_found:
        message = several([*data_found, *found], source.label if data_found else None)
        raise (DataError if data_found else ConfigError)(message)


def check_server_answers(tracking: DictConfig, paths: DictConfig) -> None:
    """A required tracking server that refuses the connection on every address of its host, or whose host name
    has no address, stops the run here, in about a second: MLflow's own check (``store.check_reachable``) runs in
    the tracking process and is answered after bp-train's imports, seconds later. What is less certain (a name
    server or a handshake slower than a second, a proxy in the way) is left to it, as are other ranks of a
    distributed run, which never talk to the store.

    Raises TrackingError (exit 1, as from MLflow's check)."""
    if not tracking.enabled or not tracking.required or another_rank():
        return
    uri = resolve_uri(tracking, paths)
    server = urlsplit(uri)
    if server.scheme not in ("http", "https") or not server.hostname:
        return
    proxies = getproxies()
    if (proxies.get(server.scheme) or proxies.get("all")) and not proxy_bypass(server.hostname):
        return  # MLflow's requests go through the proxy
    try:
        port = server.port or (443 if server.scheme == "https" else 80)
    except ValueError:
        return  # MLflow's check names it
    addresses = _addresses(server.hostname, port)
    if isinstance(addresses, socket.gaierror):
        raise TrackingError.unreachable(uri, f"no host named {server.hostname!r}")
    if addresses and all(_refuses(address) for address in addresses):
        raise TrackingError.unreachable(uri, f"{server.hostname}:{port} refused the connection")


def _addresses(host: str, port: int, within: float = 1.0) -> list[tuple] | socket.gaierror | None:
    """The host's addresses, its name server's "no such name", or None: no answer ``within`` seconds, or another
    failure (a name server that did not answer may answer MLflow's check). The lookup has no time-out of its own:
    it runs in a thread left to finish on its own."""
    found: list = []

    def look_up() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except socket.gaierror as exc:
            found.append(exc if exc.errno == socket.EAI_NONAME else None)
        except (OSError, UnicodeError):
            found.append(None)

    lookup = threading.Thread(target=look_up, name="bp-train server lookup", daemon=True)
    lookup.start()
    lookup.join(within)
    return found[0] if found else None


def _refuses(address: tuple, within: float = 1.0) -> bool:
    """Whether the address refuses a TCP handshake (nothing listens there); False when it answers, or is slower
    than ``within`` seconds or unreachable otherwise (MLflow's check, with its own time-out, decides those)."""
    family, kind, proto, _, socket_address = address
    with socket.socket(family, kind, proto) as probe:
        probe.settimeout(within)
        try:
            probe.connect(socket_address)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def check_config(cfg: DictConfig, overrides: Iterable[str] = ()) -> None:
    """Everything about the config and this machine that can be known before the data is read."""
    import torch

    found = config_problems(cfg, overrides)
    if found:
        raise ConfigError(several(found))
    precision = str(cfg.trainer.precision)
    if precision not in _precisions():
        raise ConfigError(f"trainer.precision must be one of {', '.join(_precisions())}, got {precision!r}")
    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA device; use trainer=cpu or trainer=default"
        )
    check_cpu_precision(precision, accelerator)
    check_memory(cfg)


# Lightning's strategies whose processes start from inside the running command (ddp_spawn, ddp_fork, ddp_notebook and
# their variants), rather than as the same command started again (ddp).
IN_PROCESS_LAUNCHES = ("spawn", "fork", "notebook")
# What Lightning runs on the CPU as configured. It turns 16-mixed into bf16-mixed with only a warning (the run's
# params still say 16-mixed), and 16-true's float16 weights diverge within steps.
CPU_PRECISIONS = ("bf16-mixed", "bf16-true", "32-true", "64-true", "bf16", "32", "64")


def check_cpu_precision(precision: str, accelerator: str) -> None:
    """A precision that needs CUDA (float16, Transformer Engine) refused when the run trains on the CPU."""
    import torch

    gpu_here = torch.cuda.is_available() or torch.backends.mps.is_available()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu_here)
    if on_cpu and precision not in CPU_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} needs a CUDA device; on the CPU use bf16-mixed, 32-true or 64-true"
        )


def check_monitor(cfg: DictConfig, task: str) -> None:
    """The metric checkpoints (and early stopping) follow must be one a run of this task logs."""
    logged = ["val/loss", "train/loss"] + (["val/acc"] if task == "classification" else ["val/rmse", "val/mae"])
    checkpoint = cfg.callbacks.get("model_checkpoint")
    monitor = checkpoint.get("monitor", "auto") if checkpoint else "auto"
    if monitor != "auto" and monitor not in logged:
        raise ConfigError(
            f"callbacks.model_checkpoint.monitor must be auto or one of {', '.join(logged)} for {task}, got {monitor!r}"
        )


def world_size(cfg: DictConfig) -> int:
    """How many processes will train, as far as the config says (``devices="auto"``: one per GPU, else one)."""
    import torch

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


def check_data(cfg: DictConfig, data) -> None:
    """What needs the data: a metric this task logs, a cost for its targets, and a training row for every process."""
    check_monitor(cfg, data.task)
    if str(cfg.model.loss) == "cross_entropy" and data.task != "classification":
        raise ConfigError(f"model.loss=cross_entropy needs classification data; this data's task is {data.task}")
    check_rows(cfg, len(data.x["train"]), data.source)


# --------------------------------------------------------------------------- hyperparameter search
DIRECTIONS = {"max": "maximize", "min": "minimize"}


def monitored_metric(callbacks: DictConfig, task: str) -> tuple[str, str]:
    """(metric, mode) that checkpoints, early stopping and a search follow; ``auto``: val/acc or val/loss by task."""
    monitor = callbacks.model_checkpoint.monitor if "model_checkpoint" in callbacks else "auto"
    if monitor == "auto":
        monitor = "val/acc" if task == "classification" else "val/loss"
    return monitor, "max" if monitor.endswith("acc") else "min"


def check_sweep_direction(cfg: DictConfig) -> None:
    """An Optuna search (``hparams_search=optuna``) optimizes what each trial returns, its monitored metric's
    best value: its ``hydra.sweeper.direction`` must be that metric's mode (val/acc maximize, val/loss minimize),
    checked wherever Hydra composes a config with that sweeper, so before the first trial. A task only the data
    can tell (``auto``) is read from the data; data that cannot be read is left for the trial to report."""
    sweeper = (cfg.get("hydra") or {}).get("sweeper")
    if not sweeper or sweeper.get("_target_") != OPTUNA_SWEEPER:
        return
    direction = sweeper.get("direction")
    direction = getattr(direction, "name", direction)  # the sweeper's schema default is its Direction enum
    if not isinstance(direction, str):  # several objectives: bp-train's trials return one number
        raise ConfigError(f"hydra.sweeper.direction must be maximize or minimize, got {direction}")
    task = str(cfg.data.get("task", "auto"))
    if task == "auto":
        try:
            source = build_source(cfg.data)
            regression = getattr(source, "regression", None)  # generated data knows without generating it
            if regression is None:
                task = source.load(cfg.seed).task
            else:
                task = "regression" if regression else "classification"
        except Exception:  # the trial reports bad data in its own words
            return
    monitor, mode = monitored_metric(cfg.callbacks, task)
    if direction.lower() != DIRECTIONS[mode]:
        raise ConfigError(
            f"hydra.sweeper.direction={direction} but the trials return {monitor}, which is best at its "
            f"{'largest' if mode == 'max' else 'smallest'}: set hydra.sweeper.direction={DIRECTIONS[mode]}"
        )


# --------------------------------------------------------------------------- memory
# Bytes a parameter takes, by precision (mixed precisions keep float32 weights).
PARAM_BYTES = {"64-true": 8, "64": 8, "16-true": 2, "bf16-true": 2}


def _model_bytes(cfg: DictConfig) -> tuple[str, int, str]:
    """At least what the network takes: its weights (inputs and outputs counted as the data's, or 1 where
    only the data knows), their gradients and the optimizer's state, and one batch's activations."""
    d, hidden = cfg.data, [int(w) for w in cfg.model.net.hidden]
    n_inputs, n_outputs = build_source(d).widths()
    sizes = [n_inputs, *hidden, n_outputs]
    weights = sum(a * b for a, b in pairwise(sizes))
    target = str(cfg.optimizer.get("_target_", ""))
    states = 2 if target.endswith("Adam") else int(cfg.optimizer.get("momentum", 0) > 0)
    size = PARAM_BYTES.get(str(cfg.trainer.precision), 4)
    activations = 2 * size * d.batch_size * sum(hidden)  # each layer's output and its gradient
    return (
        f"model.net.hidden={hidden}",
        weights * size * (2 + states) + activations,
        "weights, gradients, optimizer state",
    )


def available_memory() -> int | None:
    """Bytes this process could have now: the kernel's MemAvailable (reclaimable cache counts as free), within
    its cgroup's limit (a container's); None where neither is known."""
    limits = _cgroup_limits()
    with contextlib.suppress(OSError, TypeError):
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        limits.append(int(found[1]) * 1024)
    return min(limits) if limits else None


def _cgroup_limits(root: Path = Path("/sys/fs/cgroup")) -> list[int]:
    """The memory limit of this process's cgroup: v2 ``memory.max``, v1 ``memory.limit_in_bytes``."""
    limits = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                files = [root / path.lstrip("/") / "memory.max", root / "memory.max"]
            elif "memory" in controllers.split(","):
                files = [
                    root / "memory" / path.lstrip("/") / "memory.limit_in_bytes",
                    root / "memory/memory.limit_in_bytes",
                ]
            else:
                continue
            for file in files:
                with contextlib.suppress(OSError, ValueError):  # "max": no limit
                    limits.append(int(file.read_text()))
                    break
    return limits


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n < 10 and unit != "bytes" else f"{n:,.0f} {unit}"
        n /= 1024
    raise AssertionError


def check_memory(cfg: DictConfig) -> None:
    """Sizes the machine cannot hold, refused before anything is allocated, naming the fields that ask for it.

    The estimates are lower bounds: a refused run could not have fitted; one let through may still not.
    """
    have = available_memory()
    parts = [part for part in (build_source(cfg.data).memory_need(), _model_bytes(cfg)) if part]
    need = sum(n for _, n, _ in parts)
    if have is None or need <= have:
        return
    named = [f"{label} needs at least {_size(n)} ({what})" for label, n, what in parts if n >= need / 100]
    together = " together" if len(named) > 1 else ""
    raise ConfigError(f"{'; '.join(named)}:{together} more memory than the {_size(have)} this machine has available")


# --------------------------------------------------------------------------- ranges and cross-field rules
def _require(found: list[str], ok: bool, message: str) -> None:
    if not ok:
        found.append(message)


def _validate_data(d: DictConfig, found: list[str]) -> None:
    """The split and loader settings; the source's own fields are checked by its constructor."""
    # before the ranges: inf passes "noise >= 0" and reaches scikit-learn
    finite = [_finite(d[key], f"data.{key}", found) for key in d if not OmegaConf.is_missing(d, key)]
    if all(finite):
        try:
            build_source(d)
        except ConfigError as exc:
            found.append(str(exc))
    for name in ("val_size", "test_size"):
        value = d[name]
        _require(found, 0 < value < 1, f"data.{name} must be in (0, 1), got {value}")
    _require(
        found,
        d.val_size + d.test_size < 1,
        f"data.val_size + data.test_size must be < 1, got {d.val_size + d.test_size}",
    )
    _require(found, d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    k = d.steps_per_execution
    _require(
        found,
        k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
        f"data.steps_per_execution must be auto or an integer >= 1, got {k!r}",
    )


def validate(cfg: DictConfig) -> None:
    """Range and cross-field checks; raises ConfigError naming every bad field."""
    found: list[str] = []
    _validate(cfg, found)
    if found:
        raise ConfigError(several(found))


def _validate(cfg: DictConfig, found: list[str]) -> None:
    """:func:`validate`'s checks, each bad field's one line added to ``found``."""
    m, o, t = cfg.model, cfg.optimizer, cfg.trainer
    _validate_data(cfg.data, found)
    n = m.net
    _require(found, len(n.hidden) >= 1, "model.net.hidden must list at least one hidden width, got []")
    for width in n.hidden:
        _require(found, width > 0, f"model.net.hidden widths must be > 0, got {list(n.hidden)}")
    _require(
        found,
        n.output_activation in (None, "auto", *OUTPUT_ACTIVATIONS),
        f"model.net.output_activation must be auto, null or one of {', '.join(OUTPUT_ACTIVATIONS)}, "
        f"got {n.output_activation!r}",
    )
    _require(
        found,
        str(m.loss) != "cross_entropy" or n.output_activation in ("auto", *CROSS_ENTROPY_OUTPUTS),
        f"model.loss=cross_entropy needs model.net.output_activation auto or one of "
        f"{', '.join(CROSS_ENTROPY_OUTPUTS)}, got {n.output_activation!r}",
    )
    try:
        check_targets(cfg)  # before anything is imported or built
    except ConfigError as exc:
        found.append(str(exc))
    _require(found, o.lr > 0, f"optimizer.lr must be > 0, got {o.lr:g}")
    _require(found, o.get("weight_decay", 0) >= 0, f"optimizer.weight_decay must be >= 0, got {o.get('weight_decay')}")
    if "momentum" in o:
        _require(found, 0 <= o.momentum < 1, f"optimizer.momentum must be in [0, 1), got {o.momentum}")

    _require(found, t.max_epochs >= 1, f"trainer.max_epochs must be >= 1, got {t.max_epochs}")
    _require(found, t.num_nodes >= 1, f"trainer.num_nodes must be >= 1, got {t.num_nodes}")
    _require(found, t.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {t.log_every_n_steps}")
    _require(
        found,
        not any(launch in str(t.strategy) for launch in IN_PROCESS_LAUNCHES),
        f"trainer.strategy={t.strategy}: the processes Lightning forks or spawns from inside bp-train hand back only "
        "their weights, not the run's epochs, metrics and pictures; use trainer.strategy=ddp (each process runs "
        "bp-train, see Scaling out)",
    )
    c = cfg.callbacks
    every = c.last_checkpoint.get("every_n_train_steps") if c.get("last_checkpoint") else None
    _require(
        found, every is None or every >= 1, f"callbacks.last_checkpoint.every_n_train_steps must be >= 1, got {every}"
    )
    top_k = c.model_checkpoint.get("save_top_k", 1) if c.get("model_checkpoint") else 1
    _require(found, top_k >= -1, f"callbacks.model_checkpoint.save_top_k must be >= -1, got {top_k}")
    patience = c.early_stopping.get("patience", 1) if c.get("early_stopping") else 1
    _require(found, patience >= 1, f"callbacks.early_stopping.patience must be >= 1, got {patience}")
    _require(found, bool(cfg.tracking.experiment), "tracking.experiment must not be empty")
    _require(
        found,
        isinstance(getattr(signal, cfg.slurm.requeue_signal, None), signal.Signals),
        f"slurm.requeue_signal must be a signal name such as SIGUSR1, got {cfg.slurm.requeue_signal!r}",
    )
