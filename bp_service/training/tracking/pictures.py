"""A run's pictures: drawn by a forked process beside the caller's other work, each file written whole or not at
all, and where a run's artifacts are when they are on this machine. No MLflow here: the tracker's own process
and ``bp-train``'s (which holds the model and the data the pictures are drawn from) both use it."""

from __future__ import annotations

import io
import multiprocessing
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from bp_service.commands import first_line
from bp_service.files import atomic_path

# What a drawing process reports: (names written, None | "draw" | the picture whose write failed, what went wrong)
Outcome = tuple[list[str], str | None, str | None]


def can_draw_apart(folder: Path | None) -> bool:
    return folder is not None and "fork" in multiprocessing.get_all_start_methods()


def draw_apart(drawn: Mapping[str, Callable[[], Any]], folder: Path) -> Callable[[], Outcome]:
    """Draw and write the pictures into ``folder``, each in a forked process; returns what waits for the outcome
    (the first failure, in ``drawn``'s order, is the one reported).

    Matplotlib's work, about a tenth of a second a picture, then runs on the other cores while the caller goes on
    (the model's logging). Python threads would not do: both sides hold the GIL, and together took longer than one
    after the other. A drawing process writes files only, never a store's database."""
    context = multiprocessing.get_context("fork")
    drawing = []
    for name, draw in drawn.items():
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_draw, args=(name, draw, folder, send), name=f"bp-train picture {name}")
        child.start()
        send.close()
        drawing.append((child, receive))

    def wait() -> Outcome:
        written: list[str] = []
        failed: tuple[str, str] | None = None
        for child, receive in drawing:
            try:
                name, problem, error = receive.recv()
            except EOFError:  # it ended without a word (a signal)
                child.join()
                name, problem, error = "", "pictures", f"the drawing process ended with code {child.exitcode}"
            finally:
                child.join()
                receive.close()
            if problem is None:
                written.append(name)
            elif failed is None:
                failed = (problem, error)
        return (written, *(failed or (None, None)))

    return wait


def _draw(name: str, draw: Callable[[], Any], folder: Path, send) -> None:
    """One drawing process: sends back (name, None | "draw" | the picture whose write failed, what went wrong).

    Ctrl-C and SIGTERM are bp-train's to act on (a terminal or a scheduler signals the whole group): this
    process finishes its picture, a fraction of a second, rather than report the signal as a drawing's error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        figure = draw()
        with atomic_path(folder / name) as tmp:
            figure.savefig(tmp, format=picture_format(name))
    except OSError as exc:  # the disk, not the drawing
        send.send((name, name, first_line(exc)))
    except BaseException as exc:
        send.send((name, "draw", f"{name}: {type(exc).__name__}: {first_line(exc)}"))
    else:
        send.send((name, None, None))


def picture_format(name: str) -> str:
    return Path(name).suffix.lstrip(".") or "png"


def render(figure: Any, name: str) -> bytes:
    """A figure's file, in the format its name says."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=picture_format(name))
    return buffer.getvalue()


def local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The folder of a run's artifacts when it is on this machine (``file:`` or a plain path), else None."""
    if not artifact_uri:
        return None
    location = urlparse(artifact_uri)
    if location.scheme not in ("", "file") or location.netloc not in ("", "localhost"):
        return None
    return Path(url2pathname(location.path))


def log_apart(tracker: Any, drawn: Mapping[str, Callable[[], Any]], folder: Path) -> Callable[[], None]:
    """:meth:`~.interface.Tracker.log_figures` of a tracker whose pictures go to ``folder``: drawn apart, and the
    returned wait tells the tracker what was written (``pictures_written``) or why it lost tracking (``lose``)."""
    outcome = draw_apart(drawn, folder)

    def wait() -> None:
        written, failed, error = outcome()
        tracker.pictures_written(written)
        if failed == "draw":
            raise RuntimeError(f"drawing {error}")
        if failed is not None:
            tracker.lose(failed, error)  # a full disk: tracking lost, with its warning; the run stands

    return wait
