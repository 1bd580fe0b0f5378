"""A run folder has one writer, is never overwritten, is changed only by a run that really starts, and
a stop signal costs nothing: the run saves where it stopped and resumes bit for bit."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import mgssl.train.engine as engine_module
from mgssl.pipelines import SPLIT_FILE
from mgssl.pipelines.sources import load_digits_arrays
from mgssl.pipelines.splits import balanced_split
from mgssl.train import checkpoint as ckpt
from mgssl.train.cli import main
from mgssl.train.config import load_config, to_dict
from mgssl.train.engine import run
from mgssl.train.metrics import read_metrics
from mgssl.train.rundir import EXIT_STOPPED, RunFolderError, check_resume_schedule, run_files

QUIET = ("train.progress=false", "train.tensorboard=false")
TINY = ("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2", *QUIET)


def tiny(*overrides):
    return load_config("digits", TINY + overrides)


def error_line(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def split_of_seed(seed):
    labels = load_digits_arrays().train_labels
    return balanced_split(labels, 10, 50, seed=seed, dataset="digits").labeled.tolist()


# ---------------------------------------------------------------------------------------------
# One writer per folder.

LOCK_HOLDER = """
import sys, time
from pathlib import Path
from mgssl.train.runlock import lock_run_folder  # no torch: starts in a blink
lock_run_folder(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_start_into_a_locked_folder_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path, subprocess_env,
                                                                                        capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], env=subprocess_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        code = main(["digits", "--out", str(out), "--set", *TINY])
        error_line(capsys, code, str(out), "in use by another run", f"pid {holder.pid}", socket.gethostname(),
                   "started 20")
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # the refused start wrote nothing
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert main(["digits", "--out", str(out), "--set", *TINY]) == 0  # the OS dropped the dead holder's lock


# ---------------------------------------------------------------------------------------------
# A folder that holds a run, whichever of its files are left, is not started over.


@pytest.mark.parametrize("left", ["final.json", "metrics.jsonl", "config.yaml", "runs.jsonl", SPLIT_FILE,
                                  "checkpoints/last.pt"])
def test_a_fresh_start_refuses_a_folder_with_any_file_of_a_run(tmp_path, left):
    path = tmp_path / left
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    with pytest.raises(RunFolderError, match=f"already holds a run \\({left.split('/')[0]}\\)"):
        run(tiny(), tmp_path)
    assert path.read_text() == "{}\n" and run_files(tmp_path) == [left.split("/")[0]]


def test_a_finished_run_without_its_checkpoint_is_neither_restarted_nor_resumed(tmp_path):
    run(tiny(), tmp_path)
    (tmp_path / "checkpoints" / "last.pt").unlink()  # deleted to save disk
    final = (tmp_path / "final.json").read_text()
    with pytest.raises(RunFolderError, match="already holds a run .*final.json.*no checkpoint"):
        run(tiny("seed=1"), tmp_path)
    with pytest.raises(RunFolderError, match="finished run"):
        run(tiny("seed=1"), tmp_path, resume=True)
    assert (tmp_path / "final.json").read_text() == final


# ---------------------------------------------------------------------------------------------
# Only --resume (and data.split_file) reuses a split; a failed start leaves nothing.


def test_a_failed_start_leaves_nothing_that_changes_the_next_run(tmp_path, monkeypatch):
    def no_optimizer(*args, **kwargs):
        raise ValueError("the optimiser could not be built")

    monkeypatch.setattr(engine_module, "build_optimizer", no_optimizer)
    with pytest.raises(ValueError, match="optimiser"):
        run(tiny("seed=1"), tmp_path)
    assert run_files(tmp_path) == []
    monkeypatch.undo()
    summary = run(tiny("seed=0"), tmp_path)
    saved = json.loads((tmp_path / SPLIT_FILE).read_text())
    assert summary["seed"] == saved["seed"] == 0 and saved["labeled"] == split_of_seed(0)


def test_a_resume_without_a_checkpoint_draws_its_own_split_not_the_one_it_finds(tmp_path):
    labels = load_digits_arrays().train_labels
    balanced_split(labels, 10, 50, seed=1, dataset="digits").save(tmp_path / SPLIT_FILE)
    run(tiny("seed=0"), tmp_path, resume=True)
    assert json.loads((tmp_path / SPLIT_FILE).read_text())["labeled"] == split_of_seed(0)


# ---------------------------------------------------------------------------------------------
# A resume continues the experiment it was started as.


def test_a_resume_to_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    run(tiny("train.steps=4"), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("final.json", "metrics.jsonl", "checkpoints/last.pt")}
    with pytest.raises(RunFolderError, match="checkpointed at step 4, past the 2 steps"):
        run(tiny("train.steps=2"), tmp_path, resume=True)
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


def test_a_new_length_under_cosine_is_refused_unless_allowed(tmp_path):
    cosine = ("optim.schedule=cosine", "optim.warmup_steps=0")
    run(tiny("train.steps=4", *cosine), tmp_path)
    with pytest.raises(RunFolderError, match="changes the learning rate of steps already trained.*"
                                             "--allow-schedule-change"):
        run(tiny("train.steps=6", *cosine), tmp_path, resume=True)
    summary = run(tiny("train.steps=6", *cosine), tmp_path, resume=True, allow_schedule_change=True)
    assert summary["steps"] == 6


