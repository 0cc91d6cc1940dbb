"""A training step's time, peak memory and roofline, bp-train's path vs native autograd.

Each item is a function ``(BenchConfig) -> list[Row]`` (registered in :data:`bp_service.bench.cli.ITEMS`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bp_service.bench.flops import counted_step_flops, mlp_step_flops, step_gemms
from bp_service.bench.harness import BenchConfig, Row, device_sync, dtype_name, make_row, time_round_robin
from bp_service.bench.memory import peak_memory_bytes
from bp_service.bench.stats import paired_ratio_stats, percentile
from bp_service.bench.steps import (
    BATCH,
    CROSS_ENTROPY_SHAPE,
    GPU_SHAPE,
    SIDES,
    SIZES,
    Shape,
    TrainStep,
    build_cross_entropy_steps,
    build_steps,
    shapes_for,
)

MEMORY_TARGET = 1.10
# Step time on CUDA: captured >= 3x faster than native eager, within 1.05x of native captured.
CAPTURED_PEERS = (("native", "step-time-captured", 1 / 3), ("native_captured", "step-time-both-captured", 1.05))
STEP_SIDES = (("cost", "step-time"), ("custom", "step-time-layers"), ("compiled", "step-time-compiled"))
# With --compile: the compiled cost path (model.compile=true) against native compiled the same way too.
COMPILED_PEER = ("compiled", "native_compiled", "step-time-compiled-vs-compiled")
MEMORY_SIDES = (("cost", "peak-memory"), ("custom", "peak-memory-layers"))


def step_common(device: str, dtype: torch.dtype, sizes: Sequence[int] = SIZES, batch: int = BATCH) -> dict[str, Any]:
    """The ``details`` every step row carries: where and at which shape it ran."""
    return {
        "device": device,
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "sizes": list(sizes),
        "batch": batch,
    }


def shape_name(label: str, sizes: Sequence[int], batch: int) -> str:
    return f"{label} {'-'.join(map(str, sizes))}, batch {batch}"


# --------------------------------------------------------------------------- step time
def item_step_time(cfg: BenchConfig) -> list[Row]:
    """Median training-step time over native autograd's, at every shape users run.

    For each shape of :func:`~bp_service.bench.steps.shapes_for` (the digits job's network, the
    worked example's, the MNIST-sized one, and on CUDA a GPU-sized one): row ``step-time`` is
    bp-train's path (``MLP.cost``), ``step-time-layers`` the per-layer Functions (fused),
    ``step-time-compiled`` (with ``--compile``) the cost path under ``torch.compile`` (``model.compile=true``)
    vs native eager and ``step-time-compiled-vs-compiled`` vs native under ``torch.compile`` too; on CUDA
    ``step-time-captured`` (the captured step vs native eager) and ``step-time-both-captured`` (vs
    native captured). All sides of a shape are timed in the same rounds; small steps are timed in
    groups of calls so that the clock's resolution does not matter.
    """
    rows = []
    for device, dtype in cfg.targets():
        cuda = device.startswith("cuda")
        sides = ["cost", "custom", *(["compiled"] if cfg.compile else []), "native"]
        sides += ["native_compiled"] if cfg.compile else []
        sides += ["captured", "native_captured"] if cuda else []
        for shape in shapes_for(device):
            rows += _step_time_rows(cfg, device, dtype, sides, shape)
        rows.append(_cross_entropy_time_row(cfg, device, dtype))
    return rows


def _cross_entropy_time_row(cfg: BenchConfig, device: str, dtype: torch.dtype) -> Row:
    """Row ``step-time-cross-entropy``: bp-train's default classification step vs ``F.cross_entropy``'s."""
    label, sizes, batch, cpu_target, cuda_target = CROSS_ENTROPY_SHAPE
    steps = build_cross_entropy_steps(cfg, device, dtype)
    inner = 20 if device == "cpu" else 10
    samples = time_round_robin(steps, reps=cfg.reps, warmup=cfg.warmup, inner=inner, sync=device_sync(device))
    med = {side: statistics.median(v) for side, v in samples.items()}
    where = f"{shape_name(label, sizes, batch)} [{device} {dtype_name(dtype)}]"
    common = {"reps": cfg.reps, "inner": inner, **step_common(device, dtype, sizes, batch)}
    target = cpu_target if device == "cpu" else cuda_target
    return _step_row("step-time-cross-entropy", "cost_ce", "native_ce", where, med, samples, target, common)


def _step_time_rows(cfg: BenchConfig, device: str, dtype: torch.dtype, sides: list[str], shape: Shape) -> list[Row]:
    """Step time at one shape: every side timed in the same rounds, then one row per side against its peer."""
    label, sizes, batch, cpu_target, cuda_target = shape
    t0 = time.perf_counter()
    steps = build_steps(cfg, device, dtype, sides, sizes, batch)
    setup_s = time.perf_counter() - t0
    inner = 1 if mlp_step_flops(sizes, batch) > 1e9 else (20 if device == "cpu" else 10)
    samples = time_round_robin(steps, reps=cfg.reps, warmup=cfg.warmup, inner=inner, sync=device_sync(device))
    med = {side: statistics.median(v) for side, v in samples.items()}
    where = f"{shape_name(label, sizes, batch)} [{device} {dtype_name(dtype)}]"
    common = {"reps": cfg.reps, "inner": inner, **step_common(device, dtype, sizes, batch)}
    rows = []
    if device.startswith("cuda"):
        for peer, item, target in CAPTURED_PEERS:
            rows.append(_step_row(item, "captured", peer, where, med, samples, target, common))
    for side, item in STEP_SIDES:
        if side in samples:
            extra = {"setup_and_compile_s": setup_s} if side == "compiled" else {}
            target = cpu_target if device == "cpu" else cuda_target
            rows.append(_step_row(item, side, "native", where, med, samples, target, common, extra))
    side, peer, item = COMPILED_PEER
    if side in samples and peer in samples:
        target = cpu_target if device == "cpu" else cuda_target
        rows.append(_step_row(item, side, peer, where, med, samples, target, common, {"setup_and_compile_s": setup_s}))
    return rows


def _step_row(
    item: str,
    side: str,
    peer: str,
    where: str,
    med: dict[str, float],
    samples: dict[str, list[float]],
    target: float,
    common: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Row:
    # The captured and compiled-vs-compiled rows name their peer; the other per-side rows are against native eager.
    what = f"{SIDES[side]} vs {SIDES[peer]}" if side == "captured" or peer != "native" else SIDES[side]
    return make_row(
        item,
        f"training step time, {what}, {where}",
        med[side],
        med[peer],
        target=target,
        cmp="<=",
        unit="s",
        ours_label=SIDES[side],
        peer_label=SIDES[peer],
        **common,
        **paired_ratio_stats(samples[side], samples[peer]),
        **(extra or {}),
    )


# --------------------------------------------------------------------------- peak memory
def item_peak_memory(cfg: BenchConfig) -> list[Row]:
    """Peak live tensor bytes of one training step, bp-train's path (and per-layer) / native.

    ``ours`` and ``peer`` are the bytes that live across steps (weights, gradients, batch,
    optimizer state; measured from the tensors) plus the step's own peak on top of them
    (:func:`~bp_service.bench.memory.peak_memory_bytes`), i.e. what ``torch.cuda.max_memory_allocated``
    would say for that side alone. ``details.net_ratio`` compares the step's own peaks without the
    state. Each side is measured ``memory_reps`` times, alternating, and the median kept; every
    shape of :func:`~bp_service.bench.steps.shapes_for` is measured.
    """
    rows = []
    for device, dtype in cfg.targets():
        for label, sizes, batch, _, _ in shapes_for(device):
            steps = build_steps(cfg, device, dtype, ("cost", "custom", "native"), sizes, batch)
            state, nets = _measure_memory(steps, device, cfg.memory_reps)
            where = f"{shape_name(label, sizes, batch)} [{device} {dtype_name(dtype)}]"
            for side, item in MEMORY_SIDES:
                rows.append(_memory_row(item, side, where, state, nets, step_common(device, dtype, sizes, batch)))
        label, sizes, batch, cpu_target, cuda_target = CROSS_ENTROPY_SHAPE
        target = cpu_target if device == "cpu" else cuda_target
        state, nets = _measure_memory(build_cross_entropy_steps(cfg, device, dtype), device, cfg.memory_reps)
        where = f"{shape_name(label, sizes, batch)} [{device} {dtype_name(dtype)}]"
        common = step_common(device, dtype, sizes, batch)
        item = "peak-memory-cross-entropy"
        rows.append(_memory_row(item, "cost_ce", where, state, nets, common, peer="native_ce", target=target))
    return rows


def _measure_memory(steps: dict[str, TrainStep], device: str, reps: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Each side's bytes live across steps, and ``reps`` samples of its step's own peak, the sides alternating."""
    for step in steps.values():  # steady state: last step's gradients exist, allocator warmed up
        step()
    state = {side: step.state_bytes() for side, step in steps.items()}
    nets: dict[str, list[int]] = {side: [] for side in steps}
    for r in range(reps):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for side in order:
            nets[side].append(peak_memory_bytes(steps[side], device))
    return state, nets


def _memory_row(
    item: str,
    side: str,
    where: str,
    state: dict[str, int],
    nets: dict[str, list[int]],
    common: dict[str, Any],
    peer: str = "native",
    target: float = MEMORY_TARGET,
) -> Row:
    net = {s: statistics.median(v) for s, v in nets.items()}
    return make_row(
        item,
        f"training step peak memory, {SIDES[side]}, {where}",
        state[side] + net[side],
        state[peer] + net[peer],
        target=target,
        cmp="<=",
        unit="B",
        ours_label=SIDES[side],
        peer_label=SIDES[peer],
        measured="bytes live across steps + the step's peak of live tensor bytes above them",
        measured_by="torch.profiler memory events" if common["device"] == "cpu" else "CUDA caching allocator",
        state_bytes={"ours": state[side], "peer": state[peer]},
        net_peak_bytes={"ours": net[side], "peer": net[peer]},
        net_ratio=net[side] / net[peer] if net[peer] else None,
        net_samples={"ours": nets[side], "peer": nets[peer]},
        **common,
    )


# --------------------------------------------------------------------------- roofline
def item_roofline(cfg: BenchConfig) -> list[Row]:
    """FLOP/s of the custom step over the best torch.mm FLOP/s on the step's own GEMMs.

    The step's FLOPs are :func:`~bp_service.bench.flops.mlp_step_flops` (GEMMs only), cross-checked
    against ``torch.utils.flop_counter`` in ``details``. The peer is the fastest, by median, of
    ``torch.mm`` on the step's large GEMM shapes (:func:`~bp_service.bench.flops.step_gemms`:
    (512x784)@(784x1024), (1024x512)@(512x784), (512x1024)@(1024x1024), (1024x512)@(512x1024)) with
    contiguous operands and a preallocated output, timed in the same rounds as the step and at the
    same thread count; ``peer_label`` names the winner. Taking the best GEMM makes the ratio conservative.
    """
    rows = []
    for device, dtype in cfg.targets():
        # On CUDA the MNIST-sized step is launch-bound: the roofline needs a shape that is not.
        sizes, batch = (GPU_SHAPE[1], GPU_SHAPE[2]) if device.startswith("cuda") else (SIZES, BATCH)
        steps = build_steps(cfg, device, dtype, ("cost",), sizes, batch)
        counted = counted_step_flops(steps["cost"])
        reps = min(cfg.reps, 5) if cfg.quick else cfg.reps  # 32 ms steps and four GEMMs: the quick run's longest
        fns: dict[str, Callable[[], object]] = {"cost": steps["cost"]}
        gemms = _gemm_calls(cfg.seed, device, dtype, sizes, batch)
        fns.update({label: fn for label, (fn, _) in gemms.items()})
        inner = 1 if device == "cpu" else 10
        samples = time_round_robin(fns, reps=reps, warmup=cfg.warmup, inner=inner, sync=device_sync(device))
        gemm_flops = {label: f for label, (_, f) in gemms.items()}
        rows.append(_roofline_row(samples, gemm_flops, counted, step_common(device, dtype, sizes, batch)))
    return rows


def _gemm_calls(
    seed: int, device: str, dtype: torch.dtype, sizes: Sequence[int], batch: int
) -> dict[str, tuple[Callable[[], object], int]]:
    """``torch.mm`` on each of the step's large GEMM shapes, keyed ``(m x k)@(k x n)``: the call and its FLOPs."""
    calls: dict[str, tuple[Callable[[], object], int]] = {}
    g = torch.Generator().manual_seed(seed)
    for m, k, n in step_gemms(sizes, batch):
        a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        calls[f"({m}x{k})@({k}x{n})"] = (lambda a=a, b=b, out=out: torch.mm(a, b, out=out)), 2 * m * k * n
    return calls


def _roofline_row(
    samples: dict[str, list[float]], gemm_flops: dict[str, int], counted: int, common: dict[str, Any]
) -> Row:
    flops = mlp_step_flops(common["sizes"], common["batch"])
    mm_rate = {label: f / statistics.median(samples[label]) for label, f in gemm_flops.items()}
    best = max(mm_rate, key=mm_rate.get)
    step_s = statistics.median(samples["cost"])
    # The same ratio from the least disturbed rounds (10th percentile times), for noisy machines.
    mm_rate_p10 = max(f / percentile(samples[label], 0.1) for label, f in gemm_flops.items())
    ratio_p10 = flops / percentile(samples["cost"], 0.1) / mm_rate_p10
    return make_row(
        "roofline",
        f"roofline: step FLOP/s / torch.mm FLOP/s [{common['device']} {common['dtype']}]",
        flops / step_s,
        mm_rate[best],
        target=0.75,
        cmp=">=",
        unit="FLOP/s",
        ours_label="bp_service.MLP.cost step",
        peer_label=f"torch.mm {best}",
        **common,
        step_flops=flops,
        step_flops_counted_by_torch=counted,
        step_seconds=step_s,
        mm_flops_per_s=mm_rate,
        peak_gemm=best,
        ratio_p10=ratio_p10,
        flops_counted="GEMMs only: bias, activation, loss and SGD elementwise work not counted",
    )
