"""The timing harness every item uses: what a run measures, one table row, round-robin timing."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Row = dict[str, Any]


@dataclass(frozen=True)
class BenchConfig:
    """What one ``bp-bench`` run measures and how hard it tries."""

    quick: bool = False
    reps: int = 200  # timed rounds per side
    warmup: int = 5  # untimed rounds per side first
    memory_reps: int = 3  # profiled steps per side (peak memory is the median)
    compile: bool = False
    devices: tuple[str, ...] = ("cpu",)
    seed: int = 0

    def targets(self) -> list[tuple[str, torch.dtype]]:
        """(device, dtype) pairs to run: float32 on CPU; float32 and bf16 on CUDA."""
        pairs: list[tuple[str, torch.dtype]] = []
        for device in self.devices:
            pairs += (
                [(device, torch.float32)] if device == "cpu" else [(device, torch.float32), (device, torch.bfloat16)]
            )
        return pairs


def device_sync(device: str) -> Callable[[], None]:
    """What waits for ``device`` to finish its queued work: ``torch.cuda.synchronize``, or nothing on the CPU."""
    return torch.cuda.synchronize if device.startswith("cuda") else lambda: None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_row(
    item: str,
    name: str,
    ours: float,
    peer: float,
    *,
    target: float,
    cmp: str,
    unit: str,
    ours_label: str = "bp-service",
    peer_label: str = "peer",
    **details: Any,
) -> Row:
    """One table row. ``ratio = ours / peer``; ``met`` says whether ``ratio cmp target`` holds."""
    if cmp not in ("<=", ">="):
        raise ValueError(f"make_row: cmp must be '<=' or '>=', got {cmp!r}")
    # A difference of medians (an epoch's share of two runs) can come out at or below 0 on a busy machine:
    # that is no measurement, and it is never reported as met.
    measured = ours > 0 and peer > 0
    ratio = ours / peer if measured else float("nan")
    met = measured and (ratio <= target if cmp == "<=" else ratio >= target)
    if not measured:
        details = {**details, "unmeasured": "a timing came out at or below 0 (a busy machine): not a measurement"}
    return {
        "item": item,
        "name": name,
        "ours": float(ours),
        "peer": float(peer),
        "ratio": ratio,
        "target": float(target),
        "cmp": cmp,
        "met": bool(met),
        "unit": unit,
        "ours_label": ours_label,
        "peer_label": peer_label,
        "details": details,
    }


def skipped_row(item: str, name: str, reason: str, *, target: float, cmp: str = "<=", unit: str = "s") -> Row:
    """A row for an item this run left out (``--quick``): listed with its target and why, never met."""
    nan = float("nan")
    return {
        "item": item,
        "name": name,
        "ours": nan,
        "peer": nan,
        "ratio": nan,
        "target": float(target),
        "cmp": cmp,
        "met": False,
        "unit": unit,
        "ours_label": "",
        "peer_label": "",
        "details": {"skipped": reason},
    }


def time_round_robin(
    fns: dict[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int,
    inner: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` samples each, the sides interleaved.

    Round ``r`` runs every function once (``inner`` calls per sample, for devices whose single
    call is too short to time), starting at function ``r mod n``: A B, B A, A B, ... for two.
    The garbage collector is off while timing, as in ``timeit``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(_time_one(fns[name], inner, sync))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _time_one(fn: Callable[[], object], inner: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - t0) / inner
