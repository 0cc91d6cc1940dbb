"""What the recipe records a run through: :class:`Tracker`, and :class:`NoTracker`, its twin that records nothing.

The recipe, the lifecycle and the artifacts call these methods whether tracking is on or not; a tracking
backend is a subclass (MLflow's is :class:`bp_service.training.tracking.run.MLflowTracker`), chosen in
:mod:`.backends`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no Lightning at import: MLflow's tracking process (.sidecar) runs a tracker without it
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger


# Set, and not 0, in each process of a distributed run but the first (torchrun, srun, jsrun, a second node by hand):
# only the first records the run and talks to its store.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def another_rank() -> bool:
    """Whether this process is one of a distributed run's others, not the first (which records the run)."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in RANK_VARIABLES)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""

    @classmethod
    def unreachable(cls, uri: str, reason: str) -> TrackingError:
        """A tracking server that does not answer: refused before the imports, or by MLflow's own check."""
        return cls(f"tracking server {uri} is unreachable ({reason}); set tracking.required=false to train anyway")


class StoreUnavailable(TrackingError):
    """The embedded store could not be created (a full disk): the run trains on without tracking."""


@dataclass(frozen=True)
class Job:
    """What a tracker is told about its job besides the ``tracking`` and ``paths`` config."""

    task_name: str
    dataset: str  # the data's name, for CSV data the file's stem: the experiment of tracking.experiment=auto
    overrides: list[str]  # Hydra's override strings: the run's name and a tag
    device: str  # what trains, a tag
    resume_id: str | None = None  # the run to continue (read from the checkpoint being resumed)
    sweep_dir: str | None = None  # a multirun's folder: the job's run is a child of the sweep's parent run
    origin: dict[str, str] = field(default_factory=dict)  # tags of a new run started from another's checkpoint
    owner_pid: int | None = None  # the process that trains, when another one writes the run (.sidecar); None: this


class Tracker(ABC):
    """One job's record: params, metrics (through the Trainer's logger), artifacts, figures, the model,
    a link to it, and its end with a status (FINISHED, FAILED or KILLED).

    A backend never lets a failed call stop the training: it reports the loss once (:attr:`lost`) and goes on.
    """

    name: str = ""  # shown in the summary: "<name> run <id>"
    run_id: str | None = None
    experiment: str | None = None  # where the run is filed
    uri: str | None = None  # the store it is recorded in

    @property
    def records(self) -> bool:
        """Whether anything logged is kept. Without it, what only reports (the learning-rate monitor, the
        gradient flow, the pictures and the model) is not computed at all."""
        return True

    @property
    def lost(self) -> str | None:
        """Why tracking stopped mid-run (the first failed call), or None."""
        return None

    @property
    @abstractmethod
    def trainer_logger(self) -> Logger | bool:
        """The Trainer's logger: metrics reach the record through it (False: no logger)."""

    @property
    @abstractmethod
    def trainer_callbacks(self) -> list[pl.Callback]:
        """Callbacks the Trainer needs for this record (such as metrics that travel in checkpoints)."""

    @abstractmethod
    def log_params(self, params: Mapping[str, str]) -> None:
        """The run's params (a continued run keeps those it started with)."""

    @abstractmethod
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...

    @abstractmethod
    def log_text(self, text: str, name: str) -> None: ...

    @abstractmethod
    def log_figure(self, figure: Any, name: str) -> None: ...

    def log_figures(self, drawn: Mapping[str, Callable[[], Any]]) -> Callable[[], None]:
        """Draw and log pictures (name -> what draws its figure); returns what waits until they are all written.

        Here they are drawn one after the other, now; a backend may draw them beside the caller's other work."""
        for name, draw in drawn.items():
            self.log_figure(draw(), name)
        return lambda: None

    @abstractmethod
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...

    @abstractmethod
    def set_tag(self, key: str, value: str) -> None: ...

    @abstractmethod
    def flush(self) -> None:
        """Write the metrics held so far."""

    @abstractmethod
    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Each metric's (step, value) pairs, the whole run's (a continued run's too)."""

    @abstractmethod
    def log_model(self, bundle_path: Path, input_example: Any, register_as: str | None, step: int) -> None:
        """The servable model around the bundle at ``bundle_path``; registered as ``register_as`` if given; the run's
        metrics at ``step`` (its last: test, best and last validation) are the model's own."""

    @abstractmethod
    def link(self) -> str | None:
        """Where to see the run (the summary's dashboard line), or None."""

    @abstractmethod
    def end(self, status: str) -> None:
        """Close the record as FINISHED, FAILED or KILLED; never raises."""


class WrittenTracker(Tracker):
    """A tracker whose metrics reach the record through a writer (``self.writer``: record, flush, pending,
    log_params, run_id, experiment_id): the Trainer's logger and callbacks are built over it on first use, in the
    process that trains (:mod:`.logger`, Lightning's side)."""

    writer: Any
    _lightning: tuple[Any, list[Any]] | None = None

    @property
    def trainer_logger(self) -> Logger:
        return self._lightning_side()[0]

    @property
    def trainer_callbacks(self) -> list[pl.Callback]:
        return self._lightning_side()[1]

    def _lightning_side(self) -> tuple[Any, list[Any]]:
        if self._lightning is None:
            from bp_service.training.tracking.logger import run_logger

            self._lightning = run_logger(self.writer)
        return self._lightning

    _artifact_uri: str | None = None  # where the run's artifacts are

    def log_figures(self, drawn: Mapping[str, Callable[[], Any]]) -> Callable[[], None]:
        """Into a store on this machine, the pictures are drawn by forked processes while this one goes on (the
        model's logging); the returned wait names them (:func:`~.pictures.log_apart`, through ``pictures_written``
        and ``lose``)."""
        from bp_service.training.tracking.pictures import can_draw_apart, local_artifact_dir, log_apart

        folder = local_artifact_dir(self._artifact_uri)
        if not drawn or self.lost or not can_draw_apart(folder):
            return super().log_figures(drawn)
        return log_apart(self, drawn, folder)


class NoTracker(Tracker):
    """``tracking.enabled=false`` (and every DDP process but the first): every call is answered with nothing."""

    @property
    def records(self) -> bool:
        return False

    @property
    def trainer_logger(self) -> bool:
        return False

    @property
    def trainer_callbacks(self) -> list[pl.Callback]:
        return []

    def log_params(self, params: Mapping[str, str]) -> None:
        pass

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        return {}

    def log_model(self, bundle_path: Path, input_example: Any, register_as: str | None, step: int) -> None:
        pass

    def link(self) -> str | None:
        return None

    def end(self, status: str) -> None:
        pass
