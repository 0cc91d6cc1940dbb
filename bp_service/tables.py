"""Reading user tables (CSV) with errors that name the file, row and column: the one CSV reader of
training data (``data=csv``) and of ``bp-predict``'s input.

Light on purpose (pandas and numpy only): ``bp-predict`` and the MLflow model use it without
paying for Lightning's import.
"""

from __future__ import annotations

import csv
import lzma
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from bp_service.commands import first_line


class DataError(ValueError):
    """The data cannot be used; the message names the file, row or column."""


# What a damaged compressed file raises inside pandas: none of them names the file.
UNREADABLE = (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, zlib.error, lzma.LZMAError)


# Separators tried when a file's first line holds no comma: tab (TSV), semicolon (spreadsheets in locales
# whose decimal mark is a comma), pipe.
OTHER_SEPARATORS = "\t;|"
SNIFF_LINES = 20


def sniff_separator(path: str | Path) -> str:
    """The file's column separator: ``,`` unless the header has no comma and :class:`csv.Sniffer` finds one of
    :data:`OTHER_SEPARATORS` consistently on the first lines (a tab-separated file is then not one column).

    Every reader of user tables (``data=csv`` and ``bp-predict``) reads with this separator.
    """
    try:
        head = pd.read_csv(path, sep="\x1f", header=None, dtype=str, nrows=SNIFF_LINES, quoting=csv.QUOTE_NONE)
    except (pd.errors.EmptyDataError, *UNREADABLE):
        return ","  # read_header names the problem
    lines = [str(v) for v in head.iloc[:, 0].tolist() if isinstance(v, str)]
    if not lines or "," in lines[0]:
        return ","
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters=OTHER_SEPARATORS).delimiter
    except csv.Error:  # no consistent separator: a one-column file
        return ","


def read_header(path: str | Path, error: type[Exception] = DataError) -> list[str]:
    """A CSV's column names, with one-line errors for a missing, empty, damaged or ambiguous file."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, not a CSV file")
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        header = pd.read_csv(path, nrows=1, header=None, dtype=str, sep=sniff_separator(path)).iloc[0].tolist()
    except pd.errors.EmptyDataError:
        raise error(f"{path}: file is empty") from None
    except UNREADABLE as exc:
        raise error(f"{path}: not a readable CSV ({first_line(exc)})") from None
    check_unique_columns(header, str(path), error)
    return [str(c) for c in header]


def read_feature_frame(path: str | Path) -> pd.DataFrame:
    """A whole CSV (training data), checked as :func:`read_header` does, and with data rows."""
    read_header(path)
    try:
        frame = pd.read_csv(path, sep=sniff_separator(path))
    except UNREADABLE as exc:
        raise DataError(f"{path}: not a readable CSV ({first_line(exc)})") from None
    if frame.empty:
        raise DataError(f"{path}: has a header but no data rows")
    return frame


def check_unique_columns(header: list, source: str, error: type[Exception] = DataError) -> None:
    """Refuse repeated column names: pandas would rename the second ``label`` to ``label.1``, silently."""
    names = [str(c) for c in header]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise error(f"{source}: column name(s) {', '.join(map(repr, repeated))} appear more than once; rename them")


def check_scaling(names: list[str], means, scales, source: str) -> None:
    """Every column's mean and spread must be finite numbers: values near 1e308 overflow float64 there."""
    for name, mean, scale in zip(names, np.atleast_1d(means), np.atleast_1d(scales), strict=True):
        if not (np.isfinite(mean) and np.isfinite(scale)):
            raise DataError(
                f"{source}: column {name!r}: values too large to scale (their mean or spread overflows float64); "
                "rescale the column, e.g. to other units"
            )


def numeric_matrix(
    frame: pd.DataFrame, columns: list[str], source: str, first_row: int = 0, fill: list[float] | None = None
) -> np.ndarray:
    """Columns as float64, naming the first non-numeric, missing or infinite cell by row and column.

    Rows are numbered as a spreadsheet shows them: the header is row 1, the first data row is row 2.
    ``fill`` (one value per column, a model's ``meta["impute_mean"]``) replaces missing cells instead;
    a NaN in ``fill`` keeps them missing (training fills them after the split).
    """
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        raw = frame[col]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, copy=True)
        if fill is not None:
            missing = raw.isna().to_numpy()
            values[missing] = fill[j]
            bad = ~np.isfinite(values) & ~missing
        else:
            bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            cell = raw.iloc[i]
            what = "missing" if pd.isna(cell) and not isinstance(cell, str) else f"not a finite number: {cell!r}"
            raise DataError(f"{source}: row {first_row + i + 2}, column {col!r}: {what}")
        out[:, j] = values
    return out


def missing_cells(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """``column 'Horsepower': 6 rows missing (first: row 40)`` for each of ``columns`` with empty cells."""
    found = []
    for col in columns:
        empty = frame[col].isna().to_numpy()
        if empty.any():
            count = int(empty.sum())
            rows = f"{count} row{'s' if count > 1 else ''} missing"
            found.append(f"column {col!r}: {rows} (first: row {int(np.argmax(empty)) + 2})")
    return found


def text_columns(frame: pd.DataFrame, columns: list[str]) -> dict[str, str]:
    """Columns holding a cell that is neither empty nor a number: name -> ``row 2: 'ford torino'`` (the first)."""
    found = {}
    for col in columns:
        raw = frame[col]
        bad = (pd.to_numeric(raw, errors="coerce").isna() & raw.notna()).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            found[col] = f"row {i + 2}: {raw.iloc[i]!r}"
    return found
