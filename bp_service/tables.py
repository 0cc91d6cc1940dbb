"""Reading user tables (CSV) with errors that name the file, row and column, and writing files safely.

Light on purpose (pandas and numpy only): ``bp-predict`` and the MLflow model use it without
paying for Lightning's import.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import lzma
import os
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd


class DataError(ValueError):
    """The data cannot be used; the message names the file, row or column."""


# What a damaged compressed file raises inside pandas: none of them names the file.
UNREADABLE = (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def read_feature_frame(path: str | Path) -> pd.DataFrame:
    """Read a CSV with one-line errors for a missing, empty, header-only, damaged or ambiguous file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a CSV file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        header = pd.read_csv(path, nrows=1, header=None, dtype=str).iloc[0].tolist()
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except UNREADABLE as exc:
        raise DataError(f"{path}: not a readable CSV ({_first_line(exc)})") from None
    check_unique_columns(header, str(path), DataError)
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


# --------------------------------------------------------------------------- writing files
class DiskFullError(OSError):
    """A write ran out of space; the message names the folder (and what was being written)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc] ... unexpected
    # pos ..."), without the errno: ask the file system whether it is full.
    if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "file write failed" in str(exc)):
        with contextlib.suppress(OSError):
            st = os.statvfs(folder)
            return st.f_bavail * st.f_frsize < 1 << 20 or st.f_favail == 0
    return False


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The path to write ``path``'s new content to: complete or not at all.

    A regular file (or a new one) is written to a temporary file beside it and renamed over it only when
    the block ends without error; a symlink to a regular file replaces the file it points to and stays a
    link. Anything else (``/dev/null``, a FIFO, a terminal, ``/dev/stdout``) is written in place: renaming
    over it would replace the device or pipe with a regular file. A failed write removes the temporary
    file; a full disk is raised as :class:`DiskFullError` naming the folder.
    """
    path = Path(path)
    try:
        st = os.stat(path)  # follows symlinks: the type of what is finally written
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            yield path
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(errno.ENOSPC, f"no space left on {path}") from None
            raise
        return
    real = Path(os.path.realpath(path))  # a dangling link: its target is created
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if st is not None:  # the replaced file keeps its permissions
            with contextlib.suppress(OSError):
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.replace(tmp, real)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_disk_full(exc, real.parent):
            raise DiskFullError(errno.ENOSPC, f"no space left on {real.parent} (writing {real.name})") from None
        raise


# --------------------------------------------------------------------------- run folders
_RUN_DIRS: dict[str, str] = {}


def unique_run_dir(parent: str, stamp_format: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """``<parent>/<start time>``, created here and only for this process: ``_1``, ``_2``... on a collision.

    Runs started in the same second (or by many processes at once) each get a folder of their own: the
    folder is claimed by ``mkdir``, which only one process can win. Hydra resolves its run folder more than
    once, so the answer is remembered for the life of the process (one run, or one sweep's folder).
    """
    key = str(Path(parent).resolve())
    if key not in _RUN_DIRS:
        Path(key).mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime(stamp_format)
        for n in range(10_000):
            candidate = Path(key) / (stamp if n == 0 else f"{stamp}_{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            _RUN_DIRS[key] = str(candidate)
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free run folder name", str(Path(key) / stamp))
    return _RUN_DIRS[key]
