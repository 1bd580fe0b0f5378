"""The DALI ImageNet-folder pipeline on the CPU (device_id=None): what comes out, per-rank shards,
exact resume, and what a broken JPEG does."""
import time

import numpy as np
import pytest
import torch

from fake_datasets import break_jpeg, write_image_folders
from mgssl.pipelines import DataConfig, build_data
from mgssl.pipelines.dali import CROP_TRIES, MEAN, STD, CorruptImageError, Transform, augmentation_numbers, \
    random_area_window
from mgssl.pipelines.folders import load_image_folders

pytest.importorskip("nvidia.dali")

NUM_CLASSES = 3
SIZE = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_image_folders(tmp_path_factory.mktemp("imagenet"), num_classes=NUM_CLASSES, per_class_train=8,
                               per_class_val=3)


def config(root, **overrides) -> DataConfig:
    base = dict(name="imagenet", root=str(root), labels=0.25, batch_size=4, eval_batch_size=4, image_size=SIZE,
                resize_size=20, workers=1)
    return DataConfig(**{**base, **overrides})


def grey_level(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean pixel value in 0..255, undoing the normalisation."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).mean(dim=(1, 2, 3))


def expected_grey(labels: torch.Tensor) -> torch.Tensor:
    return 40 + 180 * labels.float() / (NUM_CLASSES - 1)  # as fake_datasets.class_images paints them


@pytest.mark.parametrize("augment", ["paper", "authors"])
def test_training_batches_have_the_right_shape_type_range_and_labels(folders, augment):
    data = build_data(config(folders, augment=augment), seed=0, device="cpu")
    assert (data.num_classes, data.in_channels) == (NUM_CLASSES, 3)
    for _ in range(3):
        x_l, y_l, x_u = next(data.train)
        for x in (x_l, x_u):
            assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last)
            pixels = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
            assert pixels.min() > -1 and pixels.max() < 256  # normalised 0..255 images, nothing else
        assert y_l.dtype == torch.int64 and set(y_l.tolist()) <= set(range(NUM_CLASSES))
        assert torch.allclose(grey_level(x_l), expected_grey(y_l), atol=12)  # each label is its image's class


def test_evaluation_sees_every_validation_image_once_centre_cropped(folders):
    data = build_data(config(folders, eval_batch_size=4), seed=0, device="cpu")
    batches = list(data.eval_batches("test"))
    labels = torch.cat([y for _, y in batches])
    assert [len(y) for _, y in batches] == [4, 4, 1]  # 9 images, the padded last batch trimmed
    assert sorted(labels.tolist()) == sorted(load_image_folders(str(folders)).test_labels.tolist())
    images = torch.cat([x for x, _ in batches])
    assert torch.allclose(grey_level(images), expected_grey(labels), atol=12)
    again = torch.cat([x for x, _ in data.eval_batches("test")])
    assert torch.equal(images, again)  # no randomness in evaluation


def test_evaluations_reuse_one_pipeline_per_subset_and_see_the_same_images(folders):
    data = build_data(config(folders, eval_batch_size=4, validation=0.25), seed=0, device="cpu")
    first = [torch.cat([x for x, _ in data.eval_batches(subset)]) for subset in ("test", "validation")]
    for _ in range(4):  # later evaluations, each one epoch of the kept pipelines
        for subset, images in zip(("test", "validation"), first):
            assert torch.equal(torch.cat([x for x, _ in data.eval_batches(subset)]), images), subset
    assert {s: e.builds for s, e in data.evaluations.items()} == {"test": 1, "validation": 1}
    batches = data.eval_batches("test")
    next(batches)
    batches.close()  # an evaluation left before its end: the next one starts from the first file again
    assert torch.equal(torch.cat([x for x, _ in data.eval_batches("test")]), first[0])
    assert data.evaluations["test"].builds == 2


def test_an_evaluation_after_a_broken_jpeg_builds_without_it_and_keeps_that_pipeline(tmp_path):
    root = write_image_folders(tmp_path / "data", num_classes=2, per_class_train=4, per_class_val=3)
    break_jpeg(root / "val" / "n00000001" / "n00000001_0.JPEG")
    data = build_data(config(root, labels=0.5, eval_batch_size=2), seed=0, device="cpu")
    with pytest.warns(RuntimeWarning, match="n00000001_0.JPEG"):
        list(data.eval_batches("test"))
    for _ in range(3):
        assert sorted(torch.cat([y for _, y in data.eval_batches("test")]).tolist()) == [0, 0, 0, 1, 1]
    builds = data.evaluations["test"].builds
    assert builds <= 3  # the one that met the file, the one after it, the one kept from then on
    list(data.eval_batches("test"))
    assert data.evaluations["test"].builds == builds


