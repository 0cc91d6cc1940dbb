"""Console entry points: each imports its command only when run, so a Ctrl-C during the heavy
imports (torch, Lightning, MLflow: seconds on a small machine) ends with one line and exit 130,
as it does once the command is running, instead of Python's traceback."""

from __future__ import annotations

import gc
import os
import sys
from importlib import import_module

from bp_service.commands import EXIT_INTERRUPT, pause_collector, startup_done, watch_interrupts


def _run(module: str, command: str, settles_itself: bool = False) -> None:
    """Import and run a command. ``settles_itself``: its heavy imports happen inside ``main`` (bp-train's come
    after its config and data checks), and it calls :func:`~bp_service.commands.startup_done` once they are
    over; for the others, start-up ends with the import of their module."""
    pause_collector()
    watch_interrupts()
    try:
        main = import_module(module).main
        if not settles_itself:
            startup_done()
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPT) from None
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # one the command did not answer itself
        print(f"{command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPT) from None
    finally:
        # The command is done: without this, the interpreter's last collections walk every object torch,
        # Lightning and MLflow created at import (about 0.8 s of a 2-core machine's exit). Frozen objects are
        # still released by reference counting; only the cyclic collector skips them.
        gc.freeze()


def bp_train() -> None:
    _run("bp_service.training.cli", "bp-train", settles_itself=True)


def bp_predict() -> None:
    if sys.argv[1:] == ["--tracking-uri"]:  # read by shells in $(...): answered without the heavy imports
        from bp_service.home import tracking_uri

        print(tracking_uri())
        sys.exit(0)
    _run("bp_service.serving.predict", "bp-predict")


def bp_runs() -> None:
    if sys.argv[1:] == ["uri"]:  # read by shells in $(...) (make ui): answered without the heavy imports
        from bp_service.home import tracking_uri

        print(tracking_uri())
        sys.exit(0)
    _run("bp_service.training.runs", "bp-runs")


def bp_explain() -> None:
    _run("bp_service.explain.cli", "bp-explain")


def bp_bench() -> None:
    # bp_service.bench.quiet_native_logs's switches, set before torch loads (it reads them then); the entry
    # points import no command's package.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    _run("bp_service.bench.cli", "bp-bench")
