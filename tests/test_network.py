"""The whole-network Function: forward pass, cost and backpropagation as one autograd node."""

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck
from twins import NATIVE_ACTIVATIONS

from bp_service import MLP, dispatch
from bp_service import functions as F
from bp_service.activations import ACTIVATIONS, HIDDEN

DOUBLE = torch.float64
NATIVE_ACT = {**NATIVE_ACTIVATIONS, None: lambda z: z}
NATIVE_COST = {"mse": TF.mse_loss, "l1": TF.l1_loss}


def _network(sizes, bias: bool, dtype, seed: int = 0, batch: int = 6):
    """(x, target, params) with every leaf requiring grad; params = (W_1, b_1, ..., W_L, b_L)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], dtype=dtype, generator=g)
    target = torch.rand(batch, sizes[-1], dtype=dtype, generator=g)
    params = []
    for h_in, h_out in itertools.pairwise(sizes):
        params.append(torch.randn(h_out, h_in, dtype=dtype, generator=g) / h_in**0.5)
        params.append(torch.randn(h_out, dtype=dtype, generator=g) if bias else None)
    leaves = [t if t is None else t.requires_grad_() for t in (x, target, *params)]
    return leaves[0], leaves[1], leaves[2:]


def _native_cost(x, target, params, activations, cost):
    a = x
    for layer, activation in enumerate(activations):
        a = NATIVE_ACT[activation](TF.linear(a, params[2 * layer], params[2 * layer + 1]))
    return NATIVE_COST[cost](a, target)


def _clone(tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


# 1 to 4 hidden layers, every activation, output activation or none.
ARCHITECTURES = {
    "1h-sigmoid": ([3, 4, 2], ("sigmoid", "sigmoid")),
    "1h-tanh-linear": ([3, 5, 2], ("tanh", None)),
    "2h-relu-sigmoid": ([4, 5, 3, 2], ("relu", "relu", "sigmoid")),
    "3h-mixed-tanh": ([3, 4, 4, 3, 2], ("sigmoid", "tanh", "relu", "tanh")),
    "4h-sigmoid-linear": ([2, 3, 3, 3, 3, 1], ("sigmoid",) * 4 + (None,)),
    **{f"2h-{name}-linear": ([3, 4, 3, 2], (name, name, None)) for name in HIDDEN},  # every hidden record
    "1h-softmax": ([3, 4, 3], ("tanh", "softmax")),  # softmax under MSE: its Jacobian in the recursion
}


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE])
@pytest.mark.parametrize("cost", ["mse", "l1"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_equal_native_autograd(arch, bias, cost, dtype):
    sizes, activations = ARCHITECTURES[arch]
    x, target, params = _network(sizes, bias, dtype)
    ours, native = _clone([x, target, *params]), _clone([x, target, *params])
    c_ours = F.mlp_cost(ours[0], ours[1], ours[2:], activations, cost)
    c_native = _native_cost(native[0], native[1], native[2:], activations, cost)
    torch.testing.assert_close(c_ours, c_native)
    c_ours.backward()
    c_native.backward()
    for a, b in zip(ours, native):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("cost", ["mse", "l1"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradcheck_and_gradgradcheck(arch, bias, cost):
    sizes, activations = ARCHITECTURES[arch]
    x, target, params = _network(sizes, bias, DOUBLE, seed=1)
    if any(a is not None and ACTIVATIONS[a].kink for a in activations):  # units away from the kink
        x = (x.detach() + 0.5 * x.detach().sign()).requires_grad_()

    def fn(x, target, *params):
        return F.mlp_cost(x, target, params, activations, cost)

    inputs = (x, target, *params)
    assert gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(fn, inputs, check_batched_grad=True, check_fwd_over_rev=True)


def test_leading_dimensions_and_partial_requires_grad():
    """x of shape (2, 3, H_in) is flattened like nn.Linear's; only the weights want gradients."""
    x, target, params = _network([4, 3, 2], True, DOUBLE, batch=6)
    x3, t3 = x.detach().reshape(2, 3, 4).requires_grad_(), target.detach().reshape(2, 3, 2)
    assert gradcheck(lambda x, *p: F.mlp_cost(x, t3, p, ("sigmoid", "sigmoid")), (x3, *params))
    grads = torch.autograd.grad(F.mlp_cost(x3.detach(), t3, params, ("sigmoid", "sigmoid")), params[0])
    (native,) = torch.autograd.grad(_native_cost(x3.detach(), t3, params, ("sigmoid", "sigmoid"), "mse"), params[0])
    torch.testing.assert_close(grads[0], native)


