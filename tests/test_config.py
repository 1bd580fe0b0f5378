"""Experiment files, `--set` overrides and the errors a mistyped key gets."""
import math

import pytest
import torch
import yaml

from mgssl.pipelines import check_global_batch
from mgssl.train.config import (CONFIG_DIR, Config, from_dict, load_config, parse_override, read_yaml,
                          resolve_config_path, to_dict)
from mgssl.train.engine import plan

# What each data set gives the network: (classes, input channels, training images).
DATASET_SHAPES = {"digits": (10, 1, 1262), "svhn": (10, 3, 73257), "cifar10": (10, 3, 50000),
                  "cifar100": (100, 3, 50000), "imagenet": (1000, 3, 1281167),
                  "folder": (5, 3, 60)}  # a folder of your own: any class and image count

EXPERIMENTS = sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.glob("*.yaml"))
TABLE4_ROWS = {
    "row1": ["method.meta=false", "method.mixup=false"],
    "row2": ["method.mixup=false"],
    "row3": ["method.meta=false"],
    "row4": [],
    "labeled_only": ["method.unlabeled=false", "method.meta=false", "method.mixup=false"],
}


def test_every_paper_experiment_has_a_config():
    expected = {"digits", "convlarge_svhn_1k", "convlarge_cifar10_4k", "convlarge_cifar100_10k",
                "shakeshake26_cifar10_1k", "shakeshake26_cifar10_2k", "shakeshake26_cifar10_4k",
                "shakeshake26_cifar100_6k", "shakeshake26_cifar100_8k", "shakeshake26_cifar100_10k",
                "resnet18_imagenet_10pct"}
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_loads_and_builds_its_model(name):
    cfg = load_config(name)
    classes, channels, _ = DATASET_SHAPES[cfg.data.name]
    net = cfg.model.build(classes, channels)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == classes
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == channels
    # Round trip: the resolved config written into a run folder reads back to the same config.
    assert from_dict(Config, yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_base_files_load_on_their_own():
    for path in (CONFIG_DIR / "base").glob("*.yaml"):
        from_dict(Config, read_yaml(path))


def test_the_imagenet_network_runs_one_tiny_batch():
    cfg = load_config("resnet18_imagenet_10pct")
    net = cfg.model.build(1000, 3).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)).shape == (1, 1000)


@pytest.mark.parametrize("row", sorted(TABLE4_ROWS))
def test_table4_rows_are_valid_overrides(row):
    cfg = load_config("convlarge_cifar10_4k", tuple(TABLE4_ROWS[row]))
    assert (cfg.method.meta, cfg.method.mixup) == {"row1": (False, False), "row2": (True, False),
                                                  "row3": (False, True), "row4": (True, True),
                                                  "labeled_only": (False, False)}[row]
    assert cfg.method.unlabeled == (row != "labeled_only")


def test_paper_settings_of_appendix_c():
    svhn, cifar = load_config("convlarge_svhn_1k"), load_config("shakeshake26_cifar100_8k")
    for cfg in (svhn, cifar):
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.schedule) == (0.1, 0.9, "step")
        assert cfg.optim.milestones == [300_000, 350_000] and cfg.train.steps == 400_000
        assert cfg.data.batch_size == 128 and cfg.train.eval_every == 400
    assert (svhn.optim.weight_decay, svhn.method.mixup_gamma, svhn.data.name) == (5e-5, 0.1, "svhn")
    assert (cifar.optim.weight_decay, cifar.method.mixup_gamma, cifar.data.labels) == (1e-4, 1.0, 8000)


def test_imagenet_600_epochs_is_about_1_35m_steps_with_5_warmup_epochs():
    cfg = load_config("resnet18_imagenet_10pct")
    assert (cfg.data.labels, cfg.data.batch_size, cfg.optim.schedule) == (0.1, 512, "cosine")
    train_images = DATASET_SHAPES["imagenet"][2]
    unlabeled = train_images - round(0.1 * train_images)
    run = plan(cfg, unlabeled)
    assert run.total_steps == math.ceil(600 * unlabeled / 512)
    assert 1.34e6 < run.total_steps < 1.36e6
    assert run.warmup_steps == round(5 * unlabeled / 512)


