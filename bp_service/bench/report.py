"""What a run prints and records: the table, the other processes' CPU load meanwhile, the run's metadata."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch

from bp_service.bench.harness import BenchConfig, Row
from bp_service.commands import columns

_UNITS = {"s": (1e3, "ms"), "B": (1 / 2**20, "MiB"), "FLOP/s": (1e-9, "GFLOP/s")}


def _fmt(value: float, unit: str) -> str:
    if value != value:  # NaN: nothing was measured
        return "-"
    scale, label = _UNITS.get(unit, (1.0, unit))
    return f"{value * scale:.3f} {label}".rstrip()


def _outcome(row: Row) -> tuple[str, str]:
    """The ratio and met columns: a skipped or unmeasured row says so in both, never a number or "yes"."""
    details = row.get("details", {})
    if details.get("skipped"):
        return "skipped", "skipped"
    if details.get("unmeasured") or row["ratio"] != row["ratio"]:
        return "unmeasured", "no (unmeasured)"
    return f"{row['ratio']:.3f}", "yes" if row["met"] else "NO"


def format_table(rows: Sequence[Row]) -> str:
    header = ("item", "what", "ours", "peer", "ratio", "target", "met")
    lines = [
        (
            r["item"],
            r["name"],
            _fmt(r["ours"], r["unit"]),
            _fmt(r["peer"], r["unit"]),
            *_outcome(r)[:1],
            f"{r['cmp']} {r['target']:.2f}",
            *_outcome(r)[1:],
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    return "\n".join(columns([header, ["-" * w for w in widths], *lines]))


class OtherLoad:
    """CPU time other processes took while we measured, in cores on average (Linux ``/proc/stat``).

    The machine's busy time minus our own process's CPU time and that of the processes it started and
    waited for, over the wall time. Anything well
    above zero means other processes competed for the cores and timings are noisy.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = os.times()  # ours and our finished children's (bp-bench's bp-train processes): not "other"
        return time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        wall, busy, own = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own) / wall)


def run_meta(cfg: BenchConfig, items: Sequence[str], other_cores: float | None) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "quick": cfg.quick,
        "reps": cfg.reps,
        "warmup": cfg.warmup,
        "items": list(items),
        "timing": "median over reps, sides interleaved round robin with the order rotated each round",
        "other_processes_cpu_cores": other_cores,
    }
