"""Batches of in-memory tensors for Lightning: sliced from a shuffled index, resumable mid-epoch, dealt to DDP ranks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


class InMemoryLoader:
    """Batches of in-memory tensors by slicing a shuffled index: no per-sample ``__getitem__`` + collate.

    Each epoch's order is a pure function of ``(seed, epoch)``. Given ``position`` (a callable
    returning the current epoch and how many of its batches, optimizer steps, are already done, read
    when iteration starts), a run resumed mid-epoch from a checkpoint continues
    with exactly the batches an uninterrupted run would see: no random-number state to save.

    With ``world_size > 1`` every global batch of ``batch_size * world_size`` rows is dealt
    round-robin to the ranks, so DDP on W processes sees the same global batches as one process
    with a W-times larger batch.

    Yields tuples of ``steps_per_execution`` consecutive ``(x, y)`` batches (one per optimizer step).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        steps_per_execution: int = 1,
        position: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_execution = steps_per_execution
        self.position = position
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def n_batches(self) -> int:
        """Optimizer steps per epoch; a last global batch too small to give every rank a row is dropped."""
        global_batch = self.batch_size * self.world_size
        full, rest = divmod(len(self.x), global_batch)
        return full + (rest >= self.world_size)

    def __len__(self) -> int:
        return math.ceil(self.n_batches / self.steps_per_execution)

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.x))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.x), generator=generator)

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, Tensor], ...]]:
        # A generator: the position is read at the first next(), after Lightning restored its loop.
        epoch, done = self.position() if self.position else (self.epoch, 0)
        order = self._order(epoch).to(self.x.device)  # on CUDA the batches are gathered there
        global_batch = self.batch_size * self.world_size
        chunk: list[tuple[Tensor, Tensor]] = []
        for i in range(done, self.n_batches):
            idx = order[i * global_batch : (i + 1) * global_batch][self.rank :: self.world_size]
            chunk.append((self.x[idx], self.y[idx]))
            if len(chunk) == self.steps_per_execution:
                yield tuple(chunk)
                chunk = []
        if chunk:
            yield tuple(chunk)
