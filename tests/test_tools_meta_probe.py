"""tools.meta_probe on the checkpoint of a real short digits run."""
import json

import pytest
import torch

from tool_runs import shared_runs
from mgssl.tools.meta_probe import main, probe
from mgssl.tools.runs import restore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_runs(tmp_path_factory) / "labels50/full-s0"


def test_multiplier_zero_is_the_networks_own_accuracy_and_larger_steps_move_further(run):
    result = probe(run, multipliers=(0.0, 1.0, 10.0), batches=4, warn=lambda text: None)
    rows = {r["multiplier"]: r for r in result["rows"]}
    assert result["pairs"] == 4 * 32 and result["mode"] == "eval"
    assert rows[0.0]["shift"] < 1e-6  # ŷ = ỹ up to the renormalisation's rounding
    assert 0 < rows[1.0]["shift"] < rows[10.0]["shift"] <= 2.0  # L1 distance between two distributions
    # ŷ = ỹ: the accuracy of the eval-mode network on the same unlabeled draws, recomputed here.
    restored = restore(run, warn=lambda text: None)
    x, y = zip(*restored.data.eval_batches("unlabeled"))
    with torch.no_grad():
        acc_all = (restored.net(torch.cat(x)).argmax(1) == torch.cat(y)).float().mean().item()
    assert abs(rows[0.0]["accuracy"] - acc_all) < 0.15  # 128 draws of a set of 1,212
    assert 0.0 <= rows[0.0]["brier"] <= 2.0


def test_the_command_line_prints_a_table_and_writes_json(run, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main([str(run), "--multipliers", "0,2", "--batches", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| multiplier | accuracy | Brier | shift (L1) |" in printed and "| 2 |" in printed
    assert [r["multiplier"] for r in json.loads(out.read_text())["rows"]] == [0.0, 2.0]
