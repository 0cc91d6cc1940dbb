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
    collection; reference counting still frees it), and the collector runs again on what comes next.

    A Ctrl-C of the start-up that something on the way swallowed (:func:`watch_interrupts`) is raised again here.
    """
    gc.freeze()
    gc.enable()
    with contextlib.suppress(ValueError):  # not the main thread
        if signal.getsignal(signal.SIGINT) is _remember_interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupted:
        raise KeyboardInterrupt


_interrupted = False  # a Ctrl-C arrived during start-up


def watch_interrupts() -> None:
    """Start-up: a Ctrl-C raises KeyboardInterrupt, as always, and is remembered. Library code on the way can
    swallow the exception (seen: a Ctrl-C while Hydra composed, then reported as a config error; another while it
    wrote the job's config, then ignored): :func:`interrupted` still tells, and :func:`startup_done` stops there."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, _remember_interrupt)


def _remember_interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a Ctrl-C arrived during start-up (:func:`watch_interrupts`)."""
    return _interrupted


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


@contextlib.contextmanager
def signals_deferred(*signums: int) -> Iterator[None]:
    """Hold these signals for the block, then deliver each once to the handler in force after it.

    Around the creation of a run: a SIGTERM (or Ctrl-C) between the moment the store records the run and the
    moment its id is known here would leave it RUNNING for good. Held, it arrives when the id is known, and the
    run is closed KILLED like any stopped run. Around each call to the run's tracking process: a call cut in
    the middle of its answer would leave the next call reading the rest of it.
    """
    pending: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, lambda s, f: pending.append(s))
    except ValueError:  # not the main thread: signals are not ours to handle
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def shown_value(value: object, limit: int = 40) -> str:
    """An untrusted value as an error message shows it, in bounded time: a string (quoted, cut to ``limit``
    characters), a number, a short list of them, else only its type. Never its whole ``str``: a list unpickled
    with shared references (``x = [x, x]``, n deep, from a file of a few hundred bytes) prints 2**n characters."""
    if is_small_scalar(value):
        return repr(value[:limit] if isinstance(value, str) else value)
    if isinstance(value, list | tuple) and all(is_small_scalar(v) for v in value[:8]):
        text = f"[{', '.join(shown_value(v, limit) for v in value[:8])}{', ...' if len(value) > 8 else ''}]"
        return text if len(text) <= limit else f"{text[:limit]}..."
    name, size = type(value).__name__, f" of {len(value)}" if isinstance(value, list | tuple | dict) else ""
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}{size}"


def is_small_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | bool | float) or (isinstance(value, int) and _small(value))


def _small(value: int) -> bool:
    return value.bit_length() <= 64  # a larger one's str can exceed Python's digit limit and raise
