"""Category-balanced labeled subsets, drawn with a seed and saved as a file that runs can share.

A split is a JSON file holding the indices of the labeled training images plus what they index
(data set name and size, class names, and a fingerprint of the training labels and file names), so a
split made for one data set cannot be applied to another, nor to one whose classes were renamed."""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mgssl.runfolder import RunFileError, read_json, write_atomic


# What a split file holds besides the data set's own `extra` entries (e.g. a folder's held-out test files).
KNOWN_KEYS = ("dataset", "train_size", "seed", "classes", "train_sha256", "num_labeled", "labeled", "validation")


@dataclass(frozen=True)
class LabelSplit:
    dataset: str
    train_size: int
    seed: int
    labeled: np.ndarray  # sorted indices into the training set, int64
    classes: Optional[tuple] = None  # class names, index = label (folder data sets)
    train_sha256: Optional[str] = None  # train_set_sha256 of the set the indices point into
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

    def to_json(self) -> str:
        payload = {"dataset": self.dataset, "train_size": self.train_size, "seed": self.seed,
                   "classes": None if self.classes is None else list(self.classes),
                   "train_sha256": self.train_sha256, "num_labeled": len(self.labeled),
                   "labeled": self.labeled.tolist()}
        if len(self.validation):
            payload["validation"] = self.validation.tolist()
        payload.update(self.extra)
        return json.dumps(payload)

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.to_json())

    def check_same_train_set(self, classes: Optional[Sequence[str]], train_sha256: Optional[str], source: str) -> None:
        """Refuse a training set other than the one this split indexes (renamed classes, other files)."""
        if self.classes is not None and classes is not None and list(self.classes) != list(classes):
            changed = [f"{a!r} -> {b!r}" for a, b in zip(self.classes, classes) if a != b][:3]
            raise ValueError(f"{source} was made for the classes {_names(self.classes)} but data.root now holds "
                             f"{_names(classes)} ({', '.join(changed) or 'a different count'}): the labels would be "
                             "permuted. Restore the class folders' names, or start a new run")
        if self.train_sha256 is not None and train_sha256 is not None and self.train_sha256 != train_sha256:
            raise ValueError(f"{source} was made for another list of training images and labels than data.root now "
                             "holds (files added, removed or renamed): its indices would point at other images. "
                             "Restore the data as it was, or start a new run")


def _names(classes: Sequence[str]) -> str:
    return ", ".join(list(classes)[:5]) + (f" ... ({len(classes)} in all)" if len(classes) > 5 else "")


def train_set_sha256(labels: np.ndarray, names: Sequence[str] = ()) -> str:
    """SHA-256 of the training labels in order and, for data sets of files, each file's name below
    data.root: moving the data elsewhere keeps it, renaming a class or a file changes it."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def _spread_over_classes(available: np.ndarray, request: Union[int, float], key: str) -> np.ndarray:
    """Images per class for `key`: a count split equally over the classes, or a fraction of each (at least 1)."""
    num_classes = len(available)
    if isinstance(request, float):
        return np.maximum(1, np.round(available * request)).astype(np.int64)
    if request % num_classes:
        raise ValueError(f"{key}={request} cannot be split evenly over {num_classes} classes; use a multiple of "
                         f"{num_classes} (e.g. {request - request % num_classes or num_classes}) or a fraction of "
                         "each class (e.g. 0.1)")
    return np.full(num_classes, request // num_classes, dtype=np.int64)


def per_class_counts(labels: np.ndarray, num_classes: int, request: Union[int, float]) -> np.ndarray:
    """How many labeled images each class gets; fails with a message for impossible requests."""
    available = np.bincount(labels, minlength=num_classes)
    counts = _spread_over_classes(available, request, "data.labels")
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
    counts = _spread_over_classes(available, request, "data.validation")
    short = np.flatnonzero(counts >= available)
    if len(short):
        c = short[0]
        raise ValueError(f"data.validation holds out {counts[c]} images of class {c}, which has only {available[c]} "
                         f"training images and needs at least one more to label; lower data.validation or add images")
    return counts


def balanced_split(labels: np.ndarray, num_classes: int, request: Union[int, float], seed: int,
                   dataset: str, classes: Optional[Sequence[str]] = None, train_sha256: Optional[str] = None,
                   validation: Union[int, float] = 0) -> LabelSplit:
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
    return LabelSplit(dataset, len(labels), seed, np.sort(chosen).astype(np.int64),
                      None if classes is None else tuple(classes), train_sha256, held)


def load_split(path: Union[str, Path], dataset: str, labels: np.ndarray, classes: Optional[Sequence[str]] = None,
               train_sha256: Optional[str] = None) -> LabelSplit:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.split_file={str(path)!r} does not exist; point it at the "
                                "labeled_split.json of an earlier run, or leave it null to draw a new split")
    fix = "it is not a labeled split of mgssl; restore it from a copy, or drop data.split_file to draw a new split"
    try:
        payload = read_json(path, fix)
    except RunFileError as e:
        raise ValueError(str(e)) from None
    if payload.get("dataset") != dataset or payload.get("train_size") != len(labels):
        raise ValueError(f"{path} is a split of {payload.get('dataset')!r} with {payload.get('train_size')} "
                         f"training images, but this run uses {dataset!r} with {len(labels)}")
    indices = payload.get("labeled")
    if not isinstance(indices, list) or not indices or not all(type(i) is int for i in indices):
        raise ValueError(f"{path} is damaged (its 'labeled' entry is not a non-empty list of whole numbers); {fix}")
    held_out = payload.get("validation", [])
    if not isinstance(held_out, list) or not all(type(i) is int for i in held_out):
        raise ValueError(f"{path} is damaged (its 'validation' entry is not a list of whole numbers); {fix}")
    labeled, held = np.asarray(indices, dtype=np.int64), np.asarray(held_out, dtype=np.int64)
    both = np.concatenate([labeled, held])
    if len(np.unique(both)) != len(both) or both.min() < 0 or both.max() >= len(labels):
        raise ValueError(f"{path} holds repeated or out-of-range indices; it is damaged")
    extra = {k: v for k, v in payload.items() if k not in KNOWN_KEYS}
    saved_classes = payload.get("classes")
    split = LabelSplit(dataset, len(labels), int(payload.get("seed", -1)), np.sort(labeled),
                       None if saved_classes is None else tuple(saved_classes), payload.get("train_sha256"),
                       np.sort(held), extra)
    split.check_same_train_set(classes, train_sha256, str(path))
    if split.classes is None and split.train_sha256 is None:  # a split saved before these were kept
        split = LabelSplit(dataset, len(labels), split.seed, split.labeled, None if classes is None else
                           tuple(classes), train_sha256, split.validation, extra)
    return split
