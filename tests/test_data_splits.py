"""Labeled splits: balanced, seeded, saved, shared, the same on every rank and resume."""
import json

import numpy as np
import pytest

from fake_datasets import write_cifar10
from mgssl.pipelines import SPLIT_FILE, DataConfig, build_data, resolve_split
from mgssl.pipelines.splits import balanced_split, load_split


def labels_with_counts(counts, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)


# Class sizes of the real training sets: CIFAR-10 5,000 each, CIFAR-100 500 each, SVHN's train set
# unequal (the digit 1 is the most common), ImageNet 732-1,300 per class.
SVHN_COUNTS = [4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659]
IMAGENET_COUNTS = list(np.random.default_rng(1).integers(732, 1301, size=1000))


@pytest.mark.parametrize("counts, request_, expected_per_class", [
    ([5000] * 10, 1000, 100), ([5000] * 10, 2000, 200), ([5000] * 10, 4000, 400),
    ([500] * 100, 6000, 60), ([500] * 100, 8000, 80), ([500] * 100, 10000, 100),
    (SVHN_COUNTS, 1000, 100),
])
def test_paper_sizes_are_balanced_with_no_repeats(counts, request_, expected_per_class):
    labels = labels_with_counts(counts)
    split = balanced_split(labels, len(counts), request_, seed=0, dataset="x")
    assert len(split.labeled) == request_ == len(np.unique(split.labeled))
    assert np.bincount(labels[split.labeled], minlength=len(counts)).tolist() == [expected_per_class] * len(counts)


def test_imagenet_ten_percent_is_a_tenth_of_every_class():
    labels = labels_with_counts(IMAGENET_COUNTS)
    split = balanced_split(labels, 1000, 0.1, seed=0, dataset="imagenet")
    per_class = np.bincount(labels[split.labeled], minlength=1000)
    assert np.array_equal(per_class, np.round(np.array(IMAGENET_COUNTS) * 0.1))
    assert len(np.unique(split.labeled)) == len(split.labeled)


def test_the_seed_decides_the_split():
    labels = labels_with_counts([50] * 10)
    a, b = (balanced_split(labels, 10, 40, seed=s, dataset="x") for s in (0, 0))
    c = balanced_split(labels, 10, 40, seed=1, dataset="x")
    assert np.array_equal(a.labeled, b.labeled) and not np.array_equal(a.labeled, c.labeled)


@pytest.mark.parametrize("request_, message", [(1005, "multiple of 10"), (1000, "has only 90")])
def test_impossible_requests_say_what_is_possible(request_, message):
    labels = labels_with_counts([90] + [200] * 9)
    with pytest.raises(ValueError, match=message):
        balanced_split(labels, 10, request_, seed=0, dataset="x")


def test_disjoint_and_inclusive_unlabeled_sets():
    labels = labels_with_counts([20] * 5)
    split = balanced_split(labels, 5, 10, seed=0, dataset="x")
    disjoint = split.unlabeled(include_labeled=False)
    assert len(disjoint) == 90 and not set(disjoint) & set(split.labeled)
    assert np.array_equal(split.unlabeled(include_labeled=True), np.arange(100))


def test_a_saved_split_reloads_exactly_and_refuses_another_data_set(tmp_path):
    labels = labels_with_counts([30] * 10)
    split = balanced_split(labels, 10, 50, seed=4, dataset="cifar10")
    split.save(tmp_path / "s.json")
    again = load_split(tmp_path / "s.json", "cifar10", labels)
    assert np.array_equal(again.labeled, split.labeled) and again.seed == 4
    with pytest.raises(ValueError, match="'cifar10' with 300"):
        load_split(tmp_path / "s.json", "svhn", labels)
    with pytest.raises(ValueError, match="with 300 training images"):
        load_split(tmp_path / "s.json", "cifar10", labels[:200])
    payload = json.loads((tmp_path / "s.json").read_text())
    payload["labeled"][1] = payload["labeled"][0]
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="repeated"):
        load_split(tmp_path / "bad.json", "cifar10", labels)
    with pytest.raises(FileNotFoundError, match="data.split_file"):
        load_split(tmp_path / "missing.json", "cifar10", labels)


def test_every_rank_draws_the_same_split_and_another_run_shares_it_by_path(tmp_path):
    root = write_cifar10(tmp_path / "data", per_class_train=6, per_class_test=1)
    cfg = DataConfig(name="cifar10", root=str(root), labels=20, batch_size=4)
    run = tmp_path / "run"
    ranks = [build_data(cfg, seed=7, device="cpu", rank=r, world_size=2, run_dir=run) for r in range(2)]
    assert np.array_equal(ranks[0].split.labeled, ranks[1].split.labeled)
    assert not (run / SPLIT_FILE).exists()  # the run saves it once it starts, not the data
    ranks[0].split.save(run / SPLIT_FILE)
    saved = json.loads((run / SPLIT_FILE).read_text())
    assert saved["labeled"] == ranks[0].split.labeled.tolist() and saved["num_labeled"] == 20
    # A split found in the run folder is not taken: only data.split_file names one to reuse.
    assert not np.array_equal(build_data(cfg, seed=8, device="cpu", run_dir=run).split.labeled,
                              ranks[0].split.labeled)
    shared = DataConfig(name="cifar10", root=str(root), labels=20, split_file=str(run / SPLIT_FILE))
    other = build_data(shared, seed=9, device="cpu", run_dir=tmp_path / "other")
    assert np.array_equal(other.split.labeled, ranks[0].split.labeled)


def test_resolve_split_prefers_the_named_file(tmp_path):
    labels = labels_with_counts([10] * 10)
    named = balanced_split(labels, 10, 30, seed=1, dataset="cifar10")
    named.save(tmp_path / "named.json")
    balanced_split(labels, 10, 30, seed=2, dataset="cifar10").save(tmp_path / "run" / SPLIT_FILE)
    cfg = DataConfig(name="cifar10", labels=30, split_file=str(tmp_path / "named.json"))
    assert np.array_equal(resolve_split(cfg, labels, 10, 3).labeled, named.labeled)


def test_a_split_file_with_another_label_count_is_refused(tmp_path):
    labels = labels_with_counts([10] * 10)
    balanced_split(labels, 10, 30, seed=1, dataset="cifar10").save(tmp_path / "named.json")
    cfg = DataConfig(name="cifar10", labels=40, split_file=str(tmp_path / "named.json"))
    with pytest.raises(ValueError, match="holds 30 labeled images but data.labels=40"):
        resolve_split(cfg, labels, 10, 0)
