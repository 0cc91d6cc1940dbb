"""A run's lifecycle: its record (the MLflow run) opened with signals held, and closed FINISHED, FAILED or KILLED,
never left RUNNING; SIGTERM, Ctrl-C and SLURM requeues handled the way schedulers and shells expect.

The recipe (:mod:`bp_service.training.recipe`) runs inside :func:`open_run` and trains through
:meth:`Run.fit` and :meth:`Run.test`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from bp_service.commands import EXIT_INTERRUPT, EXIT_SIGTERM, signals_deferred, sigterm_handler, startup_done
from bp_service.training.tracking import Job, NoTracker, Tracker, open_tracker


class Run:
    """What the recipe holds while a run is open: its tracker (a :class:`NoTracker` when untracked) and trainer."""

    def __init__(self) -> None:
        self.tracker: Tracker = NoTracker()
        self.trainer: pl.Trainer | None = None
        self.last_ckpt: Path | None = None
        self._lightning_has_sigterm = False
        self.sigterm_received = False

    def on_sigterm(self, signum: int, frame: Any) -> None:
        """Outside fit and test, stop at once: KILLED, 143. Inside them Lightning's own handler (it calls this one
        too) stops at the next batch's end; it is installed only once the Trainer has set up, and removed before
        fit or test returns, so a SIGTERM is also kept here: the first hook after set-up acts on it
        (:class:`StopOnSigterm`), and so does the end of fit and test."""
        self.sigterm_received = True
        if not self._lightning_has_sigterm:
            raise SIGTERMException()

    @contextlib.contextmanager
    def _lightning_handles_sigterm(self, trainer: pl.Trainer) -> Iterator[None]:
        if not any(isinstance(c, StopOnSigterm) for c in trainer.callbacks):
            trainer.callbacks.append(StopOnSigterm(self))
        self._lightning_has_sigterm = True
        try:
            yield
        finally:
            self._lightning_has_sigterm = False

    def fit(self, trainer: pl.Trainer, module: pl.LightningModule, datamodule, ckpt_path: str | None, ckpt_dir: Path):
        """``trainer.fit``; stopped by SIGTERM (Lightning stops at a batch end and would exit 0), it keeps the work."""
        self.trainer, self.last_ckpt = trainer, ckpt_dir / "last.ckpt"
        with self._lightning_handles_sigterm(trainer), warnings.catch_warnings():
            if ckpt_path:  # a resume writes into a folder with files, or starts a new one: both on purpose
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
                warnings.filterwarnings("ignore", message="The dirpath has changed from")
            startup_done()  # torch, Lightning and the tracker are imported and the data is loaded
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
                if self.sigterm_received:  # in the tear-down, which Lightning's handler was not there for
                    raise SIGTERMException()
            except SIGTERMException:
                trainer.save_checkpoint(self.last_ckpt, weights_only=False)
                raise

    def test(self, trainer: pl.Trainer, module: pl.LightningModule, datamodule, ckpt_path: str | None) -> dict:
        with self._lightning_handles_sigterm(trainer):
            metrics = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False)
            if self.sigterm_received:  # at its last batch, or in the tear-down: Lightning's loop did not stop
                raise SIGTERMException()
        return {k: float(v) for k, v in metrics[0].items()}

    def stopped_line(self) -> str:
        if self.trainer is None:
            return "bp-train: stopped by SIGTERM before training started"
        standard = self.last_ckpt is not None and self.last_ckpt.parent.name == "checkpoints"
        resume = "ckpt_path=last" if standard else f"ckpt_path={self.last_ckpt}"
        return (
            f"bp-train: stopped by SIGTERM at step {self.trainer.global_step}; checkpoint {self.last_ckpt}; "
            f"resume with {resume}"
        )


class StopOnSigterm(pl.Callback):
    """A SIGTERM that came while Lightning set up fit or test, before its own handler was installed, is sent
    again at the first hook after the set-up, to that handler: it stops at the batch's end, and under DDP tells
    the other processes (a SIGTERM to one rank's pid alone stops them all)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._relayed = False

    def _check(self) -> None:
        if self.run.sigterm_received and not self._relayed:
            self._relayed = True
            signal.raise_signal(signal.SIGTERM)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check()


@contextlib.contextmanager
def open_run(tracking: DictConfig, paths: DictConfig, job: Job) -> Iterator[Run]:
    """The run, open for the block: FINISHED when it ends, KILLED on SIGTERM (exit 143) or Ctrl-C (exit 130),
    FAILED on any other exception (re-raised). The SIGTERM handler is installed before the run's record is
    created (:func:`~bp_service.training.tracking.open_tracker`), and signals are held while it is: a SIGTERM
    at any moment closes the run."""
    run, status = Run(), "FAILED"  # until proven otherwise
    try:
        with sigterm_handler(run.on_sigterm):
            with signals_deferred(signal.SIGTERM, signal.SIGINT):
                run.tracker = open_tracker(tracking, paths, job)
            yield run
        status = "FINISHED"
    except SIGTERMException:
        status = "KILLED"
        print(run.stopped_line(), file=sys.stderr)
        raise SystemExit(EXIT_SIGTERM) from None
    except (KeyboardInterrupt, SystemExit) as exc:  # Lightning turns Ctrl-C into sys.exit(1)
        status = "KILLED"
        # Any other exit keeps its code: submitit's requeue on USR2 exits from inside fit, and its local
        # executor reruns the job only on its own exit code.
        lightning_ctrl_c = run.trainer is not None and run.trainer.interrupted and getattr(exc, "code", None) == 1
        if isinstance(exc, KeyboardInterrupt) or lightning_ctrl_c:
            print("bp-train: interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPT) from None
        raise
    finally:
        run.tracker.end(status)


def claim_node_rank(trainer: DictConfig) -> None:
    """Make a process on another node of a hand-started multi-node run (``NODE_RANK`` >= 1, no ``RANK``) know it
    is not rank zero before the Trainer sets up, so that only the first process records the run and writes.

    Lightning reads a process's rank from ``RANK``, ``LOCAL_RANK`` or ``SLURM_PROCID`` at import (torchrun and
    srun set them), and counts ``NODE_RANK`` only once the Trainer sets up, after bp-train opened the run.
    """
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ or "JSM_NAMESPACE_RANK" in os.environ:
        return
    node_rank = int(os.environ.get("NODE_RANK", "0") or 0)
    if node_rank > 0:
        devices = trainer.devices if isinstance(trainer.devices, int) else 1
        rank_zero_only.rank = node_rank * max(1, devices) + int(os.environ.get("LOCAL_RANK", "0") or 0)


def slurm_root(slurm: DictConfig, paths: DictConfig, task_name: str) -> tuple[str, Path | None, list[Any]]:
    """(Lightning's root folder, the HPC checkpoint a requeued job resumes from, Trainer plugins).

    A requeued SLURM job keeps its id: Lightning finds its HPC checkpoint under that folder and resumes.
    """
    if not SLURMEnvironment.detect():
        return paths.output_dir, None, []
    root = Path(paths.root_dir) / "outputs" / task_name / f"slurm-{os.environ['SLURM_JOB_ID']}"
    hpc = sorted(root.glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime)
    plugin = SLURMEnvironment(slurm.auto_requeue, getattr(signal, slurm.requeue_signal))
    return str(root), (hpc[-1] if hpc else None), [plugin]
