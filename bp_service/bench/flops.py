"""FLOPs of a training step: the exact GEMM formula, torch's own count as a cross-check, the step's GEMM shapes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise


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
