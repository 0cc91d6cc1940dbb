"""The console entry points: a Ctrl-C at any moment of start-up is one line and exit 130."""

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
