"""Peak tensor memory of one call: the CUDA caching allocator's counters, or torch.profiler's memory events on CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bp_service.bench.harness import device_sync

MARKER = "bp_bench.peak_memory_bytes.measured"


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
    if device.startswith("cuda"):
        return _cuda_peak(fn, device, prime)
    window, memory = _cpu_memory_events(fn, prime)
    return _peak_in_window(memory, window)


def _cuda_peak(fn: Callable[[], object], device: str, prime: int) -> int:
    sync = device_sync(device)
    for _ in range(prime):
        fn()
    sync()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    sync()
    return max(0, torch.cuda.max_memory_allocated(device) - start)


def _cpu_memory_events(fn: Callable[[], object], prime: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The measured call's (start, end) in ns and every CPU allocation (+) and free (-) as (time ns, bytes), sorted."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(prime):
            fn()
        with record_function(MARKER):
            fn()
    events = prof.profiler.kineto_results.events()
    (window,) = [e for e in events if e.name() == MARKER]
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU
    )
    return (window.start_ns(), window.end_ns()), memory


def _peak_in_window(memory: list[tuple[int, int]], window: tuple[int, int]) -> int:
    """Highest running sum of the signed sizes inside ``window``, above its value when the window opens."""
    start_ns, end_ns = window
    live = 0
    at_start = peak = None
    for t_ns, nbytes in memory:
        if t_ns >= start_ns and at_start is None:
            at_start = peak = live
        if t_ns > end_ns:
            break
        live += nbytes
        if at_start is not None:
            peak = max(peak, live)
    if at_start is None:  # nothing allocated or freed in the window
        return 0
    return max(0, peak - at_start)
