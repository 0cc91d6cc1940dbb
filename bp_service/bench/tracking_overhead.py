"""bp-bench's tracking overhead: what MLflow tracking adds to a training run (target: at most 1 s per run).

Both sides are whole fresh ``bp-train experiment=digits`` processes, the same command but for
``tracking.enabled=false``, alternating (A B, B A, ...) in one home whose store a first, untimed
tracked run created. Fresh processes, because that is what ``make train`` costs a user: the imports
only a tracked run needs (``mlflow.pyfunc``, the first figure, the package scan behind MLflow's
requirements check) count, and an in-process loop after a warm-up would hide them. What both pay
alike (the interpreter, ``import lightning``) cancels in the difference. Each side's figure is the
median wall time; the overhead is the median of the paired differences.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bp_service.bench.harness import BenchConfig, Row, make_row

BUDGET_S = 1.0  # tracking may add at most this to a run
JOB = ["experiment=digits", "trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _wall(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one process: its CPU time moves far less than its wall time when
    other processes compete for the cores, so it says whether a difference in wall time is real."""
    started, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return wall, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def overhead_row(tracked: list[float], untracked: list[float], cpu: dict[str, list[float]] | None = None) -> Row:
    """The tracking-overhead row from paired wall times: ours = the tracked run, peer = the untracked run plus
    the 1 s budget, so the ratio is at most 1.0 exactly when tracking adds at most 1 s. ``cpu``: each side's
    CPU seconds."""
    paired = [t - u for t, u in zip(tracked, untracked, strict=True)]
    cpu = cpu or {"tracked": [], "untracked": []}
    cpu_paired = [t - u for t, u in zip(cpu["tracked"], cpu["untracked"], strict=True)]
    untracked_s, overhead = statistics.median(untracked), statistics.median(paired)
    return make_row(
        "tracking-overhead",
        "tracking overhead per run, digits job: tracked run vs untracked run + 1 s",
        untracked_s + overhead,
        untracked_s + BUDGET_S,
        target=1.0,
        cmp="<=",
        unit="s",
        ours_label="bp-train, MLflow tracking on",
        peer_label="bp-train, tracking off, + 1 s",
        overhead_s=overhead,
        budget_s=BUDGET_S,
        tracked_s=tracked,
        untracked_s=untracked,
        paired_overhead_s=paired,
        cpu_overhead_s=statistics.median(cpu_paired) if cpu_paired else None,
        cpu_tracked_s=cpu["tracked"],
        cpu_untracked_s=cpu["untracked"],
        reps=len(paired),
        timing="whole fresh processes, sides alternating; overhead = median of paired differences",
    )


def item_tracking_overhead(cfg: BenchConfig) -> list[Row]:
    """``bp-train experiment=digits`` with MLflow tracking (embedded SQLite store, model logged) vs without."""
    reps = 1 if cfg.quick else 5  # pairs: a difference of about a second between runs that move by tenths
    command = [str(Path(sys.executable).parent / "bp-train"), *JOB]
    sides = {"tracked": command, "untracked": [*command, "tracking.enabled=false"]}
    walls: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_", "BP_SERVICE_"))}
        env["BP_SERVICE_HOME"] = home
        for side in sides.values():  # the first creates the store (once per home, not per run); both warm the cache
            _wall(side, env)
        for r in range(reps):
            for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
                wall, seconds = _wall(sides[name], env)
                walls[name].append(wall)
                cpu[name].append(seconds)
    return [overhead_row(walls["tracked"], walls["untracked"], cpu)]
