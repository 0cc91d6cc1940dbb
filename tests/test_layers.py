"""Modules: shaped like torch.nn, and a whole training step identical to a native network."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from twins import NATIVE_ACTIVATIONS

from bp_service import MLP, L1Loss, Linear, MSELoss, Sigmoid
from bp_service.activations import HIDDEN


def test_linear_init_and_repr_match_nn_linear():
    torch.manual_seed(0)
    ours = Linear(5, 3)
    torch.manual_seed(0)
    native = nn.Linear(5, 3)
    torch.testing.assert_close(ours.weight, native.weight)
    torch.testing.assert_close(ours.bias, native.bias)
    assert ours.extra_repr() == native.extra_repr()
    assert ours.state_dict().keys() == native.state_dict().keys()


def test_linear_without_bias():
    layer = Linear(4, 2, bias=False)
    assert layer.bias is None
    assert list(layer.state_dict()) == ["weight"]
    assert layer(torch.randn(3, 4)).shape == (3, 2)


@pytest.mark.parametrize(
    ("ours", "native"), [(Sigmoid(), nn.Sigmoid()), (MSELoss(), nn.MSELoss()), (L1Loss(), nn.L1Loss())]
)
def test_small_modules_match_native(ours, native):
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    args = (a,) if isinstance(ours, Sigmoid) else (a, b)
    torch.testing.assert_close(ours(*args), native(*args))


class _Native(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _native_twin(model: MLP) -> nn.Sequential:
    modules: list[nn.Module] = []
    for layer, act in zip(model.layers, model.activations):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype)
        linear.load_state_dict(layer.state_dict())
        modules += [linear] + ([_Native(NATIVE_ACTIVATIONS[act])] if act else [])
    return nn.Sequential(*modules)


@pytest.mark.parametrize(
    ("activation", "output_activation", "fused", "loss"),
    [
        ("sigmoid", "sigmoid", True, "mse"),
        ("sigmoid", "sigmoid", False, "mse"),
        ("tanh", None, False, "l1"),
        ("relu", "sigmoid", True, "mse"),
        *[(name, None, False, "mse") for name in HIDDEN],  # every hidden record
    ],
)
def test_training_step_matches_native(activation, output_activation, fused, loss):
    """Same weights, same batch: same loss, and the same weights after one SGD step (float64)."""
    torch.manual_seed(0)
    ours = MLP([6, 5, 4, 3], activation, output_activation, fused=fused).double()
    native = _native_twin(ours)
    x, target = torch.randn(16, 6, dtype=torch.float64), torch.rand(16, 3, dtype=torch.float64)
    our_loss_fn = MSELoss() if loss == "mse" else L1Loss()
    native_loss_fn = TF.mse_loss if loss == "mse" else TF.l1_loss

    losses = []
    for model, loss_fn in ((ours, our_loss_fn), (native, native_loss_fn)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        value = loss_fn(model(x), target)
        value.backward()
        opt.step()
        losses.append(value.detach())
    torch.testing.assert_close(losses[0], losses[1])
    native_linears = [m for m in native if isinstance(m, nn.Linear)]
    for layer, twin in zip(ours.layers, native_linears, strict=True):
        torch.testing.assert_close(layer.weight, twin.weight)
        torch.testing.assert_close(layer.bias, twin.bias)


def test_fused_and_unfused_agree():
    torch.manual_seed(1)
    fused = MLP([4, 8, 2], fused=True).double()
    unfused = MLP([4, 8, 2], fused=False).double()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), unfused(x))


def test_mlp_accepts_leading_dimensions():
    assert MLP([3, 2, 1])(torch.randn(2, 7, 3)).shape == (2, 7, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": [3]}, "at least an input and an output"),
        ({"sizes": [3, 0, 1]}, "must be > 0"),
        ({"sizes": [3, 2, 1], "activation": "swish"}, "unknown activation 'swish'"),
    ],
)
def test_mlp_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(**kwargs)


@pytest.mark.gpu
def test_cuda_training_step_matches_cpu():
    torch.manual_seed(0)
    cpu = MLP([6, 5, 3]).double()
    gpu = MLP([6, 5, 3]).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, t = torch.randn(16, 6, dtype=torch.float64), torch.rand(16, 3, dtype=torch.float64)
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        MSELoss()(model(x.to(device)), t.to(device)).backward()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad)
