"""Writing files safely: complete or not at all, never replacing a device or pipe, and run folders of their own."""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path


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
_MADE: list[Path] = []  # the folders unique_run_dir made, its claims' parents included, outermost first


def unique_run_dir(parent: str, stamp_format: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """``<parent>/<start time>``, created here and only for this process: ``_1``, ``_2``... on a collision.

    Runs started in the same second (or by many processes at once) each get a folder of their own: the
    folder is claimed by ``mkdir``, which only one process can win. Hydra resolves its run folder more than
    once, so the answer is remembered for the life of the process (one run, or one sweep's folder).
    """
    key = str(Path(parent).resolve())
    if key not in _RUN_DIRS:
        _MADE.extend(reversed([p for p in (Path(key), *Path(key).parents) if not p.exists()]))
        Path(key).mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime(stamp_format)
        for n in range(10_000):
            candidate = Path(key) / (stamp if n == 0 else f"{stamp}_{n}")
            if not _made(candidate):
                continue
            _RUN_DIRS[key] = str(candidate)
            _MADE.append(candidate)
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free run folder name", str(Path(key) / stamp))
    return _RUN_DIRS[key]


def _made(folder: Path) -> bool:
    """``mkdir``: whether this process made ``folder`` (False: it exists). A parent that another run's
    clean-up removed while it was empty (:func:`discard_stray_claims`) is made again."""
    for _ in range(3):
        try:
            folder.mkdir()
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir()
    return True


def discard_stray_claims(in_use: str | Path | None) -> None:
    """Remove the folders :func:`unique_run_dir` made that no run uses (``in_use`` and the folders above it are
    kept), those still empty: OmegaConf resolves an interpolation that a merge replaces, so a config file that
    sets ``hydra.run.dir`` has claimed the default folder too; a config refused while Hydra composes it, every
    folder it claimed. A folder with anything in it, another process's run, stays."""
    used = Path(in_use).resolve() if in_use is not None else None
    kept = {used, *used.parents} if used is not None else set()
    for folder in reversed(_MADE):  # innermost first, so that emptied parents go too
        if folder not in kept:
            with contextlib.suppress(OSError):
                folder.rmdir()
    for key, claimed in list(_RUN_DIRS.items()):
        if not Path(claimed).exists():  # a later claim in this process starts afresh
            del _RUN_DIRS[key]
    _MADE[:] = [folder for folder in _MADE if folder.exists()]


def discard_unused_run_dir(run_dir: str | Path) -> bool:
    """Remove ``run_dir`` when the run it was claimed for never started: it holds Hydra's ``.hydra/`` (the
    composed config) and at most empty files (a log nothing was written to). Anything else, a checkpoint, a log
    with lines, a link, keeps the folder. Returns whether it was removed."""
    root = Path(run_dir)
    if root.is_symlink() or not root.is_dir():
        return False
    for folder, dirs, files in os.walk(root):
        inside = Path(folder).relative_to(root).parts
        for name in dirs:
            if (Path(folder) / name).is_symlink() or (not inside and name != ".hydra"):
                return False
        for name in files:
            path = Path(folder) / name
            if path.is_symlink() or not (inside[:1] == (".hydra",) or os.path.getsize(path) == 0):
                return False
    shutil.rmtree(root)
    for key in [k for k, v in _RUN_DIRS.items() if v == str(root)]:  # a later claim in this process starts afresh
        del _RUN_DIRS[key]
    return True
