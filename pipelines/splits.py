"""Category-balanced labeled subsets, drawn with a seed and saved as a file that runs can share.

A split is a JSON file holding the indices of the labeled training images plus what they index
(data set name and size), so a split made for one data set cannot be applied to another."""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np


@dataclass(frozen=True)
class LabelSplit:
    dataset: str
    train_size: int
    seed: int
    labeled: np.ndarray  # sorted indices into the training set, int64

    def unlabeled(self, include_labeled: bool) -> np.ndarray:
        """Indices of the unlabeled set: everything, or everything but the labeled images."""
        if include_labeled:
            return np.arange(self.train_size, dtype=np.int64)
        mask = np.ones(self.train_size, dtype=bool)
        mask[self.labeled] = False
        return np.flatnonzero(mask).astype(np.int64)

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"dataset": self.dataset, "train_size": self.train_size, "seed": self.seed,
                   "num_labeled": len(self.labeled), "labeled": self.labeled.tolist()}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)


def per_class_counts(labels: np.ndarray, num_classes: int, request: Union[int, float]) -> np.ndarray:
    """How many labeled images each class gets; fails with a message for impossible requests."""
    available = np.bincount(labels, minlength=num_classes)
    if isinstance(request, float):
        counts = np.maximum(1, np.round(available * request)).astype(np.int64)
    else:
        if request % num_classes:
            raise ValueError(f"data.labels={request} cannot be split evenly over {num_classes} classes; "
                             f"use a multiple of {num_classes} (e.g. {request - request % num_classes or num_classes})")
        counts = np.full(num_classes, request // num_classes, dtype=np.int64)
    short = np.flatnonzero(counts > available)
    if len(short):
        c = short[0]
        raise ValueError(f"data.labels asks for {counts[c]} labeled images of class {c}, which has only "
                         f"{available[c]} training images; ask for at most {available.min() * num_classes}")
    return counts


def balanced_split(labels: np.ndarray, num_classes: int, request: Union[int, float], seed: int,
                   dataset: str) -> LabelSplit:
    """The same number of labeled images per class (or the same fraction), drawn with `seed`."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = per_class_counts(labels, num_classes, request)
    rng = np.random.default_rng(seed)
    by_class = np.argsort(labels, kind="stable")  # indices grouped by class, ascending within each
    sizes = np.bincount(labels, minlength=num_classes)
    ends = np.cumsum(sizes)
    chosen = [rng.choice(by_class[end - n:end], size=counts[c], replace=False)
              for c, (end, n) in enumerate(zip(ends, sizes))]
    return LabelSplit(dataset, len(labels), seed, np.sort(np.concatenate(chosen)).astype(np.int64))


def load_split(path: Union[str, Path], dataset: str, labels: np.ndarray) -> LabelSplit:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.split_file={str(path)!r} does not exist; point it at the "
                                "labeled_split.json of an earlier run, or leave it null to draw a new split")
    payload = json.loads(path.read_text())
    if payload.get("dataset") != dataset or payload.get("train_size") != len(labels):
        raise ValueError(f"{path} is a split of {payload.get('dataset')!r} with {payload.get('train_size')} "
                         f"training images, but this run uses {dataset!r} with {len(labels)}")
    labeled = np.asarray(payload["labeled"], dtype=np.int64)
    if len(np.unique(labeled)) != len(labeled) or labeled.min() < 0 or labeled.max() >= len(labels):
        raise ValueError(f"{path} holds repeated or out-of-range indices; it is damaged")
    return LabelSplit(dataset, len(labels), int(payload.get("seed", -1)), np.sort(labeled))
