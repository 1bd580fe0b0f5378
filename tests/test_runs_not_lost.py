"""No run is lost, or silently wrong, to a stray variable, seed, signal, renamed class or config slip:
each is refused in one line before the run folder is touched, or trains."""
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tool_runs import TINY, one_error_line
from fake_datasets import write_image_folders
from mgssl.pipelines import DataConfig, build_data
from mgssl.train.cli import main


# ---------------------------------------------------------------------------------------------
# The environment and the seed.


def test_a_stale_rank_without_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["digits", "--out", str(tmp_path / "run"), "--set", *TINY])
    one_error_line(capsys, code, 1, "RANK=1", "WORLD_SIZE=1", "unset RANK")
    assert not (tmp_path / "run").exists()


def test_a_world_size_that_is_not_a_number_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    code = main(["digits", "--out", str(tmp_path / "run"), "--set", *TINY])
    one_error_line(capsys, code, 1, "WORLD_SIZE='abc'", "not a whole number")
    assert not (tmp_path / "run").exists()


def test_the_largest_accepted_seed_trains(tmp_path):
    assert main(["digits", "--out", str(tmp_path), "--set", "seed=4294967295", *TINY]) == 0
    assert json.loads((tmp_path / "final.json").read_text())["seed"] == 2**32 - 1


# ---------------------------------------------------------------------------------------------
# A renamed class folder, a one-class folder.


def folder_data(root, split_file=None):
    cfg = DataConfig(name="imagenet", root=str(root), labels=3, batch_size=3, eval_batch_size=3, workers=1,
                     image_size=16, resize_size=16, split_file=split_file)
    return build_data(cfg, seed=0, device=torch.device("cpu"))


def test_a_class_folder_renamed_since_the_split_was_saved_is_refused(tmp_path):
    root = write_image_folders(tmp_path / "data", num_classes=3, per_class_train=4, per_class_val=1)
    saved = tmp_path / "labeled_split.json"
    folder_data(root).split.save(saved)
    for part in ("train", "val"):  # same image count, but the sorted class order, hence every label, changes
        os.rename(root / part / "n00000000", root / part / "n00000009")
    with pytest.raises(ValueError, match="classes") as caught:
        folder_data(root, split_file=str(saved))
    assert str(saved) in str(caught.value) and "n00000009" in str(caught.value)


def test_a_checkpoint_of_other_class_names_is_refused_on_resume(tmp_path):
    from mgssl.pipelines.splits import LabelSplit
    from mgssl.train.rundir import RunFolderError, check_same_train_set

    split = LabelSplit("imagenet", 6, 0, np.arange(3), ("cat", "dog"), "a" * 64)
    check_same_train_set({"train_set": {"classes": ["cat", "dog"], "sha256": "a" * 64}}, split, tmp_path)
    with pytest.raises(RunFolderError, match="classes"):
        check_same_train_set({"train_set": {"classes": ["dog", "kitty"], "sha256": "a" * 64}}, split, tmp_path)
    with pytest.raises(RunFolderError, match="list of training images"):
        check_same_train_set({"train_set": {"classes": ["cat", "dog"], "sha256": "b" * 64}}, split, tmp_path)


def test_a_folder_of_one_class_is_refused_before_training(tmp_path):
    root = write_image_folders(tmp_path / "data", num_classes=1, per_class_train=4, per_class_val=1)
    with pytest.raises(ValueError, match="one class"):
        folder_data(root)


# ---------------------------------------------------------------------------------------------
# Config values that train something else than asked.


@pytest.mark.parametrize("override, key", [
    ("optim.gamma=-1", "optim.gamma"), ("optim.gamma=0", "optim.gamma"),
    ("method.consistency_weight=-1", "method.consistency_weight"),
    ("optim.milestones=[200, 100]", "optim.milestones"), ("optim.milestones=[100, 100]", "optim.milestones"),
    ("data.workers=0", "data.workers"),
])
def test_values_that_would_train_something_else_are_refused(tmp_path, capsys, override, key):
    code = main(["digits", "--out", str(tmp_path / "run"), "--set", *TINY, override])
    one_error_line(capsys, code, 2, key)
    assert not (tmp_path / "run").exists()


def test_a_yaml_key_given_twice_is_refused_with_its_line(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("base: digits.yaml\ntrain:\n  steps: 120\n  eval_every: 10\n  steps: 99999\n")
    shutil.copy(main.__globals__["resolve_config_path"]("digits"), tmp_path / "digits.yaml")
    code = main([str(config), "--out", str(tmp_path / "run")])
    one_error_line(capsys, code, 2, f"{config}:5", "'steps' is given twice")


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    config = tmp_path / "laughs.yaml"
    config.write_text("\n".join(["anchors:"] + ["  " + line for line in lines] + ["optim:", "  milestones: *a5", ""]))
    code = main([str(config), "--out", str(tmp_path / "run")])
    err = one_error_line(capsys, code, 2, str(config))
    assert len(err) < 400, err


def test_a_base_that_names_an_endless_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "zero.yaml"
    config.write_text("base: /dev/zero\n")
    code = main([str(config), "--out", str(tmp_path / "run")])
    one_error_line(capsys, code, 2, "/dev/zero", "not a config")


# ---------------------------------------------------------------------------------------------
# A full disk at the start and under TensorBoard.

FULL_DISK_AT_START = """
import resource, sys
from mgssl.train.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # a write past 1 KiB fails, as on a full disk
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_write_of_the_start_files_leaves_nothing_that_blocks_the_next_start(tmp_path, subprocess_env):
    out = tmp_path / "run"
    argv = ["digits", "--out", str(out), "--set", *TINY]
    env = {**subprocess_env, "PYTHONDONTWRITEBYTECODE": "1"}
    child = subprocess.run([sys.executable, "-c", FULL_DISK_AT_START, *argv], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 1 and "Traceback" not in child.stderr, child.stderr
    assert child.stderr.startswith("error: ") and child.stderr.count("\n") == 1, child.stderr
    assert "config.yaml" in child.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    assert main(argv) == 0  # space freed: the same command starts


def test_a_full_disk_under_tensorboard_drops_it_with_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    tiny = [t for t in TINY if not t.startswith("train.tensorboard")]
    assert main(["digits", "--out", str(tmp_path), "--set", *tiny, "train.tensorboard=true"]) == 0
    err = capsys.readouterr().err
    assert err.count("cannot write TensorBoard events") == 1 and "No space left" in err and "Traceback" not in err
    assert (tmp_path / "final.json").is_file()
