"""A trained network as something that predicts from raw feature columns: the checks on input rows,
and the MLflow pyfunc model (:class:`BPServiceModel`) that ``mlflow models serve`` runs.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from bp_service.bundle import load_bundle, net_from_bundle, predict_frame
from bp_service.tables import DataError, numeric_matrix, shown_names


class InputError(ValueError):
    """Input rows do not fit the model; the message names the column or the row."""


def target_column(meta: dict[str, Any]) -> str | None:
    """The name of the column the model was trained to predict; None for bundles older than ``meta["target"]``."""
    target = meta.get("target")
    return str(target) if target is not None else None


def check_columns(
    frame: pd.DataFrame, meta: dict[str, Any], source: str, id_column: str | None = None, extra_allowed: bool = False
) -> None:
    """Name every missing and every unexpected column.

    The model's own target column is not unexpected: a labelled file (a held-out set) is scored as it is.
    ``extra_allowed``: other columns are refused only beside a missing one, where they are named because
    one of them may be the missing feature misspelt.
    """
    expected = list(meta["feature_names"])
    present = [str(c) for c in frame.columns]
    missing = [c for c in expected if c not in present]
    extra = [c for c in present if c not in expected and c not in (id_column, target_column(meta))]
    if missing or (extra and not extra_allowed):
        shown = ", ".join(expected[:8]) + (f", ... ({len(expected)} in all)" if len(expected) > 8 else "")
        if target_column(meta) is not None:
            shown += f"; its target {target_column(meta)} is also accepted"
        # the input's own names are cut short: an input linked to a private file is not copied out
        parts = [
            f"missing column(s) {shown_names(missing, width=200)}" if missing else "",
            f"unexpected column(s) {shown_names(extra)}" if extra else "",
        ]
        raise InputError(f"{source}: {'; '.join(p for p in parts if p)} (the model expects: {shown})")


def features_matrix(frame: pd.DataFrame, meta: dict[str, Any], source: str, first_row: int = 0) -> np.ndarray:
    """Raw feature columns, in the model's order, as float64; bad cells named by row and column.

    A model trained with ``data.missing=mean`` fills missing cells with its training means, as training did.
    """
    try:
        return numeric_matrix(frame, list(meta["feature_names"]), source, first_row, fill=meta.get("impute_mean"))
    except DataError as exc:
        raise InputError(str(exc)) from None


class BPServiceModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc flavour: ``predict(DataFrame of raw features) -> DataFrame of predictions``.

    A frame that also carries the model's target column (labelled rows) is accepted and the target ignored.
    """

    def load_context(self, context) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])
        self.net = net_from_bundle(self.bundle)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        meta = self.bundle["meta"]
        frame = pd.DataFrame(model_input)
        check_columns(frame, meta, "model input")
        return predict_frame(self.net, meta, features_matrix(frame, meta, "model input"))
