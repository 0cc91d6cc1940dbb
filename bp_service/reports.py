"""Pictures of a run for the dashboard: learning curves and a confusion matrix (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # batch jobs and CI have no display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay


def curves_figure(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Loss (and accuracy, when present) against the optimizer step; ``history`` maps metric -> [(step, value)]."""
    panels = [("loss", [k for k in ("train/loss", "val/loss") if history.get(k)])]
    acc = [k for k in ("val/acc",) if history.get(k)]
    if acc:
        panels.append(("accuracy", acc))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*sorted(history[key]))
            ax.plot(steps, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[object]) -> Figure:
    """Test-split confusion matrix, rows = true class."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(labels), 0.8 + 0.55 * len(labels)))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(len(labels))), display_labels=[str(x) for x in labels], ax=ax, colorbar=False
    )
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    return fig
