"""The model worth keeping: best.pt picked on a validation split of the training images (never the
test set), and the average of the weights (train.ema), both continuing exactly across a resume."""
import json

import pytest
import torch
import torch.nn as nn

from mgssl.pipelines import DataConfig, build_data
from mgssl.train.config import load_config
from mgssl.train.ema import WeightsEMA
from mgssl.train.engine import run
from mgssl.train.metrics import read_metrics

# Evaluations every 4 steps, checkpoints every 8: best.pt changes between checkpoints.
KEPT = ("data.validation=50", "train.ema=0.9", "train.eval_every=4", "train.checkpoint_every=8", "train.log_every=4",
        "train.progress=false", "train.tensorboard=false", "train.device=cpu")


def test_the_validation_images_are_neither_labeled_nor_unlabeled_nor_test_images():
    data = build_data(DataConfig(name="digits", labels=50, validation=0.1), seed=3, device="cpu")
    split = data.split
    held = set(split.validation.tolist())
    assert len(held) == sum(round(n * 0.1) for n in torch.bincount(data.train_set.labels).tolist())
    assert not held & set(split.labeled.tolist())
    assert not held & set(split.unlabeled(include_labeled=True).tolist())
    assert sum(len(y) for _, y in data.eval_batches("validation")) == len(held)
    # Without a validation set the labeled draw is the one it always was.
    plain = build_data(DataConfig(name="digits", labels=50), seed=3, device="cpu").split
    assert len(plain.validation) == 0 and len(plain.unlabeled(include_labeled=True)) == plain.train_size


def test_the_average_follows_the_ema_formula_for_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = WeightsEMA(net, 0.75)
    ema.update(net)  # the first update copies
    before = {k: v.clone() for k, v in ema.weights().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(8, 3))  # moves the running statistics
    ema.update(net)
    after, now = ema.weights(), net.state_dict()
    for key in ("0.weight", "1.running_mean", "1.running_var"):
        assert torch.allclose(after[key], 0.75 * before[key] + 0.25 * now[key]), key
    # Its state carries on exactly in a new object.
    copy = WeightsEMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 0.75)
    copy.load_state_dict(ema.state_dict())
    ema.update(net)
    copy.update(net)
    assert all(torch.equal(a, b) for a, b in zip(ema.weights().values(), copy.weights().values()))
    with pytest.raises(ValueError, match="train.ema"):
        copy.load_state_dict({**ema.state_dict(), "decay": 0.5})


def test_best_pt_holds_the_evaluation_of_lowest_validation_error(tmp_path):
    summary = run(load_config("digits", ("train.steps=16", *KEPT)), tmp_path)
    evals = read_metrics(tmp_path, "eval")
    assert all("val_error" in e and "ema_top1_error" in e and "ema_val_error" in e for e in evals)
    best = min(evals, key=lambda e: e["val_error"])
    saved = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert saved["step"] == best["step"] == summary["best_val_step"]
    assert saved["val_error"] == summary["best_val_error"] == best["val_error"]
    assert summary["best_val_test_error"] == best["top1_error"]
    assert summary["ema_test_error"] == evals[-1]["ema_top1_error"]
    assert saved["classes"] == [str(c) for c in range(10)]
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["classes"] == saved["classes"] and final["best_checkpoint"] == "checkpoints/best.pt"
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["ema"]["decay"] == 0.9 and last["classes"] == saved["classes"]


@pytest.mark.slow
def test_best_pt_and_the_weight_average_resume_bit_identical(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(load_config("digits", ("train.steps=24", *KEPT)), straight)
    run(load_config("digits", ("train.steps=8", *KEPT)), stopped)
    run(load_config("digits", ("train.steps=24", *KEPT)), stopped, resume=True)
    for name in ("best.pt", "last.pt"):
        a = torch.load(straight / "checkpoints" / name, weights_only=True)
        b = torch.load(stopped / "checkpoints" / name, weights_only=True)
        assert a["step"] == b["step"], name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["ema"]["averaged"]
    b = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["ema"]["averaged"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final_a, final_b = (json.loads((p / "final.json").read_text()) for p in (straight, stopped))
    for key in ("best_val_step", "best_val_error", "best_val_test_error", "ema_test_error", "ema_val_error"):
        assert final_a[key] == final_b[key], key


def test_a_resume_with_another_ema_decay_is_refused(tmp_path):
    run(load_config("digits", ("train.steps=4", *KEPT)), tmp_path)
    with pytest.raises(ValueError, match="train.ema"):
        run(load_config("digits", ("train.steps=8", *KEPT, "train.ema=0.5")), tmp_path, resume=True)
