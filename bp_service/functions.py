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
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import Function, forward_ad

__all__ = [
    "L1LossFunction",
    "LinearFunction",
    "LinearSigmoidFunction",
    "MLPCostFuncFunction",
    "MLPCostFunction",
    "MSELossFunction",
    "ReLUFunction",
    "SigmoidFunction",
    "TanhFunction",
    "backprop",
    "gradient_norms",
    "l1_loss",
    "linear",
    "linear_sigmoid",
    "mlp_cost",
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
    """dL/dz = dL/dy * y (1 - y) for y = sigmoid(z), read off the saved output y."""
    return grad_y * y * (1 - y)  # (*, H) x (*, H) -> (*, H)


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
        return grad_y * (1 - y * y)  # dL/dx = dL/dy * tanh'(x), tanh' = 1 - y^2

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
        return grad_y * (y > 0)  # dL/dx = dL/dy * relu'(x), relu' = 1[x > 0] (read off y > 0)

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


# --------------------------------------------------------------------------- the whole network
# One Function for the forward pass, the cost and backpropagation through every layer: the
# algorithm the worked example teaches, and one autograd node per training step instead of
# one per layer (each ``Function.apply`` costs tens of microseconds of Python).
_ACTIVATION_NAMES = ("sigmoid", "tanh", "relu", None)


def _activate_(z: Tensor, activation: str | None) -> Tensor:
    """a = f(z), in place: z is a buffer of the forward pass and never needed again."""
    if activation == "sigmoid":
        return z.sigmoid_()
    if activation == "tanh":
        return z.tanh_()
    if activation == "relu":
        return z.clamp_min_(0)
    if activation is None:
        return z
    raise ValueError(f"unknown activation {activation!r}, expected one of {_ACTIVATION_NAMES}")


def _activate(z: Tensor, activation: str | None) -> Tensor:
    """a = f(z) as a new tensor, for a forward pass that autograd records."""
    return _activate_(z.clone(), activation) if activation is not None else z


def _times_derivative(grad_a: Tensor, a: Tensor, activation: str | None, inplace: bool) -> Tensor:
    """delta = dC/dz = dC/da * f'(z), with f' read off the layer's output a.

    ``inplace`` overwrites ``grad_a``, a buffer the backward allocated itself, when no graph of
    the backward is being built.
    """
    if activation is None:  # linear output: f' = 1
        return grad_a
    if activation == "sigmoid":  # f' = a (1 - a)
        if inplace:  # u = g a, then u - u a = g a (1 - a): two passes, no new buffer
            return grad_a.mul_(a).addcmul_(grad_a, a, value=-1)
        return grad_a * a * (1 - a)
    if activation == "tanh":  # f' = 1 - a^2
        return grad_a.mul_(1 - a * a) if inplace else grad_a * (1 - a * a)
    return grad_a.mul_(a > 0) if inplace else grad_a * (a > 0)  # relu: f' = 1[a > 0]


def _network_forward(
    x: Tensor, params: tuple[Tensor | None, ...], activations: tuple[str | None, ...], inplace: bool
) -> list[Tensor]:
    """[a_1, ..., a_L] for a_l = f_l(z_l), z_l = a_{l-1} W_l^T + b_l, a_0 = x of shape (N, H_in)."""
    acts, a = [], x
    for layer, activation in enumerate(activations):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        if bias is None:
            z = a @ weight.T  # (N, H_in) @ (H_in, H_out) -> (N, H_out)
        else:
            z = torch.addmm(bias, a, weight.T)  # b + (N, H_in) @ (H_in, H_out) -> (N, H_out)
        a = _activate_(z, activation) if inplace else _activate(z, activation)
        acts.append(a)
    return acts


def _cost_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cost is summed in at least float32, as native losses are under autocast."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _difference(pred: Tensor, target: Tensor) -> Tensor:
    """a_L - y in the cost's dtype (casts cost a call each, so only when needed)."""
    dtype = _cost_dtype(pred.dtype)
    if pred.dtype == target.dtype == dtype:
        return pred - target
    return pred.to(dtype) - target.to(dtype)


def _cost(diff: Tensor, cost: str) -> Tensor:
    """C = mean((a_L - y)^2) or mean(|a_L - y|) over all M elements, from diff = a_L - y."""
    if cost == "mse":
        return diff.square().mean()
    if cost == "l1":
        return diff.abs().mean()
    raise ValueError(f"mlp_cost: unknown cost {cost!r}, expected one of {list(LOSSES)}")


def backprop(
    grad_cost: Tensor,
    x: Tensor,
    params: tuple[Tensor | None, ...],
    acts: list[Tensor],
    diff: Tensor,
    activations: tuple[str | None, ...],
    cost: str,
    needs_grad: tuple[bool, ...],
    deltas: list[Tensor] | None = None,
    release: bool = False,
) -> tuple[Tensor | None, ...]:
    """The backward pass of the whole network: the delta recursion, from the cost down.

        dC/da_L = dC/dC * cost'(a_L)             MSE: 2 (a_L - y) / M,  L1: sign(a_L - y) / M
        delta_l = dC/da_l * f_l'(a_l)            sigmoid: a(1-a), tanh: 1-a^2, relu: 1[a>0], none: 1
        dC/dW_l = delta_l^T a_{l-1},  dC/db_l = sum of delta_l over the batch,  dC/da_{l-1} = delta_l W_l

    Args:
        grad_cost: dL/dC, the scalar gradient flowing into the cost (1 for ``cost.backward()``).
        x: the input a_0, ``(N, H_in)``; params: ``(W_1, b_1, ..., W_L, b_L)``, a bias may be None.
        acts: ``[a_1, ..., a_L]``, each ``(N, H_l)``; diff: ``a_L - y`` in the cost's dtype.
        needs_grad: ``(x, y, W_1, b_1, ...)``: which gradients to compute.
        deltas: if given, each delta_l is appended to it (last layer first), for diagnostics.
        release: drop each entry of ``acts`` once used (set to None), so its memory can go.

    Returns:
        ``(dC/dx, dC/dy, dC/dW_1, dC/db_1, ..., dC/dW_L, dC/db_L)``, None where not needed.
    """
    inplace = not torch.is_grad_enabled()  # building a graph of the backward: keep every buffer
    n_layers = len(activations)
    if cost == "mse":
        grad_a = (diff * grad_cost).mul_(2 / diff.numel())  # dC/da_L = 2 (a_L - y) / M, (N, H_L)
    else:
        grad_a = (torch.sign(diff) * grad_cost).mul_(1 / diff.numel())  # dC/da_L = sign(a_L - y) / M
    grad_y = -grad_a if needs_grad[1] else None  # C depends on a_L - y
    if grad_a.dtype != acts[-1].dtype:  # under autocast the cost ran in float32, the layers did not
        grad_a = grad_a.to(acts[-1].dtype)
    grads: list[Tensor | None] = [None] * (2 * n_layers)
    for layer in reversed(range(n_layers)):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        a_prev = x if layer == 0 else acts[layer - 1]
        delta = _times_derivative(grad_a, acts[layer], activations[layer], inplace)  # (N, H_out)
        if release:
            acts[layer] = None  # a_l was needed for f' and dC/dW_{l+1} only: both are done
        if deltas is not None:
            deltas.append(delta)  # never written again: the next layer's grad_a is a new buffer
        if needs_grad[2 + 2 * layer]:
            grads[2 * layer] = delta.T @ a_prev  # (H_out, N) @ (N, H_in) -> (H_out, H_in)
        if bias is not None and needs_grad[3 + 2 * layer]:
            grads[2 * layer + 1] = delta.sum(0)  # (N, H_out) -> (H_out,)
        if layer > 0 or needs_grad[0]:
            grad_a = delta @ weight  # (N, H_out) @ (H_out, H_in) -> (N, H_in): dC/da_{l-1}
    grad_x = grad_a if needs_grad[0] else None
    return (grad_x, grad_y, *grads)


class MLPCostFunction(Function):
    """C = cost(a_L, y) of a whole multilayer perceptron, with backpropagation as its backward.

    Forward, for l = 1..L with a_0 = x:  z_l = a_{l-1} W_l^T + b_l,  a_l = f_l(z_l);  then the
    cost, MSE ``mean((a_L - y)^2)`` or L1 ``mean(|a_L - y|)``. It saves x, the weights and every
    a_l (no z_l: each f' is read off a_l). Backward is :func:`backprop`, the delta recursion.

    ``apply(x, y, activations, cost, W_1, b_1, ..., W_L, b_L)``: ``activations`` holds
    ``"sigmoid" | "tanh" | "relu" | None`` per layer, ``cost`` is ``"mse" | "l1"``, a bias may be
    None. Use it through :func:`mlp_cost` or :meth:`bp_service.MLP.cost`.

    The combined ``forward(ctx, ...)`` saves the intermediates a_l directly: one output, one
    autograd node, the cheapest call there is. When a graph of the backward is requested
    (double backward), the a_l are recomputed from the inputs with recorded ops, so that second
    derivatives see how they depend on x and the weights. ``torch.func`` transforms and forward
    mode need the ``setup_context`` style: :func:`mlp_cost` then uses :class:`MLPCostFuncFunction`.

    Shape:
        - x: ``(N, H_in)`` (more leading dimensions are flattened by :func:`mlp_cost`);
          y: ``(N, H_out)``; W_l: ``(H_l, H_{l-1})``; b_l: ``(H_l,)``; C: ``()``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, activations: tuple, cost: str, *params: Tensor | None) -> Tensor:
        acts = _network_forward(x, params, activations, inplace=True)  # [a_1, ..., a_L]
        if target.shape != acts[-1].shape:  # a_L - y would broadcast
            raise ValueError(f"mlp_cost: target has shape {tuple(target.shape)}, prediction {tuple(acts[-1].shape)}")
        diff = _difference(acts[-1], target)  # (N, H_L)
        ctx.activations, ctx.cost, ctx.n_acts = activations, cost, len(acts)
        ctx.save_for_backward(x, target, *params)
        # Buffers only this Function ever sees (made without grad: no reference cycle), kept on ctx
        # so that backward can let each go once used, as native autograd frees each layer's.
        ctx.acts, ctx.diff = acts, diff
        return _cost(diff, cost)

    @staticmethod
    def backward(ctx, grad_cost: Tensor) -> tuple[Tensor | None, ...]:
        return _network_backward(ctx, grad_cost)


def _saved(ctx) -> tuple[Tensor, Tensor, tuple, list[Tensor], Tensor]:
    """(x, y, params, [a_1, ..., a_L], diff) as either cost Function saved them."""
    if getattr(ctx, "acts", None) is not None:  # MLPCostFunction: the activations live on ctx
        x, target, *params = ctx.saved_tensors
        return x, target, tuple(params), ctx.acts, ctx.diff
    x, target, *saved = ctx.saved_tensors
    return x, target, tuple(saved[: -ctx.n_acts - 1]), list(saved[-ctx.n_acts - 1 : -1]), saved[-1]


def _network_backward(ctx, grad_cost: Tensor) -> tuple[Tensor | None, ...]:
    """Backward of both cost Functions: :func:`backprop` on what forward saved."""
    x, target, params, acts, diff = _saved(ctx)
    # The engine's own flag (what AOTAutograd reads too): a graph kept for another backward
    # (retain_graph, create_graph) needs every activation again; otherwise each goes once used.
    # Under torch.compile the backward is traced ahead of time and the compiled graph frees its own buffers.
    keep = torch.compiler.is_compiling() or torch._C._autograd._get_current_graph_task_keep_graph()
    release = not keep and getattr(ctx, "acts", None) is not None
    if release:
        ctx.acts = ctx.diff = None
    if torch.is_grad_enabled():  # double backward: activations as recorded functions of x and the weights
        acts = _network_forward(x, params, ctx.activations, inplace=False)
        diff = _difference(acts[-1], target)
    needs = ctx.needs_input_grad
    grad_x, grad_y, *grads = backprop(
        grad_cost, x, params, acts, diff, ctx.activations, ctx.cost, (needs[0], needs[1], *needs[4:]), release=release
    )
    return (grad_x, grad_y, None, None, *grads)


class MLPCostFuncFunction(Function):
    """:class:`MLPCostFunction` in the ``setup_context`` style that ``torch.func`` and forward mode need.

    The same forward pass, cost and backward. ``setup_context`` sees only inputs and outputs, so
    forward also returns the activations and ``a_L - y`` (marked non-differentiable); that costs
    a few microseconds per call, which is why training uses :class:`MLPCostFunction`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, target: Tensor, activations: tuple, cost: str, *params: Tensor | None):
        acts = _network_forward(x, params, activations, inplace=True)
        if target.shape != acts[-1].shape:  # a_L - y would broadcast
            raise ValueError(f"mlp_cost: target has shape {tuple(target.shape)}, prediction {tuple(acts[-1].shape)}")
        diff = _difference(acts[-1], target)  # (N, H_L)
        return (_cost(diff, cost), *acts, diff)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, activations, cost, *params = inputs
        *acts, diff = output[1:]
        ctx.mark_non_differentiable(*acts, diff)
        ctx.set_materialize_grads(False)
        ctx.activations, ctx.cost, ctx.n_acts = activations, cost, len(acts)
        ctx.save_for_backward(x, target, *params, *acts, diff)
        ctx.save_for_forward(x, target, *params, *acts, diff)

    @staticmethod
    def backward(ctx, grad_cost, *_):  # the activations and diff are not differentiable outputs
        if grad_cost is None:
            return (None,) * len(ctx.needs_input_grad)
        return _network_backward(ctx, grad_cost)

    @staticmethod
    def jvp(ctx, dx, dtarget, _activations, _cost, *dparams):
        """Forward mode: dz_l = da_{l-1} W_l^T + a_{l-1} dW_l^T + db_l, da_l = f'(a_l) dz_l, then dC."""
        x, _, params, acts, diff = _saved(ctx)
        da = dx
        for layer, activation in enumerate(ctx.activations):
            a_prev = x if layer == 0 else acts[layer - 1]
            dz = _affine_jvp(a_prev, params[2 * layer], da, dparams[2 * layer], dparams[2 * layer + 1])
            da = _times_derivative(dz, acts[layer], activation, inplace=False)
        ddiff = _tangent_difference(da.to(diff.dtype), None if dtarget is None else dtarget.to(diff.dtype), diff)
        dcost = (2 * diff * ddiff).mean() if ctx.cost == "mse" else (torch.sign(diff) * ddiff).mean()
        return (dcost,) + (None,) * (ctx.n_acts + 1)  # the activations and diff are not differentiable


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
    MLPCostFunction,
    MLPCostFuncFunction,
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


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on ``t``'s device, or None outside autocast."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _cast(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Casts recorded by autograd: each input's gradient comes back in that input's own dtype."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` through :class:`LinearFunction`; under autocast in its dtype, as ``F.linear``."""
    if (dtype := _autocast_dtype(x)) is not None:
        x, weight, bias = _cast(dtype, x, weight, bias)
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
    """``sigmoid(x @ weight.T + bias)`` through the fused :class:`LinearSigmoidFunction`; autocast as :func:`linear`."""
    if (dtype := _autocast_dtype(x)) is not None:
        x, weight, bias = _cast(dtype, x, weight, bias)
    return (_LinearSigmoidNoJvp if torch.compiler.is_compiling() else LinearSigmoidFunction).apply(x, weight, bias)


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error through :class:`MSELossFunction` (in float32 under autocast, as ``F.mse_loss``)."""
    if _autocast_dtype(pred) is not None:
        pred, target = _cast(_cost_dtype(pred.dtype), pred, target)
    return (_MSELossNoJvp if torch.compiler.is_compiling() else MSELossFunction).apply(pred, target)


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error through :class:`L1LossFunction` (in float32 under autocast, as ``F.l1_loss``)."""
    if _autocast_dtype(pred) is not None:
        pred, target = _cast(_cost_dtype(pred.dtype), pred, target)
    return (_L1LossNoJvp if torch.compiler.is_compiling() else L1LossFunction).apply(pred, target)


