"""ImageNet-style class folders (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`) as sorted file lists.

Only the listing happens here; decoding is the DALI pipeline's job (pipelines/dali.py). Class
indices follow the sorted names of the `train/` sub-folders, the order torchvision's ImageFolder
uses, so labels agree with checkpoints trained by other ImageNet code."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from mgssl.pipelines.sources import DataMissingError, _need_root

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
LAYOUT = ("train/<class>/*.JPEG and val/<class>/*.JPEG, one sub-folder per class with the same names in both "
          "(for ImageNet-1k: the validation images sorted into their 1,000 wnid folders)")


@dataclass
class FileDataset:
    name: str
    classes: list[str]  # sub-folder names, index = label
    train_files: list[str]
    train_labels: np.ndarray  # int64 (N,)
    test_files: list[str]
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _scan(split_dir: Path, classes: Optional[list[str]]) -> tuple[list[str], list[str], np.ndarray]:
    if not split_dir.is_dir():
        raise DataMissingError(f"missing folder {split_dir}; data.root should hold {LAYOUT}")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        loose = [p.name for p in split_dir.iterdir() if p.is_file()][:3]
        hint = (f" It holds loose files ({', '.join(loose)}...): sort them into one folder per class first."
                if loose else "")
        raise DataMissingError(f"{split_dir} has no class sub-folders; data.root should hold {LAYOUT}.{hint}")
    from_train = classes is not None
    if not from_train:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir} has class folders that train/ lacks ({', '.join(unknown[:5])}); "
                             f"both must hold the same classes: {LAYOUT}")
    files, labels = [], []
    for label, name in enumerate(classes):
        sub = split_dir / name
        images = _list_images(sub) if sub.is_dir() else []
        files += images
        labels += [label] * len(images)
    if not files:
        raise DataMissingError(f"{split_dir} holds no image files ({'/'.join(IMAGE_SUFFIXES)}); "
                               f"data.root should hold {LAYOUT}")
    labels = np.asarray(labels, dtype=np.int64)
    lacking = [c for c, n in zip(classes, np.bincount(labels, minlength=len(classes))) if n == 0]
    more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
    if lacking and not from_train:
        raise ValueError(f"class folders without images under {split_dir}: {', '.join(lacking[:5])}{more}; "
                         "remove them or add their images")
    if lacking:  # the test error would silently leave these classes out
        raise ValueError(f"{split_dir} has no images of {len(lacking)} class(es) of train/: "
                         f"{', '.join(lacking[:5])}{more}; add their images, so that the test error covers "
                         f"every class: {LAYOUT}")
    return classes, files, labels


def load_image_folders(root: Optional[str], name: str = "imagenet") -> FileDataset:
    base = _need_root(name, root, LAYOUT)
    classes, train_files, train_labels = _scan(base / "train", None)
    _, test_files, test_labels = _scan(base / "val", classes)
    return FileDataset(name, classes, train_files, train_labels, test_files, test_labels)
