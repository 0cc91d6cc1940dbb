"""Every check before the run opens (exit 2, one line naming the field, file or column, no MLflow run), and the
errors that used to come late, cut or without a name. Through the real commands."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import clean_env, free_port
from omegaconf import DictConfig, OmegaConf

from bp_service.bundle import build_net
from bp_service.serving.predict import main as bp_predict
from bp_service.training.config import ConfigError
from bp_service.training.data import build_source, prepare
from bp_service.training.preflight import (
    available_memory,
    check_cpu_precision,
    check_memory,
    check_server_answers,
    validate,
)
from bp_service.training.tracking.interface import TrackingError

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
    return _case_more(tmp_path, name)


def _case_more(tmp_path: Path, name: str) -> tuple[list[str], str]:
    """Sizes beyond this machine's memory, precisions the CPU cannot run, and empty CSV columns."""
    if name == "noise_inf":
        return ["data=xor", "data.noise=inf"], "data.noise must be a finite number, got inf"
    if name == "samples_beyond_memory":  # 10^12 rows x 20 features: at least 12 bytes a value, some 200 TiB
        return ["data=synthetic", "data.n_samples=1000000000000"], (
            "data.n_samples=1000000000000 x data.n_features=20 needs at least "
        )
    if name == "features_beyond_memory":
        return ["data=synthetic", "data.n_features=1000000000"], "data.n_samples=10000 x data.n_features=1000000000"
    if name == "width_beyond_memory":
        return ["data=xor", "model.net.hidden=[8,100000000000]"], "model.net.hidden=[8, 100000000000] needs at least "
    if name == "fp16_mixed_on_cpu":  # Lightning would run bf16-mixed while the run's params say 16-mixed
        return ["data=xor", "trainer=cpu", "trainer.precision=16-mixed"], (
            "trainer.precision=16-mixed needs a CUDA device; on the CPU use bf16-mixed, 32-true or 64-true"
        )
    if name == "fp16_true_on_auto":  # trainer.accelerator=auto resolves to the CPU here
        return ["data=xor", "trainer.precision=16-true"], "trainer.precision=16-true needs a CUDA device"
    rng = np.random.default_rng(0)
    frame = _classes()
    if name == "empty_target_mean":
        frame["label"] = np.nan
        path = _csv(tmp_path, "no_labels.csv", frame)
        return ["data=csv", f"data.path={path}", "data.target=label", "data.missing=mean"], (
            f"{path}: target column 'label' is empty in every row"
        )
    if name == "empty_column_drop":
        frame["b"] = np.nan
        frame["c"] = rng.normal(size=len(frame))
        path = _csv(tmp_path, "no_b.csv", frame)
        return ["data=csv", f"data.path={path}", "data.target=label", "data.missing=drop"], (
            f"{path}: column 'b' is empty in every row, so data.missing=drop would leave no row; "
            "leave it out with 'data.features=[a,c]'"
        )
    if name == "single_class":
        frame["label"] = 1
        path = _csv(tmp_path, "one.csv", frame)
        return ["data=csv", f"data.path={path}", "data.target=label"], (
            f"{path}: target 'label' has a single class (1); need at least 2"
        )
    raise AssertionError(name)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without CUDA")
CASES = ["lr_inf", "monitor_typo", "precision", "seed", "plus_typo", "plus_new", "target_in_features",
         "duplicate_columns", "huge_target", "huge_feature", "corrupt_gzip", "folder_as_data",
         "fewer_rows_than_ranks", "noise_inf", "samples_beyond_memory", "features_beyond_memory",
         "width_beyond_memory", "fp16_mixed_on_cpu", "empty_target_mean", "empty_column_drop", "single_class",
         pytest.param("gpu_without_cuda", marks=NO_CUDA), pytest.param("fp16_true_on_auto", marks=NO_CUDA)]  # fmt: skip


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
    # The checkpoint folder is claimed (its lock) before the MLflow run opens: no run to leave RUNNING.
    assert [status for _, status in _runs(home)] in ([], ["FAILED"])


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


# --------------------------------------------------------------------------- before the heavy imports
HEAVY = ("torch", "lightning", "mlflow", "sklearn")


def _penguins(tmp_path: Path) -> Path:
    """Shaped like seaborn's penguins: text columns (island, sex) and empty cells beside the numbers."""
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame(
        {
            "species": rng.choice(["Adelie", "Gentoo", "Chinstrap"], n),
            "island": rng.choice(["Biscoe", "Dream", "Torgersen"], n),
            "bill_length_mm": rng.normal(44, 5, n).round(1),
            "flipper_length_mm": rng.normal(200, 10, n).round(0),
            "body_mass_g": rng.normal(4200, 500, n).round(0),
            "sex": rng.choice(["male", "female"], n),
        }
    )
    frame.loc[[3, 71], "bill_length_mm"] = np.nan  # spreadsheet rows 5 and 73
    frame.loc[[3, 8], "sex"] = np.nan
    return _csv(tmp_path, "penguins.csv", frame)


