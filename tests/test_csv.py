"""CSV tables as users bring them: text columns, empty cells, other separators; and every CSV error, as one line.

Each error names the file, and every column (and row) at fault, and says how to go on; the way on it names works
when pasted back. Generated tables (hypothesis) give a clean error or a correct result, and the clean ones a result.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from omegaconf import OmegaConf

from bp_service.tables import read_header, sniff_separator
from bp_service.training.config import DataConfig
from bp_service.training.data import DataError, prepare
from bp_service.training.recipe import train

QUICK = ["tracking.enabled=false", "trainer.max_epochs=3"]
NUMERIC = ["Cylinders", "Displacement", "Horsepower", "Weight_in_lbs", "Acceleration"]
MISSING_HP = [38, 44, 120, 200, 251, 300]  # 0-based data rows: spreadsheet rows 40, 46, ...


def cars(n: int = 320, seed: int = 0) -> pd.DataFrame:
    """Shaped like vega's cars: a text Name and Origin beside numeric columns; miles per gallon as the target."""
    rng = np.random.default_rng(seed)
    cylinders = rng.choice([4, 6, 8], size=n)
    displacement = cylinders * rng.uniform(20, 45, size=n)
    horsepower = displacement * rng.uniform(0.4, 0.7, size=n)
    weight = 1500 + displacement * rng.uniform(6, 9, size=n)
    return pd.DataFrame(
        {
            "Name": [f"car model {i}" for i in range(n)],
            "Miles_per_Gallon": (60 - 0.004 * weight - 0.05 * horsepower + rng.normal(0, 2, size=n)).round(2),
            "Cylinders": cylinders,
            "Displacement": displacement.round(1),
            "Horsepower": horsepower.round(0),
            "Weight_in_lbs": weight.round(0),
            "Acceleration": rng.uniform(8, 25, size=n).round(1),
            "Origin": rng.choice(["USA", "Europe", "Japan"], size=n),
        }
    )


def write(frame: pd.DataFrame, path, sep: str = ",") -> str:
    frame.to_csv(path, index=False, sep=sep)
    return str(path)


