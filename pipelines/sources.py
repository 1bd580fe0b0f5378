"""Readers for the data sets users already have on disk, into uint8 arrays (N, H, W, C).

Nothing is downloaded: each reader says which path it looked at and what layout it expected."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mgssl.pipelines.pickles import UnsafePickleError, load_data_pickle


@dataclass
class ArrayDataset:
    name: str
    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    flip: bool  # whether a horizontal flip keeps the class (not for digits and house numbers)
    pad: int  # pixels of zero padding for the random-translation crop


class DataMissingError(FileNotFoundError):
    pass


def _need_root(name: str, root: Optional[str], layout: str) -> Path:
    if not root:
        raise DataMissingError(f"data.root is not set; point it at the folder that holds {layout} "
                               f"(e.g. --set data.root=/data/{name})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataMissingError(f"data.root={str(path)!r} is not a folder; it should hold {layout}")
    return path


def load_digits_arrays(root: Optional[str] = None) -> ArrayDataset:
    """scikit-learn's 1,797 8x8 digits: a fixed, class-stratified 30% held out as the test set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)  # the test set does not change with the run's seed
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: int(0.3 * (labels == c).sum())]
                           for c in range(10)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return ArrayDataset("digits", images[~is_test], labels[~is_test], images[is_test], labels[is_test],
                        10, flip=False, pad=1)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataMissingError(f"missing {path}")
    try:
        batch = load_data_pickle(path, "a CIFAR batch")
    except UnsafePickleError:
        raise
    except Exception as e:  # a truncated download, an HTML error page saved as the file...
        raise ValueError(f"{path} is not a CIFAR python pickle ({e}); download it again") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path} holds a {type(batch).__name__}, not the dict of a CIFAR python pickle")
    return batch


def _uint8_pixels(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """`x` as uint8, refusing values a cast would wrap or truncate (300 -> 44, 0.5 -> 0)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    fits = x.dtype.kind in "iuf" and x.size > 0
    if fits:
        fits = bool(np.isfinite(x).all()) and x.min() >= 0 and x.max() <= 255
    if fits and x.dtype.kind == "f":
        fits = bool((x == np.round(x)).all())
    if not fits:
        span = f" from {x.min()} to {x.max()}" if x.size and x.dtype.kind in "iuf" else ""
        raise ValueError(f"{path}: {key} holds {x.dtype} pixels{span}, not whole numbers 0..255; the published "
                         "files store uint8, so download the file again or convert it to 8-bit pixels")
    return x.astype(np.uint8)


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = batch.get(b"data")
    if data is None or np.asarray(data).ndim != 2 or np.asarray(data).shape[1] != 3072:
        raise ValueError(f"{path} has no (N, 3072) uint8 'data' entry; is it a CIFAR python pickle?")
    return _uint8_pixels(data, path, "'data'").reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)


def _cifar_labels(batch: dict, key: bytes, count: int, path: Path, num_classes: int) -> np.ndarray:
    labels = batch.get(key)
    if labels is None or len(labels) != count:
        raise ValueError(f"{path} has no {key.decode()!r} list of {count} labels; is it the right CIFAR pickle "
                         f"(CIFAR-10 has 'labels', CIFAR-100 'fine_labels')?")
    raw = np.asarray(labels)
    if raw.dtype.kind not in "iuf" or (raw.dtype.kind == "f" and not bool((raw == np.round(raw)).all())):
        raise ValueError(f"{path}: {key.decode()!r} holds {raw.dtype} values that are not whole class numbers; "
                         "the published files store integers, so download the file again")
    labels = raw.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{path} has labels outside 0..{num_classes - 1}; is it the right CIFAR pickle?")
    return labels


def load_cifar10_arrays(root: Optional[str]) -> ArrayDataset:
    layout = "cifar-10-batches-py/ (data_batch_1..5, test_batch), as unpacked from cifar-10-python.tar.gz"
    base = _need_root("cifar10", root, layout)
    folder = base / "cifar-10-batches-py" if (base / "cifar-10-batches-py").is_dir() else base
    try:
        train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
        test = _unpickle(folder / "test_batch")
    except DataMissingError as e:
        raise DataMissingError(f"{e}; data.root should hold {layout}") from None
    names = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    images = [_cifar_images(b, p) for b, p in zip(train + [test], names)]
    labels = [_cifar_labels(b, b"labels", len(x), p, 10) for b, x, p in zip(train + [test], images, names)]
    return ArrayDataset("cifar10", np.concatenate(images[:5]), np.concatenate(labels[:5]), images[5], labels[5],
                        10, flip=True, pad=4)


def load_cifar100_arrays(root: Optional[str]) -> ArrayDataset:
    layout = "cifar-100-python/ (train, test), as unpacked from cifar-100-python.tar.gz"
    base = _need_root("cifar100", root, layout)
    folder = base / "cifar-100-python" if (base / "cifar-100-python").is_dir() else base
    try:
        train, test = _unpickle(folder / "train"), _unpickle(folder / "test")
    except DataMissingError as e:
        raise DataMissingError(f"{e}; data.root should hold {layout}") from None
    x_train, x_test = _cifar_images(train, folder / "train"), _cifar_images(test, folder / "test")
    return ArrayDataset("cifar100", x_train, _cifar_labels(train, b"fine_labels", len(x_train), folder / "train", 100),
                        x_test, _cifar_labels(test, b"fine_labels", len(x_test), folder / "test", 100),
                        100, flip=True, pad=4)


def _svhn_mat(path: Path):
    from scipy.io import loadmat

    if not path.is_file():
        raise DataMissingError(f"missing {path}; data.root should hold train_32x32.mat and test_32x32.mat "
                               "from the SVHN cropped-digits page")
    try:
        mat = loadmat(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable MATLAB file ({e}); download it again") from e
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise ValueError(f"{path} lacks X (32, 32, 3, N) and y (N, 1); is it an SVHN *_32x32.mat file?")
    labels = y.reshape(-1).astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise ValueError(f"{path} has labels outside 1..10; SVHN writes the digits 1-9 as 1-9 and 0 as 10")
    labels %= 10  # SVHN writes the digit 0 as label 10
    return np.ascontiguousarray(_uint8_pixels(x, path, "X").transpose(3, 0, 1, 2)), labels


def load_svhn_arrays(root: Optional[str]) -> ArrayDataset:
    base = _need_root("svhn", root, "train_32x32.mat and test_32x32.mat")
    x_train, y_train = _svhn_mat(base / "train_32x32.mat")
    x_test, y_test = _svhn_mat(base / "test_32x32.mat")
    return ArrayDataset("svhn", x_train, y_train, x_test, y_test, 10, flip=False, pad=4)


ARRAY_READERS: dict[str, Callable[[Optional[str]], ArrayDataset]] = {
    "digits": load_digits_arrays,
    "cifar10": load_cifar10_arrays,
    "cifar100": load_cifar100_arrays,
    "svhn": load_svhn_arrays,
}
