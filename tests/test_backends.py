"""The backend switches: one function sets them for the trainer and the benchmark, from the config,
and each run records them."""
import json
import os

import pytest
import torch

from mgssl.train import engine
from mgssl.train.backends import CUBLAS_DETERMINISTIC, BackendFlags, backend_flags, current_flags
from mgssl.train.config import load_config

SHORT = ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
         "train.progress=false", "train.tensorboard=false", "train.device=cpu")


@pytest.fixture
def untouched_switches():
    before = current_flags()
    yield before
    assert current_flags() == before  # the context put every switch back


def test_the_switches_are_set_as_asked_and_put_back(untouched_switches, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with backend_flags(BackendFlags(cudnn_benchmark=True, deterministic=False, tf32=False)) as flags:
        assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        assert not torch.are_deterministic_algorithms_enabled()
        assert flags["cudnn_allow_tf32"] is False and flags["requested"]["tf32"] is False
    with backend_flags(BackendFlags(cudnn_benchmark=False, tf32=True)):
        assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cuda.matmul.allow_tf32 is True


def test_deterministic_sets_all_three_and_turns_benchmarking_off(untouched_switches, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with backend_flags(BackendFlags(cudnn_benchmark=True, deterministic=True)) as flags:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic is True
        assert torch.backends.cudnn.benchmark is False  # the timed choice could differ between processes
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
        assert flags["deterministic_algorithms"] is True and flags["cudnn_benchmark"] is False
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_the_engine_trains_under_the_configured_switches_and_records_them(tmp_path, monkeypatch,
                                                                          untouched_switches):
    seen = []
    real_step = engine.train_step

    def step_reading_the_switches(*args, **kwargs):
        seen.append(current_flags())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step_reading_the_switches)
    cfg = load_config("digits", SHORT + ("train.deterministic=true", "train.tf32=false"))
    engine.run(cfg, tmp_path)
    assert len(seen) == 2
    for flags in seen:
        assert flags["deterministic_algorithms"] and flags["cudnn_deterministic"]
        assert not flags["cudnn_benchmark"] and not flags["cudnn_allow_tf32"] and not flags["matmul_allow_tf32"]
    recorded = json.loads((tmp_path / "runs.jsonl").read_text())["backend_flags"]
    assert recorded["deterministic_algorithms"] is True and recorded["matmul_allow_tf32"] is False
    assert recorded["requested"] == {"cudnn_benchmark": True, "deterministic": True, "tf32": False}


def test_the_benchmark_takes_the_trainers_defaults():
    from mgssl.tools.bench import parse_args

    args = parse_args(["--device", "cpu"])
    assert BackendFlags(args.cudnn_benchmark, args.deterministic, args.tf32) == BackendFlags.of(
        load_config("digits").train)
    args = parse_args(["--device", "cpu", "--deterministic", "--no-tf32", "--no-cudnn-benchmark"])
    assert (args.deterministic, args.tf32, args.cudnn_benchmark) == (True, False, False)