# The costs by name (``model.loss``): the one list, each the per-layer twin of what ``mlp_cost`` computes.
LOSSES = {"mse": mse_loss, "l1": l1_loss}


def mlp_cost(
    x: Tensor,
    target: Tensor,
    params: Sequence[Tensor | None],
    activations: Sequence[str | None],
    cost: str = "mse",
) -> Tensor:
    """The cost of a whole network through :class:`MLPCostFunction`: one autograd node.

    Args:
        x: input ``(*, H_in)``; target: ``(*, H_out)``, the same leading dimensions.
        params: ``(W_1, b_1, ..., W_L, b_L)``, ``W_l`` of shape ``(H_l, H_{l-1})``; a bias may be None.
        activations: one of ``"sigmoid" | "tanh" | "relu" | None`` per layer.
        cost: ``"mse"`` or ``"l1"``.

    Under autocast the layers run in the autocast dtype and the cost in float32, as native
    ``F.linear`` and ``F.mse_loss`` do; each input's gradient comes back in its own dtype.
    """
    try:  # checked only when something failed: the check costs as much as a small layer
        x2, target2 = _flat(x, x.shape[-1]), _flat(target, target.shape[-1])  # (*, H) -> (N, H)
        if (dtype := _autocast_dtype(x)) is None:
            return _apply_cost(x2, target2, activations, cost, params)
        x2, *cast_params = _cast(dtype, x2, *params)
        with torch.autocast(x.device.type, enabled=False):  # already cast: the cost stays in float32
            return _apply_cost(x2, target2, activations, cost, cast_params)
    except (RuntimeError, ValueError, IndexError):
        _check_network(x, target, params, activations, cost)  # one line naming the layer, if it is the cause
        raise


