"""Each part of a run saves and loads its own state; one table (train/run_state.py) names the checkpoint's
entries, and checkpoints keep the entry names of earlier versions."""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mgssl.train.engine as engine_module
from mgssl.train import checkpoint as ckpt
from mgssl.train import run_state as rs
from mgssl.train.config import load_config
from mgssl.train.distributed import Dist
from mgssl.train.engine import run

# The entries of a checkpoint as earlier versions wrote them, spelled out: a resume must keep reading them.
EARLIER_ENTRIES = ("model", "optimizer", "step", "data", "rng", "evals", "config", "mgssl_version", "git_commit",
                   "world_size", "log_window", "classes", "train_set", "ema")
QUIET = ("train.progress=false", "train.tensorboard=false")


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_the_random_state_round_trips_torch_numpy_and_python():
    state = rs.RandomState(Dist())
    rs.seed_everything(5)
    saved = state.state_dict()
    first = draws()
    rs.seed_everything(6)
    state.load_state_dict(saved)
    assert draws() == first and len(saved) == 1


def test_a_random_state_of_another_world_size_is_left_with_a_warning(capsys):
    rs.seed_everything(5)
    saved = rs.RandomState(Dist()).state_dict()
    rs.seed_everything(6)
    expected = draws()
    rs.seed_everything(6)
    rs.RandomState(Dist()).load_state_dict(saved * 2)
    assert draws() == expected
    assert "from a checkpoint of 2: dropout and mixup draws will differ" in capsys.readouterr().err


class Part:
    """Records the order of loads; its state is its name."""

    def __init__(self, name, order):
        self.name, self.order = name, order

    def state_dict(self):
        return {"of": self.name}

    def load_state_dict(self, state):
        assert state == {"of": self.name}
        self.order.append(self.name)


def fake_run(order, **absent):
    parts = {entry.part: Part(name, order) for name, entry in rs.ENTRIES.items() if entry.part}
    parts.update(absent)
    return SimpleNamespace(**{k: v for k, v in parts.items() if "." not in k},
                           data=SimpleNamespace(train=parts["data.train"]))


def test_save_and_restore_walk_one_table_in_its_order():
    order = []
    run_ = fake_run(order)
    saved = rs.collect(run_)
    assert list(saved) == [name for name, entry in rs.ENTRIES.items() if entry.part]
    rs.load(run_, saved)
    assert order == list(saved)  # each rank's statistics after the weights, the random state after the data
    assert order.index(rs.RANK_BUFFERS) > order.index(rs.MODEL) and order.index(rs.RNG) > order.index(rs.DATA)


def test_optional_entries_may_be_missing_but_a_present_parts_entry_may_not():
    order = []
    saved = rs.collect(fake_run(order))
    for name in (rs.LOG_WINDOW, rs.SCALER, rs.RANK_BUFFERS):  # older checkpoints, or a save on the schedule
        del saved[name]
    rs.load(fake_run(order), saved)
    assert rs.LOG_WINDOW not in order and rs.MODEL in order
    rs.load(fake_run([], ema=None), {k: v for k, v in saved.items() if k != rs.EMA})  # train.ema off: not read
    with pytest.raises(KeyError, match=rs.EMA):
        rs.load(fake_run([]), {k: v for k, v in saved.items() if k != rs.EMA})


def test_a_resume_needs_the_entries_the_table_marks():
    assert set(ckpt.RESUME_ENTRIES) == {"model", "optimizer", "step", "data", "rng", "evals", "config"}
    state = {name: kind() for name, kind in ckpt.RESUME_ENTRIES.items()}
    assert ckpt.check_resumable(state, "last.pt") is state
    del state[rs.RNG]
    with pytest.raises(ckpt.CheckpointError, match="lacks 'rng'"):
        ckpt.check_resumable(state, "last.pt")


def test_a_checkpoint_spelled_with_earlier_entry_names_resumes_bit_identical(tmp_path, monkeypatch):
    settings = ("train.steps=6", "train.log_every=2", "train.checkpoint_every=3", "train.eval_every=3",
                "train.ema=0.9", *QUIET)
    straight = run(load_config("digits", settings), tmp_path / "straight")

    real_step, calls = engine_module.train_step, []

    def crash_after_the_checkpoint_at_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine_module, "train_step", crash_after_the_checkpoint_at_3)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        run(load_config("digits", settings), resumed)
    monkeypatch.setattr(engine_module, "train_step", real_step)

    path = resumed / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert set(state) == set(EARLIER_ENTRIES) and state["step"] == 3 and len(state["rng"]) == 1
    assert set(state) <= set(rs.ENTRIES)
    torch.save({name: state[name] for name in EARLIER_ENTRIES}, path)  # rebuilt from the literal names alone

    summary = run(load_config("digits", settings), resumed, resume=True)
    assert summary["weights_sha256"] == straight["weights_sha256"]
    assert summary["ema_test_error"] == straight["ema_test_error"]
    assert json.loads((resumed / "final.json").read_text())["test_error"] == straight["test_error"]