@pytest.mark.parametrize("cost", ["mse", "l1"])
@pytest.mark.parametrize("upstream", [-2.5, 0.0])
def test_a_training_steps_backward_takes_the_upstream_gradient(cost, upstream):
    """The backward that keeps nothing writes dC/da_L into the buffer of a_L - y: scaled by dL/dC first,
    negative or zero included, it still gives native autograd's gradients."""
    sizes, activations = ARCHITECTURES["2h-relu-sigmoid"]
    x, target, params = _network(sizes, True, DOUBLE)
    ours, native = _clone([x, target, *params]), _clone([x, target, *params])
    (upstream * F.mlp_cost(ours[0], ours[1], ours[2:], activations, cost)).backward()
    (upstream * _native_cost(native[0], native[1], native[2:], activations, cost)).backward()
    for a, b in zip(ours, native):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("cost", ["mse", "l1"])
def test_backward_twice_with_retain_graph_gives_the_same_gradients(cost):
    """The backward's in-place arithmetic touches only its own buffers, never what it saved (an upstream
    gradient other than 1, so that L1's sign of a sign would show too)."""
    x, target, params = _network([3, 4, 2], True, DOUBLE)
    cost = F.mlp_cost(x, target, params, ("sigmoid", "sigmoid"), cost)
    upstream = torch.tensor(-2.5, dtype=DOUBLE)
    first = torch.autograd.grad(cost, params, upstream, retain_graph=True)
    second = torch.autograd.grad(cost, params, upstream)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cost", ["mse", "l1"])
def test_create_graph_without_retain_graph_gives_the_same_derivatives(cost):
    """A graph of the backward built once (retain_graph=False) gives the first and second derivatives
    of one kept for later."""
    x, target, params = _network([3, 4, 2], True, DOUBLE)
    found = []
    for retain in (True, False):
        c = F.mlp_cost(x, target, params, ("sigmoid", "tanh"), cost)
        grads = torch.autograd.grad(c, params, create_graph=True, retain_graph=retain)
        found.append((grads, torch.autograd.grad(sum((g * g).sum() for g in grads), params)))
    for kept, once in zip(*found):
        for a, b in zip(kept, once):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE])
