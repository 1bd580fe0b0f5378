"""The loop itself: schedules, evaluation, logs, precisions and what a run folder holds."""
import json
import math

import pytest
import torch
import torch.nn as nn

import mgssl
from mgssl.train import checkpoint as ckpt
from mgssl.train.config import OptimConfig, load_config
from mgssl.train.engine import git_commit, run
from mgssl.train.rundir import RunFolderError
from mgssl.train.evaluate import error_counts, errors_from_counts
from mgssl.train.metrics import read_metrics, summarize_evals
from mgssl.train.schedule import consistency_weight, learning_rate

SHORT = ("train.steps=12", "train.eval_every=6", "train.checkpoint_every=6", "train.log_every=3",
         "train.progress=false", "train.tensorboard=false")


def digits(*overrides):
    return load_config("digits", SHORT + tuple(overrides))


def test_step_schedule_follows_the_authors_warmup_and_milestones():
    # Their code: lr = lr_max·step/warmup during warm-up (0 at step 0), ×0.1 once step > milestone.
    cfg = OptimConfig(lr=0.1, schedule="step", milestones=[300_000, 350_000], gamma=0.1)
    steps = (0, 1, 2000, 3999, 4000, 300_000, 300_001, 350_000, 350_001, 399_999)
    lr = [learning_rate(s, cfg, 400_000, 4000) for s in steps]
    assert lr[0] == 0.0 and lr[1] == pytest.approx(0.1 / 4000) and lr[2] == pytest.approx(0.05)
    assert lr[3] == pytest.approx(0.1 * 3999 / 4000)
    assert lr[4:6] == [0.1, 0.1]  # milestone 300k applies after step 300k, not at it
    assert lr[6:8] == pytest.approx([0.01, 0.01]) and lr[8:] == pytest.approx([0.001, 0.001])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = OptimConfig(lr=0.1, schedule="cosine")
    total, warm = 1000, 100
    lrs = [learning_rate(s, cfg, total, warm) for s in range(total)]
    assert lrs[0] == 0.0 and lrs[warm - 1] == pytest.approx(0.1 * 99 / 100) and lrs[warm] == pytest.approx(0.1)
    assert lrs[warm + 450] == pytest.approx(0.05)  # half way through the decay
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:])) and lrs[-1] < 1e-5


def test_consistency_weight_ramps_linearly():
    assert [consistency_weight(s, 2.0, 100) for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]
    assert consistency_weight(0, 1.0, 0) == 1.0  # ImageNet: no ramp


def test_error_counts_top1_and_top5():
    classes = 20
    net = nn.Linear(classes, classes, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(classes))
    x = torch.eye(classes)[[0, 1, 2, 3]] + torch.eye(classes)[[5, 5, 5, 5]] * 0.5
    # Logits are x: the top class is x's row, the 2nd is class 5. Labels: right, 2nd, absent, right.
    y = torch.tensor([0, 5, 9, 3])
    result = errors_from_counts(error_counts(net, [(x[:2], y[:2]), (x[2:], y[2:])], torch.autocast("cpu", enabled=False)))
    assert result["top1_error"] == pytest.approx(2 / 4) and result["top5_error"] == pytest.approx(1 / 4)
    assert result["test_images"] == 4


def test_final_reports_best_and_median_of_the_last_evaluations():
    evals = [{"step": s, "top1_error": e} for s, e in zip(range(1, 6), (0.5, 0.2, 0.4, 0.3, 0.35))]
    out = summarize_evals(evals, keep_last=3)
    assert (out["test_error"], out["best_test_error"], out["best_step"]) == (0.35, 0.2, 2)
    assert out["median_last_test_error"] == 0.35 and out["median_last_evals"] == 3


