"""Gradient check of a run's actual model, before it trains.

What training runs is checked: :meth:`~bp_service.layers.MLP.cost`, the whole network's hand-written
backprop, in float64 on a slice of the run's own network (its real weights, widths capped).
``torch.autograd.gradcheck`` gives the verdict, and the largest gap between the hand-written backward
and central finite differences is reported per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import gradcheck

from bp_service import functions as F
from bp_service.layers import MLP

SLICE_ROWS, SLICE_IN, SLICE_OUT = 3, 4, 3  # small enough for finite differences, big enough to mix terms


def _max_error(fn: Callable[..., Tensor], inputs: tuple[Tensor | None, ...], eps: float = 1e-6) -> float:
    """max |hand-written gradient - central difference| of the scalar <fn(inputs), r>, r random."""
    with torch.no_grad():
        probe = torch.randn_like(fn(*inputs), generator=torch.Generator().manual_seed(0))

    def scalar(*args: Tensor | None) -> Tensor:
        return (fn(*args) * probe).sum()

    leaves = [t for t in inputs if t is not None and t.requires_grad]
    analytic = torch.autograd.grad(scalar(*inputs), leaves)
    worst = 0.0
    with torch.no_grad():
        for leaf, grad in zip(leaves, analytic):
            flat = leaf.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = scalar(*inputs).item()
                flat[i] = old - eps
                down = scalar(*inputs).item()
                flat[i] = old
                worst = max(worst, abs((up - down) / (2 * eps) - grad.view(-1)[i].item()))
    return worst


def _slice_params(net: MLP) -> tuple[list[int], list[Tensor | None]]:
    """The network's layer count, activations and real weights, each width capped: ``(sizes, params)`` in float64.

    The top-left block of each real weight matrix: the gate checks the numbers this run starts from, on a
    network small enough for finite differences.
    """
    caps = [SLICE_IN, *[SLICE_OUT] * (len(net.sizes) - 1)]
    sizes = [min(size, cap) for size, cap in zip(net.sizes, caps)]
    params: list[Tensor | None] = []
    for layer, h_in, h_out in zip(net.layers, sizes, sizes[1:]):
        params.append(layer.weight.detach()[:h_out, :h_in].double().clone().requires_grad_())
        bias = layer.bias
        params.append(None if bias is None else bias.detach()[:h_out].double().clone().requires_grad_())
    return sizes, params


def _batch(sizes: list[int], loss: str) -> tuple[Tensor, Tensor]:
    """Inputs, and targets of the kind ``loss`` takes: one-hot rows for cross-entropy, values otherwise."""
    g = torch.Generator().manual_seed(len(sizes) * 100 + sizes[-1])
    x = torch.randn(SLICE_ROWS, sizes[0], dtype=torch.float64, generator=g)
    if loss == "cross_entropy":
        classes = torch.randint(0, sizes[-1], (SLICE_ROWS,), generator=g)
        target = torch.zeros(SLICE_ROWS, sizes[-1], dtype=torch.float64)
        if sizes[-1] == 1:  # one sigmoid output: a 0/1 label
            target[:, 0] = torch.randint(0, 2, (SLICE_ROWS,), generator=g).double()
        else:
            target[torch.arange(SLICE_ROWS), classes] = 1.0
    else:
        target = torch.rand(SLICE_ROWS, sizes[-1], dtype=torch.float64, generator=g)
    return x, target


def check_model(net: MLP, loss: str) -> dict[str, Any]:
    """Gradcheck what training runs, :meth:`MLP.cost` (the whole network's hand-written backprop), layer by layer.

    On a float64 slice of the run's own network (its layer count, activations, output activation and
    cost, its real weights), each layer's ``(W_l, b_l)`` is checked with the others held: the verdict is
    ``torch.autograd.gradcheck``'s, and the largest gap to central differences is reported per layer.
    Returns a JSON-able report ``{"passed": bool, "layers": [...]}``.
    """
    sizes, params = _slice_params(net)
    x, target = _batch(sizes, loss)
    activations = tuple(net.activations)
    entries: list[dict[str, Any]] = []
    for i in range(len(net.layers)):

        def cost_of_layer(*wb: Tensor | None, i: int = i) -> Tensor:
            full = [*params[: 2 * i], *wb, *params[2 * i + 2 :]]
            return F.mlp_cost(x, target, tuple(full), activations, loss)

        inputs = tuple(params[2 * i : 2 * i + 2])
        passed = gradcheck(cost_of_layer, inputs, raise_exception=False, check_batched_grad=False)
        entries.append(
            {
                "layer": f"layers.{i}",
                "function": f"MLP.cost ({net.activations[i] or 'linear'} layer, {loss})",
                "shapes": [list(t.shape) for t in inputs if t is not None],
                "passed": bool(passed),
                "max_abs_error": _max_error(cost_of_layer, inputs),
            }
        )
    return {"passed": all(e["passed"] for e in entries), "dtype": "float64", "layers": entries}
