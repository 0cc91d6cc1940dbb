"""``bp-bench``: the command line, the item registry, and the run that prints the table and writes the JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path

import torch

from bp_service.bench.harness import BenchConfig, Row, skipped_row
from bp_service.bench.report import OtherLoad, format_table, run_meta
from bp_service.bench.tracking_overhead import item_tracking_overhead
from bp_service.bench.training_step import item_peak_memory, item_roofline, item_step_time


def _job_item(name: str) -> Callable[[BenchConfig], list[Row]]:
    """An item of :mod:`bp_service.bench.training_job`, imported only when run: it imports Lightning."""

    def item(cfg: BenchConfig) -> list[Row]:
        return getattr(import_module("bp_service.bench.training_job"), name)(cfg)

    item.__name__ = name
    return item


item_lightning_overhead = _job_item("item_lightning_overhead")
item_peer_job = _job_item("item_peer_job")

# Adding an item is one line here: a function ``(BenchConfig) -> list[Row]`` building its rows with ``make_row``.
ITEMS: dict[str, tuple[str, Callable[[BenchConfig], list[Row]]]] = {
    "step-time": ("training step time, custom vs native autograd", item_step_time),
    "peak-memory": ("training step peak memory, custom vs native autograd", item_peak_memory),
    "roofline": ("custom step FLOP/s vs torch.mm", item_roofline),
    "lightning-overhead": ("epoch time, bp-train's Lightning loop vs a plain loop", item_lightning_overhead),
    "peer-job": ("cold process to a tested digits model, bp-train vs scikit-learn", item_peer_job),
    "tracking-overhead": (
        "tracking overhead per digits run, MLflow on vs off (target: at most 1 s)",
        item_tracking_overhead,
    ),
}
# Items ``--quick`` lists as skipped rather than run: why, and the target the full run holds them to.
QUICK_SKIPS: dict[str, tuple[str, float]] = {
    "tracking-overhead": (
        "whole bp-train processes with and without MLflow, about a minute: bp-bench --items tracking-overhead",
        1.0,
    ),
}
# The numbers the items once had, still accepted by ``--items`` (``--items 1,2`` is ``--items step-time,peak-memory``).
NUMBERED = dict(zip("123456", ITEMS))


def _parse_items(text: str) -> list[str]:
    given = [s.strip() for s in text.split(",") if s.strip()]
    items = [NUMBERED.get(s, s) for s in given]
    unknown = [s for s in items if s not in ITEMS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown item(s) {unknown or text!r}; choose from {', '.join(ITEMS)}")
    return list(dict.fromkeys(items))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bp-bench",
        description="Measure bp-service against its peers in one process; every figure is a ratio to its peer.",
        epilog="items: " + "; ".join(f"{k}: {desc}" for k, (desc, _) in ITEMS.items()),
    )
    p.add_argument(
        "--items",
        type=_parse_items,
        default=list(ITEMS),
        help="comma list, e.g. step-time,roofline (the numbers 1-6 still work; default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="few repetitions, the job items reduced and tracking-overhead skipped: under a minute on 2 idle cores",
    )
    p.add_argument("--reps", type=int, help="timed repetitions per side (default 200, quick 15)")
    p.add_argument("--warmup", type=int, help="untimed repetitions per side first (default 5, quick 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before measuring (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="step-time: MLP.cost and native under torch.compile too")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="cuda/all only where available")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write rows and run metadata as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("bp-bench: --device cuda but torch.cuda.is_available() is False")
    devices = {"cpu": ("cpu",), "cuda": ("cuda",), "all": ("cpu", "cuda") if cuda else ("cpu",)}[args.device]
    reps = args.reps if args.reps is not None else (15 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if reps < 1 or warmup < 0:
        raise SystemExit("bp-bench: --reps must be >= 1 and --warmup >= 0")
    return BenchConfig(
        quick=args.quick,
        reps=reps,
        warmup=warmup,
        memory_reps=1 if args.quick else 3,
        compile=args.compile,
        devices=devices,
        seed=args.seed,
    )


def run_items(cfg: BenchConfig, items: Sequence[str]) -> list[Row]:
    """Every selected item's rows, in order; each item's wall time on stderr."""
    rows: list[Row] = []
    for key in items:
        desc, fn = ITEMS[key]
        if cfg.quick and key in QUICK_SKIPS:
            reason, target = QUICK_SKIPS[key]
            rows.append(skipped_row(key, f"{desc}: skipped in --quick", reason, target=target))
            print(f"  {key}: skipped in --quick ({reason})", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        new = fn(cfg)
        print(f"  {key} ({desc}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows += new
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    other_load = OtherLoad()
    print(
        f"bp-bench: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"devices {', '.join(cfg.devices)}, {cfg.reps} reps per side",
        file=sys.stderr,
    )
    rows = run_items(cfg, args.items)
    other_cores = other_load.cores()
    meta = run_meta(cfg, args.items, other_cores)
    if other_cores is not None and other_cores > 0.2:
        print(
            f"bp-bench: other processes used {other_cores:.2f} of {os.cpu_count()} CPU cores meanwhile: "
            "timing ratios are noisy (see details.paired_ratio_* and ratio_p10 in --json)",
            file=sys.stderr,
        )
    load = "unknown" if other_cores is None else f"{other_cores:.2f} cores"
    print(f"threads: {torch.get_num_threads()}, other processes meanwhile: {load}")
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
