"""Every check before the run opens (exit 2, one line naming the field, file or column, no MLflow run), and the
errors that used to come late, cut or without a name. Through the real commands."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import clean_env

from bp_service.bundle import build_net
from bp_service.serving.predict import main as bp_predict

BIN = Path(sys.executable).parent
QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _env(home: Path) -> dict[str, str]:
    return clean_env(BP_SERVICE_HOME=str(home))


def _bp_train(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "bp-train"), *QUICK, *args], capture_output=True, text=True, env=_env(home), timeout=600
    )


def _runs(home: Path) -> list[tuple[str, str]]:
    if not (home / "mlflow.db").exists():
        return []
    with sqlite3.connect(home / "mlflow.db") as con:
        return list(con.execute("SELECT run_uuid, status FROM runs"))


def _csv(tmp_path: Path, name: str, frame: pd.DataFrame) -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _classes(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": np.arange(n) % 2})


def _case(tmp_path: Path, name: str) -> tuple[list[str], str]:
    """(overrides, what the one line must say) for each bad input."""
    if name == "lr_inf":
        return ["data=xor", "optimizer.lr=inf"], "optimizer.lr must be a finite number, got inf"
    if name == "gpu_without_cuda":
        return ["data=xor", "trainer=gpu"], "trainer.accelerator=gpu but this machine has no CUDA device"
    if name == "monitor_typo":
        return [
            "data=xor",
            "callbacks.model_checkpoint.monitor=val/acc_typo",
        ], "callbacks.model_checkpoint.monitor must be auto or one of"
    if name == "precision":
        return ["data=xor", "trainer.precision=17-mixed"], "trainer.precision must be one of"
    if name == "seed":
        return ["data=xor", "seed=-1"], "seed must be in [0, 4294967295], got -1"
    if name == "plus_typo":
        return ["data=xor", "+model.hiden=[32]"], "unknown key 'model.hiden'"
    if name == "plus_new":
        return ["data=xor", "+foo=1"], "unknown key 'foo'"
    if name == "target_in_features":
        path = _csv(tmp_path, "t.csv", _classes())
        return ["data=csv", f"data.path={path}", "data.target=label", "data.features=[a,label]"], (
            "data.features includes 'label', which is data.target"
        )
    if name == "duplicate_columns":
        path = tmp_path / "dup.csv"
        path.write_text("a,label,label\n" + "".join(f"{i},{i % 2},{i % 3}\n" for i in range(60)))
        return ["data=csv", f"data.path={path}", "data.target=label"], f"{path}: column name(s) 'label' appear more"
    if name == "huge_target":
        frame = _classes().rename(columns={"label": "y"})
        frame["y"] = np.where(np.arange(60) % 2, 1e308, -1e308)
        path = _csv(tmp_path, "y.csv", frame)
        return ["data=csv", f"data.path={path}", "data.target=y", "data.task=regression"], (
            f"{path}: column 'y': values too large to scale"
        )
    if name == "huge_feature":
        frame = _classes()
        frame["a"] = np.where(np.arange(60) % 3, 1e308, 1.7e308)
        path = _csv(tmp_path, "x.csv", frame)
        return ["data=csv", f"data.path={path}", "data.target=label"], f"{path}: column 'a': values too large to scale"
    if name == "corrupt_gzip":
        path = tmp_path / "rows.csv.gz"
        path.write_bytes(b"a,b,label\n" + b"1,2,0\n" * 50)  # named .gz, but not compressed
        return ["data=csv", f"data.path={path}", "data.target=label"], f"{path}: not a readable CSV"
    if name == "folder_as_data":
        return ["data=csv", f"data.path={tmp_path}", "data.target=label"], f"{tmp_path}: is a folder, not a CSV file"
    if name == "fewer_rows_than_ranks":
        path = _csv(tmp_path, "few.csv", _classes(12))  # 8 training rows after the val and test splits
        return ["data=csv", f"data.path={path}", "data.target=label", "trainer=ddp", "trainer.accelerator=cpu",
                "trainer.devices=16"], f"{path}: 8 training rows for 16 training processes"  # fmt: skip
    raise AssertionError(name)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without CUDA")
CASES = ["lr_inf", "monitor_typo", "precision", "seed", "plus_typo", "plus_new", "target_in_features",
         "duplicate_columns", "huge_target", "huge_feature", "corrupt_gzip", "folder_as_data",
         "fewer_rows_than_ranks",
         pytest.param("gpu_without_cuda", marks=NO_CUDA)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_bad_config_or_data_is_one_line_exit_2_before_any_run_opens(tmp_path, name):
    home = tmp_path / "home"
    overrides, needle = _case(tmp_path, name)
    result = _bp_train(home, *overrides)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("bp-train: error: ") and needle in line, line
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert _runs(home) == [], "a run was opened"


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_without_hydras_second_line(tmp_path):
    home = tmp_path / "home"
    result = _bp_train(home, "data=xor", "paths.ckpt_dir=/proc/bp-service-nowhere/checkpoints")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Error executing job" not in result.stderr and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("bp-train: error: ") and "/proc/bp-service-nowhere" in line, line
    assert [status for _, status in _runs(home)] == ["FAILED"]


@pytest.mark.slow
def test_ctrl_c_during_training_says_interrupted_exits_130_and_ends_the_run_killed(tmp_path):
    home = tmp_path / "home"
    args = ["data=xor", "data.n_samples=20000", "data.batch_size=16", "trainer=cpu", "trainer.max_epochs=50",
            "callbacks.last_checkpoint.every_n_train_steps=50", "tracking.log_model=false"]  # fmt: skip
    proc = subprocess.Popen(
        [str(BIN / "bp-train"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home)
    )
    deadline = time.monotonic() + 180
    while not list(home.glob("outputs/train/runs/*/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "bp-train: interrupted" and "Traceback" not in err
    assert [status for _, status in _runs(home)] == ["KILLED"]


# --------------------------------------------------------------------------- bp-predict
ARCH = {"sizes": [2, 3, 1], "activations": ["sigmoid", "sigmoid"], "fused": True, "bias": True}


def _bundle(tmp_path: Path, classes=(0, 1), arch=None, state=None) -> Path:
    torch.manual_seed(0)
    meta = {"task": "classification", "feature_names": ["a", "b"], "classes": list(classes),
            "scaler_mean": [0.0, 0.0], "scaler_scale": [1.0, 1.0], "target_mean": 0.0, "target_scale": 1.0}  # fmt: skip
    path = tmp_path / "model_bundle.pt"
    arch = arch or ARCH
    torch.save({"state_dict": state or build_net(ARCH).state_dict(), "meta": meta, "architecture": arch}, path)
    return path


@pytest.fixture
def rows(tmp_path) -> Path:
    return _csv(tmp_path, "rows.csv", pd.DataFrame({"a": np.linspace(-3, 3, 40), "b": np.linspace(3, -3, 40)}))


def test_boolean_labels_predict_true_and_false_beside_their_probabilities(tmp_path, rows, capsys):
    out = tmp_path / "out.csv"
    assert bp_predict([f"model={_bundle(tmp_path, (False, True))}", f"input={rows}", f"output={out}"]) == 0
    frame = pd.read_csv(out, dtype=str)
    assert list(frame.columns) == ["prediction", "proba_False", "proba_True"]
    assert set(frame["prediction"]) <= {"True", "False"}
    proba_true = frame["proba_True"].astype(float) > frame["proba_False"].astype(float)
    assert ((frame["prediction"] == "True") == proba_true).all()


@pytest.mark.parametrize(
    "case, needle",
    [
        ("nan_weights", "weights are not finite (layers.0.weight holds NaN or inf)"),
        ("huge_declared", "weights do not match the architecture it declares (sizes [2, 40000, 1])"),
        ("wrong_shape", "weights do not match the architecture it declares (sizes [2, 3, 1]): layers.0.weight is"),
    ],
)
def test_bad_weights_are_refused_naming_the_file_before_any_network_is_built(tmp_path, rows, capsys, case, needle):
    state = build_net(ARCH).state_dict()
    arch = None
    if case == "nan_weights":
        state["layers.0.weight"][0, 0] = float("nan")
    elif case == "huge_declared":  # a few KB claiming a 40000-wide layer: nothing of that size may be allocated
        arch = {**ARCH, "sizes": [2, 40000, 1]}
    else:
        state["layers.0.weight"] = torch.zeros(5, 2)
    path = _bundle(tmp_path, arch=arch, state=state)
    code = bp_predict([f"model={path}", f"input={rows}", f"output={tmp_path / 'out.csv'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"bp-predict: error: {path}: ") and needle in err, err
    assert not (tmp_path / "out.csv").exists()


def test_a_damaged_gzip_input_is_named(tmp_path, capsys):
    path = tmp_path / "rows.csv.gz"
    path.write_bytes(b"not gzip at all")
    code = bp_predict([f"model={_bundle(tmp_path)}", f"input={path}", f"output={tmp_path / 'out.csv'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"bp-predict: error: {path}: not a readable CSV"), err


def test_repeated_input_columns_are_refused(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text("a,b,b\n1,2,3\n")
    code = bp_predict([f"model={_bundle(tmp_path)}", f"input={path}", f"output={tmp_path / 'out.csv'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"bp-predict: error: {path}: column name(s) 'b' appear more than once; rename them"