def last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # two bp-train processes
def test_text_columns_are_named_with_the_features_that_would_work(cli, tmp_path):
    path = write(cars(), tmp_path / "cars.csv")
    args = ["data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", "trainer=cpu", *QUICK]
    result = cli("bp-train", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    line = last_error(result)
    assert "Traceback" not in result.stderr
    assert "not numeric: column(s) 'Name' (row 2: 'car model 0'), 'Origin' (row 2: " in line
    hint = f"data.features=[{','.join(NUMERIC)}]"
    assert f"'{hint}'" in line  # quoted for the shell
    # the way on, pasted back, trains
    again = cli("bp-train", *args, hint, "trainer.enable_progress_bar=false")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "test/rmse" in again.stdout


def test_a_column_name_that_needs_quotes_is_quoted_in_the_hint(compose_cfg, tmp_path):
    frame = cars().rename(columns={"Weight_in_lbs": "Weight (lbs)"})
    path = write(frame, tmp_path / "cars.csv")
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", *QUICK)
    with pytest.raises(DataError) as info:
        prepare(cfg.data, cfg.seed)
    hint = str(info.value).split("'data.features=")[1].rstrip("'")
    assert hint == '[Cylinders,Displacement,Horsepower,"Weight (lbs)",Acceleration]'
    # Hydra reads the pasted list back as those column names
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", f"data.features={hint}")
    assert list(cfg.data.features) == ["Cylinders", "Displacement", "Horsepower", "Weight (lbs)", "Acceleration"]


@pytest.fixture
def with_gaps(tmp_path) -> tuple[str, pd.DataFrame]:
    """The numeric cars table with 6 empty Horsepower cells and one row without a target."""
    frame = cars()[["Miles_per_Gallon", *NUMERIC]]
    frame.loc[MISSING_HP, "Horsepower"] = np.nan
    frame.loc[10, "Miles_per_Gallon"] = np.nan
    return write(frame, tmp_path / "gaps.csv"), frame


def test_missing_cells_are_counted_by_column(compose_cfg, with_gaps):
    path, _ = with_gaps
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", *QUICK)
    message = (
        r"gaps.csv: missing values: column 'Horsepower': 6 rows missing \(first: row 40\); "
        r"column 'Miles_per_Gallon': 1 row missing \(first: row 12\); data.missing=drop .*data.missing=mean"
    )
    with pytest.raises(DataError, match=message):
        prepare(cfg.data, cfg.seed)


@pytest.mark.slow  # a bp-train process
def test_missing_cells_end_bp_train_with_one_line(cli, with_gaps):
    path, _ = with_gaps
    result = cli("bp-train", "data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", "trainer=cpu", *QUICK)
    assert result.returncode == 2
    line = last_error(result)
    assert "column 'Horsepower': 6 rows missing (first: row 40)" in line
    assert "column 'Miles_per_Gallon': 1 row missing (first: row 12)" in line
    assert "data.missing=drop" in line and "data.missing=mean" in line


def test_every_problem_of_a_file_is_named_in_one_error(compose_cfg, with_gaps):
    """Text columns, an infinite cell and missing cells: all three in one line, each naming its columns and row,
    from the loader the run itself uses (bp-train's check before torch reads the file with the same rules)."""
    _, frame = with_gaps
    frame = frame.assign(Origin=cars()["Origin"], Displacement=frame["Displacement"].astype(object))
    frame.loc[6, "Displacement"] = "inf"
    path = write(frame, with_gaps[0].replace("gaps.csv", "three.csv"))
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", *QUICK)
    with pytest.raises(DataError) as info:
        prepare(cfg.data, cfg.seed)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: 3 problems: (1) not numeric: column(s) ")
    assert "(1) not numeric: column(s) 'Origin' (row 2: " in message
    assert "(2) row 8, column 'Displacement': not a finite number: 'inf'" in message
    assert "(3) missing values: column 'Horsepower': 6 rows missing (first: row 40); " in message
    assert "column 'Miles_per_Gallon': 1 row missing (first: row 12)" in message


def test_missing_drop_leaves_those_rows_out(compose_cfg, with_gaps):
    path, frame = with_gaps
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", "data.missing=drop", *QUICK)
    data = prepare(cfg.data, cfg.seed)
    assert sum(len(x) for x in data.x.values()) == len(frame) - 7
    assert data.meta["impute_mean"] is None
    assert np.isfinite(train(cfg)["metrics"]["test/rmse"])


def test_missing_mean_fills_from_the_training_split_and_travels_with_the_model(compose_cfg, with_gaps):
    path, frame = with_gaps
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", "data.missing=mean", *QUICK)
    data = prepare(cfg.data, cfg.seed)
    assert sum(len(x) for x in data.x.values()) == len(frame) - 1  # only the row without a target is left out
    hp = NUMERIC.index("Horsepower")
    fill = data.meta["impute_mean"][hp]
    # mean imputation keeps the training column's mean: the scaler, fitted on the filled training split, sees it
    assert fill == pytest.approx(data.scaler_mean[hp], rel=1e-12)
    assert fill != pytest.approx(frame["Horsepower"].mean(), rel=1e-6)  # not the whole file's mean
    result = train(cfg)
    meta = torch.load(result["last_checkpoint"], weights_only=True)["bp_service"]["meta"]
    assert meta["impute_mean"] == data.meta["impute_mean"]
    assert meta["target"] == "Miles_per_Gallon"


def test_missing_option_is_checked(compose_cfg, with_gaps):
    """data.missing is a closed set in the schema: Hydra refuses another name and lists the valid ones."""
    path, _ = with_gaps
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", "data.missing=zero", *QUICK)
    assert "Invalid value 'zero', expected one of [error, drop, mean]" in str(err.value.__cause__)


@pytest.mark.parametrize(("sep", "name"), [("\t", "tab"), (";", "semicolon")])
def test_other_separators_are_detected_and_train_alike(compose_cfg, tmp_path, sep, name):
    frame = cars()[["Miles_per_Gallon", *NUMERIC]]
    comma = write(frame, tmp_path / "cars.csv")
    other = write(frame, tmp_path / f"cars-{name}.csv", sep=sep)
    assert sniff_separator(other) == sep and sniff_separator(comma) == ","
    assert read_header(other) == read_header(comma) == list(frame.columns)  # bp-predict's reader too
    results = [
        train(compose_cfg("data=csv", f"data.path={p}", "data.target=Miles_per_Gallon", *QUICK, run_dir=f"r{i}"))
        for i, p in enumerate([comma, other])
    ]
    assert results[0]["metrics"] == results[1]["metrics"]


def test_a_single_column_file_is_still_one_column(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("value\n1.5\n2.5\n3\n")
    assert sniff_separator(path) == ","
    assert read_header(path) == ["value"]


# --------------------------------------------------------------------------- property: malformed CSVs
CELL = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-5, 5),
    st.sampled_from(["", "abc", "1e3", " 2 ", "nan", "inf", "-", "1,5"]),
)


