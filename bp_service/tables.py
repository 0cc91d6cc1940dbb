"""Reading user tables (CSV) with errors that name the file, row and column: the one CSV reader of
training data (``data=csv``) and of ``bp-predict``'s input.

Light on purpose (pandas and numpy only): ``bp-predict`` and the MLflow model use it without
paying for Lightning's import.
"""

from __future__ import annotations

import csv
import lzma
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from bp_service.commands import first_line, is_small_scalar, shown_value


class DataError(ValueError):
    """The data cannot be used; the message names the file, row or column."""


# What a damaged compressed file raises inside pandas: none of them names the file.
UNREADABLE = (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, zlib.error, lzma.LZMAError)


# Only an empty cell is missing. pandas would also read NA, None, null, nan, N/A (and more) as missing: an
# id "NA" would come back empty and a class named "NA" (North America) would count as an unlabelled row.
# A numeric column holding such a word is then a text cell, named by row and column like any other.
MISSING_CELLS = {"keep_default_na": False, "na_values": [""]}

# The separators a file may use: comma, tab (TSV), semicolon (spreadsheets in locales whose decimal mark is a
# comma), pipe. Comma wins when it fits, as before.
NA_WORDS = {"na", "n/a", "nan", "-nan", "none", "null", "nil", "#n/a", "#na", "<na>", "-1.#ind", "1.#qnan"}

SEPARATORS = ",\t;|"
SNIFF_LINES = 20
SHOWN_CHARS = 20  # the most of one header cell or data cell an error message repeats


def shown(text: object, width: int = SHOWN_CHARS) -> str:
    """A short, printable piece of a cell or column name from a user's file, for an error message.

    Never more than ``width`` characters of it (then ``…``), control characters escaped: a file given by
    mistake (or a link to a private one) is not copied into logs and terminals. Anything but a string is shown
    as :func:`~bp_service.commands.shown_value` shows it: never its whole ``str``.
    """
    if not isinstance(text, str):  # a number as str() writes it (inf, 1.5), anything larger only described
        text = str(text) if is_small_scalar(text) or isinstance(text, np.generic) else shown_value(text, width)
    cut = text[:width]
    cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return cut + ("…" if len(text) > width else "")


def _cell(value: object) -> str:
    """A cell for an error message; a word pandas would have read as missing says that only empty cells are."""
    hint = " (only an empty cell counts as missing)" if str(value).strip().lower() in NA_WORDS else ""
    return f"{shown(value)!r}{hint}"


def several(problems: list[str], source: str | None = None) -> str:
    """One line for ``problems`` (each a whole one-line message), so that a file with three mistakes costs one
    run, not three: the one itself, or all of them numbered, ``<source>: 2 problems: (1) ...; (2) ...`` where
    each is about ``source`` (said once), else ``2 problems: (1) <source>: ...; (2) optimizer.lr ...``."""
    if len(problems) == 1:
        return problems[0]
    prefix = f"{source}: " if source else None
    if prefix and all(p.startswith(prefix) for p in problems):
        numbered = "; ".join(f"({i}) {p[len(prefix) :]}" for i, p in enumerate(problems, 1))
        return f"{prefix}{len(problems)} problems: {numbered}"
    return f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))


def shown_names(names: list, limit: int = 8, width: int = SHOWN_CHARS) -> str:
    """``a, b, c, ... (40 in all)``: at most ``limit`` names, each :func:`shown` (at most ``width`` characters)."""
    names = [shown(n, width) for n in names]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_rows(path: str | Path, **kwargs) -> pd.DataFrame:
    """``pandas.read_csv`` as every user table is read: the file's own separator, only empty cells missing."""
    return pd.read_csv(path, sep=sniff_separator(path), **MISSING_CELLS, **kwargs)


def _separator_name(sep: str) -> str:
    return "tab" if sep == "\t" else repr(sep)


def _field_counts(lines: list[str], sep: str) -> list[int]:
    """Fields per record with ``sep``, quotes honoured as pandas honours them (a quoted ``"a,b"`` is one field)."""
    try:
        return [len(record) for record in csv.reader(lines, delimiter=sep)]
    except csv.Error:
        return []


