"""The hand-written Functions: gradcheck in float64, and ours vs torch."""

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck
from twins import NATIVE_ACTIVATIONS

from bp_service import functions as F
from bp_service.activations import ACTIVATIONS

DOUBLE = torch.float64


def _linear_inputs(case: str, requires: tuple[bool, bool, bool] = (True, True, True)):
    """(x, weight, bias) for one gradcheck case; weight is (H_out=3, H_in=4)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"batch1": (1, 4), "batch": (8, 4), "3d": (2, 5, 4), "vector": (4,)}
    if case == "noncontig":
        x = torch.randn(4, 6, dtype=DOUBLE, generator=g).T  # (6, 4), stride (1, 6)
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shapes[case], dtype=DOUBLE, generator=g)
    w = torch.randn(3, 4, dtype=DOUBLE, generator=g)
    b = torch.randn(3, dtype=DOUBLE, generator=g)
    x, w, b = (t.requires_grad_(r) for t, r in zip((x, w, b), requires))
    return x, w, b


LINEAR_FNS = {"linear": F.LinearFunction.apply, "linear_sigmoid": F.LinearSigmoidFunction.apply}
LINEAR_CASES = ["batch1", "batch", "3d", "vector", "noncontig"]
GRAD_KW = {"check_forward_ad": True, "check_batched_grad": True}
GRADGRAD_KW = {"check_batched_grad": True, "check_fwd_over_rev": True}


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("name", LINEAR_FNS)
def test_linear_gradcheck(name, case):
    fn = LINEAR_FNS[name]
    inputs = _linear_inputs(case)
    assert gradcheck(fn, inputs, **GRAD_KW)
    assert gradgradcheck(fn, inputs, **GRADGRAD_KW)


@pytest.mark.parametrize("name", LINEAR_FNS)
def test_linear_gradcheck_without_bias(name):
    x, w, _ = _linear_inputs("batch")
    assert gradcheck(LINEAR_FNS[name], (x, w, None), **GRAD_KW)
    assert gradgradcheck(LINEAR_FNS[name], (x, w, None), **GRADGRAD_KW)


@pytest.mark.parametrize("requires", [(False, True, True), (True, False, False), (False, False, True)])
@pytest.mark.parametrize("name", LINEAR_FNS)
def test_linear_gradcheck_partial_requires_grad(name, requires):
    inputs = _linear_inputs("batch", requires)
    assert gradcheck(LINEAR_FNS[name], inputs, **GRAD_KW)
    assert gradgradcheck(LINEAR_FNS[name], inputs, **GRADGRAD_KW)


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False)])
def test_linear_backward_skips_unneeded_gradients(requires):
    x, w, b = _linear_inputs("batch", requires)
    y = F.linear(x, w, b)
    grads = y.grad_fn.apply(torch.ones_like(y))  # the raw backward: one entry per input
    assert [g is not None for g in grads] == list(requires)


def test_the_native_twins_cover_exactly_the_table():
    """Every activation record has its torch twin here, and every twin a record."""
    assert set(NATIVE_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("case", ["batch1", "batch", "3d", "noncontig"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_gradcheck(name, case):
    x, _, _ = _linear_inputs(case)
    if ACTIVATIONS[name].kink:  # keep away from the kink, where finite differences are meaningless
        x = (x.detach() + 0.1 * x.detach().sign()).requires_grad_()
    fn = F.ACTIVATION_FUNCTIONS[name].apply
    assert gradcheck(fn, (x,), **GRAD_KW)
    assert gradgradcheck(fn, (x,), **GRADGRAD_KW)


LOSSES = {"mse": F.MSELossFunction.apply, "l1": F.L1LossFunction.apply}


@pytest.mark.parametrize("requires", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("case", ["batch1", "batch", "3d", "noncontig"])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradcheck(name, case, requires):
    pred, _, _ = _linear_inputs(case)
    target = torch.randn(pred.shape, dtype=DOUBLE, generator=torch.Generator().manual_seed(1))
    pred, target = pred.detach().requires_grad_(requires[0]), target.requires_grad_(requires[1])
    assert gradcheck(LOSSES[name], (pred, target), **GRAD_KW)
    assert gradgradcheck(LOSSES[name], (pred, target), **GRADGRAD_KW)


# --------------------------------------------------------------------------- ours vs torch
OURS_VS_TORCH = [
    ("linear", F.linear, TF.linear, 3),
    ("linear_sigmoid", F.linear_sigmoid, lambda x, w, b: torch.sigmoid(TF.linear(x, w, b)), 3),
    *[(name, F.ACTIVATION_ALIASES[name], NATIVE_ACTIVATIONS[name], 1) for name in ACTIVATIONS],
    ("mse", F.mse_loss, TF.mse_loss, 2),
    ("l1", F.l1_loss, TF.l1_loss, 2),
]


def _clone_leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _inputs(x, arity: int, h_out: int, g):
    """The arguments of a Function taking x: (x, W, b) for layers, (pred, target) for losses, (x,) else."""
    if arity == 3:
        return [
            x,
            torch.randn(h_out, x.shape[-1], dtype=x.dtype, generator=g),
            torch.randn(h_out, dtype=x.dtype, generator=g),
        ]
    if arity == 2:
        return [x, torch.randn(x.shape, dtype=x.dtype, generator=g)]
    return [x]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "ours", "native", "arity"), OURS_VS_TORCH, ids=[c[0] for c in OURS_VS_TORCH])
def test_ours_vs_torch(name, ours, native, arity, dtype):
    g = torch.Generator().manual_seed(2)
    inputs = _inputs(torch.randn(2, 7, 5, dtype=dtype, generator=g), arity, 6, g)
    a, b = _clone_leaves(inputs), _clone_leaves(inputs)
    y_ours, y_native = ours(*a), native(*b)
    torch.testing.assert_close(y_ours, y_native)
    upstream = torch.randn(y_native.shape, dtype=dtype, generator=g)
    y_ours.backward(upstream)
    y_native.backward(upstream)
    for t_ours, t_native in zip(a, b):
        torch.testing.assert_close(t_ours.grad, t_native.grad)


def test_l1_subgradient_is_zero_at_zero_like_torch():
    pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    target = torch.tensor([1.0, 0.0, 5.0])
    F.l1_loss(pred, target).backward()
    ref = pred.detach().clone().requires_grad_()
    TF.l1_loss(ref, target).backward()
    assert pred.grad[0] == 0
    torch.testing.assert_close(pred.grad, ref.grad)


def test_backward_leaves_upstream_gradient_untouched():
    x, w, b = _linear_inputs("batch")
    upstream = torch.randn(8, 3, dtype=DOUBLE)
    before = upstream.clone()
    F.linear_sigmoid(x, w, b).backward(upstream)
    torch.testing.assert_close(upstream, before, rtol=0, atol=0)


# --------------------------------------------------------------------------- vmap, compile
def test_vmap_per_sample_gradients_match_loop():
    """torch.func per-sample gradients through our Functions equal a Python loop over samples."""
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 4, dtype=DOUBLE, generator=g)
    b = torch.randn(3, dtype=DOUBLE, generator=g)
    xs, ts = torch.randn(5, 4, dtype=DOUBLE, generator=g), torch.rand(5, 3, dtype=DOUBLE, generator=g)

    def loss(w, b, x, t):
        return F.mse_loss(F.linear_sigmoid(x, w, b), t)

    per_sample = vmap(grad(loss), in_dims=(None, None, 0, 0))(w, b, xs, ts)
    for i in range(5):
        wi = w.clone().requires_grad_()
        loss(wi, b, xs[i], ts[i]).backward()
        torch.testing.assert_close(per_sample[i], wi.grad)


@pytest.mark.slow
def test_compiled_mlp_matches_eager():
    from bp_service import MLP

    torch.manual_seed(0)
    model = MLP([5, 8, 3])
    x, t = torch.randn(16, 5), torch.rand(16, 3)

    def step(m):
        m.zero_grad()
        loss = F.mse_loss(m(x), t)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    loss_eager, grads_eager = step(model)
    compiled = torch.compile(model, fullgraph=True)
    loss_c, grads_c = step(compiled)
    torch.testing.assert_close(loss_c, loss_eager)
    for a, b in zip(grads_c, grads_eager):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: F.linear(torch.randn(2, 5), torch.randn(4, 3)), "linear: input has 5 features .* weight expects 3"),
        (lambda: F.linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(5)), r"bias has shape \(5,\)"),
        (lambda: F.linear(torch.randn(2, 3), torch.randn(4, 3, dtype=DOUBLE)), "input is torch.float32, weight is"),
        (lambda: F.linear_sigmoid(torch.randn(2, 2), torch.randn(4, 3)), "linear_sigmoid: input has 2 features"),
        (lambda: F.mse_loss(torch.randn(2, 3), torch.randn(3, 2)), r"pred has shape \(2, 3\), target has shape"),
        (lambda: F.l1_loss(torch.randn(2), torch.randn(2, dtype=DOUBLE)), "pred is torch.float32, target is"),
    ],
)
def test_bad_input_names_both_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "ours", "native", "arity"), OURS_VS_TORCH, ids=[c[0] for c in OURS_VS_TORCH])
def test_cuda_matches_cpu(name, ours, native, arity):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, dtype=DOUBLE, generator=g)
    inputs = _inputs(x, arity, 16, g)
    cpu = _clone_leaves(inputs)
    gpu = [t.detach().cuda().requires_grad_() for t in inputs]
    twin = [t.detach().cuda().requires_grad_() for t in inputs]  # torch's own function on the same device
    ours(*cpu).sum().backward()
    y_gpu, y_twin = ours(*gpu), native(*twin)
    assert y_gpu.is_cuda
    torch.testing.assert_close(y_gpu, y_twin)
    y_gpu.sum().backward()
    y_twin.sum().backward()
    for a, b, c in zip(cpu, gpu, twin, strict=True):
        torch.testing.assert_close(b.grad.cpu(), a.grad)
        torch.testing.assert_close(b.grad, c.grad)


@pytest.mark.gpu
def test_linear_sigmoid_gradcheck_on_cuda():
    x = torch.randn(64, 32, dtype=DOUBLE, generator=torch.Generator().manual_seed(4))
    assert gradcheck(
        LINEAR_FNS["linear_sigmoid"],
        [t.detach().cuda()[:4, :6].requires_grad_() for t in [x]]
        + [torch.randn(3, 6, dtype=DOUBLE, device="cuda", requires_grad=True), None],
        **GRAD_KW,
    )
