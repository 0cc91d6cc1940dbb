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
    folder_held,
    read_checkpoint,
    resolve_resume,
    resume_run_id,
)
from bp_service.training.config import instantiate
from bp_service.training.data import BPDataModule, Prepared
from bp_service.training.guard import check_callback_paths
from bp_service.training.lifecycle import Run, open_run, slurm_root, tracks
from bp_service.training.preflight import check_config, check_data
from bp_service.training.tracking import Tracker

# Callbacks whose only output goes to the tracker (the learning-rate monitor even refuses to run without one).
REPORTING_CALLBACKS = ("learning_rate_monitor", "gradient_flow")


class GradcheckError(RuntimeError):
    """The hand-written backward disagrees with finite differences on this run's model."""


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; returns its metrics, paths and MLflow run id. Raises on any failure."""
    started, hydra = time.perf_counter(), HydraConfig.get()
    check_config(cfg, hydra.overrides.task)  # 1. everything knowable before the data is read
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = BPDataModule(cfg.data, cfg.seed)  # 2. load, split (seeded, stratified), scale on train
    datamodule.setup()
    data = datamodule.data
    net = build_network(cfg.model.net, data)  # 3. the network, its LightningModule and callbacks
    monitor, mode = monitored_metric(cfg, data.task)
    check_data(cfg, data)
    module = build_module(cfg, net, data)
    resume = resolve_resume(cfg)  # 4. what to resume, checked before its run reopens, and where to write
    ckpt_path, ckpt_dir = resume.path, resume.ckpt_dir
    if ckpt_path:
        check_resumable(read_checkpoint(ckpt_path), net, data.meta, ckpt_path)
    root_dir, hpc_ckpt, plugins = slurm_root(cfg)
    sweep_dir = hydra.sweep.dir if hydra.mode == RunMode.MULTIRUN else None
    resume_id = resume.run_id if ckpt_path else resume_run_id(str(hpc_ckpt) if hpc_ckpt else None)
    callbacks = build_callbacks(cfg, monitor, mode, ckpt_dir, tracked=tracks(cfg))
    # 5. the MLflow run, opened (or reopened) while this job alone writes into its checkpoint folder
    overrides = list(hydra.overrides.task)
    with folder_held(ckpt_dir), open_run(cfg, overrides, device_of(cfg), resume_id, sweep_dir, resume.origin) as run:
        module.meta["mlflow_run_id"] = run.tracker.run_id if run.tracker else None  # travels in checkpoints
        trainer = build_trainer(cfg, run, callbacks, root_dir, plugins)
        gradient_check(cfg, trainer, net, run.tracker)  # 6. the hand-written backward vs finite differences
        run.fit(trainer, module, datamodule, ckpt_path, ckpt_dir)  # 7. fit
        result = test_best(run, trainer, module, datamodule, ckpt_dir, monitor)  # 8. test the best checkpoint
        if run.tracker:  # 9. config, pictures, checkpoint pointer and the servable model
            record_artifacts(cfg, run.tracker, module, data, result, callbacks.get("gradient_flow"))
    result["output_dir"] = cfg.paths.output_dir
    result["wall_time_s"] = time.perf_counter() - started
    result["tracking_lost"] = run.tracker.logger.lost if run.tracker else None
    return result


def build_network(net: DictConfig, data: Prepared) -> MLP:
    """``model.net`` for this data: sizes ``[n_features, *hidden, n_outputs]``, and an ``auto`` output
    activation chosen by task (sigmoid scores for classification, linear for regression)."""
    args = OmegaConf.to_container(net, resolve=True)
    hidden = args.pop("hidden")
    if args.get("output_activation") == "auto":
        args["output_activation"] = "sigmoid" if data.task == "classification" else None
    return instantiate({**args, "sizes": [data.n_features, *hidden, data.n_outputs]}, "model.net")


def monitored_metric(cfg: DictConfig, task: str) -> tuple[str, str]:
    """(metric, mode) that checkpoints and early stopping follow; ``auto``: val/acc or val/loss by task."""
    monitor = cfg.callbacks.model_checkpoint.monitor if "model_checkpoint" in cfg.callbacks else "auto"
    if monitor == "auto":
        monitor = "val/acc" if task == "classification" else "val/loss"
    return monitor, "max" if monitor.endswith("acc") else "min"


def device_of(cfg: DictConfig) -> str:
    accelerator = cfg.trainer.accelerator
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "cuda" if cuda else "cpu"


def build_module(cfg: DictConfig, net: MLP, data: Prepared) -> pl.LightningModule:
    """``model`` (the LightningModule) around ``net``, with ``optimizer`` and ``scheduler`` as factories."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "net"}
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = {
            "scheduler": instantiate(cfg.scheduler.scheduler, "scheduler.scheduler"),
            "interval": cfg.scheduler.interval,
        }
    return instantiate(
        model,
        "model",
        net=net,
        optimizer=instantiate(cfg.optimizer, "optimizer"),
        scheduler=scheduler,
        task=data.task,
        meta=data.meta,
    )


