"""tools.plan: its counts against a short real run's own counters, and its time model's arithmetic."""
import json

import pytest
import torch

from fake_datasets import write_image_folders
from mgssl.tools.plan import RunCounts, count_run, evaluations, predict, run_plan
from mgssl.train.config import load_config

OVERRIDES = ("data.name=imagenet", "data.labels=0.25", "data.batch_size=4", "data.eval_batch_size=8",
             "data.image_size=16", "data.resize_size=20", "data.workers=1", "model.name=digits_cnn",
             "train.steps=5", "train.eval_every=2", "train.checkpoint_every=5", "train.log_every=5",
             "train.device=cpu", "train.progress=false", "optim.warmup_steps=1", "method.consistency_rampup=1")


@pytest.mark.slow
def test_the_counts_match_a_short_run_on_an_image_folder(tmp_path):
    pytest.importorskip("nvidia.dali")
    from mgssl.train.engine import run

    root = write_image_folders(tmp_path / "data", num_classes=3, per_class_train=8, per_class_val=2)
    cfg = load_config("digits", OVERRIDES + (f"data.root={root}",))
    summary = run(cfg, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    streams = saved["data"]
    counts = count_run(cfg, world_size=1)
    assert counts.steps == summary["steps"]
    assert counts.labeled_size == summary["num_labels"]
    assert counts.pairs == streams["labeled"]["position"]  # labeled images the pipeline delivered
    assert counts.train_decodes == streams["labeled"]["position"] + streams["unlabeled"]["position"]
    assert counts.evaluations == len(saved["evals"])
    assert counts.eval_decodes == sum(e["test_images"] for e in saved["evals"])
    assert counts.allreduce_bytes_per_step == 0  # one process reduces nothing


def test_the_labeled_cache_halves_the_decodes_of_a_step():
    off = count_run(load_config("digits", ("train.steps=10",)), world_size=2)
    on = count_run(load_config("digits", ("train.steps=10", "data.labeled_cache=true")), world_size=2)
    assert off.train_decodes == 2 * off.pairs and off.decodes_per_step_per_gpu == 2 * on.decodes_per_step_per_gpu
    assert on.train_decodes == on.pairs + 2 * on.labeled_size  # each of the 2 processes decodes the set once


def test_the_all_reduce_bytes_count_ddp_and_g_in_their_types():
    fp32 = count_run(load_config("digits", ("train.steps=10",)), world_size=2)
    bf16 = count_run(load_config("digits", ("train.steps=10", "method.grad_reduce_dtype=bf16")), world_size=2)
    assert fp32.allreduce_bytes_per_step == 8 * fp32.parameters  # DDP's gradients and g, 4 bytes each
    assert bf16.allreduce_bytes_per_step == 6 * bf16.parameters


def test_evaluations_count_the_final_one_once():
    assert [evaluations(steps, 2) for steps in (4, 5, 1)] == [2, 3, 1]


def test_the_step_takes_the_longer_of_compute_and_decode():
    counts = RunCounts(world_size=2, global_batch=8, labeled_size=1, unlabeled_size=1, test_size=10, sizes_from="",
                       steps=100, pairs=800, train_decodes=1600, evaluations=1, eval_decodes=10, parameters=1,
                       forward_gflop_per_image=1.0, step_gflop_per_pair=12.0, allreduce_bytes_per_step=8_000_000)
    slow_decode = predict(counts, step_pairs_per_s=400, decode_per_s=100, busbw_gbps=1, eval_forward_per_s=1000)
    assert slow_decode.decode_ms == pytest.approx(1e3 * 8 / 100) and slow_decode.bottleneck == "decode"
    assert slow_decode.step_ms == slow_decode.decode_ms
    fast_decode = predict(counts, step_pairs_per_s=400, decode_per_s=10_000, busbw_gbps=1, eval_forward_per_s=1000)
    assert fast_decode.bottleneck == "compute"
    assert fast_decode.allreduce_ms == pytest.approx(1e3 * 8e6 * 2 * (1 / 2) / 1e9)  # ring: 2(n-1)/n of the bytes
    assert fast_decode.step_ms == pytest.approx(fast_decode.compute_ms + fast_decode.allreduce_ms)
    assert fast_decode.wall_s == pytest.approx(100 * fast_decode.step_ms / 1e3 + fast_decode.eval_s)
    counts.fp32_meta_steps = 10  # ten steps whose compute is 5x slower
    windowed = predict(counts, step_pairs_per_s=400, decode_per_s=10_000, busbw_gbps=1, eval_forward_per_s=1000,
                       fp32_slowdown=5)
    assert windowed.wall_s == pytest.approx(fast_decode.wall_s + 10 * 4 * fast_decode.compute_ms / 1e3)


def test_every_rate_is_labelled_measured_or_published(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text("timing table\n" + json.dumps({
        "median_ms": {"meta+mixup fd": 50.0, "meta+mixup jvp": 40.0}, "batch_size": 16, "model": "digits_cnn",
        "device_name": "the test CPU", "precision": "fp32", "compile": "off", "commit": "abc"}))
    result = run_plan(["digits", "--gpus", "2", "--device", "h100", "--bench", str(bench), "--set", "data.batch_size=32",
                   "--json", str(tmp_path / "plan.json")])
    rates = result["rates"]
    assert {r["kind"] for r in rates.values()} <= {"measured", "published"}
    assert rates["step"]["kind"] == "measured" and rates["step"]["value"] == pytest.approx(16 / 50.0 * 1e3)  # fd in fp32
    assert rates["decode"]["kind"] == rates["allreduce_busbw"]["kind"] == "published"
    out = capsys.readouterr().out
    assert out.count("[measured: ") == 2  # step and evaluation
    assert out.count("[published: ") == 3  # decode, all-reduce and the fp32 slowdown
    assert "bottleneck: " in out
    assert json.loads((tmp_path / "plan.json").read_text())["counts"]["steps"] == result["counts"]["steps"]


def test_it_refuses_a_prediction_without_rates(capsys):
    with pytest.raises(SystemExit):
        run_plan(["digits", "--gpus", "1"])
    assert "--device h100" in capsys.readouterr().err
