"""bp-train through the whole-network Function: every precision, and backprop watched per layer."""

import mlflow
import pytest


def _run_metrics(tmp_path, run_id: str) -> tuple[mlflow.MlflowClient, dict[str, float]]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_run(run_id).data.metrics


def _run_id(stdout: str) -> str:
    return next(line.split()[2] for line in stdout.splitlines() if line.strip().startswith("MLflow run"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_digits_trains_in_every_cpu_precision(cli, tmp_path, precision):
    """Short digits runs (Adam, 4 epochs) in each precision: a sane accuracy, recorded as FINISHED."""
    result = cli(
        "bp-train", "experiment=digits", "trainer=cpu", f"trainer.precision={precision}", "optimizer=adam",
        "optimizer.lr=0.01", "trainer.max_epochs=4", "trainer.enable_progress_bar=false", "tracking.log_model=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    client, metrics = _run_metrics(tmp_path, _run_id(result.stdout))
    assert metrics["test/acc"] > 0.85, metrics
    assert client.get_run(_run_id(result.stdout)).info.status == "FINISHED"


@pytest.mark.slow
def test_deep_sigmoid_net_shows_its_vanishing_gradient(cli, tmp_path):
    """Six sigmoid hidden layers: the first layer's recorded |dC/dW| is orders below the last's, every epoch."""
    result = cli(
        "bp-train", "experiment=digits", "trainer=cpu", "model.net.hidden=[16,16,16,16,16,16]", "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false", "tracking.log_model=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    client, metrics = _run_metrics(tmp_path, run_id := _run_id(result.stdout))
    first = client.get_metric_history(run_id, "train/grad_norm/W1")
    last = client.get_metric_history(run_id, "train/grad_norm/W7")
    assert len(first) == len(last) == 3  # once per epoch, not per step
    for a, b in zip(first, last):
        assert a.value < 1e-2 * b.value, (a.value, b.value)
    assert metrics["train/grad_norm/delta1"] < 1e-2 * metrics["train/grad_norm/delta7"]
    assert "gradient_flow.png" in [a.path for a in client.list_artifacts(run_id)]
