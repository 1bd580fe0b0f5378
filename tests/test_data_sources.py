"""Readers for the on-disk formats, on tiny files written in those exact formats."""
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from fake_datasets import write_cifar10, write_cifar100, write_svhn
from mgssl.pipelines import DataConfig, build_data
from mgssl.pipelines import download as dl
from mgssl.pipelines.sources import DataMissingError, load_cifar10_arrays, load_cifar100_arrays, load_svhn_arrays


def test_cifar10_pickles_read_back_pixel_for_pixel(tmp_path):
    root = write_cifar10(tmp_path, per_class_train=3, per_class_test=1)
    data = load_cifar10_arrays(str(root))
    assert data.train_images.shape == (30, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10, 32, 32, 3)
    assert np.bincount(data.train_labels).tolist() == [3] * 10
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = np.asarray(raw[b"data"][0]).reshape(3, 32, 32)  # planes R, G, B
    assert np.array_equal(data.train_images[0], first.transpose(1, 2, 0))
    assert data.train_labels[0] == raw[b"labels"][0]
    # the folder itself or its parent both work
    assert len(load_cifar10_arrays(str(root / "cifar-10-batches-py")).train_labels) == 30


def test_cifar100_uses_the_fine_labels(tmp_path):
    root = write_cifar100(tmp_path, per_class_train=2, per_class_test=1)
    data = load_cifar100_arrays(str(root))
    assert data.num_classes == 100 and data.train_images.shape == (200, 32, 32, 3)
    assert np.bincount(data.train_labels, minlength=100).tolist() == [2] * 100
    assert data.flip and data.pad == 4


def test_svhn_mat_files_map_label_10_to_the_digit_0(tmp_path):
    from scipy.io import loadmat

    root = write_svhn(tmp_path, per_class_train=4, per_class_test=2)
    data = load_svhn_arrays(str(root))
    raw = loadmat(root / "train_32x32.mat")
    assert data.train_images.shape == (40, 32, 32, 3)
    assert np.array_equal(data.train_images[5], raw["X"][:, :, :, 5])
    assert raw["y"].max() == 10 and data.train_labels.max() == 9
    assert np.array_equal(data.train_labels == 0, raw["y"].ravel() == 10)
    assert not data.flip  # mirrored house numbers are other digits


@pytest.mark.parametrize("reader, layout", [(load_cifar10_arrays, "cifar-10-batches-py"),
                                            (load_cifar100_arrays, "cifar-100-python"),
                                            (load_svhn_arrays, "train_32x32.mat")])
def test_a_missing_data_set_names_the_path_and_the_layout(tmp_path, reader, layout):
    with pytest.raises(DataMissingError, match=layout) as info:
        reader(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataMissingError, match="data.root is not set"):
        reader(None)


