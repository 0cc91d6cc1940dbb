"""``bp-runs``: the store every command uses, its newest runs, and the runs a killed process left RUNNING."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env
from mlflow import MlflowClient

from bp_service.training.store import boot_id, pid_namespace

BIN = Path(sys.executable).parent


def bp_runs(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "bp-runs"), *args], capture_output=True, text=True, env=clean_env(BP_SERVICE_HOME=str(home), **env)
    )


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has it (pids are not reused this soon)


@pytest.fixture(scope="module")
def made_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A real embedded store with three runs: two finished ones and one left RUNNING by a dead pid. Made once (MLflow's
    migrations take seconds); each test gets a copy of the file."""
    folder = tmp_path_factory.mktemp("made_store")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    digits = client.create_experiment("digits", artifact_location=(folder / "mlartifacts").as_uri())
    iris = client.create_experiment("iris", artifact_location=(folder / "mlartifacts").as_uri())
    runs = {}
    for name, experiment, metric, value in [("first", digits, "test/acc", 0.91), ("second", iris, "test/rmse", 2.5)]:
        run = client.create_run(experiment, run_name=name)
        client.log_metric(run.info.run_id, metric, value)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[name] = run.info.run_id
    owner = {"bp.host": socket.gethostname(), "bp.pid": str(dead_pid())}
    owner.update({"bp.pid_ns": pid_namespace(), "bp.boot_id": boot_id()})
    runs["killed"] = client.create_run(digits, run_name="killed", tags=owner).info.run_id
    return folder / "mlflow.db", runs


@pytest.fixture
def store(tmp_path, made_store):
    """The store above, as the embedded store of the home tmp_path."""
    made, runs = made_store
    shutil.copyfile(made, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.set_tag(runs["killed"], "bp.pid", str(dead_pid()))  # dead now, whatever ran since the store was made
    return {"uri": uri, "client": client, "runs": runs}


def test_uri_is_the_homes_store_unless_mlflow_tracking_uri_says_otherwise(tmp_path):
    assert bp_runs(tmp_path, "uri").stdout.strip() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    other = bp_runs(tmp_path, "uri", MLFLOW_TRACKING_URI="http://127.0.0.1:5999")
    assert other.stdout.strip() == "http://127.0.0.1:5999"
    assert not (tmp_path / "mlflow.db").exists()


def test_list_shows_the_newest_runs_first_with_their_headline_metric(tmp_path, store):
    result = bp_runs(tmp_path, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "started", "status", "experiment", "name", "metric"]
    names = [line.split()[5] for line in lines[1:4]]
    assert names == ["killed", "second", "first"]  # newest first
    assert "test/rmse 2.5000" in lines[2] and "iris" in lines[2] and "FINISHED" in lines[2]
    assert "test/acc 0.9100" in lines[3]
    assert lines[-1] == f"3 run(s) in {store['uri']}"


@pytest.mark.parametrize(
    ("args", "names"),
    [(["--experiment", "iris"], ["second"]), (["--status", "RUNNING"], ["killed"]), (["-n", "1"], ["killed"])],
)
def test_list_filters(tmp_path, store, args, names):
    result = bp_runs(tmp_path, "list", *args)
    assert result.returncode == 0, result.stderr
    assert [line.split()[5] for line in result.stdout.splitlines()[1:-1]] == names


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["list", "--experiment", "nope"], "no experiment named 'nope'"),
     (["list", "-n", "0"], "--max must be at least 1"),
     (["list", "--status", "DONE"], "invalid choice: 'DONE'"),
     (["bogus"], "invalid choice: 'bogus'")],
)  # fmt: skip
def test_bad_arguments_are_a_usage_error(tmp_path, store, args, needle):
    result = bp_runs(tmp_path, *args)
    assert result.returncode == 2 and needle in result.stderr, result.stderr


def test_no_store_is_said_and_never_created(tmp_path):
    for action in ("list", "stale"):
        result = bp_runs(tmp_path / "home", action)
        assert result.returncode == 0 and "no store at" in result.stdout
    assert not (tmp_path / "home").exists()


def test_stale_lists_a_dead_owners_run_and_closes_it_only_when_asked(tmp_path, store):
    killed = store["runs"]["killed"]
    listed = bp_runs(tmp_path, "stale")
    assert listed.returncode == 0, listed.stderr
    assert killed in listed.stdout and "close with --close" in listed.stdout
    assert store["client"].get_run(killed).info.status == "RUNNING"
    closed = bp_runs(tmp_path, "stale", "--close")
    assert closed.returncode == 0 and "closed KILLED" in closed.stdout
    run = store["client"].get_run(killed)
    assert run.info.status == "KILLED" and "bp.closed_as_stale" in run.data.tags
    # the older spelling is the same command
    again = subprocess.run([str(BIN / "bp-train"), "--stale-runs"], capture_output=True, text=True,
                           env=clean_env(BP_SERVICE_HOME=str(tmp_path)))  # fmt: skip
    assert again.returncode == 0 and again.stdout.strip().endswith(
        "0 RUNNING run(s) in " + store["uri"] + "; 0 closed; 0 cannot tell"
    )


def test_stale_close_keeps_a_continued_finished_run_finished_as_it_was(tmp_path, store):
    """A FINISHED run continued (ckpt_path) by a process killed with -9: its record goes back to FINISHED at the
    end time it had, the continuation's outcome a tag, as the job itself would have closed it."""
    client, first = store["client"], store["runs"]["first"]
    ended = client.get_run(first).info.end_time
    owner = {"bp.host": socket.gethostname(), "bp.pid": str(dead_pid()), "bp.pid_ns": pid_namespace()}
    for key, value in {**owner, "bp.boot_id": boot_id(), "bp.finished_before": str(ended)}.items():
        client.set_tag(first, key, value)
    client.update_run(first, status="RUNNING")
    closed = bp_runs(tmp_path, "stale", "--close")
    assert closed.returncode == 0 and f"{first}" in closed.stdout and "back to FINISHED, as it was" in closed.stdout
    run = client.get_run(first)
    assert (run.info.status, run.info.end_time) == ("FINISHED", ended)
    assert run.data.tags["bp.resume_status"] == "KILLED" and "bp.closed_as_stale" in run.data.tags
