"""Checkpoints that are never half-written and load with torch.load(weights_only=True)."""
import errno
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from mgssl import runfolder as rf
from mgssl.train.run_state import RESUME_ENTRIES

LAST = rf.LAST


class CheckpointError(RuntimeError):
    pass


def save_atomic(state: dict, path: Path) -> None:
    """Serialise in memory, write a temporary file beside `path`, fsync, then rename over it: a crash,
    a kill or a full disk at any moment leaves the previous checkpoint intact. The temporary file has
    a fresh random name and no file is opened through a link."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = None
    try:
        if path.parent.is_symlink():
            raise OSError(errno.ELOOP, "a symbolic link")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        _write_file(Path(tmp), buffer.getbuffer())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the disk of {path.parent} while writing a checkpoint of "
                                  f"{buffer.getbuffer().nbytes / 2**20:.0f} MiB; the previous {path.name} is intact. "
                                  "Free space, then rerun the same command with --resume") from e
        raise CheckpointError(f"could not write {path} ({e.strerror or e}); the previous {path.name} is intact") from e


def _write_file(path: Path, data) -> None:
    with os.fdopen(rf.open_fd(path, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it must not bring back the old name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: Path, map_location="cpu") -> dict:
    """The dict saved in `path`, loaded as data (weights_only); never through a link."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with rf.open_binary(path) as f:
            state = torch.load(f, map_location=map_location, weights_only=True)
    except rf.RunFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # torch's own text spans many lines and suggests weights_only=False: never safe here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} could not be read ({first[:200]}); it is damaged or not an mgssl checkpoint: "
                              "restore it from a copy, or start a new run in another --out folder") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not the dict of an mgssl checkpoint; restore it "
                              "from a copy, or start a new run in another --out folder")
    return state


def check_resumable(state: dict, path: Path) -> dict:
    """`state` if it holds every entry a resume reads, with the right types; else one line naming `path`."""
    wrong = [key for key, kind in RESUME_ENTRIES.items() if not isinstance(state.get(key), kind)
             or (kind is int and isinstance(state.get(key), bool))]
    if wrong:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in wrong)} (or holds the wrong type there), so "
                              "it cannot be resumed: it is damaged or not a checkpoint of `python -m mgssl.train`; "
                              "restore it from a copy, or start a new run in another --out folder")
    return state


def all_finite(tensors) -> bool:
    """True if every floating tensor is free of NaN and inf (one sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_floating_point(t)]
    return bool(torch.stack(flags).all()) if flags else True


def tensors_of(*states):
    """Every tensor inside nested dicts and lists (a model and an optimiser state, say)."""
    for state in states:
        if isinstance(state, torch.Tensor):
            yield state
        elif isinstance(state, dict):
            yield from tensors_of(*state.values())
        elif isinstance(state, (list, tuple)):
            yield from tensors_of(*state)


def fingerprint(state_dict: dict) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of a state dict: equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    path = Path(run_dir) / rf.CHECKPOINT
    return path if path.is_file() else None
