"""How a run ends and what it reports: early stopping by default, the epoch cap named when it cut a run short,
the best checkpoint among equal scores, and nothing left behind by a run that never started."""

import re
import subprocess
from pathlib import Path

import pytest
from conftest import clean_env

from bp_service.files import discard_unused_run_dir
from bp_service.training.cli import summary
from bp_service.training.recipe import train

NO_TRACKING = ["tracking.enabled=false"]
REPO = Path(__file__).resolve().parent.parent


def test_a_default_run_trains_until_val_loss_stops_improving(compose_cfg):
    cfg = compose_cfg("data=iris", *NO_TRACKING)
    assert cfg.trainer.max_epochs >= 200  # a generous cap: early stopping ends runs
    result = train(cfg)
    stopping = result["stopping"]
    assert stopping["early_stopped"] and stopping["monitor"] == "val/loss"
    assert 20 < stopping["epochs"] < cfg.trainer.max_epochs  # at least the patience, short of the cap
    assert not stopping["still_improving"]
    text = summary(cfg.task_name, result)
    assert f"epochs       {stopping['epochs']}  (early stopping: val/loss stopped improving)" in text
    assert "WARNING" not in text


def test_the_epoch_cap_reached_while_improving_is_a_warning(cli, tmp_path):
    result = cli("bp-train", "data=iris", "trainer=cpu", "trainer.max_epochs=3", *NO_TRACKING)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "epochs       3  (the cap, trainer.max_epochs=3)" in out
    assert "WARNING      epoch cap 3 reached while val/loss was still improving; raise trainer.max_epochs" in out
    # the tested checkpoint's score under the name MLflow records it by, and the run's folder kept
    best = re.search(r"^  best/val/acc +([0-9.]+)$", out, re.MULTILINE)
    assert best and 0 <= float(best.group(1)) <= 1, out
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert list(run_dir.glob("checkpoints/best-*.ckpt")) and (run_dir / "checkpoints" / "last.ckpt").is_file()


def _best_epoch(result) -> int:
    return int(re.search(r"best-epoch(\d+)", result["best_checkpoint"]).group(1))


def test_of_equal_best_scores_the_latest_checkpoint_is_kept(compose_cfg):
    """iris's 22 validation rows reach val/acc 1.0 within a few epochs: Lightning's first such epoch has
    barely trained; the latest has trained longest."""
    common = ["data=iris", "trainer.max_epochs=15", "~callbacks.early_stopping", *NO_TRACKING]
    first = train(compose_cfg(*common, "callbacks.model_checkpoint.ties=first", run_dir="first"))
    latest = train(compose_cfg(*common, run_dir="latest"))
    assert latest["best_score"] == first["best_score"]
    assert _best_epoch(latest) > _best_epoch(first)
    assert latest["metrics"]["test/loss"] < first["metrics"]["test/loss"]


@pytest.mark.parametrize(
    "args",
    [
        ["data=csv", "data.path=/nonexistent/table.csv", "data.target=y"],  # bad data
        ["data=iris", "optimizer.lr=-1"],  # a bad value
        ["data=iris", "ckpt_path={tmp}/garbage.ckpt"],  # a file torch cannot load: refused after the heavy imports
    ],
    ids=["data", "override", "resume"],
)
def test_a_command_that_fails_leaves_no_run_folder(cli, tmp_path, args):
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = cli("bp-train", *args, "trainer=cpu", *NO_TRACKING)
    assert result.returncode != 0 and "bp-train: error:" in result.stderr
    runs = tmp_path / "outputs" / "train" / "runs"
    assert not (runs.is_dir() and list(runs.iterdir())), list(runs.iterdir())


def test_only_a_folder_with_nothing_a_run_wrote_is_discarded(tmp_path):
    def run_dir(name: str) -> Path:
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("seed: 42\n")
        (folder / "train.log").touch()  # opened, nothing written
        return folder

    assert discard_unused_run_dir(run_dir("unused")) and not (tmp_path / "unused").exists()
    checkpoint = run_dir("checkpoint")
    (checkpoint / "checkpoints").mkdir()
    (checkpoint / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    logged = run_dir("logged")
    (logged / "train.log").write_text("epoch 1\n")
    linked = run_dir("linked")
    (linked / "data").symlink_to(tmp_path)
    for kept in (checkpoint, logged, linked):
        assert not discard_unused_run_dir(kept) and (kept / ".hydra" / "config.yaml").is_file(), kept


@pytest.mark.slow
def test_what_a_tracked_run_leaves_in_its_home_is_ignored_by_git(cli, tmp_path):
    """At the checkout (the default home) nothing a run writes shows in ``git status``: the store's lock too."""
    result = cli("bp-train", "data=xor", "trainer=cpu", "trainer.max_epochs=1", "tracking.log_model=false")
    assert result.returncode == 0, result.stderr[-2000:]
    left = sorted(p.name + ("/" if p.is_dir() else "") for p in tmp_path.iterdir())  # "dir/" patterns need the "/"
    assert "mlflow.db" in left and "mlflow.db.lock" in left, left
    check = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "--no-index", "--verbose", "--non-matching", *left],
        capture_output=True, text=True, env=clean_env(), timeout=60,
    )  # fmt: skip
    not_ignored = [line.split("\t")[-1] for line in check.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, check.stdout + check.stderr
