"""Endless shuffled index streams whose whole state is one integer, so they resume exactly.

Epoch e is a permutation drawn from (seed, e) alone, and the stream is the concatenation of
epochs; a batch takes the next `global_batch` positions and rank r keeps its slice. Every index
appears once per epoch, every rank agrees on the order without talking, and `position` is all a
checkpoint needs."""
import torch


class IndexStream:
    def __init__(self, size: int, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError("cannot stream from an empty set")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.size, self.seed, self.global_batch = size, seed, global_batch
        self.rank, self.world_size = rank, world_size
        self.position = 0  # items of the global stream consumed so far
        self._cached_epoch, self._cached_perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached_perm = torch.randperm(self.size, generator=gen)
            self._cached_epoch = epoch
        return self._cached_perm

    def _take(self, start: int, count: int) -> torch.Tensor:
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.size)
            n = min(count, self.size - offset)
            parts.append(self.permutation(epoch)[offset:offset + n])
            start, count = start + n, count - n
        return torch.cat(parts)

    def batch_indices(self, batch: int, rank: int) -> torch.Tensor:
        """Rank `rank`'s indices of global batch number `batch` (CPU int64), without moving."""
        local = self.global_batch // self.world_size
        return self._take(batch * self.global_batch + rank * local, local)

    def next_batch(self) -> torch.Tensor:
        """This rank's indices of the next global batch (CPU int64)."""
        idx = self.batch_indices(self.batches_done, self.rank)
        self.position += self.global_batch
        return idx

    @property
    def batches_done(self) -> int:
        return self.position // self.global_batch

    @property
    def epoch(self) -> float:
        return self.position / self.size

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        position = int(state["position"])
        if position < 0 or position % self.global_batch:
            raise ValueError(f"saved stream position {position} is not a whole number of global batches of "
                             f"{self.global_batch}; was the checkpoint written with another data.batch_size?")
        self.position = position