def test_a_steps_numbers_are_tensors_made_once_that_compute_as_the_python_numbers(dtype):
    """dispatch.scalar: the 1/M, 2/M and 1/N a step multiplies by, each a 0-dim CPU tensor made once; every product
    is the one the Python number gives, to the bit."""
    t = torch.randn(7, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    for value in (2 / t.numel(), -1 / 7, 1 / 3):
        c = dispatch.scalar(value, dtype)
        assert c is dispatch.scalar(value, dtype) and c.dim() == 0 and c.dtype == dtype
        torch.testing.assert_close(t * c, t * value, rtol=0, atol=0)
        torch.testing.assert_close(t.sum() * c, t.sum() * value, rtol=0, atol=0)


def test_a_steps_numbers_are_plain_cpu_tensors_wherever_first_made():
    """Made first inside inference mode, a torch.func transform or under another default device, the cached number
    is still a plain CPU tensor: a graph can save it, it outlives the transform, it multiplies a CPU tensor."""
    made = {}
    with torch.inference_mode():
        made["inference"] = dispatch.scalar(1 / 12345, torch.float64)
    torch.func.grad(lambda w: (w * dispatch.scalar(1 / 12346, torch.float64)).sum())(torch.ones(2, dtype=DOUBLE))
    made["torch.func"] = dispatch.scalar(1 / 12346, torch.float64)
    with torch.device("meta"):
        made["meta default"] = dispatch.scalar(1 / 12347, torch.float64)
    for where, c in made.items():
        assert c.device.type == "cpu" and not c.is_inference(), where
        assert not torch._C._functorch.is_functorch_wrapped_tensor(c), where
        w = torch.ones(3, dtype=DOUBLE, requires_grad=True)
        (w * c).sum().backward()  # mul saves its other operand
        torch.testing.assert_close(w.grad, torch.full_like(w, c.item()), rtol=0, atol=0)


def test_compiled_code_multiplies_by_the_python_number():
    """Under torch.compile dispatch.scalar gives the number itself: the traced graph holds 0.25, no tensor."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    t = torch.randn(4, 5)
    scaled = torch.compile(lambda t: t * dispatch.scalar(0.25, t.dtype), backend=keep, fullgraph=True)(t)
    torch.testing.assert_close(scaled, t * 0.25, rtol=0, atol=0)
    (graph,) = graphs
    assert [n for n in graph.graph.nodes if n.op == "call_function" and 0.25 in n.args]
    assert not [n for n in graph.graph.nodes if n.op == "get_attr"]  # no tensor constant


@pytest.mark.parametrize(
    "cost, activations",
    [
        ("mse", ("sigmoid", "sigmoid")),
        ("l1", ("sigmoid", None)),
        ("cross_entropy", ("tanh", "softmax")),
        ("cross_entropy", ("relu", "sigmoid")),
    ],
)
def test_an_empty_batch_costs_nan_and_moves_no_weight(cost, activations):
    """Nothing to average over: the cost is nan, as torch's losses of an empty batch, and the backward gives zero
    weight gradients, not a ZeroDivisionError."""
    x, target, params = _network([3, 4, 2], True, DOUBLE, batch=0)
    c = F.mlp_cost(x, target, params, activations, cost)
    assert c.isnan()
    for g in torch.autograd.grad(c, params):
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("ours", "native"),
    [
        (F.mse_loss, TF.mse_loss),
        (F.l1_loss, TF.l1_loss),
        (F.cross_entropy, TF.cross_entropy),
        (F.binary_cross_entropy, TF.binary_cross_entropy_with_logits),
    ],
    ids=["mse", "l1", "cross_entropy", "binary_cross_entropy"],
)
def test_a_per_layer_loss_of_an_empty_batch_is_nan_with_an_empty_gradient(ours, native):
    pred, target = torch.zeros(0, 3, dtype=DOUBLE, requires_grad=True), torch.zeros(0, 3, dtype=DOUBLE)
    loss = ours(pred, target)
    assert loss.isnan() and native(pred, target).isnan()
    (grad,) = torch.autograd.grad(loss, pred)  # no ZeroDivisionError from the average's 1/M
    assert grad.shape == (0, 3)


def test_vmap_per_sample_gradients_match_loop():
    from torch.func import grad, vmap

    x, target, params = _network([4, 3, 2], True, DOUBLE, batch=5)
    w1, b1, w2, b2 = (p.detach() for p in params)

    def cost(w1, x, t):
        return F.mlp_cost(x, t, (w1, b1, w2, b2), ("sigmoid", "sigmoid"))

    per_sample = vmap(grad(cost), in_dims=(None, 0, 0))(w1, x.detach(), target.detach())
    for i in range(5):
        w = w1.clone().requires_grad_()
        cost(w, x.detach()[i], target.detach()[i]).backward()
        torch.testing.assert_close(per_sample[i], w.grad)


# --------------------------------------------------------------------------- MLP.cost
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_mlp_cost_agrees_with_forward(loss, fused):
    torch.manual_seed(0)
    net = MLP([5, 6, 4, 3], activation="tanh", output_activation="sigmoid", fused=fused).double()
    x, target = torch.randn(7, 5, dtype=DOUBLE), torch.rand(7, 3, dtype=DOUBLE)
    per_layer = (F.mse_loss if loss == "mse" else F.l1_loss)(net(x), target)
    torch.testing.assert_close(net.cost(x, target, loss), per_layer)


@pytest.mark.parametrize("activation", HIDDEN)
def test_training_with_cost_equals_per_layer_path(activation):
    """Several SGD steps through MLP.cost give the weights the per-layer Functions give (float64)."""
    torch.manual_seed(0)
    a = MLP([6, 8, 5, 3], activation=activation, output_activation="sigmoid").double()
    b = MLP([6, 8, 5, 3], activation=activation, output_activation="sigmoid").double()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, target = torch.randn(16, 6, dtype=DOUBLE, generator=g), torch.rand(16, 3, dtype=DOUBLE, generator=g)
        for _net, opt, cost in ((a, opt_a, a.cost(x, target)), (b, opt_b, F.mse_loss(b(x), target))):
            opt.zero_grad()
            cost.backward()
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, n=name: f"{n}: {m}")


def test_gradient_norms_match_the_parameter_gradients():
    """MLP.gradient_norms reports |dC/dW_l| of a real backward and |delta_l| = |dC/db_l| per row."""
    torch.manual_seed(0)
    net = MLP([4, 6, 5, 2]).double()
    x, target = torch.randn(1, 4, dtype=DOUBLE), torch.rand(1, 2, dtype=DOUBLE)
    w_norms, delta_norms = net.gradient_norms(x, target)
    assert [p.grad for p in net.parameters()] == [None] * 6  # gradient_norms left .grad alone...
    net.cost(x, target).backward()
    for layer, w_norm, d_norm in zip(net.layers, w_norms, delta_norms):
        torch.testing.assert_close(w_norm, layer.weight.grad.norm())
        torch.testing.assert_close(d_norm, layer.bias.grad.norm())  # one row: dC/db_l = delta_l
    grads = [p.grad.clone() for p in net.parameters()]
    again = net.gradient_norms(x, target)
    for p, g in zip(net.parameters(), grads):
        assert torch.equal(p.grad, g)  # ...and, once there, neither adds to it nor zeroes it
    for ours, first in zip(again, (w_norms, delta_norms)):
        torch.testing.assert_close(ours, first, rtol=0, atol=0)  # the same batch, the same norms


# --------------------------------------------------------------------------- precisions
@pytest.mark.parametrize("path", ["cost", "per_layer"])
def test_autocast_bf16_gradients_match_native(path):
    """Under CPU autocast both paths compute in bfloat16 and return float32 gradients, as native does."""
    torch.manual_seed(0)
    net = MLP([16, 32, 4])
    native = [p.detach().clone().requires_grad_() for p in net.params()]
    x, target = torch.randn(64, 16), torch.rand(64, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = net.cost(x, target) if path == "cost" else F.mse_loss(net(x), target)
        ref = _native_cost(x, target, native, ("sigmoid", "sigmoid"), "mse")
    assert ours.dtype == ref.dtype == torch.float32
    ours.backward()
    ref.backward()
    for p, q in zip(net.params(), native):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("path", ["cost", "per_layer", "linear"])
def test_autocast_leaves_a_float64_network_in_float64_as_native(path):
    """Autocast casts only float32 and lower: a float64 model under it computes in float64, as native ops do."""
    torch.manual_seed(0)
    net = MLP([16, 32, 4]).double()
    native = [p.detach().clone().requires_grad_() for p in net.params()]
    x, target = torch.randn(8, 16, dtype=DOUBLE), torch.rand(8, 4, dtype=DOUBLE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if path == "linear":
            ours, ref = F.linear(x, *net.params()[:2]), TF.linear(x, *native[:2])
        else:
            ours = net.cost(x, target) if path == "cost" else F.mse_loss(net(x), target)
            ref = _native_cost(x, target, native, ("sigmoid", "sigmoid"), "mse")
    assert ours.dtype == ref.dtype == DOUBLE
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    for p, q in zip(net.params(), native):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, DOUBLE])
def test_true_precisions_stay_in_the_network_dtype(dtype):
    torch.manual_seed(0)
    net = MLP([8, 6, 3]).to(dtype)
    x, target = torch.randn(10, 8, dtype=dtype), torch.rand(10, 3, dtype=dtype)
    cost = net.cost(x, target)
    cost.backward()
    assert all(p.grad.dtype == dtype for p in net.parameters())
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(cost.to(dtype), F.mse_loss(net(x), target), **tol)


# --------------------------------------------------------------------------- bad input, the rule
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: F.mlp_cost(torch.randn(2, 5), torch.rand(2, 2), p, ("sigmoid", "sigmoid")), "layer 1: weight has"),
        (lambda p: F.mlp_cost(torch.randn(2, 3), torch.rand(2, 3), p, ("sigmoid", "sigmoid")), "target has shape"),
        (lambda p: F.mlp_cost(torch.randn(2, 3), torch.rand(2, 2), p, ("sigmoid", "swish")), "unknown activation"),
        (lambda p: F.mlp_cost(torch.randn(2, 3), torch.rand(2, 2), p, ("sigmoid", None), "huber"), "unknown cost"),
        (lambda p: F.mlp_cost(torch.randn(2, 3, dtype=DOUBLE), torch.rand(2, 2), p, ("sigmoid",) * 2), "is torch.f"),
    ],
)
def test_bad_network_input_is_one_line(call, message):
    _, _, params = _network([3, 4, 2], True, torch.float32)
    with pytest.raises(ValueError, match=message):
        call(params)


def test_no_native_backward_kernel_in_the_package():
    """Every derivative is arithmetic we wrote: no call into autograd's own backward kernels."""
    pattern = re.compile(r"\baten\b|_C\._nn\.\w*_backward|_VF\.\w*_backward")
    package = Path(F.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{n}"
        for path in sorted(package.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


@pytest.mark.slow
def test_compiled_cost_trains_like_eager():
    """torch.compile(MLP.cost), fullgraph: the same losses and weights as eager after several SGD steps."""
    torch.manual_seed(0)
    eager, compiled = MLP([5, 8, 6, 3]), MLP([5, 8, 6, 3])
    compiled.load_state_dict(eager.state_dict())
    cost = torch.compile(compiled.cost, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (eager, compiled)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, target = torch.randn(16, 5, generator=g), torch.rand(16, 3, generator=g)
        losses = []
        for fn, opt in zip((eager.cost, cost), opts):
            opt.zero_grad(set_to_none=True)
            loss = fn(x, target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0])
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q)
