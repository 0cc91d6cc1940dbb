"""Defaults that converge, and regression metrics in the target's own units.

Every built-in ``data=`` option trains with the defaults alone (``bp-train data=X``), cut at 20 epochs to keep
this suite quick, to a finite loss that beats the trivial model: the majority class of the training split
(classification), or the training mean (regression), both scored on the run's own test split. The whole
defaults, to scikit-learn's level on the same split: tests/test_defaults_vs_sklearn.py (slow).
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import clean_env
from mlflow import MlflowClient
from sklearn.dummy import DummyClassifier, DummyRegressor

from bp_service.bundle import load_bundle, net_from_bundle, predict_frame
from bp_service.training.cli import CONF_DIR
from bp_service.training.data import prepare
from bp_service.training.recipe import train

SLOW = {"digits", "synthetic"}  # a few seconds each with the defaults on two cores
DATASETS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "csv")  # csv: tested below
BUILT_IN = [pytest.param(d, marks=pytest.mark.slow) if d in SLOW else d for d in DATASETS]


def labels(y: torch.Tensor) -> np.ndarray:
    """Class indices from the loss targets: one 0/1 sigmoid column, or one-hot."""
    return (y[:, 0] > 0.5).long().numpy() if y.shape[1] == 1 else y.argmax(1).numpy()


def in_units(y: torch.Tensor, data) -> np.ndarray:
    return y[:, 0].double().numpy() * data.target_scale + data.target_mean


def baseline(data) -> tuple[str, float]:
    """(the test metric to beat, the trivial model's value of it) on the same split the run used."""
    if data.task == "classification":
        dummy = DummyClassifier(strategy="most_frequent").fit(data.x["train"], labels(data.y["train"]))
        return "test/acc", float(dummy.score(data.x["test"], labels(data.y["test"])))
    dummy = DummyRegressor(strategy="mean").fit(data.x["train"], in_units(data.y["train"], data))
    y_test = in_units(data.y["test"], data)
    return "test/rmse", float(np.sqrt(np.mean((dummy.predict(data.x["test"]) - y_test) ** 2)))


def test_the_default_optimizer_is_adam(compose_cfg):
    assert compose_cfg().optimizer._target_ == "torch.optim.Adam"
    # the presets keep their own choices
    digits = compose_cfg("experiment=digits")
    assert (digits.optimizer._target_, digits.optimizer.lr, digits.optimizer.momentum) == ("torch.optim.SGD", 0.5, 0.9)
    blog = compose_cfg("experiment=blog_321")
    assert (blog.optimizer._target_, blog.optimizer.lr, blog.optimizer.momentum) == ("torch.optim.SGD", 2.0, 0.0)


@pytest.mark.parametrize("dataset", BUILT_IN)
def test_defaults_converge_and_beat_the_trivial_model(compose_cfg, dataset):
    cfg = compose_cfg(f"data={dataset}", "tracking.enabled=false", "trainer.max_epochs=20")
    metrics = train(cfg)["metrics"]
    metric, trivial = baseline(prepare(cfg.data, cfg.seed))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if metric == "test/acc":
        assert metrics[metric] > trivial + 0.1, (metrics, trivial)
    else:
        assert metrics[metric] < 0.9 * trivial, (metrics, trivial)
        assert {"test/rmse", "test/mae"} <= metrics.keys()


def test_a_diverging_run_says_what_to_try(compose_cfg):
    cfg = compose_cfg("data=diabetes", "optimizer=sgd", "optimizer.lr=1e6", "tracking.enabled=false")
    hint = r"non-finite.*try optimizer\.lr=100000 \(a tenth of 1e\+06\) or optimizer=adam"
    with pytest.raises(RuntimeError, match=hint):
        train(cfg)


# --------------------------------------------------------------------------- regression in the target's units
def cars_like(n: int, seed: int = 0) -> pd.DataFrame:
    """A numeric regression table shaped like vega's cars: miles per gallon from engine and weight."""
    rng = np.random.default_rng(seed)
    cylinders = rng.choice([4, 6, 8], size=n)
    displacement = cylinders * rng.uniform(20, 45, size=n)
    horsepower = displacement * rng.uniform(0.4, 0.7, size=n)
    weight = 1500 + displacement * rng.uniform(6, 9, size=n)
    mpg = 60 - 0.004 * weight - 0.05 * horsepower + rng.normal(0, 2, size=n)
    return pd.DataFrame(
        {
            "Cylinders": cylinders,
            "Displacement": displacement.round(1),
            "Horsepower": horsepower.round(0),
            "Weight_in_lbs": weight.round(0),
            "Acceleration": rng.uniform(8, 25, size=n).round(1),
            "Miles_per_Gallon": mpg.round(2),
        }
    )


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    """One real ``bp-train`` on a cars-like CSV, defaults and tracking on: its stdout, store and table."""
    home = tmp_path_factory.mktemp("home")
    table = cars_like(400)
    path = home / "cars.csv"
    table.to_csv(path, index=False)
    args = ["data=csv", f"data.path={path}", "data.target=Miles_per_Gallon", "trainer=cpu"]
    env = clean_env(BP_SERVICE_HOME=str(home))
    exe = Path(sys.executable).parent / "bp-train"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"stdout": proc.stdout, "home": home, "table": table, "path": path, "args": args}


def summary_value(stdout: str, name: str) -> float:
    return float(next(line.split()[1] for line in stdout.splitlines() if line.strip().startswith(name + " ")))


def only_run(home: Path):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments)
    return run


@pytest.mark.slow
def test_regression_reports_rmse_and_mae_in_the_targets_units(regression_run, compose_cfg):
    out = regression_run["stdout"]
    checkpoint = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("checkpoint "))
    bundle = load_bundle(checkpoint)
    assert bundle["meta"]["target"] == "Miles_per_Gallon"
    # the run's test rows (same config, same seed), their labels looked up in the file by their features
    data = prepare(compose_cfg(*regression_run["args"]).data, 42)
    table = regression_run["table"]
    label_of = {tuple(row[:-1]): row[-1] for row in table.to_numpy()}
    y = np.array([label_of[tuple(row)] for row in data.raw_test])
    pred = predict_frame(net_from_bundle(bundle), bundle["meta"], data.raw_test)["prediction"].to_numpy()
    rmse, mae = np.sqrt(np.mean((pred - y) ** 2)), np.mean(np.abs(pred - y))

    metrics = only_run(regression_run["home"]).data.metrics
    assert metrics["test/rmse"] == pytest.approx(rmse, rel=1e-4)
    assert metrics["test/mae"] == pytest.approx(mae, rel=1e-4)
    assert {"val/rmse", "val/mae"} <= metrics.keys()
    assert summary_value(out, "test/rmse") == pytest.approx(rmse, abs=1e-4)
    assert summary_value(out, "test/mae") == pytest.approx(mae, abs=1e-4)
    # in miles per gallon, and better than always answering the training mean
    assert rmse < 0.9 * baseline(data)[1]
