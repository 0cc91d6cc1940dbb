"""Backpropagation written out by hand: the chain rule of each layer as a ``torch.autograd.Function``.

Every Function follows one style:

* ``forward`` computes the value from its inputs alone (no ``ctx``);
* ``setup_context`` saves what the derivative needs, and nothing more;
* ``backward`` states the derivative once, as a formula, guarded by ``ctx.needs_input_grad``;
* ``jvp`` states the same derivative in forward mode.

An activation's forward and derivative are written once, in its record in
:mod:`bp_service.activations`; its Function here is made from that record.

``backward`` and ``jvp`` are built from differentiable torch ops, so second derivatives
(``gradgradcheck``, Hessian-vector products) flow through them, and ``generate_vmap_rule``
lets ``torch.func.vmap`` batch them. Nothing here modifies a gradient it was given.

Symbols in shape comments: ``N`` batch (all leading dimensions flattened), ``H_in`` input
features, ``H_out`` output features. This module imports only torch; how a call reaches a Function
(autocast, torch.compile, torch.func) is :mod:`bp_service.dispatch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import Function
from torch.nn.functional import linear as _linear_forward  # values only: every derivative here is written out

from bp_service import dispatch
from bp_service.activations import ACTIVATIONS, CROSS_ENTROPY_OUTPUTS

__all__ = [
    "BinaryCrossEntropyFunction",
    "CrossEntropyFunction",
    "L1LossFunction",
    "LinearFunction",
    "LinearSigmoidFunction",
    "MLPCostFunction",
    "MLPCostTransformsFunction",
    "MSELossFunction",
    "backprop",
    "binary_cross_entropy",
    "cross_entropy",
    "gradient_norms",
    "l1_loss",
    "linear",
    "linear_sigmoid",
    "mlp_cost",
    "mse_loss",
]  # and, from the table, each activation's Function and functional alias: SigmoidFunction, sigmoid, ...


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


# Elements of f' alive at once in the in-place backward (256 KiB in float32): a layer's f' taken whole
# would sit beside its activation and gradient, one more activation-sized buffer at the step's peak.
_DERIVATIVE_BLOCK = 1 << 16


def _times_derivative(grad_a: Tensor, saved: Tensor, activation: str | None, inplace: bool) -> Tensor:
    """delta = dL/dz = dL/da * f'(z), f' from the activation's record (:mod:`bp_service.activations`).

    ``saved`` is what the record's derivative reads: the output a, or the input z. ``inplace``
    overwrites ``grad_a``, a buffer the caller allocated itself, when no graph of the backward is
    being built. No activation (a linear layer): f' = 1.
    """
    if activation is None:
        return grad_a
    rule = ACTIVATIONS[activation]
    if rule.jacobian_product is not None:  # f not elementwise (softmax): delta = J dL/da
        return rule.jacobian_product(grad_a, saved)
    if not inplace:
        return grad_a * rule.derivative(saved)  # (*, H) * (*, H)
    if grad_a.numel() <= _DERIVATIVE_BLOCK:
        return grad_a.mul_(rule.derivative(saved))
    # f' is a new tensor: a block of rows at a time, it never takes a whole layer's worth of memory
    rows = max(1, _DERIVATIVE_BLOCK // grad_a.shape[-1])
    for grad_rows, saved_rows in zip(grad_a.split(rows), saved.split(rows)):
        grad_rows.mul_(rule.derivative(saved_rows))
    return grad_a


def _activation_function(name: str) -> type[Function]:
    """The per-layer Function of ``ACTIVATIONS[name]``: a = f(z); backward and forward mode dL/da * f'."""
    rule = ACTIVATIONS[name]

    class ActivationFunction(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Tensor) -> Tensor:
            return ACTIVATIONS[name].forward(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            saved = output if ACTIVATIONS[name].reads == "output" else inputs[0]  # what f' is read off
            ctx.save_for_backward(saved)
            ctx.save_for_forward(saved)

        @staticmethod
        def backward(ctx, grad_y):
            (saved,) = ctx.saved_tensors
            return _times_derivative(grad_y, saved, name, inplace=False)  # dL/dx = dL/dy * f'(x)

        @staticmethod
        def jvp(ctx, dx):
            (saved,) = ctx.saved_tensors
            return _times_derivative(dx, saved, name, inplace=False)  # dy = f'(x) dx

    ActivationFunction.__name__ = ActivationFunction.__qualname__ = f"{rule.title}Function"
    ActivationFunction.__doc__ = f"a = {name}(z), its derivative read off its {rule.reads} (see ``ACTIVATIONS``)."
    return ActivationFunction


# One Function per record, a module global by its own name (``SigmoidFunction``): Dynamo finds a
# class it traces by module and name.
ACTIVATION_FUNCTIONS: dict[str, type[Function]] = {name: _activation_function(name) for name in ACTIVATIONS}
globals().update({fn.__name__: fn for fn in ACTIVATION_FUNCTIONS.values()})
__all__ += [fn.__name__ for fn in ACTIVATION_FUNCTIONS.values()]


class LinearSigmoidFunction(Function):
    """y = sigmoid(x W^T + b), fused: one layer of the worked example.

    The hidden-layer delta dL/dz = dL/dy * sigmoid'(z) (sigmoid's record) is computed once and then shared by
    all three gradients, exactly as backpropagation reuses it:
        dL/dx = delta W,  dL/dW = delta^T x,  dL/db = sum of delta over every leading dimension.
    Only x, W and the output y are saved; the pre-activation z is never kept.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        _check_linear("linear_sigmoid", x, weight, bias)
        return ACTIVATIONS["sigmoid"].forward_(_affine(x, weight, bias))  # in place: z is never needed again

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight, output)
        ctx.save_for_forward(x, weight, output)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        delta = _times_derivative(grad_y, y, "sigmoid", inplace=False)  # dL/dz = dL/dy * sigmoid'(z)
        return _affine_backward(ctx, delta, x, weight)

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, weight, y = ctx.saved_tensors
        return _times_derivative(_affine_jvp(x, weight, dx, dw, db), y, "sigmoid", inplace=False)


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
        grad_pred = (pred - target) * (grad_loss * (2 * _per(pred.numel())))  # dL/dpred = 2 (pred - target) / M
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


# Cross-entropy, the cost of a softmax or sigmoid output layer, taken from the logits z (the last
# layer's pre-activation) in the forms that stay finite at any z:
#
#   softmax + cross-entropy, rows of y distributions (one-hot labels), N rows of K classes:
#       C = -(1/N) sum_n sum_k y_nk log p_nk,   log p = z - logsumexp(z),  p = softmax(z)
#       logsumexp(z) = m + log sum_k exp(z_k - m), m = max_k z_k: no exp overflows, no log of 0.
#   sigmoid + binary cross-entropy, any number of independent outputs (binary, multi-label):
#       C = -(1/N) sum_n sum_k [y log s + (1 - y) log(1 - s)],  s = sigmoid(z)
#         =  (1/N) sum_n sum_k [softplus(z) - y z]   as log s = -softplus(-z), log(1 - s) = -softplus(z)
#       softplus(z) = max(z, 0) + log1p(exp(-|z|)): exp of a non-positive number only.
#
# Both are summed over outputs and averaged over rows, as scikit-learn's log-loss (for one output
# this is nn.BCEWithLogitsLoss; for K > 1 sigmoid outputs it is K times that mean over elements).
#
# Their derivative with respect to z collapses to the same delta:
#   softmax:  dC/dz_i = -(1/N) sum_k y_k d(log p_k)/dz_i = -(1/N) sum_k y_k (1[i = k] - p_i)
#                     = (p_i sum_k y_k - y_i) / N = (p_i - y_i) / N   where the row of y sums to 1;
#   sigmoid:  dC/dz   = (softplus'(z) - y) / N = (s - y) / N,          since softplus' = sigmoid.
# So delta_L = (a_L - y) / N for labels: the output activation's derivative cancels against the cost's
# (each is the canonical link of its likelihood), which is why it never saturates as sigmoid + MSE does.
# CrossEntropyFunction, torch's F.cross_entropy's twin, keeps the row sum (one reduction): a row of y that is
# not a distribution (all zeros, a masked row) gets the derivative of what its forward computed, as in torch.
# The whole-network step (mlp_cost, bp-train's hot path) takes rows of y that are distributions, as one-hot
# labels are, and does without that reduction: 2-3 % of a digits step.
# With respect to the target: dC/dy = -log p / N (softmax), -z / N (sigmoid).
def _log_softmax(z: Tensor) -> Tensor:
    """log p = z - logsumexp(z) along the last dimension, the row's max subtracted first (one fused kernel)."""
    return torch.log_softmax(z, -1)  # (*, K) -> (*, K)


def _softmax_delta(p: Tensor, y: Tensor) -> Tensor:
    """p sum_k y_k - y: N dC/dz of softmax cross-entropy, (p - y) for a row of y that sums to 1."""
    return (p * y.sum(-1, keepdim=True)).sub_(y)  # (N, K) * (N, 1) - (N, K) -> (N, K)


def _softplus(z: Tensor) -> Tensor:
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)), finite for every finite z."""
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


def _rows(t: Tensor) -> int:
    """N, the rows a cost averages over: every leading dimension together (1 for a vector)."""
    return t.numel() // t.shape[-1] if t.dim() else 1


class CrossEntropyFunction(Function):
    """Softmax cross-entropy from logits: C = -(1/N) sum y log softmax(z), each row of y a distribution.

    Backward (derivation above): dC/dz = (softmax(z) sum_k y_k - y) / N, which is (softmax(z) - y) / N for a
    distribution,  dC/dy = -log softmax(z) / N.
    ``F.cross_entropy(z, y)`` with probability targets, for 2-D z. Only z and y are saved; log p is
    recomputed in backward, so that a second derivative sees it as the function of z it is.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, target: Tensor) -> Tensor:
        _check_loss("cross_entropy", logits, target)
        return -(target * _log_softmax(logits)).sum() / _rows(logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target = ctx.saved_tensors
        scale = grad_loss / _rows(logits)
        log_p = _log_softmax(logits)
        grad_z = _softmax_delta(log_p.exp(), target) * scale if ctx.needs_input_grad[0] else None  # (p Σy - y) / N
        grad_y = -log_p * scale if ctx.needs_input_grad[1] else None  # -log p / N
        return grad_z, grad_y

    @staticmethod
    def jvp(ctx, dlogits, dtarget):
        logits, target = ctx.saved_tensors
        log_p = _log_softmax(logits)
        dcost = torch.zeros((), dtype=logits.dtype, device=logits.device)
        if dlogits is not None:
            dcost = dcost + (_softmax_delta(log_p.exp(), target) * dlogits).sum()
        if dtarget is not None:
            dcost = dcost - (log_p * dtarget).sum()
        return dcost / _rows(logits)


class BinaryCrossEntropyFunction(Function):
    """Sigmoid binary cross-entropy from logits: C = (1/N) sum [softplus(z) - y z], summed over outputs.

    Backward (derivation above): dC/dz = (sigmoid(z) - y) / N,  dC/dy = -z / N.
    ``F.binary_cross_entropy_with_logits(z, y)`` times the number of outputs K (its mean is over N K).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, target: Tensor) -> Tensor:
        _check_loss("binary_cross_entropy", logits, target)
        return (_softplus(logits) - target * logits).sum() / _rows(logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target = ctx.saved_tensors
        scale = grad_loss / _rows(logits)
        grad_z = (torch.sigmoid(logits) - target) * scale if ctx.needs_input_grad[0] else None  # (s - y) / N
        grad_y = -logits * scale if ctx.needs_input_grad[1] else None  # -z / N
        return grad_z, grad_y

    @staticmethod
    def jvp(ctx, dlogits, dtarget):
        logits, target = ctx.saved_tensors
        dcost = torch.zeros((), dtype=logits.dtype, device=logits.device)
        if dlogits is not None:
            dcost = dcost + ((torch.sigmoid(logits) - target) * dlogits).sum()
        if dtarget is not None:
            dcost = dcost - (logits * dtarget).sum()
        return dcost / _rows(logits)


# --------------------------------------------------------------------------- the whole network
# One Function for the forward pass, the cost and backpropagation through every layer: the
# algorithm the worked example teaches, and one autograd node per training step instead of
# one per layer (each ``Function.apply`` costs tens of microseconds of Python).
def _derivative_reads(layer: int, x: Tensor, params: tuple, acts: list, activation: str | None) -> Tensor:
    """What layer l's f' is read off: its output a_l, or z_l = a_{l-1} W_l^T + b_l recomputed (not kept)."""
    if activation is None or ACTIVATIONS[activation].reads == "output":
        return acts[layer]
    return _affine(x if layer == 0 else acts[layer - 1], params[2 * layer], params[2 * layer + 1])


def _network_forward(
    x: Tensor, params: tuple[Tensor | None, ...], activations: tuple[str | None, ...], inplace: bool
) -> list[Tensor]:
    """[a_1, ..., a_L] for a_l = f_l(z_l), z_l = a_{l-1} W_l^T + b_l, a_0 = x of shape (N, H_in)."""
    acts, a = [], x
    for layer, activation in enumerate(activations):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        # z = a W^T + b: (N, H_in) @ (H_in, H_out) + (H_out,) -> (N, H_out). One call that takes W as it is
        # stored: torch.addmm(b, a, W.T) makes the transposed view in Python first, 0.4 µs a layer more.
        a = _linear_forward(a, weight, bias)
        if activation is not None:  # a = f(z), written into z (a buffer never read again) when it can
            rule = ACTIVATIONS[activation]
            a = rule.forward_(a) if inplace and rule.forward_ is not None else rule.forward(a)
        acts.append(a)
    return acts


_HALF = (torch.float16, torch.bfloat16)  # a cost is summed in float32 from these (dispatch.cost_dtype)


def _difference(pred: Tensor, target: Tensor) -> Tensor:
    """a_L - y in the cost's dtype (casts cost a call each, so only when needed)."""
    dtype = dispatch.cost_dtype(pred.dtype)
    if pred.dtype == target.dtype == dtype:
        return pred - target
    return pred.to(dtype) - target.to(dtype)


def _per(count: int) -> float:
    """1 / count, what an average over ``count`` rows or elements multiplies by; nan over none, as torch's mean."""
    return 1 / count if count else math.nan


def _mean(t: Tensor) -> Tensor:
    """The mean over all M elements. On CPU ``t.mean()`` makes a new 0-dim tensor for M on every call (3 µs, a
    hundredth of a small step): there it is sum(t) * (1/M), with 1/M made once (:func:`dispatch.scalar`). On a GPU
    mean is one kernel, and a product after the sum would be a second launch."""
    if not t.is_cpu:
        return t.mean()
    return t.sum() * dispatch.scalar(_per(t.numel()), t.dtype)


def _cost(diff: Tensor, cost: str) -> Tensor:
    """C = mean((a_L - y)^2) or mean(|a_L - y|) over all M elements, from diff = a_L - y."""
    if cost == "mse":
        return _mean(diff.square())
    if cost == "l1":
        return _mean(diff.abs())
    raise ValueError(f"mlp_cost: unknown cost {cost!r}, expected one of {list(LOSSES)}")


# The output activations cross-entropy pairs with; their derivative is folded into the cost's delta.
_CROSS_ENTROPY_OUTPUTS = CROSS_ENTROPY_OUTPUTS


def _network_cost(
    x: Tensor, target: Tensor, params: tuple, activations: tuple, cost: str, inplace: bool
) -> tuple[list[Tensor], Tensor, Tensor]:
    """([a_1, ..., a_L], a_L - y, C): the forward pass and the cost; a_L - y in the cost's dtype.

    Cross-entropy is taken from the logits z_L (derivation above :func:`_log_softmax`), so the
    output layer is run linear first; a_L = softmax(z_L) = exp(log p) or sigmoid(z_L) follows.
    """
    if cost != "cross_entropy":
        acts = _network_forward(x, params, activations, inplace)  # [a_1, ..., a_L]
        pred = acts[-1]
        if target.shape != pred.shape:
            _check_target(target, pred)
        if pred.dtype == target.dtype and pred.dtype not in _HALF:
            diff = pred - target  # (N, H_L)
        else:
            diff = _difference(pred, target)
        if cost == "mse":  # the common case first: a call less per step
            return acts, diff, _mean(diff.square())
        return acts, diff, _cost(diff, cost)
    output = activations[-1]
    if output not in _CROSS_ENTROPY_OUTPUTS:
        raise ValueError(f"mlp_cost: cross_entropy needs a softmax or sigmoid output layer, got {output!r}")
    acts = _network_forward(x, params, (*activations[:-1], None), inplace)  # [a_1, ..., a_{L-1}, z_L]
    z = acts[-1]
    if target.shape != z.shape:
        _check_target(target, z)
    dtype = dispatch.cost_dtype(z.dtype)
    zc = z if z.dtype == dtype else z.to(dtype)  # (N, K)
    y = target if target.dtype == dtype else target.to(dtype)
    n = zc.shape[0]
    if output == "softmax":
        log_p = _log_softmax(zc)  # (N, K)
        c = (y * log_p).sum() * dispatch.scalar(-_per(n), dtype)  # C = -(1/N) sum y log p
        a = log_p.exp_() if inplace else log_p.exp()  # p = softmax(z_L)
    else:
        c = (_softplus(zc) - y * zc).sum() * dispatch.scalar(_per(n), dtype)  # C = (1/N) sum [softplus(z) - y z]
        a = zc.sigmoid_() if inplace else torch.sigmoid(zc)  # s = sigmoid(z_L)
    acts[-1] = a if a.dtype == z.dtype else a.to(z.dtype)  # a_L in the layers' dtype, as every a_l
    return acts, a - y, c  # N dC/dz_L for rows of y that are distributions (the contract above)


def _check_target(target: Tensor, pred: Tensor) -> None:
    if target.shape != pred.shape:  # a_L - y would broadcast
        raise ValueError(f"mlp_cost: target has shape {tuple(target.shape)}, prediction {tuple(pred.shape)}")


def _cross_entropy_target_term(x: Tensor, params: tuple, acts: list[Tensor], output: str, dtype) -> Tensor:
    """-N dC/dy of cross-entropy: log p (softmax) or z_L (sigmoid); z_L recomputed from a_{L-1}."""
    a_prev, weight, bias = x if len(acts) == 1 else acts[-2], params[-2], params[-1]
    if bias is None:
        z = a_prev @ weight.T  # (N, H_in) @ (H_in, K) -> (N, K)
    else:
        z = torch.addmm(bias, a_prev, weight.T)  # b + (N, H_in) @ (H_in, K) -> (N, K)
    z = z.to(dtype)
    return _log_softmax(z) if output == "softmax" else z


def _output_gradients(
    grad_cost: Tensor,
    x: Tensor,
    params: tuple,
    acts: list,
    diff: Tensor,
    activations: tuple,
    cost: str,
    needs_y: bool,
    reuse: bool,
) -> tuple[Tensor, Tensor | None, tuple]:
    """Where :func:`backprop` starts: (dC/da_L, dC/dy or None, the activations whose f' it then applies).

    With ``reuse`` (diff is read by nothing after, and no graph of the backward is built), dC/da_L is
    written into diff's own buffer: one (N, H_L) tensor fewer alive while the backward pass runs.
    """
    if cost == "l1":  # C = mean |a_L - y| reads only the sign of a_L - y
        diff = diff.sign_() if reuse else torch.sign(diff)
    scaled = diff.mul_(grad_cost) if reuse else diff * grad_cost  # (a_L - y) or its sign, times dL/dC: (N, H_L)
    if cost == "cross_entropy":
        # delta_L itself, (N, K): the output's f' is already in it (derivation above _log_softmax),
        # so backprop treats the output layer as linear.
        grad_a = scaled.mul_(dispatch.scalar(_per(diff.shape[0]), diff.dtype))  # dC/dz_L = (a_L - y) / N
        grad_y = None
        if needs_y:  # dC/dy = -log p / N (softmax), -z_L / N (sigmoid); never in a training step: a Python number
            term = _cross_entropy_target_term(x, params, acts, activations[-1], diff.dtype)
            grad_y = term * (-grad_cost / diff.shape[0])
        return grad_a, grad_y, (*activations[:-1], None)
    if cost == "mse":
        scale = 2 * _per(diff.numel())  # dC/da_L = 2 (a_L - y) / M, (N, H_L)
    else:
        scale = _per(diff.numel())  # dC/da_L = sign(a_L - y) / M
    grad_a = scaled.mul_(dispatch.scalar(scale, diff.dtype))
    return grad_a, (-grad_a if needs_y else None), activations  # C depends on a_L - y


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
        delta_l = dC/da_l * f_l'                 f_l' as its record in bp_service.activations writes it,
                                                 read off a_l (or z_l); a linear layer: 1
        delta_L = dC/dz_L = (a_L - y) / N        cross-entropy with its softmax or sigmoid output
        dC/dW_l = delta_l^T a_{l-1},  dC/db_l = sum of delta_l over the batch,  dC/da_{l-1} = delta_l W_l

    Args:
        grad_cost: dL/dC, the scalar gradient flowing into the cost (1 for ``cost.backward()``).
        x: the input a_0, ``(N, H_in)``; params: ``(W_1, b_1, ..., W_L, b_L)``, a bias may be None.
        acts: ``[a_1, ..., a_L]``, each ``(N, H_l)``; diff: ``a_L - y`` in the cost's dtype.
        needs_grad: ``(x, y, W_1, b_1, ...)``: which gradients to compute.
        deltas: if given, each delta_l is appended to it (last layer first), for diagnostics.
        release: the caller hands ``acts`` and ``diff`` over: each a_l is dropped once used (set to None)
            and, outside a graph of the backward, dC/da_L is written into diff's buffer; the caller reads
            neither again, and keeps no reference to diff, so their memory goes as native autograd's does.

    Returns:
        ``(dC/dx, dC/dy, dC/dW_1, dC/db_1, ..., dC/dW_L, dC/db_L)``, None where not needed.
    """
    inplace = not torch.is_grad_enabled()  # building a graph of the backward: keep every buffer
    n_layers = len(activations)
    grad_a, grad_y, activations = _output_gradients(
        grad_cost, x, params, acts, diff, activations, cost, needs_grad[1], reuse=release and inplace
    )
    del diff  # read by nothing more here; when reused, its buffer is grad_a's
    if grad_a.dtype != acts[-1].dtype:  # under autocast the cost ran in float32, the layers did not
        grad_a = grad_a.to(acts[-1].dtype)
    grads: list[Tensor | None] = [None] * (2 * n_layers)
    for layer in range(n_layers - 1, -1, -1):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        a_prev = x if layer == 0 else acts[layer - 1]
        activation = activations[layer]
        if activation is None:  # a linear layer: f' = 1
            delta = grad_a
        elif (
            inplace
            and (rule := ACTIVATIONS[activation]).jacobian_product is None
            and rule.reads == "output"
            and grad_a.numel() <= _DERIVATIVE_BLOCK
        ):  # _times_derivative's case of a training step, inline: f' off a_l, into our own buffer
            delta = grad_a.mul_(rule.derivative(acts[layer]))
        else:
            # f' is read off a_l (or z_l), held by no name here: released below, its memory goes at once
            delta = _times_derivative(
                grad_a, _derivative_reads(layer, x, params, acts, activation), activation, inplace
            )  # (N, H_out)
        if release:
            acts[layer] = None  # a_l was needed for f' and dC/dW_{l+1} only: both are done
        if deltas is not None:
            deltas.append(delta)  # never written again: the next layer's grad_a is a new buffer
        if needs_grad[2 + 2 * layer]:
            grads[2 * layer] = torch.mm(delta.T, a_prev)  # (H_out, N) @ (N, H_in) -> (H_out, H_in)
        if bias is not None and needs_grad[3 + 2 * layer]:
            grads[2 * layer + 1] = delta.sum(0)  # (N, H_out) -> (H_out,)
        if layer > 0 or needs_grad[0]:
            grad_a = torch.mm(delta, weight)  # (N, H_out) @ (H_out, H_in) -> (N, H_in): dC/da_{l-1}
        del delta  # gone before the next layer's f' is made, the backward pass's peak, as native autograd's
    grad_x = grad_a if needs_grad[0] else None
    return (grad_x, grad_y, *grads)


class MLPCostFunction(Function):
    """C = cost(a_L, y) of a whole multilayer perceptron, with backpropagation as its backward.

    Forward, for l = 1..L with a_0 = x:  z_l = a_{l-1} W_l^T + b_l,  a_l = f_l(z_l);  then the
    cost, MSE ``mean((a_L - y)^2)``, L1 ``mean(|a_L - y|)`` or cross-entropy from z_L (softmax or
    sigmoid output). It saves x, the weights and every a_l (no z_l: f' is read off a_l, or z_l is
    recomputed for an activation whose derivative needs it).
    Backward is :func:`backprop`, the delta recursion.

    ``apply(x, y, activations, cost, W_1, b_1, ..., W_L, b_L)``: ``activations`` holds
    a name of :data:`~bp_service.activations.ACTIVATIONS` or None per layer, ``cost`` is
    ``"mse" | "l1" | "cross_entropy"``, a bias may be
    None. Use it through :func:`mlp_cost` or :meth:`bp_service.MLP.cost`.

    The combined ``forward(ctx, ...)`` saves the intermediates a_l directly: one output, one
    autograd node, the cheapest call there is. When a graph of the backward is requested
    (double backward), the a_l are recomputed from the inputs with recorded ops, so that second
    derivatives see how they depend on x and the weights. ``torch.func`` transforms and forward
    mode need the ``setup_context`` style: :func:`mlp_cost` then uses :class:`MLPCostTransformsFunction`.

    Shape:
        - x: ``(N, H_in)`` (more leading dimensions are flattened by :func:`mlp_cost`);
          y: ``(N, H_out)``; W_l: ``(H_l, H_{l-1})``; b_l: ``(H_l,)``; C: ``()``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, activations: tuple, cost: str, *params: Tensor | None) -> Tensor:
        acts, diff, c = _network_cost(x, target, params, activations, cost, inplace=True)  # [a_1, ..., a_L]
        ctx.activations, ctx.cost, ctx.n_acts = activations, cost, len(acts)
        ctx.save_for_backward(x, target, *params)
        # Buffers only this Function ever sees (made without grad: no reference cycle), kept on ctx
        # so that backward can let each go once used, as native autograd frees each layer's.
        ctx.acts, ctx.diff = acts, diff
        return c

    @staticmethod
    def backward(ctx, grad_cost: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or dispatch.graph_kept():
            return _network_backward(ctx, grad_cost)
        # A training step's backward, the one that runs every step: :func:`_network_backward`'s case
        # with nothing kept, written out (inside the autograd engine each Python call costs more still).
        x, _, *params = ctx.saved_tensors  # the target: dC/dy is read off a_L - y
        acts, ctx.acts = ctx.acts, None  # each activation goes once the recursion has used it
        needs = ctx.needs_input_grad
        grad_x, grad_y, *grads = backprop(
            grad_cost,
            x,
            params,
            acts,
            _hand_over_diff(ctx),
            ctx.activations,
            ctx.cost,
            needs[:2] + needs[4:],
            release=True,
        )
        return (grad_x, grad_y, None, None, *grads)


def _hand_over_diff(ctx) -> Tensor:
    """ctx.diff, with no reference left on ctx or in the caller's frame: backprop's is the last one (CPython 3.11
    moves a call's arguments into the callee's frame; 3.10 keeps them on the caller's stack, so the buffer lives
    to the end of the backward there, and the numbers are the same)."""
    diff, ctx.diff = ctx.diff, None
    return diff


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
    # A graph kept for another backward (retain_graph, create_graph) needs every activation again;
    # otherwise each goes once used.
    # Under torch.compile the backward is traced ahead of time and the compiled graph frees its own buffers.
    keep = torch.compiler.is_compiling() or dispatch.graph_kept()
    release = not keep and getattr(ctx, "acts", None) is not None
    if release:
        ctx.acts = ctx.diff = None
    if torch.is_grad_enabled():  # double backward: activations as recorded functions of x and the weights
        acts, diff, _ = _network_cost(x, target, params, ctx.activations, ctx.cost, inplace=False)
    needs = ctx.needs_input_grad
    grad_x, grad_y, *grads = backprop(
        grad_cost, x, params, acts, diff, ctx.activations, ctx.cost, (needs[0], needs[1], *needs[4:]), release=release
    )
    return (grad_x, grad_y, None, None, *grads)


class MLPCostTransformsFunction(Function):
    """:class:`MLPCostFunction` for ``torch.func`` transforms (vmap, grad) and forward mode (``setup_context``).

    The same forward pass, cost and backward. ``setup_context`` sees only inputs and outputs, so
    forward also returns the activations and ``a_L - y`` (marked non-differentiable); that costs
    a few microseconds per call, which is why training uses :class:`MLPCostFunction`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, target: Tensor, activations: tuple, cost: str, *params: Tensor | None):
        acts, diff, c = _network_cost(x, target, params, activations, cost, inplace=True)
        return (c, *acts, diff)

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
        """Forward mode: dz_l = da_{l-1} W_l^T + a_{l-1} dW_l^T + db_l, da_l = f'(z_l) dz_l, then dC."""
        x, _, params, acts, diff = _saved(ctx)
        cross_entropy = ctx.cost == "cross_entropy"
        activations = (*ctx.activations[:-1], None) if cross_entropy else ctx.activations  # then da ends as dz_L
        da = dx
        for layer, activation in enumerate(activations):
            a_prev = x if layer == 0 else acts[layer - 1]
            dz = _affine_jvp(a_prev, params[2 * layer], da, dparams[2 * layer], dparams[2 * layer + 1])
            da = _times_derivative(dz, _derivative_reads(layer, x, params, acts, activation), activation, False)
        if cross_entropy:  # dC = sum [(a_L - y) dz_L - term dy] / N, term = log p or z_L
            dcost = (diff * da.to(diff.dtype)).sum()
            if dtarget is not None:
                term = _cross_entropy_target_term(x, params, acts, ctx.activations[-1], diff.dtype)
                dcost = dcost - (term * dtarget.to(diff.dtype)).sum()
            return (dcost / diff.shape[0],) + (None,) * (ctx.n_acts + 1)
        ddiff = _tangent_difference(da.to(diff.dtype), None if dtarget is None else dtarget.to(diff.dtype), diff)
        dcost = (2 * diff * ddiff).mean() if ctx.cost == "mse" else (torch.sign(diff) * ddiff).mean()
        return (dcost,) + (None,) * (ctx.n_acts + 1)  # the activations and diff are not differentiable


# --------------------------------------------------------------------------- functional aliases
# The calls users and modules make: each through :func:`bp_service.dispatch.caller` (its twin without
# ``jvp`` under torch.compile), with autocast's casts where the native op makes them.
dispatch.cache_signature(MLPCostFunction)
dispatch.cache_signature(MLPCostTransformsFunction)
_apply_network = dispatch.direct_apply(MLPCostFunction)  # once per training step: its Python layer skipped
_linear, _linear_sigmoid = dispatch.caller(LinearFunction), dispatch.caller(LinearSigmoidFunction)
_mse_loss, _l1_loss = dispatch.caller(MSELossFunction), dispatch.caller(L1LossFunction)
_cross_entropy = dispatch.caller(CrossEntropyFunction)
_binary_cross_entropy = dispatch.caller(BinaryCrossEntropyFunction)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` through :class:`LinearFunction`; under autocast in its dtype, as ``F.linear``."""
    return _linear(*dispatch.layer_inputs(x, weight, bias))


def linear_sigmoid(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``sigmoid(x @ weight.T + bias)`` through the fused :class:`LinearSigmoidFunction`; autocast as :func:`linear`."""
    return _linear_sigmoid(*dispatch.layer_inputs(x, weight, bias))


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error through :class:`MSELossFunction` (in float32 under autocast, as ``F.mse_loss``)."""
    return _mse_loss(*dispatch.cost_inputs(pred, target))


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error through :class:`L1LossFunction` (in float32 under autocast, as ``F.l1_loss``)."""
    return _l1_loss(*dispatch.cost_inputs(pred, target))


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy from logits through :class:`CrossEntropyFunction` (float32 under autocast)."""
    return _cross_entropy(*dispatch.cost_inputs(logits, target))


def binary_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Sigmoid cross-entropy from logits through :class:`BinaryCrossEntropyFunction` (float32 under autocast)."""
    return _binary_cross_entropy(*dispatch.cost_inputs(logits, target))


def _activation_alias(name: str) -> Callable[[Tensor], Tensor]:
    function = ACTIVATION_FUNCTIONS[name]
    apply = dispatch.caller(function)

    def alias(x: Tensor) -> Tensor:
        return apply(x)

    alias.__name__ = alias.__qualname__ = name
    alias.__doc__ = f"{name} through :class:`{function.__name__}`."
    return alias


# One alias per activation record, a module global by its name (``sigmoid``, ``relu``, ...).
ACTIVATION_ALIASES: dict[str, Callable[[Tensor], Tensor]] = {name: _activation_alias(name) for name in ACTIVATIONS}
globals().update(ACTIVATION_ALIASES)
__all__ += list(ACTIVATION_ALIASES)


# The costs by name (``model.loss``): the one list, each the per-layer twin of what ``mlp_cost`` computes.
# ``mse`` and ``l1`` take the prediction a_L; ``cross_entropy`` takes the logits z_L, with a softmax
# output (a sigmoid output's twin is :func:`binary_cross_entropy`); see :meth:`bp_service.MLP.logits`.
LOSSES = {"mse": mse_loss, "l1": l1_loss, "cross_entropy": cross_entropy}
# Cross-entropy's per-layer twin by the output activation it pairs with (``activations.CROSS_ENTROPY_OUTPUTS``):
# ``mlp_cost(x, y, params, activations, "cross_entropy")`` equals ``CROSS_ENTROPY_TWINS[activations[-1]](z_L, y)``.
CROSS_ENTROPY_TWINS = {"softmax": cross_entropy, "sigmoid": binary_cross_entropy}


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
        activations: one of ``"sigmoid" | "tanh" | "relu" | "softmax" | None`` per layer.
        cost: ``"mse"``, ``"l1"`` or ``"cross_entropy"`` (softmax cross-entropy with a softmax output, each
            row of ``target`` a distribution, as one-hot labels are; binary cross-entropy per output with a
            sigmoid one, summed over outputs, mean over rows).

    Under autocast the layers run in the autocast dtype and the cost in float32, as native
    ``F.linear`` and ``F.mse_loss`` do; each input's gradient comes back in its own dtype.
    """
    try:  # checked only when something failed: the check costs as much as a small layer
        x2, target2 = x, target
        if x.dim() != 2 or target.dim() != 2:
            x2, target2 = _flat(x, x.shape[-1]), _flat(target, target.shape[-1])  # (*, H) -> (N, H)
        if (dtype := dispatch.autocast_dtype(x)) is None:
            if dispatch.transforms_active():  # torch.func or forward mode: the setup_context style
                return MLPCostTransformsFunction.apply(x2, target2, activations, cost, *params)[0]
            return _apply_network(x2, target2, activations, cost, *params)  # a training step: straight in
        x2, *cast_params = dispatch.cast(dtype, x2, *params)
        with torch.autocast(x.device.type, enabled=False):  # already cast: the cost stays in float32
            return _apply_cost(x2, target2, activations, cost, cast_params)
    except (RuntimeError, ValueError, IndexError, KeyError):  # KeyError: an activation not in the table
        _check_network(x, target, params, activations, cost)  # one line naming the layer, if it is the cause
        raise


def _apply_cost(x: Tensor, target: Tensor, activations: Sequence, cost: str, params: Sequence[Tensor | None]) -> Tensor:
    if dispatch.transforms_active():  # torch.func or forward mode: the setup_context style
        return MLPCostTransformsFunction.apply(x, target, activations, cost, *params)[0]
    return _apply_network(x, target, activations, cost, *params)


def _check_network(
    x: Tensor, target: Tensor, params: Sequence[Tensor | None], activations: Sequence[str | None], cost: str
) -> None:
    """One line naming the layer whose pieces do not fit (the per-layer Functions check the same)."""
    if cost not in LOSSES:
        raise ValueError(f"mlp_cost: unknown cost {cost!r}, expected one of {list(LOSSES)}")
    if cost == "cross_entropy" and activations and activations[-1] not in _CROSS_ENTROPY_OUTPUTS:
        raise ValueError(f"mlp_cost: cross_entropy needs a softmax or sigmoid output layer, got {activations[-1]!r}")
    if not activations or len(params) != 2 * len(activations):
        raise ValueError(f"mlp_cost: {len(params)} params for {len(activations)} layers; expected (W, b) per layer")
    same_dtype = dispatch.autocast_dtype(x) is None  # under autocast every input is cast to one dtype
    h = x.shape[-1] if x.dim() else 0
    for layer, activation in enumerate(activations, start=1):
        weight, bias = params[2 * layer - 2], params[2 * layer - 1]
        name = f"mlp_cost: layer {layer}"
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"{name}: unknown activation {activation!r}, expected None or one of {list(ACTIVATIONS)}")
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
        acts, diff, _ = _network_cost(x2, target2, tuple(params), tuple(activations), cost, inplace=True)
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
