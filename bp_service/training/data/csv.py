"""Your own CSV file as a data source: its columns checked and named in every error, with a way on."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from bp_service.tables import DataError, missing_cells, numeric_matrix, read_feature_frame, shown_names, text_columns
from bp_service.training.config import Missing
from bp_service.training.data.sources import Raw, Source, choice, infer_task, require


class CsvSource(Source):
    """A numeric CSV: ``target`` and the ``features`` (default: every other column but ``id_column``).

    ``missing`` says what an empty cell does: ``error`` names it, ``drop`` leaves its row out, ``mean`` fills
    a feature from the training split (rows without a target are left out).
    """

    def __init__(
        self,
        path: str | None = None,
        target: str | None = None,
        features: list[str] | None = None,
        id_column: str | None = None,
        missing: str = "error",
        task: str = "auto",
        name: str = "csv",
    ) -> None:
        super().__init__(name, task)
        require(bool(path), f"data.path is required for data={self.name}")
        require(bool(target), f"data.target is required for data={self.name}")
        self.path, self.target, self.id_column = path, str(target), id_column
        self.features = [str(f) for f in features] if features else None
        self.missing = choice(Missing, missing, "data.missing")
        if self.features:
            repeated = sorted({f for f in self.features if self.features.count(f) > 1})
            require(not repeated, f"data.features lists {', '.join(map(repr, repeated))} more than once")
            for column, what in ((self.target, "data.target"), (id_column, "data.id_column")):
                require(
                    column is None or str(column) not in self.features,
                    f"data.features includes {column!r}, which is {what}: a model must not see it",
                )

    @property
    def label(self) -> str:
        return str(self.path)

    def load(self, seed: int) -> Raw:
        """Features (NaN where a cell is missing and ``missing=mean``), targets, feature names and task."""
        frame, source = read_feature_frame(self.path), self.label
        if self.target not in frame.columns:
            raise DataError(
                f"{source}: target column {self.target!r} not found (columns: {shown_names(list(frame.columns))})"
            )
        features = self._features(frame, source)
        x = numeric_matrix(frame, features, source, fill=[np.nan] * len(features))  # names inf cells by row
        target = frame[self.target]
        self._check_empty_columns(features, x, target, source)
        empty = np.isnan(x).any(axis=1) | target.isna().to_numpy()
        if empty.any() and self.missing == "error":
            raise DataError(
                f"{source}: missing values: {'; '.join(missing_cells(frame, [*features, self.target]))}; "
                "data.missing=drop leaves those rows out, data.missing=mean fills a missing feature with its mean "
                "on the training split (rows without a target are left out)"
            )
        keep = ~empty if self.missing == "drop" else target.notna().to_numpy()
        x, target = x[keep], target[keep]
        if len(target) == 0:
            raise DataError(f"{source}: no rows left once rows with missing values are left out (data.missing=drop)")
        task = infer_task(target) if self.task == "auto" else self.task
        if task == "regression":
            y = numeric_matrix(frame, [self.target], source, fill=[np.nan])[keep, 0]  # missing ones are not kept
        else:
            y = target.astype(str).to_numpy() if target.dtype == object else target.to_numpy()
        return Raw(x, y, features, task, target=self.target, impute=self.missing == "mean")

    def _check_empty_columns(self, features: list[str], x: np.ndarray, target: pd.Series, source: str) -> None:
        """A column without a single value, named: neither leaving rows out nor filling gaps in can make one up."""
        if target.isna().all():
            raise DataError(f"{source}: target column {self.target!r} is empty in every row: there is nothing to learn")
        if self.missing != "drop":  # data.missing=mean fills an empty feature with 0 (keep_empty_features)
            return
        blank = [name for name, none in zip(features, np.isnan(x).all(axis=0), strict=True) if none]
        if blank:
            rest = ",".join(_override_item(name) for name in features if name not in blank)
            them = "it" if len(blank) == 1 else "them"
            way_on = f"leave {them} out with 'data.features=[{rest}]'" if rest else "no feature column has a value"
            columns = f"column {blank[0]!r} is" if len(blank) == 1 else f"columns {', '.join(map(repr, blank))} are"
            raise DataError(
                f"{source}: {columns} empty in every row, so data.missing=drop would leave no row; {way_on}"
            )

    def _features(self, frame: pd.DataFrame, source: str) -> list[str]:
        """``features``, or every column but the target and the id; text columns named with a way on."""
        excluded = {self.target, self.id_column}
        features = list(self.features) if self.features else [c for c in frame.columns if c not in excluded]
        absent = [c for c in features if c not in frame.columns]
        if absent:
            raise DataError(f"{source}: feature column(s) not found: {', '.join(absent)}")
        if not features:
            raise DataError(f"{source}: no feature columns besides the target {self.target!r}")
        text = text_columns(frame, features)
        if text:
            numeric = [c for c in features if c not in text]
            named = ", ".join(f"{c!r} ({where})" for c, where in text.items())
            way_on = (
                f"train on the numeric ones with 'data.features=[{','.join(map(_override_item, numeric))}]'"
                if numeric
                else "no numeric feature column is left; encode the text as numbers first"
            )
            raise DataError(f"{source}: not numeric: column(s) {named}; {way_on}")
        return features


def _override_item(name: str) -> str:
    """A column name as an item of a Hydra list override: bare when it can be, else double-quoted."""
    return name if re.fullmatch(r"[A-Za-z_][\w.\-]*", name) else '"' + name.replace('"', '\\"') + '"'
