"""The reports of :func:`~bp_service.explain.model.explain` and
:func:`~bp_service.explain.deep.explain_deep` as text for a learner, or as JSON."""

from __future__ import annotations

import json
import re
from typing import Any

from bp_service.commands import columns
from bp_service.explain.deep import backprop_multiplications, naive_multiplications
from bp_service.explain.model import BIAS_NAMES, WEIGHT_NAMES

STEPS_SHOWN = 20  # a longer training run is shown as 21 evenly spaced rows: a short table, always
# A sigmoid whose slope a(1 - a) is below this (|z| > ~28) passes on no gradient a float64 step can use.
SATURATED = 1e-12


def num(v: float) -> str:
    """A number as the text shows it: six significant digits, and 0 for -0.0 (a product with a zero factor
    of either sign is a zero to a learner, not a different number)."""
    return f"{v + 0.0:.6g}"


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


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
    return columns(rows, indent, gap)


# --------------------------------------------------------------------------- the 3-2-1 example
def _network(report: dict[str, Any]) -> list[str]:
    x, y, lr, params = report["x"], report["target"], report["lr"], report["weights"]
    names = " ".join(f"{n}={num(params[n])}" for n in WEIGHT_NAMES)
    lines = ["Network", f"  x = ({', '.join(map(num, x))})   target y = {num(y)}   lr = {num(lr)}", f"  {names}"]
    if "b1" in params:
        lines.append("  " + " ".join(f"{n}={num(params[n])}" for n in BIAS_NAMES))
    return [*lines, ""]


def _forward_pass(report: dict[str, Any]) -> list[str]:
    fwd = report["forward"]
    b = (" + b1", " + b2", " + b3") if "b1" in report["weights"] else ("", "", "")
    table = _columns(
        [
            ["neuron", "z (weighted sum)", "", "a = sigmoid(z)"],
            ["h1", f"z1_1 = w1 x1 + w2 x2 + w3 x3{b[0]}", f"= {num(fwd['z1'][0])}", f"a2_1 = {num(fwd['a2'][0])}"],
            ["h2", f"z1_2 = w4 x1 + w5 x2 + w6 x3{b[1]}", f"= {num(fwd['z1'][1])}", f"a2_2 = {num(fwd['a2'][1])}"],
            ["o", f"z2   = w7 a2_1 + w8 a2_2{b[2]}", f"= {num(fwd['z2'][0])}", f"a3   = {num(fwd['a3'][0])}"],
        ]
    )
    return ["Forward pass", *table, f"  cost C = (a3 - y)^2 = {num(fwd['cost'])}", ""]


def _product_row(first: str, cells: list[str]) -> list[str]:
    """``first = a * b * c`` as table cells."""
    return [first, "=", *[part for cell in cells for part in (cell, "*")][:-1]]


def _one_chain(name: str, g: dict[str, Any]) -> list[str]:
    """A gradient's factors (names, what each equals, values), then their product beside autograd."""
    chain = g["chain"]
    rows = [
        _product_row(f"dC/d{name}", [f["factor"] for f in chain]),
        _product_row("", [_meaning(f["factor"]) for f in chain]),
        _product_row("", [num(f["value"]) for f in chain]),
    ]
    diff = abs(g["value"] - g["autograd"])
    product = (
        f"  {'':<{len(name) + 4}} = {num(g['value'])}     (autograd: {num(g['autograd'])}, |difference| {diff:.1e})"
    )
    return ["", *_columns(rows, gap=" "), product]


def _backward_pass(report: dict[str, Any]) -> list[str]:
    lines = [
        "Backward pass: each dC/dw is a product of chain-rule factors read off the forward pass",
        "  (rows: the factor, what it equals, its value; then the product, checked against autograd)",
    ]
    for name, g in report["gradients"].items():
        lines += _one_chain(name, g)
    naive = naive_multiplications([3, 2, 1], "b1" in report["weights"])
    backprop = backprop_multiplications([3, 2, 1])
    return [
        *lines,
        "",
        f"  Every chain starts with dC/da3 * da3/dz2. Multiplying each chain out separately takes {naive}",
        f"  multiplications; backprop computes that shared start (the delta) once and needs {backprop}.",
        "",
    ]


def _descent_step(report: dict[str, Any]) -> list[str]:
    params, grads, lr = report["weights"], report["gradients"], report["lr"]
    rows = [["param", "before", "dC/dw", "after"]]
    rows += [[n, num(params[n]), num(grads[n]["value"]), num(report["updated"][n])] for n in params]
    cost, after = report["forward"]["cost"], report["cost_after"]
    return [
        f"Gradient descent: w <- w - lr * dC/dw   (lr = {num(lr)})",
        *_columns(rows),
        f"  cost C: {num(cost)} -> {num(after)}   ({_verdict(report)})",
    ]


