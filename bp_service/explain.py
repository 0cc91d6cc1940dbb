"""``bp-explain``: the worked example of backpropagation, executed and checked.

The network is the classic one of the walk-through: three inputs, two sigmoid hidden neurons,
one sigmoid output, and the squared-error cost of a single example::

    x1 --w1,w4--\\
    x2 --w2,w5---> h1, h2 --w7,w8--> o        a1 = x,  z1 = W1 a1 (+ b1, b2),  a2 = sigmoid(z1)
    x3 --w3,w6--/                                     z2 = W2 a2 (+ b3),       a3 = sigmoid(z2)
                                                      C  = (a3 - y)^2

    W1 = [[w1, w2, w3],      W2 = [[w7, w8]]
          [w4, w5, w6]]

Every gradient is written out as the product of its chain-rule factors, each factor read off the
forward pass (``dC/da3 = 2(a3 - y)``, ``da3/dz2 = a3(1 - a3)``, ``dz2/dw7 = a2_1``, ...). Autograd,
run through bp_service's own hand-written Functions, is only the check: the product of the
factors must match it to 1e-12 in float64. One gradient-descent step ``w <- w - lr * dC/dw``
then shows the cost falling.

``--sizes 3 4 4 1`` leaves the worked example for a deeper sigmoid network with seeded random
weights and shows the layer-wise form of the same chain rule, the delta recursion, and what it
saves compared with expanding every weight's chain separately.

Public entry points: :func:`explain` (the 3-2-1 report as a JSON-able dict), :func:`render_text`,
:func:`plot_network`, :func:`train`, :func:`explain_deep`, :func:`render_deep_text` and :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, NoReturn

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


# --------------------------------------------------------------------------- the 3-2-1 example
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


def _forward(x: Sequence[float], target: float, params: dict[str, float]) -> dict[str, Any]:
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


def _chains(x: Sequence[float], target: float, params: dict[str, float], fwd: dict) -> dict[str, list]:
    """Each parameter's chain of factors, as (name, value) pairs, from the forward values alone.

    Every chain starts at the cost and walks back to the parameter; the first two factors are
    the same for all of them, which is what backpropagation exploits (the output delta).
    """
    a2, a3 = fwd["a2"], fwd["a3"][0]
    head = [
        ("dC/da3", 2.0 * (a3 - target)),  # C = (a3 - y)^2
        ("da3/dz2", a3 * (1.0 - a3)),  # sigmoid'(z2), from its output
    ]
    chains: dict[str, list] = {}
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
    for j in (1, 2):
        w = f"w{6 + j}"
        chains[w] = [*head, (f"dz2/d{w}", a2[j - 1])]  # z2 = ... + w a2_j + ...
    if "b3" in params:
        chains["b3"] = [*head, ("dz2/db3", 1.0)]  # z2 = ... + b3
    return {name: chains[name] for name in params}  # in the order w1..w8, b1..b3


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
    params = dict(zip(WEIGHT_NAMES, _check_numbers("weights", weights, 8)))
    if biases is not None:
        params.update(zip(BIAS_NAMES, _check_numbers("biases", biases, 3)))
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")

    fwd = _forward(x, target, params)
    checks = autograd_gradients(x, target, [params[n] for n in WEIGHT_NAMES], biases)
    gradients = {}
    for name, chain in _chains(x, target, params, fwd).items():
        product = math.prod(value for _, value in chain)
        gradients[name] = {
            "chain": [{"factor": factor, "value": value} for factor, value in chain],
            "value": product,
            "autograd": checks[name],
        }
    updated = {name: value - lr * gradients[name]["value"] for name, value in params.items()}
    cost_after = _forward(x, target, updated)["cost"]
    return {
        "x": x,
        "target": target,
        "lr": lr,
        "weights": params,
        "forward": fwd,
        "gradients": gradients,
        "updated": updated,
        "cost_after": cost_after,
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
        fwd = _forward(x, target, params)
        rows.append({"step": step, "cost": fwd["cost"], "a3": fwd["a3"][0]})
        # The same chain products as explain(), without its autograd check: training is the loop.
        chains = _chains(x, target, params, fwd)
        params = {name: value - lr * math.prod(v for _, v in chains[name]) for name, value in params.items()}
    return rows


# --------------------------------------------------------------------------- text for a learner
def _num(v: float) -> str:
    return f"{v:.6g}"


# What each factor is, read off the forward pass; keyed by the shape of the factor's name.
_MEANINGS = (
    (r"dC/da3", "2(a3 - y)"),
    (r"da3/dz2", "a3(1 - a3)"),
    (r"dz2/da2_(\d)", lambda m: f"w{6 + int(m[1])}"),
    (r"da2_(\d)/dz1_\d", lambda m: f"a2_{m[1]}(1 - a2_{m[1]})"),
    (r"dz1_\d/dw(\d)", lambda m: f"x{(int(m[1]) - 1) % 3 + 1}"),
    (r"dz2/dw(\d)", lambda m: f"a2_{int(m[1]) - 6}"),
    (r"dz\w*/db\d", "1"),
)


def _meaning(factor: str) -> str:
    for pattern, meaning in _MEANINGS:
        m = re.fullmatch(pattern, factor)
        if m:
            return meaning if isinstance(meaning, str) else meaning(m)
    return "?"


def _columns(rows: list[list[str]], indent: str = "  ", gap: str = "   ") -> list[str]:
    """Left-aligned columns, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return [(indent + gap.join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]


def render_text(report: dict[str, Any], steps: list[dict[str, float]] | None = None) -> str:
    """The report of :func:`explain` as text: forward pass, chains, update (and a cost table)."""
    x, y, lr, params, fwd = report["x"], report["target"], report["lr"], report["weights"], report["forward"]
    grads = report["gradients"]
    has_bias = "b1" in params
    lines = ["Backpropagation on a 3-2-1 sigmoid network, one example, cost C = (a3 - y)^2", ""]

    lines.append("Network")
    names = " ".join(f"{n}={_num(params[n])}" for n in WEIGHT_NAMES)
    lines += [f"  x = ({', '.join(map(_num, x))})   target y = {_num(y)}   lr = {_num(lr)}", f"  {names}"]
    if has_bias:
        lines.append("  " + " ".join(f"{n}={_num(params[n])}" for n in BIAS_NAMES))
    lines.append("")

    b = ("", "", "") if not has_bias else (" + b1", " + b2", " + b3")
    lines.append("Forward pass")
    lines += _columns(
        [
            ["neuron", "z (weighted sum)", "", "a = sigmoid(z)"],
            ["h1", f"z1_1 = w1 x1 + w2 x2 + w3 x3{b[0]}", f"= {_num(fwd['z1'][0])}", f"a2_1 = {_num(fwd['a2'][0])}"],
            ["h2", f"z1_2 = w4 x1 + w5 x2 + w6 x3{b[1]}", f"= {_num(fwd['z1'][1])}", f"a2_2 = {_num(fwd['a2'][1])}"],
            ["o", f"z2   = w7 a2_1 + w8 a2_2{b[2]}", f"= {_num(fwd['z2'][0])}", f"a3   = {_num(fwd['a3'][0])}"],
        ]
    )
    lines += [f"  cost C = (a3 - y)^2 = {_num(fwd['cost'])}", ""]

    lines.append("Backward pass: each dC/dw is a product of chain-rule factors read off the forward pass")
    lines.append("  (rows: the factor, what it equals, its value; then the product, checked against autograd)")

    def row(first: str, cells: list[str]) -> list[str]:
        return [first, "=", *[part for cell in cells for part in (cell, "*")][:-1]]  # a * b * c

    for name, g in grads.items():
        chain = g["chain"]
        lines.append("")
        lines += _columns(
            [
                row(f"dC/d{name}", [f["factor"] for f in chain]),
                row("", [_meaning(f["factor"]) for f in chain]),
                row("", [_num(f["value"]) for f in chain]),
            ],
            gap=" ",
        )
        diff = abs(g["value"] - g["autograd"])
        lines.append(
            f"  {'':<{len(name) + 4}} = {_num(g['value'])}"
            f"     (autograd: {_num(g['autograd'])}, |difference| {diff:.1e})"
        )
    naive, backprop = naive_multiplications([3, 2, 1], has_bias), backprop_multiplications([3, 2, 1])
    lines += [
        "",
        f"  Every chain starts with dC/da3 * da3/dz2. Multiplying each chain out separately takes {naive}",
        f"  multiplications; backprop computes that shared start (the delta) once and needs {backprop}.",
        "",
    ]

    lines.append(f"Gradient descent: w <- w - lr * dC/dw   (lr = {_num(lr)})")
    rows = [["param", "before", "dC/dw", "after"]]
    rows += [[n, _num(params[n]), _num(grads[n]["value"]), _num(report["updated"][n])] for n in params]
    lines += _columns(rows)
    cost, after = fwd["cost"], report["cost_after"]
    verdict = "lower" if after < cost else "NOT lower: try a smaller --lr"
    lines += [f"  cost C: {_num(cost)} -> {_num(after)}   ({verdict})"]

    if steps is not None:
        n = len(steps) - 1
        shown = steps if n <= 20 else [steps[round(i * n / 20)] for i in range(21)]  # a short table, always
        heading = f"Training on this one example for {n} steps" + ("" if n <= 20 else f", {len(shown)} of them shown")
        lines += ["", heading]
        lines += _columns([["step", "cost", "a3"]] + [[str(r["step"]), _num(r["cost"]), _num(r["a3"])] for r in shown])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the picture
def plot_network(report: dict[str, Any], path: str) -> None:
    """Draw the 3-2-1 network of a :func:`explain` report to a PNG, each edge labelled with w and dC/dw."""
    # Figure + Agg canvas directly, not pyplot: no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    params, grads, fwd, x = report["weights"], report["gradients"], report["forward"], report["x"]
    pos = {"x1": (0.0, 5.0), "x2": (0.0, 2.5), "x3": (0.0, 0.0), "h1": (6.0, 4.0), "h2": (6.0, 1.0), "o": (9.0, 2.5)}
    edges = {f"w{3 * (j - 1) + k}": (f"x{k}", f"h{j}") for j in (1, 2) for k in (1, 2, 3)}
    edges.update({"w7": ("h1", "o"), "w8": ("h2", "o")})
    # Where along its edge each label sits: the middle input's labels further right, so that no
    # two of the six crossing input edges carry their labels at the same spot.
    along = {"w1": 0.3, "w2": 0.55, "w3": 0.3, "w4": 0.3, "w5": 0.55, "w6": 0.3, "w7": 0.5, "w8": 0.5}
    box = {"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.75"}

    fig = Figure(figsize=(14, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.set_xlim(-1.5, 10.0)
    ax.set_ylim(-1.0, 5.6)
    for name, (start, end) in edges.items():
        (x0, y0), (x1, y1) = pos[start], pos[end]
        ax.plot([x0, x1], [y0, y1], color="0.6", lw=1.2, zorder=1)
        t = along[name]
        label = f"{name} = {params[name]:.4g}\ndC/d{name} = {grads[name]['value']:.4g}"
        ax.text(x0 + t * (x1 - x0), y0 + t * (y1 - y0), label, fontsize=9, ha="center", va="center", bbox=box, zorder=3)

    notes = {f"x{k}": f"x{k} = {x[k - 1]:.4g}" for k in (1, 2, 3)}
    notes.update(h1=f"a2_1 = {fwd['a2'][0]:.4g}", h2=f"a2_2 = {fwd['a2'][1]:.4g}", o=f"a3 = {fwd['a3'][0]:.4g}")
    for node, bias in (("h1", "b1"), ("h2", "b2"), ("o", "b3")):
        if bias in params:
            notes[node] += f"\n{bias} = {params[bias]:.4g}\ndC/d{bias} = {grads[bias]['value']:.4g}"
    for node, (px, py) in pos.items():
        is_input = node.startswith("x")
        ax.add_patch(Circle((px, py), 0.4, fc="#cfe2f3" if is_input else "#fce5cd", ec="0.3", zorder=4))
        ax.text(px, py, node, fontsize=12, ha="center", va="center", weight="bold", zorder=5)
        if is_input:  # left of the node, away from its edges
            ax.text(px - 0.5, py, notes[node], fontsize=9, ha="right", va="center", zorder=5)
        else:
            ax.text(px, py - 0.5, notes[node], fontsize=9, ha="center", va="top", bbox=box, zorder=5)
    ax.set_title(
        f"3-2-1 sigmoid network, target y = {report['target']:.4g}, cost C = (a3 - y)^2 = {fwd['cost']:.4g}",
        fontsize=12,
    )
    fig.savefig(path, format="png", bbox_inches="tight")


# --------------------------------------------------------------------------- deeper networks
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
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(n_out, n_in, generator=g, dtype=DOUBLE) for n_in, n_out in pairwise(sizes)]
    bs = [torch.randn(n, generator=g, dtype=DOUBLE) if bias else None for n in sizes[1:]]
    a0 = torch.rand(sizes[0], generator=g, dtype=DOUBLE) if x is None else torch.tensor(x, dtype=DOUBLE)
    if a0.shape != (sizes[0],):
        raise ValueError(f"x takes {sizes[0]} numbers (the first of sizes), got {a0.numel()}")
    y = torch.full((sizes[-1],), float(target), dtype=DOUBLE)

    acts = _sigmoid_net(a0, Ws, bs)
    L = len(Ws)
    deltas: list = [None] * (L + 1)  # deltas[k] = dC/dz_k; index 0 unused
    deltas[L] = 2 * (acts[L] - y) * acts[L] * (1 - acts[L])
    for k in range(L - 1, 0, -1):  # one matrix-vector product per layer, reusing delta_{k+1}
        deltas[k] = (Ws[k].T @ deltas[k + 1]) * acts[k] * (1 - acts[k])
    grad_W = [torch.outer(deltas[k], acts[k - 1]) for k in range(1, L + 1)]

    # The check: autograd through bp_service's fused layers; mse_loss is a mean, C is a sum.
    leaf_W = [W.clone().requires_grad_() for W in Ws]
    leaf_b = [None if b is None else b.clone().requires_grad_() for b in bs]
    a = a0
    for W, b in zip(leaf_W, leaf_b):
        a = F.linear_sigmoid(a, W, b)
    cost = F.mse_loss(a, y) * sizes[-1]
    auto = torch.autograd.grad(cost, leaf_W + [b for b in leaf_b if b is not None])
    auto_W, auto_b = auto[:L], auto[L:]

    layers = []
    for k in range(1, L + 1):
        diff = (grad_W[k - 1] - auto_W[k - 1]).abs().max().item()
        if bias:
            diff = max(diff, (deltas[k] - auto_b[k - 1]).abs().max().item())
        layers.append(
            {
                "layer": k,
                "shape": [sizes[k], sizes[k - 1]],
                "delta": deltas[k].tolist(),
                "grad_W": grad_W[k - 1].tolist(),
                "max_abs_diff": diff,
            }
        )

    new_W = [W - lr * gW for W, gW in zip(Ws, grad_W)]
    new_b = [None if b is None else b - lr * deltas[k] for k, b in enumerate(bs, start=1)]
    cost_after = ((_sigmoid_net(a0, new_W, new_b)[-1] - y) ** 2).sum().item()

    counts = {"naive": naive_multiplications(sizes, bias), "backprop": backprop_multiplications(sizes)}
    if counts["naive"] <= 100_000:  # small enough to multiply every chain out, and count
        naive_W, naive_b, counted = naive_chain_gradients(Ws, acts, float(target), bias)
        counts["naive_counted"] = counted
        for k in range(1, L + 1):
            diff = (naive_W[k - 1] - grad_W[k - 1]).abs().max().item()
            if bias:
                diff = max(diff, (naive_b[k - 1] - deltas[k]).abs().max().item())
            layers[k - 1]["naive_max_abs_diff"] = diff
    return {
        "sizes": sizes,
        "seed": seed,
        "x": a0.tolist(),
        "target": float(target),
        "lr": lr,
        "weights": [W.tolist() for W in Ws],
        "biases": [b.tolist() for b in bs] if bias else None,
        "cost": ((acts[L] - y) ** 2).sum().item(),
        "cost_after": cost_after,
        "layers": layers,
        "multiplications": counts,
    }


def render_deep_text(report: dict[str, Any]) -> str:
    """The report of :func:`explain_deep` as text."""
    sizes = report["sizes"]
    L = len(sizes) - 1
    lines = [
        f"Backpropagation on a {'-'.join(map(str, sizes))} sigmoid network (seed {report['seed']}), "
        "cost C = sum((a_L - y)^2)",
        "",
        "The delta recursion (delta_l = dC/dz_l), from the output back:",
        "  delta_L = dC/da_L * a_L(1 - a_L)                   dC/da_L = 2(a_L - y)",
        "  delta_l = (W_{l+1}^T delta_{l+1}) * a_l(1 - a_l)   reuses delta_{l+1}: no chain is expanded twice",
        "  dC/dW_l = delta_l a_{l-1}^T                         dC/db_l = delta_l",
        "",
        f"  cost C = {_num(report['cost'])}   target y = {_num(report['target'])}",
        "",
    ]
    rows = [["layer", "W shape", "delta_l", "max |dC/dW - autograd|"]]
    for layer in reversed(report["layers"]):
        delta = layer["delta"]
        if len(delta) <= 6:
            shown = ", ".join(map(_num, delta))
        else:  # a wide layer: a summary, not a screenful
            shown = f"{len(delta)} values, largest |delta| {max(map(abs, delta)):.3g}"
        name = f"{L} = L" if layer["layer"] == L else str(layer["layer"])
        rows.append([name, "x".join(map(str, layer["shape"])), f"({shown})", f"{layer['max_abs_diff']:.1e}"])
    lines += _columns(rows)
    counts = report["multiplications"]
    lines += [
        "",
        "Multiplications to turn the local derivatives into all the gradients:",
        f"  naive, every parameter's chain multiplied out over every path: {counts['naive']}"
        + (f"   (counted by doing it: {counts['naive_counted']})" if "naive_counted" in counts else ""),
        f"  backprop, reusing the deltas:                                  {counts['backprop']}",
        "",
        f"One gradient-descent step (lr = {_num(report['lr'])}): cost {_num(report['cost'])} -> "
        f"{_num(report['cost_after'])}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _finite(text: str) -> float:
    """argparse type: a finite float, with a message argparse prefixes with the flag's name."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _build_parser() -> _Parser:
    p = _Parser(
        prog="bp-explain",
        description="Backpropagation on the 3-2-1 sigmoid network of the walk-through, written out "
        "factor by factor and checked against autograd.",
    )

    def default(values: Sequence[float]) -> str:
        return " ".join(map(_num, values))

    p.add_argument("--x", nargs="+", type=_finite, metavar="X", help=f"x1 x2 x3 (default: {default(DEFAULT_X)})")
    p.add_argument("--target", type=_finite, default=DEFAULT_TARGET, metavar="Y", help="desired output (default 1)")
    weights_help = f"w1..w8 (default: {default(DEFAULT_WEIGHTS)})"
    biases_help = f"b1 b2 b3, implies --bias (default: {default(DEFAULT_BIASES)})"
    p.add_argument("--weights", nargs="+", type=_finite, metavar="W", help=weights_help)
    p.add_argument("--bias", action="store_true", help="add biases b1 b2 (hidden) and b3 (output)")
    p.add_argument("--biases", nargs="+", type=_finite, metavar="B", help=biases_help)
    p.add_argument("--lr", type=_finite, default=DEFAULT_LR, help=f"learning rate, > 0 (default {DEFAULT_LR})")
    p.add_argument("--steps", type=int, metavar="N", help="also train N steps and show the cost falling")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--plot", metavar="FILE.png", help="draw the network, edges labelled with weight and gradient")
    p.add_argument("--sizes", nargs="+", type=int, metavar="N", help="a deeper sigmoid network instead, e.g. 3 4 4 1")
    p.add_argument("--seed", type=int, help="seed of the random weights for --sizes (default 0)")
    return p


def _validate(p: _Parser, args: argparse.Namespace) -> None:
    """Checks argparse cannot express; each failure is one line naming the flag."""
    n_in = args.sizes[0] if args.sizes else 3
    if args.x is not None and len(args.x) != n_in:
        what = "x1, x2, x3" if not args.sizes else "the first of --sizes"
        p.error(f"--x takes {n_in} numbers ({what}), got {len(args.x)}")
    if args.weights is not None and len(args.weights) != 8:
        p.error(f"--weights takes 8 numbers (w1..w8), got {len(args.weights)}")
    if args.biases is not None and len(args.biases) != 3:
        p.error(f"--biases takes 3 numbers (b1, b2, b3), got {len(args.biases)}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr:g}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.steps is not None and args.steps > 10_000:
        p.error(f"--steps must be <= 10000, got {args.steps}")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        p.error(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
    if args.sizes is None:
        if args.seed is not None:
            p.error("--seed only applies with --sizes")
        return
    if args.seed is not None and not 0 <= args.seed < 2**63:
        p.error(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    if len(args.sizes) < 2 or min(args.sizes) < 1 or max(args.sizes) > 1024 or len(args.sizes) > 12:
        p.error(f"--sizes takes 2 to 12 widths from 1 to 1024, input first and output last, got {args.sizes}")
    for flag, value in (("--weights", args.weights), ("--biases", args.biases), ("--plot", args.plot)):
        if value is not None:
            p.error(f"{flag} applies to the 3-2-1 example only, not with --sizes")
    if args.steps is not None:
        p.error("--steps applies to the 3-2-1 example only, not with --sizes")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bp-explain``; returns the exit status (0, or 2 for bad input)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        _validate(parser, args)
    except SystemExit as exit_:  # argparse exits for --help (0) and bad input (2): return it instead
        return int(exit_.code or 0)

    if args.sizes:
        seed = 0 if args.seed is None else args.seed
        report = explain_deep(args.sizes, seed, args.x, args.target, args.bias, args.lr)
        if not _all_finite(report):
            return _fail("the numbers overflow float64; try smaller --x, --target or --lr")
        sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_deep_text(report))
        return 0

    x = DEFAULT_X if args.x is None else args.x
    weights = DEFAULT_WEIGHTS if args.weights is None else args.weights
    biases = args.biases if args.biases is not None else (DEFAULT_BIASES if args.bias else None)
    report = explain(x, args.target, weights, biases, args.lr)
    # The JSON keys are fixed, so --steps only adds the text table.
    steps = train(x, args.target, weights, biases, args.lr, args.steps) if args.steps and not args.json else None
    if not (_all_finite(report) and _all_finite(steps)):
        return _fail("the numbers overflow float64; try smaller --weights, --x, --target or --lr")
    if args.plot:
        try:
            plot_network(report, args.plot)
        except OSError as exc:
            return _fail(f"--plot: cannot write {args.plot!r}: {exc.strerror or exc}")
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(render_text(report, steps))
        if args.plot:
            sys.stdout.write(f"\nNetwork drawn to {args.plot}\n")
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"bp-explain: error: {message}\n")
    return 2


def _all_finite(obj: Any) -> bool:
    """True when every number in a nested dict/list is finite (JSON has no NaN or inf)."""
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
