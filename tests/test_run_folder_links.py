"""A run never writes through a symbolic link: a link planted in a shared runs tree, in place of a run
file or of the temporary file a run writes before a rename, cannot make it overwrite another file."""
import os
from pathlib import Path

import pytest

from mgssl import runfolder as rf
from mgssl.pipelines.dali import CorruptFiles
from mgssl.train.cli import main

TINY = ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
        "train.progress=false", "train.tensorboard=false")
PRECIOUS = "a file of the user's that no run may touch\n"


def victim(tmp_path) -> Path:
    path = tmp_path / "precious.txt"
    path.write_text(PRECIOUS)
    return path


def one_error_line(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("name", [rf.LOCK, rf.CONFIG, rf.RUNS, rf.METRICS, rf.SPLIT, rf.CORRUPT])
def test_a_fresh_start_into_a_folder_with_a_linked_run_file_is_refused_in_one_line(tmp_path, capsys, name):
    out, target = tmp_path / "run", victim(tmp_path)
    out.mkdir()
    (out / name).symlink_to(target)
    code = main(["digits", "--out", str(out), "--set", *TINY])
    one_error_line(capsys, code, str(out / name), "symbolic link")
    assert target.read_text() == PRECIOUS


@pytest.mark.parametrize("name", [rf.CONFIG, rf.RUNS, rf.METRICS])
def test_a_resume_through_a_linked_run_file_is_refused_in_one_line(tmp_path, capsys, name):
    out, target = tmp_path / "run", victim(tmp_path)
    argv = ["digits", "--out", str(out), "--set", *TINY]
    assert main(argv) == 0
    (out / name).unlink()
    (out / name).symlink_to(target)
    capsys.readouterr()
    code = main([*argv, "--resume"])  # a requeue always passes --resume
    one_error_line(capsys, code, str(out / name), "symbolic link")
    assert target.read_text() == PRECIOUS


@pytest.mark.parametrize("planted", [f".{rf.FINAL}.tmp", f"{rf.SPLIT}.tmp", f"{rf.CHECKPOINTS}/.{rf.LAST}.tmp"])
def test_a_link_planted_where_a_run_writes_its_temporary_files_is_never_followed(tmp_path, planted):
    out, target = tmp_path / "run", victim(tmp_path)
    (out / rf.CHECKPOINTS).mkdir(parents=True)
    (out / planted).symlink_to(target)
    assert main(["digits", "--out", str(out), "--resume", "--set", *TINY]) == 0  # no checkpoint: a new run
    assert target.read_text() == PRECIOUS
    assert (out / rf.FINAL).is_file() and not (out / rf.FINAL).is_symlink()


def test_a_link_made_after_the_start_is_not_written_through(tmp_path):
    target = victim(tmp_path)
    (tmp_path / rf.METRICS).symlink_to(target)
    with pytest.raises(rf.RunFileError, match="symbolic link"):
        rf.append_text(tmp_path / rf.METRICS, "{}\n")
    assert target.read_text() == PRECIOUS


def test_the_list_of_undecodable_images_is_not_written_through_a_link(tmp_path):
    target = victim(tmp_path)
    (tmp_path / rf.CORRUPT).symlink_to(target)
    with pytest.raises(rf.RunFileError, match="symbolic link"), pytest.warns(RuntimeWarning):
        CorruptFiles("skip", tmp_path).report(["broken.jpg"], ["broken.jpg"], RuntimeError("bad"))
    assert target.read_text() == PRECIOUS


def test_a_checkpoint_is_not_read_through_a_link(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["digits", "--out", str(out), "--set", *TINY]
    assert main(argv) == 0
    moved = tmp_path / "elsewhere.pt"
    os.replace(out / rf.CHECKPOINT, moved)
    (out / rf.CHECKPOINT).symlink_to(moved)
    capsys.readouterr()
    one_error_line(capsys, main([*argv, "--resume"]), str(out / rf.CHECKPOINT), "symbolic link")
