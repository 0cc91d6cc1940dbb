"""MLflow tracking: real stores (SQLite files, a real `mlflow server`), read back through MLflow's own client."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from conftest import clean_env, free_port
from mlflow import MlflowClient

from bp_service.bundle import load_bundle, net_from_bundle, predict_frame
from bp_service.training.recipe import train

SHORT = ["data=iris", "trainer.max_epochs=3"]


def _only_run(uri: str, experiment: str = "iris"):  # experiment=auto: the data's name
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


@pytest.fixture
def tracked_run(compose_cfg, tmp_path):
    """One short classification run recorded in tmp_path/mlflow.db (the embedded default)."""
    cfg = compose_cfg(*SHORT, "model.net.hidden=[8]")
    result = train(cfg)
    return cfg, result, f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_run_records_params_metrics_tags_and_artifacts(tracked_run, tmp_path):
    cfg, result, uri = tracked_run
    assert result["tracking_uri"] == uri
    client, run = _only_run(uri)
    assert run.info.run_id == result["run_id"]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["model.net.hidden"] == "[8]"
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert params["data.name"] == "iris"
    assert params["trainer.max_epochs"] == "3"

    metrics = run.data.metrics
    for key in ("train/loss", "train/loss_step", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert key in metrics, key
    assert [k for k in metrics if k.startswith("lr-")], metrics  # the learning rate, named by its optimizer
    assert metrics["test/acc"] == pytest.approx(result["metrics"]["test/acc"])
    epochs = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(epochs) == 3
    # Every curve on one clock, the optimizer step, though a Lightning step runs a whole epoch of iris's 7 batches
    # (data.steps_per_execution=auto): each epoch's validation at the step its train/loss is recorded at.
    train_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert [e.step for e in epochs] == train_steps == [7, 14, 21]
    lr = next(k for k in metrics if k.startswith("lr-"))
    assert [m.step for m in client.get_metric_history(run.info.run_id, lr)] == [0, 7, 14]  # at each epoch's start
    # the tested checkpoint's score under its own name: val/acc is the last epoch's
    assert metrics["best/val/acc"] == pytest.approx(result["best_score"]) == pytest.approx(max(e.value for e in epochs))

    tags = run.data.tags
    assert tags["version.torch"] == torch.__version__
    assert tags["version.bp_service"]
    assert tags["version.lightning"]
    assert tags["device"] == "cpu"
    assert "data=iris" in tags["hydra.overrides"]
    assert tags["mlflow.runName"].startswith("train ") and "data=iris" in tags["mlflow.runName"]
    assert tags["bp.output_dir"] == cfg.paths.output_dir
    assert not [k for k in params if k.startswith("paths.")]  # where a run writes is a tag, not a param

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "gradcheck.json",
        "curves.png",
        "confusion_matrix.png",
        "checkpoint.json",
        "checkpoints",
    } <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "gradcheck.json", str(tmp_path / "dl")))
    report = json.loads(local.read_text())
    assert report["passed"] is True
    assert [e["layer"] for e in report["layers"]] == ["layers.0", "layers.1"]  # each through MLP.cost
    assert all(e["max_abs_error"] < 1e-6 for e in report["layers"])
    png = Path(client.download_artifacts(run.info.run_id, "curves.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Artifacts live beside the store, at an absolute path, whatever the working directory was.
    assert client.get_experiment(run.info.experiment_id).artifact_location.startswith(
        (tmp_path / "mlartifacts").as_uri()
    )


# bp-train as a user starts it, but for a last line saying whether MLflow was loaded in its own process.
NO_MLFLOW_PROBE = """
import sys
from bp_service.cli import bp_train
sys.argv = ["bp-train", *sys.argv[1:]]
try:
    bp_train()
finally:
    print("MLFLOW LOADED", "mlflow" in sys.modules, flush=True)
