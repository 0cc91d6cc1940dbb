"""The private torch and Lightning names the package reads, each at one site: an upgrade that removes or
changes one fails here, by name, rather than somewhere deep in a training run.

torch's probes live in bp_service/dispatch.py; Lightning's precision names in training/preflight.py
(``_precisions``), its summary table in training/callbacks.py, the profiler's device type in bench/memory.py.
"""

import inspect

import torch
from torch.autograd import Function, forward_ad
from torch.func import vmap

from bp_service import dispatch


def test_transforms_active_sees_vmap_and_forward_mode():
    """``torch._C._are_functorch_transforms_active`` and ``forward_ad._current_level``."""
    assert dispatch.transforms_active() is False
    seen = []
    vmap(lambda row: seen.append(dispatch.transforms_active()) or row)(torch.zeros(2, 3))
    assert seen and all(seen)
    with forward_ad.dual_level():
        assert dispatch.transforms_active()
    assert dispatch.transforms_active() is False


def test_autocast_dtype_sees_autocast_on_and_off():
    """``torch._C._is_any_autocast_enabled``, autocast_dtype's first check."""
    x = torch.zeros(2)
    assert dispatch.autocast_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.autocast_dtype(x) == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert dispatch.autocast_dtype(x) is None
    assert dispatch.autocast_dtype(x) is None


def test_disable_functorch_makes_a_plain_tensor_inside_a_transform():
    """``torch._C._DisableFuncTorch``, under which dispatch.scalar makes its tensors."""
    seen = []

    def f(w):
        with torch._C._DisableFuncTorch():
            seen.append(torch._C._functorch.is_functorch_wrapped_tensor(torch.tensor(0.5)))
        seen.append(torch._C._functorch.is_functorch_wrapped_tensor(torch.tensor(0.5)))
        return w.sum()

    torch.func.grad(f)(torch.ones(2))
    assert seen == [False, True]


def test_graph_kept_is_the_engines_retain_graph_flag():
    """``torch._C._autograd._get_current_graph_task_keep_graph``, read inside a backward."""
    seen = []

    class Probe(Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            seen.append(dispatch.graph_kept())
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    y = Probe.apply(x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert seen == [True, False]


def test_lightning_precision_names():
    """``lightning.fabric.plugins.precision.precision._PRECISION_INPUT_*``: what trainer.precision accepts."""
    from bp_service.training.preflight import _precisions

    names = _precisions()
    assert {"32-true", "bf16-mixed", "16-mixed", "64-true"} <= set(names), names


def test_lightning_summary_table():
    """``lightning.pytorch.utilities.model_summary.model_summary._format_summary_table``, as callbacks.py calls it."""
    from bp_service.training import callbacks

    params = list(inspect.signature(callbacks._format_summary_table).parameters)
    assert params[:5] == [
        "total_parameters",
        "trainable_parameters",
        "model_size",
        "total_training_modes",
        "total_flops",
    ]
    table = callbacks._format_summary_table(10, 10, 0.001, {"train": 1, "eval": 0}, 0, ("Name", ["net"]))
    assert "Total params" in table


def test_profiler_device_type():
    """``torch._C._autograd.DeviceType.CPU``: how bench/memory.py tells CPU allocations apart."""
    from bp_service.bench.memory import peak_memory_bytes

    assert torch._C._autograd.DeviceType.CPU is not None
    assert peak_memory_bytes(lambda: torch.empty(1 << 20)) >= 4 << 20


def test_direct_apply_is_function_apply_without_its_python_layer():
    """``torch._C._FunctionBase.apply`` (what ``Function.apply`` calls after its Python checks) and
    ``torch._C._functorch.unwrap_if_dead``, as ``dispatch.direct_apply`` calls them for ``MLP.cost``."""
    from bp_service import functions as F
    from bp_service.layers import MLP

    assert "apply" in vars(torch._C._FunctionBase)
    torch.manual_seed(0)
    net = MLP([4, 3, 2])
    x, y = torch.rand(5, 4), torch.rand(5, 2)
    direct = dispatch.direct_apply(F.MLPCostFunction)
    grads = []
    for apply in (direct, F.MLPCostFunction.apply):
        net.zero_grad()
        cost = apply(x, y, tuple(net.activations), "mse", *net.params())
        assert type(cost.grad_fn).__name__ == "MLPCostFunctionBackward"
        cost.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for ours, public in zip(*grads, strict=True):
        torch.testing.assert_close(ours, public, rtol=0, atol=0)

    leaked = []  # a tensor kept from inside a transform that has ended: a dead functorch wrapper
    torch.func.grad(lambda t: leaked.append(t) or t.sum())(x.clone())
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    net.zero_grad()
    direct(leaked[0], y, tuple(net.activations), "mse", *net.params()).backward()
    torch.testing.assert_close([p.grad for p in net.parameters()], grads[0], rtol=0, atol=0)


def test_lightning_names_its_current_hook_in_current_fx_name(compose_cfg):
    """``LightningModule._current_fx_name``, written around every hook call: BPModule writes it without
    ``nn.Module.__setattr__``'s checks. Renamed upstream, the plain write would no longer apply (steps slower)."""
    import lightning.pytorch as pl

    from bp_service.layers import MLP
    from bp_service.training.data import BPDataModule
    from bp_service.training.module import BPModule

    cfg = compose_cfg("data=iris")
    seen = []

    class Probe(BPModule):
        def training_step(self, chunk, batch_idx):
            seen.append((self.__dict__.get("_current_fx_name"), "_current_fx_name" in self.__dict__))
            return super().training_step(chunk, batch_idx)

    module = Probe(MLP((4, 8, 3)), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=BPDataModule(cfg.data, seed=0))
    assert seen and all(entry == ("training_step", True) for entry in seen), seen
    module.extra = torch.nn.Parameter(torch.zeros(1))  # other names still go through nn.Module's registration
    assert "extra" in dict(module.named_parameters())
