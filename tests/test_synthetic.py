"""data=synthetic and experiment=synthetic: generated workloads of any size, and the preset through bp-train."""

import numpy as np
import pytest
import torch

from bp_service.bench import training_job as bench_jobs
from bp_service.bench.harness import BenchConfig
from bp_service.training.config import ConfigError
from bp_service.training.data import BPDataModule
from bp_service.training.data.sources import SyntheticSource
from bp_service.training.preflight import validate

NO_TRACKING = ["tracking.enabled=false"]


def _data(cfg, seed=42):
    datamodule = BPDataModule(cfg.data, seed)
    datamodule.setup()
    return datamodule.data


def test_classification_splits_shapes_and_classes(compose_cfg):
    cfg = compose_cfg("data=synthetic", "data.n_samples=600", "data.n_features=12", "data.n_classes=3")
    validate(cfg)
    data = _data(cfg)
    assert data.task == "classification"
    assert data.feature_names == [f"x{i}" for i in range(12)]
    assert sum(len(data.x[s]) for s in ("train", "val", "test")) == 600
    for split in ("train", "val", "test"):
        assert data.x[split].dtype == torch.float32 and data.x[split].shape[1] == 12
        assert data.y[split].shape[1] == 3 and torch.all(data.y[split].sum(1) == 1)  # one-hot
    # Stratified: each class about a third of every split.
    for split in ("train", "test"):
        share = data.y[split].mean(0)
        assert torch.all((share > 0.25) & (share < 0.42)), share
    # Scaled on the training split only.
    assert data.x["train"].mean(0).abs().max() < 1e-4
    assert (data.x["train"].std(0) - 1).abs().max() < 0.01


def test_the_runs_seed_decides_the_data(compose_cfg):
    cfg = compose_cfg("data=synthetic", "data.n_samples=300")
    a, b, c = _data(cfg, seed=1), _data(cfg, seed=1), _data(cfg, seed=2)
    assert torch.equal(a.x["train"], b.x["train"]) and torch.equal(a.y["train"], b.y["train"])
    assert not torch.equal(a.x["train"], c.x["train"])


def test_regression_task_uses_make_regression(compose_cfg):
    cfg = compose_cfg("data=synthetic", "data.task=regression", "data.n_samples=400", "data.n_features=5")
    validate(cfg)
    data = _data(cfg)
    assert data.task == "regression" and data.classes is None
    assert data.y["train"].shape == (len(data.x["train"]), 1)
    assert abs(float(data.y["train"].mean())) < 1e-4  # standardised targets
    assert data.target_scale > 1  # make_regression's raw targets spread far wider than noise 0.01


def test_generation_is_float32_and_informative_default():
    raw = SyntheticSource(n_samples=1000, n_features=40, n_classes=4).load(seed=0)
    assert raw.x.dtype == np.float32 and raw.x.shape == (1000, 40) and raw.task == "classification"
    assert sorted(set(raw.y.tolist())) == [0, 1, 2, 3] and len(raw.feature_names) == 40
    # By default half the features carry signal (the rest are noise), at least enough for the classes.
    assert SyntheticSource(n_samples=1000, n_features=40, n_classes=4).n_informative == 20
    assert SyntheticSource(n_features=4, n_classes=6).n_informative == 4
    assert SyntheticSource(n_features=40, n_informative=7).n_informative == 7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.n_features=0"], "data.n_features must be >= 1, got 0"),
        (["data.n_classes=1"], "data.n_classes must be >= 2, got 1"),
        (["data.n_informative=30", "data.n_features=20"], "data.n_informative must be in [1, data.n_features=20]"),
        (["data.noise=1.5"], "data.noise must be <= 1 for synthetic classification"),
        (["data.n_classes=10", "data.n_informative=3"], "data.n_informative=3 is too small for data.n_classes=10"),
    ],
)
def test_bad_synthetic_settings_name_the_field(compose_cfg, overrides, message):
    cfg = compose_cfg("data=synthetic", *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_regression_allows_any_noise(compose_cfg):
    validate(compose_cfg("data=synthetic", "data.task=regression", "data.noise=25"))


def test_the_preset_is_the_size_bench_measures(compose_cfg):
    """bp-bench's Lightning overhead rows on CUDA measure experiment=synthetic as bp-train composes it."""
    cfg = compose_cfg("experiment=synthetic")
    validate(cfg)
    preset = bench_jobs.synthetic_preset()
    assert preset.data == cfg.data and preset.model == cfg.model and preset.optimizer == cfg.optimizer
    assert {k: preset.data[k] for k in ("n_samples", "n_features", "n_classes", "n_informative", "batch_size")} == {
        "n_samples": 1_000_000, "n_features": 128, "n_classes": 10, "n_informative": 32, "batch_size": 4096
    }  # fmt: skip
    workload = bench_jobs.synthetic_workload(preset)
    assert (workload["hidden"], workload["activation"], workload["output_activation"]) == ((1024, 1024), "relu", None)
    assert (workload["optimizer"]["_target_"], workload["optimizer"]["lr"]) == ("torch.optim.Adam", 0.001)
    assert bench_jobs.synthetic_preset(n_samples=1500).data.n_samples == 1500


@pytest.mark.slow  # a whole bp-train process: ~30 s on two cores, mostly start-up
def test_small_preset_through_bp_train_beats_chance(cli):
    """The real command line, the preset's network and optimizer, a few thousand rows on the CPU."""
    result = cli(
        "bp-train",
        "experiment=synthetic",
        "trainer=cpu",
        "data.n_samples=3000",
        "data.batch_size=64",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        *NO_TRACKING,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = dict(line.split() for line in result.stdout.splitlines() if line.strip().startswith("test/"))
    assert float(metrics["test/acc"]) > 0.2, result.stdout  # 10 classes: chance is 0.1
    assert "bp-train: synthetic finished" in result.stdout


@pytest.mark.slow
def test_bench_lightning_overhead_device_rows_harness_on_cpu():
    """The CUDA rows' harness (native eager loop vs the Lightning loop), run on the CPU at a toy size."""
    rows = bench_jobs.item_lightning_cuda(BenchConfig(quick=True), variants={"eager": {}}, n_samples=1500, device="cpu")
    (row,) = rows
    assert row["item"] == "lightning-overhead" and "[cpu float32]" in row["name"]
    assert "synthetic b4096 128-1024-1024-10" in row["name"]
    assert row["ours"] > 0 and row["peer"] > 0
    details = row["details"]
    assert details["batch"] == 4096 and details["rows"] == 1050 and details["epochs"] == [1, 3]
    # Same initial weights, same batches, same optimizer: after 3 Adam steps the two sides agree closely.
    assert details["ours_val_acc"] == pytest.approx(details["peer_val_acc"], abs=0.02)


def test_lightning_variants_follow_the_modules_capture_switch():
    import inspect

    from bp_service.training.module import BPModule

    variants = bench_jobs.lightning_variants()
    assert "capture" in inspect.signature(BPModule.__init__).parameters  # the switch exists (tests/test_capture.py)
    assert variants == {"eager": {"capture": False}, "captured": {"capture": True}}


def test_native_peer_starts_from_the_lightning_sides_weights():
    torch.manual_seed(0)
    from bp_service.layers import MLP

    sizes = (6, 8, 8, 3)
    ours = MLP(sizes, activation="relu", output_activation=None)
    native = bench_jobs.NativeNet(sizes, "relu", None)
    native.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(native(x), ours(x))
