"""Index streams and in-memory paired batches: coverage per epoch, per-rank shards, exact resume,
and the augmentation done on the device."""
import pytest
import torch

from fake_datasets import write_cifar10, write_svhn
from mgssl.pipelines import DataConfig, build_data
from mgssl.pipelines.augment import normalize, random_crop_flip
from mgssl.pipelines.streams import IndexStream


def test_each_epoch_is_a_permutation_even_when_batches_straddle_epochs():
    stream = IndexStream(size=10, seed=3, global_batch=4)
    drawn = torch.cat([stream.next_batch() for _ in range(5)])  # 20 items = two epochs
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))
    assert not torch.equal(drawn[:10], drawn[10:])  # a new shuffle each epoch
    assert stream.epoch == 2.0


def test_ranks_split_each_global_batch_without_overlap():
    single = IndexStream(size=12, seed=5, global_batch=6)
    ranks = [IndexStream(size=12, seed=5, global_batch=6, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat(parts), single.next_batch())
        assert len(set(torch.cat(parts).tolist())) == 6


def test_a_restored_stream_continues_identically():
    a = IndexStream(size=7, seed=1, global_batch=3)
    for _ in range(5):
        a.next_batch()
    b = IndexStream(size=7, seed=1, global_batch=3)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        assert torch.equal(a.next_batch(), b.next_batch())
    with pytest.raises(ValueError, match="data.batch_size"):
        b.load_state_dict({"position": 4})


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_class_train=5, per_class_test=1)


def test_the_unlabeled_stream_covers_the_whole_unlabeled_set_each_epoch(cifar):
    data = build_data(DataConfig(name="cifar10", root=str(cifar), labels=10, batch_size=8), seed=0, device="cpu")
    assert data.unlabeled_size == 40
    unlabeled = data.train.unlabeled_idx
    seen = torch.cat([unlabeled[data.train.unlabeled.next_batch()] for _ in range(5)])  # 40 = one epoch
    assert sorted(seen.tolist()) == sorted(unlabeled.tolist())
    assert not set(seen.tolist()) & set(data.split.labeled.tolist())  # disjoint by default


def test_in_memory_batches_resume_exactly(cifar):
    cfg = DataConfig(name="cifar10", root=str(cifar), labels=20, batch_size=8)
    reference = build_data(cfg, seed=2, device="cpu")
    batches = [next(reference.train) for _ in range(9)]
    first = build_data(cfg, seed=2, device="cpu")
    for _ in range(4):
        next(first.train)
    resumed = build_data(cfg, seed=2, device="cpu")
    resumed.train.load_state_dict(first.train.state_dict())
    for expected in batches[4:]:
        for got, want in zip(next(resumed.train), expected):
            assert torch.equal(got, want)
    x_l, y_l, x_u = batches[0]
    assert x_l.shape == x_u.shape == (8, 3, 32, 32) and x_l.is_contiguous(memory_format=torch.channels_last)
    assert y_l.dtype == torch.int64


def test_two_ranks_of_the_in_memory_stream_see_disjoint_labeled_shards(cifar):
    cfg = DataConfig(name="cifar10", root=str(cifar), labels=20, batch_size=8)
    ranks = [build_data(cfg, seed=0, device="cpu", rank=r, world_size=2) for r in range(2)]
    for _ in range(2):  # 20 labeled, 8 a step: within the first epoch
        idx = [r.train.labeled_idx[r.train.labeled.next_batch()] for r in ranks]
        assert len(idx[0]) == len(idx[1]) == 4 and not set(idx[0].tolist()) & set(idx[1].tolist())
    evaluated = [torch.cat([y for _, y in r.eval_batches("test")]) for r in ranks]
    assert len(evaluated[0]) + len(evaluated[1]) == 10


def test_crop_keeps_pixels_and_flip_only_mirrors():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 8, 8, 3), dtype=torch.uint8)
    shifted = random_crop_flip(images, pad=2, flip=False, gen=gen)
    for src, out in zip(images, shifted):
        inner = out[2:-2, 2:-2]  # always inside the image whatever the shift
        found = any(torch.equal(inner, src[y:y + 4, x:x + 4]) for y in range(5) for x in range(5))
        assert found
    flipped = random_crop_flip(images, pad=0, flip=True, gen=gen)
    same = [torch.equal(a, b) for a, b in zip(images, flipped)]
    mirrored = [torch.equal(a.flip(1), b) for a, b in zip(images, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54


def test_normalize_gives_channels_last_standard_scores():
    images = torch.full((2, 4, 4, 3), 51, dtype=torch.uint8)
    x = normalize(images, torch.tensor([0.2, 0.2, 0.2]), torch.tensor([0.5, 0.5, 0.5]))
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-6)


def test_svhn_batches_are_never_mirrored(tmp_path):
    root = write_svhn(tmp_path, per_class_train=2, per_class_test=1)
    data = build_data(DataConfig(name="svhn", root=str(root), labels=10, batch_size=10, unlabeled="all"), seed=0,
                      device="cpu")
    assert data.train.flip is False and data.train.pad == 4
    # with pad 0 the only change left would be a flip: none happens
    data.train.pad = 0
    x_l, y_l, _ = next(data.train)
    plain, _ = data.train_set.batch(data.train.labeled_idx[data.train.labeled.batch_indices(0, 0)])
    assert torch.equal(x_l, plain)
