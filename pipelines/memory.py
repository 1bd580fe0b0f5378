"""Small data sets (digits, CIFAR, SVHN) held whole on the training device as uint8.

Batches are sliced from device tensors by index and augmented there, with no DataLoader workers:
at 32x32 the host pipeline would be the bottleneck long before the GPU."""
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mgssl.pipelines.augment import normalize, random_crop_flip
from mgssl.pipelines.prefetch import Prefetched
from mgssl.pipelines.sources import ArrayDataset
from mgssl.pipelines.splits import LabelSplit
from mgssl.pipelines.streams import IndexStream


@dataclass
class DeviceImages:
    images: torch.Tensor  # uint8 (N, H, W, C) on the device
    labels: torch.Tensor  # int64 (N,) on the device
    mean: torch.Tensor  # float32 (C,)
    std: torch.Tensor  # float32 (C,)

    @classmethod
    def upload(cls, images: np.ndarray, labels: np.ndarray, mean, std, device) -> "DeviceImages":
        return cls(torch.from_numpy(np.ascontiguousarray(images)).to(device),
                   torch.from_numpy(labels).to(device), mean.to(device), std.to(device))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[idx], self.mean, self.std), self.labels[idx]


class PairedBatches:
    """Endless (x_l, y_l, x_u) on the device: independent shuffles of the labeled and unlabeled
    sets, sharded per rank, augmented per batch from a seed derived from the batch number."""

    def __init__(self, train: DeviceImages, labeled: np.ndarray, unlabeled: np.ndarray, *, global_batch: int,
                 seed: int, pad: int, flip: bool, rank: int = 0, world_size: int = 1):
        dev = train.images.device
        self.train, self.pad, self.flip = train, pad, flip
        self.labeled_idx = torch.from_numpy(labeled).to(dev)
        self.unlabeled_idx = torch.from_numpy(unlabeled).to(dev)
        self.labeled = IndexStream(len(labeled), seed * 1000 + 1, global_batch, rank, world_size)
        self.unlabeled = IndexStream(len(unlabeled), seed * 1000 + 2, global_batch, rank, world_size)
        self.seed, self.rank = seed, rank
        self.batches = 0
        self.gen = torch.Generator(device=dev)

    def __iter__(self):
        return self

    def _to_device(self, idx: torch.Tensor) -> torch.Tensor:
        dev = self.labeled_idx.device
        if dev.type == "cuda":
            # only a copy from pinned memory is queued without blocking the host
            idx = idx.pin_memory()
        return idx.to(dev, non_blocking=True)

    def _augment(self, idx: torch.Tensor) -> torch.Tensor:
        return normalize(random_crop_flip(self.train.images[idx], self.pad, self.flip, self.gen),
                         self.train.mean, self.train.std)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        li = self.labeled_idx[self._to_device(self.labeled.next_batch())]
        ui = self.unlabeled_idx[self._to_device(self.unlabeled.next_batch())]
        # seeded by (seed, rank, batch number) so a resume needs no RNG state; mod 2**64 keeps every seed in range
        self.gen.manual_seed(((self.seed * 7919 + self.rank) * 1_000_003 + self.batches) % 2**64)
        self.batches += 1
        return self._augment(li), self.train.labels[li], self._augment(ui)  # (B,C,H,W), (B,), (B,C,H,W)

    @property
    def unlabeled_epoch(self) -> float:
        return self.unlabeled.epoch

    def state_dict(self) -> dict:
        return {"labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict(),
                "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])
        self.batches = int(state["batches"])


class InMemoryData:
    """A data set on the device: paired training batches and un-augmented evaluation batches."""

    def __init__(self, arrays: ArrayDataset, split: LabelSplit, *, include_labeled: bool, global_batch: int,
                 eval_batch: int, seed: int, device, rank: int = 0, world_size: int = 1):
        mean = torch.tensor(arrays.train_images.reshape(-1, arrays.train_images.shape[-1]).mean(0) / 255.0,
                            dtype=torch.float32)
        std = torch.tensor(arrays.train_images.reshape(-1, arrays.train_images.shape[-1]).std(0) / 255.0,
                           dtype=torch.float32)
        self.name, self.num_classes = arrays.name, arrays.num_classes
        self.classes = [str(c) for c in range(arrays.num_classes)]  # these data sets name classes by number
        self.in_channels, self.image_size = arrays.train_images.shape[-1], arrays.train_images.shape[1]
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.eval_batch = max(1, eval_batch // world_size)
        self.train_set = DeviceImages.upload(arrays.train_images, arrays.train_labels, mean, std, device)
        self.test_set = DeviceImages.upload(arrays.test_images, arrays.test_labels, mean, std, device)
        unlabeled = split.unlabeled(include_labeled)
        self.unlabeled_size = len(unlabeled)
        self.train = PairedBatches(self.train_set, split.labeled, unlabeled, global_batch=global_batch, seed=seed,
                                   pad=arrays.pad, flip=arrays.flip, rank=rank, world_size=world_size)
        if torch.device(device).type == "cuda":
            self.train = Prefetched(self.train, torch.device(device))  # the next batch made during the step

    def _subset(self, subset: str) -> tuple[DeviceImages, torch.Tensor]:
        if subset == "test":
            return self.test_set, torch.arange(len(self.test_set.labels))
        if subset == "labeled":
            return self.train_set, torch.from_numpy(self.split.labeled)
        if subset == "unlabeled":
            return self.train_set, torch.from_numpy(self.split.unlabeled(include_labeled=False))
        if subset == "validation":
            return self.train_set, torch.from_numpy(self.split.validation)
        raise ValueError(f"unknown subset {subset!r}; choose test, validation, labeled or unlabeled")

    def eval_batches(self, subset: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of `subset`, un-augmented, in order: (x, y) batches on the device."""
        images, idx = self._subset(subset)
        idx = idx[self.rank::self.world_size].to(images.images.device)
        for start in range(0, len(idx), self.eval_batch):
            yield images.batch(idx[start:start + self.eval_batch])
