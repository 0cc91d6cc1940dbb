"""bp-bench: bp-service measured against its peers, in one process, as ratios.

Every figure is a ratio against its peer measured in the same run, next to both absolute
values. Timings are medians over many repetitions that alternate the sides (round robin,
with the order rotated every round: A B, B A, A B, ...), so machine drift and noise from
other processes fall on both sides alike and whichever side runs first in a round has no
lasting advantage. The per-round ratios are kept too: their median and quartiles show how
noisy the run was.

Items (``--items`` selects them; ``ITEMS`` lists them):

1. Training step time, bp-train's path vs native autograd (``nn.Linear`` + ``torch.sigmoid`` +
   ``F.mse_loss``, SGD), same weights, same batch, at the shapes users run (``SHAPES``: the
   digits job's 64-64-10 at batch 64, the worked example's 3-2-1 at batch 1, 784-1024-1024-10
   at batch 512; on CUDA also 4096 wide at batch 4096). Row ``1`` is ``MLP.cost`` (the
   whole-network Function bp-train trains through), ``1l`` the per-layer Functions;
   ``--compile`` adds the cost path under ``torch.compile`` as ``1c``.
2. Peak memory of the same steps, ``2`` for ``MLP.cost`` and ``2l`` per-layer (see
   :func:`item_peak_memory` and :func:`peak_memory_bytes` for what is measured and how).
3. Roofline: FLOP/s the cost step achieves over the FLOP/s ``torch.mm`` reaches on the
   GEMMs of that step, at the same thread count (see :func:`mlp_step_flops`); on CUDA at the
   GPU-sized shape, where a step is not launch-bound.
4. One epoch of bp-train's Lightning loop vs a plain PyTorch loop (``bench_jobs.py``); with
   ``--device cuda|all`` also at the synthetic preset's size (1M x 128, 128-1024-1024-10, batch 4096),
   Lightning eager and captured vs a native eager loop, float32.
5. ``bp-train experiment=digits`` vs scikit-learn's ``MLPClassifier``, each from a cold process.

With CUDA, every item also runs on the GPU in float32 and bfloat16.

Adding an item is one line in ``ITEMS``: a function ``(BenchConfig) -> list[Row]`` that builds
its rows with :func:`make_row` (``{item, name, ours, peer, ratio, target, cmp, met, unit, ...}``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from bp_service import functions as F
from bp_service.layers import MLP

Row = dict[str, Any]

SIZES: tuple[int, ...] = (784, 1024, 1024, 10)  # the compute-bound shape: MNIST-sized, batch 512
BATCH = 512
# The networks users train, with the batch each runs at: (label, sizes, batch, CPU target, CUDA target).
# Targets are step-time ratios bp-train's path / native autograd (issue 11).
SHAPES: tuple[tuple[str, tuple[int, ...], int, float, float], ...] = (
    ("digits job", (64, 64, 10), 64, 1.00, 1.05),
    ("worked example", (3, 2, 1), 1, 1.00, 1.05),
    ("MNIST-sized", SIZES, BATCH, 1.02, 1.05),
)
GPU_SHAPE = ("GPU-sized", (4096, 4096, 4096, 10), 4096, 1.00, 1.00)  # not launch-bound: CUDA only
MEMORY_TARGET = 1.10
LR = 0.1


# --------------------------------------------------------------------------- configuration
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


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else lambda: None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- rows
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
    ratio = ours / peer
    met = ratio <= target if cmp == "<=" else ratio >= target
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


# --------------------------------------------------------------------------- timing
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
                fn = fns[name]
                sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - t0) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def _paired_ratio_stats(ours: Sequence[float], peer: Sequence[float]) -> dict[str, float]:
    """How far to trust a timing ratio on a shared machine.

    ``paired_ratio_*``: median and quartiles of the per-round ratios ours/peer (the two samples
    of a round run back to back, so they saw nearly the same machine). ``ratio_p10`` and
    ``ratio_min``: the ratio of the sides' 10th percentiles and minima, the rounds least
    disturbed by other processes. When these disagree with the headline ratio of medians,
    the run was noisy: rerun it with more ``--reps``.
    """
    q1, q2, q3 = _quartiles([a / b for a, b in zip(ours, peer)])
    return {
        "paired_ratio_median": q2,
        "paired_ratio_q1": q1,
        "paired_ratio_q3": q3,
        "ratio_p10": _percentile(ours, 0.1) / _percentile(peer, 0.1),
        "ratio_min": min(ours) / min(peer),
    }


# --------------------------------------------------------------------------- the networks
class NativeMLP(nn.Module):
    """The peer: the same network from ``nn.Linear`` and ``torch.sigmoid`` (native autograd).

    Its ``state_dict`` keys match :class:`bp_service.MLP`, so weights load across unchanged.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(h_in, h_out) for h_in, h_out in pairwise(sizes))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return x