def _imported(stderr: str) -> set[str]:
    """Top-level packages that ``python -X importtime`` saw imported."""
    found = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            found.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return found


def test_every_problem_of_the_data_and_config_in_one_run_before_torch_is_imported(tmp_path):
    """The real bp-train, under ``-X importtime``: text columns, missing cells and a bad range come back together,
    exit 2, one line, with nothing of torch, Lightning, MLflow or scikit-learn imported and no run folder left."""
    home, path = tmp_path / "home", _penguins(tmp_path)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "bp-train"), "data=csv", f"data.path={path}",
         "data.target=species", "optimizer.lr=-1"],
        capture_output=True, text=True, env=_env(home), timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert not _imported(result.stderr) & set(HEAVY), sorted(_imported(result.stderr) & set(HEAVY))
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("bp-train: error: 3 problems: (1) "), line
    assert f"{path}: not numeric: column(s) 'island' (row 2: " in line and "'sex' (row 2: " in line
    assert "train on the numeric ones with 'data.features=[bill_length_mm,flipper_length_mm,body_mass_g]'" in line
    # the text column's own empty cells are not repeated: it cannot be a feature as it is
    assert f"{path}: missing values: column 'bill_length_mm': 2 rows missing (first: row 5); data.missing=drop" in line
    assert "column 'sex'" not in line.split("missing values")[1]
    assert line.endswith("(3) optimizer.lr must be > 0, got -1")
    assert not (home / "mlflow.db").exists() and _runs(home) == []


@pytest.mark.parametrize("ckpt_path", ["last", "missing"])
def test_a_checkpoint_to_resume_that_is_not_there_is_refused_before_torch_is_imported(tmp_path, ckpt_path):
    """``ckpt_path=last`` beside a run of other overrides only, or a path that names no file: exit 2, one line, in a
    second (it used to come after torch's and Lightning's imports), and no run folder left behind."""
    home = tmp_path / "home"
    runs = home / "outputs" / "train" / "runs"
    other = runs / "2026-01-01_00-00-00"  # a run of other data: its last.ckpt is not this run's to resume
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "overrides.yaml").write_text("- data=wine\n")
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    missing = tmp_path / "gone" / "last.ckpt"
    arg = "ckpt_path=last" if ckpt_path == "last" else f"ckpt_path={missing}"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "bp-train"), "data=iris", arg, "tracking.enabled=false"],
        capture_output=True, text=True, env=_env(home), timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert not _imported(result.stderr) & set(HEAVY), sorted(_imported(result.stderr) & set(HEAVY))
    line = result.stderr.strip().splitlines()[-1]
    if ckpt_path == "last":
        expected = f"ckpt_path=last: no last.ckpt from an earlier run with the same overrides under {runs}"
    else:
        expected = f"ckpt_path: {missing}: checkpoint not found"
    assert line == f"bp-train: error: {expected}"
    assert [p.name for p in runs.iterdir()] == [other.name]


def test_a_tracking_server_that_refuses_the_connection_stops_the_run_before_torch_is_imported(tmp_path):
    """Exit 1 and MLflow's own one line, in a second: MLflow's check in the tracking process answers seconds later."""
    uri = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "bp-train"), "data=iris", f"tracking.uri={uri}"],
        capture_output=True, text=True, timeout=300,
        env=clean_env(BP_SERVICE_HOME=str(tmp_path / "home"), drop=(*PROXIES, *(p.upper() for p in PROXIES))),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert not _imported(result.stderr) & set(HEAVY), sorted(_imported(result.stderr) & set(HEAVY))
    line = result.stderr.strip().splitlines()[-1]
    assert line == (
        f"bp-train: error: tracking server {uri} is unreachable (127.0.0.1:{uri.rsplit(':', 1)[1]} refused the "
        "connection); set tracking.required=false to train anyway"
    )
    assert not list((tmp_path / "home").glob("outputs/*/runs/*"))  # no run folder left


PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _tracking(uri: str, **fields) -> DictConfig:
    return OmegaConf.create({"enabled": True, "required": True, "uri": uri, **fields})


