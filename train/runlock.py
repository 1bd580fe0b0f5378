"""One writer per run folder: an flock on run.lock, held by rank 0 for the run's life. The system
drops it when the process ends, however it ends, so a `kill -9` leaves no stale lock behind.
(Standard library only: a lock must be cheap to take and to inspect.)"""
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from mgssl.runfolder import LOCK, open_fd, refuse_links


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked: locked, taken, unwritable, or a resume that would
    change the experiment."""


def lock_run_folder(run_dir: Path) -> int:
    """Create `run_dir` if needed and lock it; returns the lock's file descriptor. A folder whose run
    files are links is refused: the run would write through them."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot write to the run folder {run_dir} ({e.strerror}); choose an --out folder "
                             "you can write to") from None
    refuse_links(run_dir)
    try:
        fd = open_fd(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise RunFolderError(f"cannot write to the run folder {run_dir} ({e.strerror}); choose an --out folder "
                             "you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunFolderError(f"{run_dir} is in use by another run ({holder}); wait for it to end or stop it, "
                             "or choose another --out folder") from None
    if not os.access(run_dir, os.W_OK):  # an old lock file in a folder made read-only since
        os.close(fd)
        raise RunFolderError(f"cannot write to the run folder {run_dir} (read-only); choose an --out folder "
                             "you can write to")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not yet recorded"
