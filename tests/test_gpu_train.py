"""GPU training of the synthetic workload: every GPU precision, batches gathered on the device, the bench's
Lightning overhead rows.

All marked ``gpu``: skipped without CUDA (tests/conftest.py), run by ``make test-gpu`` / ``make gpu-check``.
"""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bp_service.bench import training_job as bench_jobs
from bp_service.bench.harness import BenchConfig
from bp_service.training.data import BPDataModule
from bp_service.training.loader import InMemoryLoader
from bp_service.training.recipe import train

pytestmark = pytest.mark.gpu

ON_GPU = ["trainer.accelerator=gpu", "trainer.devices=1", "tracking.enabled=false"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_small_synthetic_preset_learns_in_each_gpu_precision(compose_cfg, precision):
    cfg = compose_cfg(
        "experiment=synthetic",
        *ON_GPU,
        f"trainer.precision={precision}",
        "data.n_samples=20000",
        "data.batch_size=256",
        "trainer.max_epochs=3",
    )
    result = train(cfg)
    metrics = result["metrics"]
    assert np.isfinite(metrics["test/loss"])
    assert metrics["test/acc"] > 0.3, metrics  # 10 classes: chance is 0.1


def _attached(datamodule: BPDataModule, accelerator: str) -> BPDataModule:
    datamodule.trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False)
    return datamodule


def test_training_batches_are_gathered_on_the_gpu_and_are_the_cpu_batches(compose_cfg):
    cfg = compose_cfg("data=synthetic", "data.n_samples=3000", "data.batch_size=128")
    on_gpu = _attached(BPDataModule(cfg.data, 7), "gpu")
    on_gpu.setup()
    plain = InMemoryLoader(on_gpu.data.x["train"], on_gpu.data.y["train"], 128, shuffle=True, seed=7)
    loader = on_gpu.train_dataloader()
    loader.position = None  # no fit running: epoch 0 from the start
    batches = list(loader)
    assert len(batches) == len(plain) > 1
    for ((x, y),), ((x_cpu, y_cpu),) in zip(batches, plain):
        assert x.is_cuda and y.is_cuda
        assert torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)
    assert not on_gpu.data.x["train"].is_cuda  # the prepared data stays on the CPU (artifacts, examples)
    assert on_gpu.val_dataloader().x.is_cuda


def test_on_device_false_keeps_batches_on_the_host(compose_cfg):
    cfg = compose_cfg("data=synthetic", "data.n_samples=600", "data.on_device=false")
    datamodule = _attached(BPDataModule(cfg.data, 0), "gpu")
    datamodule.setup()
    assert not datamodule.train_dataloader().x.is_cuda


def test_bench_lightning_overhead_cuda_rows():
    rows = bench_jobs.item_lightning_cuda(BenchConfig(quick=True), n_samples=100_000)
    assert {r["details"]["variant"] for r in rows} == set(bench_jobs.lightning_variants())
    for row in rows:
        assert row["item"] == "lightning-overhead" and "[cuda float32]" in row["name"]
        assert row["ours"] > 0 and row["peer"] > 0 and row["details"]["rows"] == 70_000
        details = row["details"]
        # Same weights, batches and optimizer: both sides learn alike (float32 on the GPU, not bit-equal).
        assert details["ours_val_acc"] > 0.3 and details["peer_val_acc"] > 0.3
        assert details["ours_val_acc"] == pytest.approx(details["peer_val_acc"], abs=0.05)
