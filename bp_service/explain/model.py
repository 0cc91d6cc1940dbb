"""The worked example's numbers: the 3-2-1 network's forward pass, every gradient as its chain of
factors, the autograd check through bp_service's own Functions, and gradient descent on it.

    x1 --w1,w4--\\
    x2 --w2,w5---> h1, h2 --w7,w8--> o        a1 = x,  z1 = W1 a1 (+ b1, b2),  a2 = sigmoid(z1)
    x3 --w3,w6--/                                     z2 = W2 a2 (+ b3),       a3 = sigmoid(z2)
                                                      C  = (a3 - y)^2

    W1 = [[w1, w2, w3],      W2 = [[w7, w8]]
          [w4, w5, w6]]

Imports only torch and the core (:mod:`bp_service.functions`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from bp_service import functions as F

DOUBLE = torch.float64

# The default example. Both rows of W1 give the same pre-activation (z1_1 = z1_2 = 0.125, exact in
# binary floating point), so a2_1 == a2_2 bit for bit, and w8 = -w7 with w7 a power of two makes
# z2 = w7 a2_1 + w8 a2_2 exactly 0: the untrained network answers a3 = 0.5, as in the text. The
# hidden gradients are proportional to w7 and w8, so they are not zero.
DEFAULT_X = (1.0, 0.5, -1.0)
DEFAULT_TARGET = 1.0
DEFAULT_WEIGHTS = (0.5, -0.25, 0.25, 0.25, 0.5, 0.375, 0.5, -0.5)
# b1 = b2 keeps the hidden activations equal and b3 = 0 keeps z2 = 0, so a3 = 0.5 with --bias too.
DEFAULT_BIASES = (0.25, 0.25, 0.0)
DEFAULT_LR = 0.5

WEIGHT_NAMES = tuple(f"w{i}" for i in range(1, 9))
BIAS_NAMES = ("b1", "b2", "b3")
REPORT_KEYS = ("x", "target", "lr", "weights", "forward", "gradients", "updated", "cost_after")

Chain = list[tuple[str, float]]  # (factor's name, its value), from the cost back to the parameter


def _sigmoid(z: float) -> float:
    """Logistic sigmoid of a float; the two branches keep exp() from overflowing for large |z|."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _check_numbers(name: str, values: Sequence[float], count: int) -> list[float]:
    """``values`` as a list of ``count`` finite floats, or a ValueError that names them."""
    values = [float(v) for v in values]
    if len(values) != count:
        raise ValueError(f"{name} takes {count} numbers, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite numbers, got {values}")
    return values


def _checked_params(weights: Sequence[float], biases: Sequence[float] | None) -> dict[str, float]:
    """w1..w8 (and b1..b3) by name, each checked finite."""
    params = dict(zip(WEIGHT_NAMES, _check_numbers("weights", weights, 8)))
    if biases is not None:
        params.update(zip(BIAS_NAMES, _check_numbers("biases", biases, 3)))
    return params


def forward(x: Sequence[float], target: float, params: dict[str, float]) -> dict[str, Any]:
    """The forward pass written out neuron by neuron, exactly as the walk-through writes it."""
    p = params
    b1, b2, b3 = p.get("b1", 0.0), p.get("b2", 0.0), p.get("b3", 0.0)
    z1 = [
        p["w1"] * x[0] + p["w2"] * x[1] + p["w3"] * x[2] + b1,  # z1_1, into h1
        p["w4"] * x[0] + p["w5"] * x[1] + p["w6"] * x[2] + b2,  # z1_2, into h2
    ]
    a2 = [_sigmoid(z) for z in z1]
    z2 = [p["w7"] * a2[0] + p["w8"] * a2[1] + b3]
    a3 = [_sigmoid(z2[0])]
    cost = (a3[0] - target) ** 2
    return {"z1": z1, "a2": a2, "z2": z2, "a3": a3, "cost": cost}


def _output_delta(target: float, a3: float) -> Chain:
    """The two factors every chain starts with: their product is the output delta dC/dz2."""
    return [
        ("dC/da3", 2.0 * (a3 - target)),  # C = (a3 - y)^2
        ("da3/dz2", a3 * (1.0 - a3)),  # sigmoid'(z2), from its output
    ]


def _hidden_chains(x: Sequence[float], params: dict[str, float], a2: list[float], head: Chain) -> dict[str, Chain]:
    """Chains of w1..w6 (and b1, b2): through the output delta, back along w7 or w8, into h1 or h2."""
    chains: dict[str, Chain] = {}
    for j in (1, 2):  # hidden neuron h_j: weights w1..w3 (j = 1) or w4..w6 (j = 2)
        a = a2[j - 1]
        through_hj = [
            *head,
            (f"dz2/da2_{j}", params[f"w{6 + j}"]),  # z2 = w7 a2_1 + w8 a2_2 (+ b3)
            (f"da2_{j}/dz1_{j}", a * (1.0 - a)),  # sigmoid'(z1_j)
        ]
        for k in (1, 2, 3):
            w = f"w{3 * (j - 1) + k}"
            chains[w] = [*through_hj, (f"dz1_{j}/d{w}", x[k - 1])]  # z1_j = ... + w x_k + ...
        if "b1" in params:
            chains[f"b{j}"] = [*through_hj, (f"dz1_{j}/db{j}", 1.0)]  # z1_j = ... + b_j
    return chains


