"""Lightning callbacks of a bp-train run that watch backpropagation itself."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np


class GradientFlow(pl.Callback):
    """Per-layer gradient norms, once per epoch: where the error signal fades or blows up.

    At the end of every training epoch it runs :meth:`bp_service.MLP.gradient_norms` on one
    fixed batch of training rows (the first ``rows`` of the split, so epochs compare like with
    like) and records, for each layer l, ``train/grad_norm/W{l}`` = |dC/dW_l| and
    ``train/grad_norm/delta{l}`` = |delta_l|, in one logger call: no per-step cost.
    ``history`` keeps them for the run's gradient-flow picture
    (:func:`bp_service.training.reports.gradient_flow_figure`) and travels in checkpoints.
    """

    def __init__(self, rows: int = 256) -> None:
        self.rows = rows
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule.data
        weight = pl_module.net.layers[0].weight  # *-true precisions: rows in the network's dtype
        x = data.x["train"][: self.rows].to(weight.device, weight.dtype)
        y = data.y["train"][: self.rows].to(weight.device, weight.dtype)
        w_norms, delta_norms = pl_module.net.gradient_norms(x, y, pl_module.loss)
        metrics: dict[str, float] = {}
        for layer, (w, d) in enumerate(zip(w_norms.tolist(), delta_norms.tolist()), start=1):
            metrics[f"train/grad_norm/W{layer}"], metrics[f"train/grad_norm/delta{layer}"] = w, d
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((trainer.current_epoch, value))
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.history:  # test() restoring the best checkpoint must not cut the epochs after it
            return
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict.get("history", {}).items()}

    def panels(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """(epochs, {title: norms of shape (layers, epochs)}) for the gradient-flow picture."""
        panels, epochs = {}, []
        for kind, title in (("W", "|dC/dW_l|"), ("delta", "|delta_l|")):
            names = sorted(
                (k for k in self.history if k.startswith(f"train/grad_norm/{kind}")),
                key=lambda k: int(k.rsplit(kind, 1)[1]),
            )
            if names:
                epochs = [e for e, _ in self.history[names[0]]]
                panels[title] = np.array([[v for _, v in self.history[n]] for n in names])
        return epochs, panels