"""


def test_bp_train_writes_its_run_from_its_tracking_process(tmp_path):
    """The command's run is written by its tracking process, and MLflow never loads beside the training: the same
    record (params, every curve at the optimizer step, tags naming the training process, pictures, the model) as
    a run recorded in one process (above)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_MLFLOW_PROBE, *SHORT, "trainer=cpu", "model.net.hidden=[8]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(BP_SERVICE_HOME=str(tmp_path)),
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert stdout.strip().splitlines()[-1] == "MLFLOW LOADED False"
    assert "Traceback" not in stderr and "warning" not in stderr.lower(), stderr[-2000:]
    client, run = _only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    assert run.info.run_id in stdout  # the summary names it
    assert run.data.params["model.net.hidden"] == "[8]" and run.data.params["data.name"] == "iris"
    assert run.data.tags["bp.pid"] == str(proc.pid)  # who holds the run: the training process
    assert run.data.tags["version.torch"] == torch.__version__
    train_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == train_steps == [7, 14, 21]
    assert {"test/acc", "best/val/acc"} <= run.data.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    pictures = {"curves.png", "confusion_matrix.png", "gradient_flow.png"}
    assert {"config.yaml", "gradcheck.json", "checkpoint.json", "checkpoints", *pictures} <= artifacts
    assert all(name in run.data.tags["mlflow.note.content"] for name in pictures)
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "model"
    files = {Path(a.path).name for a in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "input_example.json", "requirements.txt"} <= files
    # The model's own metrics (MLflow's Models tab) are the run's last ones, test and best validation included
    linked = {m.key: m for m in model.metrics}
    assert {"test/acc", "test/loss", "best/val/acc", "val/acc", "train/loss"} <= linked.keys()
    assert {m.step for m in linked.values()} == {21}
    assert linked["test/acc"].value == pytest.approx(run.data.metrics["test/acc"])


@pytest.mark.slow
def test_pictures_are_whole_files_and_leave_no_temporary_ones(tracked_run):
    """Pictures are written to a temporary name and renamed: each is a complete PNG, and nothing else is left."""
    _, result, uri = tracked_run
    run = MlflowClient(uri).get_run(result["run_id"])
    folder = Path(run.info.artifact_uri.removeprefix("file://"))
    pictures = sorted(folder.glob("*.png"))
    assert {p.name for p in pictures} >= {"curves.png", "confusion_matrix.png", "gradient_flow.png"}
    for png in pictures:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", png.name
    assert not [p.name for p in folder.rglob(".*")]


USERS_LAYOUT = [{}, {"figure.autolayout": True}, {"figure.constrained_layout.use": True}]


@pytest.mark.parametrize("picture", ["curves", "gradient_flow", "confusion_matrix"])
@pytest.mark.parametrize("matplotlibrc", USERS_LAYOUT, ids=["default", "autolayout", "constrained"])
def test_a_picture_is_laid_out_once_and_drawn_once_when_saved(picture, matplotlibrc, monkeypatch):
    """tight_layout's positions are applied, and savefig then draws the figure once: no second, pixel-less pass
    for a layout engine left behind (a fifth of a picture's time), whatever engine a user's matplotlibrc turns on."""
    import io

    import matplotlib
    from matplotlib.figure import Figure

    from bp_service.training import reports

    rng = np.random.default_rng(0)
    for key, value in matplotlibrc.items():
        monkeypatch.setitem(matplotlib.rcParams, key, value)
    fig = {
        "curves": lambda: reports.curves_figure(
            {key: [(step, float(v)) for step, v in enumerate(rng.random(30))] for key in ("train/loss", "val/loss")}
        ),
        "gradient_flow": lambda: reports.gradient_flow_figure(list(range(30)), {"|dC/dW_l|": rng.random((2, 30))}),
        "confusion_matrix": lambda: reports.confusion_figure(rng.integers(0, 3, 40), rng.integers(0, 3, 40), "abc"),
    }[picture]()
    assert fig.get_layout_engine() is None
    assert fig.subplotpars.left != matplotlib.rcParams["figure.subplot.left"]  # tight_layout moved the axes
    draws = []
    real_draw = Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: draws.append(renderer) or real_draw(self, renderer))
    fig.savefig(io.BytesIO(), format="png")
    assert len(draws) == 1


def test_pictures_drawn_apart_report_what_failed_and_keep_what_was_written(compose_cfg, tmp_path):
    """The forked drawer: a picture that cannot be drawn fails the call with its name, after the pictures before
    it were written whole; none is left half-written and the run's page names only those written."""
    from matplotlib.figure import Figure

    from bp_service.training.tracking import Job
    from bp_service.training.tracking.dashboard import NOTE_TAG
    from bp_service.training.tracking.run import MLflowTracker, local_artifact_dir

    cfg = compose_cfg(*SHORT)
    tracker = MLflowTracker(cfg.tracking, cfg.paths, Job("train", "iris", [], "cpu"))

    def broken() -> Figure:
        raise ValueError("no data to draw")

    wait = tracker.log_figures({"fine.png": lambda: Figure(figsize=(2, 2)), "broken.png": broken})
    with pytest.raises(RuntimeError, match=r"drawing broken\.png: ValueError: no data to draw"):
        wait()
    tracker.end("FINISHED")
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    folder = local_artifact_dir(run.info.artifact_uri)
    assert sorted(p.name for p in folder.iterdir()) == ["fine.png"]
    assert (folder / "fine.png").read_bytes()[-8:-4] == b"IEND"
    assert "fine.png" in run.data.tags[NOTE_TAG] and "broken.png" not in run.data.tags[NOTE_TAG]