def _apply_cost(x: Tensor, target: Tensor, activations: Sequence, cost: str, params: Sequence[Tensor | None]) -> Tensor:
    # What Function.apply itself checks to route a call through torch.func; forward mode's
    # level is the one forward_ad.dual_level() sets. Neither has a public reader.
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return MLPCostFuncFunction.apply(x, target, activations, cost, *params)[0]
    return MLPCostFunction.apply(x, target, activations, cost, *params)


def _check_network(
    x: Tensor, target: Tensor, params: Sequence[Tensor | None], activations: Sequence[str | None], cost: str
) -> None:
    """One line naming the layer whose pieces do not fit (the per-layer Functions check the same)."""
    if cost not in LOSSES:
        raise ValueError(f"mlp_cost: unknown cost {cost!r}, expected one of {list(LOSSES)}")
    if not activations or len(params) != 2 * len(activations):
        raise ValueError(f"mlp_cost: {len(params)} params for {len(activations)} layers; expected (W, b) per layer")
    same_dtype = _autocast_dtype(x) is None  # under autocast every input is cast to one dtype
    h = x.shape[-1] if x.dim() else 0
    for layer, activation in enumerate(activations, start=1):
        weight, bias = params[2 * layer - 2], params[2 * layer - 1]
        name = f"mlp_cost: layer {layer}"
        if activation not in _ACTIVATION_NAMES:
            raise ValueError(f"{name}: unknown activation {activation!r}, expected one of {_ACTIVATION_NAMES}")
        if weight.dim() != 2 or weight.shape[1] != h:
            raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, its input has {h} features")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, weight expects ({weight.shape[0]},)")
        for t, label in ((weight, "weight"), (bias, "bias")):
            if t is not None and same_dtype and t.dtype != x.dtype:
                raise ValueError(f"{name}: input is {x.dtype}, {label} is {t.dtype}")
            if t is not None and t.device != x.device:
                raise ValueError(f"{name}: input is on {x.device}, {label} is on {t.device}")
        h = weight.shape[0]
    if tuple(target.shape) != (*x.shape[:-1], h):
        raise ValueError(f"mlp_cost: prediction has shape {(*x.shape[:-1], h)}, target has shape {tuple(target.shape)}")


