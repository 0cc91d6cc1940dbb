"""Modules shaped like ``torch.nn``, built only from the hand-written Functions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from bp_service import activations
from bp_service import functions as F

# By name, from the records of bp_service.activations: those a hidden layer may use, and every one
# (a last layer may also be a softmax, its derivative going with the cost: ``MLP.cost(loss="cross_entropy")``).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {name: F.ACTIVATION_ALIASES[name] for name in activations.HIDDEN}
OUTPUT_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = dict(F.ACTIVATION_ALIASES)


class Linear(nn.Module):
    r"""Applies :math:`y = x W^T + b` through :class:`~bp_service.functions.LinearFunction`.

    A drop-in twin of :class:`torch.nn.Linear`: same arguments, same initialisation, same
    ``state_dict`` keys, so weights move between the two unchanged.

    Args:
        in_features: size of each input sample, ``H_in``.
        out_features: size of each output sample, ``H_out``.
        bias: if ``False``, the layer learns no additive bias.

    Shape:
        - Input: ``(*, H_in)``, any number of leading dimensions.
        - Output: ``(*, H_out)``.

    Attributes:
        weight: learnable ``(H_out, H_in)``, initialised from :math:`U(-\sqrt{k}, \sqrt{k})`,
            :math:`k = 1 / H_{in}` (Kaiming-uniform with ``a = sqrt(5)``, as ``nn.Linear``).
        bias: learnable ``(H_out,)``, initialised from :math:`U(-\sqrt{k}, \sqrt{k})`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear: in_features and out_features must be > 0, got {in_features}, {out_features}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same draws in the same order as nn.Linear, so a shared seed gives identical weights.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Sigmoid(nn.Module):
    """Applies the logistic sigmoid through :class:`~bp_service.functions.SigmoidFunction`."""

    def forward(self, x: Tensor) -> Tensor:
        return F.sigmoid(x)


class MSELoss(nn.Module):
    """Mean squared error, ``mean((pred - target)^2)``, as ``nn.MSELoss()``."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target)


class L1Loss(nn.Module):
    """Mean absolute error, ``mean(|pred - target|)``, as ``nn.L1Loss()``."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(pred, target)


class MLP(nn.Module):
    """A multilayer perceptron of :class:`Linear` layers and hand-written activations.

    Args:
        sizes: layer widths from input to output, e.g. ``(3, 2, 1)`` for the worked example.
        activation: hidden activation, a name of :data:`ACTIVATIONS` (``sigmoid``, ``tanh``, ``relu``, ...).
        output_activation: activation of the last layer, or ``None`` for a linear output
            (regression); also ``softmax``, class probabilities that sum to 1 (train it with
            ``cost(..., loss="cross_entropy")``).
        fused: compute each sigmoid layer with the fused
            :class:`~bp_service.functions.LinearSigmoidFunction`: the same numbers, one autograd
            node per layer and no pre-activation kept. Its backward holds the incoming gradient
            and the output until both weight gradients are done, so peak training memory is one
            activation-sized tensor higher than ``fused=False`` (``bp-bench --items peak-memory``).
        bias: whether every layer learns a bias.

    Shape:
        - Input: ``(*, sizes[0])``.
        - Output: ``(*, sizes[-1])``.

    Attributes:
        layers: the :class:`Linear` layers, ``layers[i].weight`` of shape ``(sizes[i+1], sizes[i])``.
        activations: the activation name applied after each layer (``None`` for none).
        config: the constructor arguments, so that ``MLP(**net.config)`` builds the same network
            (what a saved model records, see :mod:`bp_service.bundle`).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "sigmoid",
        output_activation: str | None = "sigmoid",
        fused: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"MLP: sizes needs at least an input and an output width, got {sizes}")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"MLP: every layer width must be > 0, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}, expected one of {sorted(ACTIVATIONS)}")
        if output_activation is not None and output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"MLP: unknown output activation {output_activation!r}, expected None or one of "
                f"{sorted(OUTPUT_ACTIVATIONS)}"
            )
        self.config = {
            "sizes": sizes,
            "activation": activation,
            "output_activation": output_activation,
            "fused": fused,
            "bias": bias,
        }
        self.sizes = sizes
        self.fused = fused
        self.layers = nn.ModuleList(Linear(h_in, h_out, bias=bias) for h_in, h_out in pairwise(sizes))
        self.activations: list[str | None] = [activation] * (len(sizes) - 2) + [output_activation]

    def forward(self, x: Tensor) -> Tensor:
        """The prediction ``a_L``; training goes through :meth:`cost`."""
        for layer, act in zip(self.layers, self.activations):
            if act == "sigmoid" and self.fused:
                x = F.linear_sigmoid(x, layer.weight, layer.bias)
            else:
                x = layer(x) if act is None else OUTPUT_ACTIVATIONS[act](layer(x))
        return x

    def logits(self, x: Tensor) -> Tensor:
        """z_L, the last layer's pre-activation: what ``F.cross_entropy`` / ``F.binary_cross_entropy`` take."""
        for layer, act in zip(self.layers[:-1], self.activations[:-1]):
            x = (
                F.linear_sigmoid(x, layer.weight, layer.bias)
                if act == "sigmoid" and self.fused
                else ACTIVATIONS[act](layer(x))
            )
        return self.layers[-1](x)

    def cost(self, x: Tensor, target: Tensor, loss: str = "mse") -> Tensor:
        """The scalar cost ``loss(self(x), target)`` as one autograd node, whose backward is backprop.

        :class:`~bp_service.functions.MLPCostFunction` runs the forward pass, the cost and, on
        ``backward()``, the delta recursion through every layer: the same numbers as the
        per-layer path ``F.mse_loss(self(x), target)``, without a Python call per layer.

        Args:
            x: input ``(*, sizes[0])``; target: ``(*, sizes[-1])``.
            loss: ``"mse"``, ``"l1"`` or ``"cross_entropy"``: with a softmax output the mean over rows
                of ``-sum_k y_k log p_k`` (targets one-hot or rows of probabilities), with a sigmoid
                output binary cross-entropy summed over outputs, mean over rows (binary, multi-label);
                taken from the logits in log-sum-exp / log-sigmoid form, so finite at any logit.
                Per-layer twins: ``F.cross_entropy(self.logits(x), target)``, ``F.binary_cross_entropy``.
        """
        return F.mlp_cost(x, target, self.params(), self.activations, loss)

    def gradient_norms(self, x: Tensor, target: Tensor, loss: str = "mse") -> tuple[Tensor, Tensor]:
        """Per layer ``(|dC/dW_l|, |delta_l|)`` on one batch: where the gradient vanishes or explodes.

        Runs :func:`~bp_service.functions.backprop` outside autograd; no ``.grad`` is touched.
        """
        return F.gradient_norms(x, target, self.params(), self.activations, loss)

    def params(self) -> tuple[Tensor | None, ...]:
        """``(W_1, b_1, ..., W_L, b_L)`` in layer order, a bias None where the layers have none."""
        # This runs every training step: read each layer's own parameter dict, not ``layer.weight``, which
        # goes through ``nn.Module.__getattr__`` (about 0.7 µs a lookup, a tenth of a small step's gap to native).
        params: list[Tensor | None] = []
        for layer in self._modules["layers"]._modules.values():
            own = layer._parameters
            if "weight" in own and "bias" in own:
                params += (own["weight"], own["bias"])
            else:  # a parametrized layer (``torch.nn.utils.parametrize``): its weight is computed on access
                params += (layer.weight, layer.bias)
        return tuple(params)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activations={self.activations}, fused={self.fused}"