def build_callbacks(cfg: DictConfig, monitor: str, mode: str, ckpt_dir: Path, tracked: bool) -> dict[str, pl.Callback]:
    """``callbacks``, each instantiated with what only the run knows: the metric to follow and where
    checkpoints go (a resumed run keeps writing to its own folder)."""
    runtime = {
        "model_checkpoint": {"monitor": monitor, "mode": mode, "dirpath": str(ckpt_dir)},
        "last_checkpoint": {"dirpath": str(ckpt_dir)},
        "early_stopping": {"monitor": monitor, "mode": mode},
    }
    callbacks = {}
    for name, node in cfg.callbacks.items():
        if node is None or (name in REPORTING_CALLBACKS and not tracked):
            continue
        args = {**OmegaConf.to_container(node, resolve=True), **runtime.get(name, {})}
        check_callback_paths(args, f"callbacks.{name}", (cfg.paths.output_dir, ckpt_dir))
        callbacks[name] = instantiate(args, f"callbacks.{name}")
    # The Trainer's switches still turn the configured bar and summary off (Lightning refuses a bar with the flag off).
    switched_off = []
    if not cfg.trainer.enable_progress_bar:
        switched_off.append(pl.callbacks.ProgressBar)
    if not cfg.trainer.enable_model_summary:
        switched_off.append(pl.callbacks.ModelSummary)
    return {name: c for name, c in callbacks.items() if not isinstance(c, tuple(switched_off))}


def build_trainer(
    cfg: DictConfig, run: Run, callbacks: dict[str, pl.Callback], root_dir: str, plugins: list[Any]
) -> pl.Trainer:
    trainer_args = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
    trainer_args.setdefault("deterministic", device_of(cfg) == "cpu")
    return pl.Trainer(
        **trainer_args,
        logger=run.tracker.logger if run.tracker else False,
        # Untracked after all (the store could not be created): the reporting callbacks have no logger to use.
        callbacks=[c for name, c in callbacks.items() if run.tracker or name not in REPORTING_CALLBACKS]
        + (run.tracker.callbacks if run.tracker else []),
        plugins=[AtomicCheckpointIO(), *plugins],
        default_root_dir=root_dir,
    )


def gradient_check(cfg: DictConfig, trainer: pl.Trainer, net: MLP, tracker: Tracker | None) -> None:
    """Before training: the hand-written backward of every layer type this network uses, on float64 slices."""
    if not (trainer.is_global_zero and cfg.tracking.gradcheck):
        return
    report = check_model(net, cfg.model.loss)
    if tracker:
        tracker.log_dict(report, "gradcheck.json")
    if not report["passed"]:
        bad = [e["layer"] + ":" + e["function"] for e in report["layers"] if not e["passed"]]
        raise GradcheckError(f"gradient check failed before training for {', '.join(bad)}")


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
        "run_id": run.tracker.run_id if run.tracker else None,
        "experiment_id": run.tracker.logger.experiment_id if run.tracker else None,  # the summary's dashboard link
        "tracking_uri": run.tracker.uri if run.tracker else None,
    }
