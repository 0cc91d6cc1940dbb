"""Checkpoints of a run: written atomically, `last.ckpt` kept current, the one to resume from found and checked."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from bp_service.bundle import BundleError, load_bundle
from bp_service.commands import shown_value
from bp_service.files import atomic_path
from bp_service.training.resume import checkpoint_file, claim_checkpoint_folder, claimant_run


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


def check_training_state(path: str | Path, module: pl.LightningModule) -> None:
    """What a checkpoint restores besides the network, checked before the run (re)opens: the optimizer's state
    for this module's parameters, the module's epoch sums, the datamodule's step grouping.

    Found inside ``fit`` instead, a mismatch would fail the run it belongs to (a resume in place continues the
    checkpoint's own), with an error that names no file. Lightning's loops and the callbacks read their own
    parts; a checkpoint :func:`read_checkpoint` refused is never read here.
    """
    raw = torch.load(path, map_location="cpu", weights_only=True)
    shapes = [tuple(p.shape) for p in module.parameters()]
    states = raw.get("optimizer_states", [])
    if not isinstance(states, list):
        raise CheckpointError(f"{path}: optimizer_states is not a list of optimizer states")
    for n, state in enumerate(states):
        _check_optimizer_state(state, shapes, f"{path}: optimizer_states[{n}]")
    sums = raw.get("bp_service_epoch_sums", [0.0, 0])
    loss_sum, rows = sums if isinstance(sums, list) and len(sums) == 2 else (None, None)
    if not (_is_number(loss_sum) and _is_count(rows)):
        raise CheckpointError(f"{path}: bp_service_epoch_sums must be [the epoch's loss sum, its row count]")
    grouping = raw.get("BPDataModule", {})
    if not isinstance(grouping, dict) or not (
        grouping.get("steps_per_execution") is None or _is_count(grouping["steps_per_execution"], least=1)
    ):
        raise CheckpointError(f"{path}: BPDataModule.steps_per_execution must be a count of optimizer steps")


def _check_optimizer_state(state: Any, shapes: list[tuple[int, ...]], where: str) -> None:
    """One optimizer's ``state_dict()``: one group over the module's parameters (as ``configure_optimizers``
    builds it), each parameter's buffers (momentum, Adam's averages) of that parameter's shape."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    per_param = state.get("state") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(per_param, dict):
        raise CheckpointError(f"{where} is not an optimizer's state")
    listed = [i for group in groups if isinstance(group, dict) and isinstance(group.get("params"), list)
              for i in group["params"]]  # fmt: skip
    if len(groups) != 1 or listed != list(range(len(shapes))):
        raise CheckpointError(
            f"{where}: an optimizer over other parameters ({len(listed)}, this network has {len(shapes)}); "
            "not this config's network"
        )
    for index, buffers in per_param.items():
        if not _is_count(index) or index >= len(shapes) or not isinstance(buffers, dict):
            raise CheckpointError(f"{where}: state of parameter {shown_value(index)}: not this network's")
        for name, value in buffers.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and not _fits(tuple(value.shape), shapes[index]):
                raise CheckpointError(
                    f"{where}: {shown_value(name)} of parameter {index} is {tuple(value.shape)}, expected "
                    f"{shapes[index]}; not this config's network"
                )


def _fits(buffer: tuple[int, ...], parameter: tuple[int, ...]) -> bool:
    """A buffer of the parameter's shape, or one reduced along some of its axes (Adafactor's row and column
    statistics of a (3, 4) weight are (3, 1) and (1, 4))."""
    return len(buffer) == len(parameter) and all(b in (p, 1) for b, p in zip(buffer, parameter, strict=True))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def resume_run_id(ckpt_path: str | None) -> str | None:
    """The MLflow run a checkpoint was written by (it is continued, not duplicated)."""
    return read_checkpoint(ckpt_path)["meta"].get("mlflow_run_id") if ckpt_path else None


