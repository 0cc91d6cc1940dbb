"""``--sizes``: the layer-wise form of the chain rule, the delta recursion, on a deeper sigmoid
network with seeded random weights, and what it saves compared with expanding every weight's
chain separately (counted, not just claimed).

Imports only torch and the core (:mod:`bp_service.functions`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch

from bp_service import functions as F
from bp_service.explain.model import DEFAULT_LR, DEFAULT_TARGET, DOUBLE

# Counting multiplications. Both methods are handed the same local derivatives (dC/da_L, every
# sigmoid'(z) = a(1 - a), every weight, every activation); what is counted is the multiplications
# that combine them into gradients. L is the number of layers, n_l the width of layer l (n_0 the
# input), P_l = n_{l+1} * ... * n_L the number of paths from one neuron of layer l to the outputs.
#
# naive: dC/dW_l[j, i] is a sum over P_l paths of a product of 2(L - l) + 3 factors
#        (a_{l-1,i}, sigmoid'_l, then a weight and a sigmoid' per later layer, then dC/da_L),
#        so 2(L - l) + 2 multiplications per path; a bias has no a_{l-1,i}, one fewer:
#        sum_l P_l * (n_l n_{l-1} (2(L - l) + 2) + [bias] n_l (2(L - l) + 1)).
# backprop: delta_L = dC/da_L * sigmoid'_L takes n_L; each delta_l = (W_{l+1}^T delta_{l+1}) *
#        sigmoid'_l takes n_{l+1} n_l + n_l; each dC/dW_l = delta_l a_{l-1}^T takes n_l n_{l-1};
#        dC/db_l = delta_l takes none:
#        n_L + sum_{l<L} (n_{l+1} n_l + n_l) + sum_l n_l n_{l-1}.
# For the 3-2-1 example: naive 28, backprop 13. naive_chain_gradients() counts the naive ones
# by actually doing them, so the formula is checked, not just claimed.
# In the code the layer index l of these formulas is spelled `k` (ruff reserves `l`).
NAIVE_COUNTED_UP_TO = 100_000  # naive multiplications small enough to do them all, and count


def naive_multiplications(sizes: Sequence[int], bias: bool = False) -> int:
    """Multiplications to expand every parameter's chain separately (formula above)."""
    L = len(sizes) - 1
    total = 0
    for k in range(1, L + 1):
        paths = math.prod(sizes[k + 1 :])
        total += paths * sizes[k] * sizes[k - 1] * (2 * (L - k) + 2)
        if bias:
            total += paths * sizes[k] * (2 * (L - k) + 1)
    return total


def backprop_multiplications(sizes: Sequence[int]) -> int:
    """Multiplications of the delta recursion (formula above); biases cost none."""
    L = len(sizes) - 1
    deltas = sizes[L] + sum(sizes[k + 1] * sizes[k] + sizes[k] for k in range(1, L))
    return deltas + sum(sizes[k] * sizes[k - 1] for k in range(1, L + 1))


def _sigmoid_net(x: torch.Tensor, Ws: list, bs: list) -> list[torch.Tensor]:
    """Activations a_0 = x, a_1, ..., a_L of a sigmoid network, plain torch, no autograd."""
    acts = [x]
    for W, b in zip(Ws, bs):
        z = W @ acts[-1] + (0 if b is None else b)
        acts.append(torch.sigmoid(z))
    return acts


