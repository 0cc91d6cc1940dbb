"""The Lightning DataModule: :func:`.prepare`'s splits, batched in memory (``data.batch_size`` per process)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from bp_service.training.data.prepare import Prepared, prepare
from bp_service.training.loader import InMemoryLoader

# data.steps_per_execution=auto groups the optimizer steps of up to this many rows into one Lightning step, and of at
# most this much arithmetic (6 multiply-adds a parameter and a row: forward and backward), about a second of one slow
# core: all of a small table's epoch (digits: its 20 steps), a few steps of a wide network, so that a SIGTERM, which
# Lightning acts on between its steps, is never long in coming.
AUTO_ROWS = 65_536
AUTO_FLOP = 2 * 10**10
AUTO_STEPS = 256  # and at most this many steps: tiny ones cost Lightning's overhead each (0.2 ms), not arithmetic
# Callback settings that act every N optimizer steps or every so often, checked by Lightning between its steps.
STEPWISE_CALLBACK_KEYS = ("every_n_train_steps", "train_time_interval")


def stepwise_callbacks(callbacks) -> list[str]:
    """The callbacks (config nodes by name) that act every N optimizer steps or every so many seconds of training:
    with several optimizer steps per Lightning step they would act late, so ``auto`` does not group steps."""
    return [
        name for name, node in (callbacks or {}).items() if node and any(node.get(k) for k in STEPWISE_CALLBACK_KEYS)
    ]


class BPDataModule(pl.LightningDataModule):
    """Wraps :func:`prepare` for Lightning; evaluation splits are small, so they go in large batches."""

    def __init__(self, cfg, seed: int, stepwise: list[str] | None = None) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.stepwise = stepwise or []  # callbacks acting every N steps (:func:`stepwise_callbacks`): auto is 1
        self.resumed_steps_per_execution: int | None = None  # the grouping of the checkpoint a run resumes from
        self.data: Prepared | None = None
        self.train_loader: InMemoryLoader | None = None  # the latest train_dataloader()
        self._resident: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = prepare(self.cfg, self.seed)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The split's ``(x, y)``: on a CUDA training device a copy kept there (``data.on_device``), else ``data``'s.

        One copy per run instead of one host-to-device copy (and a CPU gather) per batch: at 1M x 128
        that is 0.5 GB of GPU memory, and a step no longer waits on the host. ``data`` stays on the CPU.
        """
        x, y = self.data.x[name], self.data.y[name]
        device = self.trainer.strategy.root_device if self.trainer else None
        if device is None or device.type != "cuda" or not self.cfg.get("on_device", True):
            return x, y
        key = (name, str(device))
        if key not in self._resident:
            self._resident[key] = (x.to(device), y.to(device))
        return self._resident[key]

    def train_dataloader(self) -> InMemoryLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

        k = self.steps_per_execution()

        def position() -> tuple[int, int]:
            """(epoch, optimizer steps of it already taken): Lightning's count of its steps, each ``k`` of ours."""
            return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready * k

        self.train_loader = InMemoryLoader(
            *self.split("train"),
            self.cfg.batch_size,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
            steps_per_execution=k,
            position=position if self.trainer else None,
        )
        return self.train_loader

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Every loader here yields tuples of (x, y) batches gathered where the split lies (:meth:`split`): on the
        # training device already, they skip Lightning's generic walk over collections (8 µs a step, 2% at digits).
        if all(x.device == device and y.device == device for x, y in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def steps_per_execution(self) -> int:
        """``data.steps_per_execution``, ``auto`` resolved: the optimizer steps of :data:`AUTO_ROWS` rows,
        :data:`AUTO_FLOP` arithmetic and :data:`AUTO_STEPS` steps at most per Lightning step, or 1 when a setting
        counts Lightning's steps (they would count groups instead) or acts between them (a time limit, a step-wise
        checkpoint, SLURM's requeue). A run resumed mid-epoch groups as the run that wrote its checkpoint."""
        if self.trainer is not None and self.trainer.ckpt_path:
            # Lightning counts an epoch's progress in its own steps: a run resumed mid-epoch groups as the run that
            # wrote its checkpoint (one step at a time before that was recorded), for the rest of the run.
            saved = self.resumed_steps_per_execution or 1
            if 0 < self.trainer.fit_loop.epoch_loop.batch_progress.current.ready * saved < self._epoch_steps():
                return saved
        k = self.cfg.get("steps_per_execution", 1)
        if k != "auto":
            return int(k)
        trainer = self.trainer
        if trainer is None:
            return 1
        from lightning.fabric.plugins.environments import SLURMEnvironment
        from lightning.pytorch.callbacks import Timer

        counts_steps = (
            trainer.max_steps != -1
            or bool(trainer.fast_dev_run)
            or trainer.limit_train_batches != 1.0
            or trainer.val_check_interval != 1.0  # a number of Lightning steps, a fraction of them, or a time
            or any(config.interval == "step" for config in trainer.lr_scheduler_configs)  # and LR monitor's cadence
            or any(isinstance(c, Timer) for c in trainer.callbacks)  # trainer.max_time
            or bool(self.stepwise)
            # SLURM's requeue signal saves a checkpoint where the step is: at most one step is taken again.
            or SLURMEnvironment.detect()
        )
        if counts_steps:
            return 1
        batch = self.cfg.batch_size
        params = sum(p.numel() for p in trainer.lightning_module.parameters()) if trainer.lightning_module else 0
        return max(1, min(AUTO_STEPS, AUTO_ROWS // batch, AUTO_FLOP // max(6 * params * batch, 1)))

    def _epoch_steps(self) -> int:
        world = self.trainer.world_size if self.trainer else 1
        return InMemoryLoader(*self.split("train"), self.cfg.batch_size, world_size=world).n_batches

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: the grouping of optimizer steps its epoch's progress is counted in."""
        return {"steps_per_execution": self.train_loader.steps_per_execution} if self.train_loader else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resumed_steps_per_execution = state_dict.get("steps_per_execution")

    def _eval_loader(self, split: str) -> InMemoryLoader:
        return InMemoryLoader(*self.split(split), batch_size=4096)

    def val_dataloader(self) -> InMemoryLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> InMemoryLoader:
        return self._eval_loader("test")