def build_models(
    device: str, dtype: torch.dtype, seed: int = 0, sizes: Sequence[int] = SIZES, fused: bool = True
) -> tuple[MLP, NativeMLP]:
    """bp-service's MLP (sigmoid hidden and output layers) and its native twin, same weights."""
    torch.manual_seed(seed)
    ours = MLP(sizes, activation="sigmoid", output_activation="sigmoid", fused=fused).to(device=device, dtype=dtype)
    native = NativeMLP(sizes).to(device=device, dtype=dtype)
    native.load_state_dict(ours.state_dict())
    return ours, native


def build_batch(
    device: str, dtype: torch.dtype, seed: int = 0, sizes: Sequence[int] = SIZES, batch: int = BATCH
) -> tuple[Tensor, Tensor]:
    """An MNIST-shaped batch: pixels in [0, 1), one-hot targets."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, sizes[0], generator=g)
    target = TF.one_hot(torch.randint(sizes[-1], (batch,), generator=g), sizes[-1]).float()
    return x.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)


class TrainStep:
    """One training step, callable: zero the gradients, forward, loss, backward, SGD update in place."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, target: Tensor):
        self.model, self.loss_fn, self.x, self.target = model, loss_fn, x, target
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)

    def __call__(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.target)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def state_bytes(self) -> int:
        """Bytes of the tensors that live from one step to the next: weights, gradients, batch, optimizer state."""
        tensors = [self.x, self.target, *self.model.parameters()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.opt.state.values() for v in state.values() if isinstance(v, Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


class CostStep(TrainStep):
    """bp-train's training step: ``model.cost`` (one whole-network Function), backward, SGD."""

    def __init__(self, model: MLP, x: Tensor, target: Tensor, cost: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__(model, F.mse_loss, x, target)
        self.cost = cost or model.cost

    def __call__(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.cost(self.x, self.target)
        loss.backward()
        self.opt.step()
        return loss.detach()


class GraphStep(TrainStep):
    """A training step captured whole in a CUDA graph (:class:`~bp_service.capture.CapturedStep`) and replayed."""

    def __init__(self, model: nn.Module, cost: Callable[[Tensor, Tensor], Tensor], x: Tensor, target: Tensor):
        super().__init__(model, F.mse_loss, x, target)
        from bp_service.capture import CapturedStep

        self.captured = CapturedStep(cost, list(model.parameters()), self.opt)

    def __call__(self) -> Tensor:
        return self.captured(self.x, self.target)


SIDES = {
    "cost": "bp_service.MLP.cost",
    "custom": "bp_service.MLP per-layer",
    "unfused": "bp_service.MLP(fused=False)",
    "compiled": "torch.compile(bp_service.MLP.cost)",
    "native": "nn.Linear+torch.sigmoid",
    "captured": "bp_service.MLP.cost, CUDA graph",
    "native_captured": "nn.Linear+torch.sigmoid, CUDA graph",
}


def build_steps(
    cfg: BenchConfig,
    device: str,
    dtype: torch.dtype,
    sides: Sequence[str] = ("cost", "native"),
    sizes: Sequence[int] = SIZES,
    batch: int = BATCH,
) -> dict[str, TrainStep]:
    """Training steps keyed by side (see ``SIDES``), each with its own copy of the same weights.

    ``cost`` is bp-train's path (``MLP.cost``: one whole-network Function); ``custom`` the
    per-layer Functions (fused sigmoid layers, then ``F.mse_loss``); ``unfused`` the same with
    ``fused=False``; ``compiled`` the cost path under ``torch.compile``; ``native`` the peer.
    Before returning, the first step of each is checked to give the same loss as the native
    one, so every side provably computes the same network.
    """
    x, target = build_batch(device, dtype, cfg.seed, sizes, batch)
    steps: dict[str, TrainStep] = {}
    for side in sides:
        ours, native = build_models(device, dtype, cfg.seed, sizes, fused=side != "unfused")
        if side == "native":
            steps[side] = TrainStep(native, TF.mse_loss, x, target)
        elif side == "captured":
            steps[side] = GraphStep(ours, ours.cost, x, target)
        elif side == "native_captured":
            steps[side] = GraphStep(native, lambda x, y, m=native: TF.mse_loss(m(x), y), x, target)
        elif side in ("cost", "compiled"):
            steps[side] = CostStep(ours, x, target, torch.compile(ours.cost) if side == "compiled" else None)
        else:
            steps[side] = TrainStep(ours, F.mse_loss, x, target)
    first = {side: step() for side, step in steps.items()}
    if "native" in first:
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        for side, loss in first.items():
            torch.testing.assert_close(loss, first["native"], **tol, msg=lambda m, s=side: f"{s} vs native: {m}")
    return steps


def shapes_for(device: str) -> tuple[tuple[str, tuple[int, ...], int, float, float], ...]:
    """The networks item 1 and 2 run on ``device``: the users' shapes, plus a GPU-sized one on CUDA."""
    return SHAPES + ((GPU_SHAPE,) if device.startswith("cuda") else ())


# --------------------------------------------------------------------------- memory
def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu", prime: int = 1) -> int:
    """Peak bytes of tensor memory live during one call of ``fn`` above what was live when it began.

    ``fn`` is called ``prime`` times first, unmeasured, then once measured; its return value is
    dropped inside the measured window. For a training step the priming call leaves the state
    the measured step starts from (the previous step's gradients, which its ``zero_grad`` frees:
    those frees count, so the figure is the step's net demand on top of its persistent state).

    CUDA: the caching allocator's own counters (``max_memory_allocated`` minus
    ``memory_allocated`` at the start, after resetting the peak).

    CPU has no such counter, so priming and measured calls run in one ``torch.profiler``
    session with ``profile_memory=True``. It records every allocation and every free made
    through c10's CPU allocator, in time order: every tensor torch creates, including
    temporaries made inside kernels. The measured call is marked with ``record_function``; the
    peak is the maximum, inside that window, of the running sum of the signed sizes, minus
    its value when the window opens. The allocator learns a block's size only if the block was
    allocated while profiling, and ignores frees of blocks it never sized; priming inside the
    same session makes sure the blocks the measured call frees were sized. Not counted:
    scratch memory MKL/oneDNN allocate privately, and Python objects; the two sides of a
    comparison run the same GEMMs, so those omissions are common to both.
    """
    sync = _sync(device)
    if device.startswith("cuda"):
        for _ in range(prime):
            fn()
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync()
        return max(0, torch.cuda.max_memory_allocated(device) - start)

    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "bp_bench.peak_memory_bytes.measured"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(prime):
            fn()
        with record_function(marker):
            fn()
    events = prof.profiler.kineto_results.events()
    (window,) = [e for e in events if e.name() == marker]
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU
    )
    live = 0
    at_start = peak = None
    for t_ns, nbytes in memory:
        if t_ns >= window.start_ns() and at_start is None:
            at_start = peak = live
        if t_ns > window.end_ns():
            break
        live += nbytes
        if at_start is not None:
            peak = max(peak, live)
    if at_start is None:  # nothing allocated or freed in the window
        return 0
    return max(0, peak - at_start)


# --------------------------------------------------------------------------- FLOPs
def mlp_step_flops(sizes: Sequence[int], batch: int, input_grad: bool = False) -> int:
    """Exact GEMM FLOPs of one training step of a dense MLP (one multiply-add = 2 FLOPs).

    With P = number of weight elements: forward ``2 N P`` (``x W^T`` per layer); backward
    ``4 N P`` (``delta W`` and ``delta^T x`` per layer) minus the first layer's input gradient
    ``2 N H_0 H_1``, which no one needs unless ``input_grad``. Bias additions, bias gradients,
    activations, the loss and the optimizer update are elementwise and not counted.
    """
    p = sum(h_in * h_out for h_in, h_out in pairwise(sizes))
    forward = 2 * batch * p
    backward = 4 * batch * p - (0 if input_grad else 2 * batch * sizes[0] * sizes[1])
    return forward + backward


def counted_step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` as ``torch.utils.flop_counter`` counts them (a cross-check)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def step_gemms(sizes: Sequence[int], batch: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) of the large GEMMs in one step: forward ``x W^T`` and backward ``delta^T x``."""
    shapes: list[tuple[int, int, int]] = []
    for h_in, h_out in pairwise(sizes):
        if min(h_in, h_out) >= 128:  # square-ish: skip the 10-wide output layer, which no GEMM runs at peak
            shapes += [(batch, h_in, h_out), (h_out, batch, h_in)]
    return list(dict.fromkeys(shapes))


# --------------------------------------------------------------------------- items
def _step_common(device: str, dtype: torch.dtype, sizes: Sequence[int] = SIZES, batch: int = BATCH) -> dict[str, Any]:
    return {
        "device": device,
        "dtype": _dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "sizes": list(sizes),
        "batch": batch,
    }


def _shape_name(label: str, sizes: Sequence[int], batch: int) -> str:
    return f"{label} {'-'.join(map(str, sizes))}, batch {batch}"


def item_step_time(cfg: BenchConfig) -> list[Row]:
    """Item 1: median training-step time over native autograd's, at every shape users run.

    For each shape of :func:`shapes_for` (the digits job's network, the worked example's, the
    MNIST-sized one, and on CUDA a GPU-sized one): row ``1`` is bp-train's path (``MLP.cost``),
    ``1l`` the per-layer Functions (fused), ``1c`` (with ``--compile``) the cost path under
    ``torch.compile``. All sides of a shape are timed in the same rounds; small steps are timed
    in groups of calls so that the clock's resolution does not matter.
    """
    rows = []
    for device, dtype in cfg.targets():
        cuda = device.startswith("cuda")
        sides = ["cost", "custom", *(["compiled"] if cfg.compile else []), "native"]
        sides += ["captured", "native_captured"] if cuda else []
        for label, sizes, batch, cpu_target, cuda_target in shapes_for(device):
            t0 = time.perf_counter()
            steps = build_steps(cfg, device, dtype, sides, sizes, batch)
            setup_s = time.perf_counter() - t0
            flops = mlp_step_flops(sizes, batch)
            inner = 1 if flops > 1e9 else (20 if device == "cpu" else 10)
            samples = time_round_robin(steps, reps=cfg.reps, warmup=cfg.warmup, inner=inner, sync=_sync(device))
            med = {side: statistics.median(v) for side, v in samples.items()}
            if cuda:  # issue 12: captured >= 3x faster than native eager, within 1.05x of native captured
                for peer, item, target in (("native", "1g", 1 / 3), ("native_captured", "1h", 1.05)):
                    rows.append(
                        make_row(
                            item,
                            f"training step time, {SIDES['captured']} vs {SIDES[peer]}, "
                            f"{_shape_name(label, sizes, batch)} [{device} {_dtype_name(dtype)}]",
                            med["captured"],
                            med[peer],
                            target=target,
                            cmp="<=",
                            unit="s",
                            ours_label=SIDES["captured"],
                            peer_label=SIDES[peer],
                            reps=cfg.reps,
                            inner=inner,
                            **_step_common(device, dtype, sizes, batch),
                            **_paired_ratio_stats(samples["captured"], samples[peer]),
                        )
                    )
            for side, item in (("cost", "1"), ("custom", "1l"), ("compiled", "1c")):
                if side not in samples:
                    continue
                extra = {"setup_and_compile_s": setup_s} if side == "compiled" else {}
                rows.append(
                    make_row(
                        item,
                        f"training step time, {SIDES[side]}, {_shape_name(label, sizes, batch)} "
                        f"[{device} {_dtype_name(dtype)}]",
                        med[side],
                        med["native"],
                        target=cpu_target if device == "cpu" else cuda_target,
                        cmp="<=",
                        unit="s",
                        ours_label=SIDES[side],
                        peer_label=SIDES["native"],
                        reps=cfg.reps,
                        inner=inner,
                        **_step_common(device, dtype, sizes, batch),
                        **_paired_ratio_stats(samples[side], samples["native"]),
                        **extra,
                    )
                )
    return rows


def item_peak_memory(cfg: BenchConfig) -> list[Row]:
    """Item 2: peak live tensor bytes of one training step, bp-train's path (and per-layer) / native.

    ``ours`` and ``peer`` are the bytes that live across steps (weights, gradients, batch,
    optimizer state; measured from the tensors) plus the step's own peak on top of them
    (:func:`peak_memory_bytes`), i.e. what ``torch.cuda.max_memory_allocated`` would say for
    that side alone. ``details.net_ratio`` compares the step's own peaks without the state.
    Each side is measured ``memory_reps`` times, alternating, and the median kept; every shape
    of :func:`shapes_for` is measured.
    """
    rows = []
    for device, dtype in cfg.targets():
        for label, sizes, batch, _, _ in shapes_for(device):
            steps = build_steps(cfg, device, dtype, ("cost", "custom", "native"), sizes, batch)
            for step in steps.values():  # steady state: last step's gradients exist, allocator warmed up
                step()
            state = {side: step.state_bytes() for side, step in steps.items()}
            nets: dict[str, list[int]] = {side: [] for side in steps}
            for r in range(cfg.memory_reps):
                order = list(steps) if r % 2 == 0 else list(steps)[::-1]
                for side in order:
                    nets[side].append(peak_memory_bytes(steps[side], device))
            net = {side: statistics.median(v) for side, v in nets.items()}
            for side, item in (("cost", "2"), ("custom", "2l")):
                rows.append(
                    make_row(
                        item,
                        f"training step peak memory, {SIDES[side]}, {_shape_name(label, sizes, batch)} "
                        f"[{device} {_dtype_name(dtype)}]",
                        state[side] + net[side],
                        state["native"] + net["native"],
                        target=MEMORY_TARGET,
                        cmp="<=",
                        unit="B",
                        ours_label=SIDES[side],
                        peer_label=SIDES["native"],
                        measured="bytes live across steps + the step's peak of live tensor bytes above them",
                        measured_by="torch.profiler memory events" if device == "cpu" else "CUDA caching allocator",
                        state_bytes={"ours": state[side], "peer": state["native"]},
                        net_peak_bytes={"ours": net[side], "peer": net["native"]},
                        net_ratio=net[side] / net["native"] if net["native"] else None,
                        net_samples={"ours": nets[side], "peer": nets["native"]},
                        **_step_common(device, dtype, sizes, batch),
                    )
                )
    return rows


def item_roofline(cfg: BenchConfig) -> list[Row]:
    """Item 3: FLOP/s of the custom step over the best torch.mm FLOP/s on the step's own GEMMs.

    The step's FLOPs are :func:`mlp_step_flops` (GEMMs only), cross-checked against
    ``torch.utils.flop_counter`` in ``details``. The peer is the fastest, by median, of
    ``torch.mm`` on the step's large GEMM shapes (:func:`step_gemms`: (512x784)@(784x1024),
    (1024x512)@(512x784), (512x1024)@(1024x1024), (1024x512)@(512x1024)) with contiguous operands
    and a preallocated output, timed in the same rounds as the step and at the same thread count;
    ``peer_label`` names the winner. Taking the best GEMM makes the ratio conservative.
    """
    rows = []
    for device, dtype in cfg.targets():
        # On CUDA the MNIST-sized step is launch-bound: the roofline needs a shape that is not.
        sizes, batch = (GPU_SHAPE[1], GPU_SHAPE[2]) if device.startswith("cuda") else (SIZES, BATCH)
        steps = build_steps(cfg, device, dtype, ("cost",), sizes, batch)
        flops = mlp_step_flops(sizes, batch)
        counted = counted_step_flops(steps["cost"])
        fns: dict[str, Callable[[], object]] = {"cost": steps["cost"]}
        gemm_flops: dict[str, int] = {}
        g = torch.Generator().manual_seed(cfg.seed)
        for m, k, n in step_gemms(sizes, batch):
            a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
            b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
            out = torch.empty(m, n, device=device, dtype=dtype)
            label = f"({m}x{k})@({k}x{n})"
            fns[label] = lambda a=a, b=b, out=out: torch.mm(a, b, out=out)
            gemm_flops[label] = 2 * m * k * n
        inner = 1 if device == "cpu" else 10
        samples = time_round_robin(fns, reps=cfg.reps, warmup=cfg.warmup, inner=inner, sync=_sync(device))
        mm_rate = {label: f / statistics.median(samples[label]) for label, f in gemm_flops.items()}
        best = max(mm_rate, key=mm_rate.get)
        step_s = statistics.median(samples["cost"])
        # The same ratio from the least disturbed rounds (10th percentile times), for noisy machines.
        mm_rate_p10 = max(f / _percentile(samples[label], 0.1) for label, f in gemm_flops.items())
        ratio_p10 = flops / _percentile(samples["cost"], 0.1) / mm_rate_p10
        rows.append(
            make_row(
                "3",
                f"roofline: step FLOP/s / torch.mm FLOP/s [{device} {_dtype_name(dtype)}]",
                flops / step_s,
                mm_rate[best],
                target=0.75,
                cmp=">=",
                unit="FLOP/s",
                ours_label="bp_service.MLP.cost step",
                peer_label=f"torch.mm {best}",
                **_step_common(device, dtype, sizes, batch),
                step_flops=flops,
                step_flops_counted_by_torch=counted,
                step_seconds=step_s,
                mm_flops_per_s=mm_rate,
                peak_gemm=best,
                ratio_p10=ratio_p10,
                flops_counted="GEMMs only: bias, activation, loss and SGD elementwise work not counted",
            )
        )
    return rows


def item_lightning_overhead(cfg: BenchConfig) -> list[Row]:
    from bp_service.bench_jobs import item_lightning_overhead as item  # imports Lightning: only when asked

    return item(cfg)


def item_peer_job(cfg: BenchConfig) -> list[Row]:
    from bp_service.bench_jobs import item_peer_job as item

    return item(cfg)


ITEMS: dict[str, tuple[str, Callable[[BenchConfig], list[Row]]]] = {
    "1": ("training step time, custom vs native autograd", item_step_time),
    "2": ("training step peak memory, custom vs native autograd", item_peak_memory),
    "3": ("roofline: custom step FLOP/s vs torch.mm", item_roofline),
    "4": ("epoch time, bp-train's Lightning loop vs a plain loop", item_lightning_overhead),
    "5": ("cold process to a tested digits model, bp-train vs scikit-learn", item_peer_job),
}


# --------------------------------------------------------------------------- output
_UNITS = {"s": (1e3, "ms"), "B": (1 / 2**20, "MiB"), "FLOP/s": (1e-9, "GFLOP/s")}


def _fmt(value: float, unit: str) -> str:
    scale, label = _UNITS.get(unit, (1.0, unit))
    return f"{value * scale:.3f} {label}".rstrip()


def format_table(rows: Sequence[Row]) -> str:
    header = ("item", "what", "ours", "peer", "ratio", "target", "met")
    lines = [
        (
            r["item"],
            r["name"],
            _fmt(r["ours"], r["unit"]),
            _fmt(r["peer"], r["unit"]),
            f"{r['ratio']:.3f}",
            f"{r['cmp']} {r['target']:.2f}",
            "yes" if r["met"] else "NO",
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


class OtherLoad:
    """CPU time other processes took while we measured, in cores on average (Linux ``/proc/stat``).

    The machine's busy time minus our own process's CPU time, over the wall time. Anything well
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
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

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


# --------------------------------------------------------------------------- CLI
def _parse_items(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in ITEMS]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown item(s) {unknown or text!r}; choose from {', '.join(ITEMS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bp-bench",
        description="Measure bp-service against its peers in one process; every figure is a ratio to its peer.",
        epilog="items: " + "; ".join(f"{k}: {desc}" for k, (desc, _) in ITEMS.items()),
    )
    p.add_argument("--items", type=_parse_items, default=list(ITEMS), help="comma list, e.g. 1,2,3 (default: all)")
    p.add_argument("--quick", action="store_true", help="few repetitions: everything in well under a minute")
    p.add_argument("--reps", type=int, help="timed repetitions per side (default 200, quick 15)")
    p.add_argument("--warmup", type=int, help="untimed repetitions per side first (default 5, quick 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before measuring (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="item 1: also time the custom MLP under torch.compile")
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
    rows: list[Row] = []
    for key in args.items:
        desc, fn = ITEMS[key]
        t0 = time.perf_counter()
        new = fn(cfg)
        print(f"  item {key} ({desc}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows += new
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
