"""The gradient-check gate (bp_service/gradcheck.py): it passes the shipped derivatives, and it refuses a wrong one,
in-process (``check_model``'s report) and through ``bp-train`` (one line, nothing trained, no run left RUNNING)."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import FAST, clean_env
from mlflow import MlflowClient

from bp_service.activations import ACTIVATIONS
from bp_service.gradcheck import check_model
from bp_service.layers import MLP

SIZES = (5, 4, 3)  # two sigmoid layers: the worked example's kind of network, big enough to mix terms


def _net(**kwargs) -> MLP:
    torch.manual_seed(0)
    return MLP(SIZES, **kwargs)


def _halve_sigmoid_derivative(monkeypatch):
    """Sigmoid's record with f' halved: wrong everywhere, by a margin finite differences see. The record is
    the one place the derivative is written, so this reaches every Function and the network's backprop."""
    right = ACTIVATIONS["sigmoid"]
    wrong = dataclasses.replace(right, derivative=lambda a: right.derivative(a) / 2)
    monkeypatch.setitem(ACTIVATIONS, "sigmoid", wrong)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_the_shipped_derivatives_pass(fused, loss):
    report = check_model(_net(fused=fused), loss)
    assert report["passed"] is True and report["dtype"] == "float64"
    assert report["layers"] and all(e["passed"] for e in report["layers"])
    assert max(e["max_abs_error"] for e in report["layers"]) < 1e-7


def test_a_wrong_sigmoid_derivative_is_refused(monkeypatch):
    """Sigmoid's derivative halved where it is written (its record, read by every Function and by backprop)."""
    _halve_sigmoid_derivative(monkeypatch)
    report = check_model(_net(), "mse")
    assert report["passed"] is False
    failed = [e for e in report["layers"] if not e["passed"]]
    assert failed and {e["layer"] for e in failed} <= {"layers.0", "layers.1"}
    assert all(e["max_abs_error"] > 1e-4 for e in failed)  # the report says by how much, not only that


def test_a_wrong_derivative_in_the_training_path_is_refused(monkeypatch):
    """``backprop`` (what ``MLP.cost``, the path bp-train trains through, runs) with sigmoid' halved: the gate,
    which checks that path, refuses it. The per-layer Functions are left right."""
    x, target = torch.rand(6, 5, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    net = _net().double()
    net.cost(x, target).backward()
    right = net.layers[0].weight.grad.clone()
    _halve_sigmoid_derivative(monkeypatch)
    net.zero_grad()
    net.cost(x, target).backward()
    assert not torch.allclose(right, net.layers[0].weight.grad)  # the patch does reach the training path
    assert check_model(_net(), "mse")["passed"] is False


@pytest.mark.slow  # a whole bp-train process: ~20 s on two cores, mostly start-up
def test_bp_train_refuses_to_train_on_a_wrong_derivative(tmp_path):
    """The real command, the derivative of its default hidden activation (tanh) broken before it starts: one
    line, exit 1, nothing trained."""
    patch = (
        "import dataclasses, sys; from bp_service.activations import ACTIVATIONS; from bp_service.cli import bp_train\n"
        "right = ACTIVATIONS['tanh']\n"
        "ACTIVATIONS['tanh'] = dataclasses.replace(right, derivative=lambda a: right.derivative(a) / 2)\n"
        "sys.argv[0] = 'bp-train'; sys.exit(bp_train())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", patch, "data=xor", "trainer.max_epochs=2", *FAST],
        capture_output=True,
        text=True,
        env=clean_env(BP_SERVICE_HOME=str(tmp_path)),
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        next(line for line in run.stderr.splitlines() if "gradient check failed before training for layers." in line)
    ]
    assert "Traceback" not in run.stderr and "Epoch" not in run.stdout
    assert not list(tmp_path.glob("outputs/**/*.ckpt"))  # nothing trained, nothing saved
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]  # recorded, and closed: not left RUNNING
    assert "gradcheck.json" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