def sniff_separator(path: str | Path, error: type[Exception] = DataError) -> str:
    """The file's column separator, one of :data:`SEPARATORS`: the one that splits the header and the first
    rows into the same number of fields (more than one), quotes taken into account; ``,`` when none does.

    A header split by one separator over rows split by another is refused, naming both: it would otherwise
    read as one oddly named column. Every reader of user tables (``data=csv`` and ``bp-predict``) reads with
    this separator.
    """
    try:
        head = pd.read_csv(path, sep="\x1f", header=None, dtype=str, nrows=SNIFF_LINES, quoting=csv.QUOTE_NONE)
    except (pd.errors.EmptyDataError, *UNREADABLE):
        return ","  # read_header names the problem
    lines = [v for v in head.iloc[:, 0].tolist() if isinstance(v, str)]
    counts = {sep: _field_counts(lines, sep) for sep in SEPARATORS}
    counts = {sep: c for sep, c in counts.items() if c}
    agree = [sep for sep, c in counts.items() if c[0] > 1 and set(c[1:]) <= {c[0]}]
    if agree:
        return max(agree, key=lambda sep: (sep == ",", counts[sep][0]))
    split_header = [sep for sep, c in counts.items() if c[0] > 1]
    header_sep = max(split_header, key=lambda sep: counts[sep][0]) if split_header else None
    split_rows = [sep for sep, c in counts.items() if len(c) > 1 and min(c[1:]) > 1 and len(set(c[1:])) == 1]
    rows_alone = [sep for sep in split_rows if header_sep is None or max(counts[header_sep][1:], default=1) == 1]
    if rows_alone:
        header = f"separated by {_separator_name(header_sep)}" if header_sep else "a single column"
        raise error(
            f"{path}: the header is {header} but the rows by {_separator_name(rows_alone[0])}; "
            "use one separator throughout"
        )
    return header_sep or ","


def read_header(path: str | Path, error: type[Exception] = DataError) -> list[str]:
    """A CSV's column names, with one-line errors for a missing, empty, damaged or ambiguous file."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, not a CSV file")
    if not path.is_file():
        raise error(f"{path}: file not found")
    sep = sniff_separator(path, error)
    try:
        header = pd.read_csv(path, nrows=1, header=None, dtype=str, sep=sep, **MISSING_CELLS).iloc[0].tolist()
    except pd.errors.EmptyDataError:
        raise error(f"{path}: file is empty") from None
    except UNREADABLE as exc:
        raise error(f"{path}: not a readable CSV ({shown(first_line(exc), 200)})") from None
    check_unique_columns(header, str(path), error)
    return [str(c) for c in header]


# bp-train's early check reads a training CSV before torch loads; the run takes that frame instead of parsing
# the file again (about 1 s a million rows). One file, taken once, and only while the file is unchanged.
_HANDED_OVER: dict[tuple, pd.DataFrame] = {}


def _file_identity(path: str | Path) -> tuple:
    found = os.stat(path)
    return (os.path.realpath(path), found.st_ino, found.st_size, found.st_mtime_ns)


def read_feature_frame(path: str | Path, hand_over: bool = False) -> pd.DataFrame:
    """A whole CSV (training data), checked as :func:`read_header` does, and with data rows. ``hand_over``: keep
    it for the next call on the same, unchanged file (which takes it), instead of reading the file twice."""
    read_header(path)
    identity = _file_identity(path)
    frame = _HANDED_OVER.pop(identity, None)
    if frame is not None:
        if hand_over:  # checked again: still the run's to take
            _HANDED_OVER[identity] = frame
        return frame
    try:
        frame = read_rows(path)
    except UNREADABLE as exc:
        raise DataError(f"{path}: not a readable CSV ({shown(first_line(exc), 200)})") from None
    if frame.empty:
        raise DataError(f"{path}: has a header but no data rows")
    if hand_over:
        _HANDED_OVER.clear()
        _HANDED_OVER[identity] = frame
    return frame


def check_unique_columns(header: list, source: str, error: type[Exception] = DataError) -> None:
    """Refuse repeated column names: pandas would rename the second ``label`` to ``label.1``, silently."""
    names = [str(c) for c in header]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        named = ", ".join(repr(shown(c)) for c in repeated[:8])
        raise error(f"{source}: column name(s) {named} appear more than once; rename them")


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
            what = "missing" if pd.isna(cell) and not isinstance(cell, str) else f"not a finite number: {_cell(cell)}"
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
            found[col] = f"row {i + 2}: {_cell(raw.iloc[i])}"
    return found
