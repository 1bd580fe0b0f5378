"""Your own images as a data set: one sub-folder per class, any image format that both Pillow and
DALI's decoder read, any size and colour mode (grey, RGBA, CMYK and palette images decode to RGB).

Layouts of `data.root`:
- `<class>/...` (or `train/<class>/...` alone): a share of each class (`data.test_share`) is held
  out as the test set, drawn with a fixed generator so that every seed is tested on the same images;
- `train/<class>/...` with `val/<class>/...` (or `test/<class>/...`): that folder is the test set.
Class folders are searched recursively; class indices follow the sorted folder names, as torchvision's
ImageFolder numbers them. `data.unlabeled_root` adds images without labels, in any layout.

Files that cannot be used (another format, or a file Pillow cannot open) are collected in `skipped`
with the reason, for the warning and the run folder's skipped_files.txt; nothing is dropped silently."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mgssl import runfolder as rf
from mgssl.pipelines.folders import FileDataset
from mgssl.pipelines.sources import DataMissingError, _need_root

# formats both Pillow and DALI's CPU decoder were checked to decode (no GIF in DALI; HEIC/AVIF need plug-ins)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".jp2", ".ppm", ".pgm", ".pnm")
SKIPPED_LOG = rf.SKIPPED
LAYOUT = ("one sub-folder of images per class (<class>/*.jpg ...), or train/<class>/ with val/<class>/ "
          "(or test/<class>/) for a test set of your own")


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class ClassFolders(FileDataset):
    unlabeled_files: list[str] = field(default_factory=list)  # from data.unlabeled_root
    skipped: list[Skipped] = field(default_factory=list)
    held_out_test: bool = False  # the test set is a share of each class, not a folder of its own
    root: str = ""

    @property
    def files_seen(self) -> int:
        return len(self.train_files) + len(self.test_files) + len(self.unlabeled_files) + len(self.skipped)


def why_unusable(path: Path) -> Optional[str]:
    """Why `path` cannot be used, or None if it can: its suffix, then its header, are checked (the
    pixels are decoded only during training, where a file that fails is skipped by name)."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"{path.suffix.lower() or 'no suffix'}: not a format read; convert it to png or jpg"
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (the header is parsed by open)
    except (UnidentifiedImageError, OSError, ValueError):
        return "not a readable image: Pillow cannot open it"
    return None


def list_images(folder: Path, skipped: list[Skipped]) -> list[str]:
    """The usable images below `folder` (recursively), sorted; the rest go to `skipped`."""
    images = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        reason = why_unusable(path)
        if reason is None:
            images.append(str(path))
        else:
            skipped.append(Skipped(str(path), reason))
    return images


def _class_dirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        loose = [p.name for p in folder.iterdir() if p.is_file()][:3]
        hint = f" It holds loose files ({', '.join(loose)}...): sort them into one folder per class." if loose else ""
        raise DataMissingError(f"{folder} has no class sub-folders; data.root should hold {LAYOUT}.{hint}")
    return dirs


def _scan_classes(folder: Path, classes: list[str], skipped: list[Skipped]) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        before = len(skipped)
        images = list_images(sub, skipped) if sub.is_dir() else []
        if not images:
            why = f" ({len(skipped) - before} unusable files, e.g. {skipped[-1].path})" if len(skipped) > before else ""
            raise DataMissingError(f"the class folder {sub} holds no images{why}; add images in one of the formats "
                                   f"read ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) or remove the folder")
        files += images
        labels += [label] * len(images)
    return files, np.asarray(labels, dtype=np.int64)


def held_out_share(labels: np.ndarray, num_classes: int, share: float, classes: list[str]) -> np.ndarray:
    """Indices of the test images: `share` of each class (at least one), drawn with a fixed generator."""
    rng = np.random.default_rng(0)  # the test set does not change with the run's seed
    held = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            raise ValueError(f"class {classes[c]!r} has {len(members)} image; a held-out test set needs at least 2 "
                             f"per class (one to test, one to train): add images, or give the data a val/ folder")
        count = min(len(members) - 1, max(1, round(len(members) * share)))
        held.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(held))


def load_class_folders(root: Optional[str], unlabeled_root: Optional[str] = None,
                       test_share: float = 0.1) -> ClassFolders:
    base = _need_root("folder", root, LAYOUT)
    skipped: list[Skipped] = []
    pair = next((base / n for n in ("val", "test") if (base / n).is_dir()), None)
    train_dir = base / "train" if (base / "train").is_dir() else base
    if pair is not None and train_dir == base:
        raise DataMissingError(f"{base} holds {pair.name}/ but no train/ beside it; put the training classes in "
                               f"{base / 'train'}, or move {pair.name}/ away to hold out a share of each class")
    classes = [p.name for p in _class_dirs(train_dir)]
    files, labels = _scan_classes(train_dir, classes, skipped)
    if pair is not None:
        unknown = sorted({p.name for p in _class_dirs(pair)} - set(classes))
        if unknown:
            raise ValueError(f"{pair} has class folders that {train_dir} lacks ({', '.join(unknown[:5])}); both must "
                             "hold the same classes")
        test_files, test_labels = _scan_classes(pair, classes, skipped)
        train_files, train_labels = files, labels
    else:
        test = held_out_share(labels, len(classes), test_share, classes)
        is_test = np.zeros(len(files), dtype=bool)
        is_test[test] = True
        test_files, test_labels = [f for f, t in zip(files, is_test) if t], labels[is_test]
        train_files, train_labels = [f for f, t in zip(files, is_test) if not t], labels[~is_test]
    unlabeled_files: list[str] = []
    if unlabeled_root:
        extra = Path(unlabeled_root).expanduser()
        if not extra.is_dir():
            raise DataMissingError(f"data.unlabeled_root={str(extra)!r} is not a folder; point it at a folder of "
                                   "images without labels (any layout), or set it to null")
        unlabeled_files = list_images(extra, skipped)
        if not unlabeled_files:
            raise DataMissingError(f"data.unlabeled_root={str(extra)!r} holds no images in the formats read "
                                   f"({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    return ClassFolders("folder", classes, train_files, train_labels, test_files, test_labels,
                        unlabeled_files=unlabeled_files, skipped=skipped, held_out_test=pair is None, root=str(base))


def skipped_summary(skipped: list[Skipped], seen: int, shown: int = 3) -> str:
    """One line: how many files were skipped and the first few, with why."""
    names = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"skipped {len(skipped)} of {seen} files: {names}{more}"


def write_skipped(skipped: list[Skipped], run_dir: Path) -> Path:
    """The run folder's list of skipped files, one `path<TAB>reason` a line (rewritten on each start)."""
    path = Path(run_dir) / SKIPPED_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    rf.write_atomic(path, "".join(f"{s.path}\t{s.reason}\n" for s in skipped))
    return path
