"""The networks and training steps the step items compare: bp-train's path and its native autograd twin."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from bp_service import functions as F
from bp_service.bench.harness import BenchConfig
from bp_service.layers import MLP

SIZES: tuple[int, ...] = (784, 1024, 1024, 10)  # the compute-bound shape: MNIST-sized, batch 512
BATCH = 512
# The networks users train, with the batch each runs at: (label, sizes, batch, CPU target, CUDA target).
# Targets are step-time ratios bp-train's path / native autograd.
Shape = tuple[str, tuple[int, ...], int, float, float]
SHAPES: tuple[Shape, ...] = (
    ("digits job", (64, 64, 10), 64, 1.00, 1.05),
    ("worked example", (3, 2, 1), 1, 1.00, 1.05),
    ("MNIST-sized", SIZES, BATCH, 1.02, 1.05),
)
GPU_SHAPE: Shape = ("GPU-sized", (4096, 4096, 4096, 10), 4096, 1.00, 1.00)  # not launch-bound: CUDA only
# Classification as bp-train trains it by default, against native's idiom: time and memory within 5%.
CROSS_ENTROPY_SHAPE: Shape = ("digits job, cross-entropy", (64, 64, 10), 64, 1.05, 1.05)
LR = 0.1


class NativeMLP(nn.Module):
    """The peer: the same network from ``nn.Linear`` and ``torch.sigmoid`` (native autograd).

    Its ``state_dict`` keys match :class:`bp_service.MLP`, so weights load across unchanged.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(h_in, h_out) for h_in, h_out in pairwise(sizes))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return x


class NativeLogits(NativeMLP):
    """The cross-entropy peer: sigmoid hidden layers, the output's logits left to ``F.cross_entropy``."""

    def forward(self, x: Tensor) -> Tensor:
        *hidden, last = self.layers
        for layer in hidden:
            x = torch.sigmoid(layer(x))
        return last(x)


def build_models(
    device: str, dtype: torch.dtype, seed: int = 0, sizes: Sequence[int] = SIZES, fused: bool = True
) -> tuple[MLP, NativeMLP]:
    """bp-service's MLP (sigmoid hidden and output layers) and its native twin, same weights."""
    torch.manual_seed(seed)
    ours = MLP(sizes, activation="sigmoid", output_activation="sigmoid", fused=fused).to(device=device, dtype=dtype)
    native = NativeMLP(sizes).to(device=device, dtype=dtype)
    native.load_state_dict(ours.state_dict())
    return ours, native


def build_cross_entropy_steps(cfg: BenchConfig, device: str, dtype: torch.dtype) -> dict[str, TrainStep]:
    """bp-train's classification step (a softmax output, ``MLP.cost(loss="cross_entropy")``) and native's idiom
    (``F.cross_entropy`` on the logits, class indices), same weights, checked to give the same first loss."""
    _, sizes, batch, _, _ = CROSS_ENTROPY_SHAPE
    x, onehot = build_batch(device, dtype, cfg.seed, sizes, batch)
    torch.manual_seed(cfg.seed)
    ours = MLP(sizes, activation="sigmoid", output_activation="softmax").to(device=device, dtype=dtype)
    native = NativeLogits(sizes).to(device=device, dtype=dtype)
    native.load_state_dict(ours.state_dict())
    steps = {
        "cost_ce": CostStep(ours, x, onehot, lambda x, y: ours.cost(x, y, loss="cross_entropy")),
        "native_ce": TrainStep(native, TF.cross_entropy, x, onehot.argmax(-1)),
    }
    first = {side: step() for side, step in steps.items()}
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(first["cost_ce"], first["native_ce"], **tol)
    return steps


