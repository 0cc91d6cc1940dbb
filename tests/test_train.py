"""bp-train: real configs composed with Hydra's API, real training runs, the real command line."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from bp_service.training.cli import CONF_DIR
from bp_service.training.config import ConfigError
from bp_service.training.data import BPDataModule, DataError
from bp_service.training.guard import check_target
from bp_service.training.loader import InMemoryLoader
from bp_service.training.preflight import validate
from bp_service.training.recipe import build_network, train

OPTIMIZERS = ["sgd", "sgd_momentum", "adam"]
NO_TRACKING = ["tracking.enabled=false"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


DATASETS = [name for name in _options("data") if name != "csv"]  # csv needs a file: its own tests below


def test_every_group_option_has_a_test():
    assert _options("optimizer") == sorted(OPTIMIZERS)
    assert _options("trainer") == ["cpu", "ddp", "default", "gpu", "slurm"]  # slurm: tests/test_scaling.py


# What each option builds: the class and its settings (as conf/optimizer/*.yaml and conf/scheduler/*.yaml give them).
BUILT_OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.5, "momentum": 0}),
    "sgd_momentum": ("SGD", {"lr": 0.1, "momentum": 0.9}),
    "adam": ("Adam", {"lr": 0.01, "betas": (0.9, 0.999)}),
}
BUILT_SCHEDULERS = {"step": ("StepLR", {"step_size": 10, "gamma": 0.5}), "cosine": ("CosineAnnealingLR", {"T_max": 7})}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", [None, "step", "cosine"])
def test_optimizer_and_scheduler_options_instantiate(compose_cfg, optimizer, scheduler):
    """The module bp-train builds (recipe.build_module) for each option: its optimizer and scheduler, as configured."""
    from bp_service.training.data import prepare
    from bp_service.training.recipe import build_module

    cfg = compose_cfg(
        "data=xor", f"optimizer={optimizer}", "trainer.max_epochs=7", *([f"scheduler={scheduler}"] if scheduler else [])
    )
    validate(cfg)
    data = prepare(cfg.data, cfg.seed)
    module = build_module(cfg.model, cfg.optimizer, cfg.get("scheduler"), build_network(cfg.model.net, data), data)
    built = module.configure_optimizers()
    opt = built["optimizer"] if scheduler else built
    name, settings = BUILT_OPTIMIZERS[optimizer]
    assert type(opt).__name__ == name
    assert {k: opt.param_groups[0][k] for k in settings} == settings
    assert opt.param_groups[0]["params"] == list(module.net.parameters())  # it steps the network's own weights
    if scheduler is None:
        assert not isinstance(built, dict)
        return
    name, settings = BUILT_SCHEDULERS[scheduler]
    lr_scheduler = built["lr_scheduler"]
    assert type(lr_scheduler["scheduler"]).__name__ == name and lr_scheduler["scheduler"].optimizer is opt
    assert {k: getattr(lr_scheduler["scheduler"], k) for k in settings} == settings
    assert lr_scheduler["interval"] == "epoch"


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
def test_trainer_options_compose(compose_cfg, trainer):
    cfg = compose_cfg(f"trainer={trainer}")
    validate(cfg)
    assert cfg.trainer.accelerator == {"cpu": "cpu", "gpu": "gpu"}.get(trainer, "auto")
    assert cfg.trainer.strategy == ("ddp" if trainer == "ddp" else "auto")


@pytest.mark.parametrize("dataset", DATASETS)
def test_each_dataset_trains_a_few_steps(compose_cfg, dataset):
    cfg = compose_cfg(f"data={dataset}", "trainer.max_epochs=1", "trainer.limit_train_batches=3", *NO_TRACKING)
    result = train(cfg)
    assert np.isfinite(result["metrics"]["test/loss"])
    assert ("test/acc" in result["metrics"]) == (dataset != "diabetes")
    assert Path(result["last_checkpoint"]).is_file()


def test_short_run_on_blog_lowers_the_loss(compose_cfg):
    """The test split's squared error (the recipe's loss) before training and after: same rows, same loss."""
    cfg = compose_cfg("experiment=blog_321", "trainer.max_epochs=15", *NO_TRACKING)
    datamodule = BPDataModule(cfg.data, cfg.seed)  # the run's own split: same data, same seed
    datamodule.setup()
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.model.net, datamodule.data)
    from bp_service.functions import mse_loss

    x, y = datamodule.data.x["test"], datamodule.data.y["test"]
    with torch.no_grad():
        before = mse_loss(net(x), y).item()
    result = train(cfg)
    assert result["metrics"]["test/loss"] < before
    assert result["metrics"]["test/acc"] > 0.8
    # test/loss is that same quantity: the tested checkpoint's network on the same rows gives it back
    state = torch.load(result["best_checkpoint"], weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    with torch.no_grad():
        after = mse_loss(net(x), y).item()
    assert after == pytest.approx(result["metrics"]["test/loss"], rel=1e-4)


def test_a_csv_written_here_trains(compose_cfg, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["id"] = np.arange(300)
    frame["label"] = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
    path = tmp_path / "mine.csv"
    frame.to_csv(path, index=False)
    cfg = compose_cfg(
        "data=csv", f"data.path={path}", "data.target=label", "data.id_column=id", "trainer.max_epochs=5", *NO_TRACKING
    )
    result = train(cfg)
    assert result["metrics"]["test/acc"] > 0.8
    bundle = torch.load(result["last_checkpoint"], weights_only=True)["bp_service"]
    assert bundle["meta"]["feature_names"] == ["a", "b", "c"]
    assert bundle["meta"]["classes"] == ["no", "yes"]


def test_regression_csv_is_inferred(compose_cfg, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 2))
    pd.DataFrame({"u": x[:, 0], "v": x[:, 1], "y": 3 * x[:, 0] - x[:, 1] + 0.5}).to_csv(tmp_path / "r.csv", index=False)
    cfg = compose_cfg(
        "data=csv", f"data.path={tmp_path / 'r.csv'}", "data.target=y", "trainer.max_epochs=3", *NO_TRACKING
    )
    result = train(cfg)
    assert "test/acc" not in result["metrics"]


# --------------------------------------------------------------------------- batching
def test_loader_batches_cover_the_epoch_and_depend_only_on_seed_and_epoch():
    x = torch.arange(10.0).reshape(10, 1)
    loader = InMemoryLoader(x, x, batch_size=4, shuffle=True, seed=3)
    loader.set_epoch(2)
    first = [b for ((b, _),) in loader]
    assert torch.cat(first).flatten().sort().values.tolist() == list(range(10))
    again = InMemoryLoader(x, x, batch_size=4, shuffle=True, seed=3)
    again.set_epoch(2)
    assert all(torch.equal(a, b) for a, ((b, _),) in zip(first, again))
    loader.set_epoch(3)
    assert not all(torch.equal(a, b) for a, ((b, _),) in zip(first, loader))


def test_ddp_shards_deal_each_global_batch_round_robin():
    x = torch.arange(16.0).reshape(16, 1)
    single = [b for ((b, _),) in InMemoryLoader(x, x, batch_size=8, shuffle=True, seed=0)]
    ranks = [[b for ((b, _),) in InMemoryLoader(x, x, 4, shuffle=True, seed=0, rank=r, world_size=2)] for r in (0, 1)]
    for i, global_batch in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][i], ranks[1][i]]).sort(0).values, global_batch.sort(0).values)


def test_steps_per_execution_groups_the_same_batches():
    x = torch.arange(20.0).reshape(20, 1)
    one = [b for ((b, _),) in InMemoryLoader(x, x, 3, shuffle=True, seed=1)]
    grouped = [b for chunk in InMemoryLoader(x, x, 3, shuffle=True, seed=1, steps_per_execution=4) for b, _ in chunk]
    assert len(InMemoryLoader(x, x, 3, steps_per_execution=4)) == 2
    assert all(torch.equal(a, b) for a, b in zip(one, grouped, strict=True))


def test_batches_already_on_the_device_pass_through_and_others_are_moved(compose_cfg):
    datamodule = BPDataModule(compose_cfg("data=iris").data, seed=0)
    chunk = ((torch.ones(2, 3), torch.zeros(2, 1)), (torch.ones(1, 3), torch.zeros(1, 1)))
    assert datamodule.transfer_batch_to_device(chunk, torch.device("cpu"), 0) is chunk
    moved = datamodule.transfer_batch_to_device(chunk, torch.device("meta"), 0)
    where = [(x.device.type, y.device.type, tuple(x.shape)) for x, y in moved]
    assert where == [("meta", "meta", (2, 3)), ("meta", "meta", (1, 3))]


def test_steps_per_execution_gives_identical_weights_and_epoch_metrics(compose_cfg):
    results = []
    for k in (1, 5, "auto"):  # auto, the default: iris's 7 batches of 16 in one Lightning step
        cfg = compose_cfg(
            "data=iris", "trainer.max_epochs=3", f"data.steps_per_execution={k}", *NO_TRACKING, run_dir=f"k{k}"
        )
        result = train(cfg)
        results.append((result, torch.load(result["last_checkpoint"], weights_only=True)))
    (r1, c1), *grouped = results
    for r, c in grouped:
        assert r["metrics"] == r1["metrics"]
        for key in c1["state_dict"]:
            assert torch.equal(c1["state_dict"][key], c["state_dict"][key]), key
        assert c["global_step"] == c1["global_step"]
    # The Lightning steps of an epoch (what the bar and the loop's hooks count): 7, 2 and 1.
    assert [c["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] for _, c in results] == [21, 6, 3]


def _trainer_for(datamodule, **settings):
    import lightning.pytorch as pl

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **settings)
    datamodule.trainer = trainer
    return trainer


def test_auto_steps_per_execution_groups_unless_a_setting_counts_lightning_steps(compose_cfg, monkeypatch):
    from functools import partial

    from bp_service.layers import MLP
    from bp_service.training.data.datamodule import stepwise_callbacks
    from bp_service.training.module import BPModule

    datamodule = BPDataModule(compose_cfg("data=digits").data, seed=0)
    assert datamodule.cfg.steps_per_execution == "auto"
    _trainer_for(datamodule)
    assert datamodule.steps_per_execution() == 256  # the cap of steps; more than digits' 20: its whole epoch
    wide = BPDataModule(compose_cfg("data=digits", "data.batch_size=512").data, seed=0)
    module = BPModule(MLP((784, 1024, 1024, 10)), optimizer=partial(torch.optim.SGD, lr=0.1))
    _trainer_for(wide).strategy.connect(module)
    assert wide.steps_per_execution() == 3  # 2e10 multiply-adds / (6 x 1.86M parameters x 512 rows)
    for counted in (
        {"max_steps": 100},
        {"limit_train_batches": 0.5},
        {"val_check_interval": 5},
        {"val_check_interval": 0.25},
        {"fast_dev_run": True},
        {"max_time": "00:00:10:00"},
    ):
        _trainer_for(datamodule, **counted)
        assert datamodule.steps_per_execution() == 1, counted
    for stepwise in (
        "callbacks.last_checkpoint.every_n_train_steps=50",
        "+callbacks.model_checkpoint.every_n_train_steps=50",
        "+callbacks.model_checkpoint.train_time_interval=60",
    ):
        callbacks = compose_cfg("data=digits", stepwise).callbacks
        timed = BPDataModule(compose_cfg("data=digits").data, seed=0, stepwise=stepwise_callbacks(callbacks))
        _trainer_for(timed)
        assert timed.stepwise and timed.steps_per_execution() == 1, stepwise
    assert stepwise_callbacks(compose_cfg("data=digits").callbacks) == []  # the shipped callbacks act per epoch
    with monkeypatch.context() as env:  # a SLURM task: its requeue signal saves a checkpoint mid-step
        env.setenv("SLURM_NTASKS", "1")
        env.setenv("SLURM_JOB_NAME", "train")
        _trainer_for(datamodule)
        assert datamodule.steps_per_execution() == 1
    explicit = BPDataModule(compose_cfg("data=digits", "data.steps_per_execution=4").data, seed=0)
    _trainer_for(explicit, max_steps=100)
    assert explicit.steps_per_execution() == 4  # a number is taken as given


def test_a_chunk_of_steps_stops_at_max_steps(compose_cfg):
    """data.steps_per_execution=5 with max_steps=7: Lightning checks max_steps between its steps, the module
    inside them, so the run stops at 7 optimizer steps, not at the end of the second chunk (10)."""
    from functools import partial

    from bp_service.layers import MLP
    from bp_service.training.module import BPModule

    datamodule = BPDataModule(compose_cfg("data=digits", "data.steps_per_execution=5").data, seed=0)
    module = BPModule(MLP((64, 16, 10)), optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = _trainer_for(datamodule, max_steps=7, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 7


# --------------------------------------------------------------------------- bad configs, in-process
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-1", "optimizer.lr must be > 0, got -1"),
        ("model.net.hidden=[0]", "model.net.hidden widths must be > 0"),
        ("data.val_size=0.9", "data.val_size + data.test_size must be < 1"),
        ("data.steps_per_execution=0", "data.steps_per_execution must be auto or an integer >= 1, got 0"),
        ("data.steps_per_execution=fast", "data.steps_per_execution must be auto or an integer >= 1, got 'fast'"),
        ("data.steps_per_execution=2.5", "data.steps_per_execution must be auto or an integer >= 1, got 2.5"),
        ("trainer.strategy=ddp_fork", "trainer.strategy=ddp_fork: the processes Lightning forks or spawns"),
        ("trainer.strategy=ddp_spawn", "hand back only their weights, not the run's epochs, metrics and pictures"),
        ("trainer.strategy=ddp_notebook", "use trainer.strategy=ddp (each process runs bp-train"),
    ],
)
def test_range_checks_name_the_field(compose_cfg, override, message):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.Popen", "torch.optim.__builtins__"])
def test_targets_outside_the_allowlist_are_refused(target):
    with pytest.raises(ConfigError, match="not allowed"):
        check_target(target, "optimizer")


def test_csv_errors_name_file_row_and_column(compose_cfg, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,x\n3,oops,y\n" + "5,6,x\n" * 30)
    cfg = compose_cfg("data=csv", f"data.path={path}", "data.target=label", *NO_TRACKING)
    message = r"bad.csv: not numeric: column\(s\) 'b' \(row 3: 'oops'\); .*data.features=\[a\]"
    with pytest.raises(DataError, match=message):
        train(cfg)


# --------------------------------------------------------------------------- the command line
def test_cli_runs_and_prints_a_summary(cli):
    result = cli("bp-train", *NO_TRACKING, "trainer=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bp-train: train finished" in result.stdout
    assert "test/acc" in result.stdout


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optimizer.lr=abc", "optimizer.lr"),
        ("model.net.hidden=[0]", "model.net.hidden widths must be > 0"),
        ("data=nosuch", "data"),
        ("nosuchkey=1", "nosuchkey"),
        ("ckpt_path=last", "ckpt_path=last: no last.ckpt"),
    ],
)
def test_cli_bad_input_is_one_clear_line(cli, override, needle):
    result = cli("bp-train", override, *NO_TRACKING, "trainer=cpu")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(needle in line for line in lines[:2]), result.stderr
    full = cli("bp-train", override, *NO_TRACKING, "trainer=cpu", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0
    assert "Traceback" in full.stderr


@pytest.mark.slow
def test_digits_experiment_reaches_097(cli):
    result = cli("bp-train", "experiment=digits", "trainer=cpu", "trainer.enable_progress_bar=false", *NO_TRACKING)
    assert result.returncode == 0, result.stderr[-2000:]
    acc = float(next(line.split()[1] for line in result.stdout.splitlines() if line.strip().startswith("test/acc")))
    assert acc >= 0.97


@pytest.mark.slow
def test_resume_from_last_equals_an_uninterrupted_run(cli, tmp_path):
    common = ["data=iris", "trainer=cpu", "trainer.enable_progress_bar=false", *NO_TRACKING]
    straight = cli("bp-train", *common, "trainer.max_epochs=4", "task_name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = cli("bp-train", *common, "trainer.max_epochs=2", "task_name=resumed")
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli("bp-train", *common, "trainer.max_epochs=4", "task_name=resumed", "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-2000:]
    lasts = {
        name: torch.load(next((tmp_path / "outputs" / name).glob("runs/*/checkpoints/last.ckpt")), weights_only=True)
        for name in ("straight", "resumed")
    }
    assert lasts["straight"]["global_step"] == lasts["resumed"]["global_step"]
    for key, value in lasts["straight"]["state_dict"].items():
        assert torch.equal(value, lasts["resumed"]["state_dict"][key]), key


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(cli, tmp_path):
    common = ["data=iris", "trainer.enable_progress_bar=false", "trainer.max_epochs=3", *NO_TRACKING]
    one = cli("bp-train", *common, "trainer=cpu", "data.batch_size=16", "task_name=one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = cli(
        "bp-train",
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=8",
        "task_name=two",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("finished in") == 1, two.stdout  # one summary, not one per process
    weights = {
        name: torch.load(next((tmp_path / "outputs" / name).glob("runs/*/checkpoints/last.ckpt")), weights_only=True)
        for name in ("one", "two")
    }
    for key, value in weights["one"]["state_dict"].items():
        torch.testing.assert_close(weights["two"]["state_dict"][key], value, rtol=1e-5, atol=1e-6)


def test_compose_api_sees_the_experiment_presets():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        from bp_service.training.config import register_configs

        register_configs()
        cfg = compose("train", overrides=["experiment=digits", "paths.root_dir=/tmp"])
    assert cfg.data.name == "digits" and cfg.task_name == "digits"


def test_early_stopping_ends_a_run_that_stops_improving(compose_cfg):
    cfg = compose_cfg(
        "data=iris", "trainer.max_epochs=30", "optimizer.lr=1e-9", "callbacks=early_stopping",
        "callbacks.early_stopping.patience=2", *NO_TRACKING,
    )  # fmt: skip
    result = train(cfg)
    epochs_run = torch.load(result["last_checkpoint"], weights_only=True)["epoch"] + 1
    assert epochs_run < 30


def test_the_divergence_check_names_a_non_finite_gradient_and_lets_an_overflowing_sum_pass(compose_cfg):
    """A finite loss with an inf gradient stops the run naming the parameter; gradients whose sum merely overflows
    float32 (each finite) do not."""
    from functools import partial

    from bp_service.layers import MLP
    from bp_service.training.module import BPModule, NonFiniteError

    datamodule = BPDataModule(compose_cfg("data=xor").data, seed=0)
    module = BPModule(MLP((2, 3, 1)), optimizer=partial(torch.optim.SGD, lr=0.1))
    _trainer_for(datamodule, max_steps=1, enable_checkpointing=False, num_sanity_val_steps=0).fit(module, datamodule)
    loss, params = torch.tensor(0.5), list(module.net.parameters())

    def grads(fill: float, inf_at_weight_2: bool = False) -> list[torch.Tensor]:
        for p in params:
            p.grad = torch.full_like(p, fill)
        if inf_at_weight_2:
            params[2].grad[0, 1] = float("inf")
        return [p.grad for p in params]

    module._check_finite(loss, grads(3e38))  # every element finite, only their sum overflows: no error
    with pytest.raises(NonFiniteError, match=r"^step 2: the gradient of layers\.1\.weight became non-finite; "):
        module._check_finite(loss, grads(0.0, inf_at_weight_2=True))
    with pytest.raises(NonFiniteError, match=r"^step 2: train/loss became non-finite \(nan\)"):
        module._check_finite(torch.tensor(float("nan")), grads(1.0))


@pytest.mark.parametrize(
    ("stopped_with", "resumed_with", "older_checkpoint", "stopped_at"),
    [("5", "5", False, 10), ("5", "auto", False, 10), ("1", "auto", True, 7), ("auto", "auto", False, 20)],
)
def test_a_run_stopped_by_sigterm_mid_epoch_resumes_with_the_grouping_it_was_written_with(
    compose_cfg, tmp_path, stopped_with, resumed_with, older_checkpoint, stopped_at
):
    """A SIGTERM during optimizer step 7: Lightning stops at the end of its step (the chunk: 10 with 5 a chunk, 20
    with auto's whole epoch), bp-train writes the checkpoint as on a real SIGTERM, and the run resumed from it ends
    the epoch with the same weights as a run straight through. Lightning counts the epoch's progress in its own
    steps, so the resumed run groups as the checkpoint did, whatever its config says now; a checkpoint written
    before that was recorded (one optimizer step per Lightning step then) resumes with 1."""
    import os
    import signal
    from functools import partial

    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from bp_service.layers import MLP
    from bp_service.training.module import BPModule

    class TermAt(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if trainer.global_step == 6:  # during the 7th step
                os.kill(os.getpid(), signal.SIGTERM)

    def run(k: str, ckpt_path=None, callbacks=()) -> tuple[BPModule, pl.Trainer, bool]:
        torch.manual_seed(0)
        datamodule = BPDataModule(compose_cfg("data=digits", f"data.steps_per_execution={k}").data, seed=0)
        module = BPModule(MLP((64, 16, 10)), optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
        trainer = _trainer_for(
            datamodule, max_epochs=1, enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[*callbacks]
        )
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            trainer.save_checkpoint(tmp_path / "last.ckpt")  # what bp-train writes on a SIGTERM (lifecycle.Run.fit)
            return module, trainer, True
        return module, trainer, False

    straight, _, _ = run("1")
    _, trainer, stopped = run(stopped_with, callbacks=[TermAt()])
    assert stopped and trainer.global_step == stopped_at
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert checkpoint["BPDataModule"] == {"steps_per_execution": {"5": 5, "1": 1, "auto": 256}[stopped_with]}
    if older_checkpoint:
        del checkpoint["BPDataModule"]
        torch.save(checkpoint, tmp_path / "last.ckpt")
    resumed, trainer, _ = run(resumed_with, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 20
    assert resumed.epoch_so_far.rows == 1257  # the epoch's train/loss over each of digits' training rows once
    for key, value in straight.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key


@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
def test_cross_entropy_evaluation_takes_the_cost_and_prediction_from_one_pass(compose_cfg, output):
    """val/loss is MLP.cost's cross-entropy and val/acc the prediction's accuracy, both from one pass through the
    layers (the logits): one matrix product per layer and batch, not a forward pass and then the cost's own."""
    from functools import partial

    from torch.profiler import profile

    from bp_service.layers import MLP
    from bp_service.training.module import BPModule, accuracy

    datamodule = BPDataModule(compose_cfg("data=iris").data, seed=0)
    torch.manual_seed(0)
    net = MLP((4, 8, 3), output_activation=output)
    module = BPModule(net, optimizer=partial(torch.optim.SGD, lr=0.1), loss="cross_entropy")
    trainer = _trainer_for(datamodule, enable_checkpointing=False)
    with profile() as prof:
        (metrics,) = trainer.validate(module, datamodule=datamodule)
    products = [e for e in prof.events() if e.name in ("aten::addmm", "aten::mm")]
    assert len(products) == len(net.layers) * len(datamodule.val_dataloader())
    x, y = datamodule.data.x["val"], datamodule.data.y["val"]
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(metrics["val/loss"]), net.cost(x, y, "cross_entropy"))
        torch.testing.assert_close(torch.tensor(metrics["val/acc"]), accuracy(net(x), y))