def test_malformed_files_are_named(tmp_path):
    root = write_cifar10(tmp_path / "c10", per_class_train=1, per_class_test=1)
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_text("<html>404 not found</html>")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10_arrays(str(root))
    root = write_cifar100(tmp_path / "c100", per_class_train=1, per_class_test=1)
    with open(root / "cifar-100-python" / "test", "wb") as f:  # a CIFAR-10 batch where CIFAR-100 belongs
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar100_arrays(str(root))
    root = write_svhn(tmp_path / "svhn", per_class_train=1, per_class_test=1)
    from scipy.io import savemat

    savemat(root / "test_32x32.mat", {"X": np.zeros((28, 28, 1, 3), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(ValueError, match="test_32x32.mat"):
        load_svhn_arrays(str(root))


def test_build_data_never_downloads_by_default_and_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(DataMissingError, match="data.download=true"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)), seed=0, device="cpu")


def _tarball(folder_name: str, files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{folder_name}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_opt_in_download_checks_the_md5_and_unpacks(tmp_path, monkeypatch):
    source = write_cifar10(tmp_path / "source", per_class_train=2, per_class_test=1) / "cifar-10-batches-py"
    archive = _tarball("cifar-10-batches-py", {p.name: p.read_bytes() for p in source.iterdir()})
    served = tmp_path / "served" / "cifar-10-python.tar.gz"
    served.parent.mkdir()
    served.write_bytes(archive)
    remote = dl.Remote(served.as_uri(), hashlib.md5(archive).hexdigest(), True, "cifar-10-batches-py/test_batch")
    monkeypatch.setitem(dl.REMOTES, "cifar10", (remote,))  # a local file:// copy: no network in tests
    root = tmp_path / "data"
    data = build_data(DataConfig(name="cifar10", root=str(root), labels=10, download=True), seed=0, device="cpu")
    assert data.num_classes == 10 and (root / "cifar-10-batches-py" / "data_batch_5").is_file()

    wrong = dl.Remote(served.as_uri(), "0" * 32, True, "cifar-10-batches-py/test_batch")
    monkeypatch.setitem(dl.REMOTES, "cifar10", (wrong,))
    with pytest.raises(ValueError, match="MD5"):
        dl.download("cifar10", str(tmp_path / "other"))


def test_labeling_every_image_with_a_disjoint_unlabeled_set_is_refused(tmp_path):
    root = write_cifar10(tmp_path, per_class_train=1, per_class_test=1)
    with pytest.raises(ValueError, match="data.unlabeled=all"):
        build_data(DataConfig(name="cifar10", root=str(root), labels=10), seed=0, device="cpu")
    data = build_data(DataConfig(name="cifar10", root=str(root), labels=10, unlabeled="all"), seed=0, device="cpu")
    assert data.unlabeled_size == 10


class _RunsCode:
    """Unpickling this calls os.system: what a crafted 'data_batch_1' could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_cifar_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    root = write_cifar10(tmp_path / "c10", per_class_train=1, per_class_test=1)
    marker = tmp_path / "code-ran"
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": _RunsCode(marker)}, f,
                    protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2 asks to call (posix|os)\.system.*could run code") as err:
        load_cifar10_arrays(str(root))
    assert not marker.exists() and "\n" not in str(err.value)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickles_of_numpy_1_and_2_and_every_protocol_still_load(tmp_path, protocol):
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": images, b"labels": [np.int64(3), 4], b"batch_label": b"x"}, protocol=protocol)
    from mgssl.pipelines.pickles import load_data_pickle

    numpy1 = [raw.replace(b"numpy._core", b"numpy.core")] if protocol == 2 else []  # NumPy 1 wrote numpy.core
    for spelling in [raw] + numpy1:
        (tmp_path / "batch").write_bytes(spelling)
        batch = load_data_pickle(tmp_path / "batch")
        assert np.array_equal(batch[b"data"], images) and batch[b"labels"] == [3, 4]


def test_no_reader_of_the_project_can_run_code_from_a_file():
    import re
    from pathlib import Path

    unsafe = re.compile(r"pickle\.loads?\(|yaml\.(unsafe_)?load\(|allow_pickle=True|np\.load\(|"
                        r"torch\.load\((?![^)]*weights_only=True)|(?<!_Data)Unpickler\(")
    top = Path(__file__).resolve().parent.parent
    found = [f"{path.relative_to(top)}:{n}" for folder in ("train", "pipelines", "tools", "model")
             for path in sorted((top / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if unsafe.search(line)]
    assert not found, found


@pytest.mark.parametrize("pixels, fits", [(np.float64(300.0), False), (np.float32(0.5), False),
                                          (np.int16(-1), False), (np.float64(np.nan), False),
                                          (np.float64(200.0), True), (np.int32(255), True)])
def test_pixels_stored_wider_than_uint8_are_kept_only_if_they_fit(tmp_path, pixels, fits):
    from scipy.io import savemat

    root = write_svhn(tmp_path / "svhn", per_class_train=1, per_class_test=1)
    x = np.full((32, 32, 3, 10), 7, dtype=pixels.dtype)
    x[0, 0, 0, 3] = pixels
    savemat(root / "train_32x32.mat", {"X": x, "y": np.arange(1, 11)[:, None]})
    if fits:
        assert load_svhn_arrays(str(root)).train_images[3, 0, 0, 0] == int(pixels)
    else:
        with pytest.raises(ValueError, match=r"train_32x32\.mat: X holds .* pixels .*not whole numbers 0\.\.255"):
            load_svhn_arrays(str(root))
    root = write_cifar10(tmp_path / "c10", per_class_train=1, per_class_test=1)  # the same rule for CIFAR
    rows = np.full((2, 3072), 7, dtype=pixels.dtype)
    rows[1, 5] = pixels
    with open(root / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [0, 1]}, f)
    if fits:
        load_cifar10_arrays(str(root))
    else:
        with pytest.raises(ValueError, match="data_batch_4: 'data' holds"):
            load_cifar10_arrays(str(root))


def test_a_val_folder_lacking_classes_of_train_is_refused_naming_them(tmp_path):
    import shutil

    from fake_datasets import write_image_folders
    from mgssl.pipelines.folders import load_image_folders

    root = write_image_folders(tmp_path, num_classes=4, per_class_train=1, per_class_val=1, size_range=(8, 8))
    assert load_image_folders(str(root)).num_classes == 4
    shutil.rmtree(root / "val" / "n00000001")  # a class folder missing
    for image in (root / "val" / "n00000003").iterdir():  # and one present but empty
        image.unlink()
    with pytest.raises(ValueError, match=r"val has no images of 2 class\(es\) of train/: n00000001, n00000003;"):
        load_image_folders(str(root))
    for image in (root / "train" / "n00000002").iterdir():  # an empty train class is named as before
        image.unlink()
    with pytest.raises(ValueError, match=r"class folders without images under .*train: n00000002;"):
        load_image_folders(str(root))
