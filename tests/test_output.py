"""What a user sees in the terminal: a quiet run (bar, summary, real warnings only), the error on its own
line, the dashboard link, ``bp-train --help``, and a light ``make ui``."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import requests
from conftest import clean_env
from mlflow import MlflowClient

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# What a run must never print: library noise, bar redraws and the logger's version, a FLOPs count of 0.
NOISE = (
    "weights_only",
    "LeafSpec",
    "smaller than the logging interval",
    "Downloading artifacts",
    "v_num",
    "Flops",
    "FLOPs",
    "Warning",
)


def in_a_terminal(args: list[str], env: dict[str, str], cols: int = 120, timeout: float = 300) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal of ``cols`` columns: (exit status, output)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen(args, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


# --------------------------------------------------------------------------- a run whose stdout is a file
@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """One tiny tracked run with the default callbacks, its output captured as `make train > file` does."""
    home = tmp_path_factory.mktemp("home")
    # iris: 7 batches an epoch, under log_every_n_steps (Lightning's "smaller than the logging interval")
    args = [str(BIN / "bp-train"), "data=iris", "trainer=cpu", "trainer.max_epochs=3"]
    proc = subprocess.run(args, capture_output=True, text=True, env=clean_env(BP_SERVICE_HOME=str(home)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_piped_run_prints_the_summary_and_one_model_line(piped_run):
    """No bar redraws, no library noise: the model's one line and the summary (6 lines), nothing more."""
    _, output = piped_run
    assert "\r" not in output and "Epoch" not in output
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in:\n{output}"
    lines = output.strip().splitlines()
    assert lines[0].startswith("Model: net MLP; ") and "trainable parameters" in lines[0]
    assert lines[1].startswith("bp-train: train finished in ")
    assert all(line.startswith("  ") for line in lines[2:]) and len(lines) <= 10, output  # the summary's lines


@pytest.mark.slow
def test_the_dashboard_line_links_to_the_run_in_the_training_runs_view(piped_run):
    home, output = piped_run
    (line,) = [x for x in output.splitlines() if x.strip().startswith("dashboard")]
    match = re.search(r"http://127\.0\.0\.1:5000/#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning", line)
    assert match, line
    run = MlflowClient(f"sqlite:///{home}/mlflow.db").get_run(match[2])
    assert run.info.experiment_id == match[1]
    assert "make ui" in line


@pytest.mark.slow
def test_no_empty_log_file_in_the_run_folder(piped_run):
    home, _ = piped_run
    (run_dir,) = (home / "outputs" / "train" / "runs").iterdir()
    assert not [p.name for p in run_dir.glob("*.log") if p.stat().st_size == 0]


