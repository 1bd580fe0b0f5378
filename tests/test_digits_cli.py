"""The digits default from the command line, as a user runs it."""
import json
import subprocess
import sys

import torch


def test_digits_runs_end_to_end_from_the_cli(tmp_path, repo_root, subprocess_env):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mgssl.train", "digits", "--out", str(out),
           "--set", "train.steps=60", "train.eval_every=30", "train.checkpoint_every=30", "train.log_every=20"]
    done = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["test_error"] <= 1.0
    assert final["steps"] == 60 and final["world_size"] == 1
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 60
    assert set(state["model"]) == set(_digits_state_keys())
    assert (out / "labeled_split.json").is_file() and (out / "config.yaml").is_file()


def _digits_state_keys():
    from mgssl.model import build_model

    return build_model("digits_cnn", 10, 1).state_dict().keys()


def test_a_config_error_names_the_closest_key(tmp_path, subprocess_env):
    done = subprocess.run([sys.executable, "-m", "mgssl.train", "digits", "--set", "train.step=5"], cwd=tmp_path,
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "train.steps" in done.stderr
