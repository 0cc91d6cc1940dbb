"""bp-predict: one small digits model trained once for the module by the real ``bp-train`` command, then
scored from its MLflow run URI, its registered name, its checkpoint and its bundle.

The model is trained with ``MLFLOW_TRACKING_URI`` unset, so into ``<BP_SERVICE_HOME>/mlflow.db`` by the default
rule, and every command runs in a working directory of its own elsewhere: ``runs:/`` must find the run by the
same rule, not in ``./mlflow.db``.

MLflow URIs are only exercised through the command line in a subprocess: in this process another test may
have called ``mlflow.set_tracking_uri``, which would win over ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import csv
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

from bp_service.bundle import load_bundle, net_from_bundle, predict_frame, save_bundle
from bp_service.serving.model import BPServiceModel, InputError, features_matrix
from bp_service.serving.predict import BLOCK_ROWS, main, parse_args, predict_rows

BIN = Path(sys.executable).parent
MODEL_NAME = "bp-predict-test"
N_ROWS = 500  # rows of the digits data the tests score


def _env(home: Path) -> dict[str, str]:
    """The default store rule: no MLFLOW_TRACKING_URI, the home folder says where the store is."""
    return clean_env(BP_SERVICE_HOME=str(home))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A two-epoch digits model (64 features, 10 classes), logged, registered and checkpointed.

    Trained and (by :func:`bp_predict`) scored from working directories that are not its home.
    """
    home = tmp_path_factory.mktemp("home")
    train_cwd, predict_cwd = tmp_path_factory.mktemp("train_cwd"), tmp_path_factory.mktemp("predict_cwd")
    args = [
        "experiment=digits",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"tracking.register_model={MODEL_NAME}",
    ]
    proc = subprocess.run(
        [str(BIN / "bp-train"), *args],
        capture_output=True,
        text=True,
        env=_env(home),
        cwd=train_cwd,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = re.search(r"MLflow run\s+([0-9a-f]{32})", proc.stdout).group(1)
    checkpoint = Path(re.search(r"checkpoint\s+(\S+\.ckpt)", proc.stdout).group(1))
    bundle_path = checkpoint.parent.parent / "model_bundle.pt"
    assert checkpoint.is_file() and bundle_path.is_file()
    assert (home / "mlflow.db").is_file() and not list(train_cwd.iterdir())  # the store is the home's, by default
    return {
        "home": home,
        "cwd": predict_cwd,
        "run_id": run_id,
        "checkpoint": checkpoint,
        "bundle_path": bundle_path,
    }


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


def bp_predict(
    model: dict, *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The real command, in a working directory that is neither the model's home nor this checkout."""
    return subprocess.run(
        [str(BIN / "bp-predict"), *args],
        capture_output=True,
        text=True,
        env=env if env is not None else _env(model["home"]),
        cwd=cwd or model["cwd"],
        timeout=600,
        check=False,
    )


def predict_in_process(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def _expected_columns() -> list[str]:
    return ["id", "prediction", *[f"proba_{k}" for k in range(10)]]


# --------------------------------------------------------------------------- the same predictions, every way in
def test_every_kind_of_model_reference_gives_the_same_file_as_the_pyfunc_model(
    model, rows, tmp_path, capsys, monkeypatch
):
    """Also the one store rule: bp-predict finds runs:/ in the home's store (and models:/ in MLFLOW_TRACKING_URI's,
    which wins over the home) from another folder, and so does MLflow's own loader given ``--tracking-uri``."""
    empty_home = tmp_path / "empty_home"
    empty_home.mkdir()
    by_uri = clean_env(BP_SERVICE_HOME=str(empty_home), MLFLOW_TRACKING_URI=f"sqlite:///{model['home'] / 'mlflow.db'}")
    outputs = {}
    for kind, ref, env in [
        ("run", f"runs:/{model['run_id']}/model", None),
        ("registered", f"models:/{MODEL_NAME}/latest", by_uri),
    ]:
        outputs[kind] = tmp_path / kind / "predictions.csv"  # the output's folder is created
        proc = bp_predict(model, f"model={ref}", f"input={rows}", f"output={outputs[kind]}", env=env)
        assert proc.returncode == 0, proc.stderr
        assert f"{N_ROWS} rows" in proc.stdout
    assert list(model["cwd"].iterdir()) == [] and list(empty_home.iterdir()) == []  # no ./mlflow.db, no ./mlruns
    for kind, ref in [("checkpoint", model["checkpoint"]), ("bundle", model["bundle_path"])]:
        outputs[kind] = tmp_path / f"{kind}.csv"
        code, err = predict_in_process(capsys, f"model={ref}", f"input={rows}", f"output={outputs[kind]}")
        assert code == 0, err
    reference = outputs["run"].read_bytes()
    assert all(path.read_bytes() == reference for path in outputs.values())

    got = pd.read_csv(outputs["run"], dtype={"id": str})
    assert list(got.columns) == _expected_columns()
    assert got["id"].tolist() == [f"r{i:05d}" for i in range(N_ROWS)]  # carried through verbatim, zeros kept

    # MLflow's own loader on the same rows, as the README says: MLFLOW_TRACKING_URI=$(bp-predict --tracking-uri),
    # then runs:/ from any folder. A labelled frame: the logged signature drops the extra column.
    (mlmodel,) = model["home"].glob("mlartifacts/models/*/artifacts/MLmodel")
    assert f"run_id: {model['run_id']}" in mlmodel.read_text()
    monkeypatch.setenv("BP_SERVICE_HOME", str(model["home"]))
    assert main(["--tracking-uri"]) == 0
    uri = capsys.readouterr().out.strip()
    labelled, expected_csv = tmp_path / "labelled.csv", tmp_path / "pyfunc.csv"
    pd.read_csv(rows).drop(columns="id").assign(label=load_digits().target[:N_ROWS]).to_csv(labelled, index=False)
    script = (
        "import sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('runs:/{model['run_id']}/model')\n"
        "model.predict(pd.read_csv(sys.argv[1])).to_csv(sys.argv[2], index=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(labelled), str(expected_csv)],
        capture_output=True,
        text=True,
        env=clean_env(MLFLOW_TRACKING_URI=uri),
        cwd=model["cwd"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(model["cwd"].iterdir()) == []
    expected = pd.read_csv(expected_csv)
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


def test_named_id_column_is_the_one_kept_when_passthrough_is_off(model, rows, tmp_path, capsys):
    frame = pd.read_csv(rows, dtype={"id": str}).rename(columns={"id": "customer"})
    frame["customer"] = frame["customer"].str.replace("r", "c-")
    frame.insert(30, "note", "seen")
    src, out = tmp_path / "customers.csv", tmp_path / "out.csv"
    frame.to_csv(src, index=False)
    args = [f"model={model['checkpoint']}", f"input={src}", f"output={out}"]

    assert predict_in_process(capsys, *args)[0] == 0  # by default every other column is carried
    assert list(pd.read_csv(out).columns) == ["customer", "note", *_expected_columns()[1:]]

    assert predict_in_process(capsys, *args, "passthrough=false")[0] == 0
    assert list(pd.read_csv(out).columns) == _expected_columns()[1:]  # not auto-detected: only "id" is

    assert predict_in_process(capsys, *args, "passthrough=false", "id_column=customer")[0] == 0
    got = pd.read_csv(out, dtype={"customer": str})
    assert list(got.columns) == ["customer", *_expected_columns()[1:]]
    assert got["customer"].tolist() == frame["customer"].tolist()


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
    if case == "missing_column_beside_a_misspelt_one":  # the file's other columns are named: one may be meant
        frame.rename(columns={"pixel_3_4": "pixel_3_4 "}).assign(colour="red").to_csv(path, index=False)
        return path, ["missing column(s) pixel_3_4;", "unexpected column(s) pixel_3_4 , colour"]
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
    "missing_column_beside_a_misspelt_one",
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
    proc = bp_predict(model, *args)
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
        ("0123456789abcdef0123456789abcdef", "no run with this id in sqlite:///"),  # a bare run id
    ],
)
def test_unknown_mlflow_model_is_one_line(model, rows, tmp_path, model_ref, needle):
    proc = bp_predict(model, f"model={model_ref}", f"input={rows}", f"output={tmp_path / 'o.csv'}")
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


def _aliases(depth: int) -> str:
    """An MLmodel whose bundle path is ``a0 = [], a_k = [a_k-1, a_k-1]``: 2**depth items, in a few hundred bytes."""
    lines = ["a0: &a0 []"] + [f"a{k}: &a{k} [*a{k - 1}, *a{k - 1}]" for k in range(1, depth + 1)]
    return "\n".join([*lines, f"flavors: {{python_function: {{artifacts: {{bundle: {{path: *a{depth}}}}}}}}}", ""])


MLMODELS = {
    "not UTF-8": (b"\xff\xfeflavors: x\n", "not a bp-service model (its MLmodel names no 'bundle' artifact)"),
    "a bundle path of aliases": (_aliases(24).encode(), "MLmodel gives an unsafe bundle path a list of 2"),
    "over a megabyte": (b"# " + b"x" * (1 << 20) + b"\n", "its MLmodel is over 1,048,576 bytes"),
}


@pytest.mark.parametrize("case", MLMODELS)
def test_a_model_folder_whose_mlmodel_is_damaged_is_one_line_naming_it(case, rows, tmp_path, capsys):
    content, needle = MLMODELS[case]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_bytes(content)
    code, err = predict_in_process(capsys, f"model={folder}", f"input={rows}", f"output={tmp_path / 'o.csv'}")
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith(f"bp-predict: error: {folder}: ") and needle in line, err


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
    argv = [
        "model=models:/m/latest",
        "input=a b.csv",
        "output=o.csv",
        "chunk_size=10",
        "id_column=key",
        "keep_target=1",
        "passthrough=false",
        "overwrite=true",
    ]
    cfg = parse_args(argv)
    assert (cfg.model, cfg.input, cfg.output, cfg.chunk_size, cfg.id_column, cfg.keep_target) == (
        "models:/m/latest",
        "a b.csv",
        "o.csv",
        10,
        "key",
        True,
    )
    assert (cfg.passthrough, cfg.overwrite) == (False, True)
    defaults = parse_args(["model=m", "input=i", "output=o"])
    assert defaults.chunk_size == 50_000 and defaults.keep_target is False
    assert defaults.passthrough is True and defaults.overwrite is False


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "chunk_size" in out and "keep_target" in out and "--tracking-uri" in out
    assert "passthrough" in out and "overwrite" in out and "run id" in out


# --------------------------------------------------------------------------- one store, by one rule, from anywhere
@pytest.mark.parametrize(
    ("how", "ref"),
    [("home", "runs:/0123456789abcdef0123456789abcdef/model"), ("home", "models:/m/1"), ("uri", "runs:/0a/model")],
)
def test_a_store_that_does_not_exist_is_one_line_and_nothing_is_created(rows, tmp_path, monkeypatch, capsys, how, ref):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("BP_SERVICE_HOME", str(home))
    db = home / "mlflow.db"
    if how == "uri":
        db = tmp_path / "stores" / "other.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    code, err = predict_in_process(capsys, f"model={ref}", f"input={rows}", f"output={tmp_path / 'o.csv'}")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"bp-predict: error: model {ref}: no MLflow store at {db} ("), err
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    assert not (tmp_path / "stores").exists() and not (tmp_path / "o.csv").exists()


def test_tracking_uri_prints_the_store_by_the_rule(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BP_SERVICE_HOME", str(tmp_path / "home"))
    assert main(["--tracking-uri"]) == 0
    assert capsys.readouterr().out == f"sqlite:///{(tmp_path / 'home').resolve() / 'mlflow.db'}\n"
    assert not (tmp_path / "home").exists()  # printing the URI creates nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert main(["--tracking-uri"]) == 0
    assert capsys.readouterr().out == "http://tracking.example:5000\n"
    assert main(["--tracking-uri", "model=m"]) == 2
    assert "--tracking-uri takes no other argument" in capsys.readouterr().err
    # the console command answers the same, before importing torch (it is meant for $(...) in shells)
    env = clean_env(BP_SERVICE_HOME=str(tmp_path / "home"))
    proc = subprocess.run([str(BIN / "bp-predict"), "--tracking-uri"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout == f"sqlite:///{(tmp_path / 'home').resolve() / 'mlflow.db'}\n"
    assert not (tmp_path / "home").exists()


# --------------------------------------------------------------------------- labelled files: the model's target column
TARGET = "digit"


def _rebundled(model: dict, path: Path, **meta: object) -> Path:
    """The trained model's bundle with ``meta`` entries replaced (a None value removes the entry)."""
    bundle = load_bundle(model["bundle_path"])
    changed = {k: v for k, v in {**bundle["meta"], **meta}.items() if v is not None}
    save_bundle(net_from_bundle(bundle), changed, path)
    return path


def _bundle_with_target(model: dict, path: Path, target: str | None) -> Path:
    """The trained model's bundle, its meta naming ``target`` as the target column (None: a bundle from before)."""
    return _rebundled(model, path, target=target)


@pytest.fixture(scope="module")
def labelled(model, rows, tmp_path_factory) -> dict:
    """A bundle that knows its target column, the rows with that column added, and the unlabelled rows' output."""
    folder = tmp_path_factory.mktemp("labelled")
    frame = pd.read_csv(rows, dtype={"id": str})
    frame.insert(20, TARGET, load_digits().target[:N_ROWS])  # somewhere among the features
    frame.to_csv(folder / "labelled.csv", index=False)
    bundle = _bundle_with_target(model, folder / "bundle.pt", TARGET)
    assert main([f"model={bundle}", f"input={rows}", f"output={folder / 'unlabelled_out.csv'}"]) == 0
    return {"bundle": bundle, "csv": folder / "labelled.csv", "frame": frame, "out": folder / "unlabelled_out.csv"}


def test_a_labelled_file_is_scored_as_the_unlabelled_one(labelled, tmp_path, capsys):
    out = tmp_path / "out.csv"
    args = [f"model={labelled['bundle']}", f"input={labelled['csv']}", f"output={out}"]
    code, err = predict_in_process(capsys, *args, "passthrough=false")
    assert code == 0, err
    assert out.read_bytes() == labelled["out"].read_bytes()  # the target column ignored: not in the output
    assert predict_in_process(capsys, *args)[0] == 0  # by default carried, where the input has it
    got = pd.read_csv(out, dtype={"id": str})
    assert list(got.columns[:3]) == ["id", TARGET, "prediction"]
    assert got[TARGET].tolist() == labelled["frame"][TARGET].tolist()
    pd.testing.assert_frame_equal(got.drop(columns=TARGET), pd.read_csv(labelled["out"], dtype={"id": str}))


def test_keep_target_copies_the_target_next_to_the_prediction(labelled, tmp_path, capsys):
    out = tmp_path / "out.csv"
    args = [f"model={labelled['bundle']}", f"input={labelled['csv']}", f"output={out}", "keep_target=true"]
    code, err = predict_in_process(capsys, *args, "chunk_size=64")
    assert code == 0, err
    got = pd.read_csv(out, dtype={"id": str})
    assert list(got.columns) == ["id", "prediction", TARGET, *[f"proba_{k}" for k in range(10)]]
    assert got[TARGET].tolist() == labelled["frame"][TARGET].tolist()
    pd.testing.assert_frame_equal(got.drop(columns=TARGET), pd.read_csv(labelled["out"], dtype={"id": str}))


def test_a_missing_feature_beside_the_target_names_the_other_columns(labelled, tmp_path, capsys):
    src, out = tmp_path / "extra.csv", tmp_path / "out.csv"
    labelled["frame"].assign(colour="red").drop(columns="pixel_0_3").to_csv(src, index=False)
    code, err = predict_in_process(capsys, f"model={labelled['bundle']}", f"input={src}", f"output={out}")
    assert code == 2 and err.count("\n") == 1, err
    assert "missing column(s) pixel_0_3; unexpected column(s) colour (" in err
    assert f"its target {TARGET} is also accepted" in err and not out.exists()


def test_a_bundle_without_a_recorded_target_carries_the_label_as_any_column(model, labelled, tmp_path, capsys):
    old = _bundle_with_target(model, tmp_path / "old.pt", None)
    out = tmp_path / "out.csv"
    code, err = predict_in_process(capsys, f"model={old}", f"input={labelled['csv']}", f"output={out}")
    assert code == 0, err
    assert list(pd.read_csv(out).columns[:3]) == ["id", TARGET, "prediction"]
    code, err = predict_in_process(capsys, f"model={old}", f"input={labelled['csv']}", f"output={out}", "keep_target=1")
    assert code == 2 and "keep_target=true: this model does not record its target column" in err


def test_keep_target_on_an_unlabelled_file_is_one_line(labelled, rows, tmp_path, capsys):
    out = tmp_path / "out.csv"
    code, err = predict_in_process(
        capsys, f"model={labelled['bundle']}", f"input={rows}", f"output={out}", "keep_target=true"
    )
    assert code == 2 and err.count("\n") == 1
    assert f"keep_target=true, but there is no column '{TARGET}' (the model's target)" in err and not out.exists()


def test_the_trained_models_own_target_column_is_accepted_and_kept(model, rows, tmp_path, capsys):
    """No hand-made bundle: the name bp-train recorded (scikit-learn's datasets call theirs "target")."""
    target = load_bundle(model["checkpoint"])["meta"]["target"]
    src, out = tmp_path / "labelled.csv", tmp_path / "out.csv"
    pd.read_csv(rows, dtype={"id": str}).assign(**{target: load_digits().target[:N_ROWS]}).to_csv(src, index=False)
    args = [f"model={model['checkpoint']}", f"input={src}", f"output={out}", "keep_target=true"]
    code, err = predict_in_process(capsys, *args)
    assert code == 0, err
    got = pd.read_csv(out)
    assert list(got.columns[:3]) == ["id", "prediction", target]
    assert got[target].tolist() == load_digits().target[:N_ROWS].tolist()


def test_the_pyfunc_model_accepts_the_target_column_too(labelled):
    """``BPServiceModel.predict`` itself (what ``mlflow models serve`` runs), on labelled rows."""
    import mlflow.pyfunc

    pyfunc = BPServiceModel()
    pyfunc.load_context(
        mlflow.pyfunc.PythonModelContext(artifacts={"bundle": str(labelled["bundle"])}, model_config={})
    )
    frame = labelled["frame"].drop(columns="id")
    got = pyfunc.predict(None, frame)
    expected = pyfunc.predict(None, frame.drop(columns=TARGET))
    pd.testing.assert_frame_equal(got, expected)
    assert got["prediction"].tolist() == pd.read_csv(labelled["out"])["prediction"].tolist()
    with pytest.raises(InputError, match=r"unexpected column\(s\) colour"):
        pyfunc.predict(None, frame.assign(colour="red"))


# --------------------------------------------------------------------------- read as training reads
def test_a_tab_separated_file_predicts_like_the_csv(model, rows, tmp_path, capsys):
    tsv, from_csv, from_tsv = tmp_path / "rows.tsv", tmp_path / "csv_out.csv", tmp_path / "tsv_out.csv"
    pd.read_csv(rows, dtype={"id": str}).to_csv(tsv, sep="\t", index=False)
    ckpt = f"model={model['checkpoint']}"
    assert predict_in_process(capsys, ckpt, f"input={rows}", f"output={from_csv}")[0] == 0
    code, err = predict_in_process(capsys, ckpt, f"input={tsv}", f"output={from_tsv}", "chunk_size=100")
    assert code == 0, err
    assert from_tsv.read_bytes() == from_csv.read_bytes()


def test_a_model_trained_with_mean_imputation_fills_missing_cells_the_same_way(model, rows, tmp_path, capsys):
    names = load_bundle(model["bundle_path"])["meta"]["feature_names"]
    means = [float(v) for v in np.linspace(0.5, 16.0, len(names))]  # distinct per column: the right one is used
    bundle = _rebundled(model, tmp_path / "imputing.pt", impute_mean=means)
    frame = pd.read_csv(rows, dtype={"id": str})
    gaps, filled = frame.copy(), frame.copy()
    for row, col in [(3, "pixel_2_5"), (3, "pixel_0_1"), (450, "pixel_7_7")]:
        gaps.loc[row, col] = None
        filled.loc[row, col] = means[names.index(col)]
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    filled.to_csv(tmp_path / "filled.csv", index=False)
    for name in ("gaps", "filled"):
        args = [f"model={bundle}", f"input={tmp_path / name}.csv", f"output={tmp_path / name}_out.csv"]
        code, err = predict_in_process(capsys, *args, "chunk_size=100")
        assert code == 0, err
    assert (tmp_path / "gaps_out.csv").read_bytes() == (tmp_path / "filled_out.csv").read_bytes()
    # the same gaps, without imputation in the model: named, as before
    code, err = predict_in_process(
        capsys, f"model={model['bundle_path']}", f"input={tmp_path / 'gaps.csv'}", f"output={tmp_path / 'x.csv'}"
    )
    assert code == 2 and "row 5, column 'pixel_0_1': missing" in err


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


@pytest.mark.parametrize(
    ("value", "kept"),
    [("...", "..."), ("on", "on"), ("1e5", "1e5"), ("2024-01-01", "2024-01-01"), ("${oc.env:HOME}", "${oc.env:HOME}"),
     ("[a", "[a"), ("null", "null")],
)  # fmt: skip
def test_a_file_name_is_taken_as_written(value, kept):
    """Values are text: never YAML (``on`` -> True, ``...`` -> a parse error) nor an interpolation (an env read)."""
    parsed = parse_args([f"model={value}", f"input={value}", f"output={value}", "chunk_size=7", "keep_target=true"])
    assert (parsed.model, parsed.input, parsed.output) == (kept, kept, kept)
    assert (parsed.chunk_size, parsed.keep_target, parsed.id_column) == (7, True, None)


# --------------------------------------------------------------------------- the training file: other columns carried
# pandas' index column (no name), quotes and a comma, a newline, a formula
ODD_HEADERS = ["", 'say "hi", twice', "two\nlines", "=HYPERLINK(1)"]


def _training_like(rows: Path, path: Path) -> pd.DataFrame:
    """``rows`` as a training table looks: text, a target and oddly named columns among the features."""
    frame = pd.read_csv(rows, dtype={"id": str})
    frame.insert(10, "island", ["Biscoe", "=1+1", "-cmd", "@SUM(A1)", "-1.5"] * (N_ROWS // 5))
    frame.insert(0, ODD_HEADERS[0], range(N_ROWS))
    frame.insert(40, ODD_HEADERS[1], "x")
    frame.insert(50, ODD_HEADERS[2], "NA")  # kept as written: only an empty cell is missing
    frame[ODD_HEADERS[3]] = ""
    frame["target"] = load_digits().target[:N_ROWS]
    frame.to_csv(path, index=False)
    return frame


def _as_written(path: Path) -> pd.DataFrame:
    """Every cell and column name as text, as the file has it (pandas would rename an empty name)."""
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = header
    return frame


def test_the_training_file_itself_is_scored_with_its_other_columns_carried(model, rows, tmp_path, capsys):
    src, plain, out, raw = tmp_path / "train.csv", tmp_path / "plain.csv", tmp_path / "out.csv", tmp_path / "raw.csv"
    frame = _training_like(rows, src)
    ckpt = f"model={model['checkpoint']}"
    assert predict_in_process(capsys, ckpt, f"input={rows}", f"output={plain}")[0] == 0
    code, err = predict_in_process(capsys, ckpt, f"input={src}", f"output={out}", "chunk_size=64")
    assert code == 0, err

    got = _as_written(out)
    carried = ["", "id", "island", ODD_HEADERS[1], ODD_HEADERS[2], "'" + ODD_HEADERS[3], "target"]  # input order
    assert list(got.columns) == [*carried, *_expected_columns()[1:]]
    assert got["island"].tolist() == ["Biscoe", "'=1+1", "'-cmd", "'@SUM(A1)", "-1.5"] * (N_ROWS // 5)
    assert got[""].tolist() == [str(i) for i in range(N_ROWS)] and set(got[ODD_HEADERS[2]]) == {"NA"}
    assert got["target"].tolist() == [str(t) for t in load_digits().target[:N_ROWS]]
    # row for row the same predictions as the file of features and ids alone
    expected = pd.read_csv(plain, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(got[expected.columns], expected)

    # whatever the chunking; and escape_formulas=false writes every carried cell and name as read
    code, _ = predict_in_process(capsys, ckpt, f"input={src}", f"output={raw}", "escape_formulas=false")
    assert code == 0
    written = _as_written(raw)
    assert list(written.columns[:7]) == ["", "id", "island", *ODD_HEADERS[1:], "target"]
    assert written["island"].tolist() == frame["island"].tolist()
    assert predict_in_process(capsys, ckpt, f"input={src}", f"output={raw}")[0] == 0
    assert raw.read_bytes() == out.read_bytes()

    # passthrough=false: only the id, as before
    assert predict_in_process(capsys, ckpt, f"input={src}", f"output={out}", "passthrough=false")[0] == 0
    assert out.read_bytes() == plain.read_bytes()


def test_a_carried_column_named_like_an_output_column_is_one_line(model, rows, tmp_path, capsys):
    src, out = tmp_path / "scored_before.csv", tmp_path / "out.csv"
    pd.read_csv(rows, dtype={"id": str}).assign(prediction=3).to_csv(src, index=False)  # a file scored before
    args = [f"model={model['checkpoint']}", f"input={src}", f"output={out}"]
    code, err = predict_in_process(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert f"{src}: passed-through column 'prediction' clashes with an output column; rename it, or leave it out" in err
    assert predict_in_process(capsys, *args, "passthrough=false")[0] == 0
    assert list(pd.read_csv(out).columns) == _expected_columns()


# --------------------------------------------------------------------------- a bare run id; folders and globs
def _shards(rows: Path, folder: Path) -> list[Path]:
    """``rows`` split into a CSV and a gzipped TSV, beside files a folder input must pass over."""
    folder.mkdir()
    frame = pd.read_csv(rows, dtype={"id": str})
    frame.iloc[:200].to_csv(folder / "part-0.csv", index=False)
    frame.iloc[200:].to_csv(folder / "part-1.tsv.gz", sep="\t", index=False)
    (folder / "_SUCCESS").write_text("")  # what Spark leaves in its output folders
    (folder / "notes.txt").write_text("not a table\n")
    (folder / ".part-2.csv.crc").write_text("")
    return [folder / "part-0.csv", folder / "part-1.tsv.gz"]


def test_a_bare_run_id_scores_a_folder_file_by_file(model, rows, tmp_path, capsys):
    """The run id exactly as bp-train printed it, and a folder in, a folder out, through the real command."""
    whole = tmp_path / "whole.csv"
    assert predict_in_process(capsys, f"model={model['checkpoint']}", f"input={rows}", f"output={whole}")[0] == 0
    _shards(rows, tmp_path / "in")
    proc = bp_predict(model, f"model={model['run_id']}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    assert f"bp-predict: 2 files, {N_ROWS} rows -> {tmp_path / 'out'}" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-0.csv", "part-1.csv"]
    parts = [pd.read_csv(tmp_path / "out" / f"part-{i}.csv", dtype={"id": str}) for i in (0, 1)]
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), pd.read_csv(whole, dtype={"id": str}))
    assert list(model["cwd"].iterdir()) == []


def test_a_run_id_without_a_model_is_one_line(model, rows, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{model['home'] / 'mlflow.db'}")  # not the global tracking URI
    run = client.create_run(client.get_experiment_by_name("digits").experiment_id)
    client.set_terminated(run.info.run_id, "FAILED")  # as a run that failed before logging its model
    out = tmp_path / "o.csv"
    proc = bp_predict(model, f"model={run.info.run_id}", f"input={rows}", f"output={out}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"bp-predict: error: model {run.info.run_id}: run {run.info.run_id} (failed) has no model "
        f"runs:/{run.info.run_id}/model ("
    )
    assert not out.exists()


def test_a_glob_is_scored_and_existing_outputs_are_replaced_only_when_asked(model, rows, tmp_path, capsys):
    _shards(rows, tmp_path / "in")
    out = tmp_path / "out"
    args = [f"model={model['checkpoint']}", f"input={tmp_path / 'in' / 'part-*'}", f"output={out}"]
    assert predict_in_process(capsys, *args)[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["part-0.csv", "part-1.csv"]
    (out / "part-1.csv").write_text("earlier results\n")

    code, err = predict_in_process(capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert f"{out / 'part-0.csv'}: already exists (2 of the 2 outputs do); " in err and "overwrite=true" in err
    assert (out / "part-1.csv").read_text() == "earlier results\n"

    assert predict_in_process(capsys, *args, "overwrite=true", "chunk_size=64")[0] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_a_bad_cell_in_a_later_file_leaves_no_output_at_all(model, rows, tmp_path, capsys):
    shards = _shards(rows, tmp_path / "in")
    frame = pd.read_csv(shards[1], sep="\t", dtype={"id": str}).astype({"pixel_2_5": object})
    frame.loc[250, "pixel_2_5"] = "seven"
    frame.to_csv(shards[1], sep="\t", index=False)
    out = tmp_path / "new" / "out"
    args = [f"model={model['checkpoint']}", f"input={tmp_path / 'in'}", f"output={out}", "chunk_size=100"]
    code, err = predict_in_process(capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert f"{shards[1]}: row 252, column 'pixel_2_5'" in err
    assert not out.exists() and [p for p in tmp_path.rglob("*.tmp")] == []


@pytest.mark.parametrize(
    ("given", "output", "needle"),
    [
        ("nothing-*.csv", "out", "input={tmp}/nothing-*.csv: the pattern matches no file"),
        ("empty", "out", "{tmp}/empty: a folder without .csv or .tsv files"),
        ("in", "out.csv", "output={tmp}/out.csv: input={tmp}/in names 2 file(s), so output= is the folder"),
        ("in", "in", "{tmp}/in/part-0.csv: output would overwrite an input"),
        ("clash", "out", "{tmp}/clash/a.csv and {tmp}/clash/a.tsv would both be written to {tmp}/out/a.csv"),
    ],
)
def test_a_folder_or_glob_that_cannot_be_scored_is_one_line(model, rows, tmp_path, capsys, given, output, needle):
    _shards(rows, tmp_path / "in")
    (tmp_path / "empty").mkdir()
    (tmp_path / "clash").mkdir()
    for name in ("a.csv", "a.tsv"):
        (tmp_path / "clash" / name).write_bytes((tmp_path / "in" / "part-0.csv").read_bytes())
    before = sorted(tmp_path.rglob("*"))
    code, err = predict_in_process(
        capsys, f"model={model['checkpoint']}", f"input={tmp_path / given}", f"output={tmp_path / output}"
    )
    assert code == 2 and err.count("\n") == 1, err
    assert needle.format(tmp=tmp_path) in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no folder created


# --------------------------------------------------------------------------- the cluster paths the docs give (optional)
def _docs_example(marker: str) -> str:
    """The Python block of docs/predicting.md that contains ``marker``: the test runs what the page shows."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "predicting.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if marker in b]
    return block


def _beside_bp_predict(out: Path, model: dict, rows: Path, tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows a cluster example wrote into ``out``, in bp-predict's order; bp-predict's own output on ``rows``)."""
    got = pd.concat([pd.read_csv(p, dtype={"id": str}) for p in out.glob("*.csv")])
    expected = tmp_path / "expected.csv"
    assert main([f"model={model['checkpoint']}", f"input={rows}", f"output={expected}"]) == 0
    want = pd.read_csv(expected, dtype={"id": str})
    return got.set_index("id").loc[want["id"]].reset_index(), want


@pytest.mark.slow
def test_the_ray_data_example_scores_a_folder_like_bp_predict(model, rows, tmp_path):
    pytest.importorskip("ray")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("needs unshare --net: Ray binds every interface it sees, and nothing may leave loopback")
    _shards(rows, tmp_path / "in")
    (tmp_path / "in" / "part-1.tsv.gz").unlink()  # Ray's read_csv reads comma-separated files
    script = _docs_example("map_batches").replace("<run id>", model["run_id"])
    script = script.replace('"data/"', repr(str(tmp_path / "in"))).replace('"scored/"', repr(str(tmp_path / "out")))
    (tmp_path / "score.py").write_text(script)
    env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{model['home'] / 'mlflow.db'}", RAY_ADDRESS="local")
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} score.py"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _beside_bp_predict(tmp_path / "out", model, tmp_path / "in" / "part-0.csv", tmp_path)
    assert got["prediction"].tolist() == want["prediction"].tolist()


@pytest.mark.slow
def test_the_spark_udf_example_gives_every_probability_column(model, rows, tmp_path):
    pytest.importorskip("pyspark")
    script = _docs_example("spark_udf").replace("<run id>", model["run_id"])
    script = script.replace('"data/"', repr(str(rows))).replace('"scored/"', repr(str(tmp_path / "out")))
    (tmp_path / "score.py").write_text(script)
    env = clean_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{model['home'] / 'mlflow.db'}",
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
    )
    proc = subprocess.run(
        [sys.executable, "score.py"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _beside_bp_predict(tmp_path / "out", model, rows, tmp_path)
    assert got["prediction"].tolist() == want["prediction"].tolist()
    np.testing.assert_allclose(got[want.columns[2:]].to_numpy(), want.iloc[:, 2:].to_numpy(), atol=1e-6)
