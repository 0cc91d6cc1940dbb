"""Reading user tables (CSV) with errors that name the file, row and column.

Light on purpose (pandas and numpy only): ``bp-predict`` and the MLflow model use it without
paying for Lightning's import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


class DataError(ValueError):
    """The data cannot be used; the message names the file, row or column."""


def read_feature_frame(path: str | Path) -> pd.DataFrame:
    """Read a CSV with one-line errors for a missing, empty or header-only file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if frame.empty:
        raise DataError(f"{path}: has a header but no data rows")
    return frame


def numeric_matrix(frame: pd.DataFrame, columns: list[str], source: str, first_row: int = 0) -> np.ndarray:
    """Columns as float64, naming the first non-numeric, missing or infinite cell by row and column.

    Rows are numbered as a spreadsheet shows them: the header is row 1, the first data row is row 2.
    """
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        raw = frame[col]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            cell = raw.iloc[i]
            what = "missing" if pd.isna(cell) and not isinstance(cell, str) else f"not a finite number: {cell!r}"
            raise DataError(f"{source}: row {first_row + i + 2}, column {col!r}: {what}")
        out[:, j] = values
    return out
