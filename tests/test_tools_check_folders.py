"""tools.check_folders on tiny generated JPEG folders: every file is decoded by DALI and by Pillow,
the differences are measured, and broken files are named."""
import json

import numpy as np
import pytest

from fake_datasets import break_jpeg, write_image_folders
from mgssl.tools.check_folders import Comparison, main

pytest.importorskip("nvidia.dali")


def test_every_file_is_decoded_by_both_and_compared(tmp_path, capsys):
    root = write_image_folders(tmp_path / "images", num_classes=3, per_class_train=4, per_class_val=2)
    assert main([str(root), "--batch-size", "5", "--json"]) == 0  # 18 files: the last batch is short
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["files"] == result["compared"] == 18
    # Same libjpeg family, same settings: the two decodes agree to at most a few steps of 255.
    assert result["max_abs_diff"] <= 2 and result["mean_abs_diff"] < 0.1
    assert result["dali_images_per_s"] > 0 and result["pillow_images_per_s"] > 0
    assert result["undecodable"] == {"dali": [], "pillow": []} and result["shape_mismatch"] == []


def test_a_broken_file_is_named_and_the_rest_still_compared(tmp_path, capsys):
    root = write_image_folders(tmp_path / "images", num_classes=2, per_class_train=4, per_class_val=1)
    broken = str(break_jpeg(root / "train" / "n00000001" / "n00000001_2.JPEG"))
    assert main([str(root), "--batch-size", "3", "--json"]) == 1
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["undecodable"] == {"dali": [broken], "pillow": [broken]}
    assert result["files"] == 10 and result["compared"] == 9
    assert f"{broken}: DALI cannot decode it" in out


def test_the_comparison_measures_mean_and_largest_difference():
    c = Comparison()
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0], b[1, 1, 2] = 3, 255
    c.add("x.jpg", a, b)
    c.add("y.jpg", a, a)
    c.add("z.jpg", a, np.zeros((2, 3, 3), np.uint8))
    assert c.images == 3 and c.pixels == 24 and c.differing_images == 1
    assert c.max_abs == 255 and c.max_file == "x.jpg" and c.mean_abs == pytest.approx(258 / 24)
    assert c.shape_mismatch == ["z.jpg: DALI (2, 2, 3), Pillow (2, 3, 3)"]


def test_a_folder_without_the_layout_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train" in err
