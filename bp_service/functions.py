"""Backpropagation written out by hand: the chain rule of each layer as a ``torch.autograd.Function``.

Every Function follows one style:

* ``forward`` computes the value from its inputs alone (no ``ctx``);
* ``setup_context`` saves what the derivative needs, and nothing more;
* ``backward`` states the derivative once, as a formula, guarded by ``ctx.needs_input_grad``;
* ``jvp`` states the same derivative in forward mode.

``backward`` and ``jvp`` are built from differentiable torch ops, so second derivatives
(``gradgradcheck``, Hessian-vector products) flow through them, and ``generate_vmap_rule``
lets ``torch.func.vmap`` batch them. Nothing here modifies a gradient it was given.

Symbols in shape comments: ``N`` batch (all leading dimensions flattened), ``H_in`` input
features, ``H_out`` output features. This module imports only torch.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.autograd import Function

__all__ = [
    "L1LossFunction",
    "LinearFunction",
    "LinearSigmoidFunction",
    "MSELossFunction",
    "ReLUFunction",
    "SigmoidFunction",
    "TanhFunction",
    "l1_loss",
    "linear",
    "linear_sigmoid",
    "mse_loss",
    "relu",
    "sigmoid",
    "tanh",
]


# --------------------------------------------------------------------------- input checks
def _check_linear(name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Turn a would-be matmul error into one line that names both shapes."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (H_out, H_in), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        got = "a scalar" if x.dim() == 0 else f"{x.shape[-1]} features (shape {tuple(x.shape)})"
        raise ValueError(
            f"{name}: input has {got}, weight expects {weight.shape[1]} (weight shape {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{name}: bias has shape {tuple(bias.shape)}, weight expects ({weight.shape[0]},) "
            f"(weight shape {tuple(weight.shape)})"
        )
    for other, label in ((weight, "weight"), (bias, "bias")):
        if other is not None and other.dtype != x.dtype:
            raise ValueError(f"{name}: input is {x.dtype}, {label} is {other.dtype}")
        if other is not None and other.device != x.device:
            raise ValueError(f"{name}: input is on {x.device}, {label} is on {other.device}")


def _check_loss(name: str, pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred has shape {tuple(pred.shape)}, target has shape {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise ValueError(f"{name}: pred is {pred.dtype}, target is {target.dtype}")


def _flat(t: Tensor, features: int) -> Tensor:
    """(*, H) -> (N, H), N all leading dimensions together; a 2-D tensor as it is (no view made)."""
    return t if t.dim() == 2 else t.reshape(-1, features)


def _affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """z = x W^T + b over any leading dimensions."""
    x2 = _flat(x, weight.shape[1])  # (*, H_in) -> (N, H_in)
    if bias is None:
        z = x2 @ weight.T  # (N, H_in) @ (H_in, H_out) -> (N, H_out)
    else:
        z = torch.addmm(bias, x2, weight.T)  # b + (N, H_in) @ (H_in, H_out) -> (N, H_out)
    return z if x.dim() == 2 else z.reshape(*x.shape[:-1], weight.shape[0])


def _sigmoid_delta(grad_y: Tensor, y: Tensor) -> Tensor:
    """dL/dz = dL/dy * y (1 - y) for y = sigmoid(z), as one fused kernel into a new tensor.

    ``aten.sigmoid_backward(g, y)`` computes exactly ``g * (1 - y) * y`` (the kernel native
    ``torch.sigmoid`` uses for its own backward): one pass over memory and one allocation where
    the spelled-out product takes three of each. It is itself differentiable, in reverse and
    forward mode, and batched by vmap, so double backward, jvp-of-backward and vmap still work.
    """
    return torch.ops.aten.sigmoid_backward(grad_y, y)  # (*, H) x (*, H) -> (*, H): grad_y * y * (1 - y)


def _affine_backward(ctx, delta: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of z = x W^T + b given delta = dL/dz: the part every linear layer shares."""
    h_out, h_in = weight.shape
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = delta @ weight  # (*, H_out) @ (H_out, H_in) -> (*, H_in)
    delta2 = _flat(delta, h_out)  # (*, H_out) -> (N, H_out)
    if ctx.needs_input_grad[1]:
        grad_w = delta2.T @ _flat(x, h_in)  # (H_out, N) @ (N, H_in) -> (H_out, H_in)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = delta2.sum(0)  # (N, H_out) -> (H_out,)
    return grad_x, grad_w, grad_b


