"""Runs that start together stay apart: their own folder, their own files, their own MLflow record; and the
embedded store is created complete, once, whoever starts first and whatever kills the first run.

All through the real ``bp-train`` command, as concurrent processes.
"""

from __future__ import annotations

import datetime
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import torch
from conftest import clean_env, store_statuses
from mlflow import MlflowClient
from omegaconf import OmegaConf

BIN = Path(sys.executable).parent
TINY = ["data=xor", "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]  # fmt: skip


def _env(home: Path) -> dict[str, str]:
    return clean_env(BP_SERVICE_HOME=str(home))


def _start(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "bp-train"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home)
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _store(home: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def _runs(home: Path) -> list:
    client = _store(home)
    experiment = client.get_experiment_by_name("xor")  # tracking.experiment=auto: the data's name
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.slow
def test_concurrent_first_runs_in_the_same_second_each_get_their_own_folder_files_and_record(tmp_path):
    home = tmp_path / "home"
    runs_dir = home / "outputs" / "train" / "runs"
    runs_dir.mkdir(parents=True)
    # Every folder name of the next minute is already taken: each run must claim a suffixed one of its own,
    # whatever second it starts in, and never write into a folder it did not create.
    now = datetime.datetime.now()
    taken = [runs_dir / (now + datetime.timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S") for s in range(120)]
    for folder in taken:
        folder.mkdir()
    widths = [3, 5, 7]
    procs = {w: _start(home, *TINY, f"model.net.hidden=[{w}]") for w in widths}  # a fresh store: all first runs
    results = {w: _finish(p) for w, p in procs.items()}
    for w, (code, _, err) in results.items():
        assert code == 0, f"width {w}: {err[-3000:]}"

    assert all(not any(folder.iterdir()) for folder in taken), "a run wrote into a folder it did not claim"
    run_dirs = {Path(p) for p in runs_dir.iterdir() if any(p.iterdir())}
    assert len(run_dirs) == len(widths)
    assert all("_" in d.name[len("2026-01-01_00-00-00") :] for d in run_dirs)  # suffixed after the collision

    runs = _runs(home)
    assert len(runs) == len(widths) and all(r.info.status == "FINISHED" for r in runs)
    logged_models = _store(home).search_logged_models([runs[0].info.experiment_id])
    models = {m.source_run_id: m.artifact_location for m in logged_models}
    assert len(models) == len(widths)
    seen = set()
    for run in runs:
        width = int(run.data.params["model.net.hidden"].strip("[]"))
        folder = Path(run.data.tags["bp.output_dir"])
        seen.add(folder)
        assert folder in run_dirs
        assert OmegaConf.load(folder / ".hydra" / "overrides.yaml")[-1] == f"model.net.hidden=[{width}]"
        local = torch.load(folder / "model_bundle.pt", weights_only=True)
        assert local["architecture"]["sizes"][1] == width
        logged_dir = Path(url2pathname(urlparse(models[run.info.run_id]).path))
        logged = torch.load(next(logged_dir.rglob("model_bundle.pt")), weights_only=True)
        assert logged["meta"]["mlflow_run_id"] == run.info.run_id
        for key, tensor in local["state_dict"].items():
            assert torch.equal(tensor, logged["state_dict"][key]), key
        ckpt = next((folder / "checkpoints").glob("best-*.ckpt"))
        assert torch.load(ckpt, weights_only=True)["bp_service"]["meta"]["mlflow_run_id"] == run.info.run_id
    assert seen == run_dirs

    # ckpt_path=last still finds the newest run with the same overrides among the suffixed siblings.
    by_width = {int(r.data.params["model.net.hidden"].strip("[]")): r.info.run_id for r in runs}
    code, out, err = _finish(_start(home, *TINY, "model.net.hidden=[5]", "ckpt_path=last", "trainer.max_epochs=2"))
    assert code == 0, err[-3000:]
    assert f"MLflow run   {by_width[5]}" in out


@pytest.mark.slow
def test_a_first_run_killed_while_creating_the_store_leaves_nothing_a_later_run_trips_on(tmp_path):
    home = tmp_path / "home"
    proc = _start(home, *TINY)
    deadline = time.monotonic() + 120
    while not list(home.glob(".mlflow.db.*.tmp")):  # the store being created, not yet in place
        assert proc.poll() is None, f"ended before creating the store: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the store was never created in a temporary file"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (home / "mlflow.db").exists(), "a store was put in place before it was complete"

    code, _, err = _finish(_start(home, *TINY))
    assert code == 0, err[-3000:]
    assert not list(home.glob(".mlflow.db.*"))  # the killed creator's leftovers are gone
    with sqlite3.connect(home / "mlflow.db") as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "alembic_version" in tables and not any(t.startswith("_alembic_tmp_") for t in tables)
    assert [r.info.status for r in _runs(home)] == ["FINISHED"]


@pytest.mark.slow
def test_a_store_left_half_migrated_with_no_runs_is_moved_aside_and_recreated(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # What an interrupted MLflow migration leaves: some tables, a leftover alembic work table, no runs.
    with sqlite3.connect(home / "mlflow.db") as con:
        con.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        con.execute("CREATE TABLE runs (run_uuid TEXT PRIMARY KEY)")
        con.execute("CREATE TABLE _alembic_tmp_latest_metrics (key TEXT)")
    code, _, err = _finish(_start(home, *TINY))
    assert code == 0, err[-3000:]
    assert "was half-created" in err
    assert len(list(home.glob("mlflow.db.broken-*"))) == 1
    assert [r.info.status for r in _runs(home)] == ["FINISHED"]


# --------------------------------------------------------------------------- no run left RUNNING
LONG = ["data=xor", "data.n_samples=20000", "data.batch_size=16", "trainer=cpu", "trainer.max_epochs=50",
        "trainer.enable_progress_bar=false", "tracking.log_model=false"]  # fmt: skip


@pytest.mark.slow
def test_sigterm_the_moment_the_run_row_exists_closes_it_killed(tmp_path):
    home = tmp_path / "home"
    proc = _start(home, *LONG)
    deadline = time.monotonic() + 120
    while not store_statuses(home):
        assert proc.poll() is None and time.monotonic() < deadline, "no run was created"
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc, timeout=120)
    assert code == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert [status for _, status in store_statuses(home)] == ["KILLED"]


@pytest.mark.slow
def test_stale_runs_left_by_kill_9_are_listed_and_closed_but_live_runs_are_not(tmp_path):
    home = tmp_path / "home"
    killed = _start(home, *LONG, "task_name=killed")
    deadline = time.monotonic() + 120
    while not any(s == "RUNNING" for _, s in store_statuses(home)):
        assert killed.poll() is None and time.monotonic() < deadline, "no run was created"
    (killed_id, _), *_ = store_statuses(home)
    killed.kill()
    killed.wait()
    alive = _start(home, *LONG, "task_name=alive")
    while len(store_statuses(home)) < 2:
        assert alive.poll() is None and time.monotonic() < deadline, "the second run was not created"
    try:
        listed = subprocess.run(
            [str(BIN / "bp-train"), "--stale-runs"], capture_output=True, text=True, env=_env(home), timeout=300
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line[:32].isalnum()}
        (alive_id,) = set(lines) - {killed_id}
        assert f"process {killed.pid} is gone" in lines[killed_id] and "--close" in lines[killed_id]
        assert "left as it is" in lines[alive_id]
        assert dict(store_statuses(home)) == {killed_id: "RUNNING", alive_id: "RUNNING"}  # listing changes nothing

        closed = subprocess.run(
            [str(BIN / "bp-train"), "--stale-runs", "--close"],
            capture_output=True,
            text=True,
            env=_env(home),
            timeout=300,
        )
        assert closed.returncode == 0, closed.stderr[-2000:]
        assert "1 closed" in closed.stdout
        assert dict(store_statuses(home)) == {killed_id: "KILLED", alive_id: "RUNNING"}
        assert _store(home).get_run(killed_id).data.tags["bp.closed_as_stale"] == f"process {killed.pid} is gone"
    finally:
        alive.send_signal(signal.SIGTERM)
        _finish(alive, timeout=120)
    assert dict(store_statuses(home))[alive_id] == "KILLED"
