"""Lightning callbacks of a bp-train run: one that watches backpropagation itself, the best checkpoint (Lightning's,
keeping the latest of equal scores), and the terminal's progress bar and model summary (Lightning's own, minus what
says nothing about this model)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.model_summary import log as summary_log
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

from bp_service.bundle import stored_table

NOT_A_TERMINAL = ("quiet", "epochs", "bar")


def _terminal() -> bool:
    return sys.stdout.isatty()


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
        # A tensor per metric, not a list per epoch: torch.save's pickler runs a Python hook for every object, and
        # every checkpoint carries the whole history (7 layers, 300 epochs: 6.6 ms a checkpoint as lists, 1.1 ms).
        return {"history": {k: torch.tensor(v, dtype=torch.float64).reshape(-1, 2) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.history:  # test() restoring the best checkpoint must not cut the epochs after it
            return
        history = state_dict.get("history", {})
        if not isinstance(history, dict):
            raise ValueError("checkpoint: callbacks.GradientFlow.history is not a dictionary: refused")
        self.history = {str(k): _epoch_values(v, str(k)) for k, v in history.items()}

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


def _epoch_values(saved: Any, name: str) -> list[tuple[int, float]]:
    """A metric's (epoch, value) pairs as a checkpoint holds them: an (epochs, 2) float64 tensor stored whole (an
    ``expand()`` view would declare any number in a few bytes), or the list of pairs of checkpoints written before."""
    pairs = stored_table(saved, 2) if isinstance(saved, torch.Tensor) else saved
    with contextlib.suppress(TypeError, ValueError, OverflowError):  # None, a field not a number, a NaN epoch
        return [(int(epoch), float(value)) for epoch, value in pairs]
    raise ValueError(f"checkpoint: callbacks.GradientFlow.history[{name!r}] is not (epoch, value) pairs: refused")


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, where a later epoch that ties the best score also replaces the best.

    Accuracy on a small validation split saturates: iris's 22 rows reach val/acc 1.0 within a few epochs, and
    Lightning keeps the first epoch that got there, a network that has barely started (test/acc 0.83 where
    training on to early stopping's end reaches 0.96). Among epochs of equal score the latest has trained
    longest. ``ties``: ``latest`` (this behaviour, only with ``save_top_k=1``) or ``first`` (Lightning's).
    """

    def __init__(self, *args: Any, ties: str = "latest", **kwargs: Any) -> None:
        if ties not in ("latest", "first"):
            raise ValueError(f"callbacks.model_checkpoint.ties={ties!r}: one of ('latest', 'first')")
        super().__init__(*args, **kwargs)
        self.ties = ties

    @property
    def state_key(self) -> str:
        # Lightning's own key: checkpoints stay readable by what looks for ModelCheckpoint's state (sweeps, resume).
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        best = self.best_model_score
        if self.ties == "latest" and self.save_top_k == 1 and current is not None and best is not None:
            tie = bool(torch.isfinite(current) and current.to(best.device) == best)
            if trainer.strategy.reduce_boolean_decision(tie):  # DDP: every process decides alike
                return True
        return super().check_monitor_top_k(trainer, current)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar without ``v_num`` (the logger's version: here an MLflow run id
    fragment, which the summary prints in full), and without redraws where nobody watches.

    ``not_a_terminal`` says what happens when stdout is not a terminal (CI logs, ``docker logs``,
    ``make train > file``), where every redraw would be one more line: ``quiet`` (no bar; the summary
    at the end says how it went), ``epochs`` (one line per epoch with its metrics), ``bar`` (tqdm as is).
    """

    def __init__(
        self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False, not_a_terminal: str = "quiet"
    ) -> None:
        if not_a_terminal not in NOT_A_TERMINAL:
            raise ValueError(f"callbacks.progress_bar.not_a_terminal={not_a_terminal!r}: one of {NOT_A_TERMINAL}")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.not_a_terminal = not_a_terminal
        self._epoch_lines = False
        self._pending_epoch: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not _terminal() and self.not_a_terminal != "bar":
            self.disable()
            self._epoch_lines = self.not_a_terminal == "epochs" and trainer.is_global_zero

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._epoch_lines:  # printed once the module's own epoch-end hook has logged train/loss
            self._pending_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._epoch_line(trainer)
        super().on_train_epoch_start(trainer, *args)

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._epoch_line(trainer)
        super().on_train_end(trainer, *args)

    def _epoch_line(self, trainer: pl.Trainer) -> None:
        if self._pending_epoch is None:
            return
        items = self.get_metrics(trainer, trainer.lightning_module).items()
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)
        print(f"Epoch {self._pending_epoch}: {metrics}", flush=True)
        self._pending_epoch = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Close the open bars (the training bar ends its line): the error printed next starts on its own line.
        for bar in (
            self._val_progress_bar,
            self._test_progress_bar,
            self._predict_progress_bar,
            self._train_progress_bar,
        ):
            if bar is not None and not bar.disable:
                bar.close()
        sys.stdout.flush()


class Summary(ModelSummary):
    """Lightning's model summary without the FLOPs column and "Total Flops" line when they are 0 (Lightning
    counts FLOPs only for a module with an ``example_input_array``: 0 here says nothing about the model).

    ``not_a_terminal``: ``line`` (default) prints one line (the layers and trainable parameters) when stdout
    is not a terminal, ``table`` the table anyway.
    """

    def __init__(self, max_depth: int = 1, not_a_terminal: str = "line", **summarize_kwargs: Any) -> None:
        if not_a_terminal not in ("line", "table"):
            raise ValueError(f"callbacks.model_summary.not_a_terminal={not_a_terminal!r}: one of ('line', 'table')")
        super().__init__(max_depth=max_depth, **summarize_kwargs)
        self.not_a_terminal = not_a_terminal

    def summarize(  # type: ignore[override]  # Lightning's is a staticmethod called on the instance
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if not _terminal() and self.not_a_terminal == "line":
            columns = dict(summary_data)
            rows = zip(columns.get("Name", []), columns.get("Type", []), columns.get("Params", []))
            layers = ", ".join(f"{n} {t}" for n, t, p in rows if p.strip() != "0")  # parts that hold parameters
            summary_log.info(f"Model: {layers}; {trainable_parameters:,} trainable parameters ({model_size:.3f} MB)")
            return
        if not total_flops:
            summary_data = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops"))
        summary_log.info("\n" + table)
