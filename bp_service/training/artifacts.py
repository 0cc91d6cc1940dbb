"""What a finished run leaves in its record besides its metrics: config, pictures, checkpoint pointer, servable
model; through the :class:`~bp_service.training.tracking.Tracker` interface, whatever the backend."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bp_service.bundle import save_bundle
from bp_service.files import DiskFullError
from bp_service.training.callbacks import GradientFlow
from bp_service.training.data import Prepared
from bp_service.training.module import BPModule
from bp_service.training.tracking import Tracker, recordable_config


def record_artifacts(
    cfg: DictConfig, tracker: Tracker, module: BPModule, data: Prepared, result: dict[str, Any], flow: GradientFlow
) -> None:
    """Config, learning curves, gradient flow, confusion matrix, checkpoint pointer, and the servable model.

    Nothing is drawn or written when the tracker keeps nothing (tracking off); the pictures are all written, or
    failed, when this returns."""
    if not tracker.records:
        return
    tracker.flush()  # MLflow's log_model reads the run's metrics back
    tracker.log_text(OmegaConf.to_yaml(recordable_config(cfg)), "config.yaml")
    pictures_written = tracker.log_figures(pictures(tracker, module, data, flow))  # drawn beside what follows
    try:
        tracker.log_dict(
            {k: result[k] for k in ("best_checkpoint", "last_checkpoint", "monitor", "best_score")}, "checkpoint.json"
        )
        if result["best_checkpoint"]:
            tracker.log_artifact(result["best_checkpoint"], "checkpoints")
        if cfg.tracking.log_model:
            bundle_path = Path(cfg.paths.output_dir) / "model_bundle.pt"
            log_servable_model(tracker, module, data, result, bundle_path, cfg.tracking.register_model)
    except BaseException:  # what stopped the run (Ctrl-C, SIGTERM, an error) is what it reports
        with contextlib.suppress(Exception):
            pictures_written()
        raise
    pictures_written()


def pictures(
    tracker: Tracker, module: BPModule, data: Prepared, flow: GradientFlow | None
) -> dict[str, Callable[[], Any]]:
    """Each picture's name and what draws it: learning curves, gradient flow, and (classification) the test
    split's confusion matrix."""
    from bp_service.training import reports  # matplotlib: only for a run that keeps pictures

    drawn: dict[str, Callable[[], Any]] = {}
    keys = ["train/loss", "val/loss"] + (["val/acc"] if data.task == "classification" else [])
    history = tracker.metric_history(keys)
    if any(history.values()):
        drawn["curves.png"] = lambda: reports.curves_figure(history)
    epochs, panels = flow.panels() if flow is not None else ([], {})
    if panels:
        drawn["gradient_flow.png"] = lambda: reports.gradient_flow_figure(epochs, panels)
    if data.task == "classification":
        true, pred = confusion_classes(module, data)
        drawn["confusion_matrix.png"] = lambda: reports.confusion_figure(true, pred, data.meta["classes"])
    return drawn


def confusion_classes(module: BPModule, data: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The test split's true and predicted class indices."""
    net = module.net
    with torch.no_grad():
        weight = net.layers[0].weight  # *-true precisions: the test rows in the network's dtype
        pred = net(data.x["test"].to(weight.device, weight.dtype)).float().cpu()
    target = data.y["test"]
    to_index = (lambda t: (t[:, 0] > 0.5).long()) if pred.shape[1] == 1 else (lambda t: t.argmax(1))
    return to_index(target).numpy(), to_index(pred).numpy()


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
    tracker.log_model(bundle_path, data.raw_example(), register_as, result["global_step"])
