"""``--plot``: the 3-2-1 network drawn to a PNG, each edge labelled with its weight and gradient.

matplotlib is imported inside :func:`plot_network`, and the CLI imports this module only when
``--plot`` is asked, so the text report never pays for it.
"""

from __future__ import annotations

from typing import Any

# Where each node sits, and which nodes each weight joins.
POSITIONS = {"x1": (0.0, 5.0), "x2": (0.0, 2.5), "x3": (0.0, 0.0), "h1": (6.0, 4.0), "h2": (6.0, 1.0), "o": (9.0, 2.5)}
EDGES = {f"w{3 * (j - 1) + k}": (f"x{k}", f"h{j}") for j in (1, 2) for k in (1, 2, 3)} | {
    "w7": ("h1", "o"),
    "w8": ("h2", "o"),
}
# Where along its edge each label sits: the middle input's labels further right, so that no
# two of the six crossing input edges carry their labels at the same spot.
ALONG = {"w1": 0.3, "w2": 0.55, "w3": 0.3, "w4": 0.3, "w5": 0.55, "w6": 0.3, "w7": 0.5, "w8": 0.5}
BOX = {"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.75"}


def _draw_edges(ax: Any, report: dict[str, Any]) -> None:
    params, grads = report["weights"], report["gradients"]
    for name, (start, end) in EDGES.items():
        (x0, y0), (x1, y1) = POSITIONS[start], POSITIONS[end]
        ax.plot([x0, x1], [y0, y1], color="0.6", lw=1.2, zorder=1)
        t = ALONG[name]
        label = f"{name} = {params[name]:.4g}\ndC/d{name} = {grads[name]['value']:.4g}"
        ax.text(x0 + t * (x1 - x0), y0 + t * (y1 - y0), label, fontsize=9, ha="center", va="center", bbox=BOX, zorder=3)


def _node_notes(report: dict[str, Any]) -> dict[str, str]:
    """Each node's value (and bias with its gradient), as written beside it."""
    params, grads, fwd, x = report["weights"], report["gradients"], report["forward"], report["x"]
    notes = {f"x{k}": f"x{k} = {x[k - 1]:.4g}" for k in (1, 2, 3)}
    notes.update(h1=f"a2_1 = {fwd['a2'][0]:.4g}", h2=f"a2_2 = {fwd['a2'][1]:.4g}", o=f"a3 = {fwd['a3'][0]:.4g}")
    for node, bias in (("h1", "b1"), ("h2", "b2"), ("o", "b3")):
        if bias in params:
            notes[node] += f"\n{bias} = {params[bias]:.4g}\ndC/d{bias} = {grads[bias]['value']:.4g}"
    return notes


def _draw_nodes(ax: Any, report: dict[str, Any]) -> None:
    from matplotlib.patches import Circle

    notes = _node_notes(report)
    for node, (px, py) in POSITIONS.items():
        is_input = node.startswith("x")
        ax.add_patch(Circle((px, py), 0.4, fc="#cfe2f3" if is_input else "#fce5cd", ec="0.3", zorder=4))
        ax.text(px, py, node, fontsize=12, ha="center", va="center", weight="bold", zorder=5)
        if is_input:  # left of the node, away from its edges
            ax.text(px - 0.5, py, notes[node], fontsize=9, ha="right", va="center", zorder=5)
        else:
            ax.text(px, py - 0.5, notes[node], fontsize=9, ha="center", va="top", bbox=BOX, zorder=5)


def plot_network(report: dict[str, Any], path: str) -> None:
    """Draw the 3-2-1 network of an :func:`~bp_service.explain.model.explain` report to a PNG."""
    # Figure + Agg canvas directly, not pyplot: no global backend state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.set_xlim(-1.5, 10.0)
    ax.set_ylim(-1.0, 5.6)
    _draw_edges(ax, report)
    _draw_nodes(ax, report)
    cost = report["forward"]["cost"]
    ax.set_title(
        f"3-2-1 sigmoid network, target y = {report['target']:.4g}, cost C = (a3 - y)^2 = {cost:.4g}", fontsize=12
    )
    fig.savefig(path, format="png", bbox_inches="tight")
