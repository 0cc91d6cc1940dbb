"""Your own CSV file as a data source: its columns checked and named in every error, with a way on."""

from __future__ import annotations

import difflib
import re

import numpy as np
import pandas as pd

from bp_service.tables import (
    DataError,
    missing_cells,
    numeric_matrix,
    read_feature_frame,
    read_header,
    several,
    shown,
    shown_names,
    text_columns,
)
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
        require(bool(target), f"data.target is required for data={self.name}{_columns_of(path)}")
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

    def problems(self) -> list[str]:
        """Every problem of the file at once, each one line naming its columns and first row (pandas only). The
        frame read is handed over to :meth:`load`, which then does not read the file again."""
        try:
            frame = read_feature_frame(self.path, hand_over=True)
        except DataError as exc:
            return [str(exc)]
        return self._read(frame)[0]

    def load(self, seed: int) -> Raw:
        """Features (NaN where a cell is missing and ``missing=mean``), targets, feature names and task."""
        frame, source = read_feature_frame(self.path), self.label
        problems, features, x = self._read(frame)
        if problems:
            raise DataError(several(problems, source))
        target = frame[self.target]
        empty = np.isnan(x).any(axis=1) | target.isna().to_numpy()
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

    def _read(self, frame: pd.DataFrame) -> tuple[list[str], list[str], np.ndarray]:
        """(every problem found, the feature columns, their numeric matrix): the target, the features, text
        cells, infinite cells, empty columns and missing cells, each checked whatever the others found."""
        source, problems = self.label, []
        has_target = self.target in frame.columns
        if not has_target:
            columns = [str(c) for c in frame.columns]
            close = difflib.get_close_matches(self.target, columns, n=1)
            hint = f"; did you mean {shown(close[0])!r}?" if close else ""
            problems.append(
                f"{source}: target column {self.target!r} not found{hint} (columns: {shown_names(columns, 20)})"
            )
        # A file without the target may not be the file meant (a mistyped path, a link to a private file):
        # its columns are named, its cells are not quoted.
        features, numeric = self._features(frame, source, problems, quote_cells=has_target)
        x = np.full((len(frame), len(numeric)), np.nan)
        try:
            x = numeric_matrix(frame, numeric, source, fill=[np.nan] * len(numeric))  # names inf cells by row
        except DataError as exc:
            problems.append(str(exc))
        if has_target:
            problems += self._empty_columns(numeric, x, frame[self.target], source)
        # Text columns are named above (they cannot be features): their empty cells would only be noise here.
        target = [self.target] if has_target and frame[self.target].notna().any() else []
        gaps = missing_cells(frame, [*numeric, *target])
        if gaps and self.missing == "error":
            problems.append(
                f"{source}: missing values: {'; '.join(gaps)}; "
                "data.missing=drop leaves those rows out, data.missing=mean fills a missing feature with its mean "
                "on the training split (rows without a target are left out)"
            )
        return problems, features, x

    def _empty_columns(self, features: list[str], x: np.ndarray, target: pd.Series, source: str) -> list[str]:
        """A column without a single value, named: neither leaving rows out nor filling gaps in can make one up."""
        if target.isna().all():
            return [f"{source}: target column {self.target!r} is empty in every row: there is nothing to learn"]
        if self.missing != "drop":  # data.missing=mean fills an empty feature with 0 (keep_empty_features)
            return []
        blank = [name for name, none in zip(features, np.isnan(x).all(axis=0), strict=True) if none]
        if blank:
            rest = ",".join(_override_item(name) for name in features if name not in blank)
            them = "it" if len(blank) == 1 else "them"
            way_on = f"leave {them} out with 'data.features=[{rest}]'" if rest else "no feature column has a value"
            columns = f"column {blank[0]!r} is" if len(blank) == 1 else f"columns {', '.join(map(repr, blank))} are"
            return [f"{source}: {columns} empty in every row, so data.missing=drop would leave no row; {way_on}"]
        return []

    def _features(
        self, frame: pd.DataFrame, source: str, problems: list[str], quote_cells: bool = True
    ) -> tuple[list[str], list[str]]:
        """(``features`` found in the file, or every column but the target and the id; the numeric ones among
        them): what is wrong with them (absent, none, text) added to ``problems``, text columns with a way on."""
        excluded = {self.target, self.id_column}
        features = list(self.features) if self.features else [c for c in frame.columns if c not in excluded]
        absent = [c for c in features if c not in frame.columns]
        if absent:
            columns = shown_names([str(c) for c in frame.columns], 20)
            problems.append(f"{source}: feature column(s) not found: {', '.join(absent)} (columns: {columns})")
            features = [c for c in features if c not in absent]
        if not features:
            if not absent:
                problems.append(f"{source}: no feature columns besides the target {self.target!r}")
            return features, features
        text = text_columns(frame, features)
        numeric = [c for c in features if c not in text]
        if text:
            named = ", ".join(f"{shown(c)!r} ({where})" if quote_cells else repr(shown(c)) for c, where in text.items())
            way_on = (
                f"train on the numeric ones with 'data.features=[{','.join(map(_override_item, numeric))}]'"
                if numeric
                else "no numeric feature column is left; encode the text as numbers first"
            )
            problems.append(f"{source}: not numeric: column(s) {named}" + (f"; {way_on}" if quote_cells else ""))
        return features, numeric


def _columns_of(path: str | None) -> str:
    """``; the columns of <path>: a, b, c`` when the file can be read, else what is wrong with it (for a message)."""
    try:
        return f"; the columns of {path}: {shown_names(read_header(path), 20)}" if path else ""
    except DataError as exc:
        return f"; {exc}"


def _override_item(name: str) -> str:
    """A column name as an item of a Hydra list override: bare when it can be, else double-quoted."""
    return name if re.fullmatch(r"[A-Za-z_][\w.\-]*", name) else '"' + name.replace('"', '\\"') + '"'
