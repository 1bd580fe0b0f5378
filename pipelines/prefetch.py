"""The next training batch made ahead of time, on a side CUDA stream, while the step runs.

`Prefetched` wraps an endless batch iterator that has `state_dict`/`load_state_dict` (the in-memory
and the DALI pipelines). After the trainer has queued a step, `prefetch()` makes the next batch on
its own stream, so its index copies, gathers and augmentation overlap the step's kernels instead of
queueing behind them; `next()` then only makes the compute stream wait for that stream. The state
saved in a checkpoint is the inner iterator's state before the prefetched batch was drawn, so a
resumed run draws that batch again and resume stays exact."""
from typing import Optional

import torch


class Prefetched:
    def __init__(self, inner, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"prefetching on a side stream needs a CUDA device, not {device}")
        self.inner, self.device = inner, device
        self.stream = torch.cuda.Stream(device)
        self._ready: Optional[tuple] = None  # (batch, inner state before it, unlabeled epoch before it)

    def __iter__(self):
        return self

    def prefetch(self) -> None:
        """Make the next batch now, on the side stream (a no-op when one is already waiting)."""
        if self._ready is not None:
            return
        state, epoch = self.inner.state_dict(), self.inner.unlabeled_epoch
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs written by the step
        with torch.cuda.stream(self.stream):
            batch = next(self.inner)
        self._ready = (batch, state, epoch)

    def __next__(self):
        self.prefetch()
        batch, _, _ = self._ready
        self._ready = None
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for t in batch:
            # keeps the allocator from reusing this memory on the side stream while compute still reads it
            t.record_stream(compute)
        return batch

    @property
    def unlabeled_epoch(self) -> float:
        return self._ready[2] if self._ready is not None else self.inner.unlabeled_epoch

    def state_dict(self) -> dict:
        return self._ready[1] if self._ready is not None else self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ready = None
        self.inner.load_state_dict(state)