@st.composite
def csv_frames(draw):
    n_cols = draw(st.integers(1, 4))
    n_rows = draw(st.integers(0, 40))
    columns = [f"f{i}" for i in range(n_cols)]
    rows = [[draw(CELL) for _ in columns] for _ in range(n_rows)]
    labels = [draw(st.sampled_from(["a", "b", "c", ""])) for _ in range(n_rows)]
    frame = pd.DataFrame(rows, columns=columns)
    if draw(st.booleans()):
        frame["label"] = labels
    return frame


def _clean(frame: pd.DataFrame) -> bool:
    """A table the loader must read: numbers in every feature cell, a label on every row, >= 2 classes of >= 3 rows,
    and rows enough for a stratified 70/15/15 split (each of the 15% parts at least one row per class). The loader may
    still read tables this says no to (a numeric text cell)."""
    if "label" not in frame.columns or frame.shape[1] < 2:
        return False
    cells = frame.drop(columns="label").to_numpy(dtype=object).ravel()
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in cells)
    counts = frame["label"].value_counts()
    enough = math.ceil(len(frame) * 0.15) >= len(counts)
    return numbers and "" not in counts and len(counts) >= 2 and counts.min() >= 3 and enough


def _assert_read_correctly(prepared, frame: pd.DataFrame) -> None:
    """Every row, in some split: the features unscaled back to the table's values, each label its class's output
    (one-hot; two classes: one 0/1 output, 1 for the second)."""
    features = [c for c in frame.columns if c != "label"]
    assert prepared.task == "classification" and prepared.feature_names == features
    assert prepared.classes == sorted(frame["label"].unique())
    x = torch.cat([prepared.x[s] for s in ("train", "val", "test")]).double().numpy()
    y = torch.cat([prepared.y[s] for s in ("train", "val", "test")])
    assert len(x) == len(frame) and torch.isfinite(y).all() and np.isfinite(x).all()
    unscaled = x * np.asarray(prepared.scaler_scale) + np.asarray(prepared.scaler_mean)
    for i, column in enumerate(features):
        expected = np.sort(frame[column].to_numpy(dtype=np.float64))
        scale = max(np.abs(expected).max(), 1.0)
        np.testing.assert_allclose(np.sort(unscaled[:, i]), expected, rtol=1e-5, atol=1e-5 * scale)
    counts = [float((frame["label"] == c).sum()) for c in prepared.classes]
    if len(prepared.classes) == 2:
        assert y.shape[1] == 1 and set(y.flatten().tolist()) <= {0.0, 1.0}
        assert [len(y) - y.sum().item(), y.sum().item()] == counts
    else:
        assert y.shape[1] == len(prepared.classes) and y.sum(1).eq(1).all()  # one-hot
        assert y.sum(0).tolist() == counts