def test_a_new_length_is_allowed_where_the_finished_steps_keep_their_learning_rate():
    step = tiny("train.steps=100")
    cosine_warm = tiny("train.steps=100", "optim.schedule=cosine", "optim.warmup_steps=50")
    for cfg, start, allowed in ((step, 90, True), (cosine_warm, 51, True), (cosine_warm, 52, False)):
        longer = load_config("digits", TINY + ("train.steps=200", f"optim.schedule={cfg.optim.schedule}",
                                               f"optim.warmup_steps={cfg.optim.warmup_steps}"))
        if allowed:
            check_resume_schedule(to_dict(cfg), longer, start, 1212, allow_change=False)
        else:
            with pytest.raises(RunFolderError, match="from step 51"):
                check_resume_schedule(to_dict(cfg), longer, start, 1212, allow_change=False)


def test_a_resume_may_move_the_run_to_another_device(tmp_path):
    run(tiny("train.device=auto"), tmp_path)
    summary = run(tiny("train.device=cpu", "train.steps=4"), tmp_path, resume=True)
    assert summary["steps"] == 4


# ---------------------------------------------------------------------------------------------
# An --out that cannot be written gets one line before anything is written.


def test_a_read_only_out_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    out = parent / "run"
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root writes through permissions: act as a read-only file system
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if str(path).startswith(str(parent)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        code = main(["digits", "--out", str(out), "--set", *TINY])
    finally:
        parent.chmod(0o755)
    error_line(capsys, code, f"cannot write to the run folder {out}")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The speed logged after a resume.


def test_the_first_speed_after_a_resume_counts_only_the_steps_it_timed(tmp_path, monkeypatch):
    """A fake clock advances one second per step: every logged speed must be one global batch a second."""
    settings = ("train.steps=6", "train.log_every=4", "train.checkpoint_every=3", "train.eval_every=6", *QUIET)
    clock, real_step = [0.0], engine_module.train_step

    def crash_after_the_checkpoint_at_3(*args, **kwargs):
        if clock[0] == 3:
            raise RuntimeError("killed")
        clock[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(engine_module, "train_step", crash_after_the_checkpoint_at_3)
    with pytest.raises(RuntimeError, match="killed"):
        run(load_config("digits", settings), tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["log_window"]["count"] == 3

    def step(*args, **kwargs):
        clock[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine_module, "train_step", step)
    run(load_config("digits", settings), tmp_path, resume=True)
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == [4, 6]
    assert [r["pairs_per_s"] for r in rows] == [32.0, 32.0]  # 1 step in 1 s, then 2 steps in 2 s


# ---------------------------------------------------------------------------------------------
# Stop signals.

STOP = ("train.steps=10", "train.eval_every=5", "train.checkpoint_every=5", "train.log_every=4", *QUIET)


@pytest.fixture
def signals_fail_the_test():
    """A stop signal that reaches no handler of the run fails the test instead of ending pytest."""
    def unhandled(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} was not handled by the run")

    previous = {s: signal.signal(s, unhandled) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def signal_during_step(monkeypatch, step, signum, again_while_saving=False):
    real_step, real_write, calls = engine_module.train_step, ckpt._write_file, []

    def one_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real_step(*args, **kwargs)

    def write(path, data):
        if again_while_saving and len(calls) == step:
            with open(path, "wb") as f:  # half the file is written when the second signal comes
                f.write(bytes(data[: len(data) // 2]))
            os.kill(os.getpid(), signum)
        return real_write(path, data)

    monkeypatch.setattr(engine_module, "train_step", one_step)
    monkeypatch.setattr(ckpt, "_write_file", write)


def without_time(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "pairs_per_s", "images_per_s")} for r in rows]


def test_sigterm_saves_where_it_stopped_and_the_resume_is_bit_identical(tmp_path, monkeypatch, capfd,
                                                                         signals_fail_the_test):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["digits", "--out", str(straight), "--set", *STOP]) == 0
    signal_during_step(monkeypatch, 7, signal.SIGTERM, again_while_saving=True)
    argv = ["digits", "--out", str(stopped), "--set", *STOP]
    capfd.readouterr()
    assert main(argv) == EXIT_STOPPED
    err = capfd.readouterr().err  # the signal handler writes to the file descriptor itself
    assert "SIGTERM again" in err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("stopped by SIGTERM at step 7 of 10; saved ") and "Traceback" not in err
    assert last_line.endswith(" -m mgssl.train " + " ".join([*argv, "--resume"])), last_line
    assert torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["step"] == 7
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["last.pt"]
    assert not (stopped / "final.json").exists()

    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    a, b = (json.loads((folder / "final.json").read_text()) for folder in (straight, stopped))
    assert a["weights_sha256"] == b["weights_sha256"] and a["test_error"] == b["test_error"]
    assert without_time(read_metrics(stopped)) == without_time(read_metrics(straight))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_sigint_sighup_and_sigusr1_stop_with_a_checkpoint_too(tmp_path, monkeypatch, capsys, signals_fail_the_test,
                                                      signum):
    signal_during_step(monkeypatch, 2, signum)
    assert main(["digits", "--out", str(tmp_path), "--set", *STOP]) == EXIT_STOPPED
    assert f"stopped by {signal.Signals(signum).name} at step 2 of 10" in capsys.readouterr().err
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