def test_the_random_numbers_of_the_augmentation_move_the_crop_and_flip(folders):
    files = load_image_folders(str(folders))
    from mgssl.pipelines.dali import build_pipeline, to_torch

    one = [files.train_files[0]] * 4
    numbers = np.array([[0.9, 0.0, 0.0], [0.1, 0.0, 0.0], [0.9, 1.0, 1.0], [0.9, 0.0, 0.0]],
                       dtype=np.float32)  # flip draw, x, y
    pipe = build_pipeline(one, [0] * 4, Transform("paper", SIZE, 20), batch_size=4, numbers=lambda it: numbers,
                          num_threads=1)
    x, _ = to_torch(*pipe.run(), torch.device("cpu"))
    assert torch.equal(x[0], x[3])  # same numbers, same image
    assert torch.equal(x[1], x[0].flip(-1))  # the flip draw mirrors the same crop
    assert not torch.equal(x[2], x[0])  # the other corner


def test_two_ranks_get_disjoint_halves_of_each_global_batch(folders):
    cfg = config(folders, batch_size=8, unlabeled="all")
    whole = build_data(cfg, seed=3, device="cpu")
    ranks = [build_data(cfg, seed=3, device="cpu", rank=r, world_size=2) for r in range(2)]
    for step in range(5):  # 24 unlabeled images, 8 a step: crosses an epoch
        expected = whole.train.unlabeled.index.batch_indices(step, 0)
        got = [r.train.unlabeled.index.batch_indices(step, r.rank) for r in ranks]
        assert not set(got[0].tolist()) & set(got[1].tolist())
        assert torch.equal(torch.cat(got), expected)
        _, y, _ = next(whole.train)
        _, y0, u0 = next(ranks[0].train)
        _, y1, u1 = next(ranks[1].train)
        assert u0.shape[0] == u1.shape[0] == 4
        assert torch.equal(torch.cat([y0, y1]), y)  # the reader's shard_id slice is the rank's share
    # the images themselves: rank r reads its share of the same global order
    files = [[r.train.unlabeled.batch_files(b) for b in range(5)] for r in ranks]
    assert files[0] != files[1]
    evals = [torch.cat([y for _, y in r.eval_batches("test")]) for r in ranks]
    assert len(evals[0]) + len(evals[1]) == 9


@pytest.mark.parametrize("augment", ["paper", "authors"])
def test_a_restored_stream_continues_with_the_same_images_and_crops(folders, augment):
    cfg = config(folders, augment=augment)
    reference = build_data(cfg, seed=1, device="cpu")
    batches = [next(reference.train) for _ in range(9)]  # 6 labeled, 18 unlabeled: 6 and 2 epochs
    for stop in (1, 4, 5):  # inside an epoch of both streams, just after and just before a boundary
        first = build_data(cfg, seed=1, device="cpu")
        for _ in range(stop):
            next(first.train)
        resumed = build_data(cfg, seed=1, device="cpu")
        resumed.train.load_state_dict(first.train.state_dict())
        for expected in batches[stop:]:
            got = next(resumed.train)
            for a, b in zip(got, expected):
                assert torch.equal(a, b), stop
    assert resumed.train.unlabeled_epoch == pytest.approx(9 * 4 / resumed.unlabeled_size)


def test_a_stream_builds_one_pipeline_for_the_whole_run(folders):
    data = build_data(config(folders), seed=2, device="cpu")
    for _ in range(30):  # 20 epochs of the labeled set, 6.7 of the unlabeled
        next(data.train)
    assert data.train.labeled.epoch == 20 and data.train.unlabeled.epoch > 6
    assert (data.train.labeled.builds, data.train.unlabeled.builds) == (1, 1)
    data.train.load_state_dict(data.train.state_dict())  # a resume starts one new pipeline per stream
    next(data.train)
    assert (data.train.labeled.builds, data.train.unlabeled.builds) == (2, 2)