def _frame(n: int, n_features: int, labels: str, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, n_features)) * 10, columns=[f"f{i}" for i in range(n_features)])
    frame["f0"] = rng.integers(-5, 5, size=n)  # an integer column beside the floats
    frame["label"] = [labels[i % len(labels)] for i in range(n)]
    return frame


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=csv_frames())
@example(frame=_frame(40, 3, "abc"))
@example(frame=_frame(7, 1, "ab"))  # the fewest rows two classes split into train, val and test
@example(frame=_frame(40, 4, "ab").assign(f1=lambda f: f["f1"].astype("float32")))
def test_loader_gives_a_clean_error_or_a_correct_result(tmp_path, frame):
    path = tmp_path / "generated.csv"
    frame.to_csv(path, index=False)
    cfg = OmegaConf.structured(DataConfig(name="csv", path=str(path), target="label"))
    try:
        prepared = prepare(cfg, seed=0)
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(str(path)), message
        assert not _clean(frame), f"a clean table was refused: {message}"
        return
    assert "label" in frame.columns
    n = sum(len(prepared.x[s]) for s in ("train", "val", "test"))
    assert n == len(frame)
    for split in ("train", "val", "test"):
        assert torch.isfinite(prepared.x[split]).all()
        assert torch.isfinite(prepared.y[split]).all()
    if _clean(frame):
        _assert_read_correctly(prepared, frame)


@st.composite
def clean_frames(draw):
    """Tables the loader must read (``_clean``): finite numbers of any float32 size, 2-3 classes of >= 3 rows."""
    n_cols = draw(st.integers(1, 4))
    classes = draw(st.sampled_from(["ab", "abc", "xy"]))
    per_class = [draw(st.integers(5, 12)) for _ in classes]  # >= 14 rows: a stratified split of 3 classes
    labels = draw(st.permutations([c for c, k in zip(classes, per_class) for _ in range(k)]))
    number = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-5, 5))
    rows = [[draw(number) for _ in range(n_cols)] for _ in labels]
    return pd.DataFrame(rows, columns=[f"f{i}" for i in range(n_cols)]).assign(label=labels)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=clean_frames())
def test_loader_reads_every_clean_table(tmp_path, frame):
    assert _clean(frame)
    path = tmp_path / "clean.csv"
    frame.to_csv(path, index=False)
    _assert_read_correctly(
        prepare(OmegaConf.structured(DataConfig(name="csv", path=str(path), target="label")), 0), frame
    )


def test_three_classes_too_few_for_a_stratified_split_are_one_line(tmp_path):
    """9 rows of 3 classes pass the loader's own row count (3 per class) but not scikit-learn's stratified split
    (2 test rows for 3 classes): the user should get the loader's one-line error, not a ValueError."""
    path = tmp_path / "few.csv"
    _frame(9, 2, "abc").to_csv(path, index=False)
    with pytest.raises(DataError, match=r"too few|at least"):
        prepare(OmegaConf.structured(DataConfig(name="csv", path=str(path), target="label")), seed=0)


GOOD_ROWS = "".join(f"{i},{i % 7},{'x' if i % 2 else 'y'}\n" for i in range(40))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("", "file is empty"),
        ("a,b,label\n", "has a header but no data rows"),
        ("a,b,other\n" + GOOD_ROWS, "target column 'label' not found (columns: a, b, other)"),
        ("a,b,label\n1,2,x\n3,hello,y\n" + GOOD_ROWS, "not numeric: column(s) 'b' (row 3: 'hello')"),
        ("a,b,label\n1,2,x\n3,,y\n" + GOOD_ROWS, "missing values: column 'b': 1 row missing (first: row 3)"),
        ("a,b,label\n1,inf,x\n" + GOOD_ROWS, "row 2, column 'b': not a finite number"),
        ("a,b,label\n" + "1,2,x\n" * 30, "has a single class ('x')"),
        ("a,b,label\n1,2,x\n3,4,y\n5,6,x\n", "too few"),
    ],
    ids=["missing", "empty", "header_only", "no_target", "text", "nan", "inf", "one_class", "few_rows"],
)
def test_bad_csv_is_one_line_naming_file_row_and_column(tmp_path, content, message):
    path = tmp_path / "input.csv"
    if content is not None:
        path.write_text(content)
    cfg = OmegaConf.structured(DataConfig(name="csv", path=str(path), target="label"))
    with pytest.raises(DataError) as info:
        prepare(cfg, seed=0)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_csv_through_the_cli_leaves_no_run_behind(tmp_path, cli):
    path = tmp_path / "input.csv"
    path.write_text("a,b,label\n1,2,x\n3,hello,y\n" + GOOD_ROWS)
    result = cli("bp-train", "data=csv", f"data.path={path}", "data.target=label", "trainer=cpu")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"bp-train: error: {path}: not numeric: column(s) 'b' (row 3: 'hello'); "
        "train on the numeric ones with 'data.features=[a]'"
    )
    # The data is checked before any run is opened: the store (an empty one if bp-train made none) holds no run.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


