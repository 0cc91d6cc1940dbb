"""bp-service: backpropagation written out by hand, checked against autograd, trained at scale."""

from importlib.metadata import PackageNotFoundError, version

from bp_service.functions import (
    L1LossFunction,
    LinearFunction,
    LinearSigmoidFunction,
    MSELossFunction,
    ReLUFunction,
    SigmoidFunction,
    TanhFunction,
    l1_loss,
    linear,
    linear_sigmoid,
    mse_loss,
    relu,
    sigmoid,
    tanh,
)
from bp_service.layers import MLP, L1Loss, Linear, MSELoss, Sigmoid

try:
    __version__ = version("bp-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "MLP",
    "L1Loss",
    "L1LossFunction",
    "Linear",
    "LinearFunction",
    "LinearSigmoidFunction",
    "MSELoss",
    "MSELossFunction",
    "ReLUFunction",
    "Sigmoid",
    "SigmoidFunction",
    "TanhFunction",
    "__version__",
    "l1_loss",
    "linear",
    "linear_sigmoid",
    "mse_loss",
    "relu",
    "sigmoid",
    "tanh",
]