def test_metrics_not_yet_written_travel_in_a_checkpoint_and_come_back_whole(tmp_path):
    """The rows a checkpoint carries (keys in one string, numbers in one tensor) load with torch.load(weights_only)
    and come back exactly, NaN and large steps included; a checkpoint written before, with a list per row, too."""
    from bp_service.training.tracking.logger import checkpoint_rows, rows_of

    rows = [("val/loss", 0.1, 1796499963754, 0), ("val/acc", float("nan"), 1796499963755, 2**40)]
    rows += [(f"train/grad_norm/W{i}", i / 3, 1796499963756 + i, i) for i in range(1000)]
    torch.save({"metrics": checkpoint_rows(rows), "none": checkpoint_rows([])}, tmp_path / "state.ckpt")
    saved = torch.load(tmp_path / "state.ckpt", weights_only=True)
    back = rows_of(saved["metrics"])
    assert back[0] == rows[0] and back[2:] == rows[2:]
    assert back[1][0] == "val/acc" and np.isnan(back[1][1]) and back[1][2:] == (1796499963755, 2**40)
    assert all(type(stamp) is int and type(step) is int for _, _, stamp, step in back)
    assert rows_of(saved["none"]) == []
    assert rows_of(checkpoint_rows([("", 1.0, 5, 7)])) == [("", 1.0, 5, 7)]  # a key of no allowed character
    assert rows_of([["val/loss", 0.1, 1796499963754, 0]]) == [rows[0]]


@pytest.mark.parametrize(
    "crafted",
    [
        {"keys": "a", "numbers": torch.zeros(1, 3, dtype=torch.float64).expand(10**9, 3)},  # 24 bytes stored
        {"keys": "a\nb", "numbers": torch.zeros(1, 3, dtype=torch.float64)},
        {"keys": "a", "numbers": torch.zeros(1, 3)},
        {"keys": ["a"], "numbers": torch.zeros(1, 3, dtype=torch.float64)},
        [["val/loss", "not a number", 1796499963754, 0]],  # the list per row of checkpoints written before
    ],
    ids=["expanded", "keys_count", "float32", "keys_list", "old_form"],
)
def test_crafted_checkpoint_rows_are_refused_before_any_is_read(tmp_path, crafted):
    """A checkpoint is hostile until checked: rows that are not what bp-train writes are refused in one line, and
    an expand() view declaring a billion rows in 24 bytes is never read out."""
    from bp_service.training.tracking.logger import rows_of

    torch.save({"metrics": crafted}, tmp_path / "crafted.ckpt")
    saved = torch.load(tmp_path / "crafted.ckpt", weights_only=True)
    with pytest.raises(ValueError, match=r"callbacks\.PendingMetrics\.metrics .* refused"):
        rows_of(saved["metrics"])


def test_the_gradient_flow_history_travels_in_a_checkpoint_and_crafted_ones_are_refused(tmp_path):
    """The gradient-flow picture's history, a tensor per metric in checkpoints, comes back exactly (a checkpoint
    written before, with a list per epoch, too); what is not (epoch, value) pairs stored whole is refused."""
    from bp_service.training.callbacks import GradientFlow

    flow = GradientFlow()
    flow.history = {"train/grad_norm/W1": [(0, 0.5), (1, float("nan"))], "train/grad_norm/delta1": []}
    torch.save(flow.state_dict(), tmp_path / "flow.ckpt")
    back = GradientFlow()
    back.load_state_dict(torch.load(tmp_path / "flow.ckpt", weights_only=True))
    assert back.history.keys() == flow.history.keys() and back.history["train/grad_norm/delta1"] == []
    (e0, v0), (e1, v1) = back.history["train/grad_norm/W1"]
    assert (e0, v0, e1) == (0, 0.5, 1) and np.isnan(v1) and type(e1) is int
    older = GradientFlow()
    older.load_state_dict({"history": {"train/grad_norm/W1": [[0, 0.5], [1, 0.25]]}})
    assert older.history == {"train/grad_norm/W1": [(0, 0.5), (1, 0.25)]}
    for crafted in (
        torch.zeros(1, 2, dtype=torch.float64).expand(10**9, 2),  # a billion epochs in 16 bytes
        torch.zeros(3, 3, dtype=torch.float64),
        [[0, "not a number"]],
    ):
        torch.save({"history": {"train/grad_norm/W1": crafted}}, tmp_path / "crafted.ckpt")
        with pytest.raises(ValueError, match=r"callbacks\.GradientFlow\.history\['train/grad_norm/W1'\] .* refused"):
            GradientFlow().load_state_dict(torch.load(tmp_path / "crafted.ckpt", weights_only=True))


