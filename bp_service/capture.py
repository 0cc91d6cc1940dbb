"""A whole training step captured once in a CUDA graph and replayed: forward, backward, optimizer.

At the sizes people train MLPs, a GPU step is launch-bound: dozens of small kernels, each
queued by Python. Captured in a ``torch.cuda.CUDAGraph``, the hand-written forward, the
hand-written backward and the optimizer update are one launch; the Python that builds them runs
once, at capture. This follows PyTorch's recipe for whole-network capture (warm up on a side
stream, capture with the gradients unset, copy each batch into static inputs and replay).

It imports only torch; the LightningModule decides when a step may be captured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class CapturedStep:
    """``step(x, y)`` = ``opt.zero_grad(); cost(x, y).backward(); opt.step()``, replayed from a CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream (they are real training steps: they
    create the optimizer's state, e.g. momentum buffers, which the graph then updates in place).
    The next call captures the step and replays it; later calls copy their batch into the static
    inputs and replay. A batch of another shape, dtype or device is not for this graph: check
    :meth:`fits` first. When the learning rate of any parameter group changes (an epoch-wise
    scheduler), the step is captured again, since the graph holds the rate it was captured with.

    Args:
        cost: ``(x, y) -> scalar cost`` whose backward fills the parameters' ``.grad``.
        params: the parameters the optimizer updates.
        optimizer: a ``torch.optim`` optimizer whose ``step`` can be captured (SGD; Adam/AdamW
            built with ``capturable=True``).
        warmup: eager steps before the capture.

    Attributes:
        loss: the static tensor the graph writes each step's cost into.
        grads: the static gradient tensors the graph writes (``p.grad`` after each replay).
        captures: how many times the step was captured.
    """

    def __init__(
        self,
        cost: Callable[[Tensor, Tensor], Tensor],
        params: Sequence[Tensor],
        optimizer: torch.optim.Optimizer,
        warmup: int = 3,
    ) -> None:
        self.cost, self.params, self.optimizer, self.warmup = cost, list(params), optimizer, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x = self.static_y = self.loss = None
        self.grads: list[Tensor | None] = []
        self.captures = self._eager_steps = 0
        self._lrs: list[float] = []

    def fits(self, x: Tensor, y: Tensor) -> bool:
        """Whether (x, y) can use this graph: same shapes, dtypes and device as the batch it was made for."""
        if self.static_x is None:
            return True
        return all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in ((x, self.static_x), (y, self.static_y))
        )

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.graph is not None and self._lrs != self._current_lrs():
            self.graph = None  # the scheduler moved the learning rate: capture again
        if self.graph is None and self._eager_steps < self.warmup:
            return self._eager_step(x, y)
        if self.graph is None:
            self._capture(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.loss

    def _current_lrs(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def _eager_step(self, x: Tensor, y: Tensor) -> Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.cost(x, y)
            loss.backward()
            self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        self._eager_steps += 1
        return loss.detach()

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self.static_x, self.static_y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates the static .grad
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.cost(self.static_x, self.static_y)
            loss.backward()
            self.optimizer.step()
        self.graph, self.loss = graph, loss.detach()
        self.grads = [p.grad for p in self.params]
        self._lrs = self._current_lrs()
        self.captures += 1

    def restore_grads(self) -> None:
        """Point ``p.grad`` back at the graph's gradients (after an eager step replaced them)."""
        for p, g in zip(self.params, self.grads):
            p.grad = g
