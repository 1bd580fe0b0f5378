"""Tiny data sets written in the exact on-disk formats users download, for tests and benchmarks.

Each image carries its class in its pixels (a class-dependent base colour plus noise), so a test can
check that the label travelling with an image is its own."""
import pickle
from pathlib import Path

import numpy as np


def class_images(labels: np.ndarray, size: tuple[int, int], rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """uint8 (N, H, W, 3): class c has mean grey level about 40 + 180 c / (num_classes - 1)."""
    base = 40 + 180 * labels / max(1, num_classes - 1)
    noise = rng.integers(-20, 21, size=(len(labels), *size, 3))
    return np.clip(base[:, None, None, None] + noise, 0, 255).astype(np.uint8)


def balanced_labels(per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


def write_cifar10(root: Path, per_class_train: int = 6, per_class_test: int = 2, seed: int = 0) -> Path:
    """`root/cifar-10-batches-py/` with data_batch_1..5 and test_batch, as the python tarball has them."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    labels = balanced_labels(per_class_train, 10, rng)
    images = class_images(labels, (32, 32), rng, 10)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        _dump_cifar(folder / f"data_batch_{i}", images[part], {b"labels": labels[part].tolist()})
    test_labels = balanced_labels(per_class_test, 10, rng)
    _dump_cifar(folder / "test_batch", class_images(test_labels, (32, 32), rng, 10), {b"labels": test_labels.tolist()})
    return Path(root)


def write_cifar100(root: Path, per_class_train: int = 3, per_class_test: int = 1, seed: int = 0) -> Path:
    """`root/cifar-100-python/` with train and test (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = balanced_labels(per_class, 100, rng)
        _dump_cifar(folder / name, class_images(labels, (32, 32), rng, 100),
                    {b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()})
    return Path(root)


def _dump_cifar(path: Path, images: np.ndarray, labels: dict) -> None:
    # CIFAR rows are the red plane, then green, then blue, each 32x32 row-major.
    payload = {b"batch_label": path.name.encode(), b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
               b"filenames": [f"{i}.png".encode() for i in range(len(images))], **labels}
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)


def write_svhn(root: Path, per_class_train: int = 5, per_class_test: int = 2, seed: int = 0) -> Path:
    """`root/train_32x32.mat` and `root/test_32x32.mat`: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = balanced_labels(per_class, 10, rng)
        images = class_images(labels, (32, 32), rng, 10)
        y = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        savemat(root / f"{name}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})
    return root


def write_image_folders(root: Path, num_classes: int = 3, per_class_train: int = 8, per_class_val: int = 2,
                        size_range: tuple[int, int] = (24, 48), seed: int = 0) -> Path:
    """`root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG` with real JPEGs of varied shapes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        for c in range(num_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(size_range[0], size_range[1] + 1, size=2)
                pixels = class_images(np.array([c]), (int(h), int(w)), rng, num_classes)[0]
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
    return root


def break_jpeg(path: Path) -> Path:
    """Overwrite `path` with the first bytes of a real JPEG followed by garbage: a header that
    parses and data that does not, like a download cut short and padded."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:20] + b"\x00garbage, not JPEG entropy-coded data" * 4)
    return Path(path)


# (suffix, Pillow mode) pairs a folder of one's own may mix: every format read, in several colour modes.
MIXED_FORMATS = (("jpg", "RGB"), ("png", "RGBA"), ("webp", "RGB"), ("bmp", "L"), ("tif", "CMYK"), ("jpeg", "L"),
                 ("png", "P"), ("tiff", "RGB"), ("webp", "RGBA"), ("jpg", "CMYK"))


def write_class_folders(root: Path, classes: tuple = ("cat", "dog", "fox"), per_class: int = 8,
                        size_range: tuple[int, int] = (20, 40), seed: int = 0) -> Path:
    """`root/<class>/img<i>.<ext>`: images of varied sizes cycling through MIXED_FORMATS, each class
    a colour of its own (class c's mean grey level grows with c)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            suffix, mode = MIXED_FORMATS[(i + c) % len(MIXED_FORMATS)]
            h, w = rng.integers(size_range[0], size_range[1] + 1, size=2)
            pixels = class_images(np.array([c]), (int(h), int(w)), rng, len(classes))[0]
            Image.fromarray(pixels).convert(mode).save(folder / f"img{i}.{suffix}")
    return root


def write_unlabeled_folder(root: Path, count: int = 6, seed: int = 1) -> Path:
    """Images without labels in nested folders of any depth, in mixed formats."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        suffix, mode = MIXED_FORMATS[i % len(MIXED_FORMATS)]
        pixels = class_images(np.array([i % 3]), (24 + i, 30), rng, 3)[0]
        Image.fromarray(pixels).convert(mode).save(folder / f"u{i}.{suffix}")
    return root


def damage_png(path: Path, size: tuple[int, int] = (20, 30)) -> Path:
    """A PNG whose header is intact (it opens) and whose compressed pixels are not (it does not decode)."""
    from PIL import Image

    Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(path)
    data = bytearray(Path(path).read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 8] = b"\xff" * 8
    Path(path).write_bytes(bytes(data))
    return Path(path)
