"""Category-balanced labeled subsets, drawn with a seed and saved as a file that runs can share.

A split is a JSON file holding the indices of the labeled training images plus what they index
(data set name and size), so a split made for one data set cannot be applied to another."""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np


@dataclass(frozen=True)
class LabelSplit:
    dataset: str
    train_size: int
    seed: int
    labeled: np.ndarray  # sorted indices into the training set, int64
    # sorted indices of the held-out validation images: neither labeled nor unlabeled training data
    validation: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    extra: dict = field(default_factory=dict)  # what else the data set records with its split (JSON values)

    def unlabeled(self, include_labeled: bool) -> np.ndarray:
        """Indices of the unlabeled set: everything, or everything but the labeled images (never the
        validation images)."""
        mask = np.ones(self.train_size, dtype=bool)
        mask[self.validation] = False
        if not include_labeled:
            mask[self.labeled] = False
        return np.flatnonzero(mask).astype(np.int64)

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"dataset": self.dataset, "train_size": self.train_size, "seed": self.seed,
                   "num_labeled": len(self.labeled), "labeled": self.labeled.tolist()}
        if len(self.validation):
            payload["validation"] = self.validation.tolist()
        payload.update(self.extra)
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


def _draw_per_class(labels: np.ndarray, num_classes: int, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    by_class = np.argsort(labels, kind="stable")  # indices grouped by class, ascending within each
    sizes = np.bincount(labels, minlength=num_classes)
    ends = np.cumsum(sizes)
    chosen = [rng.choice(by_class[end - n:end], size=counts[c], replace=False)
              for c, (end, n) in enumerate(zip(ends, sizes))]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def validation_counts(labels: np.ndarray, num_classes: int, request: Union[int, float]) -> np.ndarray:
    """Held-out validation images per class; every class keeps at least one image to label."""
    if not request:
        return np.zeros(num_classes, dtype=np.int64)
    available = np.bincount(labels, minlength=num_classes)
    if isinstance(request, float):
        counts = np.maximum(1, np.round(available * request)).astype(np.int64)
    else:
        if request % num_classes:
            raise ValueError(f"data.validation={request} cannot be split evenly over {num_classes} classes; "
                             f"use a multiple of {num_classes}, or a fraction of each class (e.g. 0.1)")
        counts = np.full(num_classes, request // num_classes, dtype=np.int64)
    short = np.flatnonzero(counts >= available)
    if len(short):
        c = short[0]
        raise ValueError(f"data.validation holds out {counts[c]} images of class {c}, which has only {available[c]} "
                         f"training images and needs at least one more to label; lower data.validation or add images")
    return counts


def balanced_split(labels: np.ndarray, num_classes: int, request: Union[int, float], seed: int,
                   dataset: str, validation: Union[int, float] = 0) -> LabelSplit:
    """The same number of labeled images per class (or the same fraction), drawn with `seed`, from the
    images left after the validation images (`validation` per class, drawn first) are set aside."""
    labels = np.asarray(labels, dtype=np.int64)
    held = np.zeros(0, dtype=np.int64)
    if validation:
        # Its own generator: with no validation set the labeled draw is the one it always was.
        held = _draw_per_class(labels, num_classes, validation_counts(labels, num_classes, validation),
                               np.random.default_rng([seed, 1]))
    rest = np.setdiff1d(np.arange(len(labels)), held)
    counts = per_class_counts(labels[rest], num_classes, request)
    chosen = rest[_draw_per_class(labels[rest], num_classes, counts, np.random.default_rng(seed))]
    return LabelSplit(dataset, len(labels), seed, np.sort(chosen).astype(np.int64), held)


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
    held = np.asarray(payload.get("validation", []), dtype=np.int64)
    both = np.concatenate([labeled, held])
    if len(np.unique(both)) != len(both) or both.min() < 0 or both.max() >= len(labels):
        raise ValueError(f"{path} holds repeated or out-of-range indices; it is damaged")
    known = ("dataset", "train_size", "seed", "num_labeled", "labeled", "validation")
    return LabelSplit(dataset, len(labels), int(payload.get("seed", -1)), np.sort(labeled), np.sort(held),
                      {k: v for k, v in payload.items() if k not in known})