@pytest.mark.slow
def test_off_a_terminal_one_line_per_epoch_on_request(tmp_path):
    """not_a_terminal=epochs: each epoch's own metrics (train/loss logged at the epoch's end included)."""
    args = ["data=iris", "trainer=cpu", "trainer.max_epochs=2", "tracking.enabled=false"]
    args += ["callbacks.progress_bar.not_a_terminal=epochs"]
    env = clean_env(BP_SERVICE_HOME=str(tmp_path))
    proc = subprocess.run([str(BIN / "bp-train"), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("Epoch")]
    assert [line.split(":")[0] for line in epochs] == ["Epoch 0", "Epoch 1"], proc.stdout
    assert all("train/loss=" in line and "val/acc=" in line for line in epochs), epochs
    assert "\r" not in proc.stdout


# --------------------------------------------------------------------------- a run on a terminal
@pytest.mark.slow
def test_in_a_terminal_the_bar_has_no_v_num_and_an_error_starts_its_own_line(tmp_path):
    """A run that diverges at step 2: the bar was drawn, and the one-line error is not glued to it."""
    env = clean_env(BP_SERVICE_HOME=str(tmp_path))
    args = ["data=diabetes", "trainer=cpu", "optimizer=adam", "optimizer.lr=1e30", "tracking.enabled=false"]
    status, output = in_a_terminal([str(BIN / "bp-train"), *args], env)
    assert status == 1, output[-2000:]
    assert "Epoch 0:" in output and "v_num" not in output
    assert "| Name " in output and "Total params" in output  # the model summary as a table, on a terminal
    assert "FLOPs" not in output and "Total Flops" not in output
    assert re.search(r"\n\r?bp-train: error: step \d+: train/loss became non-finite", output), output[-1500:]


@pytest.mark.slow
def test_in_a_terminal_the_trainer_switches_still_turn_bar_and_summary_off(tmp_path):
    env = clean_env(BP_SERVICE_HOME=str(tmp_path))
    args = ["data=iris", "trainer=cpu", "trainer.max_epochs=1", "tracking.enabled=false"]
    off = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    status, output = in_a_terminal([str(BIN / "bp-train"), *args, *off], env)
    assert status == 0, output[-2000:]
    assert "Epoch" not in output and "Total params" not in output and "Model:" not in output
    assert output.strip().splitlines()[0].startswith("bp-train: train finished in ")


# --------------------------------------------------------------------------- bp-train --help
def test_help_lists_the_groups_and_their_options_without_schemas():
    proc = subprocess.run([str(BIN / "bp-train"), "--help"], capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("bp-train: train a multi-layer perceptron")
    groups = dict(re.findall(r"^(\w+): (.+)$", out, flags=re.M))
    assert groups["optimizer"].split(", ") == ["adam", "sgd", "sgd_momentum"]
    assert groups["scheduler"].split(", ") == ["cosine", "step"]
    assert {"callbacks", "data", "experiment", "model", "trainer"} <= set(groups)
    assert "digits" in groups["data"].split(", ")
    assert "_schema" not in out
    assert "== Examples ==" in out and "bp-train experiment=digits" in out


def test_help_does_not_import_torch_lightning_or_mlflow():
    """--help answers from the config alone: the heavy libraries are imported only by a run."""
    code = (
        "import sys\n"
        "sys.argv = ['bp-train', '--help']\n"
        "from bp_service.cli import bp_train\n"
        "try:\n    bp_train()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'mlflow', 'pandas') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env())
    assert "== Config groups" in proc.stdout, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.parametrize(
    ("override", "options"),
    [
        ("optimizer=adam_schema", "Available options in 'optimizer': adam, sgd, sgd_momentum"),
        ("scheduler=scheduler_schema", "Available options in 'scheduler': cosine, step"),
    ],
)
def test_a_schema_is_not_a_choice(tmp_path, override, options):
    """Refused with the real options (it used to train silently with the schema's default learning rate)."""
    env = clean_env(BP_SERVICE_HOME=str(tmp_path))
    proc = subprocess.run([str(BIN / "bp-train"), override], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bp-train: error: ") and override.split("=")[1] in line
    assert options in line
    assert not list(tmp_path.iterdir())  # no store, no run folder


# --------------------------------------------------------------------------- make ui
def _tree(root: int) -> list[int]:
    """root and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


@pytest.mark.slow
def test_make_ui_is_light_and_prints_the_training_runs_link(tmp_path):
    """One web worker and no job runner: MLflow's launcher and one uvicorn worker, nothing else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(drop=("UI_",), BP_SERVICE_HOME=str(tmp_path), PORT=str(port))
    # -o: never reinstall the venv from a test, even when pyproject.toml is newer than its stamp
    args = ["make", "-s", "-o", ".venv/.installed", "ui"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert first.strip() == (
            "MLflow dashboard, each experiment's runs with their metrics (all experiments: "
            f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning):"
        )
        assert proc.stdout.readline().strip() == f"no store at {tmp_path / 'mlflow.db'}: no runs"  # bp-runs dashboard
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.5)
        time.sleep(5)  # a job runner and its consumers would have started by now
        names = [Path(f"/proc/{p}/comm").read_text().strip() for p in _tree(proc.pid) if Path(f"/proc/{p}").exists()]
        assert len([n for n in names if n not in ("make", "bash", "sh")]) == 2, names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