def build_batch(
    device: str, dtype: torch.dtype, seed: int = 0, sizes: Sequence[int] = SIZES, batch: int = BATCH
) -> tuple[Tensor, Tensor]:
    """An MNIST-shaped batch: pixels in [0, 1), one-hot targets."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, sizes[0], generator=g)
    target = TF.one_hot(torch.randint(sizes[-1], (batch,), generator=g), sizes[-1]).float()
    return x.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)


class TrainStep:
    """One training step, callable: zero the gradients, forward, loss, backward, SGD update in place."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, target: Tensor):
        self.model, self.loss_fn, self.x, self.target = model, loss_fn, x, target
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)

    def __call__(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.target)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def state_bytes(self) -> int:
        """Bytes of the tensors that live from one step to the next: weights, gradients, batch, optimizer state."""
        tensors = [self.x, self.target, *self.model.parameters()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.opt.state.values() for v in state.values() if isinstance(v, Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


class CostStep(TrainStep):
    """bp-train's training step: ``model.cost`` (one whole-network Function), backward, SGD."""

    def __init__(self, model: MLP, x: Tensor, target: Tensor, cost: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__(model, F.mse_loss, x, target)
        self.cost = cost or model.cost

    def __call__(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.cost(self.x, self.target)
        loss.backward()
        self.opt.step()
        return loss.detach()


class GraphStep(TrainStep):
    """A training step captured whole in a CUDA graph (:class:`~bp_service.capture.CapturedStep`) and replayed."""

    def __init__(self, model: nn.Module, cost: Callable[[Tensor, Tensor], Tensor], x: Tensor, target: Tensor):
        super().__init__(model, F.mse_loss, x, target)
        from bp_service.capture import CapturedStep

        self.captured = CapturedStep(cost, list(model.parameters()), self.opt)

    def __call__(self) -> Tensor:
        return self.captured(self.x, self.target)


SIDES = {
    "cost": "bp_service.MLP.cost",
    "custom": "bp_service.MLP per-layer",
    "unfused": "bp_service.MLP(fused=False)",
    "compiled": "torch.compile(bp_service.MLP.cost)",
    "native": "nn.Linear+torch.sigmoid",
    "native_compiled": "torch.compile(nn.Linear+torch.sigmoid+F.mse_loss)",
    "captured": "bp_service.MLP.cost, CUDA graph",
    "native_captured": "nn.Linear+torch.sigmoid, CUDA graph",
    "cost_ce": "bp_service.MLP.cost(loss=cross_entropy)",
    "native_ce": "nn.Linear+torch.sigmoid+F.cross_entropy",
}


def build_steps(
    cfg: BenchConfig,
    device: str,
    dtype: torch.dtype,
    sides: Sequence[str] = ("cost", "native"),
    sizes: Sequence[int] = SIZES,
    batch: int = BATCH,
) -> dict[str, TrainStep]:
    """Training steps keyed by side (see ``SIDES``), each with its own copy of the same weights.

    ``cost`` is bp-train's path (``MLP.cost``: one whole-network Function); ``custom`` the
    per-layer Functions (fused sigmoid layers, then ``F.mse_loss``); ``unfused`` the same with
    ``fused=False``; ``compiled`` the cost path under ``torch.compile`` (``model.compile=true``);
    ``native`` the peer, ``native_compiled`` its forward and loss under ``torch.compile`` (``compiled``'s peer).
    Before returning, the first step of each is checked to give the same loss as the native
    one, so every side provably computes the same network.
    """
    x, target = build_batch(device, dtype, cfg.seed, sizes, batch)
    steps: dict[str, TrainStep] = {}
    for side in sides:
        ours, native = build_models(device, dtype, cfg.seed, sizes, fused=side != "unfused")
        steps[side] = _side_step(side, ours, native, x, target)
    _check_same_first_loss(steps, dtype)
    return steps


def _side_step(side: str, ours: MLP, native: NativeMLP, x: Tensor, target: Tensor) -> TrainStep:
    if side == "native":
        return TrainStep(native, TF.mse_loss, x, target)
    if side == "captured":
        return GraphStep(ours, ours.cost, x, target)
    if side == "native_captured":
        return GraphStep(native, lambda x, y, m=native: TF.mse_loss(m(x), y), x, target)
    if side in ("cost", "compiled"):
        return CostStep(ours, x, target, torch.compile(ours.cost) if side == "compiled" else None)
    if side == "native_compiled":
        return CostStep(native, x, target, torch.compile(lambda x, y, m=native: TF.mse_loss(m(x), y)))
    return TrainStep(ours, F.mse_loss, x, target)


def _check_same_first_loss(steps: dict[str, TrainStep], dtype: torch.dtype) -> None:
    """Run every step once; each side's loss must match the native one's."""
    first = {side: step() for side, step in steps.items()}
    if "native" in first:
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        for side, loss in first.items():
            torch.testing.assert_close(loss, first["native"], **tol, msg=lambda m, s=side: f"{s} vs native: {m}")


def shapes_for(device: str) -> tuple[Shape, ...]:
    """The networks step time and peak memory run on ``device``: the users' shapes, plus a GPU-sized one on CUDA."""
    return SHAPES + ((GPU_SHAPE,) if device.startswith("cuda") else ())