@pytest.mark.slow  # make test has the same check on digits: test_predict's MLflow loader, in a fresh process
def test_logged_model_predicts_raw_features_in_a_fresh_process(tracked_run, tmp_path):
    _, result, uri = tracked_run
    from sklearn.datasets import load_iris

    iris = load_iris(as_frame=True).frame.drop(columns="target").iloc[::7]
    iris.to_csv(tmp_path / "rows.csv", index=False)
    script = (
        "import sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pyfunc.load_model('runs:/{result['run_id']}/model')\n"
        f"out = model.predict(pd.read_csv({str(tmp_path / 'rows.csv')!r}))\n"
        "out.to_csv(sys.stdout, index=False)\n"
    )
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = pd.read_csv(pd.io.common.StringIO(proc.stdout))

    bundle = load_bundle(result["best_checkpoint"])
    expected = predict_frame(net_from_bundle(bundle), bundle["meta"], iris.to_numpy())
    assert list(served.columns) == ["prediction", "proba_0", "proba_1", "proba_2"]
    assert served["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(
        served.filter(like="proba").to_numpy(), expected.filter(like="proba").to_numpy(), rtol=1e-6
    )


def test_csv_runs_have_names_of_their_own_in_the_experiment_of_their_file(compose_cfg, tmp_path):
    from sklearn.datasets import load_iris

    deep = tmp_path / ("a-long-folder-name-" * 12) / "flowers"
    deep.mkdir(parents=True)
    load_iris(as_frame=True).frame.to_csv(deep / "flowers.csv", index=False)
    overrides = ["data=csv", f"data.path={deep / 'flowers.csv'}", "data.target=target", "trainer.max_epochs=1"]
    for stamp in ("2026-01-01_10-00-00", "2026-01-01_10-00-00_1"):  # two runs started in the same second
        train(compose_cfg(*overrides, "tracking.log_model=false", run_dir=f"outputs/train/runs/{stamp}"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flowers").experiment_id])  # the file's stem
    names = sorted(r.info.run_name for r in runs)
    assert len(set(names)) == 2, names
    for name, stamp in zip(names, ("2026-01-01_10-00-00", "2026-01-01_10-00-00_1"), strict=True):
        # the task, the overrides with the path cut to its file name, the run folder's stamp
        assert name.startswith("train ") and name.endswith(f" @ {stamp}"), name
        assert " data=csv data.path=flowers.csv data.target=target " in name and "a-long-folder" not in name, name
    assert {r.data.params["tracking.experiment"] for r in runs} == {"flowers"}  # the params say where it went
    # tracking.experiment still wins
    train(compose_cfg(*overrides, "tracking.log_model=false", "tracking.experiment=mine", run_dir="c"))
    assert len(client.search_runs([client.get_experiment_by_name("mine").experiment_id])) == 1


def test_environment_uri_wins_over_config(compose_cfg, tmp_path, monkeypatch):
    env_uri = f"sqlite:///{tmp_path / 'from_env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    cfg = compose_cfg(*SHORT, f"tracking.uri=sqlite:///{tmp_path / 'from_config.db'}", "tracking.log_model=false")
    result = train(cfg)
    assert result["tracking_uri"] == env_uri
    _only_run(env_uri)
    assert not (tmp_path / "from_config.db").exists()


def test_env_values_are_not_logged_as_params(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("BP_TEST_SECRET", "hunter2")
    cfg = compose_cfg(*SHORT, "tracking.run_name=${oc.env:BP_TEST_SECRET}", "tracking.log_model=false")
    train(cfg)
    _, run = _only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "tracking.run_name" not in run.data.params
    assert "hunter2" not in json.dumps(run.data.params)
    assert run.data.tags["mlflow.runName"] == "hunter2"  # used, just not recorded as a param
    config = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        run.info.run_id, "config.yaml", str(tmp_path / "dl")
    )
    text = Path(config).read_text()
    assert "hunter2" not in text and "run_name: '<from the environment: not recorded>'" in text


def test_register_model_creates_a_version(compose_cfg, tmp_path):
    cfg = compose_cfg(*SHORT, "tracking.register_model=bp-iris")
    train(cfg)
    versions = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_model_versions("name='bp-iris'")
    assert [int(v.version) for v in versions] == [1]


def test_a_failing_run_ends_FAILED_with_one_line(cli, tmp_path):
    result = cli(
        "bp-train",
        "data=diabetes",
        "trainer=cpu",
        "optimizer=sgd",
        "optimizer.lr=1e6",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "non-finite" in result.stderr.strip().splitlines()[-1]
    _, run = _only_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "diabetes")
    assert run.info.status == "FAILED"


def test_unreachable_server_fails_fast_before_training(cli, tmp_path):
    """Through a proxy that does not answer: bp-train's own check before the imports leaves proxies to MLflow's, in
    the tracking process (a refused connection without a proxy is test_preflight's)."""
    uri, proxy = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    env = {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    result = cli("bp-train", "data=iris", "trainer=cpu", f"tracking.uri={uri}", env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bp-train: error: tracking server") and uri in last and "unreachable" in last
    assert "refused the connection" not in last  # MLflow's own words: its check, not bp-train's
    assert not list(tmp_path.glob("outputs/*/runs/*/checkpoints/*.ckpt")), "nothing may train before tracking is up"
    assert time.monotonic() - started < 60  # fails fast: not MLflow's minutes of retries


def test_unreachable_server_not_required_trains_locally(cli, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    result = cli(
        "bp-train", *SHORT, "trainer=cpu", f"tracking.uri={uri}", "tracking.required=false", "tracking.log_model=false"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _, run = _only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"


# --------------------------------------------------------------------------- a real tracking server
@pytest.mark.slow
def test_training_against_a_real_server_reads_back_over_rest(cli, mlflow_server):
    result = cli("bp-train", *SHORT, "trainer=cpu", f"tracking.uri={mlflow_server}", "tracking.experiment=served")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = next(line.split()[2] for line in result.stdout.splitlines() if "MLflow run" in line)
    run = requests.get(f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["data.name"] == "iris"
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"train/loss", "val/acc", "test/acc"} <= metrics
    listed = requests.get(
        f"{mlflow_server}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id}, timeout=10
    ).json()
    assert "gradcheck.json" in {f["path"] for f in listed["files"]}


@pytest.mark.slow
def test_sweep_groups_jobs_under_one_parent_run(cli, tmp_path):
    result = cli(
        "bp-train",
        "-m",
        "data=iris",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "optimizer.lr=0.1,0.5",
        "tracking.log_model=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("iris").experiment_id])
    parents = [r for r in runs if r.data.tags.get("bp.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.1", "0.5"]
    assert all(r.info.status == "FINISHED" for r in runs)

    # The summary: the parent run, each job's best monitored value with its MLflow run, the best job, and the
    # best value recorded on the parent. Each under one name, best/val/acc, in the table and in every run: val/acc
    # itself is the last epoch's in MLflow.
    parent = parents[0]
    out = result.stdout[result.stdout.index("bp-train: sweep of 2 job(s) finished") :]
    assert f"MLflow parent run {parent.info.run_id}  (experiment 'iris')" in out
    by_lr = {c.data.params["optimizer.lr"]: c for c in children}
    scores = {}
    for lr, child in by_lr.items():
        (line,) = [row for row in out.splitlines() if child.info.run_id in row]
        assert line.split()[1] == "best/val/acc" and line.rstrip().endswith(f"optimizer.lr={lr}"), line
        scores[lr] = float(line.split()[2])
        assert child.data.metrics["best/val/acc"] == pytest.approx(scores[lr], abs=5e-5)
        history = [m.value for m in client.get_metric_history(child.info.run_id, "val/acc")]
        assert len(history) == 2 and scores[lr] == pytest.approx(max(history), abs=5e-5)
    best_lr = max(scores, key=scores.get)
    assert parent.data.metrics["best/val/acc"] == pytest.approx(scores[best_lr], abs=5e-5)
    assert parent.data.tags["bp.best_run"] == by_lr[best_lr].info.run_id
    assert f"best: job {parent.data.tags['bp.best_job'].split(':')[0]}, best/val/acc" in out


def test_an_untracked_sweep_ends_with_its_summary(cli, tmp_path):
    common = ["data=xor", "trainer=cpu", "trainer.max_epochs=2", "tracking.enabled=false", "model.net.hidden=[4]"]
    result = cli("bp-train", "-m", *common, "seed=1,2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout[result.stdout.index("bp-train: sweep of 2 job(s) finished") :].splitlines()
    assert not [line for line in out if "MLflow" in line and "parent" in line]
    rows = {line.split()[-1]: line.split() for line in out if line.strip().startswith(("0 ", "1 "))}
    assert set(rows) == {"seed=1", "seed=2"}
    assert all(row[1] == "best/val/acc" and row[3] == "-" for row in rows.values())  # no MLflow run untracked
    scores = {seed: float(row[2]) for seed, row in rows.items()}
    best = max(scores, key=scores.get)
    assert out[-1].strip().startswith(f"best: job {rows[best][0]}, best/val/acc {scores[best]:.4f}"), out
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_resume_continues_the_same_mlflow_run(cli, tmp_path):
    common = [*SHORT[:1], "trainer=cpu", "tracking.log_model=false"]
    first = cli("bp-train", *common, "trainer.max_epochs=2")
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli("bp-train", *common, "trainer.max_epochs=4", "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-2000:]
    client, run = _only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    steps = [m.step for m in history]
    assert len(steps) == 4 and len(set(steps)) == 4, steps


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(tracked_run, tmp_path):
    _, result, uri = tracked_run
    port = free_port()
    env = clean_env(MLFLOW_TRACKING_URI=uri)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # mlflow shells out to uvicorn
    command = ["mlflow", "models", "serve", "-m", f"runs:/{result['run_id']}/model", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:  # its own process group, so that its uvicorn workers stop with it
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=tmp_path, start_new_session=True
        )
    try:
        rows = {
            "dataframe_split": {
                "columns": ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"],
                "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]],
            }
        }
        deadline = time.monotonic() + 120
        while True:
            try:
                response = requests.post(f"http://127.0.0.1:{port}/invocations", json=rows, timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(1)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["prediction"] for p in predictions] == [0, 2]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_failing_sweep_job_fails_the_sweep_but_not_the_other_jobs(cli, tmp_path):
    result = cli("bp-train", "-m", "data=csv,iris", "trainer=cpu", "trainer.max_epochs=1", "tracking.log_model=false")
    assert result.returncode == 1
    assert "bp-train: error: job 0: data.path is required for data=csv" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # A sweep over the data compares datasets: its runs share the experiment bp-service.
    runs = client.search_runs([client.get_experiment_by_name("bp-service").experiment_id])
    statuses = {r.data.tags.get("bp.role", r.data.params.get("data.name")): r.info.status for r in runs}
    assert statuses == {"sweep": "FAILED", "iris": "FINISHED"}


def test_the_tracking_process_prepares_a_store_that_exists_and_creates_none(tmp_path):
    """The opening steps a tracking process takes ahead of the run read an existing embedded store and never
    create or repair one: that is left to the run's opening, under the store's lock."""
    from bp_service.training.store import prepare_store
    from bp_service.training.tracking.run import opening_steps

    missing = tmp_path / "new" / "mlflow.db"
    for step in opening_steps(f"sqlite:///{missing}"):
        step()
    assert not missing.exists() and not missing.parent.exists()
    half_made = tmp_path / "half" / "mlflow.db"
    half_made.parent.mkdir()
    half_made.write_bytes(b"not a database")
    for step in opening_steps(f"sqlite:///{half_made}"):
        step()
    assert half_made.read_bytes() == b"not a database"
    whole = tmp_path / "whole" / "mlflow.db"
    prepare_store(f"sqlite:///{whole}", tmp_path / "whole")
    before = whole.stat().st_mtime_ns
    for step in opening_steps(f"sqlite:///{whole}"):
        step()
    assert whole.stat().st_mtime_ns == before and MlflowClient(f"sqlite:///{whole}").search_experiments()
