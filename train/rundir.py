"""A run folder's life: one writer at a time (a lock), the decision to start, resume or refuse, the
files a start writes, a clean stop on SIGTERM / SIGINT / SIGHUP / SIGUSR1, and the final summary.
The folder's files and how each is opened are defined once, in mgssl/runfolder.py."""
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import yaml

import mgssl
from mgssl import runfolder as rf
from mgssl.pipelines import DataConfig, LabelSplit
from mgssl.train import checkpoint as ckpt
from mgssl.train import distributed as D
from mgssl.train import run_state as rs
from mgssl.train.config import Config, config_diff, from_dict, keys_marked, normalized, to_dict
from mgssl.train.runlock import RunFolderError, lock_run_folder
from mgssl.train.schedule import learning_rate, plan

# keys a resume may change (train.steps/epochs are also checked against the finished steps' schedule)
RESUMABLE_CHANGES = keys_marked("resumable")
# SIGHUP: a closed terminal or a dropped ssh session stops the run as SIGTERM does, with a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, continue later with --resume


class RunStopped(Exception):
    """Raised on every rank once a stop signal has been honoured and the checkpoint written."""

    def __init__(self, signal_name: str, step: int, total_steps: int, checkpoint: Path):
        super().__init__(f"stopped by {signal_name} at step {step} of {total_steps}")
        self.signal_name, self.step, self.total_steps, self.checkpoint = signal_name, step, total_steps, checkpoint


# ---------------------------------------------------------------------------------------------
# Agreement: a refusal found on one rank stops every rank, each with one line.


def agree(d: D.Dist, check: Callable[[], object]):
    """Run `check` on this rank; if it fails on any rank, raise on every rank (so none waits forever
    in a collective for a rank that gave up). Returns what `check` returned."""
    result, error = None, None
    try:
        result = check()
    except (RunFolderError, ValueError, FileNotFoundError, ckpt.CheckpointError) as e:
        error = e
    messages = D.gather_objects(None if error is None else str(error), d)
    if error is not None:
        raise error
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise RunFolderError(f"rank {rank} stopped: {message}")
    return result


@contextmanager
def held(run_dir: Path, d: D.Dist) -> Iterator[None]:
    """Hold `run_dir`'s lock (on rank 0) for the body; every rank is refused if rank 0 is."""
    fd = agree(d, lambda: lock_run_folder(run_dir) if d.is_main else None)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------------------------
# Start, resume or refuse.


def run_files(run_dir: Path) -> list[str]:
    return [name for name in rf.RUN_FILES if (run_dir / name).exists() or (run_dir / name).is_symlink()]


def resume_state(run_dir: Path, resume: bool, cfg: Config, d: D.Dist) -> Optional[dict]:
    """The checkpoint to continue from, or None for a fresh start. Refuses to start over any file of
    another run, and to resume with settings that change the experiment. Every rank decides alike."""

    def decide() -> Optional[dict]:
        last = ckpt.last_checkpoint(run_dir)
        found = run_files(run_dir)
        if found and not resume:
            how = ("add --resume to continue it" if last is not None else
                   "it has no checkpoint to continue from" if rf.FINAL in found else
                   "it has no checkpoint yet; --resume starts it again from step 0")
            raise RunFolderError(f"{run_dir} already holds a run ({', '.join(found)}); {how}, or choose another "
                                 "--out folder")
        if last is None:
            if resume and rf.FINAL in found:
                raise RunFolderError(f"{run_dir} holds a finished run (final.json) but no checkpoints/{ckpt.LAST} "
                                     "to continue from; choose another --out folder")
            return None
        state = ckpt.check_resumable(ckpt.load(last), last)
        check_resume_config(state[rs.CONFIG], cfg)
        return state

    state = agree(d, decide)
    start = int(state[rs.STEP]) if state is not None else 0
    starts = D.gather_objects(start, d)
    if len(set(starts)) != 1:
        raise ValueError(f"the ranks found different checkpoints in {run_dir} (steps {starts}): --out must be a "
                         "folder on a file system that every node shares")
    if resume and state is None and d.is_main:
        print(f"no checkpoint in {run_dir}; starting a new run", file=sys.stderr)
    return state


def check_resume_config(saved: dict, cfg: Config) -> None:
    changes = [c for c in config_diff(normalized(saved), to_dict(cfg))
               if not c.startswith(RESUMABLE_CHANGES)]
    if changes:
        raise ValueError("the config differs from the one the run was started with:\n  " + "\n  ".join(changes) +
                         "\nResume with the original settings, or start a new run in another --out folder.")


def check_resume_schedule(saved: dict, cfg: Config, start: int, unlabeled_size: int, allow_change: bool) -> None:
    """A resume may run longer (or stop earlier) only if the steps already trained keep their learning
    rates: then it is the run it would have been had it been started with the new length."""
    before, after = plan(from_dict(Config, saved), unlabeled_size), plan(cfg, unlabeled_size)
    if after.total_steps < start:
        raise RunFolderError(f"the run was checkpointed at step {start}, past the {after.total_steps} steps asked "
                             f"for now; resume with train.steps of at least {start}, or start a new run")
    if after.total_steps == before.total_steps or allow_change:
        return
    changed = next((s for s in range(start) if learning_rate(s, cfg.optim, before.total_steps, before.warmup_steps)
                    != learning_rate(s, cfg.optim, after.total_steps, after.warmup_steps)), None)
    if changed is not None:
        raise RunFolderError(f"{before.total_steps} -> {after.total_steps} steps changes the learning rate of steps "
                             f"already trained (optim.schedule={cfg.optim.schedule}, from step {changed}), so the "
                             "result would match neither length; keep the length, or add --allow-schedule-change "
                             "to accept the jump")


