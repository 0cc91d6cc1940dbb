"""Checkpoints of a run: written atomically, `last.ckpt` kept current, the one to resume from found and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from bp_service.bundle import BundleError, load_bundle
from bp_service.files import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or unreadable; the message names the file."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename: a kill mid-write never leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` current: after every epoch, and every ``every_n_train_steps`` steps if set.

    ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only in epochs that also save a
    best checkpoint, and its step cadence is built for automatic optimization. As a ``Checkpoint``
    this runs after the module's epoch-end hook, like ModelCheckpoint.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None) -> None:
        self.path, self.every_n_steps = Path(dirpath) / "last.ckpt", every_n_train_steps
        self._saved_at = 0

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        n = self.every_n_steps
        if n and trainer.global_step // n > self._saved_at // n:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state: it is what a resume reads
        self._saved_at = trainer.global_step


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The bp-service part of a checkpoint, read safely; a corrupt or foreign file is named."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return load_bundle(path)
    except BundleError as exc:
        raise CheckpointError(str(exc)) from None


def resume_run_id(ckpt_path: str | None) -> str | None:
    """The MLflow run a checkpoint was written by (it is continued, not duplicated)."""
    return read_checkpoint(ckpt_path)["meta"].get("mlflow_run_id") if ckpt_path else None


def _resumable_overrides(overrides) -> set[str]:
    """The overrides that define a run; where it resumes from and how long it trains do not."""
    ignored = ("ckpt_path=", "trainer.max_epochs=", "tracking.")
    return {o for o in overrides if not o.startswith(ignored)}


def _same_overrides(run_dir: Path, wanted: set[str]) -> bool:
    saved = run_dir / ".hydra" / "overrides.yaml"
    return saved.is_file() and _resumable_overrides(OmegaConf.load(saved)) == wanted


def resolve_resume(cfg: DictConfig) -> tuple[str | None, Path]:
    """(checkpoint to resume from, folder to write checkpoints to): ``ckpt_path=last`` is the newest
    ``last.ckpt`` of an earlier run with the same overrides; a resumed run keeps writing to its own folder."""
    if cfg.ckpt_path is None:
        return None, Path(cfg.paths.ckpt_dir)
    if cfg.ckpt_path == "last":
        wanted = _resumable_overrides(HydraConfig.get().overrides.task)
        runs_dir = Path(HydraConfig.get().runtime.output_dir).parent
        candidates = [p for p in runs_dir.glob("*/checkpoints/last.ckpt") if _same_overrides(p.parent.parent, wanted)]
        if not candidates:
            raise CheckpointError(
                f"ckpt_path=last: no last.ckpt from an earlier run with the same overrides under {runs_dir}"
            )
        path = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(cfg.ckpt_path)
    read_checkpoint(path)  # fail now, naming the file, rather than deep inside Lightning
    return str(path), path.parent
