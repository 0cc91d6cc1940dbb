"""What every bp-service command shares: one-line errors, exit statuses, and SIGTERM (stdlib only)."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad arguments, config or input: the user can fix it
EXIT_INTERRUPT = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143, what schedulers expect from a job stopped by SIGTERM


def pause_collector() -> None:
    """Start-up: the cyclic garbage collector off while the heavy imports (torch, Lightning, MLflow) run.

    What they make lives as long as the process, yet each full collection walks all of it again: about 0.8 s of
    a tracked digits run on a 2-core machine went to collections that freed nothing. :func:`startup_done` turns
    the collector back on.
    """
    gc.disable()


def startup_done() -> None:
    """The command's imports and set-up are done: what exists now is frozen (left out of every later
    collection; reference counting still frees it), and the collector runs again on what comes next."""
    gc.freeze()
    gc.enable()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def full_error_requested() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``) rather than one-line errors.

    ``bp-train`` sets ``HYDRA_FULL_ERROR=1`` for Hydra itself and keeps the user's choice in
    ``BP_SERVICE_FULL_ERROR``, which child processes (DDP ranks) inherit.
    """
    return os.environ.get("BP_SERVICE_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


def columns(rows: Sequence[Sequence[object]], indent: str = "", gap: str = "  ") -> list[str]:
    """Rows as left-aligned text columns, each as wide as its widest cell (a row may be shorter)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    return [(indent + gap.join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in cells]


@contextlib.contextmanager
def sigterm_handler(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` answers SIGTERM inside the block; the previous handler comes back after it.

    Outside the main thread signals are not ours to handle, and the block runs without one.
    """
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
