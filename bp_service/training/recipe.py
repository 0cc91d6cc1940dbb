"""``bp-train``'s recipe: one configured training run, from config to tracked, tested, servable model.

:func:`train` reads like the README's "what a run does, in order"; each step below it is one
function, and the run's lifecycle (status, SIGTERM, SLURM) is :mod:`.lifecycle`'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bp_service.bundle import check_resumable
from bp_service.gradcheck import check_model
from bp_service.layers import MLP
from bp_service.training.artifacts import record_artifacts
from bp_service.training.checkpoints import (
    AtomicCheckpointIO,
    check_training_state,
    folder_held,
    read_checkpoint,
    resolve_resume,
    resume_run_id,
)
from bp_service.training.config import instantiate
from bp_service.training.data import BPDataModule, Prepared
from bp_service.training.data.datamodule import stepwise_callbacks
from bp_service.training.guard import check_callback_paths
from bp_service.training.lifecycle import Run, claim_node_rank, open_run, slurm_root
from bp_service.training.preflight import check_config, check_data, monitored_metric
from bp_service.training.tracking import Job, Tracker, best_name, dataset_name, flat_params

# Callbacks whose only output goes to the tracker (the learning-rate monitor even refuses to run without a logger).
REPORTING_CALLBACKS = ("learning_rate_monitor", "gradient_flow")


class GradcheckError(RuntimeError):
    """The hand-written backward disagrees with finite differences on this run's model."""


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; returns its metrics, paths and tracked run (:func:`tracked`). Raises on any failure."""
    started, hydra = time.perf_counter(), HydraConfig.get()
    check_config(cfg, hydra.overrides.task)  # 1. everything knowable before the data is read
    claim_node_rank(cfg.trainer)  # another node's process records nothing
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = BPDataModule(cfg.data, cfg.seed, stepwise_callbacks(cfg.callbacks))  # 2. load, split, scale
    datamodule.setup()
    data = datamodule.data
    cfg.model.loss = resolve_loss(cfg.model.loss, data.task)  # auto: what the task wants, recorded as such
    net = build_network(cfg.model.net, data, cfg.model.loss)  # 3. the network, its LightningModule and callbacks
    monitor, mode = monitored_metric(cfg.callbacks, data.task)
    check_data(cfg, data)
    module = build_module(cfg.model, cfg.optimizer, cfg.scheduler, net, data)
    resume = resolve_resume(cfg.ckpt_path, cfg.paths)  # 4. what to resume, checked before its run reopens
    ckpt_path, ckpt_dir = resume.path, resume.ckpt_dir
    if ckpt_path:
        check_resumable(read_checkpoint(ckpt_path), net, data.meta, ckpt_path)
        check_training_state(ckpt_path, module)
    root_dir, hpc_ckpt, plugins = slurm_root(cfg.slurm, cfg.paths, cfg.task_name)
    job = Job(
        cfg.task_name,
        dataset_name(cfg.data),
        list(hydra.overrides.task),
        device_of(cfg.trainer),
        resume_id=resume.run_id if ckpt_path else resume_run_id(str(hpc_ckpt) if hpc_ckpt else None),
        sweep_dir=hydra.sweep.dir if hydra.mode == RunMode.MULTIRUN else None,
        origin=resume.origin,
    )
    callbacks = build_callbacks(cfg.callbacks, monitor, mode, ckpt_dir, cfg.paths.output_dir)
    # 5. the run's record (MLflow), opened (or reopened) while this job alone writes into its checkpoint folder
    with folder_held(ckpt_dir), open_run(cfg.tracking, cfg.paths, job) as run:
        run.tracker.log_params(flat_params(cfg))  # the whole config, secrets left out
        module.meta["mlflow_run_id"] = run.tracker.run_id  # travels in checkpoints
        trainer = build_trainer(cfg.trainer, run.tracker, callbacks, root_dir, plugins)
        gradient_check(trainer, net, cfg.model.loss, run.tracker, cfg.tracking.gradcheck)  # 6. backward vs differences
        run.fit(trainer, module, datamodule, ckpt_path, ckpt_dir)  # 7. fit
        stopping = how_it_stopped(trainer, callbacks.get("early_stopping"))  # before test() restores older state
        result = test_best(run, trainer, module, datamodule, ckpt_dir, monitor)  # 8. test the best checkpoint
        result["stopping"] = stopping
        result["global_step"] = trainer.global_step  # where the run's last metrics are: the model's own
        if result["best_score"] is not None and trainer.logger is not None:  # beside val/acc's last epoch
            trainer.logger.log_metrics({best_name(monitor): result["best_score"]}, step=trainer.global_step)
        # 9. config, pictures, checkpoint pointer and the servable model
        record_artifacts(cfg, run.tracker, module, data, result, callbacks.get("gradient_flow"))
    return {
        **result,
        **tracked(run.tracker),
        "output_dir": cfg.paths.output_dir,
        "wall_time_s": time.perf_counter() - started,
    }


def resolve_loss(loss: str, task: str) -> str:
    """``model.loss``: ``auto`` is cross-entropy for classification, squared error for regression."""
    loss = str(loss)
    if loss == "auto":
        return "cross_entropy" if task == "classification" else "mse"
    return loss


def build_network(net: DictConfig, data: Prepared, loss: str = "auto") -> MLP:
    """``model.net`` for this data: sizes ``[n_features, *hidden, n_outputs]``, and an ``auto`` output
    activation chosen by task and cost: for classification softmax probabilities with cross-entropy
    (a sigmoid for one output), sigmoid scores with mse or l1 (the worked example's); linear for regression."""
    args = OmegaConf.to_container(net, resolve=True)
    hidden = args.pop("hidden")
    if args.get("output_activation") == "auto":
        loss = resolve_loss(loss, data.task)
        if data.task != "classification":
            args["output_activation"] = None
        else:
            several = data.n_outputs > 1 and loss == "cross_entropy"
            args["output_activation"] = "softmax" if several else "sigmoid"
    return instantiate({**args, "sizes": [data.n_features, *hidden, data.n_outputs]}, "model.net")


def device_of(trainer: DictConfig) -> str:
    """What ``trainer`` trains on: ``cuda`` or ``cpu``."""
    accelerator = trainer.accelerator
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "cuda" if cuda else "cpu"


def build_module(
    model: DictConfig, optimizer: DictConfig, scheduler: DictConfig | None, net: MLP, data: Prepared
) -> pl.LightningModule:
    """``model`` (the LightningModule) around ``net``, with ``optimizer`` and ``scheduler`` as factories."""
    args = {k: v for k, v in OmegaConf.to_container(model, resolve=True).items() if k != "net"}
    args["loss"] = resolve_loss(args.get("loss", "auto"), data.task)
    schedule = None
    if scheduler is not None:
        schedule = {
            "scheduler": instantiate(scheduler.scheduler, "scheduler.scheduler"),
            "interval": scheduler.interval,
        }
    return instantiate(
        args,
        "model",
        net=net,
        optimizer=instantiate(optimizer, "optimizer"),
        scheduler=schedule,
        task=data.task,
        meta=data.meta,
    )


def build_callbacks(
    callbacks: DictConfig, monitor: str, mode: str, ckpt_dir: Path, output_dir: str
) -> dict[str, pl.Callback]:
    """``callbacks``, each instantiated with what only the run knows: the metric to follow and where
    checkpoints go (a resumed run keeps writing to its own folder)."""
    runtime = {
        "model_checkpoint": {"monitor": monitor, "mode": mode, "dirpath": str(ckpt_dir)},
        "last_checkpoint": {"dirpath": str(ckpt_dir)},
        "early_stopping": {"monitor": monitor, "mode": mode},
    }
    stop = callbacks.get("early_stopping")
    if stop is not None and stop.get("monitor", "auto") != "auto":  # its own metric: its mode follows the name
        runtime["early_stopping"] = {"mode": "max" if str(stop.monitor).endswith("acc") else "min"}
    built = {}
    for name, node in callbacks.items():
        if node is None:
            continue
        args = {**OmegaConf.to_container(node, resolve=True), **runtime.get(name, {})}
        check_callback_paths(args, f"callbacks.{name}", (output_dir, ckpt_dir))
        built[name] = instantiate(args, f"callbacks.{name}")
    return built


def build_trainer(
    trainer: DictConfig, tracker: Tracker, callbacks: dict[str, pl.Callback], root_dir: str, plugins: list[Any]
) -> pl.Trainer:
    """``trainer``, with the run's callbacks and the tracker's logger and callbacks."""
    trainer_args = {k: v for k, v in OmegaConf.to_container(trainer, resolve=True).items() if v is not None}
    trainer_args.setdefault("deterministic", device_of(trainer) == "cpu")
    return pl.Trainer(
        **trainer_args,
        logger=tracker.trainer_logger,
        callbacks=trainer_callbacks(trainer, tracker, callbacks) + tracker.trainer_callbacks,
        plugins=[AtomicCheckpointIO(), *plugins],
        default_root_dir=root_dir,
    )


def trainer_callbacks(trainer: DictConfig, tracker: Tracker, callbacks: dict[str, pl.Callback]) -> list[pl.Callback]:
    """The callbacks the Trainer runs: those that only report need a tracker that keeps what they log, and the
    Trainer's switches still turn the configured bar and summary off (Lightning refuses a bar with the flag off)."""
    switched_off = []
    if not trainer.enable_progress_bar:
        switched_off.append(pl.callbacks.ProgressBar)
    if not trainer.enable_model_summary:
        switched_off.append(pl.callbacks.ModelSummary)
    return [
        c
        for name, c in callbacks.items()
        if (tracker.records or name not in REPORTING_CALLBACKS) and not isinstance(c, tuple(switched_off))
    ]


def gradient_check(trainer: pl.Trainer, net: MLP, loss: str, tracker: Tracker, enabled: bool = True) -> None:
    """Before training (when ``enabled``: ``tracking.gradcheck``): the hand-written backward of every layer type
    this network uses with ``loss``, on float64 slices."""
    if not (trainer.is_global_zero and enabled):
        return
    report = check_model(net, loss)
    tracker.log_dict(report, "gradcheck.json")
    if not report["passed"]:
        bad = [e["layer"] + ":" + e["function"] for e in report["layers"] if not e["passed"]]
        raise GradcheckError(f"gradient check failed before training for {', '.join(bad)}")


def how_it_stopped(trainer: pl.Trainer, early_stopping: pl.Callback | None) -> dict[str, Any]:
    """How many epochs ran, and why they ended: early stopping (its metric stopped improving), or the epoch cap
    while it was still improving (``still_improving``: the cap, not convergence, ended the run)."""
    epochs, cap = trainer.current_epoch, trainer.max_epochs
    report: dict[str, Any] = {"epochs": epochs, "max_epochs": cap, "early_stopped": False, "still_improving": False}
    if isinstance(early_stopping, pl.callbacks.EarlyStopping):
        best, stopped = early_stopping.best_score, early_stopping.stopped_epoch > 0
        capped = cap is not None and cap > 0 and epochs >= cap
        report.update(
            monitor=early_stopping.monitor,
            best=float(best) if best is not None and torch.isfinite(best) else None,
            early_stopped=stopped,
            # Lightning's wait_count: epochs since the last improvement, still short of the patience at the cap.
            still_improving=capped and not stopped and early_stopping.wait_count < early_stopping.patience,
        )
    return report


def test_best(run: Run, trainer: pl.Trainer, module, datamodule, ckpt_dir: Path, monitor: str) -> dict[str, Any]:
    """Test metrics of the best checkpoint, and where the checkpoints are."""
    checkpoint = trainer.checkpoint_callback
    # Read before test(): restoring the best checkpoint also restores this callback's older state.
    best = (checkpoint.best_model_path or None) if checkpoint else None
    if best and Path(best).parent.resolve() != ckpt_dir.resolve():  # restored from another folder: not this run's
        best = None
    best_score = checkpoint.best_model_score if checkpoint else None
    last = ckpt_dir / "last.ckpt"
    return {
        "metrics": run.test(trainer, module, datamodule, best),
        "best_checkpoint": best,
        "last_checkpoint": str(last) if last.is_file() else None,
        "monitor": monitor,
        "best_score": float(best_score) if best_score is not None else None,
    }


def tracked(tracker: Tracker) -> dict[str, Any]:
    """Where the run is recorded, for the summary: each None when untracked."""
    return {
        "tracker": tracker.name,
        "run_id": tracker.run_id,
        "experiment": tracker.experiment,
        "tracking_uri": tracker.uri,
        "dashboard": tracker.link(),
        "tracking_lost": tracker.lost,  # read after the run closed: its last write may have failed too
    }
