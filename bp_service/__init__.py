"""bp-service: backpropagation written out by hand, checked against autograd, trained at scale.

The names below load on first use (PEP 562), so ``import bp_service`` itself costs nothing and the
command-line entry points (:mod:`bp_service.cli`) can answer a Ctrl-C during the heavy imports.
"""

from importlib import import_module
from typing import Any

_FUNCTIONS = (
    "L1LossFunction",
    "LinearFunction",
    "LinearSigmoidFunction",
    "MLPCostFunction",
    "MSELossFunction",
    "ReLUFunction",
    "SigmoidFunction",
    "TanhFunction",
    "l1_loss",
    "linear",
    "linear_sigmoid",
    "mlp_cost",
    "mse_loss",
    "relu",
    "sigmoid",
    "tanh",
)
_LAYERS = ("MLP", "L1Loss", "Linear", "MSELoss", "Sigmoid")
_HOME = {**dict.fromkeys(_FUNCTIONS, "bp_service.functions"), **dict.fromkeys(_LAYERS, "bp_service.layers")}

__all__ = sorted([*_FUNCTIONS, *_LAYERS, "__version__"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bp-service")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read on first use too: importing the package loads nothing (Ctrl-C at start-up)
        globals()[name] = _version()
        return globals()[name]
    if name not in _HOME:
        raise AttributeError(f"module 'bp_service' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value  # once loaded, an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME, "__version__"})