# --------------------------------------------------------------------------- property: CSVs given to bp-predict
def _tiny_bundle() -> dict:
    """A 3-4-2 classifier over features x1..x3, built by hand: no training needed to test the reader."""
    from bp_service.layers import MLP

    torch.manual_seed(0)
    net = MLP([3, 4, 2])
    meta = {
        **{"task": "classification", "feature_names": ["x1", "x2", "x3"], "classes": ["no", "yes"]},
        **{"scaler_mean": [0.0, 1.0, 2.0], "scaler_scale": [1.0, 2.0, 3.0], "target_mean": 0.0, "target_scale": 1.0},
    }
    architecture = {"sizes": [3, 4, 2], "activations": list(net.activations), "fused": True, "bias": True}
    return {"state_dict": net.state_dict(), "meta": meta, "architecture": architecture}


@st.composite
def predict_frames(draw):
    columns = draw(st.lists(st.sampled_from(["x1", "x2", "x3", "id", "x4"]), min_size=0, max_size=5, unique=True))
    n_rows = draw(st.integers(0, 30))
    return pd.DataFrame([[draw(CELL) for _ in columns] for _ in range(n_rows)], columns=columns)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=predict_frames(), chunk_size=st.integers(1, 50))
@example(
    frame=pd.DataFrame({"id": ["a", "b", "c"], "x3": [3, 0, 1], "x1": [1.5, -2, 0], "x2": [0, 0, 7]}), chunk_size=2
)
@example(  # carried through as written: a leading zero, a trailing one, an empty cell
    frame=pd.DataFrame({"x1": [0.0, 1], "x2": [1, 2], "x3": [2, 3], "id": ["007", "b"], "x4": ["5.50", ""]}),
    chunk_size=1,
)
def test_bp_predict_gives_a_clean_error_or_a_correct_result(tmp_path, frame, chunk_size):
    from bp_service.bundle import net_from_bundle
    from bp_service.serving.model import InputError
    from bp_service.serving.predict import predict_csv, predict_rows

    bundle = _tiny_bundle()
    source, out = tmp_path / "in.csv", tmp_path / "out.csv"
    out.unlink(missing_ok=True)
    frame.to_csv(source, index=False)
    try:
        n = predict_csv(bundle, source, out, chunk_size=chunk_size)
    except InputError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(str(source)), message
        assert not out.exists(), "no output on error"
        return
    written = pd.read_csv(out)
    assert n == len(frame) == len(written)
    reread = pd.read_csv(source)[["x1", "x2", "x3"]].apply(pd.to_numeric, errors="raise").to_numpy(dtype=float)
    expected = predict_rows(net_from_bundle(bundle), bundle["meta"], reread)
    assert written["prediction"].tolist() == expected["prediction"].tolist()
    # Columns the model does not use (an id, an extra x4) are carried through, in their order, before the prediction.
    carried = [c for c in frame.columns if c not in ("x1", "x2", "x3")]
    assert list(written.columns) == [*carried, "prediction", "proba_no", "proba_yes"]
    raw = pd.read_csv(source, dtype=str, keep_default_na=False)
    assert pd.read_csv(out, dtype=str, keep_default_na=False)[carried].equals(raw[carried])
