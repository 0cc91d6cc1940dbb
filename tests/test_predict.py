"""bp-predict: one small digits model trained once for the module by the real ``bp-train`` command, then
scored from its MLflow run URI, its registered name, its checkpoint and its bundle.

MLflow URIs are only exercised through the command line in a subprocess: in this process another test may
have called ``mlflow.set_tracking_uri``, which would win over ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import clean_env
from sklearn.datasets import load_digits

from bp_service.bundle import load_bundle, net_from_bundle, predict_frame
from bp_service.serving.model import InputError, features_matrix
from bp_service.serving.predict import BLOCK_ROWS, main, parse_args, predict_rows

BIN = Path(sys.executable).parent
MODEL_NAME = "bp-predict-test"
N_ROWS = 500  # rows of the digits data the tests score


def _env(home: Path) -> dict[str, str]:
    return clean_env(BP_SERVICE_HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A two-epoch digits model (64 features, 10 classes), logged, registered and checkpointed."""
    home = tmp_path_factory.mktemp("home")
    args = [
        "experiment=digits",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"tracking.register_model={MODEL_NAME}",
    ]
    proc = subprocess.run(
        [str(BIN / "bp-train"), *args], capture_output=True, text=True, env=_env(home), timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = re.search(r"MLflow run\s+([0-9a-f]{32})", proc.stdout).group(1)
    checkpoint = Path(re.search(r"checkpoint\s+(\S+\.ckpt)", proc.stdout).group(1))
    bundle_path = checkpoint.parent.parent / "model_bundle.pt"
    assert checkpoint.is_file() and bundle_path.is_file()
    return {"home": home, "run_id": run_id, "checkpoint": checkpoint, "bundle_path": bundle_path}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """The first N_ROWS digits, features shuffled out of order, with ids that only survive as text."""
    bunch = load_digits()
    frame = pd.DataFrame(bunch.data[:N_ROWS], columns=bunch.feature_names)
    frame = frame[list(reversed(frame.columns))]  # column order does not matter, names do
    frame.insert(0, "id", [f"r{i:05d}" for i in range(N_ROWS)])
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    frame.to_csv(path, index=False)
    return path


def bp_predict(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**_env(home), **(env or {})}
    return subprocess.run(
        [str(BIN / "bp-predict"), *args], capture_output=True, text=True, env=full_env, timeout=600, check=False
    )


def predict_in_process(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def _expected_columns() -> list[str]:
    return ["id", "prediction", *[f"proba_{k}" for k in range(10)]]


# --------------------------------------------------------------------------- the same predictions, every way in
def test_every_kind_of_model_reference_gives_the_same_file_as_the_pyfunc_model(model, rows, tmp_path, capsys):
    outputs = {}
    for kind, ref in [("run", f"runs:/{model['run_id']}/model"), ("registered", f"models:/{MODEL_NAME}/latest")]:
        outputs[kind] = tmp_path / kind / "predictions.csv"  # the output's folder is created
        proc = bp_predict(model["home"], f"model={ref}", f"input={rows}", f"output={outputs[kind]}")
        assert proc.returncode == 0, proc.stderr
        assert f"{N_ROWS} rows" in proc.stdout
    for kind, ref in [("checkpoint", model["checkpoint"]), ("bundle", model["bundle_path"])]:
        outputs[kind] = tmp_path / f"{kind}.csv"
        code, err = predict_in_process(capsys, f"model={ref}", f"input={rows}", f"output={outputs[kind]}")
        assert code == 0, err
    reference = outputs["run"].read_bytes()
    assert all(path.read_bytes() == reference for path in outputs.values())

    got = pd.read_csv(outputs["run"], dtype={"id": str})
    assert list(got.columns) == _expected_columns()
    assert got["id"].tolist() == [f"r{i:05d}" for i in range(N_ROWS)]  # carried through verbatim, zeros kept

    # MLflow's own loader on the same rows, from the logged model's folder in the local artifact store
    # (a path, not the URI: no tracking URI of this process involved)
    import mlflow

    (mlmodel,) = model["home"].glob("mlartifacts/models/*/artifacts/MLmodel")
    assert f"run_id: {model['run_id']}" in mlmodel.read_text()
    expected = mlflow.pyfunc.load_model(str(mlmodel.parent)).predict(pd.read_csv(rows).drop(columns="id"))
    assert got["prediction"].tolist() == expected["prediction"].tolist()
    # pyfunc runs all rows as one batch, bp-predict in fixed blocks: float32 kernels round differently
    np.testing.assert_allclose(got.iloc[:, 2:].to_numpy(), expected.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)


def test_predictions_equal_predict_frame_in_process(model, rows, tmp_path, capsys):
    out = tmp_path / "p.csv"
    code, err = predict_in_process(capsys, f"model={model['checkpoint']}", f"input={rows}", f"output={out}")
    assert code == 0, err
    got = pd.read_csv(out)

    bundle = load_bundle(model["checkpoint"])
    net, meta = net_from_bundle(bundle), bundle["meta"]
    raw = features_matrix(pd.read_csv(rows), meta, "rows")
    # exactly what predict_rows computes (CSV floats round-trip exactly) ...
    pd.testing.assert_frame_equal(got.drop(columns="id"), predict_rows(net, meta, raw), check_exact=True)
    # ... and, to float32 rounding, predict_frame on all rows at once
    whole = predict_frame(net, meta, raw)
    assert got["prediction"].tolist() == whole["prediction"].tolist()
    np.testing.assert_allclose(got.iloc[:, 2:].to_numpy(), whole.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [7, 64, BLOCK_ROWS + 1])
def test_chunked_output_is_byte_identical_to_one_chunk(model, rows, tmp_path, capsys, chunk_size):
    one, chunked = tmp_path / "one.csv", tmp_path / "chunked.csv"
    ckpt = f"model={model['checkpoint']}"
    assert predict_in_process(capsys, ckpt, f"input={rows}", f"output={one}", f"chunk_size={N_ROWS}")[0] == 0
    assert predict_in_process(capsys, ckpt, f"input={rows}", f"output={chunked}", f"chunk_size={chunk_size}")[0] == 0
    assert chunked.read_bytes() == one.read_bytes()


def test_named_id_column_is_carried_and_not_a_feature(model, rows, tmp_path, capsys):
    frame = pd.read_csv(rows, dtype={"id": str}).rename(columns={"id": "customer"})
    frame["customer"] = frame["customer"].str.replace("r", "c-")
    src, out = tmp_path / "customers.csv", tmp_path / "out.csv"
    frame.to_csv(src, index=False)

    code, err = predict_in_process(capsys, f"model={model['checkpoint']}", f"input={src}", f"output={out}")
    assert code == 2 and "unexpected column(s) customer" in err  # not auto-detected: only "id" is

    args = [f"model={model['checkpoint']}", f"input={src}", f"output={out}", "id_column=customer"]
    assert predict_in_process(capsys, *args)[0] == 0
    got = pd.read_csv(out, dtype={"customer": str})
    assert got.columns[0] == "customer" and got["customer"].tolist() == frame["customer"].tolist()


def test_without_an_id_column_the_output_starts_with_the_prediction(model, rows, tmp_path, capsys):
    src, out = tmp_path / "no_id.csv", tmp_path / "out.csv"
    pd.read_csv(rows).drop(columns="id").to_csv(src, index=False)
    assert predict_in_process(capsys, f"model={model['checkpoint']}", f"input={src}", f"output={out}")[0] == 0
    assert list(pd.read_csv(out).columns) == _expected_columns()[1:]


# --------------------------------------------------------------------------- bad input: one clear line, exit 2
def _bad_csv(rows: Path, tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A broken copy of ``rows`` and the fragments its error message must contain."""
    path = tmp_path / f"{case}.csv"
    frame = pd.read_csv(rows, dtype={"id": str})
    if case == "missing_column":
        frame.drop(columns=["pixel_3_4", "pixel_0_0"]).to_csv(path, index=False)
        return path, ["missing column(s) pixel_0_0, pixel_3_4"]
    if case == "extra_column":
        frame.assign(colour="red").to_csv(path, index=False)
        return path, ["unexpected column(s) colour"]
    if case == "text_cell":
        frame = frame.astype({"pixel_2_5": object})
        frame.loc[41, "pixel_2_5"] = "seven"  # data row 42: line 43 of the file, after the header
        frame.to_csv(path, index=False)
        return path, ["row 43", "column 'pixel_2_5'", "'seven'"]
    if case == "empty_cell_in_a_later_chunk":
        frame.loc[450, "pixel_1_1"] = None
        frame.to_csv(path, index=False)
        return path, ["row 452", "column 'pixel_1_1'", "missing"]
    if case == "empty_file":
        path.write_text("")
        return path, ["file is empty"]
    if case == "header_only":
        frame.iloc[:0].to_csv(path, index=False)
        return path, ["has a header but no data rows"]
    if case == "missing_file":
        return tmp_path / "nowhere.csv", ["file not found"]
    raise AssertionError(case)


BAD_CASES = [
    "missing_column",
    "extra_column",
    "text_cell",
    "empty_cell_in_a_later_chunk",
    "empty_file",
    "header_only",
    "missing_file",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_csv_is_one_clear_line(model, rows, tmp_path, capsys, case):
    src, needles = _bad_csv(rows, tmp_path, case)
    out = tmp_path / "out" / "predictions.csv"
    code, err = predict_in_process(
        capsys, f"model={model['checkpoint']}", f"input={src}", f"output={out}", "chunk_size=100"
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bp-predict: error: {src}: "), err
    for needle in needles:
        assert needle in lines[0]
    assert not out.exists()
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []  # in out's folder, or anywhere


def test_cli_error_has_no_traceback_unless_asked(model, rows, tmp_path, capsys, monkeypatch):
    src, needles = _bad_csv(rows, tmp_path, "text_cell")
    args = [f"model={model['checkpoint']}", f"input={src}", f"output={tmp_path / 'o.csv'}"]
    proc = bp_predict(model["home"], *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("bp-predict: error: ") and "Traceback" not in proc.stderr
    assert all(n in proc.stderr for n in needles)

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(InputError, match="row 43"):
        main(args)


def test_a_failed_run_leaves_an_existing_output_untouched(model, rows, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    out.write_text("previous results\n")
    src, _ = _bad_csv(rows, tmp_path, "empty_cell_in_a_later_chunk")  # fails after 4 chunks were written
    code, _ = predict_in_process(
        capsys, f"model={model['checkpoint']}", f"input={src}", f"output={out}", "chunk_size=100"
    )
    assert code == 2
    assert out.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("model_ref", "needle"),
    [
        ("runs:/0123456789abcdef0123456789abcdef/model", "not found"),
        (f"models:/{MODEL_NAME}/99", "not found"),
    ],
)
def test_unknown_mlflow_model_is_one_line(model, rows, tmp_path, model_ref, needle):
    proc = bp_predict(model["home"], f"model={model_ref}", f"input={rows}", f"output={tmp_path / 'o.csv'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"bp-predict: error: model {model_ref}: ") and needle in proc.stderr


def test_bad_checkpoints_are_named(model, rows, tmp_path, capsys):
    out = f"output={tmp_path / 'o.csv'}"
    code, err = predict_in_process(capsys, f"model={tmp_path / 'gone.ckpt'}", f"input={rows}", out)
    assert code == 2 and "gone.ckpt: checkpoint not found" in err
    code, err = predict_in_process(capsys, f"model={rows}", f"input={rows}", out)  # a CSV is no checkpoint
    assert code == 2 and "not a loadable bp-service checkpoint" in err
    (tmp_path / "folder").mkdir()
    code, err = predict_in_process(capsys, f"model={tmp_path / 'folder'}", f"input={rows}", out)
    assert code == 2 and "not an MLflow model (no MLmodel file)" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["model=m.ckpt", "input=i.csv"], "missing output=..."),
        ([], "missing model=..., input=..., output=..."),
        (["model=m", "input=i", "output=o", "colour=red"], "unknown argument 'colour'"),
        (["model=m", "input=i", "output=o", "chunk_size=many"], "chunk_size: Value 'many'"),
        (["model=m", "input=i", "output=o", "chunk_size=0"], "chunk_size must be at least 1"),
        (["model", "input=i", "output=o"], "expected key=value, got 'model'"),
    ],
)
def test_bad_arguments_are_one_line(capsys, args, needle):
    code, err = predict_in_process(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bp-predict: error: ") and needle in err


def test_arguments_parse_into_the_typed_config():
    cfg = parse_args(["model=models:/m/latest", "input=a b.csv", "output=o.csv", "chunk_size=10", "id_column=key"])
    assert (cfg.model, cfg.input, cfg.output, cfg.chunk_size, cfg.id_column) == (
        "models:/m/latest",
        "a b.csv",
        "o.csv",
        10,
        "key",
    )
    assert parse_args(["model=m", "input=i", "output=o"]).chunk_size == 50_000


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "chunk_size" in capsys.readouterr().out


# --------------------------------------------------------------------------- a million rows in bounded memory
def _peak_rss_mib(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Exit status, peak resident memory (MiB) of exactly this child, and seconds taken."""
    started = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's of pytest
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - started  # ru_maxrss is in KiB


@pytest.mark.slow
def test_a_million_rows_stream_in_bounded_memory(model, rows, tmp_path):
    """1,000,000 rows x 64 features (~140 MiB of CSV) through bp-predict with the default chunk_size.

    Loading the whole file at once needs the parsed frame (1e6 x 64 x 8 B = 488 MiB), the float matrix, the
    scaled copy and its float32 tensor: measured on the dev machine, peak RSS 1,898 MiB with
    chunk_size=1000000 against 615 MiB for the 500-row file (torch, pandas, Lightning and MLflow loaded),
    i.e. about +1.2 GiB. Streamed in 50,000-row chunks each chunk's frame, matrices and predictions are
    ~25 MiB apiece: measured 720 MiB (+105 MiB). Bound: at most 250 MiB above the same command on the
    500-row file, a fifth of what the whole-file load adds, with room for allocator noise.
    """
    n_rows, block = 1_000_000, 10_000
    base = pd.read_csv(rows).drop(columns="id").astype(int)
    big = tmp_path / "big.csv"
    # write a 10,000-row text block 100 times: quick, and memory here stays small too
    text_block = base.sample(n=block, replace=True, random_state=0).to_csv(index=False, header=False)
    with big.open("w") as fh:
        fh.write(",".join(base.columns) + "\n")
        for _ in range(n_rows // block):
            fh.write(text_block)
    size_mb = big.stat().st_size / 2**20

    env = _env(model["home"])
    exe = str(BIN / "bp-predict")
    small_out, big_out = tmp_path / "small.csv", tmp_path / "big_out.csv"
    code, small_rss, _ = _peak_rss_mib(
        [exe, f"model={model['checkpoint']}", f"input={rows}", f"output={small_out}"], env, tmp_path / "small.log"
    )
    assert code == 0, (tmp_path / "small.log").read_text()
    code, big_rss, seconds = _peak_rss_mib(
        [exe, f"model={model['checkpoint']}", f"input={big}", f"output={big_out}"], env, tmp_path / "big.log"
    )
    assert code == 0, (tmp_path / "big.log").read_text()
    print(
        f"\n{n_rows} rows ({size_mb:.0f} MiB CSV) in {seconds:.1f} s: peak RSS {big_rss:.0f} MiB, "
        f"500-row baseline {small_rss:.0f} MiB, growth {big_rss - small_rss:.0f} MiB"
    )
    assert big_rss - small_rss < 250, f"peak RSS {big_rss:.0f} MiB vs baseline {small_rss:.0f} MiB"

    with big_out.open() as fh:
        header = fh.readline().strip().split(",")
        n_out = sum(1 for _ in fh)
    assert header == _expected_columns()[1:] and n_out == n_rows


@pytest.mark.slow
def test_a_tampered_model_folder_runs_its_code_in_pyfunc_but_never_in_bp_predict(model, rows, tmp_path, capsys):
    """What the README says about trust: MLflow's loader executes a model-from-code's file; bp-predict reads weights."""
    import shutil

    (mlmodel,) = model["home"].glob("mlartifacts/models/*/artifacts/MLmodel")
    folder = tmp_path / "tampered"
    shutil.copytree(mlmodel.parent, folder)
    marker = tmp_path / "payload-ran"
    with open(folder / "pyfunc_model.py", "a") as fh:
        fh.write(f"\nfrom pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")

    out = tmp_path / "p.csv"
    code, err = predict_in_process(capsys, f"model={folder}", f"input={rows}", f"output={out}")
    assert code == 0, err
    assert not marker.exists(), "bp-predict ran code from the model folder"

    env = clean_env()
    load = f"import mlflow; mlflow.pyfunc.load_model({str(folder)!r})"
    proc = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == "ran"  # MLflow's design: only load models this way from a trusted store