def _output_chains(params: dict[str, float], a2: list[float], head: Chain) -> dict[str, Chain]:
    """Chains of w7, w8 (and b3): the output delta times what the weight multiplies in z2."""
    chains: dict[str, Chain] = {}
    for j in (1, 2):
        w = f"w{6 + j}"
        chains[w] = [*head, (f"dz2/d{w}", a2[j - 1])]  # z2 = ... + w a2_j + ...
    if "b3" in params:
        chains["b3"] = [*head, ("dz2/db3", 1.0)]  # z2 = ... + b3
    return chains


def chains(x: Sequence[float], target: float, params: dict[str, float], fwd: dict) -> dict[str, Chain]:
    """Each parameter's chain of factors, as (name, value) pairs, from the forward values alone.

    Every chain starts at the cost and walks back to the parameter; the first two factors are
    the same for all of them, which is what backpropagation exploits (the output delta).
    """
    head = _output_delta(target, fwd["a3"][0])
    found = {**_hidden_chains(x, params, fwd["a2"], head), **_output_chains(params, fwd["a2"], head)}
    return {name: found[name] for name in params}  # in the order w1..w8, b1..b3


def autograd_gradients(
    x: Sequence[float],
    target: float,
    weights: Sequence[float],
    biases: Sequence[float] | None = None,
    fused: bool = True,
) -> dict[str, float]:
    """dC/dparam by autograd through bp_service's hand-written Functions: the independent check.

    ``fused`` uses one :func:`~bp_service.functions.linear_sigmoid` per layer, otherwise
    :func:`~bp_service.functions.linear` followed by :func:`~bp_service.functions.sigmoid`.
    The cost is ``mse_loss`` of a single element, which is exactly ``(a3 - y)^2``.
    """
    a1 = torch.tensor(x, dtype=DOUBLE)
    W1 = torch.tensor(weights[:6], dtype=DOUBLE).reshape(2, 3).requires_grad_()
    W2 = torch.tensor(weights[6:], dtype=DOUBLE).reshape(1, 2).requires_grad_()
    b1 = b3 = None
    if biases is not None:
        b1 = torch.tensor(biases[:2], dtype=DOUBLE).requires_grad_()
        b3 = torch.tensor(biases[2:], dtype=DOUBLE).requires_grad_()

    def layer(a, W, bias):
        return F.linear_sigmoid(a, W, bias) if fused else F.sigmoid(F.linear(a, W, bias))

    a3 = layer(layer(a1, W1, b1), W2, b3)
    cost = F.mse_loss(a3, torch.tensor([target], dtype=DOUBLE))
    leaves = [W1, W2] + ([] if biases is None else [b1, b3])
    grads = torch.autograd.grad(cost, leaves)
    values = grads[0].flatten().tolist() + grads[1].flatten().tolist()
    names = list(WEIGHT_NAMES)
    if biases is not None:
        values += grads[2].tolist() + grads[3].tolist()
        names += BIAS_NAMES
    return dict(zip(names, values))


def _gradients(found: dict[str, Chain], checks: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each chain with its product, the gradient, beside autograd's value."""
    return {
        name: {
            "chain": [{"factor": factor, "value": value} for factor, value in chain],
            "value": math.prod(value for _, value in chain),
            "autograd": checks[name],
        }
        for name, chain in found.items()
    }


def explain(
    x: Sequence[float],
    target: float,
    weights: Sequence[float],
    biases: Sequence[float] | None = None,
    lr: float = DEFAULT_LR,
) -> dict[str, Any]:
    """One forward pass, every gradient as its chain of factors, and one gradient-descent step.

    Args:
        x: the three inputs x1, x2, x3.
        target: the desired output y.
        weights: w1..w8 (W1 = [[w1, w2, w3], [w4, w5, w6]], W2 = [[w7, w8]]).
        biases: b1, b2 (hidden) and b3 (output), or ``None`` for a network without biases.
        lr: the gradient-descent step size.

    Returns:
        A JSON-able dict with the keys of :data:`REPORT_KEYS`; ``gradients[name]`` holds the
        ``chain`` of ``{"factor", "value"}``, their product ``value``, and ``autograd``.

    Raises:
        ValueError: on a wrong count, a non-finite number or ``lr <= 0``.
    """
    x = _check_numbers("x", x, 3)
    (target,) = _check_numbers("target", [target], 1)
    params = _checked_params(weights, biases)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")

    fwd = forward(x, target, params)
    checks = autograd_gradients(x, target, [params[n] for n in WEIGHT_NAMES], biases)
    gradients = _gradients(chains(x, target, params, fwd), checks)
    updated = {name: value - lr * gradients[name]["value"] for name, value in params.items()}
    return {
        "x": x,
        "target": target,
        "lr": lr,
        "weights": params,
        "forward": fwd,
        "gradients": gradients,
        "updated": updated,
        "cost_after": forward(x, target, updated)["cost"],
    }


def train(
    x: Sequence[float],
    target: float,
    weights: Sequence[float],
    biases: Sequence[float] | None = None,
    lr: float = DEFAULT_LR,
    steps: int = 1,
) -> list[dict[str, float]]:
    """``steps`` gradient-descent steps on the one example, with the hand-derived gradients.

    Returns one row per step, ``{"step", "cost", "a3"}``, from step 0 (before any update) to
    ``steps`` (after the last one).
    """
    report = explain(x, target, weights, biases, lr)  # validates the arguments
    x, target, params = report["x"], report["target"], report["weights"]
    rows = []
    for step in range(steps + 1):
        fwd = forward(x, target, params)
        rows.append({"step": step, "cost": fwd["cost"], "a3": fwd["a3"][0]})
        # The same chain products as explain(), without its autograd check: training is the loop.
        found = chains(x, target, params, fwd)
        params = {name: value - lr * math.prod(v for _, v in found[name]) for name, value in params.items()}
    return rows
