"""Faults provoked for real: kill -9, SIGTERM, a tracking server that dies, corrupt and hostile files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import MlflowServer, clean_env
from mlflow import MlflowClient

# ~900 optimizer steps per epoch: long enough to be killed mid-epoch, short enough for CI.
LONG = ["data=blog", "data.n_samples=20000", "data.batch_size=16", "optimizer=sgd_momentum", "trainer=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]  # fmt: skip


def _popen(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = clean_env(BP_SERVICE_HOME=str(tmp_path), **(env or {}))
    exe = Path(sys.executable).parent / "bp-train"
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def _wait_for(predicate, timeout: float = 180, what: str = "condition", proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (rc={proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def _checkpoint(tmp_path: Path, task: str, name: str = "last.ckpt") -> Path | None:
    found = sorted((tmp_path / "outputs" / task).glob(f"runs/*/checkpoints/{name}"))
    return found[-1] if found else None


def _step_of(path: Path) -> int:
    for _ in range(50):  # the file is replaced atomically, but may be replaced while we read it
        try:
            return torch.load(path, weights_only=True)["global_step"]
        except (FileNotFoundError, RuntimeError, EOFError):
            time.sleep(0.01)
    raise AssertionError(f"could not read {path}")


def _assert_same_training_state(a: Path, b: Path) -> None:
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"] and ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    assert ca["optimizer_states"], "no optimizer state to compare"
    for sa, sb in zip(ca["optimizer_states"], cb["optimizer_states"], strict=True):
        assert sa["state"] and sa["state"].keys() == sb["state"].keys()  # momentum buffers, one per parameter
        for pid, state in sa["state"].items():
            assert state.keys() == sb["state"][pid].keys(), pid
            for name, tensor in state.items():
                assert torch.equal(tensor, sb["state"][pid][name]), (pid, name)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, cli, where):
    common = [*LONG, "trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=50"]
    straight = cli("bp-train", *common, "task_name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = _popen(tmp_path, *common, "task_name=killed")
    if where == "mid_epoch":
        _wait_for(lambda: _checkpoint(tmp_path, "killed"), what="a step checkpoint", proc=proc)
    else:  # the epoch-end checkpoint: the best-so-far file appears when epoch 0 is validated
        _wait_for(lambda: _checkpoint(tmp_path, "killed", "best-*.ckpt"), what="an epoch checkpoint", proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _step_of(_checkpoint(tmp_path, "killed"))
    assert 0 < killed_at < 3 * 875, killed_at

    resumed = cli("bp-train", *common, "task_name=killed", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_training_state(_checkpoint(tmp_path, "straight"), _checkpoint(tmp_path, "killed"))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("blog").experiment_id])
    killed_run = next(r for r in runs if "task_name=killed" in r.data.tags["hydra.overrides"])
    assert killed_run.info.status == "FINISHED"
    for key in ("val/acc", "train/loss"):
        steps = [m.step for m in client.get_metric_history(killed_run.info.run_id, key)]
        assert len(steps) == 3 and len(set(steps)) == 3, (key, steps)  # every epoch once
    straight_run = next(r for r in runs if "task_name=straight" in r.data.tags["hydra.overrides"])
    expected = [m.value for m in client.get_metric_history(straight_run.info.run_id, "val/acc")]
    assert [m.value for m in client.get_metric_history(killed_run.info.run_id, "val/acc")] == expected


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_ends_KILLED_and_exits_143(tmp_path):
    proc = _popen(
        tmp_path, *LONG, "trainer.max_epochs=50", "callbacks.last_checkpoint.every_n_train_steps=200", "task_name=term"
    )
    _wait_for(lambda: _checkpoint(tmp_path, "term"), what="a first checkpoint", proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr
    last = _checkpoint(tmp_path, "term")
    assert _step_of(last) > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("blog").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_tracking_server_lost_mid_run_training_completes(tmp_path):
    server = MlflowServer(tmp_path / "server")
    try:
        proc = _popen(tmp_path, *LONG, "trainer.max_epochs=3", f"tracking.uri={server.url}", "task_name=lost")
        _wait_for(lambda: _checkpoint(tmp_path, "lost", "best-*.ckpt"), what="the first epoch", proc=proc)
    finally:
        server.stop()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "MLflow tracking was lost mid-run" in stdout
    assert _step_of(_checkpoint(tmp_path, "lost")) == 3 * 875
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=2)


def test_truncated_checkpoint_is_named(tmp_path, cli, compose_cfg):
    from bp_service.training.recipe import train

    common = ["data=iris", "trainer=cpu", "trainer.max_epochs=1", "tracking.enabled=false"]
    last = Path(train(compose_cfg(*common, run_dir="earlier"))["last_checkpoint"])  # a real one, made here
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = cli("bp-train", *common, f"ckpt_path={last}")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("bp-train: error: ") and str(last) in line and "Traceback" not in result.stderr


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, cli):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    script = (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'state_dict': Evil(), 'bp_service': {{}}}}, {str(evil)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert evil.is_file() and not marker.exists()
    result = cli("bp-train", "data=iris", "trainer=cpu", f"ckpt_path={evil}", "tracking.enabled=false")
    assert result.returncode == 1
    assert str(evil) in result.stderr.strip().splitlines()[-1]
    (tmp_path / "rows.csv").write_text("x1,x2,x3\n1,2,3\n")
    predicted = cli("bp-predict", f"model={evil}", f"input={tmp_path / 'rows.csv'}", f"output={tmp_path / 'out.csv'}")
    assert predicted.returncode == 2
    assert f"{evil}: refused" in predicted.stderr
    assert not marker.exists(), "the pickle payload ran"


@pytest.mark.slow
def test_eight_parallel_runs_on_a_postgres_backed_server_lose_nothing(tmp_path, postgres):
    """8 bp-train processes at once against `mlflow server` on PostgreSQL: every run, param and metric arrives."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(postgres["uri"])
    database = f"bp_parallel_{os.getpid()}"
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{database}"')
    conn.close()
    backend = url.set(drivername="postgresql+psycopg2", database=database).render_as_string(hide_password=False)
    server = MlflowServer(tmp_path / "server", backend_uri=backend, extra=("--workers", "2"))
    try:
        common = [
            *("data=iris", "trainer=cpu", "trainer.max_epochs=3", "trainer.enable_progress_bar=false"),
            *(f"tracking.uri={server.url}", "tracking.experiment=parallel", "tracking.log_model=false"),
        ]
        procs = [_popen(tmp_path, *common, f"seed={i}", f"task_name=job{i}") for i in range(8)]
        outcomes = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
        assert all(rc == 0 for rc, _ in outcomes), [err[-1500:] for rc, err in outcomes if rc]
        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
        assert len(runs) == 8
        assert sorted(r.data.params["seed"] for r in runs) == [str(i) for i in range(8)]
        assert len({len(r.data.params) for r in runs}) == 1 and len(runs[0].data.params) > 40
        for run in runs:
            assert run.info.status == "FINISHED"
            assert {"train/loss", "val/loss", "val/acc", "test/loss", "test/acc"} <= run.data.metrics.keys()
            for key in ("train/loss", "val/acc"):
                assert len(client.get_metric_history(run.info.run_id, key)) == 3, (run.info.run_id, key)
    finally:
        server.stop()


