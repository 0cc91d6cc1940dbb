"""``bp-train`` on the command line: Hydra parses it, :func:`~bp_service.training.recipe.train` runs the job,
and every failure ends as one line (``bp-train: error: ...``) and an exit status; the summary on success."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Only light imports up here: `bp-train --help` and Hydra's errors answer without torch, Lightning
# and MLflow (seconds). The run itself imports them in _hydra_entry.
from bp_service.commands import EXIT_INTERRUPT, EXIT_SIGTERM, full_error_requested, interrupted
from bp_service.files import discard_stray_claims, discard_unused_run_dir, unique_run_dir
from bp_service.home import project_root
from bp_service.training import guard
from bp_service.training.config import CONF_DIR, ConfigError, register_configs
from bp_service.training.spelling import spelling_hint
from bp_service.training.tracking.names import best_name


def check_search(cfg: DictConfig) -> None:
    """A search's direction against its trials' metric (preflight's rule), where Hydra composes the sweep."""
    if (cfg.get("hydra") or {}).get("sweeper", {}).get("_target_") == guard.OPTUNA_SWEEPER:
        from bp_service.training.preflight import check_sweep_direction  # pandas and the data: only for a search

        check_sweep_direction(cfg)


# Every config Hydra composes is checked before Hydra builds anything from it. At import, not in main():
# a launcher's worker process imports this module to run its job, and composes that job's config there.
guard.install(check_search)


def summary(task_name: str, result: dict[str, Any]) -> str:
    """The lines a finished run ends with: metrics, checkpoint, and where it is recorded (the tracker's link)."""
    lines = [f"bp-train: {task_name} finished in {result['wall_time_s']:.1f} s"]
    lines += [f"  {k:<12} {v:.4f}" for k, v in sorted(result["metrics"].items())]
    if result.get("best_score") is not None:  # the checkpoint tested above: its score, named as MLflow names it
        lines.append(f"  {best_name(result['monitor']):<12} {result['best_score']:.4f}")
    lines.append(f"  checkpoint   {result['best_checkpoint'] or result['last_checkpoint']}")
    lines += epoch_lines(result.get("stopping"))
    if result["run_id"]:
        label = f"{result['tracker']} run"
        lines.append(f"  {label:<12} {result['run_id']}  (experiment {result['experiment']!r})")
        if result["dashboard"]:
            lines.append(f"  dashboard    {result['dashboard']}")
    if result.get("tracking_lost"):
        lines.append(f"  WARNING      MLflow tracking was lost mid-run: {result['tracking_lost']}")
    for lost in result.get("lost_artifacts") or []:
        lines.append(f"  WARNING      not written: {lost}")
    return "\n".join(lines)


def epoch_lines(stopping: dict[str, Any] | None) -> list[str]:
    """How many epochs ran and what ended them; a warning when the cap, not convergence, did."""
    if not stopping:
        return []
    epochs, cap = stopping["epochs"], stopping["max_epochs"]
    if stopping["early_stopped"]:
        why = f"early stopping: {stopping['monitor']} stopped improving"
    else:
        why = f"the cap, trainer.max_epochs={cap}"
    lines = [f"  {'epochs':<12} {epochs}  ({why})"]
    if stopping["still_improving"]:
        lines.append(
            f"  WARNING      epoch cap {cap} reached while {stopping['monitor']} was still improving; "
            "raise trainer.max_epochs"
        )
    return lines


# --------------------------------------------------------------------------- command line
def known_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """(errors shown as their own one line, the usage errors among them: exit 2), imported when a run failed."""
    from bp_service.bundle import BundleError
    from bp_service.files import DiskFullError
    from bp_service.tables import DataError
    from bp_service.training.checkpoints import CheckpointError
    from bp_service.training.module import NonFiniteError
    from bp_service.training.recipe import GradcheckError

    usage = (ConfigError, DataError, BundleError)
    return (*usage, CheckpointError, GradcheckError, NonFiniteError, DiskFullError), usage


_HYDRA_NOISE = (
    "full_key:",
    "object_type=",
    "reference_type=",
    "Config search path",
    "provider=",
    "Set the environment",
)


def one_line(exc: BaseException) -> str:
    """Hydra's multi-line composition errors (and their causes) folded into one line."""
    parts: list[str] = []
    while exc is not None:
        for line in str(exc).splitlines():
            line = line.strip()
            if not line or line.startswith(_HYDRA_NOISE) or line in parts:
                continue
            if parts and parts[-1].startswith("Available options") and not parts[-1].endswith(":"):
                parts[-1] += ", " + line
            elif parts and (parts[-1].endswith(":") or _continues(parts[-1], line)):
                parts[-1] += " " + line  # a heading such as "Available options in 'data':", or a sentence wrapped
            else:
                parts.append(line)
        exc = exc.__cause__
    return "; ".join(parts)


def _continues(previous: str, line: str) -> bool:
    """Whether ``line`` goes on the sentence ``previous`` started: Hydra wraps some messages mid-sentence
    ("... from config" / "to prevent security vulnerabilities, set env var" / "HYDRA_...=... to bypass")."""
    return not previous.endswith((".", ";", "!", "?", ")")) and (line[:1].islower() or "=" in line.split()[0])


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> float | None:
    from bp_service.training.preflight import check_server_answers, precheck

    hydra_cfg = HydraConfig.get()
    discard_stray_claims(hydra_cfg.runtime.output_dir)
    try:
        # Before torch, Lightning and MLflow are imported (seconds): every problem of the config and the data at once.
        precheck(cfg, hydra_cfg.overrides.task)
        if hydra_cfg.mode != RunMode.MULTIRUN:  # a sweep's jobs record into its parent run's store, reached already
            check_server_answers(cfg.tracking, cfg.paths)
        from bp_service.training.tracking.backends import discard_tracking_process, start_tracking_process

        start_tracking_process(cfg)  # MLflow loads there while torch loads here
        try:
            from bp_service.training.recipe import train

            quiet_library_warnings()
            result = train(cfg)
        finally:
            discard_tracking_process()  # one the run did not take (it stopped before its record opened)
    except Exception as exc:
        if interrupted():  # what failed was cut by a Ctrl-C that something on the way swallowed
            raise KeyboardInterrupt from None
        if hydra_cfg.mode != RunMode.MULTIRUN:  # a run refused before it wrote anything leaves no folder
            discard_unused_run_dir(hydra_cfg.runtime.output_dir)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            from bp_service.training.tracking.sweep import mark_sweep_failed

            # Hydra records the failed job and runs the others; the sweep then fails as a whole.
            print(f"bp-train: error: job {hydra_cfg.job.num}: {exc}", file=sys.stderr)
            mark_sweep_failed(cfg.tracking, cfg.paths, hydra_cfg.sweep.dir)
            raise
        if full_error_requested():
            raise
        from bp_service.tables import DataError
        from bp_service.training.tracking.interface import TrackingError

        if isinstance(exc, ConfigError | DataError | TrackingError):  # answered without importing what a run needs
            print(f"bp-train: error: {exc}", file=sys.stderr)
            sys.exit(1 if isinstance(exc, TrackingError) else 2)
        known, usage = known_errors()
        if not isinstance(exc, known):  # one line too, not Hydra's "Error executing job" and a trace
            print(
                f"bp-train: error: {type(exc).__name__}: {one_line(exc)} (HYDRA_FULL_ERROR=1 shows where)",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"bp-train: error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, usage) else 1)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:  # DDP: every process returns here; one prints the summary
        print(summary(cfg.task_name, result))
    return result["best_score"]  # what sweepers optimize


def quiet_library_warnings() -> None:
    """Silence the libraries' known noise for this command only, each by its category and message.

    - torch's FutureWarning on ``LeafSpec``, raised by Lightning's own pytree helper, not by our code;
    - Lightning's PossibleUserWarning that an epoch has fewer batches than ``log_every_n_steps``: the
      module logs its training loss per epoch on purpose (it follows ``trainer.log_every_n_steps``).
    A user's own code calling these APIs still warns anywhere else (a filter here, not at import).
    """
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The number of training batches \(\d+\) is smaller than the logging interval",
        category=PossibleUserWarning,
    )


def end_open_sweeps(reason: str, status: str = "FAILED") -> None:
    """A sweep whose sweeper or launcher raised (a job's process killed, a bad launcher setting), or that was
    stopped (SIGTERM, Ctrl-C), gets no end from Hydra: its parent run is closed here with ``status``, and the
    jobs that finished are summarized."""
    sweep = sys.modules.get("bp_service.training.tracking.sweep")  # loaded only if a sweep started
    if sweep is not None:
        sweep.end_failed_sweep(reason, status)


def _is_rerun_flag(arg: str) -> bool:
    """``--experimental-rerun``, or a prefix argparse would take for it (``--exp``, ``--e=...``)."""
    flag = arg.partition("=")[0]
    return len(flag) >= 3 and "--experimental-rerun".startswith(flag)


def main() -> None:
    """Console entry point of ``bp-train`` (Hydra parses the command line).

    Hydra prints composition errors over several lines; with ``HYDRA_FULL_ERROR=1`` set for it,
    it raises them instead, and they are shown here as one line (the full trace only when the
    user asked for it with ``HYDRA_FULL_ERROR=1``).
    """
    if any(_is_rerun_flag(arg) for arg in sys.argv[1:]):
        # Hydra's rerun unpickles the file it is given (code, from anywhere) and skips composition, so
        # none of the config's checks would run: rerun a job with its overrides (.hydra/overrides.yaml).
        print("bp-train: error: --experimental-rerun is not supported: it loads a pickle, which can run code; "
              "rerun a job with the overrides in its .hydra/overrides.yaml", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if sys.argv[1:2] == ["--stale-runs"]:  # the older spelling of `bp-runs stale [--close]`
        from bp_service.training.runs import main as runs_main

        sys.exit(runs_main(["stale", *sys.argv[2:]]))
    # MLflow's "Downloading artifacts" bars (model logging reads files back) are not the run's progress;
    # a user who sets the variable keeps their choice.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow loads only once a run opens, after Hydra's job logging set its level, and its import sets the
    # level again from this variable (INFO unless set): the job logging's WARNING, kept.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    register_configs()
    # Cached, like Hydra's ${now:}: a launcher that runs jobs in other processes (joblib, submitit, Ray)
    # composes each job's config again there, with the driver's resolver cache copied in, so every job
    # gets the driver's home and sweep folder rather than resolving its own.
    if not OmegaConf.has_resolver("bp_root"):
        OmegaConf.register_new_resolver("bp_root", project_root, use_cache=True)
    if not OmegaConf.has_resolver("bp_run_dir"):
        OmegaConf.register_new_resolver("bp_run_dir", unique_run_dir, use_cache=True)
    os.environ.setdefault("BP_SERVICE_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_entry()
    except KeyboardInterrupt:  # Ctrl-C while Hydra composes or the data loads: no run is open yet
        end_open_sweeps("interrupted", "KILLED")
        print("bp-train: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPT)
    except SystemExit as exc:  # a job that stopped (SIGTERM: 143, Ctrl-C: 130) or was refused ends its sweep too
        if exc.code not in (0, None):
            stopped = {EXIT_SIGTERM: "stopped by SIGTERM", EXIT_INTERRUPT: "interrupted"}.get(exc.code)
            end_open_sweeps(stopped or f"a job exited with code {exc.code}", "KILLED" if stopped else "FAILED")
        raise
    except Exception as exc:
        discard_stray_claims(None)  # a config refused while Hydra composed it: the folders it claimed, empty
        if interrupted():  # a Ctrl-C that Hydra's composition swallowed, then failed on what it had half read
            end_open_sweeps("interrupted", "KILLED")
            print("bp-train: interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPT)
        end_open_sweeps(one_line(exc))
        if full_error_requested():
            raise
        print(f"bp-train: error: {spelling_hint(exc, one_line(exc))}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, HydraException | OmegaConfBaseException) else 1)


if __name__ == "__main__":
    main()
