"""The console entry points: a Ctrl-C at any moment of start-up is one line and exit 130."""

import ast
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import clean_env


@pytest.mark.parametrize(("command", "delay"), [("bp-train", 0.3), ("bp-train", 1.5), ("bp-predict", 0.3)])
def test_ctrl_c_during_startup_is_one_line_and_130(tmp_path, command, delay):
    """SIGINT while torch and Lightning are still importing: no traceback, 'interrupted', exit 130."""
    env = clean_env(BP_SERVICE_HOME=str(tmp_path))
    args = ["trainer=cpu", "data=iris"] if command == "bp-train" else ["model=x", "input=y"]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / command), *args], stderr=subprocess.PIPE, text=True, env=env
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"{command}: interrupted"


@pytest.fixture
def command_state():
    """Undo what a command's start-up does to this process: the collector, the SIGINT handler."""
    from bp_service import commands

    yield commands
    signal.signal(signal.SIGINT, signal.default_int_handler)
    commands._interrupted = False
    gc.enable()
    gc.unfreeze()


def test_a_ctrl_c_swallowed_during_startup_still_stops_the_command(command_state):
    """A Ctrl-C during start-up that library code catches (Hydra's composition did, then reported a config error;
    or ran on) is remembered: the command's error path reads it, and start-up's end raises it again."""
    command_state.watch_interrupts()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C ...
        time.sleep(5)
        pytest.fail("SIGINT was not delivered")
    except KeyboardInterrupt:
        pass  # ... swallowed on the way
    assert command_state.interrupted()
    with pytest.raises(KeyboardInterrupt):
        command_state.startup_done()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # after start-up, Python's own


def test_a_ctrl_c_a_command_does_not_answer_is_one_line_and_130(command_state, tmp_path, monkeypatch, capsys):
    from bp_service.cli import _run

    (tmp_path / "stopped_command.py").write_text("def main():\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        _run("stopped_command", "bp-stopped")
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "bp-stopped: interrupted\n"


PROBE = """
import gc, sys
from bp_service.training import lifecycle, module
seen = {}
fit, step = lifecycle.Run.fit, module.BPModule.training_step
def watched_fit(self, *args, **kwargs):
    seen["before fit"] = gc.isenabled()
    return fit(self, *args, **kwargs)
def watched_step(self, *args, **kwargs):
    seen.setdefault("training", [gc.isenabled(), gc.get_freeze_count() > 0])
    return step(self, *args, **kwargs)
lifecycle.Run.fit, module.BPModule.training_step = watched_fit, watched_step
from bp_service.cli import bp_train
sys.argv = ["bp-train", *sys.argv[1:]]
try:
    bp_train()
finally:
    print("SEEN", seen)
"""


def test_bp_train_collects_garbage_while_it_trains_not_while_it_imports(tmp_path):
    """The cyclic collector is off through start-up (imports, config, data), and on, over a frozen heap, while the
    model trains: a long run's reference cycles are still collected."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "data=xor", "trainer=cpu", "trainer.max_epochs=2", "tracking.enabled=false"],
        capture_output=True, text=True, env=clean_env(BP_SERVICE_HOME=str(tmp_path)), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = ast.literal_eval(next(line for line in proc.stdout.splitlines() if line.startswith("SEEN "))[5:])
    assert seen == {"before fit": False, "training": [True, True]}
