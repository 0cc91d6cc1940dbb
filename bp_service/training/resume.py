"""The checkpoint a run resumes from, found by its path alone, and the folder it writes its own into: no torch,
no Lightning.

``bp-train``'s precheck uses it to refuse a ``ckpt_path`` that names no file, or a ``paths.ckpt_dir`` that holds
another run's checkpoints, before its imports (seconds); :func:`.checkpoints.resolve_resume` to find the file it
then reads and checks, and to claim the folder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from bp_service.training.tracking.interface import another_rank


def checkpoint_file(ckpt_path: str) -> Path:
    """The file ``ckpt_path`` names: for ``last``, the newest ``last.ckpt`` of an earlier run with the same
    overrides (beside this job's run folder); else the path, absolute. Raises FileNotFoundError, one line naming
    the field and what is missing."""
    if ckpt_path == "last":
        return _newest_last()
    path = Path(ckpt_path).absolute()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: {path}: checkpoint not found")
    return path


def _newest_last() -> Path:
    wanted = _resumable_overrides(HydraConfig.get().overrides.task)
    runs_dir = Path(HydraConfig.get().runtime.output_dir).parent
    candidates = [p for p in runs_dir.glob("*/checkpoints/last.ckpt") if _same_overrides(p.parent.parent, wanted)]
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no last.ckpt from an earlier run with the same overrides under {runs_dir}"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _resumable_overrides(overrides: Iterable[str]) -> set[str]:
    """The overrides that define a run; where it resumes from and how long it trains do not."""
    ignored = ("ckpt_path=", "trainer.max_epochs=", "tracking.")
    return {o for o in overrides if not o.startswith(ignored)}


def _same_overrides(run_dir: Path, wanted: set[str]) -> bool:
    saved = run_dir / ".hydra" / "overrides.yaml"
    return saved.is_file() and _resumable_overrides(OmegaConf.load(saved)) == wanted


def claim_checkpoint_folder(ckpt_dir: str | Path, run_dir: str | Path, *, create: bool = True) -> None:
    """A ``paths.ckpt_dir`` outside the run's own folder is that run's alone, so that no run replaces or resumes
    another's checkpoints there (a second run, a sweep's next job): the first run claims it, a file naming its run
    folder, created exclusively beside it (``.<name>.run``, as its lock is; inside, Lightning would warn that the
    folder is not empty), whole (written aside, then linked in). A requeued job finds its own claim: submitit's
    in the same run folder, SLURM's (Lightning's requeue, a new run folder) by its job id. Inside the run's
    folder, new for each run, there is nothing to claim; nor for a distributed run's other processes, whose
    first process claims it for all (as it alone writes there).

    Raises FileExistsError, one line naming the field and whose the folder is, when it lies in another run's
    folder, another run claimed it, or it holds checkpoints and no claim; ``create=False`` only checks."""
    folder, mine = Path(ckpt_dir).resolve(), Path(run_dir).resolve()
    if folder.is_relative_to(mine) or another_rank():
        return
    other = next((p for p in (folder, *folder.parents) if (p / ".hydra").is_dir()), None)
    if other is not None:  # where Hydra keeps a run's config: another run's folder
        raise FileExistsError(f"paths.ckpt_dir={folder}: inside another run's folder ({other}); give this run its own")
    claim = folder.parent / f".{folder.name}.run"
    owner = _claimant(claim)
    if owner is None:
        held = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if held:
            raise FileExistsError(
                f"paths.ckpt_dir={folder}: holds checkpoints of another run ({held[0]}"
                f"{f' and {len(held) - 1} more' if len(held) > 1 else ''}); give this run an empty folder"
            )
        if not create:
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        aside = claim.with_name(f"{claim.name}.{os.getpid()}.tmp")
        aside.write_text(_identity(mine), encoding="utf-8")
        try:
            os.link(aside, claim)  # whole or not at all: a run reading it never sees it half written
            return
        except FileExistsError:  # another run claimed it meanwhile
            owner = _claimant(claim) or "unknown"
        finally:
            aside.unlink()
    if not _is_mine(owner, mine):
        raise FileExistsError(
            f"paths.ckpt_dir={folder}: the checkpoint folder of another run ({owner.splitlines()[0][:200]}); give "
            "this run an empty folder, or put the whole run there with hydra.run.dir='${bp_run_dir:<folder>}'"
        )


def _identity(run_dir: Path) -> str:
    """What a claim holds: the run folder, and the SLURM job of a single run (whose requeue Lightning resumes
    under the same job id, in a new run folder)."""
    job = _slurm_job()
    return f"{run_dir}\nslurm job {job}" if job else str(run_dir)


def _is_mine(owner: str | None, run_dir: Path) -> bool:
    lines, job = (owner or "").splitlines(), _slurm_job()
    return bool(lines) and (lines[0] == str(run_dir) or (job is not None and f"slurm job {job}" in lines[1:]))


def _slurm_job() -> str | None:
    """SLURM's job id, for a single run only: a sweep's jobs may share one allocation, and so its id."""
    job = os.environ.get("SLURM_JOB_ID") or None
    try:
        return job if HydraConfig.get().mode == RunMode.RUN else None
    except ValueError:  # no Hydra job (train() called alone): a single run
        return job


def claimant_run(ckpt_dir: Path) -> Path | None:
    """The run folder that claimed ``ckpt_dir`` (a checkpoint folder outside its run's), if that run's own
    overrides (``.hydra/overrides.yaml``) name this folder as its ``paths.ckpt_dir``: a claim file alone, which
    a downloaded folder could carry, makes no folder a run's."""
    owner = _claimant(ckpt_dir.parent / f".{ckpt_dir.name}.run")
    if not owner or owner == "unknown":
        return None
    run = Path(owner.splitlines()[0])
    saved = run / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return None
    chosen = [o.partition("=")[2] for o in OmegaConf.load(saved) if str(o).startswith("paths.ckpt_dir=")]
    return run if any(Path(folder).resolve() == ckpt_dir.resolve() for folder in chosen) else None


def _claimant(claim: Path) -> str | None:
    """The run folder a claim names (its first 4 KiB: a run folder's path, nothing larger), None without one."""
    try:
        if not stat.S_ISREG(claim.stat().st_mode):  # a folder, a pipe: read nothing from it
            return "unknown"
        with open(claim, encoding="utf-8", errors="replace") as file:
            return file.read(4096)
    except FileNotFoundError:
        return None