def _verdict(report: dict[str, Any]) -> str:
    """Whether the step lowered the cost and, when not, the cause: only an overshoot calls for a smaller --lr."""
    fwd, cost, after = report["forward"], report["forward"]["cost"], report["cost_after"]
    if after < cost:
        return "lower"
    if cost == 0:
        return "already 0: a3 equals the target, nothing to learn"
    if after > cost and report["updated"] != report["weights"]:
        return "NOT lower: the step overshot: try a smaller --lr"
    units = {"a3": fwd["a3"][0], "a2_1": fwd["a2"][0], "a2_2": fwd["a2"][1]}
    flat = [f"{n}(1 - {n}) = {num(a * (1 - a))}" for n, a in units.items() if a * (1 - a) < SATURATED]
    if flat:
        them = "them" if len(flat) > 1 else "it"
        return (
            f"unchanged: saturated sigmoid{'s' * (len(flat) > 1)}, {', '.join(flat)}: no gradient gets through "
            f"{them}, and no --lr changes that; try smaller --weights or --x"
        )
    return "unchanged: lr * dC/dw is too small to change the cost in float64; try a larger --lr"


def _training(steps: list[dict[str, float]]) -> list[str]:
    n = len(steps) - 1
    shown = steps if n <= STEPS_SHOWN else [steps[round(i * n / STEPS_SHOWN)] for i in range(STEPS_SHOWN + 1)]
    heading = f"Training on this one example for {n} steps"
    if n > STEPS_SHOWN:
        heading += f", {len(shown)} of them shown"
    rows = [["step", "cost", "a3"]] + [[str(r["step"]), num(r["cost"]), num(r["a3"])] for r in shown]
    return ["", heading, *_columns(rows)]


def render_text(report: dict[str, Any], steps: list[dict[str, float]] | None = None) -> str:
    """The report of :func:`~bp_service.explain.model.explain` as text: forward pass, chains,
    update (and a cost table)."""
    lines = [
        "Backpropagation on a 3-2-1 sigmoid network, one example, cost C = (a3 - y)^2",
        "",
        *_network(report),
        *_forward_pass(report),
        *_backward_pass(report),
        *_descent_step(report),
    ]
    if steps is not None:
        lines += _training(steps)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- deeper networks
_DELTA_RECURSION = [
    "The delta recursion (delta_l = dC/dz_l), from the output back:",
    "  delta_L = dC/da_L * a_L(1 - a_L)                   dC/da_L = 2(a_L - y)",
    "  delta_l = (W_{l+1}^T delta_{l+1}) * a_l(1 - a_l)   reuses delta_{l+1}: no chain is expanded twice",
    "  dC/dW_l = delta_l a_{l-1}^T                         dC/db_l = delta_l",
]


def _deltas_table(report: dict[str, Any]) -> list[str]:
    """One row per layer, output first: its shape, its delta, its distance from autograd."""
    L = len(report["sizes"]) - 1
    rows = [["layer", "W shape", "delta_l", "max |dC/dW - autograd|"]]
    for layer in reversed(report["layers"]):
        delta = layer["delta"]
        if len(delta) <= 6:
            shown = ", ".join(map(num, delta))
        else:  # a wide layer: a summary, not a screenful
            shown = f"{len(delta)} values, largest |delta| {max(map(abs, delta)):.3g}"
        name = f"{L} = L" if layer["layer"] == L else str(layer["layer"])
        rows.append([name, "x".join(map(str, layer["shape"])), f"({shown})", f"{layer['max_abs_diff']:.1e}"])
    return _columns(rows)


def _deep_counts(report: dict[str, Any]) -> list[str]:
    counts = report["multiplications"]
    counted = f"   (counted by doing it: {counts['naive_counted']})" if "naive_counted" in counts else ""
    return [
        "Multiplications to turn the local derivatives into all the gradients:",
        f"  naive, every parameter's chain multiplied out over every path: {counts['naive']}{counted}",
        f"  backprop, reusing the deltas:                                  {counts['backprop']}",
    ]


def render_deep_text(report: dict[str, Any]) -> str:
    """The report of :func:`~bp_service.explain.deep.explain_deep` as text."""
    lines = [
        f"Backpropagation on a {'-'.join(map(str, report['sizes']))} sigmoid network (seed {report['seed']}), "
        "cost C = sum((a_L - y)^2)",
        "",
        *_DELTA_RECURSION,
        "",
        f"  cost C = {num(report['cost'])}   target y = {num(report['target'])}",
        "",
        *_deltas_table(report),
        "",
        *_deep_counts(report),
        "",
        f"One gradient-descent step (lr = {num(report['lr'])}): cost {num(report['cost'])} -> "
        f"{num(report['cost_after'])}",
    ]
    return "\n".join(lines) + "\n"
