"""Every damaged file a run or a tool reads is one line that names it and says what to do: the
split, metrics, checkpoint, final.json and config.yaml of a run folder, and the data set files."""
import fractions
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from tool_runs import TINY, one_error_line
from fake_datasets import write_cifar10
from tool_runs import COMMON, shared_runs
from mgssl import runfolder as rf
from mgssl.pipelines.sources import load_cifar10_arrays
from mgssl.pipelines.splits import load_split
from mgssl.train.cli import main
from mgssl.tools import ablation, evaluate, report


@pytest.fixture
def finished(tmp_path):
    """A finished tiny digits run and the command that made it."""
    argv = ["digits", "--out", str(tmp_path / "run"), "--set", *TINY]
    assert main(argv) == 0
    return tmp_path / "run", argv


# ---------------------------------------------------------------------------------------------
# The trainer's own files, on resume.


def test_a_truncated_split_stops_the_resume_with_its_name(finished, capsys):
    run, argv = finished
    split = run / rf.SPLIT
    split.write_bytes(split.read_bytes()[:40])
    capsys.readouterr()
    one_error_line(capsys, main([*argv, "--resume"]), 1, str(split), "damaged")


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"dataset": "digits", "train_size": 1262}', "",
                                     '{"dataset": "digits", "train_size": 1262, "labeled": [1.5, 2.5]}',
                                     '{"dataset": "digits", "train_size": 1262, "labeled": []}'])
def test_a_split_file_that_is_not_a_split_is_named(tmp_path, content):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(ValueError) as caught:
        load_split(path, "digits", np.zeros(1262, dtype=np.int64))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_bytes_in_metrics_do_not_stop_a_resume(finished, capsys):
    run, argv = finished
    with open(run / rf.METRICS, "ab") as f:
        f.write(b'{"kind": "eval", "step": 1, "top1_error": 0.5}\xff\xfe\n')
    assert main([*argv[:-len(TINY)], *TINY[:1], "train.steps=4", *TINY[1:], "--resume"]) == 0
    rows = [json.loads(line) for line in (run / rf.METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4]


@pytest.mark.parametrize("state", [{"a": 1}, torch.zeros(3), "no optimizer", {"model": fractions.Fraction(1, 2)}],
                         ids=["other-dict", "bare-tensor", "no-optimizer", "unsafe-global"])
def test_a_damaged_checkpoint_stops_the_resume_with_its_name(finished, capsys, state):
    run, argv = finished
    path = run / rf.CHECKPOINT
    if isinstance(state, str):
        state = torch.load(path, weights_only=True)
        del state["optimizer"]
    torch.save(state, path)
    capsys.readouterr()
    err = one_error_line(capsys, main([*argv, "--resume"]), 1, str(path))
    assert "weights_only=False" not in err


def test_a_checkpoint_whose_weights_do_not_fit_is_named(finished, capsys):
    run, argv = finished
    path = run / rf.CHECKPOINT
    state = torch.load(path, weights_only=True)
    state["model"] = {"nothing": torch.zeros(1)}
    torch.save(state, path)
    capsys.readouterr()
    one_error_line(capsys, main([*argv, "--resume"]), 1, str(path), "does not fit")


# ---------------------------------------------------------------------------------------------
# Data set files.


def test_cifar_labels_stored_as_fractions_are_refused_not_truncated(tmp_path):
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"labels"] = (np.asarray(batch[b"labels"]) + 0.5).tolist()
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match="labels") as caught:
        load_cifar10_arrays(str(root))
    assert str(path) in str(caught.value)


def test_a_protocol_2_cifar_pickle_holding_empty_bytes_loads(tmp_path):
    root = write_cifar10(tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"batch_label"] = b""
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    assert len(load_cifar10_arrays(str(root)).train_labels) == 60


# ---------------------------------------------------------------------------------------------
# The tools: report, ablation, evaluate.


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def copied_run(runs_root, tmp_path, name="labels50/plain-s0", to="runs/none-s0"):
    shutil.copytree(runs_root / name, tmp_path / to)
    return tmp_path / to


DAMAGE = {rf.FINAL: b'{"test_error": 0.1\xff}', rf.CONFIG: b"method: [unclosed\n  meta: true\n"}


@pytest.mark.parametrize("name", [rf.FINAL, rf.CONFIG])
def test_a_damaged_file_in_a_report_is_one_line_naming_it(runs_root, tmp_path, capsys, name):
    run = copied_run(runs_root, tmp_path)
    (run / name).write_bytes(DAMAGE[name])
    code = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    one_error_line(capsys, code, 2, str(run / name), "damaged")


def test_bad_bytes_in_metrics_are_skipped_by_the_report_with_a_warning(runs_root, tmp_path, capsys):
    run = copied_run(runs_root, tmp_path)
    with open(run / rf.METRICS, "ab") as f:
        f.write(b'{"kind": "eval", "step": 99, \xff}\n')
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert f"{run / rf.METRICS}:" in capsys.readouterr().err


@pytest.mark.parametrize("name", [rf.FINAL, rf.CONFIG])
def test_a_damaged_file_in_a_study_is_one_line_naming_it(runs_root, tmp_path, capsys, name):
    run = copied_run(runs_root, tmp_path)  # the study's row `none`, seed 0, finished already
    (run / name).write_bytes(DAMAGE[name])
    code = ablation.main(["digits", "--seeds", "0", "--rows", "none", "--out", str(tmp_path / "runs"),
                          "--set", *COMMON])
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err and "error: " in err and str(run / name) in err, err


@pytest.mark.parametrize("out", ["x" * 300 + ".md", "file-in-the-way/report"])
def test_an_output_folder_that_cannot_be_written_is_one_line(runs_root, tmp_path, capsys, out):
    copied_run(runs_root, tmp_path)
    (tmp_path / "file-in-the-way").write_text("")
    code = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / out)])
    one_error_line(capsys, code, 2, "cannot write", "--out")


def test_evaluate_on_a_bare_tensor_is_one_line(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    code = evaluate.main([str(tmp_path / "tensor.pt"), "--device", "cpu"])
    one_error_line(capsys, code, 2, str(tmp_path / "tensor.pt"), "not the dict")


def test_evaluate_with_json_naming_a_folder_is_refused_before_evaluating(runs_root, tmp_path, capsys):
    code = evaluate.main([str(runs_root / "labels50/plain-s0"), "--device", "cpu", "--json", str(tmp_path)])
    one_error_line(capsys, code, 2, "--json", "is a folder")
