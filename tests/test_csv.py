"""CSV tables as users bring them (issue 13, item 8): text columns, empty cells, other separators.

Each error names every column at fault and says how to go on; the way on it names works when pasted back.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from bp_service.tables import read_header, sniff_separator
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
    path, _ = with_gaps
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", "data.missing=zero", *QUICK)
    with pytest.raises(ValueError, match=r"data.missing must be one of error, drop, mean, got 'zero'"):
        train(cfg)


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