@dataclass(frozen=True)
class Resume:
    """What a run resumes from and where it writes its checkpoints.

    ``in_place``: ``path`` is a run's own ``last.ckpt``, and that run is continued in its folder and its
    MLflow run. Any other checkpoint (an earlier epoch's, a copy elsewhere) starts a new run in this job's
    own folder from the checkpoint's state; ``origin`` then records where it came from.
    """

    path: str | None
    ckpt_dir: Path
    in_place: bool = False
    run_id: str | None = None  # the MLflow run continued (in place only)
    origin: dict[str, str] = field(default_factory=dict)  # tags of a new run started from another's checkpoint


def resolve_resume(ckpt_path: str | None, paths: DictConfig) -> Resume:
    """The checkpoint to resume from (``ckpt_path``), checked, and where this job writes: ``last`` is the newest
    ``last.ckpt`` of an earlier run with the same overrides, continued in its own folder.

    Without ``ckpt_path``, a job whose own folder already holds a ``last.ckpt`` is the same job run again: a
    requeue (submitit reruns the whole Hydra job in its ``<sweep>/<num>`` folder after a preemption or time-out,
    and Lightning's own SLURM requeue never fires under it). It continues from there, in its MLflow run. A new
    run never finds one: its folder is claimed fresh.
    """
    if ckpt_path is None:
        _claim(paths)
        own = Path(paths.ckpt_dir) / "last.ckpt"
        if not own.is_file():
            return Resume(None, Path(paths.ckpt_dir))
        run_id = read_checkpoint(own)["meta"].get("mlflow_run_id")
        print(f"bp-train: {own} is this job's own, from an earlier attempt (requeued): resuming it", file=sys.stderr)
        return Resume(str(own), own.parent, in_place=True, run_id=run_id)
    try:
        path = checkpoint_file(ckpt_path)  # bp-train's precheck found it (exit 2); gone since, or train() called alone
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
    run_id = read_checkpoint(path)["meta"].get("mlflow_run_id")  # fail now, naming the file, not inside Lightning
    if ckpt_path == "last" or _own_last(path, paths.root_dir):
        return Resume(str(path), path.resolve().parent, in_place=True, run_id=run_id)
    _claim(paths)
    origin = {"bp.resumed_from": str(path.resolve())}
    if run_id:
        origin["bp.resumed_from_run"] = run_id
    return Resume(str(path), Path(paths.ckpt_dir), origin=origin)


def _claim(paths: DictConfig) -> None:
    """This run's checkpoint folder, when it is outside the run's folder, claimed for it (or refused)."""
    try:
        claim_checkpoint_folder(paths.ckpt_dir, paths.output_dir)
    except FileExistsError as exc:
        raise CheckpointError(str(exc)) from None


def _own_last(path: Path, root_dir: str) -> bool:
    """Whether ``path`` is the ``last.ckpt`` of a bp-train run of this home, in its own ``<run>/checkpoints`` or
    in the checkpoint folder outside it that the run claimed (``paths.ckpt_dir``): the only checkpoints whose
    folder a resume may write into (a copy elsewhere sits beside files of someone else's)."""
    real = path.resolve()
    run_dir = claimant_run(real.parent) or real.parent.parent
    return (
        real.name == "last.ckpt"
        and (real.parent.name == "checkpoints" or run_dir != real.parent.parent)
        and (run_dir / ".hydra" / "overrides.yaml").is_file()
        and run_dir.is_relative_to(Path(root_dir).resolve() / "outputs")
    )


@contextlib.contextmanager
def folder_held(ckpt_dir: Path) -> Iterator[None]:
    """This process alone writes into ``ckpt_dir`` for the block.

    A lock beside the folder, held from before the run's MLflow record opens until after it closes: a
    resume of a run that is still training is refused, and the kernel releases it when the process dies,
    however it dies. Under DDP the first process holds it for all.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(ckpt_dir.parent / f".{ckpt_dir.name}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CheckpointError(
            f"{ckpt_dir.parent}: that run is still training in another process (it holds {lock.lock_file}); "
            "wait for it to end, or stop it, then resume"
        ) from None
    try:
        yield
    finally:
        lock.release()
