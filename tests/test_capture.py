"""Training steps captured in a CUDA graph: same weights as eager, Lightning's counting intact, eager fallbacks."""

import pytest
import torch

from bp_service import MLP
from bp_service.capture import CapturedStep
from bp_service.training.recipe import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches(n: int, sizes, batch: int, device: str):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.rand(batch, sizes[0], generator=g).to(device), torch.rand(batch, sizes[-1], generator=g).to(device))
        for _ in range(n)
    ]


def _twins(sizes, optimizer: str, device: str):
    torch.manual_seed(0)
    a = MLP(sizes).to(device)
    b = MLP(sizes).to(device)
    b.load_state_dict(a.state_dict())
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, capturable=device == "cuda"),
    }[optimizer]
    return a, make(a.parameters()), b, make(b.parameters())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_captured_steps_give_the_eager_weights_after_50_steps(optimizer):
    sizes = (64, 128, 128, 10)
    eager, opt_e, graphed, opt_g = _twins(sizes, optimizer, "cuda")
    step = CapturedStep(graphed.cost, list(graphed.parameters()), opt_g)
    for x, y in _batches(50, sizes, 64, "cuda"):
        opt_e.zero_grad(set_to_none=True)
        loss_e = eager.cost(x, y)
        loss_e.backward()
        opt_e.step()
        loss_g = step(x, y)
        torch.testing.assert_close(loss_g, loss_e.detach())
    assert step.captures == 1 and step.graph is not None
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.gpu
@cuda
def test_a_new_learning_rate_is_captured_again():
    sizes = (8, 16, 4)
    eager, opt_e, graphed, opt_g = _twins(sizes, "sgd", "cuda")
    step = CapturedStep(graphed.cost, list(graphed.parameters()), opt_g, warmup=1)
    for i, (x, y) in enumerate(_batches(12, sizes, 32, "cuda")):
        if i == 6:
            for opt in (opt_e, opt_g):
                opt.param_groups[0]["lr"] = 0.05
        opt_e.zero_grad()
        eager.cost(x, y).backward()
        opt_e.step()
        step(x, y)
    assert step.captures == 2
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.gpu
@cuda
def test_compiled_cost_gives_the_eager_weights_after_50_steps_on_cuda():
    """The model.compile=true defect: on CUDA the compiled network must learn exactly as the eager one."""
    sizes = (64, 128, 10)
    eager, opt_e, compiled, opt_c = _twins(sizes, "sgd", "cuda")
    cost = torch.compile(compiled.cost)
    for x, y in _batches(50, sizes, 64, "cuda"):
        for net_cost, opt in ((eager.cost, opt_e), (cost, opt_c)):
            opt.zero_grad(set_to_none=True)
            net_cost(x, y).backward()
            opt.step()
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


SYNTHETIC_SMALL = ["experiment=synthetic", "data.n_samples=5000", "data.batch_size=256", "trainer.max_epochs=3"]


@pytest.mark.gpu
@cuda
def test_bp_train_captures_on_cuda_with_lightnings_step_count(compose_cfg, capfd):
    """Captured and eager bp-train runs: same step count, same test metrics; the ragged last batch runs eagerly."""
    results = {}
    for capture in ("null", "false"):
        cfg = compose_cfg(*SYNTHETIC_SMALL, "trainer=gpu", f"model.capture={capture}", "tracking.enabled=false",
                          run_dir=f"run-{capture}")  # fmt: skip
        results[capture] = train(cfg)
    err = capfd.readouterr().err
    assert "training steps are captured in a CUDA graph" in err
    assert "runs eagerly (the graph was captured for another shape)" in err  # 3500 train rows: a ragged batch
    last = {k: torch.load(r["last_checkpoint"], weights_only=True) for k, r in results.items()}
    assert last["null"]["global_step"] == last["false"]["global_step"] > 0
    for name, tensor in last["false"]["state_dict"].items():
        torch.testing.assert_close(last["null"]["state_dict"][name], tensor, rtol=1e-4, atol=1e-5)
    for key, value in results["false"]["metrics"].items():
        assert results["null"]["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4)


@pytest.mark.gpu
@cuda
def test_captured_resume_equals_an_uninterrupted_captured_run(cli, tmp_path):
    base = [*SYNTHETIC_SMALL[:3], "trainer=gpu", "tracking.enabled=false", "trainer.enable_progress_bar=false"]
    whole = cli("bp-train", *base, "trainer.max_epochs=4", "task_name=whole")
    first = cli("bp-train", *base, "trainer.max_epochs=2", "task_name=parts")
    rest = cli("bp-train", *base, "trainer.max_epochs=4", "task_name=parts", "ckpt_path=last")
    assert whole.returncode == first.returncode == rest.returncode == 0, (whole.stderr + rest.stderr)[-3000:]
    (a,) = (tmp_path / "outputs" / "whole").glob("runs/*/checkpoints/last.ckpt")
    b = max((tmp_path / "outputs" / "parts").glob("runs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["global_step"] == b["global_step"]
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-4, atol=1e-5)


def test_capture_requested_on_cpu_trains_eagerly_with_one_line(compose_cfg, capfd):
    """model.capture=true on a CPU: one line saying why, and exactly the eager run's numbers."""
    runs = {}
    for capture in ("true", "false"):
        cfg = compose_cfg("data=iris", "trainer.max_epochs=2", f"model.capture={capture}", "tracking.enabled=false",
                          run_dir=f"run-{capture}")  # fmt: skip
        runs[capture] = train(cfg)
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if "CUDA graph" in line]
        assert lines == (["bp-train: training eagerly, not from a CUDA graph: the device is cpu, not CUDA"]
                         if capture == "true" else [])  # fmt: skip
    assert runs["true"]["metrics"] == runs["false"]["metrics"]
    a, b = (torch.load(r["last_checkpoint"], weights_only=True)["state_dict"] for r in runs.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_capture_is_silent_by_default_on_cpu(compose_cfg, capfd):
    train(compose_cfg("data=iris", "trainer.max_epochs=1", "tracking.enabled=false"))
    assert "CUDA graph" not in capfd.readouterr().err