def check_same_train_set(state: dict, split: LabelSplit, run_dir: Path) -> None:
    """A resume trains on the images, labels and class names the checkpoint was trained on."""
    classes, sha256 = rs.saved_train_set(state)
    saved_split = LabelSplit(split.dataset, split.train_size, split.seed, split.labeled,
                             None if classes is None else tuple(classes), sha256)
    try:
        saved_split.check_same_train_set(split.classes, split.train_sha256, str(run_dir / rf.CHECKPOINT))
    except ValueError as e:
        raise RunFolderError(str(e)) from None


def data_config(cfg: DataConfig, run_dir: Path, state: Optional[dict]) -> DataConfig:
    """A resumed run reads the split it trained on; a fresh one never takes a split it finds in the
    folder (only data.split_file names a split to reuse)."""
    saved = run_dir / rf.SPLIT
    if state is not None and saved.is_file():
        return dataclasses.replace(cfg, split_file=str(saved))
    return cfg


# ---------------------------------------------------------------------------------------------
# Files: written only once the run really starts, so a start that fails leaves nothing behind.


def launch_command(argv: list[str]) -> str:
    """The command as typed, as near as the process can tell (torchrun shows up in its environment)."""
    cmd = [Path(sys.executable).name, "-m", "mgssl.train", *argv]
    if Path(sys.argv[0]).name == "mgssl":  # the console command (mgssl/cli.py)
        cmd = ["mgssl", "train", *argv]
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        cmd = ["torchrun", f"--nnodes={os.environ.get('GROUP_WORLD_SIZE', '?')}",
               f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}",
               f"--max-restarts={os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0')}", "-m", "mgssl.train", *argv]
    return " ".join(cmd)


def continue_command(argv: list[str]) -> str:
    return launch_command(argv if "--resume" in argv else [*argv, "--resume"])


def write_start_files(run_dir: Path, cfg: Config, argv: list[str], d: D.Dist, start: int, split: LabelSplit,
                      git_commit: Optional[str], backend_flags: dict) -> None:
    """config.yaml, labeled_split.json and a line of runs.jsonl, on rank 0. A write that fails (a full
    disk) removes the files this start created, so the folder does not refuse the next start."""
    if not d.is_main:
        agree(d, lambda: None)
        return
    info = {"command": launch_command(argv), "argv": argv, "mgssl_version": mgssl.__version__,
            "git_commit": git_commit, "estimator": cfg.method.estimator,
            "world_size": d.world_size, "global_batch": cfg.data.batch_size,
            "batch_per_process": cfg.data.batch_size // d.world_size, "device": str(d.device),
            "torch": torch.__version__, "python": sys.version.split()[0], "host": socket.gethostname(),
            "pid": os.getpid(), "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "resumed_from_step": start, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "backend_flags": backend_flags}
    existed = set(run_files(run_dir))

    def write() -> None:
        try:
            rf.write_atomic(run_dir / rf.CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))
            rf.write_atomic(run_dir / rf.SPLIT, split.to_json())
            rf.append_text(run_dir / rf.RUNS, json.dumps(info) + "\n")  # one line per start, resume or restart
        except rf.RunFileError:
            for name in (rf.CONFIG, rf.SPLIT, rf.RUNS):
                if name not in existed:
                    (run_dir / name).unlink(missing_ok=True)
            raise

    agree(d, write)


def write_final(run_dir: Path, summary: dict, d: D.Dist) -> None:
    if d.is_main:
        rf.write_atomic(run_dir / rf.FINAL, json.dumps(summary, indent=2) + "\n", fsync=True)


# ---------------------------------------------------------------------------------------------
# Stop signals: finish the step, agree across ranks, save, exit with EXIT_STOPPED.


class StopSignals:
    """Turns SIGTERM, SIGINT, SIGHUP and SIGUSR1 into a request to stop at a step boundary that all ranks share.

    On several ranks, each boundary posts this rank's request in a one-number all-reduce (gloo, on
    the CPU, asynchronous) and reads the one posted at the boundary before: no host-device sync and
    no wait in the step; a signal is honoured one step after the step it arrived in, on every rank at
    the same step. Further signals while stopping are noted and ignored, so the save completes."""

    def __init__(self, d: D.Dist):
        self.received = 0  # the signal's number, 0 while none
        self._distributed = d.enabled
        self._group = dist.new_group(backend="gloo") if d.enabled else None
        self._pending: Optional[tuple] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._drain()  # every rank posted it; a rank that died makes it fail, which must not hide why
        except RuntimeError:
            if exc_type is None:
                raise
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        # os.write, not print: a handler may interrupt a print to the same stream.
        if self.received:
            os.write(2, f"{signal.Signals(signum).name} again: still stopping; the checkpoint being written "
                        "stays consistent (SIGKILL stops at once and keeps the previous one)\n".encode())
            return
        self.received = signum
        os.write(2, f"{signal.Signals(signum).name}: stopping after the current step and saving a "
                    "checkpoint\n".encode())

    def agreed(self) -> str:
        """At a step boundary: the name of the signal every rank now stops for, or "" to go on."""
        if not self._distributed:
            return signal.Signals(self.received).name if self.received else ""
        posted = self._drain()
        flag = torch.tensor([self.received], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return signal.Signals(posted).name if posted else ""

    def _drain(self) -> int:
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()
        return int(flag.item())