def naive_chain_gradients(
    Ws: list[torch.Tensor], acts: list[torch.Tensor], target: float, bias: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int]:
    """Every gradient as a sum over paths of chain products, each product multiplied out.

    Exponential in depth; meant for small networks, to count the multiplications honestly.
    Returns (dC/dW per layer, dC/db per layer or None, the multiplications done).
    """
    L = len(Ws)
    sig = [None] + [(a * (1 - a)).tolist() for a in acts[1:]]  # sigmoid'_k, from the outputs
    dC_da = (2 * (acts[L] - target)).tolist()
    W = [None] + [w.tolist() for w in Ws]  # W[k][j][i]: from neuron i of layer k-1 to j of layer k
    count = 0

    def over_paths(k: int, j: int, factors: list[float]) -> float:
        """Sum, over the paths from neuron j of layer k to the outputs, of the chain products."""
        nonlocal count
        if k < L:
            return sum(over_paths(k + 1, o, [*factors, sig[k][j], W[k + 1][o][j]]) for o in range(len(W[k + 1])))
        chain = [*factors, sig[L][j], dC_da[j]]
        product = chain[0]
        for factor in chain[1:]:
            product *= factor
            count += 1
        return product

    grad_W = []
    grad_b: list[torch.Tensor | None] = []
    for k in range(1, L + 1):
        a_prev = acts[k - 1].tolist()
        n_out, n_in = Ws[k - 1].shape
        rows = [[over_paths(k, j, [a_prev[i]]) for i in range(n_in)] for j in range(n_out)]
        grad_W.append(torch.tensor(rows, dtype=DOUBLE))
        grad_b.append(torch.tensor([over_paths(k, j, []) for j in range(n_out)], dtype=DOUBLE) if bias else None)
    return grad_W, grad_b, count


