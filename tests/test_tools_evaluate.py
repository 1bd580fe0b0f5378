"""tools.evaluate on the checkpoints of real short digits runs."""
import json
import shutil

import pytest

from tool_runs import shared_runs
from mgssl.tools.evaluate import evaluate_checkpoint, main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.mark.parametrize("name", ["labels50/baseline-s1", "labels100/full-s0"])
def test_the_checkpoint_reproduces_the_runs_final_test_error(runs_root, name):
    final = json.loads((runs_root / name / "final.json").read_text())
    result = evaluate_checkpoint(runs_root / name, warn=lambda text: None)
    assert result["step"] == final["steps"]
    assert result["top1_error"] == pytest.approx(final["test_error"], abs=1e-12)
    assert result["test_images"] == 535 and "top5_error" not in result  # 10 classes: top-1 only


def test_the_command_line_prints_and_writes_json(runs_root, tmp_path, capsys):
    run = runs_root / "labels50/meta-s0"
    final = json.loads((run / "final.json").read_text())
    out = tmp_path / "eval.json"
    assert main([str(run / "checkpoints" / "last.pt"), "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"test error top-1: {100 * final['test_error']:.2f}%" in printed
    saved = json.loads(out.read_text())
    assert saved["top1_error"] == pytest.approx(final["test_error"], abs=1e-12)
    assert saved["dataset"] == "digits" and saved["model"] == "digits_cnn"


def test_a_folder_without_a_checkpoint_is_an_error_that_names_it(tmp_path, capsys):
    assert main([str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "checkpoints/last.pt" in err


def test_a_checkpoint_moved_out_of_its_run_folder_still_evaluates(runs_root, tmp_path):
    run = runs_root / "labels50/full-s1"
    moved = tmp_path / "kept.pt"
    shutil.copy(run / "checkpoints" / "last.pt", moved)
    notes = []
    result = evaluate_checkpoint(moved, device="cpu", warn=notes.append)
    assert any("labeled_split.json" in n and "seed 1" in n for n in notes)
    assert result["top1_error"] == pytest.approx(json.loads((run / "final.json").read_text())["test_error"], abs=1e-12)
