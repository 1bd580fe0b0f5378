"""An image-folder data set (ImageNet, or your own class folders) as run data: the same interface as
`InMemoryData` (paired training batches in `.train`, evaluation batches from `.eval_batches`) on top
of the DALI streams."""
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from mgssl.pipelines.dali import CorruptFiles, DecoderSettings, EvalBatches, FileStream, PairedFileBatches, \
    Transform
from mgssl.pipelines.folders import FileDataset
from mgssl.pipelines.prefetch import Prefetched
from mgssl.pipelines.splits import LabelSplit


class ImageFolderData:
    def __init__(self, data: FileDataset, split: LabelSplit, *, include_labeled: bool, global_batch: int,
                 eval_batch: int, seed: int, device, augment: str = "paper", image_size: int = 224,
                 resize_size: int = 256, on_corrupt: str = "skip", num_threads: int = 4, rank: int = 0,
                 world_size: int = 1, run_dir: Optional[Path] = None,
                 decoder: DecoderSettings = DecoderSettings(), labeled_cache: bool = False,
                 unlabeled_files: Sequence[str] = (), only_unlabeled_files: bool = False):
        self.name, self.num_classes, self.in_channels, self.image_size = data.name, data.num_classes, 3, image_size
        self.classes = list(data.classes)
        self.data, self.split, self.device = data, split, torch.device(device)
        self.rank, self.world_size, self.num_threads, self.decoder = rank, world_size, num_threads, decoder
        self.eval_batch = max(1, eval_batch // world_size)
        self.eval_transform = Transform("eval", image_size, resize_size)
        self.corrupt = CorruptFiles(on_corrupt, run_dir)  # every rank appends what it finds
        self.evaluations: dict[str, EvalBatches] = {}  # per subset, built at its first evaluation and kept
        # Images without labels follow the training images in one file list, with the label -1.
        files = list(data.train_files) + list(unlabeled_files)
        labels = np.concatenate([data.train_labels, np.full(len(unlabeled_files), -1, dtype=np.int64)])
        extra = np.arange(len(data.train_files), len(files), dtype=np.int64)
        unlabeled = extra if only_unlabeled_files else np.concatenate([split.unlabeled(include_labeled), extra])
        self.unlabeled_size = len(unlabeled)
        train = Transform(augment, image_size, resize_size)
        common = dict(global_batch=global_batch, seed=seed, device=self.device, rank=rank, world_size=world_size,
                      num_threads=num_threads, corrupt=self.corrupt, decoder=decoder)
        cache = None
        if labeled_cache:
            from mgssl.pipelines.cache import DecodedImages

            cache = DecodedImages()
        self.train = PairedFileBatches(
            FileStream(files, labels, split.labeled, train, stream_id=1, cache=cache, **common),
            FileStream(files, labels, unlabeled, train, stream_id=2, **common))
        if self.device.type == "cuda":
            self.train = Prefetched(self.train, self.device)  # the next batch copied out during the step

    def _subset(self, subset: str) -> tuple[list[str], np.ndarray]:
        if subset == "test":
            return self.data.test_files, self.data.test_labels
        if subset in ("labeled", "unlabeled", "validation"):
            idx = {"labeled": self.split.labeled, "validation": self.split.validation}.get(subset)
            idx = self.split.unlabeled(include_labeled=False) if idx is None else idx
            return [self.data.train_files[i] for i in idx], self.data.train_labels[idx]
        raise ValueError(f"unknown subset {subset!r}; choose test, validation, labeled or unlabeled")

    def eval_batches(self, subset: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of `subset` (every world_size-th file), centre-cropped, in order, from the
        subset's one pipeline of the run."""
        if subset not in self.evaluations:
            files, labels = self._subset(subset)
            self.evaluations[subset] = EvalBatches(
                files[self.rank::self.world_size], labels[self.rank::self.world_size], self.eval_transform,
                batch_size=self.eval_batch, device=self.device, num_threads=self.num_threads, corrupt=self.corrupt,
                decoder=self.decoder)
        return self.evaluations[subset].batches()
