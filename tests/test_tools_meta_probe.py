"""tools.meta_probe on the checkpoint of a real short digits run: Theorem 1's descent, measured."""
import json

import pytest

from tool_runs import shared_runs
from mgssl.tools.meta_probe import SETS, VARIANTS, main, probe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_runs(tmp_path_factory) / "labels50/full-s0"


@pytest.fixture(scope="module")
def result(run):
    return probe(run, multipliers=(0.1, 1.0, 1000.0), batches=3, held_out=128, warn=lambda text: None)


def test_a_small_meta_step_lowers_the_labeled_loss_after_the_sgd_step_as_theorem_1_says(result):
    small = result["rows"][0]
    assert small["multiplier"] == 0.1 and result["lr"] > 0
    assert small["meta/g-batch"] < 0 and small["descents"] == result["batches"]
    # To first order the meta direction is the steepest descent of H in label space, so a random shift
    # of the same length does worse; and a plain labeled step of the same length in θ does better.
    assert small["meta/g-batch"] < small["random/g-batch"]
    assert small["labeled/g-batch"] < small["meta/g-batch"]


def test_larger_steps_move_the_labels_and_the_network_further(result):
    shifts = [r["shift"] for r in result["rows"]]
    changes = [r["param_change"] for r in result["rows"]]
    assert 0 < shifts[0] < shifts[1] < shifts[2] <= 2.0  # L1 distance between two distributions
    assert 0 < changes[0] < changes[1] < changes[2]


def test_the_step_is_taken_at_the_learning_rate_of_the_checkpoint(result, run):
    saved = json.loads((run / "final.json").read_text())
    # 20 steps of the digits default are inside its 200-step warm-up: lr = 0.1 · 20 / 200.
    assert result["step"] == saved["steps"] == 20 and result["lr"] == pytest.approx(0.01)
    assert result["held_out"] > 0 and result["test"] > 0


def test_the_command_line_prints_a_table_and_writes_json_and_a_plot(run, tmp_path, capsys):
    out, png = tmp_path / "probe.json", tmp_path / "probe.png"
    assert main([str(run), str(run / "checkpoints" / "last.pt"), "--multipliers", "0.5,2", "--batches", "1",
                 "--held-out", "16", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| multiplier | g-batch | held-out | test |") == 2 and "| 2 |" in printed
    saved = json.loads(out.read_text())
    assert len(saved) == 2 and [r["multiplier"] for r in saved[0]["rows"]] == [0.5, 2.0]
    assert all(f"{v}/{s}" in saved[0]["rows"][0] for v in VARIANTS for s in SETS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--multipliers", "0,1"], ["--multipliers", "x"], ["--batches", "0"]])
def test_bad_arguments_are_refused(run, args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(run), *args])
    assert e.value.code == 2
