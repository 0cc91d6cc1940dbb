"""Closed sets of names are enums in the schema: Hydra refuses another name before anything runs."""

from types import SimpleNamespace

import pytest
from hydra.errors import ConfigCompositionException

from bp_service.activations import HIDDEN
from bp_service.functions import LOSSES
from bp_service.layers import ACTIVATIONS
from bp_service.training.config import Activation, Loss, instantiate
from bp_service.training.recipe import build_network


def test_the_enums_list_the_cores_names():
    assert [m.value for m in Loss if m is not Loss.auto] == list(LOSSES)
    assert [m.value for m in Activation] == list(ACTIVATIONS)


@pytest.mark.parametrize(
    ("override", "valid"),
    [
        ("data.task=ranking", "auto, classification, regression"),
        ("model.loss=huber", "auto, mse, l1, cross_entropy"),
        ("model.net.activation=swish", ", ".join(HIDDEN)),
        ("scheduler.interval=hour", "epoch, step"),
    ],
)
def test_hydra_refuses_a_name_outside_the_set(compose_cfg, override, valid):
    extra = ["scheduler=step"] if override.startswith("scheduler") else []
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(*extra, override)
    value = override.partition("=")[2]
    assert f"Invalid value '{value}', expected one of [{valid}]" in str(err.value.__cause__)


def test_built_objects_get_plain_strings(compose_cfg):
    """An Enum must never reach a checkpoint (loaded with weights_only=True) or an MLflow param."""
    cfg = compose_cfg("model.net.activation=relu", "model.loss=l1")
    assert cfg.model.net.activation == "relu" and str(cfg.model.loss) == "l1"
    net = build_network(cfg.model.net, SimpleNamespace(task="classification", n_features=2, n_outputs=1))
    assert type(net.config["activation"]) is str  # what a checkpoint records
    model = {"_target_": "bp_service.training.module.BPModule", "loss": cfg.model.loss}
    module = instantiate(model, "model", net=net, optimizer=instantiate(cfg.optimizer, "optimizer"))
    assert type(module.loss) is str


# --------------------------------------------------------------------------- typos on the command line
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["optimizer.lrr=0.1"], "unknown key 'lrr' in optimizer; did you mean 'lr'?"),
        (["optimizer=sgd", "optimizer.momentun=0.9"], "unknown key 'momentun' in optimizer; did you mean 'momentum'?"),
        (["model.net.hiden=[32]"], "unknown key 'hiden' in model.net; did you mean 'hidden'?"),
        (["trainer.max_epoch=5"], "unknown key 'max_epoch' in trainer; did you mean 'max_epochs'?"),
        (["lr=0.1"], "unknown key 'lr'; did you mean 'optimizer.lr'?"),  # a key of another node
        (["model.hidden=[32]"], "unknown key 'hidden' in model; did you mean 'model.net.hidden'?"),
        (["optimizer.foo=1"], "unknown key 'foo' in optimizer; its keys are lr, betas, weight_decay"),
        (
            ["+optimizer.lrr=0.1"],
            "unknown key 'optimizer.lrr' (from '+optimizer.lrr=0.1'): not in the config schema; "
            "did you mean 'optimizer.lr'?",
        ),
    ],
)
def test_a_misspelt_key_is_answered_with_the_schemas_nearest(cli, overrides, line):
    """Through the real bp-train: exit 2, one line, the schema's key, and not Hydra's advice to add it with +."""
    result = cli("bp-train", *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"bp-train: error: {line}"


def test_a_misspelt_choice_keeps_hydras_options_and_says_the_nearest(cli):
    result = cli("bp-train", "data=irs")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "bp-train: error: In 'train': Could not find 'data/irs' (did you mean data=iris?); Available options in "
        "'data': blog, breast_cancer, csv, diabetes, digits, iris, moons, synthetic, wine, xor"
    )


def test_a_callback_argument_keeps_the_way_to_add_it(cli):
    """callbacks.* are a class's keyword arguments, not a closed schema: + is the way to pass one not listed."""
    result = cli("bp-train", "callbacks.model_checkpoint.every_n_epochs=2")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert line.startswith("bp-train: error: unknown key 'every_n_epochs' in callbacks.model_checkpoint; its keys are ")
    assert line.endswith("(to pass an argument its class takes, add it: +callbacks.model_checkpoint.every_n_epochs=2)")