# --------------------------------------------------------------------------- resumes never rewrite a finished run
def _only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("xor").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


@pytest.mark.slow
def test_resuming_another_network_or_other_data_is_refused_and_the_finished_run_is_untouched(tmp_path, cli):
    tiny = ["data=xor", "trainer=cpu", "trainer.max_epochs=1", "tracking.log_model=false", "model.net.hidden=[4]"]
    first = cli("bp-train", *tiny)
    assert first.returncode == 0, first.stderr[-2000:]
    _, before = _only_run(tmp_path)
    last = _checkpoint(tmp_path, "train")
    for change, needle in [("model.net.hidden=[8]", "a checkpoint of another network"), ("data=moons", "other data")]:
        result = cli("bp-train", *tiny, change, f"ckpt_path={last}", "trainer.max_epochs=2")
        assert result.returncode == 2, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"bp-train: error: {last}: ") and needle in line, line
    _, after = _only_run(tmp_path)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert after.data.metrics == before.data.metrics and "bp.resumed" not in after.data.tags


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9, then bp-runs stale --close", "kill -9, then continued"])
def test_a_finished_run_continued_then_stopped_keeps_its_finished_record(tmp_path, cli, stop):
    common = ["data=xor", "data.n_samples=20000", "data.batch_size=16", "trainer=cpu", "tracking.log_model=false",
              "callbacks.last_checkpoint.every_n_train_steps=50", "trainer.enable_progress_bar=false"]  # fmt: skip
    first = cli("bp-train", *common, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    _, before = _only_run(tmp_path)
    last = _checkpoint(tmp_path, "train")
    step = _step_of(last)
    proc = _popen(tmp_path, *common, "trainer.max_epochs=20", f"ckpt_path={last}")
    _wait_for(lambda: _step_of(last) > step, what="the continuation's first checkpoint", proc=proc)
    proc.send_signal(signal.SIGTERM if stop == "SIGTERM" else signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    if stop == "SIGTERM":
        assert proc.returncode == 143, stderr[-2000:]
    else:  # nothing of bp-train ran to close it: the record holds what the close needs
        assert proc.returncode == -signal.SIGKILL
        _, left = _only_run(tmp_path)
        assert left.info.status == "RUNNING" and left.data.tags["bp.finished_before"] == str(before.info.end_time)
        if stop.endswith("stale --close"):
            closed = cli("bp-runs", "stale", "--close")
            assert closed.returncode == 0 and "back to FINISHED, as it was" in closed.stdout, closed.stdout
        else:  # continued once more from the RUNNING record, and stopped: the same outcome
            step = _step_of(last)
            again = _popen(tmp_path, *common, "trainer.max_epochs=20", f"ckpt_path={last}")
            _wait_for(lambda: _step_of(last) > step, what="the second continuation's checkpoint", proc=again)
            again.send_signal(signal.SIGTERM)
            _, stderr = again.communicate(timeout=120)
            assert again.returncode == 143, stderr[-2000:]
    _, after = _only_run(tmp_path)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert after.data.tags["bp.resume_status"] == "KILLED" and after.data.tags["bp.resumed"] == "true"


# Loaded by bp-train's Python (PYTHONPATH): a SIGTERM to itself while Lightning sets up fit or test (BP_TERM_AT
# names which), before Lightning's own SIGTERM handler is installed.
TERM_IN_SET_UP = """
import os
import signal

import lightning.pytorch.trainer.call as call

set_up = call._call_setup_hook


def set_up_then_term(trainer):
    if trainer.state.fn.value == os.environ["BP_TERM_AT"]:  # "fit" or "test"
        os.kill(os.getpid(), signal.SIGTERM)
    return set_up(trainer)


call._call_setup_hook = set_up_then_term
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fit", "test"])
def test_a_sigterm_while_lightning_sets_up_stops_the_run_killed_143(tmp_path, stage):
    """Lightning installs its SIGTERM handler only once fit or test has set up; a SIGTERM before is not lost."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(TERM_IN_SET_UP)
    proc = _popen(tmp_path, "data=xor", "trainer=cpu", "trainer.max_epochs=3", "tracking.log_model=false",
                  env={"PYTHONPATH": str(inject), "BP_TERM_AT": stage})  # fmt: skip
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "bp-train: stopped by SIGTERM" in stderr.strip().splitlines()[-1] and "finished in" not in stdout
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"
    last = _checkpoint(tmp_path, "train")  # where a resume starts
    if stage == "fit":  # sent again to Lightning's handler at the first hook after the set-up: it stops at the
        assert torch.load(last, weights_only=True)["epoch"] <= 1  # first step's end (here a whole epoch), of 3
    assert last is not None


# Loaded by bp-train's Python: Ctrl-C to bp-train's whole process group (as a terminal sends it) just as the
# model's logging starts, while the pictures are drawn in processes of their own.
CTRL_C_WHILE_DRAWING = """
import os
import signal

import bp_service.training.artifacts as artifacts

log_model = artifacts.log_servable_model


def interrupt_then_log(*args, **kwargs):
    os.killpg(os.getpgid(0), signal.SIGINT)
    return log_model(*args, **kwargs)


artifacts.log_servable_model = interrupt_then_log
"""


@pytest.mark.slow
def test_ctrl_c_while_the_pictures_are_drawn_is_an_interrupt_not_a_drawing_error(tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(CTRL_C_WHILE_DRAWING)
    full_env = clean_env(BP_SERVICE_HOME=str(tmp_path), PYTHONPATH=str(inject))
    exe = Path(sys.executable).parent / "bp-train"
    proc = subprocess.run([str(exe), "data=xor", "trainer=cpu", "trainer.max_epochs=2"], capture_output=True,
                          text=True, env=full_env, start_new_session=True, timeout=300)  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "bp-train: interrupted" and "drawing" not in proc.stderr
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie no one has reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_the_tracking_process_killed_mid_run_loses_tracking_not_the_training(tmp_path):
    """bp-train's tracking process killed while the network trains: one warning, the training completes, and the
    run is closed from bp-train, not left RUNNING."""
    proc = _popen(tmp_path, *LONG, "trainer.max_epochs=2", "task_name=sidecar")
    _wait_for(lambda: _checkpoint(tmp_path, "sidecar", "best-*.ckpt"), what="the first epoch", proc=proc)
    (tracking,) = _children(proc.pid)  # the only child while it trains: no loader workers, no pictures yet
    os.kill(tracking, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert _step_of(_checkpoint(tmp_path, "sidecar")) == 2 * 875
    assert stderr.count("MLflow tracking lost, training goes on without it (the tracking process ended") == 1
    assert "MLflow tracking was lost mid-run" in stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("blog").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_epochs"] == "2"  # written before it died


@pytest.mark.slow
def test_bp_train_killed_takes_its_tracking_process_with_it(tmp_path):
    """kill -9 of bp-train kills its tracking process too, leaving the run as one process would (RUNNING, for
    `bp-runs stale --close`), not an orphan holding the store."""
    proc = _popen(tmp_path, *LONG, "trainer.max_epochs=2", "task_name=orphan")
    _wait_for(lambda: _checkpoint(tmp_path, "orphan"), what="a first checkpoint", proc=proc)
    (tracking,) = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait_for(lambda: _gone(tracking), timeout=30, what="the tracking process to exit")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("blog").experiment_id])
    assert run.info.status == "RUNNING" and run.data.tags["bp.pid"] == str(proc.pid)


# Loaded by bp-train's Python (PYTHONPATH): its first forked process, the tracking process, dies right after it
# created the run, before it could answer bp-train.
DIE_AFTER_CREATING_THE_RUN = """
import os

forks = []


def _in_child():
    if forks:  # a later fork (a picture): not the tracking process
        return
    import bp_service.training.tracking.writer as writer

    created = writer.RunWriter.__init__

    def create_then_die(self, *args, **kwargs):
        created(self, *args, **kwargs)
        os._exit(9)

    writer.RunWriter.__init__ = create_then_die


os.register_at_fork(after_in_parent=lambda: forks.append(1), after_in_child=_in_child)
"""


@pytest.mark.slow
def test_a_tracking_process_dead_before_it_answered_leaves_no_run_running(tmp_path):
    """The tracking process created the run and died before bp-train heard of it: bp-train records in a run of
    its own process, and closes the one it never heard of FAILED, saying where the job went on."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(DIE_AFTER_CREATING_THE_RUN)
    proc = _popen(tmp_path, "experiment=digits", "trainer.max_epochs=2", "task_name=abandoned",
                  env={"PYTHONPATH": str(inject)})  # fmt: skip
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    by_status = {run.info.status: run for run in runs}
    assert len(runs) == 2 and set(by_status) == {"FINISHED", "FAILED"}, [r.info.status for r in runs]
    kept, abandoned = by_status["FINISHED"], by_status["FAILED"]
    assert kept.info.run_id in stdout and "test/acc" in kept.data.metrics  # the job's record, as the summary says
    assert abandoned.data.tags["bp.pid"] == kept.data.tags["bp.pid"]
    assert abandoned.data.tags["bp.abandoned"].endswith(f"went on in run {kept.info.run_id}")


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_the_run_once_KILLED_and_130(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, the tracking process too: it leaves the signal to
    bp-train, which closes the run KILLED, says "interrupted" once, and exits 130 with both processes gone."""
    full_env = clean_env(BP_SERVICE_HOME=str(tmp_path))
    exe = Path(sys.executable).parent / "bp-train"
    proc = subprocess.Popen([str(exe), *LONG, "trainer.max_epochs=50", "task_name=ctrlc"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True)  # fmt: skip
    _wait_for(lambda: _checkpoint(tmp_path, "ctrlc"), what="a first checkpoint", proc=proc)
    (tracking,) = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "bp-train: interrupted" and stderr.count("interrupted") == 1
    assert "Traceback" not in stderr and "tracking lost" not in stderr
    _wait_for(lambda: _gone(tracking), timeout=30, what="the tracking process to exit")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("blog").experiment_id])
    assert run.info.status == "KILLED"