def test_each_rank_reads_only_its_own_files(folders, monkeypatch):
    from collections import Counter

    import mgssl.pipelines.dali as dali

    reads = []
    real = dali.read_encoded
    # slow reads, so that some are in flight when the streams close
    monkeypatch.setattr(dali, "read_encoded", lambda path: time.sleep(0.01) or reads.append(path) or real(path))
    cfg = config(folders, batch_size=8, labels=0.5, unlabeled="all")
    rank = build_data(cfg, seed=4, device="cpu", rank=1, world_size=2)
    for _ in range(6):
        next(rank.train)
    for stream in (rank.train.labeled, rank.train.unlabeled):
        stream._close()  # waits for the reads in flight: the reads made so far are all there are
    local = 4
    assert len(reads) % local == 0
    wanted = Counter()
    for stream in (rank.train.labeled, rank.train.unlabeled):
        submitted = 6 + dali.PREFETCH + stream.read_ahead + 1  # batches the reader was asked for, at most
        for b in range(submitted):
            wanted.update(stream.batch_files(b))
    assert not Counter(reads) - wanted  # nothing outside rank 1's share of those batches
    assert len(reads) <= 2 * (6 + dali.PREFETCH + rank.train.labeled.read_ahead + 1) * local  # not 2 ranks' worth


def reference_window(u: np.ndarray, height: float, width: float):
    """The first of the candidate crops that fits, else the whole image, written plainly."""
    k = CROP_TRIES
    for area_u, aspect_u in zip(u[3:3 + k], u[3 + k:3 + 2 * k]):
        area = 0.1 + 0.9 * area_u
        aspect = np.exp(np.log(0.8) + (np.log(1.25) - np.log(0.8)) * aspect_u)
        wf, hf = np.sqrt(area * aspect * height / width), np.sqrt(area * width / (aspect * height))
        if wf <= 1 and hf <= 1:
            return ((1 - wf) * u[1], (1 - hf) * u[2]), (wf, hf)
    return (0.0, 0.0), (1.0, 1.0)


def test_the_random_area_crop_takes_the_first_candidate_that_fits():
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(0)
    numbers = rng.random((64, 3 + 2 * CROP_TRIES), dtype=np.float32)
    numbers[:8, 3:] = 0.999  # full area at an aspect that fits no image below: the whole-image fallback
    sizes = np.stack([rng.integers(20, 400, 64), rng.integers(20, 400, 64)], 1).astype(np.float32)  # (H, W)

    @pipeline_def
    def windows():
        u = fn.external_source(source=lambda: list(numbers), batch=True, dtype=types.FLOAT, ndim=1)
        hw = fn.external_source(source=lambda: list(sizes), batch=True, dtype=types.FLOAT, ndim=1)
        return random_area_window(u, hw[0], hw[1])

    pipe = windows(batch_size=64, num_threads=1, device_id=None)
    pipe.build()
    anchors, shapes = (np.array(out.as_tensor()) for out in pipe.run())
    for i in range(64):
        anchor, shape = reference_window(numbers[i], *sizes[i])
        assert np.allclose(anchors[i], anchor, atol=1e-5) and np.allclose(shapes[i], shape, atol=1e-5), i
    assert np.allclose(shapes[:8], 1.0)
    assert (shapes[8:] < 1).any(axis=1).mean() > 0.5  # mostly real crops: only elongated images fall back


def test_augmentation_numbers_depend_only_on_their_key():
    a = augmentation_numbers(0, 2, 1, 17, 4, 5)
    assert np.array_equal(a, augmentation_numbers(0, 2, 1, 17, 4, 5))
    assert not np.array_equal(a, augmentation_numbers(0, 2, 0, 17, 4, 5))  # ranks draw differently
    assert not np.array_equal(a, augmentation_numbers(0, 2, 1, 18, 4, 5))
    assert a.min() >= 0 and a.max() < 1


def test_a_broken_jpeg_is_skipped_by_name_and_noted_in_the_run_folder(tmp_path):
    root = write_image_folders(tmp_path / "data", num_classes=2, per_class_train=4, per_class_val=2)
    broken = break_jpeg(root / "train" / "n00000001" / "n00000001_2.JPEG")
    cfg = config(root, labels=0.5, batch_size=2, unlabeled="all", on_corrupt="skip")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = build_data(cfg, seed=0, device="cpu", run_dir=run_dir)
    with pytest.warns(RuntimeWarning, match="n00000001_2.JPEG"):
        seen = [next(data.train) for _ in range(8)]  # two passes over the 8 unlabeled images
    assert all(x_u.shape == (2, 3, SIZE, SIZE) and torch.isfinite(x_u).all() for _, _, x_u in seen)
    assert (run_dir / "corrupt_files.txt").read_text().split() == [str(broken)]
    state = data.train.state_dict()
    assert len(state["unlabeled"]["skipped"]) == 1
    resumed = build_data(cfg, seed=0, device="cpu")  # substitutes the same file without meeting it again
    resumed.train.load_state_dict(state)
    for _ in range(4):
        for got, want in zip(next(resumed.train), next(data.train)):
            assert torch.equal(got, want)


