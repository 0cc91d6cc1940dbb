"""MLflow in a process of its own, beside ``bp-train``: its imports and its writes on the machine's other core.

A tracked run spends about a second importing MLflow and its SQL store, and half a second logging the model
(MLflow checks the requirements against every installed package, and reloads the model to try the input example).
In ``bp-train``'s own process that second comes on top of torch's and Lightning's imports. So ``bp-train`` forks
this process as soon as the config and the data are checked, before it imports torch: MLflow loads here while
torch loads there, and later the model's logging tools load here while the network trains there.

:class:`RemoteTracker` is the :class:`~bp_service.training.tracking.interface.Tracker` ``bp-train`` records
through; this process runs MLflow's own tracker (:class:`~bp_service.training.tracking.run.MLflowTracker`) and
answers its calls in order. Metrics are sent without waiting (the Trainer's logger); every other call waits for
its answer, so errors, the order of writes and the run's end are what they are in one process. Signals are
``bp-train``'s to handle: this process ignores them and ends when ``bp-train`` closes the run; killed with
``bp-train`` (kill -9), it dies with it, leaving the run to ``bp-runs stale`` as one process would.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bp_service.commands import first_line, signals_deferred
from bp_service.training.tracking.buffer import MetricBuffer
from bp_service.training.tracking.interface import Job, WrittenTracker, another_rank
from bp_service.training.tracking.pictures import render

PR_SET_PDEATHSIG = 1  # prctl(2)
# bp-train's to handle (a terminal or scancel signals the whole group): it ends the run.
IGNORED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}

_waiting: TrackingProcess | None = None  # started for the job about to run, not yet taken by its tracker


class TrackingProcessGone(RuntimeError):
    """The tracking process ended (killed, out of memory) or its pipe broke."""


def start(
    cfg: DictConfig, tracker: Callable[..., Any], head_start: Callable[[DictConfig], list[Callable[[], None]]]
) -> None:
    """Fork the tracking process for this job, if it will record and forking is safe: on Linux, one thread (a fork
    copies no other), torch not yet loaded (its thread pools do not survive a fork), and this the first process.

    Args:
        cfg: the job's config.
        tracker: builds the run's tracker there, from ``(tracking, paths, job)``.
        head_start: there, loads what opening a run needs and returns what else to prepare before it opens
            (given the job's config).
    """
    global _waiting
    discard()
    if not cfg.tracking.enabled or not sys.platform.startswith("linux") or "torch" in sys.modules:
        return
    if "mlflow" in sys.modules:  # a sweep's parent run opened here: its store's connections must not be shared
        return
    if threading.active_count() > 1 or another_rank():
        return
    _waiting = TrackingProcess(tracker, lambda: head_start(cfg))


def take() -> TrackingProcess | None:
    """The tracking process started for this job (once), or None."""
    global _waiting
    process, _waiting = _waiting, None
    return process


def discard() -> None:
    """Stop a tracking process no tracker took (the job stopped first, or records nothing): it has only loaded
    modules, so it is not waited for."""
    process = take()
    if process is not None:
        process.close(stop=True)


class TrackingProcess:
    """The forked process and the pipe to it; :meth:`call` waits for the answer, :meth:`send` does not."""

    def __init__(self, tracker: Callable[..., Any], head_start: Callable[[], list[Callable[[], None]]]) -> None:
        here, there = multiprocessing.Pipe()
        sys.stdout.flush()  # a fork copies what is buffered: printed twice otherwise
        sys.stderr.flush()
        parent = os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, IGNORED)  # a signal now is bp-train's, after the fork
        pid = os.fork()
        if pid == 0:  # the tracking process: never returns into bp-train's code
            try:
                for signum in IGNORED:
                    signal.signal(signum, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                _die_with(parent)
                here.close()
                _serve(there, tracker, head_start)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        there.close()
        self.pid, self._pipe = pid, here
        self._numbers = itertools.count(1)

    def call(self, target: str, name: str, *args: Any) -> Any:
        """``target.name(*args)`` there (``target``: "tracker" or "writer"; an attribute is read), its answer here;
        what it raised is raised here."""
        number = next(self._numbers)
        with signals_deferred(signal.SIGINT, signal.SIGTERM):  # never cut mid-answer
            try:
                self._pipe.send((number, target, name, args))
                while True:
                    answered, ok, value = self._pipe.recv()
                    if answered == number:
                        break
            except (EOFError, OSError) as exc:
                raise TrackingProcessGone(f"the tracking process ended ({type(exc).__name__})") from None
        if not ok:
            raise value
        return value

    def send(self, target: str, name: str, *args: Any) -> None:
        """``target.name(*args)`` there, not waiting: in order with the calls before and after it."""
        try:
            with signals_deferred(signal.SIGINT, signal.SIGTERM):  # a message cut in two would stall the pipe
                self._pipe.send((0, target, name, args))
        except OSError as exc:
            raise TrackingProcessGone(f"the tracking process ended ({type(exc).__name__})") from None

    def close(self, stop: bool = False) -> None:
        """Let it end (``stop``: end it now, SIGKILL), and wait for it."""
        try:
            self._pipe.close()  # its end of the pipe reads EOF: it exits
            if stop:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def _die_with(parent: int) -> None:
    """bp-train killed (kill -9, out of memory) kills this process too, whatever it is doing (the kernel's
    parent-death signal): a run is then left as one process would leave it, never completed by half."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # killed before the signal was armed
        os._exit(0)


def _serve(pipe, tracker: Callable[..., Any], head_start: Callable[[], list[Callable[[], None]]]) -> None:
    """The tracking process: import MLflow's side, then answer calls in order until the pipe closes."""
    code = 0
    try:
        # While bp-train imports torch (one core), MLflow loads here, then what logging the model needs. Whatever
        # is left when the run opens is left to the model's logging: beside the training, it would slow it down
        # (torch's threads want both cores).
        steps = head_start()
        objects: dict[str, Any] = {}
        while True:
            if steps and not pipe.poll():
                with contextlib.suppress(Exception):  # a head start only: what failed loads when it is used
                    steps.pop(0)()
                continue
            try:
                number, target, name, args = pipe.recv()
            except (EOFError, OSError):
                break
            if name == "open":
                steps.clear()
            try:
                ok, value = True, _answer(objects, tracker, target, name, args)
            except BaseException as exc:
                ok, value = False, exc
            if number:
                pipe.send((number, ok, value if ok else _portable(value)))
            elif not ok:
                print(f"bp-train: warning: tracking call {name} failed: {first_line(value)}", file=sys.stderr)
    except BaseException as exc:  # the process ends here, never returns into bp-train's code
        print(f"bp-train: warning: the tracking process failed: {type(exc).__name__}: {first_line(exc)}",
              file=sys.stderr)  # fmt: skip
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def _answer(objects: dict[str, Any], opener: Callable[..., Any], target: str, name: str, args: tuple) -> Any:
    if name == "open":
        tracker = objects["tracker"] = opener(*args)
        objects["writer"] = tracker.writer
        return {
            "run_id": tracker.run_id,
            "experiment": tracker.experiment,
            "experiment_id": tracker.writer.experiment_id,
            "uri": tracker.uri,
            "resumed": tracker.resumed,
            "artifact_uri": tracker.artifact_uri,
            "replayed_until": tracker.writer.replayed_until,
            "finished_before": tracker.finished_before,
        }
    if name == "end":  # what is read after the run closed, then nothing more
        objects["tracker"].end(*args)
        return {"lost": objects["tracker"].lost, "link": objects["tracker"].link()}
    member = getattr(objects[target], name)
    return member(*args) if callable(member) else member


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it crosses the pipe whole, else a RuntimeError with its line."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {first_line(exc)}")


