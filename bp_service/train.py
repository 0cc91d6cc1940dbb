"""``bp-train``: one configured training run, from config to tracked, tested, servable model.

Read top to bottom, it is the recipe: validate the config, seed, load the data, build the network,
open the MLflow run, gradient-check the network, fit, test the best checkpoint, record artifacts
and the model, print a summary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bp_service.callbacks import GradientFlow
from bp_service.config import ConfigError, full_error_requested, register_configs, validate
from bp_service.data import BPDataModule, DataError
from bp_service.gradcheck import check_model
from bp_service.layers import MLP
from bp_service.module import BPModule, NonFiniteError
from bp_service.preflight import check_config, check_monitor, check_rows
from bp_service.reports import confusion_figure, curves_figure, gradient_flow_figure
from bp_service.serving import InputError, check_resumable, load_bundle
from bp_service.tables import DiskFullError, atomic_path, unique_run_dir
from bp_service.tracking import (
    Tracker,
    TrackingError,
    close_stale_main,
    mark_sweep_failed,
    parent_run_id,
    recordable_config,
    signals_deferred,
)

CONF_DIR = Path(os.environ.get("BP_SERVICE_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143, what schedulers expect from a job stopped by SIGTERM
EXIT_INTERRUPT = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or unreadable; the message names the file."""


class GradcheckError(RuntimeError):
    """The hand-written backward disagrees with finite differences on this run's model."""


def project_root() -> str:
    """Stable home of mlflow.db, artifacts and outputs, whatever the working directory."""
    if os.environ.get("BP_SERVICE_HOME"):
        return str(Path(os.environ["BP_SERVICE_HOME"]).resolve())
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return str(checkout)
    return str(Path.home() / ".bp-service")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename: a kill mid-write never leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class LastCheckpoint(Checkpoint):
    """Keep ``last.ckpt`` current: after every epoch, and every ``every_n_steps`` optimizer steps if set.

    ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only in epochs that also save a
    best checkpoint, and its step cadence is built for automatic optimization. As a ``Checkpoint``
    this runs after the module's epoch-end hook, like ModelCheckpoint.
    """

    def __init__(self, path: Path, every_n_steps: int | None = None) -> None:
        self.path, self.every_n_steps = path, every_n_steps
        self._saved_at = 0

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        n = self.every_n_steps
        if n and trainer.global_step // n > self._saved_at // n:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_at = trainer.global_step


# --------------------------------------------------------------------------- checkpoints to resume
def _same_overrides(run_dir: Path, wanted: set[str]) -> bool:
    saved = run_dir / ".hydra" / "overrides.yaml"
    return saved.is_file() and _resumable_overrides(OmegaConf.load(saved)) == wanted


def _resumable_overrides(overrides) -> set[str]:
    """The overrides that define a run; where it resumes from and how long it trains do not."""
    ignored = ("ckpt_path=", "trainer.max_epochs=", "tracking.")
    return {o for o in overrides if not o.startswith(ignored)}


def resolve_resume(cfg: DictConfig) -> tuple[str | None, Path]:
    """(checkpoint to resume from, folder to write checkpoints to)."""
    if cfg.ckpt_path is None:
        return None, Path(cfg.paths.ckpt_dir)
    if cfg.ckpt_path == "last":
        wanted = _resumable_overrides(HydraConfig.get().overrides.task)
        runs_dir = Path(HydraConfig.get().runtime.output_dir).parent
        candidates = [p for p in runs_dir.glob("*/checkpoints/last.ckpt") if _same_overrides(p.parent.parent, wanted)]
        if not candidates:
            raise CheckpointError(
                f"ckpt_path=last: no last.ckpt from an earlier run with the same overrides under {runs_dir}"
            )
        path = max(candidates, key=lambda p: p.stat().st_mtime)
    else:
        path = Path(cfg.ckpt_path)
    _read_checkpoint(path)  # fail now, naming the file, rather than deep inside Lightning
    return str(path), path.parent


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The bp-service part of a checkpoint, read safely; a corrupt or foreign file is named."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return load_bundle(path)
    except InputError as exc:
        raise CheckpointError(str(exc)) from None


def _resume_run_id(ckpt_path: str | None) -> str | None:
    if ckpt_path is None:
        return None
    return _read_checkpoint(Path(ckpt_path))["meta"].get("mlflow_run_id")


