"""The LightningModule: receives its network, computes losses and metrics, steps the optimizer."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from bp_service import functions as F
from bp_service.bundle import checkpoint_entry
from bp_service.capture import CapturedStep
from bp_service.layers import MLP, OUTPUT_ACTIVATIONS

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class NonFiniteError(RuntimeError):
    """Training diverged: the message names the step and what became non-finite."""


def accuracy(pred: Tensor, target: Tensor) -> Tensor:
    """Fraction of rows classified right: one sigmoid output thresholded at 0.5, else argmax."""
    if pred.shape[-1] == 1:
        return ((pred > 0.5) == (target > 0.5)).float().mean()
    return (pred.argmax(-1) == target.argmax(-1)).float().mean()


@dataclass
class EpochSoFar:
    """What ``train/loss`` averages over the training epoch so far. A plain object: writing a field costs nothing
    beside a LightningModule attribute's write (``nn.Module.__setattr__``, microseconds a step)."""

    loss_sum: Tensor  # sum over the epoch's steps of loss * rows
    rows: int = 0


class PlainHookNames:
    """A LightningModule mix-in: Lightning names the hook it is in (``_current_fx_name``, a str or None) before and
    after each of its ~35 hook calls per step, and ``nn.Module.__setattr__``'s Parameter/Module/Tensor checks cost
    ten times the plain write (1.3 vs 0.1 µs). Neither value is one of those, so the plain write is what nn.Module
    would do; every other name goes through nn.Module as before."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class BPModule(PlainHookNames, pl.LightningModule):
    """Trains ``net`` with hand-written backprop, one optimizer step per ``(x, y)`` batch.

    Optimization is manual so that a Lightning step may carry several optimizer steps (the
    loader's ``steps_per_execution``): Lightning's per-step hooks then cost a fraction as much,
    while the sequence of optimizer steps, and so the weights, stay exactly the same.

    Args:
        net: the network (a :class:`~bp_service.layers.MLP`).
        optimizer: builds the optimizer from the parameters (the config's ``optimizer`` node, a partial).
        scheduler: optional Lightning ``lr_scheduler`` config: ``scheduler`` builds it from the optimizer
            (a partial), ``interval`` (epoch|step) says when it steps.
        loss: ``mse``, ``l1`` or ``cross_entropy`` (with a softmax or sigmoid output).
        task: ``classification`` (also logs accuracy) or ``regression`` (also logs ``rmse`` and ``mae`` in the
            target's own units: predictions and targets de-standardised with ``meta``'s target mean and scale).
        meta: preprocessing and labels, saved in every checkpoint so it predicts from raw features.
        compile: run the training cost (forward, cost and hand-written backward) under ``torch.compile``.
        capture: replay each training step from a CUDA graph (:class:`~bp_service.capture.CapturedStep`):
            ``None`` when it can (one CUDA device, no compile, clipping, fp16 loss scaling or
            step-wise scheduler), ``True`` the same but says in one line why it cannot, ``False`` never.
        gradient_clip_val: clip the gradient norm to this value, if set (Lightning leaves clipping to
            the module under manual optimization).

    Each training step goes through ``net.cost``: forward pass, cost and backpropagation as one
    :class:`~bp_service.functions.MLPCostFunction`; evaluation goes through ``net(x)``, or with cross-entropy
    ``net.logits(x)`` once, the cost and the prediction both taken from it. The per-step ``train/loss_step``
    metric follows the Trainer's ``log_every_n_steps``.
    """

    def __init__(
        self,
        net: MLP,
        optimizer: OptimizerFactory,
        scheduler: dict[str, Any] | None = None,
        loss: str = "mse",
        task: str = "classification",
        meta: dict[str, Any] | None = None,
        compile: bool = False,
        capture: bool | None = None,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.loss = loss
        self.loss_fn = F.LOSSES[loss]
        self._cost = torch.compile(net.cost) if compile else net.cost
        self.compile, self.capture = compile, capture
        self._captured: CapturedStep | None = None
        self._said_ragged = False
        self.task = task
        self.optimizer_factory = optimizer
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.meta = dict(meta or {})
        self.gradient_clip_val = gradient_clip_val
        self.epoch_so_far = EpochSoFar(loss_sum=torch.zeros(()))
        if task == "regression":
            # torchmetrics objects: summed over batches, synced across DDP ranks, reset each epoch by Lightning.
            units = MetricCollection({"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError()})
            self.units = torch.nn.ModuleDict({"val": units.clone(prefix="val/"), "test": units.clone(prefix="test/")})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ----------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:  # not called when resuming mid-epoch: sums come from the checkpoint
        self.epoch_so_far = EpochSoFar(loss_sum=torch.zeros((), device=self.device))

    def on_train_start(self) -> None:
        self._params = list(self.net.parameters())  # nn.Module's walk to them costs 5 µs: once, not at every step
        reason = self._why_not_captured()
        if reason is None:
            self._captured = CapturedStep(lambda x, y: self._cost(x, y, self.loss), self._params, self._raw_optimizer())
            self._say("bp-train: training steps are captured in a CUDA graph and replayed (model.capture=false: off)")
        elif self.capture or (self.capture is None and self.device.type == "cuda"):
            self._say(f"bp-train: training eagerly, not from a CUDA graph: {reason}")

    def _say(self, line: str) -> None:
        """One line on stderr from the first process (Lightning's info channel is muted in bp-train)."""
        if self.trainer.is_global_zero:
            print(line, file=sys.stderr)

    def _why_not_captured(self) -> str | None:
        """Why this run's training step cannot be captured, or None when it can."""
        precision = str(self.trainer.precision)
        reasons = [
            (self.capture is False, "model.capture=false"),
            (self.device.type != "cuda", f"the device is {self.device.type}, not CUDA"),
            (self.trainer.world_size > 1, "several processes (DDP)"),
            (self.compile, "model.compile=true"),
            (bool(self.gradient_clip_val), "gradient clipping"),
            (precision.startswith("16"), f"precision {precision} scales the loss (GradScaler)"),
            (any(c.interval == "step" for c in self.trainer.lr_scheduler_configs), "a step-wise LR scheduler"),
        ]
        return next((why for cannot, why in reasons if cannot), None)

    def _raw_optimizer(self) -> torch.optim.Optimizer:
        opt = self.optimizers()
        return opt.optimizer if hasattr(opt, "optimizer") else opt

    def training_step(self, chunk: tuple[tuple[Tensor, Tensor], ...], batch_idx: int) -> None:
        # What the Trainer says is read once per Lightning step, not once per optimizer step of the chunk: at the
        # digits size each property read is about a microsecond of a step's few hundred.
        opt, trainer, logger = self.optimizers(), self.trainer, self.logger
        log_every, max_steps, step = trainer.log_every_n_steps, trainer.max_steps, self.global_step
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs if config.interval == "step"]
        so_far = self.epoch_so_far  # added to in the same order whatever the chunk's size: the same train/loss
        params = self._params
        for x, y in chunk:
            if step == max_steps:  # a chunk of steps never carries the run past trainer.max_steps
                break
            if self._captured is not None and self._captured.fits(x, y):
                loss = self._captured_step(opt, x, y, params)
            else:
                loss = self._eager_step(opt, x, y, params)
            step = self.global_step
            for scheduler in schedulers:
                scheduler.step()
            # sum + loss * rows in one op: a Python number as an operand would cost a new tensor each step (5 µs)
            so_far.loss_sum = torch.add(so_far.loss_sum.to(loss.device), loss.detach(), alpha=len(x))
            so_far.rows += len(x)
            if step % log_every == 0 and logger is not None:
                logger.log_metrics({"train/loss_step": loss.item()}, step=step)

    # Lightning reads training_step's signature at every step (does it take batch_idx?): inspect builds it anew
    # each time, 10 µs of a digits step's few hundred, unless the function carries it (PEP 362's __signature__).
    training_step.__signature__ = inspect.signature(training_step)

    def _eager_step(self, opt, x: Tensor, y: Tensor, params: list[torch.nn.Parameter]) -> Tensor:
        if self._captured is not None and not self._said_ragged:
            self._say(f"bp-train: a batch of {len(x)} rows runs eagerly (the graph was captured for another shape)")
            self._said_ragged = True
        loss = self._cost(x, y, self.loss)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val:
            self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        self._check_finite(loss, [p.grad for p in params])
        opt.step()
        if self._captured is not None:
            self._captured.restore_grads()
        return loss

    def _captured_step(self, opt, x: Tensor, y: Tensor, params: list[torch.nn.Parameter]) -> Tensor:
        # LightningOptimizer.step's own accounting around the replay: global_step stays Lightning's.
        opt._on_before_step()
        loss = self._captured(x, y)
        opt._on_after_step()
        # Checking reads the GPU (a sync): under capture at the logging cadence, not every step.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self._check_finite(loss, self._captured.grads or [p.grad for p in params])
        return loss

    def on_train_epoch_end(self) -> None:
        # Mean over rows, independent of how optimizer steps were grouped into Lightning steps.
        epoch_loss = self.epoch_so_far.loss_sum / max(self.epoch_so_far.rows, 1)
        epoch_loss = self.trainer.strategy.reduce(epoch_loss, reduce_op="mean")  # DDP: the ranks' mean
        self.log("train/loss", epoch_loss, prog_bar=True, logger=False)
        # Recorded now, not at Lightning's flush after the epoch: last.ckpt is written in between, and
        # a run killed there would resume past an epoch whose train/loss was never recorded.
        if self.logger is not None:
            self.logger.log_metrics({"train/loss": float(epoch_loss)}, step=self.global_step)
        self._step_scheduler("epoch")

    def _check_finite(self, loss: Tensor, grads: list[Tensor | None]) -> None:
        """Stop at the step that diverged, before the optimizer writes NaNs into the weights.

        Under capture the check runs every ``log_every_n_steps`` steps, after the update.
        """
        grads = [g for g in grads if g is not None]
        # One number per step that a NaN or inf anywhere reaches: the loss plus each gradient's sum (in float32, so
        # that 16-bit gradients do not overflow it), read once. About 12 µs at the digits shape, where the total
        # norm took 40 (its grouping by device and dtype is Python); a sum that merely overflows is sorted out below.
        sums = torch.stack([g.sum(dtype=torch.float32) for g in grads]) if grads else loss.new_zeros(1)
        if math.isfinite(float(sums.sum() + loss.detach().float())):
            return
        step = self.global_step + 1  # the norm may merely overflow: name what is really non-finite
        if not torch.isfinite(loss):
            raise NonFiniteError(f"step {step}: train/loss became non-finite ({loss.item()}); {self._way_on()}")
        for name, p in self.net.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(f"step {step}: the gradient of {name} became non-finite; {self._way_on()}")

    def _way_on(self) -> str:
        """What to try after a divergence: a tenth of the learning rate, and Adam when it is not already."""
        group = self._raw_optimizer().param_groups[0]
        lr = float(group.get("initial_lr", group["lr"]))  # the configured rate, not a scheduler's current one
        tries = [f"optimizer.lr={lr / 10:g} (a tenth of {lr:g})"]
        if not isinstance(self._raw_optimizer(), torch.optim.Adam):
            tries.append("optimizer=adam (a step size per weight)")
        return "the training diverged: try " + " or ".join(tries)

    def _step_scheduler(self, interval: str) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval:
                config.scheduler.step()

    # ----------------------------------------------------------------------- evaluation
    def _evaluate(self, chunk: tuple[tuple[Tensor, Tensor], ...], split: str) -> None:
        ((x, y),) = chunk
        if self.loss == "cross_entropy":
            # One pass through the layers: the cost from the logits, as in training (finite where probabilities
            # round to 0 or 1), and the prediction from the same logits.
            output = self.net.activations[-1]
            logits = self.net.logits(x)
            loss, pred = F.CROSS_ENTROPY_TWINS[output](logits, y), OUTPUT_ACTIVATIONS[output](logits)
        else:
            pred = self.net(x)
            loss = self.loss_fn(pred, y)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=len(x), sync_dist=True)
        if self.task == "classification":
            self.log(f"{split}/acc", accuracy(pred, y), prog_bar=True, batch_size=len(x), sync_dist=True)
        else:
            mean, scale = self.meta.get("target_mean", 0.0), self.meta.get("target_scale", 1.0)
            metrics = self.units[split]
            metrics.update(pred[:, 0].float() * scale + mean, y[:, 0].float() * scale + mean)
            self.log_dict(metrics, batch_size=len(x))

    def validation_step(self, chunk, batch_idx: int) -> None:
        self._evaluate(chunk, "val")

    def test_step(self, chunk, batch_idx: int) -> None:
        self._evaluate(chunk, "test")

    # ----------------------------------------------------------------------- optimizers, checkpoints
    def configure_optimizers(self):
        kwargs = {}
        optimizer_cls = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        if (
            self.capture is not False
            and self.device.type == "cuda"
            and "capturable" in inspect.signature(optimizer_cls).parameters
            and "capturable" not in getattr(self.optimizer_factory, "keywords", {})  # the config's choice wins
        ):
            kwargs["capturable"] = True  # Adam and friends: their step may then go in a CUDA graph
        optimizer = self.optimizer_factory(self.net.parameters(), **kwargs)
        if not self.scheduler_config:
            return optimizer
        scheduler = {**self.scheduler_config, "scheduler": self.scheduler_config["scheduler"](optimizer)}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only plain Python values: a checkpoint must load with torch.load(weights_only=True).
        checkpoint["bp_service"] = checkpoint_entry(self.net, self.meta)
        checkpoint["bp_service_epoch_sums"] = [float(self.epoch_so_far.loss_sum), self.epoch_so_far.rows]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loss_sum, rows, *_ = checkpoint.get("bp_service_epoch_sums", [0.0, 0])
        self.epoch_so_far = EpochSoFar(loss_sum=torch.tensor(loss_sum), rows=rows)
