"""The data-path benchmark across epoch boundaries of both DALI streams, on a tiny image folder."""
import json

import pytest

from fake_datasets import write_image_folders

pytest.importorskip("nvidia.dali")


def test_the_gap_benchmark_crosses_the_asked_boundaries_with_one_pipeline_per_stream(tmp_path):
    from mgssl.tools.bench_data import main

    root = write_image_folders(tmp_path / "data", num_classes=2, per_class_train=10, per_class_val=1)
    out = tmp_path / "gaps.json"
    assert main(["--pipelines", "dali", "--imagenet-root", str(root), "--labels", "0.2", "--batch-dali", "4",
                 "--image-size", "16", "--resize-size", "20", "--workers", "1", "--boundaries", "3",
                 "--warmup", "2", "--step-ms", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["mode"] == "gaps" and r["unlabeled_epochs"] >= 3  # 16 unlabeled images, 4 a step
    assert r["labeled_epochs"] >= 4 * r["unlabeled_epochs"] - 1  # 4 labeled images: an epoch a step
    assert r["steps"] == len(range(2, 13))  # 3 more epochs of 4 steps after the 2 warm-up steps, and one across
    assert r["pipeline_builds"] == [1, 1]
    assert r["max_gap_ms"] >= r["p99_gap_ms"] >= r["median_gap_ms"] > 0
    assert r["max_over_median"] == pytest.approx(r["max_gap_ms"] / r["median_gap_ms"])
    assert r["median_gap_ms"] >= 1  # each gap holds the simulated 1 ms step
    assert r["max_gap_ms"] >= r["max_boundary_gap_ms"] > 0