def test_a_broken_jpeg_stops_the_run_with_its_name_when_asked(tmp_path):
    root = write_image_folders(tmp_path / "data", num_classes=2, per_class_train=4, per_class_val=2)
    broken = break_jpeg(root / "val" / "n00000000" / "n00000000_1.JPEG")
    data = build_data(config(root, labels=0.5, on_corrupt="error"), seed=0, device="cpu")
    with pytest.raises(CorruptImageError, match=str(broken).replace(".", r"\.")):
        list(data.eval_batches("test"))


def test_evaluation_skips_a_broken_jpeg_and_counts_the_rest(tmp_path):
    root = write_image_folders(tmp_path / "data", num_classes=2, per_class_train=4, per_class_val=3)
    break_jpeg(root / "val" / "n00000001" / "n00000001_0.JPEG")
    data = build_data(config(root, labels=0.5, eval_batch_size=2), seed=0, device="cpu")
    with pytest.warns(RuntimeWarning, match="n00000001_0.JPEG"):
        labels = torch.cat([y for _, y in data.eval_batches("test")])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]


def test_image_folder_errors_name_the_path_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        load_image_folders(str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loose.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="loose.JPEG"):
        load_image_folders(str(tmp_path))
    root = write_image_folders(tmp_path / "ok", num_classes=2, per_class_train=2, per_class_val=1)
    (root / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        load_image_folders(str(root))


def test_the_labeled_cache_gives_the_same_batches_and_resumes_exactly(folders):
    plain = build_data(config(folders), seed=5, device="cpu")
    cached = build_data(config(folders, labeled_cache=True), seed=5, device="cpu")
    expected = [next(plain.train) for _ in range(8)]  # 6 labeled images, 4 a step: 5 labeled epochs
    for want in expected:
        for got, w in zip(next(cached.train), want):
            assert torch.equal(got, w)
    labeled = cached.train.labeled
    assert labeled._reader is None and labeled.builds == 1  # batches come from memory, not from files
    assert len(labeled.cache.images) == 6 and labeled.cache.nbytes == sum(
        im.shape[0] * im.shape[1] * 3 for im in labeled.cache.images.values())
    assert all(min(im.shape[:2]) == 20 for im in labeled.cache.images.values())  # shortest edge at resize_size
    resumed = build_data(config(folders, labeled_cache=True), seed=5, device="cpu")
    state = {"labeled": {"position": 3 * 4, "skipped": []}, "unlabeled": {"position": 3 * 4, "skipped": []}}
    resumed.train.load_state_dict(state)
    for want in expected[3:]:
        for got, w in zip(next(resumed.train), want):
            assert torch.equal(got, w)


def test_the_labeled_cache_skips_a_broken_jpeg_as_the_stream_does(tmp_path):
    root = write_image_folders(tmp_path / "data", num_classes=2, per_class_train=4, per_class_val=2)
    cfg = dict(labels=0.5, batch_size=2, unlabeled="all", on_corrupt="skip")
    labeled = build_data(config(root, **cfg), seed=0, device="cpu").split.labeled
    broken = break_jpeg(load_image_folders(str(root)).train_files[int(labeled[1])])
    plain = build_data(config(root, **cfg), seed=0, device="cpu")
    cached = build_data(config(root, labeled_cache=True, **cfg), seed=0, device="cpu")
    with pytest.warns(RuntimeWarning, match=broken.name):
        expected = [next(plain.train) for _ in range(6)]
    with pytest.warns(RuntimeWarning, match=broken.name):
        got = [next(cached.train) for _ in range(6)]
    for a, b in zip(got, expected):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert cached.train.state_dict()["labeled"]["skipped"] == plain.train.state_dict()["labeled"]["skipped"]


def test_the_labeled_cache_needs_the_paper_crop(folders):
    with pytest.raises(ValueError, match="data.augment=paper"):
        config(folders, labeled_cache=True, augment="authors")