def test_a_run_folder_holds_config_command_commit_metrics_and_result(tmp_path):
    summary = run(digits("train.tensorboard=true"), tmp_path, argv=["digits", "--set", "train.steps=12"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml", "final.json",
                                                         "labeled_split.json", "metrics.jsonl", "run.lock",
                                                         "runs.jsonl", "tensorboard"]
    assert load_config(str(tmp_path / "config.yaml")) == digits("train.tensorboard=true")
    started = json.loads((tmp_path / "runs.jsonl").read_text())
    assert started["command"].endswith("-m mgssl.train digits --set train.steps=12")
    assert started["git_commit"] == git_commit() and started["mgssl_version"] == mgssl.__version__
    assert started["estimator"] == "fd"  # method.estimator=auto in an fp32 run
    final = json.loads((tmp_path / "final.json").read_text())
    assert final == json.loads(json.dumps(summary))
    for key in ("test_error", "best_test_error", "steps", "world_size", "num_labels", "dataset", "model", "seed",
                "meta", "mixup", "unlabeled", "estimator", "median_last_test_error"):
        assert key in final
    train_rows, eval_rows = read_metrics(tmp_path, "train"), read_metrics(tmp_path, "eval")
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12] and [r["step"] for r in eval_rows] == [6, 12]
    for key in ("loss", "loss_classification", "loss_consistency", "lr", "images_per_s", "pseudo_label_shift",
                "epoch"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    assert eval_rows[-1]["top1_error"] == final["test_error"]
    assert list((tmp_path / "tensorboard").iterdir())
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt.fingerprint(state["model"]) == final["weights_sha256"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_saves_its_loss_scale(tmp_path, precision):
    # fp16 kernels are slow on CPUs: two steps show the path works (the GPU is where it pays).
    summary = run(digits(f"train.precision={precision}", "train.steps=2", "train.log_every=1",
                         "train.eval_every=2", "train.checkpoint_every=2"), tmp_path)
    assert 0.0 <= summary["test_error"] <= 1.0
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path, "train"))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ("scaler" in state) == (precision == "fp16")
    started = json.loads((tmp_path / "runs.jsonl").read_text())
    assert started["estimator"] == summary["estimator"] == "jvp"  # method.estimator=auto under autocast


def test_resuming_with_a_changed_experiment_is_refused(tmp_path):
    run(digits("train.steps=6"), tmp_path)
    with pytest.raises(ValueError, match="optim.lr: 0.1 -> 0.2"):
        run(digits("train.steps=12", "optim.lr=0.2"), tmp_path, resume=True)
    with pytest.raises(RunFolderError, match="--resume"):
        run(digits("train.steps=12"), tmp_path)
    summary = run(digits("train.steps=12"), tmp_path, resume=True)  # more steps: allowed
    assert summary["steps"] == 12
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [6, 12]
    # A run started with estimator=fd resumes under the default auto when that resolves to fd.
    run(digits("train.steps=14", "method.estimator=fd"), tmp_path, resume=True)


def test_ddp_keeps_the_buffer_broadcast_unless_syncbatchnorm_aligns_the_statistics():
    from mgssl.train.config import load_config
    from mgssl.train.engine import ddp_options

    plain = ddp_options(load_config("digits"))
    synced = ddp_options(load_config("digits", ("train.sync_bn=true",)))
    assert plain == {"gradient_as_bucket_view": True, "broadcast_buffers": True, "static_graph": True}
    assert synced["broadcast_buffers"] is False and synced["gradient_as_bucket_view"]


def test_the_steps_run_with_the_set_up_out_of_the_garbage_collector(tmp_path, monkeypatch):
    import gc

    from mgssl.train import engine

    real_step, seen = engine.one_step, []

    def watched(t, lr, weight, step):
        seen.append((gc.get_freeze_count(), any(o is t.data for o in gc.get_objects())))
        return real_step(t, lr, weight, step)

    monkeypatch.setattr(engine, "one_step", watched)
    before = gc.get_freeze_count()
    run(digits("train.steps=4"), tmp_path)
    # the data set, made at set-up, is frozen: a full collection no longer walks its objects mid-run
    assert len(seen) == 4 and all(frozen > before and not tracked for frozen, tracked in seen)
    assert gc.get_freeze_count() == before  # handed back to the collector after the run
