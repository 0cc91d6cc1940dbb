"""bp-train's defaults against scikit-learn, on the same rows.

Every built-in ``data=`` option (``csv`` needs a file) is trained by the real ``bp-train data=X`` with nothing
else changed but tracking off, and must reach the better of scikit-learn's linear model and MLP, each with its
default settings after a ``StandardScaler``, fitted on the run's own training split and scored on its own test
split (``prepare`` with the run's config and seed gives the identical rows):

- classification: test/acc at least the better accuracy minus 0.01;
- regression: test/rmse, in the target's units, at most 1% above the better RMSE. RMSE and not R2: it is what the
  summary prints, and 1% of it is a like-for-like margin whatever the target's spread.
"""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clean_env
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bp_service.training.cli import CONF_DIR
from bp_service.training.data import prepare

DATASETS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "csv")


def labels(y: torch.Tensor) -> np.ndarray:
    """Class indices from the loss targets: one 0/1 sigmoid column, or one-hot."""
    return (y[:, 0] > 0.5).long().numpy() if y.shape[1] == 1 else y.argmax(1).numpy()


def sklearn_best(data) -> tuple[str, float, dict[str, float]]:
    """(the summary's test metric, scikit-learn's better value of it, each model's) on the run's own split."""
    x_train, x_test = data.x["train"].numpy(), data.x["test"].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # MLP's default 200 iterations: as a user gets them
        if data.task == "classification":
            y_train, y_test = labels(data.y["train"]), labels(data.y["test"])
            models = {"LogisticRegression": LogisticRegression(), "MLPClassifier": MLPClassifier(random_state=0)}
            scores = {
                name: make_pipeline(StandardScaler(), model).fit(x_train, y_train).score(x_test, y_test)
                for name, model in models.items()
            }
            return "test/acc", max(scores.values()), scores
        units = lambda y: y[:, 0].double().numpy() * data.target_scale + data.target_mean  # noqa: E731
        y_train, y_test = units(data.y["train"]), units(data.y["test"])
        models = {"LinearRegression": LinearRegression(), "MLPRegressor": MLPRegressor(random_state=0)}
        scores = {}
        for name, model in models.items():
            pred = make_pipeline(StandardScaler(), model).fit(x_train, y_train).predict(x_test)
            scores[name] = float(np.sqrt(np.mean((pred - y_test) ** 2)))
        return "test/rmse", min(scores.values()), scores


def summary_value(stdout: str, name: str) -> float:
    return float(next(line.split()[1] for line in stdout.splitlines() if line.strip().startswith(name + " ")))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_defaults_reach_scikit_learn_on_the_same_split(dataset, compose_cfg, tmp_path):
    args = [f"data={dataset}", "tracking.enabled=false"]
    exe = Path(sys.executable).parent / "bp-train"
    env = clean_env(BP_SERVICE_HOME=str(tmp_path))
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = compose_cfg(*args)
    metric, best, scores = sklearn_best(prepare(cfg.data, cfg.seed))
    ours = summary_value(proc.stdout, metric)
    if metric == "test/acc":
        assert ours >= best - 0.01, (ours, scores, proc.stdout)
    else:
        assert ours <= best * 1.01, (ours, scores, proc.stdout)
    # early stopping ended it, not the epoch cap
    assert "early stopping: val/loss stopped improving" in proc.stdout, proc.stdout
    assert "WARNING" not in proc.stdout
