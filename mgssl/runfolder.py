"""The run folder: the name of every file a run writes, how each is opened (never through a symbolic
link, so a link planted in a shared runs tree cannot make a run overwrite another file) and how each
is read, with errors that name the file and say what to do.

Standard library only: the trainer, the data pipelines and the tools all import it."""
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

FINAL = "final.json"  # written last: its presence means the run finished
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
RUNS = "runs.jsonl"  # one line per start, resume or restart
SPLIT = "labeled_split.json"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
CHECKPOINT = f"{CHECKPOINTS}/{LAST}"
BEST = "best.pt"  # the weights of the evaluation with the lowest validation error (with data.validation)
BEST_CHECKPOINT = f"{CHECKPOINTS}/{BEST}"
TENSORBOARD = "tensorboard"
CORRUPT = "corrupt_files.txt"
LOCK = "run.lock"
SKIPPED = "skipped_files.txt"  # folder data sets: files not read, rewritten at each start (not a run file)
# Everything a run writes into its folder: a fresh start refuses a folder that holds any of them.
RUN_FILES = (FINAL, METRICS, CONFIG, RUNS, SPLIT, CHECKPOINTS, TENSORBOARD, CORRUPT)
# Files that only a run folder holds: one with any of them but no final.json is an unfinished run.
MARKERS = (CONFIG, METRICS, RUNS, CHECKPOINT)

_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class RunFileError(ValueError):
    """A file of a run folder that is a link, is damaged, or cannot be written; the message names it."""

    def __init__(self, message: str, errno_: Optional[int] = None):
        super().__init__(message)
        self.errno = errno_


def links_in(run_dir: Path) -> list[str]:
    """The run files of `run_dir` (the lock and the checkpoint included) that are symbolic links."""
    run_dir = Path(run_dir)
    return [name for name in (LOCK, *RUN_FILES, CHECKPOINT) if (run_dir / name).is_symlink()]


def refuse_links(run_dir: Path) -> None:
    links = links_in(run_dir)
    if links:
        raise RunFileError(f"{Path(run_dir) / links[0]} is a symbolic link; a run writes only its own files, never "
                           f"through links ({', '.join(links)}): remove the link(s) or choose another --out folder")


def write_error(path: Path, e: OSError) -> RunFileError:
    """One line for an OSError met while writing run file `path`."""
    if e.errno == errno.ELOOP:
        message = (f"{path} is a symbolic link; a run writes only its own files, never through links: remove the "
                   "link or choose another --out folder")
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        message = f"no space left on the disk of {path.parent} while writing {path.name}; free space, then run the " \
                  "same command again"
    else:
        message = f"cannot write {path} ({e.strerror or e}); choose a folder you can write to"
    return RunFileError(message, e.errno)


def open_fd(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses to follow a link at `path` (ELOOP)."""
    return os.open(path, flags | _NO_FOLLOW, mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path`, created if missing; never through a link."""
    path = Path(path)
    try:
        fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            _write_all(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None


def write_atomic(path: Path, data: Union[bytes, str], fsync: bool = False) -> None:
    """Replace `path` by a file holding `data`: written under a fresh random name beside it (so no
    planted link is followed) and renamed over it, so a reader never sees half a file."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None


def open_binary(path: Path):
    """A file object reading `path`, never through a link."""
    path = Path(path)
    try:
        return os.fdopen(open_fd(path, os.O_RDONLY), "rb")
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFileError(f"{path} is a symbolic link; a run reads only its own files: remove the link") from None
        raise


def read_bytes(path: Path, limit: Optional[int] = None) -> bytes:
    with open_binary(path) as f:
        return f.read() if limit is None else f.read(limit)


def read_text(path: Path, fix: str) -> str:
    """`path` as UTF-8 text; bytes that are not are an error naming the file and `fix`."""
    try:
        return read_bytes(path).decode()
    except UnicodeDecodeError as e:
        raise RunFileError(f"{path} is damaged (byte {e.start} is not UTF-8 text); {fix}") from None


def read_json(path: Path, fix: str, kind: type = dict) -> object:
    """The JSON value of `path`, which must be a `kind`; anything else is one line naming the file."""
    try:
        value = json.loads(read_text(path, fix))
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path} is damaged (not JSON: {e.msg} at line {e.lineno}); {fix}") from None
    if not isinstance(value, kind):
        raise RunFileError(f"{path} is damaged (it holds a JSON {type(value).__name__}, not a "
                           f"{'object' if kind is dict else kind.__name__}); {fix}")
    return value


def read_records(path: Path, warn: Callable[[str], None]) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line; a line cut by a kill or holding bad bytes is
    skipped with a warning that names it."""
    records = []
    for number, raw in enumerate(read_bytes(path).splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            warn(f"warning: {path}:{number} is not a JSON object; skipped")
            continue
        records.append(record)
    return records


# config field metadata, read where a config meets a run folder's: on resume, and when tools group runs
RESUMABLE = {"resumable": True}  # a resume may change it (the schedule's length is checked further)
NOT_EXPERIMENT = {"not_experiment": True}  # runs that differ only in such keys repeat one experiment
HOW_RUN = {**RESUMABLE, **NOT_EXPERIMENT}  # how a run is run (paths, logging, kernels), not what it learns