def _draw_network(
    sizes: list[int], seed: int, x: Sequence[float] | None, bias: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """Standard normal weights (and biases), then x uniform in [0, 1) unless given, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(n_out, n_in, generator=g, dtype=DOUBLE) for n_in, n_out in pairwise(sizes)]
    bs = [torch.randn(n, generator=g, dtype=DOUBLE) if bias else None for n in sizes[1:]]
    a0 = torch.rand(sizes[0], generator=g, dtype=DOUBLE) if x is None else torch.tensor(x, dtype=DOUBLE)
    if a0.shape != (sizes[0],):
        raise ValueError(f"x takes {sizes[0]} numbers (the first of sizes), got {a0.numel()}")
    return Ws, bs, a0


def delta_recursion(Ws: list[torch.Tensor], acts: list[torch.Tensor], y: torch.Tensor) -> list:
    """deltas[k] = dC/dz_k for k = 1..L (index 0 unused), from the output back."""
    L = len(Ws)
    deltas: list = [None] * (L + 1)
    deltas[L] = 2 * (acts[L] - y) * acts[L] * (1 - acts[L])
    for k in range(L - 1, 0, -1):  # one matrix-vector product per layer, reusing delta_{k+1}
        deltas[k] = (Ws[k].T @ deltas[k + 1]) * acts[k] * (1 - acts[k])
    return deltas


def _autograd_check(
    a0: torch.Tensor, Ws: list[torch.Tensor], bs: list[torch.Tensor | None], y: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(dC/dW_l, dC/db_l) by autograd through bp_service's fused layers; mse_loss is a mean, C is a sum."""
    leaf_W = [W.clone().requires_grad_() for W in Ws]
    leaf_b = [None if b is None else b.clone().requires_grad_() for b in bs]
    a = a0
    for W, b in zip(leaf_W, leaf_b):
        a = F.linear_sigmoid(a, W, b)
    cost = F.mse_loss(a, y) * y.numel()
    auto = torch.autograd.grad(cost, leaf_W + [b for b in leaf_b if b is not None])
    return auto[: len(Ws)], auto[len(Ws) :]


def _max_abs_diff(*pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest |a - b| over the given pairs of tensors."""
    return max((a - b).abs().max().item() for a, b in pairs)


def _layer_reports(sizes: list[int], deltas: list, grad_W: list, auto: tuple, bias: bool) -> list[dict[str, Any]]:
    """Per layer: its delta, dC/dW and how far they are from autograd (dC/db_l is delta_l itself)."""
    auto_W, auto_b = auto
    layers = []
    for k in range(1, len(sizes)):
        pairs = [(grad_W[k - 1], auto_W[k - 1])] + ([(deltas[k], auto_b[k - 1])] if bias else [])
        layers.append(
            {
                "layer": k,
                "shape": [sizes[k], sizes[k - 1]],
                "delta": deltas[k].tolist(),
                "grad_W": grad_W[k - 1].tolist(),
                "max_abs_diff": _max_abs_diff(*pairs),
            }
        )
    return layers


def _count_multiplications(
    sizes: list[int], Ws: list, acts: list, target: float, bias: bool, deltas: list, grad_W: list, layers: list
) -> dict[str, int]:
    """Both counts; for a small network also the naive chains done for real, checked in ``layers``."""
    counts = {"naive": naive_multiplications(sizes, bias), "backprop": backprop_multiplications(sizes)}
    if counts["naive"] <= NAIVE_COUNTED_UP_TO:
        naive_W, naive_b, counted = naive_chain_gradients(Ws, acts, float(target), bias)
        counts["naive_counted"] = counted
        for k in range(1, len(sizes)):
            pairs = [(naive_W[k - 1], grad_W[k - 1])] + ([(naive_b[k - 1], deltas[k])] if bias else [])
            layers[k - 1]["naive_max_abs_diff"] = _max_abs_diff(*pairs)
    return counts


def explain_deep(
    sizes: Sequence[int],
    seed: int = 0,
    x: Sequence[float] | None = None,
    target: float = DEFAULT_TARGET,
    bias: bool = False,
    lr: float = DEFAULT_LR,
) -> dict[str, Any]:
    """The delta recursion on a sigmoid network of the given widths, with seeded random weights.

    delta_L = dC/da_L * a_L(1 - a_L),  delta_l = (W_{l+1}^T delta_{l+1}) * a_l(1 - a_l),
    dC/dW_l = delta_l a_{l-1}^T,  dC/db_l = delta_l,  for C = sum((a_L - y)^2).

    Weights (and biases) are standard normal, and x uniform in [0, 1) unless given, all drawn
    from ``seed``. Returns a JSON-able dict: ``sizes``, ``seed``, ``x``, ``target``, ``lr``,
    ``weights`` (W_1..W_L as nested lists), ``biases`` (b_1..b_L, or ``None``), ``cost``,
    ``cost_after`` (one step with the delta gradients), ``layers`` (per layer:
    ``layer``, ``shape``, ``delta``, ``grad_W``, ``max_abs_diff`` to autograd through bp_service's
    Functions, and for small networks ``naive_max_abs_diff``) and ``multiplications``
    (``naive``, ``backprop`` and, for small networks, ``naive_counted``).
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes needs at least two widths, all >= 1, got {sizes}")
    Ws, bs, a0 = _draw_network(sizes, seed, x, bias)
    y = torch.full((sizes[-1],), float(target), dtype=DOUBLE)

    acts = _sigmoid_net(a0, Ws, bs)
    deltas = delta_recursion(Ws, acts, y)
    grad_W = [torch.outer(deltas[k], acts[k - 1]) for k in range(1, len(sizes))]  # dC/dW_l = delta_l a_{l-1}^T
    layers = _layer_reports(sizes, deltas, grad_W, _autograd_check(a0, Ws, bs, y), bias)

    new_W = [W - lr * gW for W, gW in zip(Ws, grad_W)]
    new_b = [None if b is None else b - lr * deltas[k] for k, b in enumerate(bs, start=1)]
    counts = _count_multiplications(sizes, Ws, acts, target, bias, deltas, grad_W, layers)
    return {
        "sizes": sizes,
        "seed": seed,
        "x": a0.tolist(),
        "target": float(target),
        "lr": lr,
        "weights": [W.tolist() for W in Ws],
        "biases": [b.tolist() for b in bs] if bias else None,
        "cost": ((acts[-1] - y) ** 2).sum().item(),
        "cost_after": ((_sigmoid_net(a0, new_W, new_b)[-1] - y) ** 2).sum().item(),
        "layers": layers,
        "multiplications": counts,
    }