class RemoteTracker(WrittenTracker):
    """The tracker of a run whose MLflow calls run in the tracking process (see the module's docstring).

    Args:
        process: the job's tracking process (:func:`take`).
        tracking, paths, job: as :class:`~bp_service.training.tracking.run.MLflowTracker`'s; ``tracking.experiment``
            is resolved in place, as there.
    """

    name = "MLflow"

    def __init__(self, process: TrackingProcess, tracking: DictConfig, paths: DictConfig, job: Job) -> None:
        self._process = process
        try:
            opened = process.call("tracker", "open", tracking, paths, replace(job, owner_pid=os.getpid()))
        except BaseException:
            process.close()
            raise
        tracking.experiment = opened["experiment"]
        self.run_id, self.experiment, self.uri = opened["run_id"], opened["experiment"], opened["uri"]
        self.resumed, self._artifact_uri = opened["resumed"], opened["artifact_uri"]
        self._finished_before: int | None = opened["finished_before"]  # a FINISHED run this job continues
        self.writer = RemoteWriter(self, opened["run_id"], opened["experiment_id"], opened["replayed_until"])
        self._gone: str | None = None  # why tracking stopped when the process ended
        self._ended: dict[str, Any] | None = None  # what the run's end answered

    def _call(self, target: str, name: str, *args: Any) -> Any:
        if self._gone or self._ended is not None:
            return None
        try:
            return self._process.call(target, name, *args)
        except TrackingProcessGone as exc:
            self._lose_process(exc)
            return None

    def _send(self, target: str, name: str, *args: Any) -> None:
        if self._gone or self._ended is not None:
            return
        try:
            self._process.send(target, name, *args)
        except TrackingProcessGone as exc:
            self._lose_process(exc)

    def _lose_process(self, exc: TrackingProcessGone) -> None:
        self._gone = str(exc)
        warnings.warn(f"MLflow tracking lost, training goes on without it ({self._gone})", stacklevel=4)

    @property
    def lost(self) -> str | None:
        if self._ended is not None:
            return self._ended["lost"]
        return self._gone or self._call("tracker", "lost")

    # What cannot fail there (a failed write loses tracking, with its warning) is sent without waiting.
    def log_params(self, params: Mapping[str, str]) -> None:
        self._send("tracker", "log_params", dict(params))

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._send("tracker", "log_dict", data, name)

    def log_text(self, text: str, name: str) -> None:
        self._send("tracker", "log_text", text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        self._send("tracker", "write_picture", render(figure, name), name)

    def pictures_written(self, names: list[str]) -> None:
        self._send("tracker", "pictures_written", names)

    def lose(self, what: str, error: str) -> None:
        self._send("tracker", "lose", what, error)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._send("tracker", "log_artifact", str(path), folder)

    def set_tag(self, key: str, value: str) -> None:
        self._send("tracker", "set_tag", key, value)

    def flush(self) -> None:
        self.writer.flush()

    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        if not self.resumed:  # as logged by this process
            return {key: self.writer.history[key] for key in keys if key in self.writer.history}
        self.flush()
        return self._call("tracker", "metric_history", keys) or {}

    def log_model(self, bundle_path: Path, input_example: Any, register_as: str | None, step: int) -> None:
        self._call("tracker", "log_model", bundle_path, input_example, register_as, step)

    def link(self) -> str | None:
        if self._ended is not None:
            return self._ended["link"]
        return self._call("tracker", "link")

    def end(self, status: str) -> None:
        """Close the run there, then the process, with signals held (a signal meanwhile arrives after it); the run
        is closed from here if the process is gone."""
        with signals_deferred(signal.SIGINT, signal.SIGTERM):
            try:
                if not self._gone and self._ended is None:
                    self.writer.flush()  # what the run measured before it stopped, whatever stopped it
                    self._ended = self._process.call("tracker", "end", status)
            except TrackingProcessGone as exc:
                self._gone = str(exc)
            except Exception as exc:
                reason = first_line(exc)[:200]
                warnings.warn(f"could not mark MLflow run {self.run_id} {status}: {reason}", stacklevel=3)
            finally:
                self._process.close()
            if self._ended is None:
                self._ended = {"lost": self._gone, "link": None}
                self._end_here(status)

    def _end_here(self, status: str) -> None:
        """The process died with the run open: close it from here, as it would have (a continued FINISHED run keeps
        its record, the outcome a tag), so that it is not left RUNNING."""
        try:
            from mlflow import MlflowClient

            from bp_service.training.store import close_run, quick_http

            with quick_http(retries=1):
                close_run(MlflowClient(self.uri), self.run_id, status, self._finished_before)
        except Exception as exc:
            warnings.warn(f"could not mark MLflow run {self.run_id} {status}: {first_line(exc)[:200]}", stacklevel=4)


class RemoteWriter(MetricBuffer):
    """What the Trainer's logger (:class:`~bp_service.training.tracking.logger.RunLogger`) writes through, for a
    run in the tracking process: metrics are held here (a checkpoint takes those not yet written) and each batch
    is sent without waiting."""

    def __init__(self, tracker: RemoteTracker, run_id: str, experiment_id: str, replayed_until: dict[str, int]):
        super().__init__(lambda rows: tracker._send("writer", "write_rows", rows), replayed_until)
        self._tracker, self.run_id, self.experiment_id = tracker, run_id, experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._tracker._send("writer", "log_params", dict(params))
