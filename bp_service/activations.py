"""The activations: one record each, the one place its forward and its derivative are written.

Every list of activations reads :data:`ACTIVATIONS`: the per-layer Functions, their functional
aliases and the whole network's backprop (:mod:`bp_service.functions`), the modules
(:data:`bp_service.layers.ACTIVATIONS`), the saved-model check (:mod:`bp_service.bundle`), the
config schema (``model.net.activation``), the benchmark's native twins and the tests. Adding an
activation is adding a record here.

A derivative is written once, as the tensor f', read off the layer's output a where that is
possible (``a (1 - a)``, ``1 - a^2``, ``1[a > 0]``) and off its input z otherwise. Every place that
needs it multiplies by that one tensor, dL/dz = dL/da * f': the per-layer backward and forward mode,
and the network's backprop, in place into its own buffer or as recorded ops for a second derivative.

The formulas are tensor methods only, so this module imports nothing: the config schema reads the
names at ``bp-train --help`` without loading torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ACTIVATIONS", "CROSS_ENTROPY_OUTPUTS", "HIDDEN", "LEAKY_SLOPE", "Activation"]


@dataclass(frozen=True)
class Activation:
    """One activation a = f(z), elementwise unless it gives a ``jacobian_product``.

    Args:
        name: what ``MLP(activation=...)``, configs and checkpoints call it.
        title: the stem of its Function's name (``SigmoidFunction``).
        forward: a = f(z) as a new tensor (what autograd records).
        derivative: f' as a tensor of z's shape, from a (``reads="output"``) or z (``reads="input"``);
            a boolean mask stands for 0/1.
        reads: what ``derivative`` takes. ``"input"`` makes the network recompute
            z = a_{l-1} W^T + b in its backward (one more matrix product), since it keeps only a.
        forward_: f written into z, a buffer the network's forward pass never reads again
            (None: ``forward``, a new tensor).
        jacobian_product: for an f that is not elementwise, ``(v, a) -> J v`` with J = da/dz symmetric
            (so also J^T v); it replaces ``derivative``.
        hidden: whether a hidden layer may use it; False: the output layer only.
        cross_entropy: whether the cross-entropy cost pairs with it as the output layer. That cost then
            gives delta_L = dC/dz_L = (a_L - y) / N itself, and f' is never applied.
        kink: whether f' jumps at z = 0: finite differences need inputs away from it.
        native, native_kwargs: torch's own op, its ``torch.nn.functional`` name and keyword arguments:
            the peer the benchmark times (:meth:`native_op`).
    """

    name: str
    title: str
    forward: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor] | None = None
    reads: Literal["output", "input"] = "output"
    forward_: Callable[[Tensor], Tensor] | None = None
    jacobian_product: Callable[[Tensor, Tensor], Tensor] | None = None
    hidden: bool = True
    cross_entropy: bool = False
    kink: bool = False
    native: str = ""
    native_kwargs: dict[str, Any] = field(default_factory=dict)

    def native_op(self) -> Callable[[Tensor], Tensor]:
        """torch's own op for this activation (``torch.nn.functional``, imported on use: see above)."""
        import torch.nn.functional as nnf

        return functools.partial(getattr(nnf, self.native), **self.native_kwargs)


def _softmax(z: Tensor) -> Tensor:
    """exp(z - max z) / sum_k exp(z_k - max z) along the last dimension: the shift keeps exp finite."""
    e = (z - z.amax(-1, keepdim=True)).exp()  # (N, K) - (N, 1) -> (N, K)
    return e / e.sum(-1, keepdim=True)  # exp is saved by autograd: no in-place division after it


def _softmax_(z: Tensor) -> Tensor:
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True))  # (N, K) / (N, 1) -> (N, K)


def _softmax_jacobian_product(v: Tensor, a: Tensor) -> Tensor:
    """J v for a = softmax(z), J = diag(a) - a a^T: (J v)_i = a_i (v_i - sum_k v_k a_k)."""
    return a * (v - (v * a).sum(-1, keepdim=True))  # (*, K) * ((*, K) - (*, 1)) -> (*, K)


LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default negative slope

_TABLE = (
    Activation(
        "sigmoid",
        "Sigmoid",
        forward=lambda z: z.sigmoid(),  # 1 / (1 + exp(-z))
        forward_=lambda z: z.sigmoid_(),
        derivative=lambda a: a.addcmul(a, a, value=-1),  # a (1 - a), as a - a a: one kernel
        cross_entropy=True,
        native="sigmoid",
    ),
    Activation(
        "tanh",
        "Tanh",
        forward=lambda z: z.tanh(),
        forward_=lambda z: z.tanh_(),
        derivative=lambda a: 1 - a * a,  # 1 - a^2
        native="tanh",
    ),
    Activation(
        "relu",
        "ReLU",
        forward=lambda z: z.clamp_min(0),  # max(z, 0)
        forward_=lambda z: z.clamp_min_(0),
        derivative=lambda a: a > 0,  # 1[a > 0] = 1[z > 0]; 0 at the kink, as torch
        kink=True,
        native="relu",
    ),
    Activation(
        "softmax",
        "Softmax",
        forward=_softmax,
        forward_=_softmax_,
        jacobian_product=_softmax_jacobian_product,
        hidden=False,  # its rows sum to 1: a distribution over classes, for the output layer
        cross_entropy=True,
        native="softmax",
        native_kwargs={"dim": -1},
    ),
    Activation(
        "leaky_relu",
        "LeakyReLU",
        forward=lambda z: z.where(z > 0, z * LEAKY_SLOPE),  # z where z > 0, else 0.01 z
        derivative=lambda a: (a > 0).to(a.dtype) * (1 - LEAKY_SLOPE) + LEAKY_SLOPE,  # 1 or 0.01: a has z's sign
        kink=True,
        native="leaky_relu",
        native_kwargs={"negative_slope": LEAKY_SLOPE},
    ),
)

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in _TABLE}
HIDDEN: tuple[str, ...] = tuple(name for name, a in ACTIVATIONS.items() if a.hidden)  # model.net.activation
CROSS_ENTROPY_OUTPUTS: tuple[str, ...] = tuple(name for name, a in ACTIVATIONS.items() if a.cross_entropy)