def test_precedence_command_line_over_yaml_over_defaults(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.3\n  momentum: 0.5\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.2\n")
    cfg = load_config(str(tmp_path / "top.yaml"), ("optim.momentum=0.7", "train.steps=12"))
    assert cfg.optim.lr == 0.2  # the file beats its base
    assert cfg.optim.momentum == 0.7  # the command line beats both
    assert cfg.train.steps == 12 and cfg.optim.weight_decay == Config().optim.weight_decay  # defaults fill in


def test_override_values_are_parsed_as_yaml():
    assert parse_override("optim.milestones=[10, 20]") == {"optim": {"milestones": [10, 20]}}
    cfg = load_config("digits", ("train.steps=null", "train.epochs=2.5", "data.root=/some/where"))
    assert cfg.train.steps is None and cfg.train.epochs == 2.5 and cfg.data.root == "/some/where"


@pytest.mark.parametrize("override, suggestion", [("train.step=5", "train.steps"),
                                                  ("optim.weight_decy=1e-4", "optim.weight_decay"),
                                                  ("methd.meta=false", "method")])
def test_unknown_keys_name_the_closest_valid_one(override, suggestion):
    with pytest.raises(KeyError) as err:
        load_config("digits", (override,))
    assert f"did you mean {suggestion!r}" in err.value.args[0]


def test_an_unknown_key_in_a_yaml_file_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  eval_evry: 10\n")
    with pytest.raises(KeyError, match="train.eval_every"):
        load_config(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("override, fragment", [("train.steps=abc", "expected int"),
                                                ("train.precision=fp8", "choose one of"),
                                                ("method.meta_precision=bf16", "choose one of"),
                                                ("method.unlabeled=false", "method.meta=false"),
                                                ("optim=3", "expected a mapping")])
def test_bad_values_are_errors_that_say_what_is_allowed(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_config("digits", (override,))


def test_a_mistyped_config_name_suggests_the_known_ones():
    with pytest.raises(FileNotFoundError, match="convlarge_cifar10_4k"):
        resolve_config_path("convlarge_cifar10_4")


def test_including_files_in_a_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loop"):
        read_yaml(tmp_path / "a.yaml")


def test_global_batches_must_divide_over_the_processes():
    cfg = load_config("resnet18_imagenet_10pct")
    for gpus in (1, 2, 4, 8, 16, 64):
        check_global_batch(cfg.data, gpus)  # 512 and 1024 split evenly: the same experiment on any of these
    with pytest.raises(ValueError, match="GLOBAL batch.*divisible by 3"):
        check_global_batch(cfg.data, 3)


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    # YAML 1.1 reads `1e-3` (no dot, unsigned exponent) as a string; the config reads it as the number.
    (tmp_path / "sci.yaml").write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-5\n")
    cfg = load_config(str(tmp_path / "sci.yaml"), ("method.eps=1e-2", "train.steps=4e3", "data.labels=1e-1",
                                                   "optim.milestones=[1e3, 2e3]"))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.method.eps) == (1e-3, 5e-5, 1e-2)
    assert cfg.train.steps == 4000 and type(cfg.train.steps) is int
    assert cfg.data.labels == 0.1 and cfg.optim.milestones == [1000, 2000]
    assert load_config("digits", ("data.root=1e3",)).data.root == "1e3"  # a text key keeps the text
    with pytest.raises(ValueError, match="train.steps: expected int"):
        load_config("digits", ("train.steps=1e-3",))


@pytest.mark.parametrize("override, key", [("train.steps=0", "train.steps"), ("train.steps=-5", "train.steps"),
                                           ("train.epochs=-1", "train.epochs"), ("train.epochs=0", "train.epochs"),
                                           ("optim.lr=0", "optim.lr"), ("optim.lr=-0.1", "optim.lr"),
                                           ("optim.warmup_steps=-1", "optim.warmup_steps"),
                                           ("optim.warmup_epochs=-0.5", "optim.warmup_epochs"),
                                           ("method.consistency_rampup=-10", "method.consistency_rampup"),
                                           ("seed=-1", "seed"), ("seed=4294967296", "seed")])
def test_values_that_cannot_make_a_run_are_refused_by_key(override, key):
    overrides = (override, "train.steps=null") if override.startswith("train.epochs") else (override,)
    with pytest.raises(ValueError, match=rf"^{key}=-?\d") as err:
        load_config("digits", overrides)
    assert "\n" not in str(err.value)


def test_zero_warm_up_and_ramp_up_and_the_largest_seed_are_accepted():
    cfg = load_config("digits", ("optim.warmup_steps=0", "method.consistency_rampup=0", f"seed={2**32 - 1}"))
    assert (cfg.optim.warmup_steps, cfg.method.consistency_rampup, cfg.seed) == (0, 0, 2**32 - 1)


def test_only_the_training_batch_must_divide_over_the_processes_as_the_docs_say():
    import re

    from mgssl.pipelines.memory import InMemoryData
    from mgssl.pipelines.sources import load_digits_arrays
    from mgssl.pipelines.splits import balanced_split

    cfg = load_config("digits", ("data.eval_batch_size=500", "data.batch_size=30"))
    check_global_batch(cfg.data, 3)  # 500 over 3 processes is accepted ...
    arrays = load_digits_arrays()
    split = balanced_split(arrays.train_labels, 10, 50, 0, "digits")
    seen = 0
    for rank in range(3):  # ... each evaluates 166 at a time, and together they see every test image once
        data = InMemoryData(arrays, split, include_labeled=False, global_batch=30, eval_batch=500, seed=0,
                            device="cpu", rank=rank, world_size=3)
        sizes = [len(y) for _, y in data.eval_batches("test")]
        assert max(sizes) == 166
        seen += sum(sizes)
    assert seen == len(arrays.test_labels)
    root = CONFIG_DIR.parent
    for doc in (root / "README.md", CONFIG_DIR / "README.md"):
        sentences = re.split(r"[.;]\s", " ".join(doc.read_text().split()))
        refusals = [s for s in sentences if "refused" in s and "divide" in s]
        assert refusals and all("data.batch_size" in s and "eval_batch_size" not in s for s in refusals), doc