# --------------------------------------------------------------------------- the recipe
def build_network(cfg: DictConfig, n_features: int, n_outputs: int, task: str) -> MLP:
    output_activation = cfg.model.output_activation
    if output_activation == "auto":
        output_activation = "sigmoid" if task == "classification" else None
    return MLP(
        [n_features, *cfg.model.hidden, n_outputs],
        activation=cfg.model.activation,
        output_activation=output_activation,
        fused=cfg.model.fused,
        bias=cfg.model.bias,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; returns its metrics, paths and MLflow run id. Raises on any failure."""
    started = time.perf_counter()
    validate(cfg)
    check_config(cfg, HydraConfig.get().overrides.task)  # everything knowable before the data is read
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = BPDataModule(cfg.data, cfg.seed)
    datamodule.setup()
    data = datamodule.data
    net = build_network(cfg, data.n_features, data.n_outputs, data.task)
    classification = data.task == "classification"
    monitor = (
        cfg.checkpoint.monitor if cfg.checkpoint.monitor != "auto" else ("val/acc" if classification else "val/loss")
    )
    mode = "max" if monitor.endswith("acc") else "min"
    check_monitor(cfg, data.task)
    check_rows(cfg, len(data.x["train"]), cfg.data.path if cfg.data.name == "csv" else f"data={cfg.data.name}")

    ckpt_path, ckpt_dir = resolve_resume(cfg)
    if ckpt_path:  # before the run it belongs to is reopened: a mismatch must not fail that run
        check_resumable(_read_checkpoint(Path(ckpt_path)), net, data.meta, ckpt_path)
    hydra_cfg = HydraConfig.get()
    accelerator = cfg.trainer.accelerator
    device = (
        "cuda" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    )
    root_dir, on_slurm = cfg.paths.output_dir, SLURMEnvironment.detect()
    if on_slurm:  # a requeued job keeps its id: Lightning finds its HPC checkpoint here and resumes from it
        root_dir = str(Path(cfg.paths.root_dir) / "outputs" / cfg.task_name / f"slurm-{os.environ['SLURM_JOB_ID']}")
    hpc = sorted(Path(root_dir).glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime) if on_slurm else []
    tracker = trainer = None
    lightning_has_sigterm = False

    def on_sigterm(signum: int, frame: Any) -> None:
        """Outside fit and test (whose SIGTERM Lightning handles), stop the same way: KILLED, 143."""
        if not lightning_has_sigterm:
            raise SIGTERMException()

    status = "FAILED"  # until proven otherwise: no run is left RUNNING
    try:
        # Installed before the run opens, and signals held while it opens: a SIGTERM at any moment closes it.
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            signal.signal(signal.SIGTERM, on_sigterm)
        if cfg.tracking.enabled and rank_zero_only.rank == 0:  # DDP: one process records the run
            sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
            resume_id = _resume_run_id(ckpt_path or (str(hpc[-1]) if hpc else None))
            with signals_deferred(signal.SIGTERM, signal.SIGINT):
                tracker = Tracker(cfg, list(hydra_cfg.overrides.task), device, resume_id, parent_run_id(sweep_dir))
        module = BPModule(
            net,
            loss=cfg.model.loss,
            task=data.task,
            optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
            scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None,
            meta={**data.meta, "mlflow_run_id": tracker.run_id if tracker else None},
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            gradient_clip_val=cfg.trainer.gradient_clip_val,
            compile=cfg.model.compile,
            capture=cfg.model.capture,
        )

        checkpoint = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best-epoch{epoch:03d}-step{step}",
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_last=False,  # LastCheckpoint keeps last.ckpt current
            save_top_k=cfg.checkpoint.save_top_k,
        )
        callbacks: list[pl.Callback] = [checkpoint]
        if cfg.checkpoint.save_last:
            callbacks.append(LastCheckpoint(ckpt_dir / "last.ckpt", cfg.checkpoint.every_n_train_steps))
        if cfg.early_stopping.enabled:
            callbacks.append(
                EarlyStopping(
                    monitor, patience=cfg.early_stopping.patience, mode=mode, min_delta=cfg.early_stopping.min_delta
                )
            )
        gradient_flow = GradientFlow()
        if tracker:
            callbacks.append(LearningRateMonitor(logging_interval=cfg.scheduler.interval if cfg.scheduler else "epoch"))
            callbacks.append(gradient_flow)

        trainer_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if v is not None}
        trainer_kwargs.pop("gradient_clip_val", None)  # manual optimization clips in the module
        trainer_kwargs["log_every_n_steps"] = 1  # the module logs train/loss_step at its own cadence
        trainer_kwargs.setdefault("deterministic", device == "cpu")
        plugins: list[Any] = [AtomicCheckpointIO()]
        if on_slurm:
            plugins.append(SLURMEnvironment(cfg.slurm.auto_requeue, getattr(signal, cfg.slurm.requeue_signal)))
        trainer = pl.Trainer(
            **trainer_kwargs,
            logger=tracker.logger if tracker else False,
            callbacks=callbacks,
            plugins=plugins,
            default_root_dir=root_dir,
        )

        if trainer.is_global_zero and cfg.tracking.gradcheck:
            report = check_model(net, cfg.model.loss)
            if tracker:
                tracker.log_dict(report, "gradcheck.json")
            if not report["passed"]:
                bad = [e["layer"] + ":" + e["function"] for e in report["layers"] if not e["passed"]]
                raise GradcheckError(f"gradient check failed before training for {', '.join(bad)}")

        lightning_has_sigterm = True
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning stopped at a batch end (it would exit 0): keep the work
            trainer.save_checkpoint(ckpt_dir / "last.ckpt")
            raise

        # Read before test(): restoring the best checkpoint also restores this callback's older state.
        best = checkpoint.best_model_path or None
        last = str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").is_file() else None
        best_score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
        test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)[0]
        lightning_has_sigterm = False
        result = {
            "metrics": {k: float(v) for k, v in test_metrics.items()},
            "best_checkpoint": best,
            "last_checkpoint": last,
            "monitor": monitor,
            "best_score": best_score,
            "run_id": tracker.run_id if tracker else None,
            "tracking_uri": tracker.uri if tracker else None,
            "output_dir": cfg.paths.output_dir,
        }
        if tracker:
            _record_artifacts(cfg, tracker, module, data, result, gradient_flow)
        status = "FINISHED"
    except SIGTERMException:
        status = "KILLED"
        print(
            f"bp-train: stopped by SIGTERM at step {trainer.global_step}; checkpoint {ckpt_dir / 'last.ckpt'}; "
            "resume with ckpt_path=last"
            if trainer is not None
            else "bp-train: stopped by SIGTERM before training started",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_SIGTERM) from None
    except (KeyboardInterrupt, SystemExit) as exc:  # Lightning turns Ctrl-C into sys.exit(1)
        status = "KILLED"
        if isinstance(exc, KeyboardInterrupt) or (trainer is not None and trainer.interrupted):
            print("bp-train: interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPT) from None
        raise
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if tracker:
            tracker.end(status)
    result["wall_time_s"] = time.perf_counter() - started
    result["tracking_lost"] = tracker.logger.lost if tracker else None
    return result


def _record_artifacts(
    cfg: DictConfig, tracker: Tracker, module: BPModule, data, result: dict[str, Any], gradient_flow: GradientFlow
) -> None:
    """Config, curves, gradient flow, confusion matrix, checkpoint pointer, and the servable model."""
    tracker.log_text(OmegaConf.to_yaml(recordable_config(cfg)), "config.yaml")
    keys = ["train/loss", "val/loss"] + (["val/acc"] if data.task == "classification" else [])
    history = tracker.metric_history(keys)
    if any(history.values()):
        tracker.log_figure(curves_figure(history), "curves.png")
    epochs, panels = gradient_flow.panels()
    if panels:
        tracker.log_figure(gradient_flow_figure(epochs, panels), "gradient_flow.png")
    net = module.net
    if data.task == "classification":
        with torch.no_grad():
            weight = net.layers[0].weight  # *-true precisions: the test rows in the network's dtype
            pred = net(data.x["test"].to(weight.device, weight.dtype)).float().cpu()
        target = data.y["test"]
        to_index = (lambda t: (t[:, 0] > 0.5).long()) if pred.shape[1] == 1 else (lambda t: t.argmax(1))
        tracker.log_figure(
            confusion_figure(to_index(target).numpy(), to_index(pred).numpy(), data.meta["classes"]),
            "confusion_matrix.png",
        )
    tracker.log_dict(
        {k: result[k] for k in ("best_checkpoint", "last_checkpoint", "monitor", "best_score")}, "checkpoint.json"
    )
    if result["best_checkpoint"]:
        tracker.log_artifact(result["best_checkpoint"], "checkpoints")
    if cfg.tracking.log_model:
        bundle_path = Path(cfg.paths.output_dir) / "model_bundle.pt"
        try:
            with atomic_path(bundle_path) as tmp:
                torch.save(
                    {"state_dict": net.state_dict(), "meta": module.meta, "architecture": module.architecture}, tmp
                )
        except DiskFullError as exc:  # trained and tested: the run stands, only this artifact is lost
            result["lost_artifacts"] = [f"{bundle_path.name} and the MLflow model ({exc.strerror})"]
            tracker.logger.call("set_tag", tracker.client.set_tag, tracker.run_id, "bp.lost_artifacts", exc.strerror)
            return
        tracker.log_model(bundle_path, data.raw_example(), cfg.tracking.register_model)


def summary(cfg: DictConfig, result: dict[str, Any]) -> str:
    lines = [f"bp-train: {cfg.task_name} finished in {result['wall_time_s']:.1f} s"]
    lines += [f"  {k:<12} {v:.4f}" for k, v in sorted(result["metrics"].items())]
    lines.append(f"  checkpoint   {result['best_checkpoint'] or result['last_checkpoint']}")
    if result["run_id"]:
        lines.append(f"  MLflow run   {result['run_id']}  (experiment {cfg.tracking.experiment!r})")
        uri = result["tracking_uri"]
        dashboard = "make ui" if uri.startswith("sqlite:") else uri
        lines.append(f"  dashboard    {dashboard}   (store: {uri})")
    if result.get("tracking_lost"):
        lines.append(f"  WARNING      MLflow tracking was lost mid-run: {result['tracking_lost']}")
    for lost in result.get("lost_artifacts") or []:
        lines.append(f"  WARNING      not written: {lost}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
KNOWN_ERRORS = (
    ConfigError,
    DataError,
    TrackingError,
    CheckpointError,
    GradcheckError,
    NonFiniteError,
    InputError,
    DiskFullError,
)
USAGE_ERRORS = (ConfigError, DataError, InputError)
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
            if parts and parts[-1].endswith(":"):  # a heading such as "Available options in 'data':"
                parts[-1] += " " + line
            elif parts and parts[-1].startswith("Available options"):
                parts[-1] += ", " + line
            else:
                parts.append(line)
        exc = exc.__cause__
    return "; ".join(parts)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        result = train(cfg)
    except Exception as exc:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # Hydra records the failed job and runs the others; the sweep then fails as a whole.
            print(f"bp-train: error: job {hydra_cfg.job.num}: {exc}", file=sys.stderr)
            mark_sweep_failed(cfg, hydra_cfg.sweep.dir)
            raise
        if full_error_requested():
            raise
        if not isinstance(exc, KNOWN_ERRORS):  # one line too, not Hydra's "Error executing job" and a trace
            print(
                f"bp-train: error: {type(exc).__name__}: {one_line(exc)} (HYDRA_FULL_ERROR=1 shows where)",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"bp-train: error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, USAGE_ERRORS) else 1)
    print(summary(cfg, result))
    return result["best_score"]  # what sweepers optimize


def main() -> None:
    """Console entry point of ``bp-train`` (Hydra parses the command line).

    Hydra prints composition errors over several lines; with ``HYDRA_FULL_ERROR=1`` set for it,
    it raises them instead, and they are shown here as one line (the full trace only when the
    user asked for it with ``HYDRA_FULL_ERROR=1``).
    """
    if sys.argv[1:2] == ["--stale-runs"]:  # list (and with --close, close) runs left RUNNING by a killed process
        sys.exit(close_stale_main(sys.argv[2:]))
    register_configs()
    if not OmegaConf.has_resolver("bp_root"):
        OmegaConf.register_new_resolver("bp_root", project_root)
    if not OmegaConf.has_resolver("bp_run_dir"):
        OmegaConf.register_new_resolver("bp_run_dir", unique_run_dir)
    os.environ.setdefault("BP_SERVICE_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_entry()
    except KeyboardInterrupt:  # Ctrl-C while Hydra composes or the data loads: no run is open yet
        print("bp-train: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPT)
    except Exception as exc:
        if full_error_requested():
            raise
        print(f"bp-train: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, HydraException | OmegaConfBaseException) else 1)


if __name__ == "__main__":
    main()
