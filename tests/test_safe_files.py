"""Outputs that are not regular files, and writes that run out of space.

``output=`` may name ``/dev/null``, a FIFO, a terminal or a link to ``/dev/stdout``: those are written in place,
never replaced by a regular file. A regular output is replaced only when complete.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import clean_env

from bp_service.bundle import build_net
from bp_service.serving.predict import main

BIN = Path(sys.executable).parent
ARCH = {"sizes": [2, 4, 1], "activations": ["sigmoid", "sigmoid"], "fused": True, "bias": True}
META = {
    "task": "classification",
    "feature_names": ["a", "b"],
    "classes": [0, 1],
    "scaler_mean": [0.0, 0.0],
    "scaler_scale": [1.0, 1.0],
    "target_mean": 0.0,
    "target_scale": 1.0,
}
N_ROWS = 50


@pytest.fixture
def bundle(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model_bundle.pt"
    torch.save({"state_dict": build_net(ARCH).state_dict(), "meta": META, "architecture": ARCH}, path)
    return path


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.csv"
    pd.DataFrame({"a": range(N_ROWS), "b": [0.5] * N_ROWS}).to_csv(path, index=False)
    return path


def _predictions_text(bundle: Path, rows: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "reference.csv"
    assert main([f"model={bundle}", f"input={rows}", f"output={out}"]) == 0, capsys.readouterr().err
    return out.read_text()


def test_a_fifo_is_written_in_place_and_its_reader_gets_every_row(bundle, rows, tmp_path, capsys):
    expected = _predictions_text(bundle, rows, tmp_path, capsys)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code = main([f"model={bundle}", f"input={rows}", f"output={fifo}"])
    reader.join(timeout=60)
    assert code == 0, capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert received and received[0].decode() == expected
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_character_device_stays_a_device(bundle, rows, tmp_path, capsys):
    # Our own /dev/null (major 1, minor 3), so a regression can never replace the system's.
    null = tmp_path / "null"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root with CAP_MKNOD")
    assert main([f"model={bundle}", f"input={rows}", f"output={null}"]) == 0, capsys.readouterr().err
    st = os.lstat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_link_to_a_regular_file_replaces_the_target_and_stays_a_link(bundle, rows, tmp_path, capsys):
    expected = _predictions_text(bundle, rows, tmp_path, capsys)
    target = tmp_path / "data" / "predictions.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    assert main([f"model={bundle}", f"input={rows}", f"output={link}"]) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == expected
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # a replaced file keeps its permissions


def test_output_naming_a_folder_is_refused_before_anything_is_written(bundle, rows, tmp_path, capsys):
    code = main([f"model={bundle}", f"input={rows}", f"output={tmp_path / 'newdir'}/"])
    assert code == 2
    assert "names a folder" in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists()


@pytest.mark.slow
def test_bp_predict_through_links_to_dev_stdout_and_dev_null(bundle, rows, tmp_path, capsys):
    expected = _predictions_text(bundle, rows, tmp_path, capsys)
    env = clean_env()
    to_stdout, to_null = tmp_path / "to-stdout.csv", tmp_path / "to-null.csv"
    to_stdout.symlink_to("/dev/stdout")
    to_null.symlink_to("/dev/null")
    null_before = os.stat("/dev/null")
    for link in (to_stdout, to_null):
        proc = subprocess.run(
            [str(BIN / "bp-predict"), f"model={bundle}", f"input={rows}", f"output={link}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert link.is_symlink()
        # the predictions went down the pipe (followed by the summary line), or into /dev/null: not to stdout
        assert proc.stdout.startswith(expected) == (link is to_stdout), proc.stdout[:200]
    null_after = os.stat("/dev/null")
    assert stat.S_ISCHR(null_after.st_mode) and null_after.st_rdev == null_before.st_rdev
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- a full disk
TINY_TRAIN = ["data=xor", "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "tracking.gradcheck=false"]  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (root with CAP_SYS_ADMIN); unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); see the /dev/full test")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = clean_env(BP_SERVICE_HOME=str(tmp_path / "home"))
    return subprocess.run(
        [str(BIN / "bp-train"), *TINY_TRAIN, *args], capture_output=True, text=True, env=env, timeout=600
    )


def _run_record(tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    return run


@pytest.mark.slow
def test_checkpoints_on_a_full_disk_leave_no_partial_file_and_name_the_folder(tmp_path, small_disk):
    disk = small_disk("ckpts", "16k")  # a checkpoint of 2 -> 2048 -> 1 is ~40 KB
    result = _train(tmp_path, "model.net.hidden=[2048]", f"paths.ckpt_dir={disk}")
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"bp-train: error: no space left on {disk} (writing "), line
    assert "inline_container" not in result.stderr and "Traceback" not in result.stderr
    assert list(disk.iterdir()) == [], "a partial checkpoint was left behind"
    assert _run_record(tmp_path).info.status == "FAILED"


@pytest.mark.slow
def test_a_bundle_lost_to_a_full_disk_after_training_keeps_the_run_finished(tmp_path, small_disk):
    disk = small_disk("run", "64k")  # Hydra's few files fit; a bundle of 2 -> 16384 -> 1 (~200 KB) does not
    run_on_disk = f"hydra.run.dir=${{bp_run_dir:{disk}}}"  # the run's own new folder, on that disk
    result = _train(tmp_path, "model.net.hidden=[16384]", run_on_disk, f"paths.ckpt_dir={tmp_path / 'ck'}")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = disk.iterdir()
    assert f"not written: model_bundle.pt and the MLflow model (no space left on {run_dir}" in result.stdout
    assert not (run_dir / "model_bundle.pt").exists() and not list(run_dir.glob(".model_bundle.pt*"))
    run = _run_record(tmp_path)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert run.data.tags["bp.lost_artifacts"].startswith(f"no space left on {run_dir}")


@pytest.mark.slow
def test_a_store_that_a_full_disk_keeps_from_being_created_stops_tracking_not_training(tmp_path, small_disk):
    home = small_disk("home", "64k")  # an empty MLflow store (its migrations) takes about 400 KB
    env = clean_env(BP_SERVICE_HOME=str(home))
    args = [*TINY_TRAIN, f"hydra.run.dir=${{bp_run_dir:{tmp_path / 'run'}}}", f"paths.ckpt_dir={tmp_path / 'ck'}"]
    result = subprocess.run([str(BIN / "bp-train"), *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    db = home / "mlflow.db"
    (warning,) = [line for line in result.stderr.splitlines() if "no space left" in line]
    assert warning == (
        f"bp-train: warning: MLflow tracking is off for this run: the tracking store {db} could not be created "
        f"(no space left on {home}); training goes on without it"
    )
    assert "SQL" not in result.stderr and "Traceback" not in result.stderr
    assert "finished in" in result.stdout and "test/acc" in result.stdout and "MLflow run" not in result.stdout
    assert list((tmp_path / "ck").glob("*.ckpt")), "training did not go on"
    assert not db.exists() and not list(home.glob(".mlflow.db.*")), "a partial store was left behind"


def test_predictions_to_a_device_that_is_full_are_one_line_and_the_device_stays(bundle, rows, tmp_path, capsys):
    full = tmp_path / "full"
    full.symlink_to("/dev/full")  # every write: ENOSPC
    code = main([f"model={bundle}", f"input={rows}", f"output={full}"])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"bp-predict: error: no space left on {full}"
    assert full.is_symlink() and stat.S_ISCHR(os.stat("/dev/full").st_mode)