def _affine_jvp(x: Tensor, weight: Tensor, dx: Tensor | None, dw: Tensor | None, db: Tensor | None) -> Tensor:
    """Tangent of z = x W^T + b: dz = dx W^T + x dW^T + db (product rule)."""
    dz = torch.zeros(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    if dx is not None:
        dz = dz + dx @ weight.T  # (*, H_in) @ (H_in, H_out) -> (*, H_out)
    if dw is not None:
        dz = dz + x @ dw.T  # (*, H_in) @ (H_in, H_out) -> (*, H_out)
    if db is not None:
        dz = dz + db
    return dz


# --------------------------------------------------------------------------- layers
class LinearFunction(Function):
    """y = x W^T + b, for x of shape (*, H_in) and W of shape (H_out, H_in).

    Backward, with delta = dL/dy:
        dL/dx = delta W,  dL/dW = delta^T x,  dL/db = sum of delta over every leading dimension.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        _check_linear("linear", x, weight, bias)
        return _affine(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        return _affine_backward(ctx, grad_y, x, weight)

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, weight = ctx.saved_tensors
        return _affine_jvp(x, weight, dx, dw, db)


class SigmoidFunction(Function):
    """y = 1 / (1 + exp(-x)).  Backward: dL/dx = dL/dy * y (1 - y), from the saved output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return _sigmoid_delta(grad_y, y)  # dL/dx = dL/dy * sigmoid'(x), sigmoid' = y(1-y)

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        return dx * y * (1 - y)


class TanhFunction(Function):
    """y = tanh(x).  Backward: dL/dx = dL/dy * (1 - y^2), from the saved output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        # One fused kernel, as native tanh's backward: aten.tanh_backward(g, y) = g * (1 - y^2),
        # itself differentiable (double backward, forward mode) and batched by vmap.
        return torch.ops.aten.tanh_backward(grad_y, y)  # dL/dx = dL/dy * tanh'(x), tanh' = 1 - y^2

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        return dx * (1 - y * y)


class ReLUFunction(Function):
    """y = max(x, 0).  Backward: dL/dx = dL/dy where y > 0, else 0 (subgradient 0 at 0, as torch)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.clamp_min(x, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        # One fused kernel, as native relu's backward: aten.threshold_backward(g, y, 0) = g where y > 0, else 0.
        return torch.ops.aten.threshold_backward(grad_y, y, 0)  # dL/dx = dL/dy * 1[x > 0]

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        return dx * (y > 0).to(dx.dtype)


class LinearSigmoidFunction(Function):
    """y = sigmoid(x W^T + b), fused: one layer of the worked example.

    The hidden-layer delta dL/dz = dL/dy * y (1 - y) is computed once and then shared by
    all three gradients, exactly as backpropagation reuses it:
        dL/dx = delta W,  dL/dW = delta^T x,  dL/db = sum of delta over every leading dimension.
    Only x, W and the output y are saved; the pre-activation z is never kept.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        _check_linear("linear_sigmoid", x, weight, bias)
        return _affine(x, weight, bias).sigmoid_()  # in place: z is never needed again

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight, output)
        ctx.save_for_forward(x, weight, output)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        delta = _sigmoid_delta(grad_y, y)  # dL/dz = dL/dy * sigmoid'(z), sigmoid' = y(1-y)
        return _affine_backward(ctx, delta, x, weight)

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, weight, y = ctx.saved_tensors
        return _affine_jvp(x, weight, dx, dw, db) * y * (1 - y)


# --------------------------------------------------------------------------- losses
class MSELossFunction(Function):
    """L = mean((pred - target)^2) over all M elements.

    Backward: dL/dpred = 2 (pred - target) / M * dL/dL,  dL/dtarget = -dL/dpred.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(pred: Tensor, target: Tensor) -> Tensor:
        _check_loss("mse_loss", pred, target)
        diff = pred - target
        return (diff * diff).mean()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target = inputs
        ctx.save_for_backward(pred, target)
        ctx.save_for_forward(pred, target)

    @staticmethod
    def backward(ctx, grad_loss):
        pred, target = ctx.saved_tensors
        grad_pred = (pred - target) * (grad_loss * (2 / pred.numel()))  # dL/dpred = 2 (pred - target) / M
        grad_target = -grad_pred if ctx.needs_input_grad[1] else None
        return (grad_pred if ctx.needs_input_grad[0] else None), grad_target

    @staticmethod
    def jvp(ctx, dpred, dtarget):
        pred, target = ctx.saved_tensors
        ddiff = _tangent_difference(dpred, dtarget, pred)
        return (2 * (pred - target) * ddiff).mean()


class L1LossFunction(Function):
    """L = mean(|pred - target|) over all M elements.

    Backward: dL/dpred = sign(pred - target) / M * dL/dL (0 where pred == target, as torch),
    dL/dtarget = -dL/dpred.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(pred: Tensor, target: Tensor) -> Tensor:
        _check_loss("l1_loss", pred, target)
        return (pred - target).abs().mean()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pred, target = inputs
        ctx.save_for_backward(pred, target)
        ctx.save_for_forward(pred, target)

    @staticmethod
    def backward(ctx, grad_loss):
        pred, target = ctx.saved_tensors
        grad_pred = torch.sign(pred - target) * (grad_loss / pred.numel())  # dL/dpred = sign(pred - target) / M
        grad_target = -grad_pred if ctx.needs_input_grad[1] else None
        return (grad_pred if ctx.needs_input_grad[0] else None), grad_target

    @staticmethod
    def jvp(ctx, dpred, dtarget):
        pred, target = ctx.saved_tensors
        ddiff = _tangent_difference(dpred, dtarget, pred)
        return (torch.sign(pred - target) * ddiff).mean()


def _tangent_difference(dpred: Tensor | None, dtarget: Tensor | None, like: Tensor) -> Tensor:
    """Tangent of (pred - target) when either tangent may be absent."""
    if dpred is None:
        return -dtarget if dtarget is not None else torch.zeros_like(like)
    return dpred - dtarget if dtarget is not None else dpred


# --------------------------------------------------------------------------- call overhead
# ``Function.apply`` binds every call's arguments to ``forward``'s signature, and
# ``inspect.signature`` rebuilds that signature each time: about 10 µs a call, as much as a
# small layer's arithmetic. It honours a precomputed ``__signature__`` (PEP 362), so build each
# one once. The subclasses below share their parent's ``forward`` and so its signature.
for _function in (
    LinearFunction,
    SigmoidFunction,
    TanhFunction,
    ReLUFunction,
    LinearSigmoidFunction,
    MSELossFunction,
    L1LossFunction,
):
    _function.forward.__signature__ = inspect.signature(_function.forward)


# --------------------------------------------------------------------------- functional aliases
# Dynamo (torch.compile) refuses to trace a Function that defines ``jvp``. Under compile the
# aliases below use these twins, identical but for that; they are module globals because Dynamo
# re-imports the class it traces by name.
_NO_JVP = {"jvp": staticmethod(Function.jvp), "__module__": __name__}
_LinearNoJvp = type("_LinearNoJvp", (LinearFunction,), _NO_JVP)
_SigmoidNoJvp = type("_SigmoidNoJvp", (SigmoidFunction,), _NO_JVP)
_TanhNoJvp = type("_TanhNoJvp", (TanhFunction,), _NO_JVP)
_ReLUNoJvp = type("_ReLUNoJvp", (ReLUFunction,), _NO_JVP)
_LinearSigmoidNoJvp = type("_LinearSigmoidNoJvp", (LinearSigmoidFunction,), _NO_JVP)
_MSELossNoJvp = type("_MSELossNoJvp", (MSELossFunction,), _NO_JVP)
_L1LossNoJvp = type("_L1LossNoJvp", (L1LossFunction,), _NO_JVP)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` through :class:`LinearFunction`."""
    return (_LinearNoJvp if torch.compiler.is_compiling() else LinearFunction).apply(x, weight, bias)


def sigmoid(x: Tensor) -> Tensor:
    """Logistic sigmoid through :class:`SigmoidFunction`."""
    return (_SigmoidNoJvp if torch.compiler.is_compiling() else SigmoidFunction).apply(x)


def tanh(x: Tensor) -> Tensor:
    """Hyperbolic tangent through :class:`TanhFunction`."""
    return (_TanhNoJvp if torch.compiler.is_compiling() else TanhFunction).apply(x)


def relu(x: Tensor) -> Tensor:
    """Rectified linear unit through :class:`ReLUFunction`."""
    return (_ReLUNoJvp if torch.compiler.is_compiling() else ReLUFunction).apply(x)


def linear_sigmoid(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``sigmoid(x @ weight.T + bias)`` through the fused :class:`LinearSigmoidFunction`."""
    return (_LinearSigmoidNoJvp if torch.compiler.is_compiling() else LinearSigmoidFunction).apply(x, weight, bias)


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error through :class:`MSELossFunction`."""
    return (_MSELossNoJvp if torch.compiler.is_compiling() else MSELossFunction).apply(pred, target)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error through :class:`L1LossFunction`."""
    return (_L1LossNoJvp if torch.compiler.is_compiling() else L1LossFunction).apply(pred, target)