def gradient_norms(
    x: Tensor,
    target: Tensor,
    params: Sequence[Tensor | None],
    activations: Sequence[str | None],
    cost: str = "mse",
) -> tuple[Tensor, Tensor]:
    """How strongly the error reaches each layer: ``(|dC/dW_l|, |delta_l|)`` for l = 1..L.

    One forward pass and one run of :func:`backprop` on this batch, outside autograd (no
    ``.grad`` is touched). Norms are Frobenius norms; both results have shape ``(L,)``.
    """
    _check_network(x, target, params, activations, cost)
    x2, target2 = _flat(x, x.shape[-1]), _flat(target, target.shape[-1])  # (*, H) -> (N, H)
    with torch.no_grad():
        acts = _network_forward(x2, tuple(params), tuple(activations), inplace=True)
        diff = _difference(acts[-1], target2)
        deltas: list[Tensor] = []
        needs = (False, False) + (True,) * len(params)
        _, _, *grads = backprop(
            torch.ones((), dtype=diff.dtype, device=x.device),
            x2,
            tuple(params),
            acts,
            diff,
            tuple(activations),
            cost,
            needs,
            deltas,
        )
        w_norms = torch.stack([torch.linalg.vector_norm(g) for g in grads[0::2]])
        delta_norms = torch.stack(
            [torch.linalg.vector_norm(d) for d in reversed(deltas)]
        )  # deltas come last layer first
    return w_norms, delta_norms
