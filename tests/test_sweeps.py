"""Sweeps whose jobs run in other processes (Hydra's joblib and submitit launchers): one sweep folder, one home
and store, one parent run with every job its child, and a summary, also when the sweep fails as a whole."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env, store_statuses
from mlflow import MlflowClient

FAST = ["data=iris", "trainer=cpu", "tracking.log_model=false"]


def _sweep_runs(home: Path):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("bp.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


def _assert_one_sweep(home: Path, result: subprocess.CompletedProcess, jobs: int) -> Path:
    """One sweep folder holding <sweep>/<num> for each job; one parent run, FINISHED, whose children are the
    jobs' runs, each recording its own folder; the summary printed, naming the parent."""
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (home / "outputs" / "train" / "multiruns").iterdir()
    jobs_made = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs_made == [str(n) for n in range(jobs)]
    assert not (home / "outputs" / "train" / "runs").exists()
    parents, children = _sweep_runs(home)
    assert len(parents) == 1 and len(children) == jobs
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["bp.output_dir"] for c in children) == [str(sweep / str(n)) for n in range(jobs)]
    assert all(c.info.status == "FINISHED" for c in children)
    assert f"bp-train: sweep of {jobs} job(s) finished ({sweep})" in result.stdout
    assert f"MLflow parent run {parent.info.run_id}" in result.stdout
    assert "best/val/acc" in parent.data.metrics and parent.data.tags["bp.best_run"] in {
        c.info.run_id for c in children
    }
    return sweep


@pytest.mark.slow
def test_joblib_jobs_stay_one_sweep(cli, tmp_path):
    result = cli(
        "bp-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST,
        "trainer.max_epochs=2", "optimizer.lr=0.01,0.1",
    )  # fmt: skip
    _assert_one_sweep(tmp_path, result, jobs=2)


@pytest.mark.slow
def test_submitit_local_jobs_stay_one_sweep(cli, tmp_path):
    result = cli(
        "bp-train", "-m", "hydra/launcher=submitit_local", *FAST, "trainer.max_epochs=2", "optimizer.lr=0.01,0.1",
    )  # fmt: skip
    sweep = _assert_one_sweep(tmp_path, result, jobs=2)
    assert (sweep / ".submitit").is_dir()  # the jobs did run through submitit


def test_a_launcher_that_fails_before_any_job_fails_the_parent(cli, tmp_path):
    result = cli("bp-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0", *FAST, "seed=1,2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "bp-train: error: n_jobs == 0 in Parallel has no meaning"
    parents, children = _sweep_runs(tmp_path)
    assert [p.info.status for p in parents] == ["FAILED"] and children == []
    assert "n_jobs == 0" in parents[0].data.tags["bp.failure"]


def _running_child_pid(home: Path) -> int | None:
    """The pid recorded by a job's run that is RUNNING (not the parent's: the sweep's driver)."""
    running = {run for run, status in store_statuses(home) if status == "RUNNING"}
    try:
        with sqlite3.connect(f"file:{home / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as con:
            pids = list(con.execute("SELECT run_uuid, value FROM tags WHERE key = 'bp.pid'"))
            children = {run for (run,) in con.execute("SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId'")}
    except sqlite3.Error:
        return None
    return next((int(pid) for run, pid in pids if run in running and run in children), None)


@pytest.mark.slow
def test_a_killed_job_fails_the_sweep_and_the_finished_job_is_summarized(tmp_path):
    # Job 0 finishes in seconds; job 1 trains long enough to be killed (kill -9: it cannot close its own run).
    command = [
        str(Path(sys.executable).parent / "bp-train"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        *FAST, "trainer.max_epochs=2,100000", "trainer.min_epochs=${trainer.max_epochs}",  # no early stop
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, env=clean_env(BP_SERVICE_HOME=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline, victim = time.monotonic() + 300, None
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.5)
            jobs = list(tmp_path.glob("outputs/train/multiruns/*/bp_jobs.jsonl"))
            if jobs and jobs[0].read_text().count("\n") == 1:  # job 0 is done
                victim = _running_child_pid(tmp_path)
        assert victim is not None, "job 1 never ran beside a finished job 0"
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "bp-train: error:" in err, err[-3000:]
    parents, children = _sweep_runs(tmp_path)
    (parent,) = parents
    assert parent.info.status == "FAILED"
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"]
    killed = next(c for c in children if c.info.status == "KILLED")
    assert f"process {victim} is gone" in killed.data.tags["bp.closed_as_stale"]
    # The finished job is summarized and recorded as the sweep's best.
    (jobs_file,) = tmp_path.glob("outputs/train/multiruns/*/bp_jobs.jsonl")
    (finished,) = [json.loads(line) for line in jobs_file.read_text().splitlines()]
    assert "bp-train: sweep FAILED; 1 job(s) finished" in out
    assert parent.data.tags["bp.best_run"] == finished["run_id"]


def _job(num: int, score: float, *overrides: str) -> dict:
    return {"job": num, "overrides": list(overrides), "monitor": "val/acc", "mode": "max", "score": score,
            "status": "COMPLETED", "run_id": f"run{num}"}  # fmt: skip


def test_the_summary_tells_jobs_apart_by_the_overrides_they_do_not_share(tmp_path):
    from bp_service.training.tracking.sweep import sweep_summary

    two = sweep_summary(
        tmp_path, [_job(0, 0.9, "data=iris", "seed=1"), _job(1, 0.8, "data=iris", "seed=2")], None, None
    )
    assert two.splitlines()[-3:] == [
        "  0    best/val/acc   0.9000  run0                              seed=1",
        "  1    best/val/acc   0.8000  run1                              seed=2",
        "  best: job 0, best/val/acc 0.9000  (seed=1)",
    ]
    # The one job that finished in a failed sweep shows all its overrides; identical jobs say so, once.
    lone = sweep_summary(tmp_path, [_job(0, 0.9, "data=iris", "trainer.max_epochs=2")], None, None, failed=True)
    assert lone.splitlines()[-2:] == [
        "  0    best/val/acc   0.9000  run0                              data=iris trainer.max_epochs=2",
        "  best: job 0, best/val/acc 0.9000  (data=iris trainer.max_epochs=2)",
    ]
    same = sweep_summary(tmp_path, [_job(0, 0.7, "seed=1"), _job(1, 0.9, "seed=1")], None, None)
    assert same.splitlines()[-3:] == [
        "  0    best/val/acc   0.7000  run0                              (the same)",
        "  1    best/val/acc   0.9000  run1                              (the same)",
        "  best: job 1, best/val/acc 0.9000",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_sweep_stopped_by_a_signal_closes_its_parent_run_killed(tmp_path, signum):
    """The job's run ends KILLED, and so does the sweep's parent run: none is left RUNNING."""
    command = [str(Path(sys.executable).parent / "bp-train"), "-m", *FAST, "trainer.max_epochs=100000",
               "trainer.min_epochs=${trainer.max_epochs}", "seed=1,2"]  # fmt: skip
    proc = subprocess.Popen(
        command, env=clean_env(BP_SERVICE_HOME=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and _running_child_pid(tmp_path) is None:
            time.sleep(0.5)
        assert _running_child_pid(tmp_path) == proc.pid, "job 0 never ran"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    parents, children = _sweep_runs(tmp_path)
    (parent,) = parents
    assert [c.info.status for c in children] == ["KILLED"] and parent.info.status == "KILLED"
    assert parent.data.tags["bp.pid"] == str(proc.pid)  # whose it is, for bp-runs stale after a kill -9
