"""Gradient check of a run's actual model, before it trains.

Every Function the model uses is checked in float64 on a small slice of the real layer shapes:
``torch.autograd.gradcheck`` gives the verdict, and the largest gap between the hand-written
backward and central finite differences is reported per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import gradcheck

from bp_service import functions as F
from bp_service.layers import ACTIVATIONS, MLP

SLICE_ROWS, SLICE_IN, SLICE_OUT = 3, 4, 3  # small enough for finite differences, big enough to mix terms
ACTIVATION_FUNCTIONS = {"sigmoid": "SigmoidFunction", "tanh": "TanhFunction", "relu": "ReLUFunction"}


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


def _slice(layer, rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
    h_out, h_in = min(layer.out_features, SLICE_OUT), min(layer.in_features, SLICE_IN)
    g = torch.Generator().manual_seed(h_in * 1000 + h_out)
    x = torch.randn(rows, h_in, dtype=torch.float64, generator=g, requires_grad=True)
    w = layer.weight.detach()[:h_out, :h_in].double().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach()[:h_out].double().clone().requires_grad_()
    return x, w, b


def check_model(net: MLP, loss: str) -> dict[str, Any]:
    """Gradcheck each layer's Functions on a slice of its real weights, and the loss Function.

    Returns a JSON-able report ``{"passed": bool, "layers": [...]}`` with per-layer max errors.
    """
    entries: list[dict[str, Any]] = []

    def record(name: str, function: str, fn: Callable[..., Tensor], inputs: tuple[Tensor | None, ...]) -> None:
        passed = gradcheck(fn, inputs, raise_exception=False, check_batched_grad=False)
        shapes = [list(t.shape) for t in inputs if t is not None]
        entries.append(
            {
                "layer": name,
                "function": function,
                "shapes": shapes,
                "passed": bool(passed),
                "max_abs_error": _max_error(fn, inputs),
            }
        )

    for i, (layer, act) in enumerate(zip(net.layers, net.activations)):
        x, w, b = _slice(layer, SLICE_ROWS)
        if act == "sigmoid" and net.fused:
            record(f"layers.{i}", "LinearSigmoidFunction", F.linear_sigmoid, (x, w, b))
            continue
        record(f"layers.{i}", "LinearFunction", F.linear, (x, w, b))
        if act is not None:
            z = F.linear(x, w, b).detach().requires_grad_()
            record(f"layers.{i}", ACTIVATION_FUNCTIONS[act], ACTIVATIONS[act], (z,))
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(SLICE_ROWS, SLICE_OUT, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.rand(SLICE_ROWS, SLICE_OUT, dtype=torch.float64, generator=g)
    loss_fn = {"mse": (F.mse_loss, "MSELossFunction"), "l1": (F.l1_loss, "L1LossFunction")}[loss]
    record("loss", loss_fn[1], loss_fn[0], (pred, target))
    return {"passed": all(e["passed"] for e in entries), "dtype": "float64", "layers": entries}