def test_the_server_check_refuses_only_what_is_certain(monkeypatch, tmp_path):
    """A listening server passes (its answer is MLflow's to check); a refused port is refused; a proxy in the way,
    tracking off or not required, another rank of a distributed run, and stores that are not servers are left to
    MLflow."""
    for name in (*PROXIES, *(p.upper() for p in PROXIES)):
        monkeypatch.delenv(name, raising=False)
    paths = OmegaConf.create({"root_dir": str(tmp_path)})
    with socket.create_server(("127.0.0.1", 0)) as listening:
        check_server_answers(_tracking(f"http://127.0.0.1:{listening.getsockname()[1]}"), paths)
    refused = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="refused the connection"):
        check_server_answers(_tracking(refused), paths)
    check_server_answers(_tracking(refused, required=False), paths)
    check_server_answers(_tracking(refused, enabled=False), paths)
    check_server_answers(_tracking("sqlite:////nonexistent/mlflow.db"), paths)
    monkeypatch.setenv("RANK", "1")
    check_server_answers(_tracking(refused), paths)  # only the first process talks to the store
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("NO_PROXY", "example.com")  # a bypass list alone sends nothing through a proxy
    with pytest.raises(TrackingError, match="refused the connection"):
        check_server_answers(_tracking(refused), paths)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    check_server_answers(_tracking(refused), paths)  # requests would go through the proxy: not this check's to judge
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(TrackingError, match="refused the connection"):
        check_server_answers(_tracking(refused), paths)


def test_the_server_check_refuses_a_host_without_address_and_leaves_a_silent_name_server_to_mlflow(
    monkeypatch, tmp_path
):
    paths = OmegaConf.create({"root_dir": str(tmp_path)})
    for name in (*PROXIES, *(p.upper() for p in PROXIES)):
        monkeypatch.delenv(name, raising=False)
    answers = {"nosuchhost": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
               "flaky": socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")}  # fmt: skip
    released = threading.Event()

    def getaddrinfo(host, *args, **kwargs):
        if host == "silent":
            released.wait(30)  # a name server that does not answer
            raise socket.gaierror(socket.EAI_AGAIN, "timed out")
        raise answers[host]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(TrackingError, match="no host named 'nosuchhost'"):
        check_server_answers(_tracking("http://nosuchhost:5000"), paths)
    check_server_answers(_tracking("http://flaky:5000"), paths)
    try:
        check_server_answers(_tracking("http://silent:5000"), paths)  # returns, the lookup left to finish
    finally:
        released.set()


def test_a_wrong_or_missing_target_lists_the_columns(tmp_path):
    home, path = tmp_path / "home", _penguins(tmp_path)
    columns = "species, island, bill_length_mm, flipper_length_mm, body_mass_g, sex"
    wrong = _bp_train(home, "data=csv", f"data.path={path}", "data.target=specie", "data.features=[body_mass_g]")
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    assert wrong.stderr.strip() == (
        f"bp-train: error: {path}: target column 'specie' not found; did you mean 'species'? (columns: {columns})"
    )
    missing = _bp_train(home, "data=csv", f"data.path={path}")
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert missing.stderr.strip() == (
        f"bp-train: error: data.target is required for data=csv; the columns of {path}: {columns}"
    )
    assert _runs(home) == []


def test_validate_names_every_bad_field_at_once(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("data=xor", "optimizer.lr=0", "trainer.max_epochs=0", "data.batch_size=0"))
    message = str(info.value)
    assert message.startswith("3 problems: (1) ") and "\n" not in message
    for needle in ("data.batch_size must be >= 1, got 0", "optimizer.lr must be > 0, got 0",
                   "trainer.max_epochs must be >= 1, got 0"):  # fmt: skip
        assert needle in message


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "16", "transformer-engine"])
def test_every_precision_that_needs_cuda_is_refused_on_the_cpu(precision):
    with pytest.raises(ConfigError, match=rf"^trainer.precision={precision} needs a CUDA device; on the CPU use "):
        check_cpu_precision(precision, "cpu")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true", "64-true", "bf16", "32", "64"])
def test_the_cpu_precisions_pass(precision):
    check_cpu_precision(precision, "cpu")


def test_the_synthetic_preset_is_not_refused_for_memory(compose_cfg):
    have = available_memory()
    if have is None or have < 4 * 2**30:
        pytest.skip("the preset needs a few GiB of memory here")
    check_memory(compose_cfg("experiment=synthetic"))  # 1M x 128: at least 1.5 GiB by the estimate


@pytest.mark.parametrize(("rows", "features", "classes"), [(50000, 32, 10), (20000, 8, 100), (20000, 3, 2)])
def test_the_memory_estimate_of_generated_data_is_below_what_generating_it_takes(compose_cfg, rows, features, classes):
    """A lower bound, so that no run that would have fitted is refused. tracemalloc sees numpy's arrays (not
    torch's tensors): its peak is itself below what the process takes."""
    cfg = compose_cfg(
        "data=synthetic", f"data.n_samples={rows}", f"data.n_features={features}", f"data.n_classes={classes}"
    )
    _, estimate, _ = build_source(cfg.data).memory_need()
    tracemalloc.start()
    try:
        prepare(cfg.data, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert estimate < peak


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
