"""The checkpoint a run resumes from, found by its path alone: no torch, no Lightning.

``bp-train``'s precheck uses it to refuse a ``ckpt_path`` that names no file before its imports (seconds), and
:func:`.checkpoints.resolve_resume` to find the file it then reads and checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


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
