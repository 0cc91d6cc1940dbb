"""Cross-entropy: softmax and sigmoid outputs, the per-layer Functions, and scikit-learn's MLPs as oracles."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from sklearn.neural_network import MLPClassifier, MLPRegressor
from torch.autograd import gradcheck, gradgradcheck
from twins import NATIVE_ACTIVATIONS

from bp_service import MLP
from bp_service import functions as F
from bp_service.activations import CROSS_ENTROPY_OUTPUTS

DOUBLE = torch.float64
GRAD_KW = {"check_forward_ad": True, "check_batched_grad": True}
GRADGRAD_KW = {"check_batched_grad": True, "check_fwd_over_rev": True}
SKLEARN_ACTIVATION = {"sigmoid": "logistic", "tanh": "tanh", "relu": "relu"}


def _distributions(shape, g, dtype=DOUBLE) -> torch.Tensor:
    """Rows that sum to 1 (soft labels): the targets softmax cross-entropy is defined for."""
    return torch.softmax(torch.randn(*shape, dtype=dtype, generator=g), -1)


# --------------------------------------------------------------------------- scikit-learn oracles
def _classification_data(n_classes: int, n: int = 40, features: int = 4):
    rng = np.random.default_rng(n_classes)
    x = rng.normal(size=(n, features))
    labels = np.argmax(x[:, :n_classes] + 0.3 * rng.normal(size=(n, n_classes)), axis=1) if n_classes > 2 else None
    if labels is None:
        labels = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    return x, labels


def _sklearn_steps(est, x, y, weights, steps: int, **fit_kw):
    """``steps`` full-batch SGD steps of ``est`` started from ``weights`` = [(W_l, b_l), ...]."""
    est.partial_fit(x, y, **fit_kw)  # builds the layers and the optimizer (and takes one step)
    for coef, intercept, (w, b) in zip(est.coefs_, est.intercepts_, weights, strict=True):
        coef[...] = w.T  # in place: the optimizer holds these arrays (stateless without momentum)
        intercept[...] = b
    for _ in range(steps):
        est.partial_fit(x, y)
    return est


def _max_weight_diff(net: MLP, est) -> float:
    diffs = [
        np.abs(layer.weight.detach().numpy().T - coef).max() for layer, coef in zip(net.layers, est.coefs_, strict=True)
    ]
    diffs += [
        np.abs(layer.bias.detach().numpy() - b).max() for layer, b in zip(net.layers, est.intercepts_, strict=True)
    ]
    return float(max(diffs))


def _train_ours(net: MLP, x, target, lr: float, steps: int, loss: str) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        net.cost(x, target, loss).backward()
        opt.step()


@pytest.mark.parametrize("hidden", [(6,), (6, 5)], ids=["1h", "2h"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("n_classes", [2, 3], ids=["binary", "3-class"])
def test_cross_entropy_matches_sklearn_mlp_classifier(n_classes, activation, hidden):
    """25 full-batch SGD steps from the same float64 weights: the same weights as MLPClassifier to 1e-9."""
    x_np, labels = _classification_data(n_classes)
    outputs = 1 if n_classes == 2 else n_classes  # sklearn: one logistic output for two classes, else softmax
    torch.manual_seed(0)
    net = MLP([x_np.shape[1], *hidden, outputs], activation, "sigmoid" if outputs == 1 else "softmax").double()
    weights = [(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()) for layer in net.layers]
    lr, steps = 0.5, 25
    est = MLPClassifier(
        hidden_layer_sizes=hidden,
        activation=SKLEARN_ACTIVATION[activation],
        solver="sgd",
        alpha=0.0,
        momentum=0.0,
        nesterovs_momentum=False,
        learning_rate="constant",
        learning_rate_init=lr,
        batch_size=len(x_np),
        shuffle=False,
    )
    _sklearn_steps(est, x_np, labels, weights, steps, classes=np.arange(n_classes))
    assert est.out_activation_ == ("logistic" if outputs == 1 else "softmax")
    x = torch.from_numpy(x_np)
    y = torch.from_numpy(labels)
    target = y[:, None].double() if outputs == 1 else TF.one_hot(y, n_classes).double()
    _train_ours(net, x, target, lr, steps, "cross_entropy")
    assert _max_weight_diff(net, est) < 1e-9
    moved = max(np.abs(layer.weight.detach().numpy() - w).max() for layer, (w, _) in zip(net.layers, weights))
    assert moved > 1e-2  # the comparison is of trained weights, not of the start


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_mse_matches_sklearn_mlp_regressor(activation):
    """Regression oracle through MLP.cost: sklearn's squared error is mean((p - y)^2) / 2, delta (p - y) / N.

    For one output our MSE's gradient is twice sklearn's, so we take half its learning rate.
    """
    rng = np.random.default_rng(7)
    x_np = rng.normal(size=(30, 3))
    y_np = np.sin(x_np[:, 0]) + 0.5 * x_np[:, 1] * x_np[:, 2]
    torch.manual_seed(1)
    net = MLP([3, 7, 5, 1], activation, None).double()
    weights = [(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()) for layer in net.layers]
    lr, steps = 0.1, 25
    est = MLPRegressor(
        hidden_layer_sizes=(7, 5),
        activation=SKLEARN_ACTIVATION[activation],
        solver="sgd",
        alpha=0.0,
        momentum=0.0,
        nesterovs_momentum=False,
        learning_rate="constant",
        learning_rate_init=lr,
        batch_size=len(x_np),
        shuffle=False,
    )
    _sklearn_steps(est, x_np, y_np, weights, steps)
    _train_ours(net, torch.from_numpy(x_np), torch.from_numpy(y_np)[:, None], lr / 2, steps, "mse")
    assert _max_weight_diff(net, est) < 1e-9


# --------------------------------------------------------------------------- the per-layer Functions
CASES = {"batch1": (1, 4), "batch": (6, 4), "3d": (2, 3, 4), "vector": (4,)}


@pytest.mark.parametrize("case", CASES)
def test_softmax_gradcheck(case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*CASES[case], dtype=DOUBLE, generator=g, requires_grad=True)
    assert gradcheck(F.SoftmaxFunction.apply, (x,), **GRAD_KW)
    assert gradgradcheck(F.SoftmaxFunction.apply, (x,), **GRADGRAD_KW)


CE_FNS = {"cross_entropy": F.CrossEntropyFunction.apply, "binary_cross_entropy": F.BinaryCrossEntropyFunction.apply}


def _ce_target(name: str, shape, g) -> torch.Tensor:
    if name == "cross_entropy":
        return _distributions(shape, g)
    return torch.rand(*shape, dtype=DOUBLE, generator=g)


@pytest.mark.parametrize("requires", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CE_FNS)
def test_cross_entropy_gradcheck(name, case, requires):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*CASES[case], dtype=DOUBLE, generator=g).requires_grad_(requires[0])
    target = _ce_target(name, CASES[case], g).requires_grad_(requires[1])
    assert gradcheck(CE_FNS[name], (logits, target), **GRAD_KW)
    assert gradgradcheck(CE_FNS[name], (logits, target), **GRADGRAD_KW)


def _partial_rows(shape, g) -> torch.Tensor:
    """Targets whose rows are not all distributions: a masked row (zeros), a half-weighted one, one over 1."""
    target = _distributions(shape, g)
    target[0] = 0.0
    target[1] *= 0.5
    target[2] *= 1.5
    return target


def test_softmax_cross_entropy_is_the_derivative_of_its_cost_for_any_target_rows():
    """Where a row of y does not sum to 1 (a masked padding row), dC/dz = (p sum_k y_k - y) / N, as torch's.
    (MLP.cost, the training step, takes rows that are distributions: test_mlp_cost_cross_entropy_equals_native.)"""
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(5, 4, dtype=DOUBLE, generator=g), _partial_rows((5, 4), g)
    assert gradcheck(F.CrossEntropyFunction.apply, (logits.requires_grad_(), target), **GRAD_KW)
    assert gradgradcheck(F.CrossEntropyFunction.apply, (logits, target), **GRADGRAD_KW)
    ours, native = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    F.cross_entropy(ours, target).backward()
    TF.cross_entropy(native, target).backward()
    torch.testing.assert_close(ours.grad, native.grad)
    assert not ours.grad[0].any()  # the masked row moves nothing


NATIVE = {
    "softmax": (F.softmax, lambda x: torch.softmax(x, -1), 1),
    "cross_entropy": (F.cross_entropy, TF.cross_entropy, 2),
    "binary_cross_entropy": (
        F.binary_cross_entropy,
        lambda z, y: TF.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0],
        2,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, DOUBLE])
@pytest.mark.parametrize("name", NATIVE)
def test_ours_vs_torch(name, dtype):
    ours, native, arity = NATIVE[name]
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(9, 5, dtype=dtype, generator=g)]
    if arity == 2:
        inputs.append(_ce_target(name, (9, 5), g).to(dtype))
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    y_ours, y_native = ours(*a), native(*b)
    torch.testing.assert_close(y_ours, y_native)
    upstream = torch.randn(y_native.shape, dtype=dtype, generator=g)
    y_ours.backward(upstream)
    y_native.backward(upstream)
    for t_ours, t_native in zip(a, b):
        torch.testing.assert_close(t_ours.grad, t_native.grad)


@pytest.mark.parametrize("name", ["softmax", *CE_FNS])
def test_vmap_per_sample_gradients_match_loop(name):
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 4, dtype=DOUBLE, generator=g)
    xs = torch.randn(5, 4, dtype=DOUBLE, generator=g)
    ts = _ce_target("cross_entropy" if name == "softmax" else name, (5, 3), g)

    def loss(w, x, t):
        z = F.linear(x, w)
        if name == "softmax":
            return F.mse_loss(F.softmax(z), t)
        return (F.cross_entropy if name == "cross_entropy" else F.binary_cross_entropy)(z, t)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(w, xs, ts)
    for i in range(5):
        wi = w.clone().requires_grad_()
        loss(wi, xs[i], ts[i]).backward()
        torch.testing.assert_close(per_sample[i], wi.grad)


# --------------------------------------------------------------------------- the whole network
NETWORKS = {
    "1h-softmax": ([3, 4, 3], ("tanh", "softmax")),
    "2h-softmax": ([4, 5, 3, 4], ("relu", "sigmoid", "softmax")),
    "1h-sigmoid-binary": ([3, 4, 1], ("sigmoid", "sigmoid")),
    "2h-sigmoid-multilabel": ([3, 5, 4, 3], ("tanh", "relu", "sigmoid")),
    "0h-softmax": ([3, 4], ("softmax",)),
}


def _network(sizes, activations, bias: bool, seed: int = 0, batch: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], dtype=DOUBLE, generator=g)
    if "relu" in activations:  # finite differences need every unit away from the kink
        x = x + 0.5 * x.sign()
    shape = (batch, sizes[-1])
    target = _distributions(shape, g) if activations[-1] == "softmax" else torch.rand(*shape, dtype=DOUBLE, generator=g)
    params = []
    for h_in, h_out in itertools.pairwise(sizes):
        params.append(torch.randn(h_out, h_in, dtype=DOUBLE, generator=g) / h_in**0.5)
        params.append(torch.randn(h_out, dtype=DOUBLE, generator=g) if bias else None)
    return [t if t is None else t.requires_grad_() for t in (x, target, *params)]


def _native(x, target, params, activations):
    a = x
    for layer, activation in enumerate(activations[:-1]):
        a = NATIVE_ACTIVATIONS[activation](TF.linear(a, params[2 * layer], params[2 * layer + 1]))
    z = TF.linear(a, params[-2], params[-1])
    if activations[-1] == "softmax":
        return TF.cross_entropy(z, target)
    return TF.binary_cross_entropy_with_logits(z, target, reduction="sum") / z.shape[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("arch", NETWORKS)
def test_mlp_cost_cross_entropy_equals_native(arch, bias):
    sizes, activations = NETWORKS[arch]
    leaves = _network(sizes, activations, bias)
    ours = [t if t is None else t.detach().clone().requires_grad_() for t in leaves]
    native = [t if t is None else t.detach().clone().requires_grad_() for t in leaves]
    c_ours = F.mlp_cost(ours[0], ours[1], ours[2:], activations, "cross_entropy")
    c_native = _native(native[0], native[1], native[2:], activations)
    torch.testing.assert_close(c_ours, c_native)
    c_ours.backward()
    c_native.backward()
    for a, b in zip(ours, native):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("upstream", [-2.5, 0.0])
@pytest.mark.parametrize("arch", NETWORKS)
def test_a_training_steps_backward_takes_the_upstream_gradient(arch, upstream):
    """delta_L is written into the buffer of a_L - y, scaled by dL/dC first: native's gradients still,
    for any upstream gradient; and a second backward over a kept graph sees a_L - y untouched."""
    sizes, activations = NETWORKS[arch]
    leaves = _network(sizes, activations, True)
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    native = [t.detach().clone().requires_grad_() for t in leaves]
    (upstream * F.mlp_cost(ours[0], ours[1], ours[2:], activations, "cross_entropy")).backward()
    (upstream * _native(native[0], native[1], native[2:], activations)).backward()
    for a, b in zip(ours, native):
        torch.testing.assert_close(a.grad, b.grad)
    cost = F.mlp_cost(*leaves[:2], leaves[2:], activations, "cross_entropy")
    first = torch.autograd.grad(cost, leaves, retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(cost, leaves)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", NETWORKS)
def test_mlp_cost_cross_entropy_gradcheck_and_gradgradcheck(arch):
    sizes, activations = NETWORKS[arch]
    x, target, *params = _network(sizes, activations, bias=True, seed=1)

    def fn(x, target, *params):
        return F.mlp_cost(x, target, params, activations, "cross_entropy")

    inputs = (x, target, *params)
    assert gradcheck(fn, inputs, **GRAD_KW)
    assert gradgradcheck(fn, inputs, **GRADGRAD_KW)


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_softmax_output_with_other_costs_backpropagates_its_jacobian(loss):
    """A softmax output under MSE or L1: backprop multiplies by the softmax Jacobian (J v)."""
    sizes, activations = [3, 5, 4], ("tanh", "softmax")
    x, target, *params = _network(sizes, activations, bias=True, seed=2)

    def fn(x, target, *params):
        return F.mlp_cost(x, target, params, activations, loss)

    assert gradcheck(fn, (x, target, *params), **GRAD_KW)
    assert gradgradcheck(fn, (x, target, *params), **GRADGRAD_KW)


def test_vmap_per_sample_cross_entropy_gradients_match_loop():
    from torch.func import grad, vmap

    x, target, w1, b1, w2, b2 = (t.detach() for t in _network([4, 3, 3], ("sigmoid", "softmax"), True, batch=5))

    def cost(w1, x, t):
        return F.mlp_cost(x, t, (w1, b1, w2, b2), ("sigmoid", "softmax"), "cross_entropy")

    per_sample = vmap(grad(cost), in_dims=(None, 0, 0))(w1, x, target)
    for i in range(5):
        w = w1.clone().requires_grad_()
        cost(w, x[i], target[i]).backward()
        torch.testing.assert_close(per_sample[i], w.grad)


@pytest.mark.parametrize("output", CROSS_ENTROPY_OUTPUTS)
def test_mlp_forward_and_cost_agree(output):
    """Every output cross-entropy pairs with has its per-layer twin, taking the logits (what evaluation uses)."""
    torch.manual_seed(0)
    net = MLP([5, 6, 3], activation="relu", output_activation=output).double()
    x = torch.randn(8, 5, dtype=DOUBLE)
    target = TF.one_hot(torch.arange(8) % 3, 3).double()
    probs = net(x)
    per_layer = F.CROSS_ENTROPY_TWINS[output](net.logits(x), target)
    torch.testing.assert_close(net.cost(x, target, "cross_entropy"), per_layer)
    if output == "softmax":
        torch.testing.assert_close(probs.sum(-1), torch.ones(8, dtype=DOUBLE))
    torch.testing.assert_close(
        probs, (torch.softmax if output == "softmax" else lambda z, _: torch.sigmoid(z))(net.logits(x), -1)
    )


def test_cross_entropy_needs_a_softmax_or_sigmoid_output():
    net = MLP([3, 4, 2], output_activation=None)
    with pytest.raises(ValueError, match="cross_entropy needs a softmax or sigmoid output layer, got None"):
        net.cost(torch.randn(2, 3), torch.rand(2, 2), "cross_entropy")


# --------------------------------------------------------------------------- extreme logits
def _precisions():
    yield "float64", DOUBLE, None
    yield "float32", torch.float32, None
    yield "bf16-true", torch.bfloat16, None
    yield "bf16-mixed", torch.float32, torch.bfloat16
    yield "fp16-mixed", torch.float32, torch.float16


@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
@pytest.mark.parametrize(("precision", "dtype", "autocast"), list(_precisions()), ids=lambda v: str(v))
def test_finite_at_extreme_logits(precision, dtype, autocast, output):
    """Logits of +-1e4 (saturated, confidently wrong rows included): finite cost and gradients."""
    torch.manual_seed(0)
    k = 3 if output == "softmax" else 2
    net = MLP([2, k], output_activation=output).to(dtype)
    with torch.no_grad():  # z = x W^T + b = +-1e4 per class, the wrong class winning in half the rows
        net.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]][:k]))
        net.layers[0].bias.zero_()
    x = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [1e4, 1e4], [-1e4, -1e4]], dtype=dtype)
    target = TF.one_hot(torch.tensor([1, 0, 2 % k, 0]), k).to(dtype)
    fns = {
        "cost": lambda: net.cost(x, target, "cross_entropy"),
        "per_layer": lambda: (F.cross_entropy if output == "softmax" else F.binary_cross_entropy)(
            net.logits(x), target
        ),
    }
    for path, fn in fns.items():
        net.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            cost = fn()
        assert torch.isfinite(cost), (path, cost)
        assert cost > 1e3  # confidently wrong rows cost ~1e4 each, not 0 and not inf
        cost.backward()
        for name, p in net.named_parameters():
            assert torch.isfinite(p.grad).all(), (path, name, p.grad)


# --------------------------------------------------------------------------- bp-train defaults
def _shape(task: str, n_outputs: int):
    from types import SimpleNamespace

    return SimpleNamespace(task=task, n_features=4, n_outputs=n_outputs)


def test_classification_defaults_to_cross_entropy_and_softmax(compose_cfg):
    from bp_service.training.recipe import build_network, resolve_loss

    cfg = compose_cfg()
    assert str(cfg.model.loss) == "auto" and cfg.model.net.output_activation == "auto"
    assert resolve_loss(cfg.model.loss, "classification") == "cross_entropy"
    assert resolve_loss(cfg.model.loss, "regression") == "mse"
    chosen = {
        (task, k): build_network(cfg.model.net, _shape(task, k), cfg.model.loss).activations[-1]
        for task, k in (("classification", 3), ("classification", 1), ("regression", 1))
    }
    assert chosen == {("classification", 3): "softmax", ("classification", 1): "sigmoid", ("regression", 1): None}


@pytest.mark.parametrize("preset", ["blog_321", "digits", "synthetic"])
def test_the_worked_example_presets_keep_mse(compose_cfg, preset):
    from bp_service.training.recipe import build_network

    cfg = compose_cfg(f"experiment={preset}")
    assert str(cfg.model.loss) == "mse"
    expected = None if preset == "synthetic" else "sigmoid"  # synthetic: linear outputs, as bp-bench measures
    assert build_network(cfg.model.net, _shape("classification", 10), cfg.model.loss).activations[-1] == expected


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.loss=cross_entropy", "model.net.output_activation=tanh"], "needs model.net.output_activation auto"),
        (["model.net.output_activation=swish"], "output_activation must be auto, null or one of"),
    ],
)
def test_a_cost_without_its_output_is_refused_before_training(compose_cfg, overrides, needle):
    from bp_service.training.config import ConfigError
    from bp_service.training.preflight import validate

    with pytest.raises(ConfigError, match=needle):
        validate(compose_cfg(*overrides))


def test_cross_entropy_on_regression_data_is_refused(compose_cfg):
    from bp_service.training.config import ConfigError
    from bp_service.training.data import prepare
    from bp_service.training.preflight import check_data

    cfg = compose_cfg("data=diabetes", "model.loss=cross_entropy")
    with pytest.raises(ConfigError, match=r"model\.loss=cross_entropy needs classification data"):
        check_data(cfg, prepare(cfg.data, cfg.seed))


# --------------------------------------------------------------------------- serving
@pytest.fixture
def iris(compose_cfg):
    from bp_service.training.data import prepare

    cfg = compose_cfg("data=iris")
    return prepare(cfg.data, cfg.seed)


def test_a_softmax_bundle_predicts_probabilities_that_sum_to_one(iris, tmp_path):
    from types import SimpleNamespace

    from bp_service.bundle import load_bundle, net_from_bundle, predict_frame, save_bundle
    from bp_service.serving.model import BPServiceModel

    torch.manual_seed(0)
    net = MLP([iris.n_features, 8, iris.n_outputs], "tanh", "softmax")
    path = tmp_path / "softmax.pt"
    save_bundle(net, iris.meta, path)
    loaded = net_from_bundle(load_bundle(path))
    assert loaded.activations[-1] == "softmax"
    frame = predict_frame(loaded, iris.meta, iris.raw_test)
    proba = frame[[f"proba_{c}" for c in iris.meta["classes"]]].to_numpy()
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=0, atol=1e-12)
    scaled = (iris.raw_test - np.asarray(iris.meta["scaler_mean"])) / np.asarray(iris.meta["scaler_scale"])
    with torch.no_grad():
        np.testing.assert_allclose(proba, net(torch.as_tensor(scaled, dtype=torch.float32)).double().numpy(), atol=1e-6)
    model = BPServiceModel()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(path)}))
    served = model.predict(None, iris.raw_example(len(iris.raw_test)))
    pd_proba = served[[f"proba_{c}" for c in iris.meta["classes"]]].to_numpy()
    np.testing.assert_allclose(pd_proba, proba, rtol=0, atol=0)
    assert list(served["prediction"]) == list(frame["prediction"])


def test_old_sigmoid_bundles_load_and_predict_as_before(iris, tmp_path):
    """A bundle of the older form (one activation per layer, sigmoid outputs) still loads and predicts as it did."""
    from bp_service.bundle import load_bundle, net_from_bundle, predict_frame

    torch.manual_seed(0)
    net = MLP([iris.n_features, 8, iris.n_outputs], "sigmoid", "sigmoid")
    arch = {"sizes": net.sizes, "activations": ["sigmoid", "sigmoid"], "fused": True, "bias": True}
    path = tmp_path / "old.pt"
    torch.save({"state_dict": net.state_dict(), "architecture": arch, "meta": iris.meta}, path)
    frame = predict_frame(net_from_bundle(load_bundle(path)), iris.meta, iris.raw_test)
    scaled = (iris.raw_test - np.asarray(iris.meta["scaler_mean"])) / np.asarray(iris.meta["scaler_scale"])
    with torch.no_grad():
        out = net(torch.as_tensor(scaled, dtype=torch.float32)).double().numpy()
    proba = frame[[f"proba_{c}" for c in iris.meta["classes"]]].to_numpy()
    np.testing.assert_allclose(proba, out / out.sum(1, keepdims=True), atol=1e-12)


def test_softmax_is_an_output_activation_only(tmp_path):
    from bp_service.bundle import BundleError, check_architecture

    check_architecture({"sizes": [4, 3, 2], "activation": "relu", "output_activation": "softmax"}, "f")
    with pytest.raises(BundleError, match="unknown activation 'softmax'"):
        check_architecture({"sizes": [4, 3, 2], "activation": "softmax", "output_activation": "softmax"}, "f")
    with pytest.raises(ValueError, match="unknown activation 'softmax'"):
        MLP([4, 3, 2], activation="softmax")
