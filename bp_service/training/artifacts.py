"""What a finished run leaves in its record besides its metrics: config, pictures, checkpoint pointer, servable
model; through the :class:`~bp_service.training.tracking.Tracker` interface, whatever the backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bp_service.bundle import save_bundle
from bp_service.files import DiskFullError
from bp_service.training.callbacks import GradientFlow
from bp_service.training.data import Prepared
from bp_service.training.module import BPModule
from bp_service.training.reports import confusion_figure, curves_figure, gradient_flow_figure
from bp_service.training.tracking import Tracker, recordable_config


def record_artifacts(
    cfg: DictConfig, tracker: Tracker, module: BPModule, data: Prepared, result: dict[str, Any], flow: GradientFlow
) -> None:
    """Config, learning curves, gradient flow, confusion matrix, checkpoint pointer, and the servable model.

    Nothing is drawn or written when the tracker keeps nothing (tracking off)."""
    if not tracker.records:
        return
    tracker.flush()  # MLflow's log_model reads the run's metrics back
    tracker.log_text(OmegaConf.to_yaml(recordable_config(cfg)), "config.yaml")
    log_curves(tracker, data.task)
    epochs, panels = flow.panels() if flow is not None else ([], {})
    if panels:
        tracker.log_figure(gradient_flow_figure(epochs, panels), "gradient_flow.png")
    if data.task == "classification":
        log_confusion(tracker, module, data)
    tracker.log_dict(
        {k: result[k] for k in ("best_checkpoint", "last_checkpoint", "monitor", "best_score")}, "checkpoint.json"
    )
    if result["best_checkpoint"]:
        tracker.log_artifact(result["best_checkpoint"], "checkpoints")
    if cfg.tracking.log_model:
        bundle_path = Path(cfg.paths.output_dir) / "model_bundle.pt"
        log_servable_model(tracker, module, data, result, bundle_path, cfg.tracking.register_model)


def log_curves(tracker: Tracker, task: str) -> None:
    keys = ["train/loss", "val/loss"] + (["val/acc"] if task == "classification" else [])
    history = tracker.metric_history(keys)
    if any(history.values()):
        tracker.log_figure(curves_figure(history), "curves.png")


def log_confusion(tracker: Tracker, module: BPModule, data: Prepared) -> None:
    net = module.net
    with torch.no_grad():
        weight = net.layers[0].weight  # *-true precisions: the test rows in the network's dtype
        pred = net(data.x["test"].to(weight.device, weight.dtype)).float().cpu()
    target = data.y["test"]
    to_index = (lambda t: (t[:, 0] > 0.5).long()) if pred.shape[1] == 1 else (lambda t: t.argmax(1))
    tracker.log_figure(
        confusion_figure(to_index(target).numpy(), to_index(pred).numpy(), data.meta["classes"]),
        "confusion_matrix.png",
    )


def log_servable_model(
    tracker: Tracker,
    module: BPModule,
    data: Prepared,
    result: dict[str, Any],
    bundle_path: Path,
    register_as: str | None,
) -> None:
    """The bundle at ``bundle_path`` (beside the run's outputs), and the servable model around it."""
    try:
        save_bundle(module.net, module.meta, bundle_path)
    except DiskFullError as exc:  # trained and tested: the run stands, only this artifact is lost
        result["lost_artifacts"] = [f"{bundle_path.name} and the MLflow model ({exc.strerror})"]
        tracker.set_tag("bp.lost_artifacts", exc.strerror)
        return
    tracker.log_model(bundle_path, data.raw_example(), register_as)
