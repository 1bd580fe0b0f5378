"""tools.gpu_check --dry-run: every check of the first-GPU command runs on the CPU at tiny sizes."""
import json

import pytest

from mgssl.tools import gpu_check


@pytest.mark.slow
def test_the_dry_run_runs_every_check_and_writes_one_table(tmp_path):
    rows = gpu_check.run_checks(["--dry-run", "--out", str(tmp_path)])
    checks = {r.check for r in rows}
    assert {"CUDA tests", "host syncs / step", "fidelity ∇ỹ", "bench", "collectives", "real run", "resume"} <= checks
    assert [r for r in rows if r.status == "FAIL"] == []
    syncs = [r for r in rows if r.check == "host syncs / step"]
    assert len(syncs) == 7 and all(r.result == "0" for r in syncs)  # five Table-4 rows, fd and jvp where meta
    assert next(r for r in rows if r.check == "resume").result.startswith("weights bit-identical")
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "commit" in table and "DALI" in table
    assert "every CUDA path" in table  # a dry run says what it did not exercise
    for r in rows:  # a row either has a pass mark it can miss, or says it is a report
        assert r.status in ("ok", "FAIL", "missed", "skipped", "report")
        assert r.status != "ok" or r.goal != "report"
    assert {r.status for r in rows if r.check == "bench"} <= {"report", "skipped"}  # no goals at tiny sizes
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["header"]["torch"]


def test_without_a_gpu_the_real_check_refuses_with_one_line(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    assert "--dry-run" in capsys.readouterr().err


def test_the_engine_step_is_counted_with_ddp_and_g_reduced_and_a_sync_in_it_fails(tmp_path, monkeypatch):
    from mgssl.train import engine

    plan = gpu_check.Plan.of(dry_run=True)
    reduced = []
    real_start = engine.D.start_average_grads
    monkeypatch.setattr(engine.D, "start_average_grads", lambda *a, **k: reduced.append(1) or real_start(*a, **k))
    [row] = gpu_check.check_engine_syncs(plan, None, tmp_path)
    assert row.status == "ok" and row.result.startswith("0 ") and "DDP on 1 process (gloo)" in row.setting, row
    assert reduced  # g went through the engine's all-reduce

    real_step = engine.train_step

    def step_that_reads_its_loss(*args, **kwargs):
        stats = real_step(*args, **kwargs)
        float(stats["loss"])  # a host sync a careless logging line would add
        return stats

    monkeypatch.setattr(engine, "train_step", step_that_reads_its_loss)
    [row] = gpu_check.check_engine_syncs(plan, None, tmp_path / "again")
    assert row.status == "FAIL" and float(row.result.split()[0]) >= 1, row
