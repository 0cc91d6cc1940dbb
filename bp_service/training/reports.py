"""Pictures of a run for the dashboard: learning curves, a confusion matrix, gradient flow (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # batch jobs and CI have no display

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter
from sklearn.metrics import ConfusionMatrixDisplay

# A user's matplotlibrc that gives every figure a layout engine changes none of these pictures: each is made with
# layout="none" (a constrained engine would refuse tight_layout once a colorbar exists) and left with none.
NO_LAYOUT_ENGINE = {"figure.autolayout": False, "figure.constrained_layout.use": False}


def laid_out(fig: Figure) -> Figure:
    """``fig`` with tight_layout's positions applied once, and no layout engine left on it.

    tight_layout leaves a placeholder engine behind, and savefig runs a whole drawing pass (text, ticks, no pixels)
    for any engine before the real one: a fifth of a picture's time, for a layout that is already done. Without the
    engine the file is the same, byte for byte."""
    fig.tight_layout()
    with matplotlib.rc_context(NO_LAYOUT_ENGINE):  # None reads these; "none" keeps the placeholder
        fig.set_layout_engine(None)
    return fig


def curves_figure(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss (and accuracy, when present) against the optimizer step; ``history`` maps metric -> [(step, value)]."""
    panels = [("loss", [k for k in ("train/loss", "val/loss") if history.get(k)])]
    acc = [k for k in ("val/acc",) if history.get(k)]
    if acc:
        panels.append(("accuracy", acc))
    fig = Figure(figsize=(5.5 * len(panels), 3.8), layout="none")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*sorted(history[key]))
            ax.plot(steps, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return laid_out(fig)


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[object]) -> Figure:
    """Test-split confusion matrix, rows = true class."""
    fig = Figure(figsize=(1.0 + 0.55 * len(labels), 0.8 + 0.55 * len(labels)), layout="none")
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(len(labels))), display_labels=[str(x) for x in labels], ax=ax, colorbar=False
    )
    ax.set_title("test confusion matrix")
    return laid_out(fig)


def gradient_flow_figure(epochs: Sequence[int], panels: Mapping[str, np.ndarray]) -> Figure:
    """Layers x epochs heat maps of gradient norms on a log colour scale, one panel per quantity.

    ``panels`` maps a title (``|dC/dW_l|``, ``|delta_l|``) to an array of shape (layers, epochs);
    a vanishing gradient shows as the first layers' rows orders of magnitude darker.
    """
    # Figure, not pyplot: nothing kept in pyplot's registry after the picture is logged.
    fig = Figure(figsize=(5.0 * len(panels), 0.9 + 0.45 * max(len(v) for v in panels.values())), layout="none")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, norms) in zip(axes[0], panels.items()):
        positive = norms[norms > 0]
        low, high = (positive.min(), positive.max()) if positive.size else (1e-12, 1.0)
        image = ax.imshow(
            np.where(norms > 0, norms, low),
            aspect="auto",
            origin="lower",
            cmap="viridis",
            norm=LogNorm(vmin=low, vmax=max(high, low * 10)),
            interpolation="nearest",
        )
        ax.set_yticks(range(len(norms)), [f"layer {i}" for i in range(1, len(norms) + 1)])
        step = max(1, len(epochs) // 10)
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
        ax.set_xlabel("epoch")
        ax.set_title(title)
        # Labels as plain text (1e-03): the default 10^-3 goes through mathtext, whose parser costs a tenth of a
        # second to build in every process that draws one. Minor ticks are labelled on a range under a decade.
        colorbar = fig.colorbar(image, ax=ax, format=LogFormatter())
        colorbar.minorformatter = LogFormatter(labelOnlyBase=False)
    return laid_out(fig)
