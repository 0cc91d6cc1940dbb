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
