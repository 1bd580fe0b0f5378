"""`mgssl train` from a run folder: a resume without a config continues the run with the config the
folder saved; and `--print-config`, which lists every key with its value, default and meaning."""
import json

import pytest
import yaml

from mgssl.train.cli import main
from mgssl.train.config import Config, load_config, to_dict
from mgssl.train.metrics import read_metrics

# A run whose settings differ from the digits default's in an experiment key (optim.lr) and in its length.
FIRST = ("train.steps=4", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
         "train.progress=false", "train.tensorboard=false", "optim.lr=0.05")


def starts(out):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def saved_config(out):
    return yaml.safe_load((out / "config.yaml").read_text())


def train_steps(out):
    return [row["step"] for row in read_metrics(out, "train")]


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    assert main(["digits", "--out", str(out), "--set", *FIRST]) == 0
    return out


def test_a_resume_without_a_config_continues_with_the_saved_one(finished, capsys):
    assert main(["--out", str(finished), "--resume", "--set", "train.steps=6"]) == 0
    assert json.loads((finished / "final.json").read_text())["steps"] == 6
    assert [s["resumed_from_step"] for s in starts(finished)] == [0, 4]
    config = saved_config(finished)
    assert config["optim"]["lr"] == 0.05 and config["train"]["steps"] == 6  # the new length is recorded
    assert train_steps(finished) == [2, 4, 6]
    assert "done:" in capsys.readouterr().out


def test_a_finished_run_resumed_with_no_new_length_trains_nothing_and_exits_0(finished):
    final = json.loads((finished / "final.json").read_text())
    assert main(["--out", str(finished), "--resume"]) == 0
    assert train_steps(finished) == [2, 4]  # not on to the digits default's 2,000 steps
    again = json.loads((finished / "final.json").read_text())
    assert again["steps"] == 4 and again["weights_sha256"] == final["weights_sha256"]
    assert [s["resumed_from_step"] for s in starts(finished)] == [0, 4]


def test_a_resume_refuses_a_changed_experiment_key_from_set_or_from_a_config(finished, capsys):
    assert main(["--out", str(finished), "--resume", "--set", "optim.lr=0.1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the config differs") and "optim.lr: 0.05 -> 0.1" in err
    # naming the digits config brings back its lr (0.1): refused the same way
    assert main(["digits", "--out", str(finished), "--resume", "--set", *FIRST[:-1]]) == 1
    assert "optim.lr: 0.05 -> 0.1" in capsys.readouterr().err
    assert len(starts(finished)) == 1  # nothing started


def test_a_resume_without_a_config_needs_a_run_folder_that_saved_one(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no config.yaml" in err and "mgssl train CONFIG" in err
    assert not (tmp_path / "nothing").exists()


def test_print_config_lists_every_key_with_its_value_default_and_meaning(capsys):
    assert main(["digits", "--set", "train.steps=20", "--print-config"]) == 0
    text = capsys.readouterr().out
    cfg = load_config("digits", ("train.steps=20",))
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(to_dict(cfg)))  # the output is the config
    leaves = [line for line in text.splitlines() if not line.startswith("#") and not line.endswith(":")]
    assert len(leaves) == len(_leaf_keys(to_dict(Config())))
    assert all("  # " in line and line.split("  # ", 1)[1].strip() for line in leaves), "a key without a meaning"
    lines = {line.strip().split(":")[0]: line for line in text.splitlines()}
    assert "# (default: 400000) training steps" in lines["steps"]  # set by --set: the default beside it
    assert "(default: 4000) steps over which w grows" in lines["consistency_rampup"]  # set by digits.yaml
    assert "default" not in lines["mixup_gamma"]  # left at its default


def test_print_config_names_the_choices_the_config_accepts(capsys):
    from mgssl.model import MODELS
    from mgssl.pipelines.config import DATASETS

    assert main(["--print-config"]) == 0
    lines = {line.strip().split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["name"].split("# ")[1] == " | ".join(MODELS)  # model.name, the last `name:` line
    from mgssl.train.config_help import field_comments
    from mgssl.pipelines.config import DataConfig

    assert field_comments(DataConfig)["name"] == " | ".join(DATASETS)
    # a comment continued on the next line belongs to the key above it; one above a key without its own, to it
    assert field_comments(DataConfig)["on_corrupt"].endswith('"error" stops, naming the file')
    from mgssl.train.config import MethodConfig

    assert field_comments(MethodConfig)["meta_precision"].startswith('"run": the meta part')


def test_print_config_on_a_resume_shows_the_saved_config(finished, capsys):
    capsys.readouterr()
    assert main(["--out", str(finished), "--resume", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 0.05


def test_train_help_points_to_print_config(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: mgssl train") and "--print-config" in text
    assert "mgssl train --print-config" in text and "--resume" in text


def _leaf_keys(tree, prefix=""):
    out = []
    for key, value in tree.items():
        out += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out
