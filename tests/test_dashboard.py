"""What MLflow's dashboard opens on: the runs list's saved view with the metrics, and a run's pictures on its
Overview page (bp_service/training/tracking/dashboard.py). Through the real bp-train, bp-runs and MLflow UI
server; the rendering itself was checked in headless Chromium (docs/dashboard-runs.png, dashboard-run.png)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import FAST, MlflowServer, clean_env

from bp_service.training.tracking.dashboard import NOTE_TAG, VIEW_KEY, VIEW_TAG, experiment_link, run_note, view_state

BIN = Path(sys.executable).parent
COLUMN = re.compile(r"^(metrics|params|attributes)\.`([^`]+)`$")  # MLflow's canonical column keys


def columns(tag_value: str) -> list[str]:
    """The columns of a saved view, as the UI decodes it: an envelope whose ``state`` is JSON."""
    envelope = json.loads(tag_value)
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["columnOrder"] == state["selectedColumns"]
    return state["selectedColumns"]


def test_the_view_lists_metrics_first_in_mlflows_column_keys():
    cols = columns(view_state())
    assert all(COLUMN.match(c) for c in cols), cols
    kinds = [COLUMN.match(c).group(1) for c in cols]
    assert kinds == sorted(kinds, key=["metrics", "params", "attributes"].index), "metrics come first"
    assert {"metrics.`test/acc`", "metrics.`test/rmse`", "metrics.`epoch`"} <= set(cols)


def test_links_are_relative_to_the_page_and_open_the_view():
    note = run_note("abc123", ["curves.png", "confusion_matrix.png"])
    targets = re.findall(r"\]\(([^)]+)\)", note)
    expected = [f"get-artifact?path={name}&run_uuid=abc123" for name in ("curves.png", "confusion_matrix.png")]
    assert targets == expected * 2  # the line of links, then the pictures
    link = experiment_link("http://127.0.0.1:5000", "7")
    assert link.startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    assert f"viewStateShareKey={VIEW_KEY}" in link and "workflowType=machine_learning" in link


def bp(command: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = clean_env(BP_SERVICE_HOME=str(home))
    return subprocess.run([str(BIN / command), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    proc = bp("bp-train", "data=iris", "trainer.max_epochs=3", *FAST, home=home)
    assert proc.returncode == 0, proc.stderr
    run_id = re.search(r"MLflow run\s+([0-9a-f]{32})", proc.stdout).group(1)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    return home, client, client.get_run(run_id)


@pytest.mark.slow
def test_a_run_gives_its_experiment_the_view_and_its_overview_the_pictures(tracked_run):
    _, client, run = tracked_run
    experiment = client.get_experiment(run.info.experiment_id)
    shown = {COLUMN.match(c).group(2) for c in columns(experiment.tags[VIEW_TAG]) if c.startswith("metrics.")}
    for metric in ("test/acc", "val/acc", "epoch"):  # columns this run fills
        assert metric in shown and metric in run.data.metrics, metric
    pictures = sorted(a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".png"))
    assert {"curves.png", "confusion_matrix.png"} <= set(pictures)
    linked = sorted(set(re.findall(r"get-artifact\?path=([^&]+)&run_uuid=" + run.info.run_id, run.data.tags[NOTE_TAG])))
    assert linked == pictures


@pytest.mark.slow
def test_bp_runs_dashboard_prints_the_links_and_keeps_a_users_own_view(tracked_run):
    home, client, run = tracked_run
    experiment_id = run.info.experiment_id
    client.delete_experiment_tag(experiment_id, VIEW_TAG)  # an experiment of an older bp-train
    proc = bp("bp-runs", "dashboard", home=home)
    assert proc.returncode == 0, proc.stderr
    assert f"iris {experiment_link('http://127.0.0.1:5000', experiment_id)}" in " ".join(proc.stdout.split())
    assert VIEW_TAG in client.get_experiment(experiment_id).tags  # given the view
    client.set_experiment_tag(experiment_id, VIEW_TAG, "a user's own")
    assert bp("bp-runs", "dashboard", home=home).returncode == 0
    assert client.get_experiment(experiment_id).tags[VIEW_TAG] == "a user's own"


@pytest.mark.slow
def test_the_overview_links_serve_the_pictures_from_a_real_mlflow_server(tracked_run, tmp_path):
    home, _, run = tracked_run
    server = MlflowServer(tmp_path / "server", backend_uri=f"sqlite:///{home / 'mlflow.db'}")
    try:
        for target in set(re.findall(r"\]\(([^)]+)\)", run.data.tags[NOTE_TAG])):
            reply = requests.get(f"{server.url}/{target}", timeout=30)  # as the browser resolves it on the page
            assert reply.status_code == 200 and reply.content.startswith(b"\x89PNG"), target
        experiment = requests.get(
            f"{server.url}/ajax-api/2.0/mlflow/experiments/get",
            params={"experiment_id": run.info.experiment_id},
            timeout=30,
        ).json()["experiment"]
        assert VIEW_TAG in {t["key"] for t in experiment["tags"]}  # what the UI reads for viewStateShareKey
    finally:
        server.stop()
